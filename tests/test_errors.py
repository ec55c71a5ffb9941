"""Bad input at the command line: one line naming the file and the fix, exit code 2, no traceback, nothing touched."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import toy_corpus, write_tiny_config
from pretrain.cli import pretrain_main

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def error_line(capsys) -> str:
    """The one ``error:`` line of stderr (the run's INFO log lines go there too)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def fresh_log_handler(monkeypatch):
    """pretrain_main adds its log handler once, on the stderr of that moment: give each test its own."""
    monkeypatch.setattr(logging.getLogger("pretrain"), "handlers", [])


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(toy_corpus(n_docs=120, seed=1)) + "\n")
    return d


def config(tmp_path, corpus, **top) -> Path:
    path = write_tiny_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", max_steps=2)
    tree = yaml.safe_load(path.read_text())
    tree.update(top)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_empty_txt_file_is_named(tmp_path, corpus, capsys):
    (corpus / "a.txt").write_text("")
    assert pretrain_main([str(config(tmp_path, corpus))]) == 2
    line = error_line(capsys)
    assert str(corpus / "a.txt") in line and "empty file" in line and "add text" in line


def test_non_utf8_file_is_named_with_its_byte_offset(tmp_path, corpus, capsys):
    (corpus / "b.txt").write_bytes(b"good line\ncaf\xe9 au lait\n")
    assert pretrain_main([str(config(tmp_path, corpus))]) == 2
    line = error_line(capsys)
    assert str(corpus / "b.txt") in line and "byte 0xe9 at offset 13" in line and "iconv" in line


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  files: [a.txt\ntrain: {lr: 1}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), str(path)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {path}:3:6: invalid YAML: while parsing a flow sequence, "
                                                "expected ',' or ']', but got ':'; fix the file there"]


def test_malformed_override_value(tmp_path, corpus, capsys):
    assert pretrain_main([str(config(tmp_path, corpus)), "data.files=[a.txt"]) == 2
    assert "override 'data.files=[a.txt': the value is not valid YAML" in error_line(capsys)


def test_output_dir_that_is_a_file(tmp_path, corpus, capsys):
    (tmp_path / "taken").write_text("mine\n")
    assert pretrain_main([str(config(tmp_path, corpus, output_dir=str(tmp_path / "taken")))]) == 2
    assert "is a file, not a directory: set output_dir to a new path" in error_line(capsys)
    assert (tmp_path / "taken").read_text() == "mine\n"


def test_read_only_output_dir(tmp_path, corpus, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr("pretrain.rundir.os.access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    assert pretrain_main([str(config(tmp_path, corpus))]) == 2
    assert f"output_dir {tmp_path / 'run'} is not writable: fix its permissions" in error_line(capsys)


def test_full_disk_says_so_and_how_much_is_free(tmp_path, corpus, capsys, monkeypatch):
    def full(cfg, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("pretrain.rundir.save_config", full)
    assert pretrain_main([str(config(tmp_path, corpus))]) == 2
    line = error_line(capsys)
    assert f"no space left on the device holding {tmp_path / 'run' / 'config.yaml'} (" in line
    assert " free): free some space" in line


def test_finetune_files_with_different_columns(tmp_path, capsys):
    from pretrain.finetune import load_labelled, main

    (tmp_path / "train.csv").write_text("text,label,source\nhello,a,web\nworld,b,web\n")
    (tmp_path / "eval.csv").write_text("text,label\nhi,a\n")
    data = load_labelled(train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "eval.csv"))
    assert len(data.train) == 2 and len(data.eval) == 1  # columns beyond text and label may differ
    (tmp_path / "eval.csv").write_text("sentence,label\nhi,a\n")
    assert main(["--model", str(tmp_path), "--train", str(tmp_path / "train.csv"),
                 "--eval", str(tmp_path / "eval.csv")]) == 2
    line = error_line(capsys)
    assert f"--eval {tmp_path / 'eval.csv'} has no column(s) ['text']" in line and "--text-column" in line


def test_validation_fraction_zero_fails_up_front(tmp_path, corpus, capsys):
    path = config(tmp_path, corpus)
    assert pretrain_main([str(path), "data.validation_fraction=0"]) == 2
    assert "data.validation_fraction is 0, but training evaluates" in error_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists(), "nothing prepared or written"


def test_one_document_corpus_trains(tmp_path, corpus, capsys):
    """The advice of the corpus-too-small error used to be lowering validation_fraction, down to a crash at 0."""
    (corpus / "a.txt").write_text(" ".join(toy_corpus(n_docs=120, seed=1)) + "\n")
    assert pretrain_main([str(config(tmp_path, corpus))]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "COMPLETE").exists()


# ----------------------------------------------------------------------------------------------- friction


def test_overwrite_may_come_among_the_overrides(tmp_path, capsys):
    argv = [str(tmp_path / "missing.yaml"), "train.lr=1e-4", "--overwrite", "train.max_steps=2"]
    assert pretrain_main(argv) == 2  # argparse used to exit with "unrecognized arguments: train.max_steps=2"
    assert "config file not found" in error_line(capsys)


def test_export_of_a_missing_checkpoint_names_the_complete_ones(tmp_path, capsys):
    from pretrain.cli import export_main
    from pretrain.config import load_config, save_config

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "step-6").mkdir()
    save_config(load_config("configs/tiny.yaml"), run / "config.yaml")
    assert export_main([str(run), "--checkpoint", str(run / "checkpoints" / "step-5")]) == 2
    assert error_line(capsys).endswith("step-5 does not exist; complete checkpoints of this run: step-2, step-4")
    assert export_main([str(run), "--checkpoint", str(run / "checkpoints" / "step-6")]) == 2
    assert "step-6 is incomplete (no COMPLETE marker); complete checkpoints of this run: step-2" in error_line(capsys)


def test_full_disk_without_a_file_name_names_the_folder(tmp_path, corpus, capsys, monkeypatch):
    from pretrain.cli import prepare_data_main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pretrain.data.prepare_blocks", full)
    assert prepare_data_main([str(config(tmp_path, corpus))]) == 2
    assert f"no space left on the device holding {tmp_path / 'cache'} (" in error_line(capsys)


def test_full_disk_while_datasets_reads_the_corpus(tmp_path, corpus, capsys, monkeypatch):
    import datasets

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "hf-datasets" / "x"))
        except OSError as e:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr("pretrain.data.corpus.datasets.load_dataset", full)
    assert pretrain_main([str(config(tmp_path, corpus))]) == 2
    assert f"no space left on the device holding {tmp_path / 'cache' / 'hf-datasets' / 'x'} (" in error_line(capsys)


def test_unwritable_path_message():
    from pretrain.cli import os_error_message

    for code in (errno.EACCES, errno.EROFS):
        message = os_error_message(OSError(code, os.strerror(code), "/data/run/config.yaml"))
        assert message == (f"cannot write /data/run/config.yaml ({os.strerror(code)}): fix the folder's permissions, "
                           "or set output_dir / data.cache_dir to a writable folder")
