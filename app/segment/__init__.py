"""Bulk segmentation: every image under a folder or an ``s3://`` prefix to its mask, and ``summary.csv``.

    unetseg segment SRC DST --model M [--ray [--ray-address ADDR]] [--workers N]
    unetseg segment SLIDE.tiff DST --model M [--level L]

A SRC that is one TIFF file is a whole slide: it is segmented region by region, as a slide job of the
service is, into pyramidal TIFFs of class and instance ids, per-class areas, an instance table and outlines
(``app.jobs.local``; resumable too).

Each image ``SRC/a/b.jpg`` gets ``DST/a/b.png``: the same palette PNG that ``POST /v1/predict`` returns for
that image, made by the same pipeline (``app.pipeline``). ``DST/summary.csv`` has one row per image: its
size, the pixel count and fraction of every class and, for a model with instances, the instance count (kept in
a text chunk of the mask, for reruns), or the error that kept it from being segmented.

- **Resumable.** A mask is written to a hidden temporary file in its folder and renamed into place, so a
  mask that exists is complete; a rerun skips it (and reads it back for the summary, which therefore
  always describes every mask on disk). Temporary files left by a killed run are removed at the start.
- **Unreadable images** (corrupt, truncated, not an image, over the pixel limit, a failed S3 read) get a
  row with their error and no mask; the job goes on, and a rerun tries them again.
- **In-process** (the default), threads read, decode and encode images while the engine batches their
  forward passes, as the service does for concurrent requests. **With ``--ray``**, Ray Data runs the same
  ``Segmenter`` in ``--workers`` actors (one GPU each when the cluster has GPUs) and the driver writes the
  masks it streams back, so only the driver needs DST; SRC and the bundle must be readable by every node.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from app.config import Settings, load_settings
from app.segment.output import (
    SUMMARY,
    Progress,
    read_mask,
    read_owners,
    remove_partial,
    shown,
    write_atomic,
    write_summary,
)
from app.segment.pipeline import Options, Outcome, Segmenter, ray_outcomes
from app.segment.sources import FolderSource, mask_path, open_source
from model.bundle import Card, discover, read_card

__all__ = ["SUMMARY", "Report", "find_bundle", "main", "run"]


@dataclass
class Report:
    images: int = 0  # every image under SRC
    skipped: int = 0  # masks already there
    written: int = 0
    errors: list[Outcome] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # named like images, not regular files
    done: int = 0  # images this run segmented or failed on
    seconds: float = 0.0  # from loading the model (and starting Ray) to the last mask written
    first_s: float = 0.0  # from the same start to when a worker finished the first image
    last_s: float = 0.0  # ... and the last one

    @property
    def images_per_s(self) -> float:
        """This run's images per second, start-up included."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images per second between the workers' first and last finished image (start-up excluded)."""
        span = self.last_s - self.first_s
        return (self.done - 1) / span if self.done > 1 and span > 0 else 0.0


def find_bundle(model: str, weights_dir: Path) -> Path:
    """A bundle folder given as such, or the bundle named ``model`` under ``weights_dir``."""
    p = Path(model)
    if (p / "card.json").is_file():
        return p
    for folder in discover(weights_dir):
        if read_card(folder).name == model:
            return folder
    raise ValueError(
        f"no bundle named {model!r} in {weights_dir}: give the folder of bundles with --weights-dir "
        "(or UNETSEG_WEIGHTS_DIR), or a bundle folder as --model"
    )


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk's surrogates for bytes that are not UTF-8
        return False
    return True


_AN_INPUT = object()  # a mask path that is one of the images themselves


def _existing(path: Path, card: Card, inputs: frozenset[tuple[int, int]]) -> Outcome | object | None:
    """What is at a mask's path: ``_AN_INPUT`` (never written over), a mask of this model's, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) in inputs:  # the same file as an image, by another path or a hard link
        return _AN_INPUT
    return read_mask(path, card)


def run(
    src: str,
    dst: Path,
    bundle: Path,
    settings: Settings,
    use_ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    progress: IO[str] | None = None,
) -> Report:
    """Segment every image under ``src`` that has no mask in ``dst`` yet, and rewrite ``dst/summary.csv``."""
    source = open_source(src, dst)
    card = read_card(bundle)
    dst.mkdir(parents=True, exist_ok=True)
    remove_partial(dst)
    report = Report()
    rows: dict[str, Outcome] = {}
    inputs: frozenset[tuple[int, int]] = frozenset()
    if isinstance(source, FolderSource):
        listing = source.scan()
        listed, report.ignored, inputs = listing.images, listing.ignored, listing.inodes
    else:
        listed = source.list()
    by_mask: dict[str, list[str]] = {}  # mask -> the images that would have it, sorted
    for rel in listed:
        report.images += 1
        target = mask_path(rel)
        if target is None:
            rows[rel] = Outcome(rel, b"", error="the path has an empty, '.' or '..' part: it cannot be mirrored in DST")
        else:
            by_mask.setdefault(target, []).append(rel)
    # Masks already there are read back (in parallel) to keep their summary rows; the last summary says
    # which image each was made from.
    owners = read_owners(dst)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        found = dict(zip(by_mask, pool.map(lambda t: _existing(dst / t, card, inputs), by_mask), strict=True))
    targets: dict[str, str] = {}  # image -> its mask's relative path
    todo = []
    for target, rels in by_mask.items():
        existing = found[target]
        if existing is _AN_INPUT:
            for rel in rels:
                rows[rel] = Outcome(rel, b"", error=f"its mask path {target} in DST is one of the images")
            continue
        owner = rels[0]
        made_from = owners.get(target)  # None: a mask no summary lists (its run was killed)
        if isinstance(existing, Outcome):
            if made_from in rels:
                owner = made_from  # the image it was made from keeps it
            elif made_from is None and len(rels) > 1:
                names = ", ".join(rels)  # which of them it was made from is unknown: none gets it
                for rel in rels:
                    rows[rel] = Outcome(rel, b"", error=f"{names} have the same mask path {target}; rename all but one")
                continue
        for rel in rels:
            if rel != owner:
                rows[rel] = Outcome(rel, b"", error=f"{owner} has the same mask path {target}")
        targets[owner] = target
        if isinstance(existing, Outcome) and made_from in (owner, None):
            rows[owner] = Outcome(
                owner, b"", existing.width, existing.height, existing.counts, instances=existing.instances
            )
            report.skipped += 1
        else:
            todo.append(owner)  # no mask yet, or one made from an image that is gone: made (again)
    todo.sort()
    if use_ray:  # Ray Data's tables hold text as UTF-8: a name that is not cannot go through them
        for rel in [r for r in todo if not _utf8(r)]:
            todo.remove(rel)
            rows[rel] = Outcome(rel, b"", error="its name is not UTF-8, which --ray cannot pass on; run without --ray")
    report.errors = sorted((o for o in rows.values() if o.error), key=lambda o: o.path)
    bar = Progress(len(todo), progress) if progress is not None and todo else None
    options = Options.from_settings(bundle, settings)
    t0 = time.time()
    first = last = t0
    try:
        with contextlib.ExitStack() as stack:
            if not todo:
                outcomes: Iterator[Outcome] = iter(())
            elif use_ray:
                outcomes = ray_outcomes(source, options, todo, ray_address, workers)
            else:
                segmenter = Segmenter(source, options, workers or settings.io_threads or os.cpu_count() or 1)
                stack.callback(segmenter.close)
                outcomes = segmenter.run(todo)
            for o in outcomes:
                if not o.error:
                    try:
                        write_atomic(dst / targets[o.path], o.png)
                    except OSError as exc:  # a full disk, a name the file system refuses: this image's
                        o = Outcome(o.path, b"", error=f"cannot write its mask: {exc}", finished=o.finished)
                if o.error:
                    report.errors.append(o)
                else:
                    report.written += 1
                rows[o.path] = Outcome(o.path, b"", o.width, o.height, o.counts, o.error, o.instances)
                report.done += 1
                first = o.finished if report.done == 1 else min(first, o.finished)
                last = max(last, o.finished)
                if bar:
                    bar.update(bool(o.error))
        report.seconds = time.time() - t0
        report.first_s, report.last_s = first - t0, last - t0
    finally:  # also when interrupted: the summary then lists what is done so far
        if bar:
            bar.close()
        write_summary(dst, card, rows.values())
    return report


def main(argv: Sequence[str]) -> int:
    defaults = load_settings()
    p = argparse.ArgumentParser(
        prog="unetseg segment",
        description="Segment every image under a folder or s3:// prefix into DST (masks + summary.csv); resumable.",
    )
    p.add_argument(
        "src", help="folder of images (searched recursively), s3://bucket/prefix, or one slide (a TIFF file)"
    )
    p.add_argument(
        "dst",
        type=Path,
        help="output folder: one .png mask per image, same relative path (a slide: see app.jobs.local)",
    )
    p.add_argument("--level", type=int, help="a slide's pyramid level to segment (default: full resolution)")
    p.add_argument("--model", default=defaults.default_model, help="model name in --weights-dir, or a bundle folder")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=defaults.weights_dir,
        help="folder of model bundles (default: UNETSEG_WEIGHTS_DIR, else ./weights, else the shipped bundles)",
    )
    p.add_argument("--device", help="overrides UNETSEG_DEVICE (in every Ray actor too)")
    p.add_argument(
        "--ray", action="store_true", help="run on Ray Data (a local instance, or the cluster at --ray-address)"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one)")
    p.add_argument(
        "--workers",
        type=int,
        help="Ray actors (default: one per GPU, else 1); without --ray, threads around the engine (default: cores)",
    )
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.ray_address and not args.ray:
        p.error("--ray-address needs --ray")
    settings = defaults.model_copy(update={"device": args.device}) if args.device else defaults
    from app.jobs.local import is_slide_path
    from app.jobs.local import main as segment_slide_main

    if is_slide_path(Path(args.src)):  # one whole slide, region by region, into pyramidal TIFFs and tables
        if args.ray:
            p.error("--ray segments folders of images; a slide runs in this process")
        try:
            bundle = find_bundle(args.model, args.weights_dir)
        except ValueError as exc:
            print(f"unetseg segment: {exc}", file=sys.stderr)
            return 2
        return segment_slide_main(Path(args.src), args.dst, bundle, settings, args.level)
    try:
        bundle = find_bundle(args.model, args.weights_dir)
        report = run(args.src, args.dst, bundle, settings, args.ray, args.ray_address, args.workers, sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"unetseg segment: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = {"ray": "--ray needs the ray extra: pip install 'unetseg[ray]'", "boto3": "s3:// needs boto3"}
        print(f"unetseg segment: {extra.get(str(exc.name).split('.')[0], exc)}", file=sys.stderr)
        return 2
    for rel, why in report.ignored:
        print(shown(f"{rel}: skipped, {why}"), file=sys.stderr)
    for o in report.errors:
        print(shown(f"{o.path}: {o.error}"), file=sys.stderr)
    print(
        f"{report.images} images: {report.written} masks written, {report.skipped} already there, "
        f"{len(report.errors)} errors ({report.images_per_s:.1f} images/s); summary in {shown(args.dst / SUMMARY)}"
    )
    return 1 if report.errors else 0
