"""``python -m pretrain.bench SUITE ...`` (also how the ``decouple`` suite starts its workers)."""

import sys

from .cli import main

sys.exit(main())
