"""pretrain/evaluation.py and scripts/evaluate.py: span-infilling masks, token-exact MLM scoring checked against a
hand computation, the linear probe, and whole exports (MLM and ELECTRA) through the command line. Tiny models and
synthetic data only: nothing is downloaded."""

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import WORDS, make_tokenizer, packed_examples, tiny_model_config, toy_corpus
from pretrain.evaluation import (
    EvalOptions,
    HeldOut,
    evaluate_export,
    masked_lm,
    probe_encoder,
    span_infilling,
    span_infilling_batch,
    span_infilling_spans,
    supersense_split,
)

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def special(tok):
    mask = np.zeros(len(tok), dtype=bool)
    mask[list(tok.all_special_ids)] = True
    return mask


def synthetic_labelled(n: int, seed: int = 0) -> list[dict]:
    """Three classes, each marked by its own keyword among random filler words."""
    rng = random.Random(seed)
    keywords = ["fox", "river", "gradient"]
    filler = [w for w in WORDS if w not in keywords]
    out = []
    for i in range(n):
        label = rng.randrange(3)
        words = [rng.choice(filler) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randrange(len(words) + 1), keywords[label])
        out.append({"text": f"{' '.join(words)} {i}", "label": label})  # the number keeps texts distinct
    return out


# --------------------------------------------------------------------------- span-infilling masks


def test_span_masks_are_whole_words_3_to_6_never_cross_specials_all_mask(tok, special):
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 80, length=64, seed=3))]
    batch, spans = span_infilling_batch(examples, tok, seed=11)
    n_spans, n_with_sep = 0, 0
    for b, e in enumerate(examples):
        ids, words = torch.tensor(e["input_ids"]), torch.tensor(e["word_ids"])
        covered = torch.zeros(len(ids), dtype=torch.bool)
        n_with_sep += int((ids[1:-1] == tok.sep_token_id).any())
        for s, t, n_words in spans[b]:
            assert 3 <= n_words <= 6
            assert not covered[s:t].any(), "spans overlap"
            assert not special[ids[s:t].numpy()].any() and (words[s:t] >= 0).all(), "a span holds a special token"
            # whole words: the token before the span and the token after it belong to other words
            assert s == 0 or special[int(ids[s - 1])] or words[s - 1] != words[s]
            assert t == len(ids) or special[int(ids[t])] or words[t] != words[t - 1]
            assert len(torch.unique(words[s:t])) == n_words
            assert (batch["input_ids"][b, s:t] == tok.mask_token_id).all(), "span tokens must all be [MASK]"
            covered[s:t] = True
        n_spans += len(spans[b])
        assert torch.equal(batch["labels"][b] != -100, covered)
        assert torch.equal(batch["labels"][b][covered], ids[covered])
        assert torch.equal(batch["input_ids"][b][~covered], ids[~covered])
        # the stop rule: at least round(0.15 n) tokens, and without the last-placed span fewer than that
        n = int((~special[ids.numpy()]).sum())
        budget = round(0.15 * n)
        sizes = [t - s for s, t, _ in spans[b]]
        assert sum(sizes) >= budget
        assert min(sum(sizes) - size for size in sizes) < budget
    assert n_spans >= 2 * len(examples), "several spans per block expected"
    assert n_with_sep > 10, "the fixture must contain document-separating [SEP]s to test the segment rule"


def test_span_masks_respect_segments_and_are_seeded(tok, special):
    cls, sep, unk = tok.cls_token_id, tok.sep_token_id, tok.unk_token_id
    fox = tok.convert_tokens_to_ids("fox")
    # [CLS] w w [SEP] w w w w w w w [UNK] w w [SEP]: only the 7-word segment can hold a span of >= 3 words
    ids = np.array([cls, fox, fox, sep] + [fox] * 7 + [unk, fox, fox, sep])
    words = np.array([-1, 0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -1])
    for seed in range(30):
        spans = span_infilling_spans(ids, words, special, np.random.default_rng(seed))
        assert len(spans) == 1  # budget round(0.15 * 11) = 2 tokens: one span covers it
        s, t, n_words = spans[0]
        assert 4 <= s and t <= 11 and t - s == n_words
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 20, length=64))]
    again = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 20, length=64))]
    assert span_infilling_batch(examples, tok, seed=1)[1] == span_infilling_batch(again, tok, seed=1)[1]
    assert span_infilling_batch(examples, tok, seed=1)[1] != span_infilling_batch(examples, tok, seed=2)[1]
    # the masks of a block depend on its index, not on the batch it sits in
    assert span_infilling_batch(examples[5:6], tok, seed=1)[1][0] == span_infilling_batch(examples, tok, seed=1)[1][5]


# --------------------------------------------------------------------------- token-exact MLM scoring


@pytest.fixture(scope="module")
def mlm_export(tok, tmp_path_factory):
    from objectives import get_objective
    from pretrain.hf_io import save_hf

    torch.manual_seed(0)
    model = get_objective("mlm", tok).build_model(tiny_model_config()).eval()
    out = tmp_path_factory.mktemp("export") / "mlm"
    save_hf(model, out, tok)
    return out, model


def test_masked_lm_equals_hand_computation(tok, mlm_export):
    from transformers import AutoModelForMaskedLM

    from objectives import get_objective

    export, trained = mlm_export
    loaded = AutoModelForMaskedLM.from_pretrained(str(export)).eval()
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 7, length=48, seed=5))]
    held = HeldOut(examples, None, {})
    got = masked_lm(loaded, tok, held, seed=5, batch_size=3)  # batches of 3, 3, 1 blocks

    # by hand: one block at a time, its masks from (seed, index), one log-softmax per masked token, fp64
    mlm = get_objective("mlm", tok, seed=5)
    nll, hits, n, batch_means = 0.0, 0, 0, []
    with torch.no_grad():
        for e in examples:
            b = mlm.collate([e])
            logits = trained(input_ids=b["input_ids"]).logits[0].double()
            block_nll = []
            for pos in torch.nonzero(b["labels"][0] != -100).flatten().tolist():
                target = int(b["labels"][0, pos])
                block_nll.append(-float(torch.log_softmax(logits[pos], -1)[target]))
                hits += int(int(logits[pos].argmax()) == target)
            nll += sum(block_nll)
            n += len(block_nll)
            batch_means.append(sum(block_nll) / max(len(block_nll), 1))
    assert got["n_masked"] == n > 0
    assert got["loss"] == pytest.approx(nll / n, abs=1e-5)
    assert got["acc"] == hits / n
    assert got["loss"] == pytest.approx(masked_lm(loaded, tok, held, seed=5, batch_size=7)["loss"], abs=1e-6)
    assert abs(np.mean(batch_means) - nll / n) > 1e-4, "fixture too uniform to tell a mean of means apart"


def test_span_infilling_scores_every_span_token(tok, mlm_export):
    from transformers import AutoModelForMaskedLM

    export, _ = mlm_export
    model = AutoModelForMaskedLM.from_pretrained(str(export)).eval()
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 9, length=64))]
    out = span_infilling(model, tok, HeldOut(examples, None, {}), seed=3, batch_size=4)
    _, spans = span_infilling_batch(examples, tok, seed=3)
    assert out["n_spans"] == sum(len(s) for s in spans)
    assert out["n_tokens"] == sum(t - s for block in spans for s, t, _ in block)
    assert sum(v["spans"] for v in out["by_words"].values()) == out["n_spans"]
    assert 0.0 <= out["exact_span_acc"] <= 1.0 and 0.0 <= out["token_acc"] <= 1.0
    assert 0.14 < out["masked_fraction"] < 0.3


# --------------------------------------------------------------------------- linear probe


def test_probe_on_a_tiny_model_returns_an_accuracy(tok):
    from transformers import BertModel

    from pretrain.model import bert_config

    torch.manual_seed(0)
    encoder = BertModel(bert_config(tiny_model_config(), len(tok), tok.pad_token_id), add_pooling_layer=False)
    train, test = supersense_split(synthetic_labelled(400), 300, 100, seed=0)
    assert not {e["text"] for e in train} & {e["text"] for e in test}
    result = probe_encoder(encoder, tok, train, test)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["n_train"] == 300 and result["n_test"] == 100 and result["classes"] == 3
    # the keyword is in the mean-pooled embedding even at random init: the probe must beat the majority class
    assert result["accuracy"] > result["majority_acc"] + 0.1
    again = probe_encoder(encoder, tok, train, test)
    assert again["accuracy"] == result["accuracy"]


# --------------------------------------------------------------------------- whole exports


@pytest.fixture(scope="module")
def heldout_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    (d / "heldout.txt").write_text("\n".join(toy_corpus(n_docs=60, seed=9)) + "\n")
    labelled = d / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(e) + "\n" for e in synthetic_labelled(150, seed=1)))
    return d


@pytest.mark.parametrize("arch, generator, encoder", [
    ("bert", "ElectraForMaskedLM", "ElectraModel"), ("roberta", "RobertaForMaskedLM", "RobertaModel"),
    ("modernbert", "ModernBertForMaskedLM", "ModernBertModel")])
def test_electra_run_export_scores_generator_and_probes_discriminator(tok, tmp_path, heldout_files, arch, generator,
                                                                     encoder):
    """An ELECTRA run's export of each arch (roberta/modernbert: a one-label ``*ForTokenClassification``
    discriminator, read as its base encoder)."""
    from objectives import get_objective

    objective = get_objective("electra", tok)
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config(arch=arch, max_position_embeddings=64))
    objective.export(model, tmp_path / "export", tok)
    options = EvalOptions(tasks=("mlm", "probe"), probe_train=100, probe_test=50)
    result = evaluate_export(tmp_path / "export", options, data_files=[str(heldout_files / "heldout.txt")],
                             block_size=64, cache_dir=str(tmp_path / "cache"),
                             probe_examples=synthetic_labelled(150, seed=1))
    assert result["kind"] == "electra-run"
    gen, disc = result["generator"], result["discriminator"]
    assert gen["model_class"] == generator and gen["mlm"]["n_masked"] > 0
    assert disc["model_class"] == encoder and "mlm" not in disc and "span_infilling" not in gen
    assert disc["hidden_size"] == 32 and gen["hidden_size"] == 8
    for r in (gen, disc):
        assert 0.0 <= r["probe"]["accuracy"] <= 1.0 and r["probe"]["n_test"] == 50


def test_evaluate_cli_prints_one_json_object(tok, mlm_export, heldout_files, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    export, _ = mlm_export
    argv = [str(export), "--data-files", str(heldout_files / "heldout.txt"), "--block-size", "64",
            "--cache-dir", str(tmp_path / "cache"), "--probe-data", str(heldout_files / "labelled.jsonl"),
            "--probe-train", "100", "--probe-test", "50", "--out", str(tmp_path / "eval.json")]
    assert script.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    assert printed["model_class"] == "BertForMaskedLM" and printed["data"]["split"] == "train"
    assert printed["data"]["blocks"] == printed["mlm"]["blocks"] > 0
    assert 0.0 <= printed["mlm"]["acc"] <= 1.0 and printed["mlm"]["loss"] > 0
    assert printed["span_infilling"]["n_spans"] > 0 and printed["probe"]["task"] == "custom"
    # no corpus and no config beside the export: a clear error, exit status 2
    assert script.main([str(export), "--tasks", "mlm"]) == 2
    assert "--config" in capsys.readouterr().err


def stock_masked_lm(arch: str, tok):
    """A tiny stock RoBERTa / ModernBERT ``*ForMaskedLM`` on the test tokenizer (the registry's exports are these
    classes): neither takes token_type_ids; RoBERTa numbers its positions from pad_id + 1."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    shape = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if arch == "roberta":
        return RobertaForMaskedLM(RobertaConfig(max_position_embeddings=64 + tok.pad_token_id + 1, type_vocab_size=1,
                                                **shape)).eval()
    return ModernBertForMaskedLM(ModernBertConfig(max_position_embeddings=64, local_attention=16,
                                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                                  cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                                                  **shape)).eval()


@pytest.mark.parametrize("arch", ["roberta", "modernbert"])
def test_roberta_and_modernbert_exports_are_scored(arch, tok, tmp_path, heldout_files):
    """The export's own class and base model; its MLM loss equals the stock model's labels= loss on the same masks;
    the probe's padded batches give each gloss the features it has alone (the padding mask reaches the encoder)."""
    from objectives import get_objective
    from pretrain.evaluation import encode_texts
    from pretrain.hf_io import save_hf

    model = stock_masked_lm(arch, tok)
    save_hf(model, tmp_path / "export", tok)
    options = EvalOptions(probe_train=100, probe_test=50)
    result = evaluate_export(tmp_path / "export", options, data_files=[str(heldout_files / "heldout.txt")],
                             block_size=64, cache_dir=str(tmp_path / "cache"),
                             probe_examples=synthetic_labelled(150, seed=1))
    assert result["model_class"] == type(model).__name__ and result["kind"] == "mlm"
    assert result["encoder_parameters"] == sum(p.numel() for p in model.base_model.parameters())
    assert result["span_infilling"]["n_spans"] > 0 and 0.0 <= result["probe"]["accuracy"] <= 1.0

    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 6, length=48, seed=5))]
    got = masked_lm(model, tok, HeldOut(examples, None, {}), seed=5, batch_size=6)
    batch = get_objective("mlm", tok, seed=5).collate(examples)
    with torch.no_grad():
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert got["n_masked"] == int((batch["labels"] != -100).sum()) > 0
    assert got["loss"] == pytest.approx(float(stock.loss), abs=1e-5)

    texts = ["the fox", "seven wizards quietly box jovial nymphs under bright stars", "river valley"]
    padded = encode_texts(model.base_model, tok, texts, batch_size=3)
    alone = np.concatenate([encode_texts(model.base_model, tok, [t]) for t in texts])
    np.testing.assert_allclose(padded, alone, atol=1e-5)
