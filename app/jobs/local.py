"""``unetseg segment SLIDE DST``: a slide job in this process, without the service.

The same pipeline as a slide job of the service (``app.jobs.pipeline``), on an engine of its own. Its
working folder is ``DST/.<name>.work`` (the regions done so far), so an interrupted run resumes where it
stopped when run again; the results are moved beside it when complete:

    DST/<name>.mask.tiff        tiled pyramidal TIFF of class ids (palette colors)
    DST/<name>.instances.tiff   tiled pyramidal TIFF of 32-bit instance ids (models with instances)
    DST/<name>.json             per-class areas, the instance count, size, level and timings
    DST/<name>.csv              the instance table (id, class_id, area, centroid, bbox)
    DST/<name>.geojson          the instances' outlines
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any

from app.config import Settings
from app.jobs import engine as adapter
from app.jobs.pipeline import OUT, SLIDE_RESULTS, SlideParams, run_slide
from model.card import read_card

SLIDE_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf8", ".svs", ".ome.tif", ".ome.tiff"})
# where each result goes: DST/<name><suffix>
TARGETS = {"tiff": ".mask.tiff", "instances": ".instances.tiff", "json": ".json", "csv": ".csv", "geojson": ".geojson"}


def is_slide_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES


def segment_slide(
    src: Path,
    dst: Path,
    bundle: Path,
    settings: Settings,
    level: int | None = None,
    progress: IO[str] | None = None,
) -> dict[str, Any]:
    """Segment the slide ``src`` into ``dst``; returns the job's info (with ``outputs``, the files written)."""
    card = read_card(bundle)
    name = src.name.split(".")[0] or src.stem
    work = dst / f".{name}.work"
    work.mkdir(parents=True, exist_ok=True)
    engine = adapter.open_engine(bundle, settings)
    pool = concurrent.futures.ThreadPoolExecutor(2, "unetseg-slide")
    t0 = time.perf_counter()
    tty = progress is not None and progress.isatty()
    shown = 0.0

    async def report(p: dict[str, Any]) -> None:
        nonlocal shown
        now = time.perf_counter()
        if progress is None or (now - shown < (0.2 if tty else 10.0) and p["stage"] == "segmenting"):
            return
        shown = now
        done, total = p["tiles_done"], max(p["tiles_total"], 1)
        bar = "#" * round(20 * done / total)
        progress.write(
            f"[{bar:.<20}] {p['regions_done']}/{p['regions_total']} regions, {done}/{total} tiles, "
            f"{now - t0:.0f} s{' (writing)' if p['stage'] == 'writing' else ''}{chr(13) if tty else chr(10)}"
        )
        progress.flush()

    async def noop(rel: str) -> None:
        return None

    spec = card.slide
    params = SlideParams(
        level=level,
        mpp=spec.mpp if spec else None,
        fallback_level=spec.level if spec else None,
        region_px=settings.job_region_px,
        halo_px=settings.job_halo_px,
    )
    instances = card.instances is not None
    try:
        info = asyncio.run(
            run_slide(
                src,
                work,
                card,
                params,
                lambda region: adapter.segment_region(engine, card.name, region, pool, instances),
                lambda h, w: adapter.tiles_for(card, h, w),
                pool,
                report,
                noop,
            )
        )
    finally:
        if progress is not None and tty:
            progress.write("\n")
        pool.shutdown()
        engine.stop()
    outputs = []
    for fmt, (file, _) in SLIDE_RESULTS.items():
        made = work / OUT / file
        if made.exists():
            target = dst / f"{name}{TARGETS[fmt]}"
            os.replace(made, target)
            outputs.append(str(target))
    shutil.rmtree(work)
    return {**info, "outputs": outputs}


def main(src: Path, dst: Path, bundle: Path, settings: Settings, level: int | None) -> int:
    from app.errors import ServiceError

    try:
        info = segment_slide(src, dst, bundle, settings, level, sys.stderr)
    except ServiceError as exc:
        print(f"unetseg segment: {src}: {exc.detail}", file=sys.stderr)
        return 1
    count = f", {info['count']} instances" if "count" in info else ""
    print(f"{src}: {info['width']}x{info['height']} (level {info['level']}){count}; {', '.join(info['outputs'])}")
    print(json.dumps({k: info[k] for k in ("classes", "timings_s", "regions", "resumed_regions")}), file=sys.stderr)
    return 0
