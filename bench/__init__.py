"""Benchmarks: measured numbers for docs/ (benchmarks.md, scaling.md), never asserted in tests."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The datasets (kvasir_seg/, ...) give the benchmarks real images: UNETSEG_DATASETS, else beside the checkout.
DATASETS = Path(os.environ.get("UNETSEG_DATASETS") or ROOT.parent / "shared" / "datasets")
