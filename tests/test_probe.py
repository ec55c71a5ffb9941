"""train.probe: linear probes of every layer (backprop) and of each chunk's output (decoupled) at evaluation — the
same texts, the same features whichever route computes them, so the two compare layer by layer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import torchrun
from helpers import make_tokenizer, probes_both_routes, toy_corpus, write_tiny_config
from test_evaluation import synthetic_labelled

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests" / "dist"))
SCRIPT = str(ROOT / "scripts" / "pretrain.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "labelled.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in synthetic_labelled(400)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(toy_corpus(n_docs=150, seed=5)) + "\n")
    return d


def probe_cfg(labelled, **decouple):
    from decouple_worker import base_config
    from pretrain.config import config_from_dict

    tree = base_config("unused")
    tree["train"]["probe"] = {"data": str(labelled), "n_train": 200, "n_test": 100}
    tree["decouple"].update(decouple)
    return config_from_dict(tree)


def test_chunk_outputs_and_the_stitched_models_layers_give_the_same_probe(labelled):
    """The pipeline's route (chunk by chunk, heads off) and the backprop route (stem, then layers) read the same
    features of the same weights: the same accuracies, every layer number a chunk ends at. A keyword marks each
    class, so even a random encoder's mean-pooled features beat the majority class."""
    chunked, stitched, model, probe = probes_both_routes(probe_cfg(labelled, chunks=2), make_tokenizer())
    assert len(probe.order) == 300 and sorted(probe.order.tolist()) == list(range(300))
    assert set(chunked) == {"probe_acc_layer2", "probe_acc_layer4"}
    assert set(stitched) == {f"probe_acc_layer{n}" for n in (1, 2, 3, 4)}
    assert all(chunked[k] == stitched[k] for k in chunked)
    assert all(acc > 0.5 for acc in stitched.values())  # 3 balanced classes: the majority scores about 1/3
    import torch

    from pretrain.probe import probe_layers

    # data-parallel replicas split the fits: 3 processes fit layers {1, 4}, {2} and {3}, which together are all
    with torch.no_grad():
        shares = [probe_layers(probe, model.objective, model.model, "all", share=(i, 3)) for i in range(3)]
    assert [sorted(s) for s in shares] == [["probe_acc_layer1", "probe_acc_layer4"], ["probe_acc_layer2"],
                                           ["probe_acc_layer3"]]
    assert {k: v for s in shares for k, v in s.items()} == stitched
    assert probe_layers(probe, model.objective, model.model, [2], share=(1, 2)) == {}


def test_probe_config_is_checked():
    from pretrain.config import ConfigError, config_from_dict

    for probe, message in [({"layers": "some"}, "train.probe.layers must be 'all'"),
                           ({"n_test": 0}, "train.probe.n_test must be >= 1"),
                           ({"layres": [1]}, "layers")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": {"files": ["x.txt"]}, "train": {"probe": probe}})


def test_runs_log_probes_and_distributed_equals_simulated(corpus, labelled, tmp_path):
    """Backprop logs every layer (2 data-parallel processes too); local K=2 logs each chunk's output, simulated and
    with 2 gloo processes alike."""
    cfg = write_tiny_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", max_steps=2)
    probe = [f"train.probe.data={labelled}", "train.probe.n_train=200", "train.probe.n_test=100",
             "model.hidden_dropout=0", "model.attention_dropout=0"]
    local = ["decouple.mode=local", "decouple.chunks=2"]

    def final_eval(run, *overrides, processes=1):
        args = [str(cfg), f"output_dir={tmp_path / run}", *probe, *overrides]
        if processes == 1:
            proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
        else:
            torchrun(processes, SCRIPT, *args)
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"split": "eval"' in x][-1]

    backprop = final_eval("bp")
    assert {"probe_acc_layer1", "probe_acc_layer2"} <= set(backprop)
    data_parallel = final_eval("bp-ddp", processes=2)  # each replica fits one layer's probe; the scores gathered
    assert [k for k in data_parallel if k.startswith("probe_")] == ["probe_acc_layer1", "probe_acc_layer2"]
    assert all(0 < data_parallel[k] <= 1 for k in ("probe_acc_layer1", "probe_acc_layer2"))
    simulated = final_eval("sim", *local)
    distributed = final_eval("dist", *local, processes=2)
    probes = {k: v for k, v in simulated.items() if k.startswith("probe_")}
    assert set(probes) == {"probe_acc_layer1", "probe_acc_layer2"} and all(0 < v <= 1 for v in probes.values())
    assert {k: distributed[k] for k in probes} == pytest.approx(probes, abs=1e-9)
