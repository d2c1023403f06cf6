"""``python -m model.train``: the same as ``unetseg train``."""

import sys

from model.train.cli import main

sys.exit(main())
