"""The bulk job's throughput: ``unetseg segment`` in-process against Ray Data with 1 and 2 workers.

    python -m bench.bulk [--model weights/polyp] [--images 100] [--workers 1 2] [--out bench-bulk.json]

The images are the first ``--images`` Kvasir-SEG frames, linked (never copied) into a temporary folder,
or as many generated JPEGs of the same size when the dataset is absent. Every run starts from an empty
output folder. Each row gives images/s over the whole run (model loading and, for Ray, the actors'
start-up included), when a worker finished the first image, and the steady rate between the workers'
first and last finished image; Ray's own start (``ray.init``) is timed apart. The masks of every run
are compared byte for byte with the in-process run's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import resolve_device
from app.segment import Report, find_bundle, run
from bench import DATASETS
from model.device import hardware

DATASET_IMAGES = DATASETS / "kvasir_seg" / "images"


def make_source(folder: Path, n: int) -> str:
    """``n`` images in ``folder``: links to dataset frames, else generated JPEGs; where they came from."""
    files = sorted(DATASET_IMAGES.glob("*.jpg"))[:n] if DATASET_IMAGES.is_dir() else []
    folder.mkdir(parents=True)
    if len(files) == n:
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
        return f"the first {n} Kvasir-SEG frames ({DATASET_IMAGES})"
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((622, 530), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        (folder / f"img{i:04}.jpg").write_bytes(buf.getvalue())
    return f"{n} generated 622x530 JPEGs (no dataset at {DATASET_IMAGES})"


def masks(dst: Path) -> dict[str, bytes]:
    return {p.relative_to(dst).as_posix(): p.read_bytes() for p in sorted(dst.rglob("*.png"))}


def row(mode: str, workers: int | None, report: Report, same: int | None, total: int) -> dict[str, Any]:
    return {
        "mode": mode,
        "workers": workers,
        "images": report.done,
        "errors": len(report.errors),
        "seconds": round(report.seconds, 2),
        "first_image_s": round(report.first_s, 2),
        "images_per_s": round(report.images_per_s, 2),
        "steady_images_per_s": round(report.steady_images_per_s, 2),
        "masks_equal_to_in_process": None if same is None else f"{same}/{total}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/polyp", help="bundle folder or model name in UNETSEG_WEIGHTS_DIR")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor counts to run")
    p.add_argument("--no-ray", action="store_true", help="in-process only")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()
    settings = Settings()
    bundle = find_bundle(args.model, settings.weights_dir)
    device = resolve_device(settings.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="unetseg-bulk-") as tmp:
        src = Path(tmp) / "src"
        origin = make_source(src, args.images)
        print(f"{origin}; model {bundle}; {hardware(device)}; {os.cpu_count()} cores")
        local = Path(tmp) / "in-process"
        report = run(str(src), local, bundle, settings)
        reference = masks(local)
        rows.append(row("in-process", None, report, None, len(reference)))
        ray_init_s = None
        if not args.no_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
            ray_init_s = round(time.perf_counter() - t0, 2)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # Ray Data's own
                    for n in args.workers:
                        dst = Path(tmp) / f"ray-{n}"
                        report = run(str(src), dst, bundle, settings, use_ray=True, workers=n)
                        got = masks(dst)
                        same = sum(got.get(k) == v for k, v in reference.items())
                        rows.append(row("ray", n, report, same, len(reference)))
            finally:
                ray.shutdown()
    base = rows[0]["images_per_s"] or 1.0
    print(f"\nray.init: {ray_init_s} s" if ray_init_s is not None else "")
    print(f"{'mode':<12}{'workers':>8}{'images':>8}{'s':>8}{'first s':>9}{'img/s':>8}{'steady':>8}{'ratio':>7}  masks")
    for r in rows:
        ratio = r["images_per_s"] / base
        print(
            f"{r['mode']:<12}{r['workers'] or '':>8}{r['images']:>8}{r['seconds']:>8}{r['first_image_s']:>9}"
            f"{r['images_per_s']:>8}{r['steady_images_per_s']:>8}{ratio:>7.2f}  {r['masks_equal_to_in_process'] or '-'}"
        )
    if args.out:
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "images": origin,
            "model": str(bundle),
            "hardware": hardware(device),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "ray_init_s": ray_init_s,
            "runs": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
