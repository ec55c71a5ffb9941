"""The registries feed the config schema: a new objective registered from this file alone trains with
``objective.name: <new>`` and its own ``objective.<new>`` section, end to end and in local decoupled mode (simulated,
and as 2 gloo processes that run this very file), with export; decoupling modes come from
``pretrain.decouple.modes``; a config.yaml written before the registries existed still matches (a run resumes).

Run as a script (``torchrun … test_registries.py TESTS_DIR OUTPUT_DIR [overrides]``) it registers the objective and
runs ``tests/dist/decouple_worker.py``'s in-memory training.
"""

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "dist"))  # decouple_worker (also as a torchrun worker)

import objectives
from distributed import torchrun
from helpers import toy_corpus, train_records, write_tiny_config
from objectives.base import IGNORE_INDEX
from objectives.mlm import MLMObjective
from pretrain.config import ConfigError, config_differences, config_to_dict, load_config
from pretrain.decouple import modes

ROOT = Path(__file__).parent.parent
#: written by ``save_config`` at commit b2779d5 (before the split) for
#: ``load_config("configs/decoupled-sg.yaml", ["output_dir=runs/sg", "objective.span.mask_ratio=0.2"])``
HEAD_CONFIG = Path(__file__).parent / "fixtures" / "config-b2779d5.yaml"
#: config fields added after b2779d5: an older config.yaml lacks them and loads to the same config (their defaults)
ADDED_SINCE = ("data.num_proc", "train.ewc.fisher_data.num_proc", "decouple.overlap", "decouple.until_step",
               "train.probe", "model.arch", "model.modernbert", "train.wsd_decay_fraction")


@dataclass
class EveryKthConfig:
    every: int = 4
    """Predict every k-th non-special token (a deterministic selection rule)."""

    def __post_init__(self):
        if self.every < 2:
            raise ValueError(f"objective.every_kth.every must be >= 2, got {self.every}")


class EveryKthObjective(MLMObjective):
    """MLM whose selection is every k-th candidate token, always replaced by [MASK]."""

    name = "every_kth"

    def __init__(self, tokenizer, seed: int = 0, every: int = 4):
        super().__init__(tokenizer, seed)
        self.every = every

    def mask_example(self, example):
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        selected = self.candidate_mask(ids) & (torch.arange(len(ids)) % self.every == 0)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        return {"input_ids": torch.where(selected, torch.full_like(ids, self.mask_id), ids), "labels": labels}


@pytest.fixture
def every_kth():
    objectives.register_objective("every_kth", EveryKthObjective, EveryKthConfig)
    yield
    del objectives.OBJECTIVES["every_kth"]


TESTS = Path(__file__).parent
LOCAL = ["objective.name=every_kth", "objective.every_kth.every=3", "decouple.mode=local", "decouple.chunks=2"]
LOSS_KEYS = ("chunk0_mlm_loss", "chunk0_mlm_acc", "chunk1_mlm_loss", "chunk1_mlm_acc", "mlm_loss", "mlm_acc")


def test_registered_objective_trains_decoupled_simulated_and_distributed_alike(every_kth, tmp_path):
    """The objective's split comes from MLMObjective (its protocol): chunk heads, boundary tensors, export."""
    import decouple_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun worker
    try:
        decouple_worker.main(str(tmp_path / "sim"), LOCAL)
    finally:
        torch.set_num_threads(threads)
    torchrun(2, __file__, str(TESTS), str(tmp_path / "dist"), *LOCAL, timeout=240)
    sim, dist = train_records(tmp_path / "sim"), train_records(tmp_path / "dist")
    assert sorted(sim) == sorted(dist) == list(range(1, 7))
    for step in sim:
        for key in LOSS_KEYS:
            assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)
    for run in (tmp_path / "sim", tmp_path / "dist"):  # the stitched export, reloaded in a fresh process by fit
        saved = yaml.safe_load((run / "export" / "pretrain_config.yaml").read_text())
        assert saved["objective"]["name"] == "every_kth" and saved["objective"]["every_kth"] == {"every": 3}
        assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "aux_heads.safetensors").is_file()


def test_registered_objective_trains_from_its_config_section(every_kth, tmp_path):
    from pretrain.trainer import fit

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=120, seed=5)) + "\n")
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "corpus", tmp_path / "cache", max_steps=3)
    cfg = load_config(path, ["objective.name=every_kth", "objective.every_kth.every=3"])
    assert cfg.objective.every_kth.every == 3 and cfg.objective.options() == {"every": 3}
    fit(cfg)
    run = Path(cfg.output_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert list(saved["objective"]) == ["name", "mlm", "span", "electra", "every_kth"]
    assert saved["objective"]["every_kth"] == {"every": 3}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert (run / "export" / "model.safetensors").is_file()


def test_registered_objective_is_validated(every_kth):
    base = ["data.files=[x.txt]"]
    with pytest.raises(ConfigError, match="every_kth.every must be >= 2"):
        load_config(None, [*base, "objective.name=every_kth", "objective.every_kth.every=1"])
    with pytest.raises(ConfigError, match="did you mean 'objective.every_kth.every'"):
        load_config(None, [*base, "objective.every_kth.evry=3"])
    with pytest.raises(ConfigError, match="did you mean 'every_kth'"):
        load_config(None, [*base, "objective.name=every_kt"])
    load_config(None, [*base, "objective.name=every_kth", "decouple.mode=local", "decouple.chunks=2"])


def test_register_objective_refuses_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        objectives.register_objective("mlm", EveryKthObjective, EveryKthConfig)
    with pytest.raises(ValueError, match="must be an identifier"):
        objectives.register_objective("every-kth", EveryKthObjective, EveryKthConfig)


def test_objective_registry_names_classes_and_options():
    from objectives.electra import ElectraConfig
    from objectives.span import SpanObjective

    assert list(objectives.OBJECTIVES) == ["mlm", "span", "electra"]
    assert objectives.objective_class("span") is SpanObjective
    assert objectives.options_class("electra") is ElectraConfig
    with pytest.raises(ValueError, match="did you mean 'span'"):
        objectives.options_class("spam")


def test_decoupling_modes_registry():
    from pretrain.decouple.stage import Stage
    from pretrain.decouple.synthetic import SyntheticStage
    from pretrain.decouple.synthetic import SyntheticConfig

    assert list(modes.DECOUPLING) == ["local", "synthetic"]
    assert modes.options_class("local") is None and modes.options_class("synthetic") is SyntheticConfig
    assert modes.stage_class("local") is Stage and modes.stage_class("synthetic") is SyntheticStage
    with pytest.raises(ValueError, match="did you mean 'local'"):
        modes.stage_class("locl")
    with pytest.raises(ValueError, match="other than 'none'"):
        modes.register_mode("none", "pretrain.decouple.stage:Stage")
    with pytest.raises(ValueError, match="already registered"):
        modes.register_mode("local", "pretrain.decouple.stage:Stage")


def test_registered_mode_gets_its_section_and_validation():
    modes.register_mode("sync", "pretrain.decouple.stage:Stage", options="pretrain.decouple.synthetic:SyntheticConfig")
    try:
        cfg = load_config(None, ["data.files=[x.txt]", "decouple.mode=sync", "decouple.chunks=2",
                                 "decouple.sync.staleness=3"])
        assert cfg.decouple.sync.staleness == 3 and list(config_to_dict(cfg)["decouple"])[-2:] == ["synthetic", "sync"]
        with pytest.raises(ConfigError, match="decouple.sync.staleness is set but decouple.mode=local: set "
                                              "decouple.mode=sync or remove the decouple.sync options"):
            load_config(None, ["data.files=[x.txt]", "decouple.mode=local", "decouple.chunks=2",
                               "decouple.sync.staleness=3"])
    finally:
        del modes.DECOUPLING["sync"]


def test_modes_registry_loads_without_torch():
    code = "import sys, pretrain.decouple.modes; assert 'torch' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_written_before_the_split_matches_and_keeps_its_key_order():
    """A run started before the registries resumes: no differences, and config.yaml keeps its shape (besides the
    keys added since, ``ADDED_SINCE``)."""
    old = yaml.safe_load(HEAD_CONFIG.read_text())
    new = config_to_dict(load_config("configs/decoupled-sg.yaml", ["output_dir=runs/sg",
                                                                   "objective.span.mask_ratio=0.2"]))
    assert config_differences(old, new) == []  # a key added since counts as its default
    for dotted in ADDED_SINCE:  # the file's keys keep their order; the fields added later are left out
        *parents, key = dotted.split(".")
        del functools.reduce(dict.__getitem__, parents, new)[key]
    assert yaml.safe_dump(new, sort_keys=False) == HEAD_CONFIG.read_text()
    assert load_config(HEAD_CONFIG) == load_config("configs/decoupled-sg.yaml",
                                                   ["output_dir=runs/sg", "objective.span.mask_ratio=0.2"])


if __name__ == "__main__":
    import decouple_worker

    objectives.register_objective("every_kth", EveryKthObjective, EveryKthConfig)
    decouple_worker.main(sys.argv[2], sys.argv[3:])
