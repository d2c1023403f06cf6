"""A slide in regions, and instances made whole again across region borders.

A slide is cut into square *cores* (``region_grid``); each is segmented with a *halo* of context around it
(its *extent*), and writes its own core only. Instances are found per extent (the model's watershed), so an
object that crosses a core border appears in both regions' extents. Two neighbouring regions (8-connected)
compare their instance ids in a *band*: the pixels within ``halo / 2`` of both cores, where each region has
at least ``halo / 2`` of context. An instance of one and an instance of the other are the same object when
each is the other's largest overlap in the band and they share more than half of the smaller one's band
pixels; such pairs are merged (union-find over the whole slide), so an object crossing a border, or a corner,
is one instance with one id. Objects up to ``halo`` wide are merged this way.

Region results and the merge work on plain arrays, independent of the model: ``tests/app/test_jobs_stitch.py``
checks them against one-shot labelling of the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

STAT_COLUMNS = 7  # per instance and region: core area, sum of x, sum of y, x min, y min, x max, y max


@dataclass(frozen=True)
class Region:
    index: int
    row: int
    col: int
    y: int  # core, in level pixels
    x: int
    h: int
    w: int
    ey: int  # extent: the core and its halo, clipped to the slide
    ex: int
    eh: int
    ew: int

    def neighbours_before(self, cols: int) -> list[int]:
        """Indices of the 8-connected neighbours that come earlier in raster order."""
        out = []
        if self.col > 0:
            out.append(self.index - 1)
        if self.row > 0:
            out.extend(self.index - cols + dc for dc in (-1, 0, 1) if 0 <= self.col + dc < cols)
        return out


def region_grid(height: int, width: int, size: int, halo: int) -> tuple[list[Region], int]:
    """Square cores of ``size`` (smaller at the right and bottom edges), raster order; and the column count."""
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    out = []
    for r in range(rows):
        for c in range(cols):
            y, x = r * size, c * size
            h, w = min(size, height - y), min(size, width - x)
            ey, ex = max(0, y - halo), max(0, x - halo)
            eh, ew = min(height, y + h + halo) - ey, min(width, x + w + halo) - ex
            out.append(Region(r * cols + c, r, c, y, x, h, w, ey, ex, eh, ew))
    return out, cols


def core_of(region: Region, extent: np.ndarray) -> np.ndarray:
    """The core's part of an array over the region's extent."""
    oy, ox = region.y - region.ey, region.x - region.ex
    return extent[oy : oy + region.h, ox : ox + region.w]


def instance_stats(region: Region, core_ids: np.ndarray, n: int) -> np.ndarray:
    """(n, 7) int64 for local ids 1..n over the core: area, sum of x, sum of y, x min, y min, x max, y max
    (slide pixels; an id with no core pixels has area 0 and an empty box)."""
    stats = np.zeros((n, STAT_COLUMNS), dtype=np.int64)
    if n == 0:
        return stats
    flat = core_ids.ravel()
    stats[:, 0] = np.bincount(flat, minlength=n + 1)[1 : n + 1]
    xs = np.arange(region.w, dtype=np.float64) + region.x
    ys = np.arange(region.h, dtype=np.float64) + region.y
    stats[:, 1] = np.rint(np.bincount(flat, weights=np.broadcast_to(xs, core_ids.shape).ravel(), minlength=n + 1))[1:]
    stats[:, 2] = np.rint(
        np.bincount(flat, weights=np.broadcast_to(ys[:, None], core_ids.shape).ravel(), minlength=n + 1)
    )[1:]
    big = np.iinfo(np.int64).max
    stats[:, 3:5] = big
    stats[:, 5:7] = -1
    for i, box in enumerate(ndi.find_objects(core_ids, n)):
        if box is not None:
            rs, cs = box
            stats[i, 3:] = (cs.start + region.x, rs.start + region.y, cs.stop - 1 + region.x, rs.stop - 1 + region.y)
    return stats


def band(a: Region, b: Region, halo: int) -> tuple[int, int, int, int] | None:
    """(y, x, h, w) of the pixels within ``halo // 2`` of both cores, or None when there are none."""
    m = halo // 2
    y0, x0 = max(a.y - m, b.y - m), max(a.x - m, b.x - m)
    y1, x1 = min(a.y + a.h + m, b.y + b.h + m), min(a.x + a.w + m, b.x + b.w + m)
    # inside both extents (it always is, as halo // 2 <= halo, except where the slide's edge clips them)
    y0, x0 = max(y0, a.ey, b.ey), max(x0, a.ex, b.ex)
    y1, x1 = min(y1, a.ey + a.eh, b.ey + b.eh), min(x1, a.ex + a.ew, b.ex + b.ew)
    return (y0, x0, y1 - y0, x1 - x0) if y1 > y0 and x1 > x0 else None


def match(a: Region, a_ids: np.ndarray, b: Region, b_ids: np.ndarray, halo: int) -> np.ndarray:
    """(m, 2) int64 pairs (local id in ``a``, local id in ``b``) that are one object; ``*_ids`` over the extents."""
    box = band(a, b, halo)
    if box is None:
        return np.zeros((0, 2), dtype=np.int64)
    y, x, h, w = box
    la = a_ids[y - a.ey : y - a.ey + h, x - a.ex : x - a.ex + w].astype(np.int64).ravel()
    lb = b_ids[y - b.ey : y - b.ey + h, x - b.ex : x - b.ex + w].astype(np.int64).ravel()
    both = (la > 0) & (lb > 0)
    if not both.any():
        return np.zeros((0, 2), dtype=np.int64)
    nb = int(lb.max()) + 1
    keys, counts = np.unique(la[both] * nb + lb[both], return_counts=True)
    pa, pb = keys // nb, keys % nb
    area_a = np.bincount(la, minlength=int(la.max()) + 1)
    area_b = np.bincount(lb, minlength=nb)
    # each side's best partner: sort by count, the last write per id wins
    order = np.argsort(counts, kind="stable")
    best_a: dict[int, int] = {}
    best_b: dict[int, int] = {}
    for i in order:
        best_a[int(pa[i])] = int(i)
        best_b[int(pb[i])] = int(i)
    out = []
    for ia, i in best_a.items():
        ib = int(pb[i])
        if best_b.get(ib) == i and 2 * counts[i] > min(area_a[ia], area_b[ib]):
            out.append((ia, ib))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@dataclass
class Merged:
    """The slide's instances after the merge: ids 1..N, their table, and how to find them per region."""

    count: int
    luts: list[np.ndarray]  # per region: (n_r + 1,) uint32 local id -> final id (0 for none)
    table: np.ndarray  # (N, 7) int64 as ``instance_stats``, per final id 1..N
    main: np.ndarray  # (N, 2) int64: the (region, local id) holding most of each instance, for its outline


def merge(stats: list[np.ndarray], pairs: list[np.ndarray]) -> Merged:
    """Merge per-region instances. ``stats[r]``: region r's (n_r, 7) ``instance_stats``; ``pairs[r]``: (m, 3)
    int64 rows (earlier region, its local id, r's local id) of objects r shares with an earlier neighbour."""
    sizes = np.array([len(s) for s in stats], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    src, dst = [], []
    for r, p in enumerate(pairs):
        if len(p):
            src.append(offsets[p[:, 0]] + p[:, 1] - 1)
            dst.append(offsets[r] + p[:, 2] - 1)
    if src and total:
        s, d = np.concatenate(src), np.concatenate(dst)
        graph = coo_matrix((np.ones(len(s), dtype=np.int8), (s, d)), shape=(total, total))
        _, labels = connected_components(graph, directed=False)
    else:
        labels = np.arange(total)
    all_stats = np.concatenate(stats) if total else np.zeros((0, STAT_COLUMNS), dtype=np.int64)
    n_comp = int(labels.max()) + 1 if total else 0
    area = np.bincount(labels, weights=all_stats[:, 0], minlength=n_comp)
    keep = area > 0
    final = np.zeros(n_comp, dtype=np.int64)
    final[keep] = np.arange(1, int(keep.sum()) + 1)
    count = int(keep.sum())
    table = np.zeros((count, STAT_COLUMNS), dtype=np.int64)
    fid = final[labels] - 1  # (total,) final index, -1 for none
    has = fid >= 0
    np.add.at(table[:, 0], fid[has], all_stats[has, 0])
    np.add.at(table[:, 1], fid[has], all_stats[has, 1])
    np.add.at(table[:, 2], fid[has], all_stats[has, 2])
    table[:, 3:5] = np.iinfo(np.int64).max
    table[:, 5:7] = -1
    real = has & (all_stats[:, 0] > 0)
    np.minimum.at(table[:, 3], fid[real], all_stats[real, 3])
    np.minimum.at(table[:, 4], fid[real], all_stats[real, 4])
    np.maximum.at(table[:, 5], fid[real], all_stats[real, 5])
    np.maximum.at(table[:, 6], fid[real], all_stats[real, 6])
    # the node with the largest core area per instance: sorted by (instance, area), the last of each
    region_of = np.repeat(np.arange(len(stats)), sizes)
    nodes = np.nonzero(has)[0]
    nodes = nodes[np.lexsort((all_stats[nodes, 0], fid[nodes]))]
    last = np.r_[fid[nodes][1:] != fid[nodes][:-1], True] if len(nodes) else np.zeros(0, dtype=bool)
    best = nodes[last]
    main = np.stack([region_of[best], best - offsets[region_of[best]] + 1], axis=1).astype(np.int64).reshape(-1, 2)
    luts = []
    for r in range(len(stats)):
        lut = np.zeros(int(sizes[r]) + 1, dtype=np.uint32)
        lut[1:] = (fid[offsets[r] : offsets[r + 1]] + 1).astype(np.uint32)
        luts.append(lut)
    return Merged(count, luts, table, main)


def table_rows(table: np.ndarray, class_id: int) -> list[dict[str, Any]]:
    """The instance table as the CSV and JSON give it: id, class_id, area, centroid [x, y] (to 0.01) and
    bbox [x, y, w, h], in id order."""
    out = []
    for i, (area, sx, sy, x0, y0, x1, y1) in enumerate(table.tolist(), start=1):
        out.append(
            {
                "id": i,
                "class_id": class_id,
                "area": area,
                "centroid": [round(sx / area, 2), round(sy / area, 2)],
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
            }
        )
    return out
