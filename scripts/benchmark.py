"""Benchmarks: python scripts/benchmark.py {decouple,step,e2e} ... (see pretrain/bench/cli.py)."""

import sys

from pretrain.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
