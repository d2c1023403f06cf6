"""A job's work, independent of HTTP and of where its files are kept: an image through the predict pipeline, or
a slide region by region into pyramidal TIFFs, per-class areas, an instance table and instance outlines.

A slide job has two passes over a working folder:

1. **Regions** (``regions/<index>.npz``, one per region, written whole or not at all): each region's extent
   is read from the TIFF at the chosen level, segmented, and its core's class ids and instance ids saved in
   256-row strips, with the extent's instance ids, per-instance sums and the instances it shares with its
   earlier neighbours (``app.jobs.stitch``). A region whose file exists is done: a resumed job skips it.
2. **Outputs** (``out/``): the merge of instances across regions, then the class-id and instance-id
   pyramids written tile by tile from the strips, per-class areas (JSON), the instance table (CSV) and the
   instance outlines (GeoJSON), each streamed to its file and renamed into place when complete.

Memory is bounded by one region (its extent, the engine's work for it, a few neighbours' instance ids) in
pass 1, and by one band of 256 rows across the slide plus the instance table in pass 2.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import json
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours

from app.jobs.slide import TILE, Level, Slide, palette, to_model_input, write_pyramid
from app.jobs.stitch import Region, core_of, instance_stats, match, merge, region_grid, table_rows
from app.jobs.store import write_done
from app.pipeline import Answer
from model.card import Card

REGIONS = "regions"
OUT = "out"
INPUT = "input"

# A slide job's results: format -> (file under out/, media type)
SLIDE_RESULTS = {
    "tiff": ("mask.tiff", "image/tiff"),
    "instances": ("instances.tiff", "image/tiff"),
    "json": ("areas.json", "application/json"),
    "csv": ("instances.csv", "text/csv"),
    "geojson": ("instances.geojson", "application/geo+json"),
}
CSV_HEADER = ["id", "class_id", "area", "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]

SegmentFn = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray | None]]]
ProgressFn = Callable[[dict[str, Any]], Awaitable[None]]
SaveFn = Callable[[str], Awaitable[None]]
TilesFn = Callable[[int, int], int]


@dataclass(frozen=True)
class SlideParams:
    level: int | None = None  # pyramid level to segment; None: the card's choice (mpp), else full resolution
    mpp: float | None = None  # microns per pixel the model wants, when its card says
    fallback_level: int | None = None  # the card's level, when the slide does not record its resolution
    region_px: int = 2048
    halo_px: int = 128


@dataclass(frozen=True)
class SlidePlan:
    level: Level
    downsample: float  # level 0 pixels per pixel of this level
    regions: list[Region]
    cols: int
    tiles: list[int]  # model inputs per region
    region_px: int
    halo_px: int

    @property
    def tiles_total(self) -> int:
        return sum(self.tiles)


def plan_slide(slide: Slide, params: SlideParams, tiles_for: TilesFn) -> SlidePlan:
    level = slide.pick_level(params.level, params.mpp, params.fallback_level)
    regions, cols = region_grid(level.height, level.width, params.region_px, params.halo_px)
    tiles = [tiles_for(r.eh, r.ew) for r in regions]
    downsample = slide.levels[0].width / level.width
    return SlidePlan(level, downsample, regions, cols, tiles, params.region_px, params.halo_px)


def region_file(work: Path, index: int) -> Path:
    return work / REGIONS / f"{index:06d}.npz"


@contextmanager
def atomic(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file written under a temporary name beside ``path`` and renamed to it (synced) once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp, mode) as f:
            yield f
        write_done(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial(work: Path) -> None:
    """Temporary files a killed run left in the working folder."""
    for p in work.rglob(".*.part"):
        p.unlink(missing_ok=True)
    for d in work.glob(".pyramid-*"):
        shutil.rmtree(d, ignore_errors=True)


def save_region(
    work: Path, plan: SlidePlan, region: Region, mask: np.ndarray, ids: np.ndarray | None, classes: int
) -> None:
    """Pass 1's record of a region: ``mask`` (and ``ids``) are over the region's extent."""
    core_mask = core_of(region, mask)
    arrays: dict[str, np.ndarray] = {"counts": np.bincount(core_mask.ravel(), minlength=classes)[:classes]}
    strips = range(0, region.h, TILE)
    for s, y in enumerate(strips):
        arrays[f"mask{s}"] = core_mask[y : y + TILE]
    if ids is not None:
        ids = ids.astype(np.int32, copy=False)
        n = int(ids.max(initial=0))
        core_ids = core_of(region, ids)
        arrays["eids"] = ids
        arrays["stats"] = instance_stats(region, core_ids, n)
        for s, y in enumerate(strips):
            arrays[f"ids{s}"] = core_ids[y : y + TILE]
        found = [np.zeros((0, 3), dtype=np.int64)]
        for nb in region.neighbours_before(plan.cols):
            with np.load(region_file(work, nb)) as other:
                pairs = match(plan.regions[nb], other["eids"], region, ids, plan.halo_px)
            found.append(np.column_stack([np.full(len(pairs), nb, dtype=np.int64), pairs]))
        arrays["pairs"] = np.concatenate(found)
    with atomic(region_file(work, region.index)) as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def read_region(slide: Slide, plan: SlidePlan, region: Region, channels: int) -> np.ndarray:
    """(eh, ew, channels) uint8: the region's extent, as the model takes it."""
    lv = plan.level.index
    raw = slide.read(lv, region.ey, region.ex, region.eh, region.ew)
    return to_model_input(raw, channels, slide.scale(lv))


async def run_slide(
    source: Path,
    work: Path,
    card: Card,
    params: SlideParams,
    segment: SegmentFn,
    tiles_for: TilesFn,
    executor: concurrent.futures.Executor | None,
    progress: ProgressFn,
    save: SaveFn,
) -> dict[str, Any]:
    """Segment the slide at ``source`` into ``work/out`` (resuming from the regions in ``work``); returns the
    job's info (size, level, count, areas, regions resumed, timings) and calls ``progress`` after each region."""
    loop = asyncio.get_running_loop()
    remove_partial(work)
    instances = card.instances is not None
    t0 = time.perf_counter()
    model_s = 0.0
    with Slide(source) as slide:
        plan = plan_slide(slide, params, tiles_for)
        done = resumed = tiles_done = 0
        await progress(
            {
                "stage": "segmenting",
                "tiles_done": 0,
                "tiles_total": plan.tiles_total,
                "regions_done": 0,
                "regions_total": len(plan.regions),
            }
        )
        for region, tiles in zip(plan.regions, plan.tiles, strict=True):
            if region_file(work, region.index).exists():
                resumed += 1
            else:
                x = await loop.run_in_executor(executor, read_region, slide, plan, region, card.input.channels)
                t1 = time.perf_counter()
                mask, ids = await segment(x)
                model_s += time.perf_counter() - t1
                del x
                await loop.run_in_executor(
                    executor, save_region, work, plan, region, mask, ids if instances else None, len(card.classes)
                )
                del mask, ids
                await save(f"{REGIONS}/{region.index:06d}.npz")
            done += 1
            tiles_done += tiles
            await progress(
                {
                    "stage": "segmenting",
                    "tiles_done": tiles_done,
                    "tiles_total": plan.tiles_total,
                    "regions_done": done,
                    "regions_total": len(plan.regions),
                }
            )
    await progress(
        {
            "stage": "writing",
            "tiles_done": tiles_done,
            "tiles_total": plan.tiles_total,
            "regions_done": done,
            "regions_total": len(plan.regions),
        }
    )
    t2 = time.perf_counter()
    info = await loop.run_in_executor(executor, write_outputs, work, plan, card)
    for name, _ in SLIDE_RESULTS.values():
        if (work / OUT / name).exists():
            await save(f"{OUT}/{name}")
    info.update(
        {
            "regions": len(plan.regions),
            "resumed_regions": resumed,
            "tiles": plan.tiles_total,
            "timings_s": {
                "segment": round(t2 - t0, 3),
                "model": round(model_s, 3),
                "write": round(time.perf_counter() - t2, 3),
            },
        }
    )
    return info


def _band(work: Path, plan: SlidePlan, key: str, luts: list[np.ndarray] | None) -> Callable[[int], np.ndarray]:
    """Rows y .. y + 256 of the slide, full width, from the regions' strips (instance ids mapped to final ids)."""

    def band(y: int) -> np.ndarray:
        row, strip = divmod(y, plan.region_px)
        parts = []
        for c in range(plan.cols):
            index = (row * plan.cols) + c
            with np.load(region_file(work, index)) as npz:
                part = npz[f"{key}{strip // TILE}"]
            parts.append(luts[index][part] if luts is not None else part)
        return np.concatenate(parts, axis=1)

    return band


def write_outputs(work: Path, plan: SlidePlan, card: Card) -> dict[str, Any]:
    """Pass 2: merge instances, write every output to ``work/out``; returns the job's info."""
    out = work / OUT
    out.mkdir(exist_ok=True)
    k = len(card.classes)
    h, w = plan.level.height, plan.level.width
    counts = np.zeros(k, dtype=np.int64)
    stats, pairs = [], []
    spec = card.instances
    for region in plan.regions:
        with np.load(region_file(work, region.index)) as npz:
            counts += npz["counts"]
            if spec is not None:
                stats.append(npz["stats"])
                pairs.append(npz["pairs"])
    merged = merge(stats, pairs) if spec is not None else None
    colors = [c.color for c in card.classes]
    with atomic(out / SLIDE_RESULTS["tiff"][0]) as f:
        write_pyramid(
            f, h, w, np.dtype(np.uint8), _band(work, plan, "mask", None), colormap=palette(colors), scratch=work
        )
    info: dict[str, Any] = {
        "width": w,
        "height": h,
        "level": plan.level.index,
        "mpp": plan.level.mpp,
        "downsample": plan.downsample,
    }
    total = max(h * w, 1)
    info["classes"] = [
        {"id": c.id, "name": c.name, "pixels": int(counts[c.id]), "fraction": round(int(counts[c.id]) / total, 6)}
        for c in card.classes
    ]
    if merged is not None and spec is not None:
        with atomic(out / SLIDE_RESULTS["instances"][0]) as f:
            write_pyramid(f, h, w, np.dtype(np.uint32), _band(work, plan, "ids", merged.luts), scratch=work)
        with atomic(out / SLIDE_RESULTS["csv"][0], "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            for r in table_rows(merged.table, spec.interior):
                writer.writerow([r["id"], r["class_id"], r["area"], *r["centroid"], *r["bbox"]])
        with atomic(out / SLIDE_RESULTS["geojson"][0], "w") as f:
            write_outlines(f, work, plan, merged.main, merged.table, spec.interior)
        info["count"] = merged.count
    with atomic(out / SLIDE_RESULTS["json"][0], "w") as f:
        json.dump({"model": card.name, "version": card.version, **info}, f)
    return info


def outline(binary: np.ndarray) -> list[list[float]]:
    """The outer ring [[x, y], ...] (closed; pixel centres at integers) of the largest part of a 2-D mask:
    the 0.5 iso-line around its pixels, with the points inside straight runs left out."""
    contours = find_contours(np.pad(binary, 1).astype(np.uint8), 0.5)
    if not contours:
        return []
    ring = max(contours, key=len) - 1.0  # (n, 2) rows, columns; the last point repeats the first
    step = np.diff(ring, axis=0)
    turns = np.any(step[1:] != step[:-1], axis=1)
    keep = np.concatenate([[True], turns, [True]])
    points: list[list[float]] = np.round(ring[keep][:, ::-1], 2).tolist()
    if points[0] != points[-1]:
        points.append(points[0])
    return points


def write_outlines(f: IO[str], work: Path, plan: SlidePlan, main: np.ndarray, table: np.ndarray, class_id: int) -> None:
    """A GeoJSON FeatureCollection of one polygon per instance (slide pixel coordinates), each traced in the
    region that holds most of it, streamed a region at a time."""
    f.write('{"type": "FeatureCollection", "features": [\n')
    first = True
    order = np.argsort(main[:, 0], kind="stable")
    bounds = np.searchsorted(main[order, 0], np.arange(len(plan.regions) + 1))
    for region in plan.regions:
        mine = order[bounds[region.index] : bounds[region.index + 1]]
        if not len(mine):
            continue
        with np.load(region_file(work, region.index)) as npz:
            eids = npz["eids"]
        boxes = ndi.find_objects(eids)
        for i in mine.tolist():
            local = int(main[i, 1])
            box = boxes[local - 1] if local - 1 < len(boxes) else None
            if box is None:
                continue
            rs, cs = box
            ring = outline(eids[box] == local)
            if not ring:
                continue
            ring = [[x + cs.start + region.ex, y + rs.start + region.ey] for x, y in ring]
            feature = {
                "type": "Feature",
                "id": i + 1,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"id": i + 1, "class_id": class_id, "area": int(table[i, 0])},
            }
            f.write(("" if first else ",\n") + json.dumps(feature))
            first = False
    f.write("\n]}\n")


# --- image jobs -------------------------------------------------------------------------------------------------

# An image job's result: format -> (file under out/, media type)
IMAGE_RESULTS = {
    "png": ("result.png", "image/png"),
    "overlay": ("result.png", "image/png"),
    "instances": ("result.png", "image/png"),
    "json": ("result.json", "application/json"),
}
PredictFn = Callable[[bytes], Awaitable[Answer]]


async def run_image(
    source: Path,
    work: Path,
    fmt: str,
    predict: PredictFn,
    executor: concurrent.futures.Executor | None,
    save: SaveFn,
) -> dict[str, Any]:
    """An image job: the predict pipeline on the stored body, its answer in ``work/out``; returns the info."""
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(executor, source.read_bytes)
    t0 = time.perf_counter()
    answer = await predict(data)
    del data
    name = IMAGE_RESULTS[fmt][0]
    with atomic(work / OUT / name) as f:
        f.write(answer.body)
    await save(f"{OUT}/{name}")
    info: dict[str, Any] = {"width": answer.width, "height": answer.height}
    if answer.instances is not None:
        info["count"] = answer.instances
    info["timings_s"] = {
        "segment": round(time.perf_counter() - t0, 3),
        **{k: round(v, 3) for k, v in answer.timings.items()},
    }
    return info
