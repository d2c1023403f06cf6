"""The bulk job's output folder: masks written atomically, existing ones read back, summary.csv, progress."""

from __future__ import annotations

import csv
import io
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from app.segment.pipeline import INSTANCES_KEY, Outcome, class_counts
from app.segment.sources import mask_path
from model.bundle import Card

SUMMARY = "summary.csv"
_PART = ".part"  # temporary masks: ".<random>.part" beside the mask they become


def fs_bytes(name: str) -> bytes:
    """A path as the file system holds it: names that are not UTF-8 (``os.walk`` gives them as surrogates)
    get their original bytes back."""
    return name.encode("utf-8", "surrogateescape")


def shown(name: str | Path) -> str:
    """A path fit for any terminal or log: bytes that are not UTF-8 as ``\\xe9``."""
    return fs_bytes(str(name)).decode("utf-8", "backslashreplace")


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that ``target`` is either absent or complete, whenever the process dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not named after the target: a name near the 255-byte limit would make the temporary one too long.
    tmp = target.with_name(f".{uuid.uuid4().hex}{_PART}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial(dst: Path) -> int:
    """Delete temporary files left by a run that was killed while writing."""
    removed = 0
    for p in dst.rglob(f".*{_PART}"):
        if p.is_file():
            p.unlink()
            removed += 1
    return removed


def read_mask(path: Path, card: Card) -> Outcome | None:
    """An existing mask's size and class counts; None when there is none, or it is not one of this model's."""
    try:
        with Image.open(path) as im:
            palette = (im.getpalette() or []) if im.mode == "P" else []
            if im.format != "PNG" or palette[: 3 * len(card.classes)] != [v for c in card.classes for v in c.color]:
                return None  # not a mask of this model's classes
            mask = np.asarray(im)
            found = getattr(im, "text", {}).get(INSTANCES_KEY)
    # Anything unreadable is not a mask this job wrote whole: it is made again. FileNotFoundError included.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    k = len(card.classes)
    if mask.ndim != 2 or (mask.size and int(mask.max()) >= k):
        return None
    instances = None
    if card.instances is not None:  # its instance count is in the mask; a mask without one is made again
        if found is None or not str(found).isdigit():
            return None
        instances = int(found)
    h, w = mask.shape
    return Outcome("", b"", w, h, class_counts(mask, k), instances=instances)


def read_owners(dst: Path) -> dict[str, str]:
    """mask -> the image it was made from, as the last run's summary.csv says (empty without one): a mask
    is the same bytes whichever image it came from, so the summary is where a rerun learns that."""
    try:
        with open(dst / SUMMARY, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return {row["mask"]: row["path"] for row in csv.DictReader(f) if row.get("mask") and row.get("path")}
    except (OSError, csv.Error, KeyError):
        return {}  # no summary yet, or not one this job wrote


def summary_header(card: Card) -> list[str]:
    names = [c.name for c in card.classes]
    return [
        "path",
        "mask",
        "width",
        "height",
        *(f"{n}_pixels" for n in names),
        *(f"{n}_fraction" for n in names),
        "instances",
        "error",
    ]


def summary_row(o: Outcome, card: Card) -> list[str]:
    if o.error:
        return [o.path, "", "", "", *([""] * (2 * len(card.classes))), "", o.error]
    total = o.width * o.height
    fractions = [f"{n / total:.6f}" if total else "0" for n in o.counts]
    instances = "" if o.instances is None else str(o.instances)
    size = [str(o.width), str(o.height)]
    return [o.path, mask_path(o.path) or "", *size, *map(str, o.counts), *fractions, instances, ""]


def write_summary(dst: Path, card: Card, outcomes: Iterable[Outcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(summary_header(card))
    for o in sorted(outcomes, key=lambda o: o.path):
        w.writerow(summary_row(o, card))
    # Paths as the file system holds them (os.walk's surrogates back to their bytes): a name that is not
    # UTF-8 stays the exact name of its file.
    write_atomic(dst / SUMMARY, buf.getvalue().encode("utf-8", "surrogateescape"))


class Progress:
    """``[#####.....] done/total images, N images/s, E errors``, redrawn on a terminal, else a line every 10 s."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.done = self.errors = 0
        self.t0 = self.shown = time.perf_counter()

    def update(self, error: bool) -> None:
        self.done += 1
        self.errors += error
        now = time.perf_counter()
        if now - self.shown >= (0.2 if self.tty else 10.0):
            self.shown = now
            self.show(end="\r" if self.tty else "\n")

    def show(self, end: str) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = round(20 * self.done / self.total) if self.total else 20
        self.stream.write(
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} images, {rate:.1f} images/s, "
            f"{self.errors} errors{end}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.show(end="\n")
