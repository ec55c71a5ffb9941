"""The data stream: disjoint and complete per-process shares, O(1) resume, worker-count independence; schedules."""

import pytest
import torch

from helpers import make_tokenizer, packed_examples
from objectives import get_objective
from pretrain.config import TrainConfig
from pretrain.data.stream import StreamBatchSampler, StreamDataset, make_loader, validation_share
from pretrain.schedules import lr_at


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_are_disjoint_and_complete(world):
    b, steps = 4, 5
    shares = [take(StreamBatchSampler(b, world, r), steps) for r in range(world)]
    for t in range(steps):
        union = sorted(p for r in range(world) for p in shares[r][t])
        assert union == list(range(t * world * b, (t + 1) * world * b)), "micro-batch t covers its slice exactly"
    flat = [p for share in shares for batch in share for p in batch]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("n_blocks", [1, 7, 40, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_validation_set_does_not_depend_on_the_number_of_processes(world, n_blocks):
    shares = [validation_share(n_blocks, 4, 5, world, r) for r in range(world)]
    assert [p for share in shares for p in share] == list(range(min(20, n_blocks)))  # disjoint, in order, complete
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_resume_starts_where_the_uninterrupted_stream_is():
    full = take(StreamBatchSampler(3, 2, 1), 10)
    assert take(StreamBatchSampler(3, 2, 1, start=6), 4) == full[6:]


def test_epochs_are_permutations_and_differ():
    blocks = [{"input_ids": torch.tensor([i])} for i in range(10)]
    ds = StreamDataset(blocks, seed=5)
    epoch0 = [int(ds[p]["input_ids"]) for p in range(10)]
    epoch1 = [int(ds[p]["input_ids"]) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert [ds[p]["index"] for p in range(3)] == [0, 1, 2]
    assert epoch0 == [int(StreamDataset(blocks, seed=5)[p]["input_ids"]) for p in range(10)], "seeded"


def test_batches_do_not_depend_on_worker_count():
    tok = make_tokenizer()
    blocks = packed_examples(tok, 40, length=32)
    obj = get_objective("mlm", tok, seed=2)
    ds = StreamDataset([{k: torch.tensor(v) for k, v in b.items()} for b in blocks], seed=1)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(ds, obj.collate, 4, 1, 0, start=0, stop=6, num_workers=workers)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedules(schedule):
    kw = dict(lr=1.0, max_steps=110, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])), "warmup rises"
    if schedule == "constant":
        assert set(lrs[10:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "decay is monotone"
        assert lr_at(110, **kw) == pytest.approx(0.1), "ends at min_lr_ratio * lr"
        mid = lr_at(60, **kw)
        assert mid == pytest.approx(0.55), "both reach the midpoint value halfway (linear: exactly; cosine: 0.5)"


def test_wsd_schedule_holds_lr_then_decays_over_the_last_fraction():
    kw = dict(lr=1.0, max_steps=110, warmup_steps=10, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert lrs[:10] == [lr_at(s, **{**kw, "schedule": "linear"}) for s in range(10)], "the same warmup"
    decay_start = 110 - 22
    assert set(lrs[9:decay_start + 1]) == {1.0}, "stable at lr up to the decay's first step"
    assert all(a > b for a, b in zip(lrs[decay_start:], lrs[decay_start + 1:])), "then strictly decaying"
    assert lrs[99] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1), "linearly, to min_lr_ratio * lr"
    assert lr_at(5, **{**kw, "decay_fraction": 1.0}) == lrs[5] and lr_at(60, **{**kw, "decay_fraction": 1.0}) == \
        pytest.approx(0.55), "a decay over all of max_steps starts after the warmup: the linear schedule"
    with pytest.raises(ValueError, match="wsd_decay_fraction"):
        TrainConfig(schedule="wsd", wsd_decay_fraction=0.0)
