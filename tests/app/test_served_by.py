"""``X-Served-By``: every response names the process that answered (``hostname:pid``)."""

from __future__ import annotations

import os
import socket

from fastapi.testclient import TestClient

from tests.helpers import image_bytes


def test_every_response_names_the_process_that_answered(client: TestClient) -> None:
    expected = f"{socket.gethostname()}:{os.getpid()}"
    responses = [
        client.get("/healthz"),
        client.get("/readyz"),
        client.get("/v1/models"),
        client.get("/v1/models/nope"),  # 404, an error body amended by the middleware
        client.post("/v1/predict", files={"file": ("a.png", image_bytes(), "image/png")}),
        client.post("/v1/predict", files={"file": ("a.txt", b"not an image", "text/plain")}),  # 415
        client.get("/metrics"),
    ]
    assert [r.headers.get("X-Served-By") for r in responses] == [expected] * len(responses)
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 200, 415, 200]
