"""Slide regions and the merge of instances across their borders, against labelling the whole image at once."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from app.jobs.stitch import core_of, instance_stats, match, merge, region_grid, table_rows

EIGHT = np.ones((3, 3), dtype=bool)


def discs(height: int, width: int, centres: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) bool: filled discs (y, x, radius)."""
    yy, xx = np.mgrid[:height, :width]
    out = np.zeros((height, width), dtype=bool)
    for y, x, r in centres:
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    return out


def stitched(fg: np.ndarray, size: int, halo: int) -> tuple[np.ndarray, list[dict[str, object]]]:
    """Label ``fg`` region by region (each region labels its own extent), merge, and paint the final ids."""
    h, w = fg.shape
    regions, cols = region_grid(h, w, size, halo)
    extent_ids, stats, pairs = [], [], []
    for reg in regions:
        ids, n = ndi.label(fg[reg.ey : reg.ey + reg.eh, reg.ex : reg.ex + reg.ew], structure=EIGHT)
        ids = ids.astype(np.int32)
        extent_ids.append(ids)
        stats.append(instance_stats(reg, core_of(reg, ids), n))
        found = [np.zeros((0, 3), dtype=np.int64)]
        for nb in reg.neighbours_before(cols):
            m = match(regions[nb], extent_ids[nb], reg, ids, halo)
            found.append(np.column_stack([np.full(len(m), nb), m]))
        pairs.append(np.concatenate(found))
    merged = merge(stats, pairs)
    out = np.zeros((h, w), dtype=np.uint32)
    for reg, ids in zip(regions, extent_ids, strict=True):
        out[reg.y : reg.y + reg.h, reg.x : reg.x + reg.w] = merged.luts[reg.index][core_of(reg, ids)]
    return out, table_rows(merged.table, 1)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two id images label the same objects (ids may differ)."""
    fa, fb = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    if not np.array_equal(fa > 0, fb > 0):
        return False
    pairs = np.unique(np.stack([fa, fb], axis=1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def test_region_grid_covers_the_slide_once() -> None:
    regions, cols = region_grid(700, 530, 256, 32)
    assert cols == 3 and len(regions) == 9
    seen = np.zeros((700, 530), dtype=int)
    for r in regions:
        seen[r.y : r.y + r.h, r.x : r.x + r.w] += 1
        assert r.ey == max(0, r.y - 32) and r.ey + r.eh == min(700, r.y + r.h + 32)
    assert (seen == 1).all()
    assert regions[4].neighbours_before(cols) == [3, 0, 1, 2]
    assert regions[3].neighbours_before(cols) == [0, 1]


def test_an_object_across_a_border_and_a_corner_is_one_instance() -> None:
    # 64-px regions: a disc on a vertical border, one on a horizontal one, one on the corner of four regions,
    # one inside a core, two touching discs across a border (one object: they are 8-connected)
    fg = discs(128, 128, [(30, 64, 9), (64, 20, 8), (64, 64, 10), (100, 100, 5), (100, 56, 6), (100, 69, 7)])
    ids, table = stitched(fg, 64, 32)
    truth, n = ndi.label(fg, structure=EIGHT)
    assert n == 5 and len(table) == 5 and int(ids.max()) == 5
    assert same_partition(ids, truth)
    for row in table:  # the table describes the painted ids
        i = row["id"]
        ys, xs = np.nonzero(ids == i)
        assert row["area"] == len(ys)
        assert row["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert row["centroid"] == [round(xs.mean(), 2), round(ys.mean(), 2)]


@pytest.mark.parametrize("seed", range(4))
def test_random_objects_match_labelling_the_whole_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = [(int(rng.integers(0, 300)), int(rng.integers(0, 260)), int(rng.integers(2, 12))) for _ in range(60)]
    fg = discs(300, 260, centres)
    ids, table = stitched(fg, 64, 48)  # the halo is wider than any object: every merge is found
    truth, n = ndi.label(fg, structure=EIGHT)
    assert len(table) == n
    assert same_partition(ids, truth)


def test_without_a_halo_objects_stay_cut() -> None:
    fg = discs(128, 128, [(30, 64, 9)])
    _, table = stitched(fg, 64, 0)
    assert len(table) == 2  # documented: objects wider than the halo are not merged


def test_merge_of_nothing() -> None:
    merged = merge([np.zeros((0, 7), dtype=np.int64)], [np.zeros((0, 3), dtype=np.int64)])
    assert merged.count == 0 and merged.luts[0].tolist() == [0]
