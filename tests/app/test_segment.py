"""The bulk job (``unetseg segment``): masks equal to the service's and to ``unetseg predict``'s, nested
folders mirrored, summary.csv, unreadable images, resuming (also after a SIGKILL), S3 and Ray Data."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from app.cli import main
from app.config import Settings
from app.main import create_app
from app.segment import SUMMARY, find_bundle, run
from app.segment.pipeline import INSTANCES_KEY
from model.bundle import InstanceSpec
from tests.backends import S3_ENV, new_bucket, s3_emulator, unavailable
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes, write_instance_bundle, write_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]

# Images the job must segment, by relative path: a JPEG larger than the models' input (decoded at a
# reduced scale by the service, as here), a grayscale PNG, an RGBA WebP, nested two levels deep.
GOOD = {
    "a.png": image_bytes(40, 30, seed=1),
    "nested/b.jpg": image_bytes(200, 150, fmt="JPEG", seed=2, quality=90),
    "nested/deeper/c.png": image_bytes(33, 47, mode="L", seed=3),
    "nested/deeper/d.webp": image_bytes(64, 20, mode="RGBA", fmt="WEBP", seed=4),
}
BAD = {"nested/broken.jpg": GOOD["nested/b.jpg"][:300], "empty.png": b""}
IGNORED = {"notes.txt": b"not an image", ".hidden.png": GOOD["a.png"]}


@pytest.fixture(autouse=True)
def cli_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads Settings from the environment. A forward pass's floats can differ in the last bit with
    # the batch it is in; one input per pass makes "the same PNG" an exact comparison.
    monkeypatch.setenv("UNETSEG_DEVICE", "cpu")
    monkeypatch.setenv("UNETSEG_PRECISION", "float32")
    monkeypatch.setenv("UNETSEG_MAX_BATCH", "1")


def make_src(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_src(tmp_path / "src", {**GOOD, **BAD, **IGNORED})


def segment(src: str | Path, dst: Path, model: str, weights_dir: Path, *extra: str) -> int:
    return main(["segment", str(src), str(dst), "--model", model, "--weights-dir", str(weights_dir), *extra])


def masks(dst: Path) -> dict[str, bytes]:
    return {p.relative_to(dst).as_posix(): p.read_bytes() for p in sorted(dst.rglob("*.png"))}


def read_summary(dst: Path) -> list[dict[str, str]]:
    with open(dst / SUMMARY, newline="") as f:
        return list(csv.DictReader(f))


def mask_name(rel: str) -> str:
    return str(Path(rel).with_suffix(".png").as_posix())


@pytest.mark.parametrize("model", ["tiny", "tiles"])
def test_masks_are_the_services_and_predicts(
    tmp_path: Path, src: Path, weights_dir: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    assert segment(src, dst, model, weights_dir, "--workers", "3") == 1  # two images are unreadable
    got = masks(dst)
    assert sorted(got) == sorted(mask_name(rel) for rel in GOOD)  # nested folders mirrored; nothing else
    settings = make_settings(tmp_path, weights_dir, max_batch=1)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for rel, data in GOOD.items():
            r = client.post(f"/v1/predict?model={model}", files={"file": (Path(rel).name, data)})
            assert r.status_code == 200, r.text
            assert got[mask_name(rel)] == r.content, rel
    out = tmp_path / "predicted"
    predict = ["predict", *(str(src / rel) for rel in GOOD), "--model", model, "--weights-dir", str(weights_dir)]
    assert main([*predict, "--out", str(out)]) == 0
    for rel in GOOD:
        assert (out / f"{Path(rel).stem}.png").read_bytes() == got[mask_name(rel)], rel
    err = capsys.readouterr().err
    assert "nested/broken.jpg: the image is truncated or corrupt" in err
    assert "empty.png: the file is empty" in err


def test_summary(tmp_path: Path, src: Path, weights_dir: Path) -> None:
    dst = tmp_path / "out"
    segment(src, dst, "tiles", weights_dir)
    rows = read_summary(dst)
    assert list(rows[0]) == [
        "path",
        "mask",
        "width",
        "height",
        "background_pixels",
        "class1_pixels",
        "class2_pixels",
        "background_fraction",
        "class1_fraction",
        "class2_fraction",
        "instances",
        "error",
    ]
    assert [r["path"] for r in rows] == sorted([*GOOD, *BAD])
    by_path = {r["path"]: r for r in rows}
    for rel in GOOD:
        r = by_path[rel]
        mask = np.asarray(Image.open(dst / r["mask"]))
        h, w = mask.shape
        assert (int(r["width"]), int(r["height"])) == Image.open(io.BytesIO(GOOD[rel])).size == (w, h)
        counts = [int(r[f"{c}_pixels"]) for c in ("background", "class1", "class2")]
        assert counts == np.bincount(mask.ravel(), minlength=3).tolist()
        fractions = [float(r[f"{c}_fraction"]) for c in ("background", "class1", "class2")]
        assert fractions == pytest.approx([n / (w * h) for n in counts], abs=1e-6)
        assert r["error"] == ""
    assert by_path["nested/broken.jpg"]["error"].startswith("the image is truncated or corrupt")
    assert by_path["empty.png"]["error"] == "the file is empty"
    assert by_path["empty.png"]["mask"] == by_path["empty.png"]["width"] == ""


def test_rerun_skips_written_masks_and_redoes_a_deleted_one(tmp_path: Path, src: Path, weights_dir: Path) -> None:
    dst = tmp_path / "out"
    settings = Settings()
    bundle = find_bundle("tiny", weights_dir)
    first = run(str(src), dst, bundle, settings)
    assert (first.images, first.written, first.skipped, len(first.errors)) == (6, 4, 0, 2)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in dst.rglob("*.png")}
    summary = (dst / SUMMARY).read_bytes()

    again = run(str(src), dst, bundle, settings)
    assert (again.written, again.skipped, len(again.errors)) == (0, 4, 2)  # unreadable ones are tried again
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in dst.rglob("*.png")} == before
    assert (dst / SUMMARY).read_bytes() == summary  # rows of skipped masks come from the masks on disk

    redo = dst / "nested" / "deeper" / "c.png"
    data = redo.read_bytes()
    redo.unlink()
    (src / "new.png").write_bytes(image_bytes(25, 25, seed=9))
    third = run(str(src), dst, bundle, settings)
    assert (third.written, third.skipped) == (2, 3)
    assert redo.read_bytes() == data
    assert [r["path"] for r in read_summary(dst)] == sorted([*GOOD, *BAD, "new.png"])
    assert {p for p in dst.rglob("*") if p.is_file()} == {*before, dst / "new.png", dst / SUMMARY}


def test_a_mask_that_is_not_one_is_redone(tmp_path: Path, src: Path, weights_dir: Path) -> None:
    dst = tmp_path / "out"
    bundle = find_bundle("tiny", weights_dir)
    run(str(src), dst, bundle, Settings())
    target = dst / "a.png"
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])  # not something this job writes, but a rerun must not trust it
    report = run(str(src), dst, bundle, Settings())
    assert (report.written, report.skipped) == (1, 3)
    assert target.read_bytes() == good


def test_images_with_one_mask_path_and_masks_of_another_model(tmp_path: Path, weights_dir: Path) -> None:
    src = make_src(tmp_path / "src", {"x.jpg": GOOD["nested/b.jpg"], "x.png": GOOD["a.png"]})
    dst = tmp_path / "out"
    report = run(str(src), dst, find_bundle("tiny", weights_dir), Settings())
    assert (report.written, [(o.path, o.error) for o in report.errors]) == (
        1,
        [("x.png", "x.jpg has the same mask path x.png")],
    )
    with Image.open(dst / "x.png") as im:
        assert im.size == (200, 150)  # x.jpg's
    # Another model's masks (other class colors) in the same folder are not taken for this one's.
    report = run(str(src), dst, find_bundle("tiles", weights_dir), Settings())
    assert (report.written, report.skipped) == (1, 0)


def test_killed_run_leaves_only_whole_masks_and_resumes(tmp_path: Path, weights_dir: Path) -> None:
    src = make_src(tmp_path / "src", {f"part{i % 4}/img{i:03}.png": image_bytes(48, 32, seed=i) for i in range(300)})
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "app", "segment", str(src), str(dst), "--model", "tiny"]
    proc = subprocess.Popen([*cmd, "--weights-dir", str(weights_dir)], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(dst.rglob("img*.png"))) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = masks(dst)
    assert 20 <= len(written) < 300, "the run was not interrupted in the middle"
    for rel in written:  # every mask on disk is whole
        with Image.open(dst / rel) as im:
            im.load()
            assert (im.mode, im.size) == ("P", (48, 32))
    assert segment(src, dst, "tiny", weights_dir) == 0
    assert not [p for p in dst.rglob(".*") if p.is_file()]  # the killed run's temporary files are gone
    complete = masks(dst)
    assert len(complete) == 300
    assert {k: complete[k] for k in written} == written  # kept, not redone
    assert len(read_summary(dst)) == 300


def test_s3_source(tmp_path: Path, src: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import boto3
    except ImportError:
        unavailable("boto3 is not installed (pip install -e '.[dev]')")
    with s3_emulator() as endpoint:
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        bucket = new_bucket(endpoint)
        client = boto3.client("s3")
        for rel, data in {**GOOD, **BAD, **IGNORED}.items():
            client.put_object(Bucket=bucket, Key=f"archive/2024/{rel}", Body=data)
        client.put_object(Bucket=bucket, Key="archive/20240/outside.png", Body=GOOD["a.png"])  # not under the prefix
        dst = tmp_path / "from-s3"
        assert segment(f"s3://{bucket}/archive/2024", dst, "tiny", weights_dir) == 1
        assert segment(f"s3://{bucket}/archive/2024/", tmp_path / "slash", "tiny", weights_dir) == 1
        assert segment(f"s3://{bucket}/nothing-here", tmp_path / "none", "tiny", weights_dir) == 0
        assert segment("s3://no-such-bucket/x", tmp_path / "nobucket", "tiny", weights_dir) == 2
    local = tmp_path / "local"
    segment(src, local, "tiny", weights_dir)
    assert masks(dst) == masks(tmp_path / "slash") == masks(local)
    assert read_summary(dst) == read_summary(local)
    assert read_summary(tmp_path / "none") == []


def test_bad_arguments(tmp_path: Path, weights_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert segment(tmp_path / "missing", tmp_path / "out", "tiny", weights_dir) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert segment(tmp_path / "src", tmp_path / "out", "nope", weights_dir) == 2
    assert "no bundle named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment(tmp_path / "src", tmp_path / "out", "tiny", weights_dir, "--workers", "0")


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, from its DataContext
def test_ray_masks_equal_in_process(tmp_path: Path, src: Path, weights_dir: Path) -> None:
    try:
        import ray
    except ImportError:
        unavailable("ray is not installed (pip install -e '.[ray]')")
    local = tmp_path / "local"
    segment(src, local, "tiles", weights_dir)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        dst = tmp_path / "ray"
        report = run(str(src), dst, find_bundle("tiles", weights_dir), Settings(), use_ray=True, workers=2)
        assert (report.written, len(report.errors)) == (len(GOOD), len(BAD))
        assert masks(dst) == masks(local)
        assert read_summary(dst) == read_summary(local)
    finally:
        ray.shutdown()


def test_summary_counts_instances_for_a_model_with_instances_and_a_rerun_keeps_them(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_tiny_bundle(weights / "tiny", name="tiny")
    write_instance_bundle(weights / "cells", InstanceSpec("watershed", 1, 2), name="cells", classes=3)
    src = make_src(tmp_path / "src", {**GOOD, **BAD})
    dst = tmp_path / "out"
    assert segment(src, dst, "cells", weights) == 1  # the BAD images
    rows = {r["path"]: r for r in read_summary(dst)}
    with TestClient(create_app(make_settings(tmp_path, weights, default_model="cells"))) as c:
        wait_ready(c)
        for rel, data in GOOD.items():
            r = c.post("/v1/predict?format=instances", files={"file": ("x", data, "image/png")})
            assert r.status_code == 200
            assert rows[rel]["instances"] == r.headers["x-instance-count"]
            # the mask is still the service's semantic mask
            expected = c.post("/v1/predict", files={"file": ("x", data, "image/png")}).content
            np.testing.assert_array_equal(
                np.asarray(Image.open(dst / rows[rel]["mask"])), np.asarray(Image.open(io.BytesIO(expected)))
            )
    assert any(int(rows[rel]["instances"]) > 0 for rel in GOOD)
    assert all(rows[rel]["instances"] == "" for rel in BAD)
    summary = (dst / SUMMARY).read_bytes()
    # A rerun reads the counts back from the masks; a mask without one is made again.
    a = dst / rows["a.png"]["mask"]
    with Image.open(a) as im:
        im.save(a, pnginfo=None)  # the same pixels and palette, no text chunk
    assert segment(src, dst, "cells", weights) == 1
    assert (dst / SUMMARY).read_bytes() == summary
    with Image.open(a) as im:
        assert isinstance(im, PngImageFile) and im.text[INSTANCES_KEY] == rows["a.png"]["instances"]
    # A semantic model's rows leave the column empty.
    assert segment(src, tmp_path / "plain", "tiny", weights) == 1
    assert all(r["instances"] == "" for r in read_summary(tmp_path / "plain"))


@pytest.mark.parametrize("where", ["src", "inside", "symlink"])
def test_a_dst_that_is_src_or_inside_it_is_refused_and_no_image_changes(
    tmp_path: Path, src: Path, weights_dir: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    if where == "src":
        dst = src
    elif where == "inside":
        dst = src / "nested" / "masks"
    else:
        dst = tmp_path / "link"
        dst.symlink_to(src, target_is_directory=True)
    assert segment(src, dst, "tiny", weights_dir) == 2
    assert "give an output folder outside it" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_a_mask_is_never_written_over_an_image(tmp_path: Path, weights_dir: Path) -> None:
    """SRC inside DST: the image s/x.png's mask path DST/s/x.png is the image SRC/x.png itself."""
    dst = tmp_path / "d"
    src = make_src(dst / "s", {"x.png": GOOD["a.png"], "s/x.png": GOOD["nested/deeper/c.png"]})
    report = run(str(src), dst, find_bundle("tiny", weights_dir), Settings())
    expected = [("s/x.png", "its mask path s/x.png in DST is one of the images")]
    assert [(o.path, o.error) for o in report.errors] == expected
    assert (src / "x.png").read_bytes() == GOOD["a.png"]
    assert (dst / "x.png").is_file() and report.written == 1


def test_any_error_on_one_image_is_that_images_row(
    tmp_path: Path, src: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.pipeline as pipeline

    real_decode = pipeline.decode

    def decode(data: bytes, *args: object) -> object:
        if data == GOOD["a.png"]:
            raise RuntimeError("a bug that only this image meets")
        return real_decode(data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "decode", decode)
    dst = tmp_path / "out"
    report = run(str(src), dst, find_bundle("tiny", weights_dir), Settings())
    errors = {o.path: o.error for o in report.errors}
    assert errors["a.png"] == "RuntimeError: a bug that only this image meets"
    assert report.written == len(GOOD) - 1
    assert {r["path"] for r in read_summary(dst)} == {*GOOD, *BAD}


def test_fifos_devices_and_dangling_links_are_skipped(tmp_path: Path, src: Path, weights_dir: Path) -> None:
    """A FIFO named like an image would block the read forever, /dev/zero never end it: neither is read.
    The job runs in a subprocess, so that a hang fails the test instead of stopping the suite."""
    os.mkfifo(src / "pipe.jpg")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "gone.png").symlink_to(src / "nothing-here.png")
    (src / "linked.png").symlink_to(src / "a.png")  # a symlink to an image is an image
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "app", "segment", str(src), str(dst), "--model", "tiny"]
    cmd += ["--weights-dir", str(weights_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # the BAD images
    assert "pipe.jpg: skipped, not a regular file (a FIFO)" in done.stderr
    assert "zero.png: skipped, not a regular file (a character device)" in done.stderr
    assert "gone.png: skipped, cannot be read" in done.stderr
    assert {r["path"] for r in read_summary(dst)} == {*GOOD, *BAD, "linked.png"}
    assert (dst / "linked.png").read_bytes() != b""


def test_any_file_name(tmp_path: Path, weights_dir: Path) -> None:
    """A name that is not UTF-8 (latin-1 bytes) and one of 250 characters, next to the 255-byte limit."""
    latin1 = os.fsdecode(b"latin1_\xe9t\xe9.jpg")
    long = "n" * 246 + ".jpg"
    src = make_src(tmp_path / "src", {latin1: GOOD["nested/b.jpg"], long: GOOD["nested/b.jpg"], "a.png": GOOD["a.png"]})
    dst = tmp_path / "out"
    assert segment(src, dst, "tiny", weights_dir) == 0
    assert (dst / os.fsdecode(b"latin1_\xe9t\xe9.png")).is_file() and (dst / ("n" * 246 + ".png")).is_file()
    raw = (dst / SUMMARY).read_bytes()
    assert b"\nlatin1_\xe9t\xe9.jpg,latin1_\xe9t\xe9.png,200,150," in raw  # the file's own bytes
    assert segment(src, dst, "tiny", weights_dir) == 0  # and a rerun keeps them
    assert len(read_summary_bytes(dst)) == 3


def read_summary_bytes(dst: Path) -> list[dict[str, str]]:
    with open(dst / SUMMARY, newline="", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def test_an_existing_mask_is_never_given_to_another_image_with_its_stem(tmp_path: Path, weights_dir: Path) -> None:
    src = make_src(tmp_path / "src", {"a.jpeg": GOOD["nested/b.jpg"]})
    dst = tmp_path / "out"
    bundle = find_bundle("tiny", weights_dir)
    assert run(str(src), dst, bundle, Settings()).written == 1
    mask = (dst / "a.png").read_bytes()
    (src / "a.bmp").write_bytes(image_bytes(20, 10, fmt="BMP"))  # sorts before a.jpeg
    report = run(str(src), dst, bundle, Settings())
    assert (report.written, report.skipped) == (0, 1)
    assert [(o.path, o.error) for o in report.errors] == [("a.bmp", "a.jpeg has the same mask path a.png")]
    rows = {r["path"]: r for r in read_summary(dst)}
    assert (rows["a.jpeg"]["width"], rows["a.jpeg"]["error"]) == ("200", "")
    assert (dst / "a.png").read_bytes() == mask
    # Its image gone, the mask is made again for the one image left with that stem.
    (src / "a.jpeg").unlink()
    report = run(str(src), dst, bundle, Settings())
    assert (report.written, report.errors) == (1, [])
    assert {r["path"]: r["width"] for r in read_summary(dst)} == {"a.bmp": "20"}


def test_with_ray_a_name_that_is_not_utf8_is_reported_not_the_jobs_end(tmp_path: Path, weights_dir: Path) -> None:
    """Ray Data holds text as UTF-8: such an image is its own error (here the only image, so Ray never starts)."""
    src = make_src(tmp_path / "src", {os.fsdecode(b"\xe9.png"): GOOD["a.png"]})
    report = run(str(src), tmp_path / "out", find_bundle("tiny", weights_dir), Settings(), use_ray=True)
    assert [o.error for o in report.errors] == ["its name is not UTF-8, which --ray cannot pass on; run without --ray"]
