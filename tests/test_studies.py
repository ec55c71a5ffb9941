"""pretrain/studies/arms.py (a study = a table of arms) through the backbone study (pretrain/studies/archs.py): the
same-setup check allows only the study's own differences, an optional arm the toolkit rejects is reported as not
yet supported, and a toy study trains, measures, scores and reports every arm."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from helpers import toy_corpus
from pretrain.studies.arms import Arm, Study, check_same_setup, load_arm_configs


def study_args(tmp_path: Path, arms, override=()) -> argparse.Namespace:
    return argparse.Namespace(arms=list(arms), steps=4, out=tmp_path / "runs", override=list(override))


def test_same_setup_check_allows_only_the_studys_differences(tmp_path):
    arms = {"a": Arm("configs/tiny.yaml", 0), "b": Arm("configs/spanbert-tiny.yaml", 1),
            "wider": Arm("configs/tiny.yaml", 0, ("model.hidden_size=256",))}
    study = Study(name="t", script="t", runs="runs/t", section="## T", arms=arms, varies=("objective",))
    configs, unsupported = load_arm_configs(study, study_args(tmp_path, ["a", "b"]))
    assert set(configs) == {"a", "b"} and unsupported == {}
    check_same_setup(study, configs)  # objective, seed and output_dir differ: allowed
    configs, _ = load_arm_configs(study, study_args(tmp_path, ["a", "wider"]))
    with pytest.raises(SystemExit, match="model.hidden_size"):
        check_same_setup(study, configs)
    modernbert = Arm("configs/tiny.yaml", 0, ("model.arch=modernbert", "model.modernbert.local_attention=64"))
    archs = Study(name="t", script="t", runs="runs/t", section="## T", arms={"a": arms["a"], "mb": modernbert},
                  varies=("model.arch", "model.modernbert"))
    configs, _ = load_arm_configs(archs, study_args(tmp_path, ["a", "mb"]))
    check_same_setup(archs, configs)  # the arch and its own section: allowed where the study says so
    with pytest.raises(SystemExit, match="model.arch"):
        check_same_setup(Study(name="t", script="t", runs="runs/t", section="## T", arms=archs.arms, varies=()),
                         configs)
    no_objective = Study(name="t", script="t", runs="runs/t", section="## T", arms=arms, varies=())
    configs, _ = load_arm_configs(no_objective, study_args(tmp_path, ["a", "b"]))
    with pytest.raises(SystemExit, match="objective"):
        check_same_setup(no_objective, configs)


def test_a_rejected_arm_fails_the_study_unless_it_is_optional(tmp_path):
    arms = {"a": Arm("configs/tiny.yaml", 0), "bad": Arm("configs/tiny.yaml", 0, ("model.num_heads=3",))}
    strict = Study(name="t", script="t", runs="runs/t", section="## T", arms=arms, varies=())
    with pytest.raises(ValueError, match="num_heads"):
        load_arm_configs(strict, study_args(tmp_path, ["a", "bad"]))
    lenient = Study(name="t", script="t", runs="runs/t", section="## T", arms=arms, varies=(),
                    optional=frozenset({"bad"}))
    configs, unsupported = load_arm_configs(lenient, study_args(tmp_path, ["a", "bad"]))
    assert list(configs) == ["a"] and "num_heads" in unsupported["bad"]


def labelled(n: int) -> list[dict]:
    words = toy_corpus(n_docs=n, seed=3)
    return [{"text": " ".join(doc.split()[:8]) + f" {i}", "label": i % 3} for i, doc in enumerate(words)]


def test_archs_study_trains_scores_and_reports_every_arm(tmp_path):
    """Real runs of a 2 x 32 model, 4 steps: per arm its parameters, FLOPs/step, held-out MLM and the probe; the
    per-arch seed spread; the ELECTRA-on-ModernBERT arm trains and its discriminator is probed; the ModernBERT arm is
    a ModernBertForMaskedLM with its own parameter count."""
    from pretrain.studies import archs

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=150, seed=4)) + "\n")
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps(e) + "\n" for e in labelled(120)))
    arms = ["bert-seed0", "modernbert-seed0", "electra-modernbert-seed0", "bert-seed1"]
    results = tmp_path / "results"
    argv = ["--arms", *arms, "--steps", "4", "--out", str(tmp_path / "runs"), "--results", str(results),
            "--probe-data", str(tmp_path / "probe.jsonl"), "--probe-train", "80", "--probe-test", "40",
            "--eval-blocks", "8", "--threads", "1", "--jobs", "2", "--override", "data.demo=[]",
            f"data.files=[{tmp_path / 'corpus' / '*.txt'}]", f"data.cache_dir={tmp_path / 'cache'}",
            "data.block_size=32", "data.validation_fraction=0.1", "data.num_workers=0", "tokenizer.vocab_size=200",
            "model.hidden_size=32", "model.intermediate_size=64", "model.max_position_embeddings=64",
            "train.micro_batch_size=4", "train.warmup_steps=1", "train.device=cpu"]
    assert archs.main(argv) == 0
    (raw,) = results.glob("archs-*.json")
    report = json.loads(raw.read_text())
    trained = arms
    assert set(report["runs"]) == set(trained) and report["unsupported"] == {}
    electra = report["evaluations"]["electra-modernbert-seed0"]
    assert electra["kind"] == "electra-run" and electra["discriminator"]["model_class"] == "ModernBertModel"
    for arm in trained:
        assert report["runs"][arm]["steps"] == 4 and report["flops"][arm]["train_flops_per_step"] > 0
        assert report["flops"][arm]["tokens_per_step"] == 4 * 32
        assert sum(report["flops"][arm]["parameters"].values()) > 0
        assert 0.0 <= report["flat"][arm]["probe_acc"] <= 1.0
    for arm in (a for a in trained if not a.startswith("electra")):
        assert report["flat"][arm]["mlm_loss"] > 0
        assert report["evaluations"][arm]["data"]["blocks"] == 8
    assert report["evaluations"]["random-init-bert"]["random_init"] is True
    assert report["evaluations"]["modernbert-seed0"]["model_class"] == "ModernBertForMaskedLM"
    assert report["flops"]["modernbert-seed0"]["parameters"] != report["flops"]["bert-seed0"]["parameters"]
    bert = report["seed_spread"]["bert"]["mlm_loss"]
    values = [report["flat"]["bert-seed0"]["mlm_loss"], report["flat"]["bert-seed1"]["mlm_loss"]]
    assert bert["values"] == values and bert["spread"] == pytest.approx(abs(values[0] - values[1]))
    text = (results / "RESULTS.md").read_text()
    assert archs.STUDY.section in text and "| bert-seed1 | bert | mlm |" in text
    for arm in report["unsupported"]:
        assert f"**{arm}: not yet supported**" in text
    # a second call reuses the finished runs; --from-json re-renders the same section
    before = {arm: (tmp_path / "runs" / arm / "compare_run.json").read_text() for arm in trained}
    assert archs.main(argv) == 0
    assert before == {arm: (tmp_path / "runs" / arm / "compare_run.json").read_text() for arm in trained}
    text = (results / "RESULTS.md").read_text()
    (results / "RESULTS.md").write_text("# other\n")
    assert archs.main(["--from-json", str(raw), "--results", str(results), "--out", str(tmp_path / "runs")]) == 0
    assert (results / "RESULTS.md").read_text() == "# other\n\n" + text.split("\n\n", 2)[2]


def made_up_report() -> dict:
    """A backbone-study report with made-up numbers: arm i has MLM loss 5.8 + 0.01 i, probe 0.43 + 0.002 i."""
    def evaluation(loss, acc, probe):
        return {"kind": "mlm", "encoder_parameters": 900_000, "data": {"blocks": 10},
                "mlm": {"loss": loss, "acc": acc, "unigram_loss": 6.6, "unigram_acc": 0.08},
                "span_infilling": {"token_acc": acc / 2, "exact_span_acc": 0.0},
                "probe": {"accuracy": probe, "macro_f1": probe / 2, "majority_acc": 0.12, "n_train": 100,
                          "n_test": 50}}

    arms = ["bert-seed0", "roberta-seed0", "modernbert-seed0", "span-modernbert-seed0", "bert-seed1", "roberta-seed1",
            "modernbert-seed1"]
    evaluations = {a: evaluation(5.8 + 0.01 * i, 0.17 - 0.001 * i, 0.43 + 0.002 * i) for i, a in enumerate(arms)}
    evaluations["random-init-bert"] = evaluation(9.0, 0.0, 0.39)
    return {"date": "2026-12-02", "command": "python scripts/compare_archs.py", "steps": 1500, "threads": 1,
            "eval_blocks": 10, "host": {"cpu": "cpu", "cores": 2, "torch": "2", "transformers": "5"},
            "runs": {a: {"train_seconds": 400.0, "tok_per_s": 14000, "load1_mean": 3.0} for a in arms},
            "flops": {a: {"train_flops_per_step": 15e9 * (1 + 0.1 * i),
                          "parameters": {"model": 1_500_000, "objective_heads": 10_000 * i}}
                      for i, a in enumerate(arms)},
            "evaluations": evaluations, "notes": [],
            "unsupported": {"electra-modernbert-seed0": "objective electra trains model.arch bert only"}}


def test_archs_report_spreads_gaps_and_section():
    from pretrain.studies import archs

    report = made_up_report()
    archs.finish(report, None)
    spread = report["seed_spread"]
    assert set(spread) == {"bert", "roberta", "modernbert"}
    # bert: arms 0 and 4, roberta 1 and 5, modernbert 2 and 6: every spread is 4 steps of the made-up numbers
    assert spread["modernbert"]["mlm_loss"]["values"] == pytest.approx([5.82, 5.86])
    assert spread["modernbert"]["mlm_loss"]["mean"] == pytest.approx(5.84)
    assert all(s[m]["spread"] == pytest.approx(4 * step) for s in spread.values()
               for m, step in (("mlm_loss", 0.01), ("probe_acc", 0.002)))
    gaps = report["gaps"]
    assert {arm: g["vs"] for arm, g in gaps.items()} == {"roberta-seed0": "bert-seed0",
                                                         "modernbert-seed0": "bert-seed0",
                                                         "span-modernbert-seed0": "modernbert-seed0"}
    assert gaps["modernbert-seed0"]["mlm_loss"]["diff"] == pytest.approx(0.02)
    assert gaps["modernbert-seed0"]["mlm_loss"]["x_spread"] == pytest.approx(0.5)
    assert gaps["span-modernbert-seed0"]["probe_acc"]["x_spread"] == pytest.approx(0.25)  # modernbert's own spread
    text = archs.markdown(report)
    table, _, differences = text.partition("Differences")
    lines = table.splitlines()
    assert ("| modernbert-seed0 | modernbert | mlm | 1.52M (0.90M) | 18.0 (1.20×) | 400 s (14.0k) | 3.0 | 5.820 | "
            "0.168 | 0.084 | 0.434 |") in lines
    assert ("| random-init-bert | bert | – (random init) | 1.50M (0.90M) | – | – | – | 9.000 | 0.000 | 0.000 | "
            "0.390 |") in lines
    assert ("| modernbert-seed0 | bert-seed0 | +0.0200 (0.5×) | -0.0020 (0.5×) | -0.0010 (0.5×) | +0.0040 (0.5×) "
            "|") in differences.splitlines()
    assert "**electra-modernbert-seed0: not yet supported** (its config is rejected: objective electra" in text


def test_objectives_study_renders_its_committed_section_from_its_raw_json(tmp_path):
    """The objectives study on the shared machinery: --from-json of benchmarks/objectives-2026-11-23.json gives the
    tables and the command of the committed RESULTS.md section (its notes were edited by hand since)."""
    import shutil

    from pretrain.studies import objectives

    root = Path(__file__).resolve().parents[1]
    raw = shutil.copy(root / "benchmarks" / "objectives-2026-11-23.json", tmp_path / "raw.json")
    assert objectives.main(["--from-json", str(raw), "--results", str(tmp_path), "--out", str(tmp_path)]) == 0
    rendered = (tmp_path / "RESULTS.md").read_text().split(objectives.STUDY.section, 1)[1]
    committed = (root / "benchmarks" / "RESULTS.md").read_text().split(objectives.STUDY.section, 1)[1]
    committed = committed[:committed.index("\n## ")]
    lines = [x for x in rendered.splitlines() if x.startswith(("| ", "python scripts/"))]
    assert len(lines) == 14 and all(x in committed.splitlines() for x in lines)
