"""Config loading: every YAML in configs/ parses; overrides; one test per validation rule."""

from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, config_differences, config_to_dict, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.data.block_size <= cfg.model.max_position_embeddings


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-4", "train.max_steps=7", "data.files=[a.txt, b.txt]",
                                            "objective.mlm.whole_word=true", "output_dir=runs/x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.objective.mlm.whole_word is True and cfg.output_dir == "runs/x"


def test_yaml_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {files: [x.txt]}\ntrain: {lr: 1e-4}\n")
    assert load_config(path).train.lr == pytest.approx(1e-4)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*did you mean 'train.lr'|did you mean"):
        load_config("configs/tiny.yaml", ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config("configs/tiny.yaml", ["train.max_step=1"])
    with pytest.raises(ConfigError, match="did you mean 'objective.mlm.mask_ratio'"):
        load_config("configs/tiny.yaml", ["objective.mlm.mask_ration=0.2"])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["train.max_step=1", "model.hiden_size=3", "train.lr=fast"])
    message = str(e.value)
    assert "train.max_step" in message and "model.hiden_size" in message and "train.lr" in message


@pytest.mark.parametrize("override, match", [
    ("train.max_steps=ten", "expected an integer"),
    ("train.lr=true", "expected a number"),
    ("objective.name=electraa", "did you mean 'electra'"),
    ("train.precision=fp8", "not one of"),
    ("data.files=x.txt", "expected a list"),
    ("train.micro_batch_size=0", "micro_batch_size must be >= 1"),
    ("train.lr=-1", "lr must be > 0"),
    ("train.warmup_steps=-5", "warmup_steps must be >= 0"),
    ("model.num_heads=3", "divisible"),
    ("model.num_layers=0", "num_layers must be >= 1"),
    ("data.block_size=4096", "exceeds model.max_position_embeddings"),
    ("data.validation_fraction=1.5", "validation_fraction"),
    ("data.demo=[bibel]", "unknown parts"),
    ("data.num_proc=0", r"data.num_proc must be >= 1 \(processes that tokenize"),
    ("tokenizer.vocab_size=10", "vocab_size must be >= 128"),
    ("objective.mlm.mask_ratio=1.5", "mask_ratio must be in"),
    ("objective.mlm.random_token_prob=0.5", "sum to at most 1"),
])
def test_validation_rules(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/tiny.yaml", [override])


def test_num_proc_defaults_to_the_usable_cores():
    import os

    from pretrain.config import DataConfig

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert DataConfig().num_proc is None and DataConfig().processes() == expected >= 1
    assert DataConfig(num_proc=3).processes() == 3


def test_no_corpus_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_size: 32, num_heads: 2}\n")
    with pytest.raises(ConfigError, match="no corpus"):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("configs/tiny.yaml", ["train.lr"])


def test_save_roundtrip_and_differences(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.lr=2e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    changed = load_config("configs/tiny.yaml", ["train.lr=3e-4", "train.max_steps=5000", "model.fast=true"])
    diffs = config_differences(yaml.safe_load((tmp_path / "config.yaml").read_text()), config_to_dict(changed))
    assert diffs == ["train.lr: 0.0002 -> 0.0003"], "max_steps and the fast path may change on resume; lr may not"


def test_a_key_missing_from_an_older_saved_config_counts_as_its_default():
    """A run saved before ``decouple.overlap`` existed resumes with the default, and only with it."""
    old = config_to_dict(load_config("configs/decoupled-local.yaml"))
    del old["decouple"]["overlap"]
    assert config_differences(old, config_to_dict(load_config("configs/decoupled-local.yaml"))) == []
    changed = config_to_dict(load_config("configs/decoupled-local.yaml", ["decouple.overlap=1"]))
    assert config_differences(old, changed) == ["decouple.overlap: 0 -> 1"]


def test_saved_config_is_never_seen_half_written(tmp_path):
    """The other processes of a launch read config.yaml while the main process writes it (prepare_run_dir): a
    reader racing a writer sees the whole file every time (write_text would expose it empty or truncated)."""
    import threading

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.demo=[bible]"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    expected = config_to_dict(cfg)
    done = threading.Event()

    def write():
        for _ in range(300):
            save_config(cfg, path)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set() or reads < 300:
        assert yaml.safe_load(path.read_text()) == expected
        reads += 1
    writer.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary file left behind


def test_did_you_mean_prefers_the_key_a_typo_extends_or_abbreviates():
    with pytest.raises(ConfigError, match="unknown key 'train.lr_rate'; did you mean 'train.lr'"):
        load_config("configs/tiny.yaml", ["train.lr_rate=1e-4"])
    with pytest.raises(ConfigError, match="did you mean 'train.warmup_steps'"):
        load_config("configs/tiny.yaml", ["train.warmup=10"])


def test_warmup_not_shorter_than_the_run_warns(caplog):
    from pretrain.rundir import check_training_config

    for overrides, warns in ((["train.warmup_steps=100", "train.max_steps=100"], True),
                             (["train.warmup_steps=10", "train.max_steps=100"], False),
                             (["train.warmup_steps=100", "train.max_steps=50", "train.schedule=onecycle"], False)):
        caplog.clear()
        check_training_config(load_config("configs/tiny.yaml", overrides))
        assert ("train.warmup_steps (100) >= train.max_steps" in caplog.text) is warns, overrides
