"""format=instances and the JSON's instances, for tiny models whose cards have ``instances``."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage.segmentation import relabel_sequential

from app.errors import InvalidRequest
from app.imaging import encode_instances_png, instance_rles, rle_decode, rle_encode
from app.main import create_app
from model.bundle import InstanceSpec
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes, write_instance_bundle, write_tiny_bundle

PNG = "image/png"
WATERSHED = InstanceSpec("watershed", interior=1, boundary=2, min_area=0)
COMPONENTS = InstanceSpec("components", interior=1)


@pytest.fixture(scope="module")
def instance_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("instances")
    root = tmp / "weights"
    write_tiny_bundle(root / "tiny", name="tiny")
    write_instance_bundle(root / "cells", WATERSHED, name="cells", classes=3)  # resize sizing
    write_instance_bundle(root / "cellt", WATERSHED, seed=3, name="cellt", classes=3, channels=1, sizing="tile")
    write_instance_bundle(root / "blobs", COMPONENTS, seed=2, name="blobs", sizing="tile")  # binary
    with TestClient(create_app(make_settings(tmp, root))) as c:
        wait_ready(c)
        yield c


def predict(c: TestClient, model: str, fmt: str, data: bytes) -> tuple[int, bytes, dict[str, str]]:
    r = c.post(f"/v1/predict?model={model}&format={fmt}", files={"file": ("a.png", data, PNG)})
    return r.status_code, r.content, dict(r.headers)


@pytest.mark.parametrize(("model", "spec"), [("cells", WATERSHED), ("cellt", WATERSHED), ("blobs", COMPONENTS)])
def test_instances_png_json_and_mask_agree(instance_client: TestClient, model: str, spec: InstanceSpec) -> None:
    data = image_bytes(71, 53, seed=5)
    status, body, headers = predict(instance_client, model, "instances", data)
    assert status == 200, body
    assert headers["content-type"] == PNG
    im = Image.open(io.BytesIO(body))
    assert im.mode == "I;16" and im.size == (71, 53)
    ids = np.asarray(im).astype(np.int64)
    n = int(headers["x-instance-count"])
    assert n >= 1 and ids.max() == n
    assert set(np.unique(ids)) == set(range(n + 1))  # ids 1..N, each used

    # The instances partition the semantic mask's foreground (png stays semantic).
    status, body, _ = predict(instance_client, model, "png", data)
    mask = np.asarray(Image.open(io.BytesIO(body)))
    fg = (mask == spec.interior) | (mask == spec.boundary) if spec.boundary is not None else mask == spec.interior
    np.testing.assert_array_equal(ids > 0, fg)

    r = instance_client.post(f"/v1/predict?model={model}&format=json", files={"file": ("a.png", data, PNG)})
    assert r.status_code == 200
    j = r.json()
    assert j["count"] == n and [i["id"] for i in j["instances"]] == list(range(1, n + 1))
    for inst in j["instances"]:
        binary = ids == inst["id"]
        np.testing.assert_array_equal(rle_decode(inst["rle"]), binary)
        assert inst["class_id"] == spec.interior
        assert inst["area"] == int(binary.sum())
        ys, xs = np.nonzero(binary)
        assert inst["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert inst["centroid"] == pytest.approx([xs.mean(), ys.mean()], abs=0.0051)


def test_a_semantic_model_refuses_format_instances_and_has_no_instances_in_json(instance_client: TestClient) -> None:
    status, body, _ = predict(instance_client, "tiny", "instances", image_bytes())
    assert status == 422 and b"does not produce instances" in body
    r = instance_client.post("/v1/predict?model=tiny&format=json", files={"file": ("a.png", image_bytes(), PNG)})
    assert r.status_code == 200
    assert "count" not in r.json() and "instances" not in r.json()


def test_the_model_card_says_whether_a_model_has_instances(instance_client: TestClient) -> None:
    assert instance_client.get("/v1/models/cells").json()["instances"] == WATERSHED.to_dict() | {"boundary": 2}
    assert instance_client.get("/v1/models/blobs").json()["instances"] == {
        "method": "components",
        "interior": 1,
        "boundary": None,
        "min_area": 0,
    }
    assert instance_client.get("/v1/models/tiny").json()["instances"] is None


def test_the_16_bit_png_holds_65535_instances_and_refuses_more() -> None:
    ids = np.zeros((2, 3), dtype=np.int32)
    ids[0, 0], ids[1, 2] = 1, 65535
    png, n = encode_instances_png(ids)
    assert n == 65535
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), ids)
    ids[0, 1] = 65536
    with pytest.raises(InvalidRequest, match="65536 instances"):
        encode_instances_png(ids)


def test_instance_rles_match_one_mask_at_a_time() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        ids = relabel_sequential(rng.integers(0, 6, (h, w)))[0]
        rles = instance_rles(ids)
        assert len(rles) == ids.max()
        for i, rle in enumerate(rles, start=1):
            assert rle == rle_encode(ids == i)
