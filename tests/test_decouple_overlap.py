"""Overlapping local updates (``decouple.overlap: M``, Laskin et al. 2020): config checks."""

import pytest

from helpers import assert_config_rejected


@pytest.mark.parametrize("tree, message", [
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": -1}}, "decouple.overlap must be >= 0"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "overlap": 1}},
     "overlap has no meaning with decouple.mode=synthetic"),
    ({"decouple": {"mode": "none", "overlap": 1}}, "overlap=1 needs decouple.mode=local and decouple.chunks >= 2"),
    ({"decouple": {"mode": "local", "chunks": 1, "overlap": 1}}, "needs decouple.mode=local and decouple.chunks >= 2"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1, "freeze_lower": True}},
     "freeze_lower freezes them: set one of them off"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 2}},
     r"overlap=2 must be smaller than the smallest chunk's layer count \(chunks of \[2, 2\] layers\)"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1, "boundaries": [1]}}, r"chunks of \[1, 3\] layers"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1}, "train": {"precision": "fp16"}},
     "use train.precision bf16 or fp32"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlaps": 1}}, "did you mean 'decouple.overlap'"),
])
def test_bad_overlap_configs_fail_naming_the_fix(tree, message):
    assert_config_rejected(tree, message)
