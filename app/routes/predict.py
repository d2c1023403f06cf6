"""Predictions: an image (sent or uploaded before) in, its segmentation mask out."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app import pipeline
from app.deps import EngineDep, KeyCheckedRoute, StateDep, StoreDep
from app.errors import InvalidRequest, UnknownUpload
from app.pipeline import Ask
from app.routes.bodies import PREDICT_BODY, read_image_or_upload_id
from app.routes.errors import ERRORS
from app.schemas import Prediction

router = APIRouter(tags=["predict"], route_class=KeyCheckedRoute)

PNG_BINARY = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": "format=png and overlay: an 8-bit palette or RGB PNG. format=instances: a 16-bit grayscale "
        "PNG (0 = background, 1..N the instance ids).",
    }
}
PREDICTION_EXAMPLE = {
    "model": "polyp",
    "version": "1.0.0",
    "width": 4,
    "height": 3,
    "classes": [
        {
            "id": 0,
            "name": "background",
            "pixels": 10,
            "fraction": 0.8333,
            "bbox": [0, 0, 4, 3],
            "rle": {"size": [3, 4], "counts": [0, 4, 1, 2, 1, 4]},
        },
        {
            "id": 1,
            "name": "polyp",
            "pixels": 2,
            "fraction": 0.1667,
            "bbox": [1, 1, 2, 1],
            "rle": {"size": [3, 4], "counts": [4, 1, 2, 1, 4]},
        },
    ],
    "timings_ms": {"decode": 4.1, "queue": 0.2, "model": 31.5, "post": 0.3, "encode": 0.9},
}


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timings.items())


@router.post(
    "/predict",
    summary="Segment an image",
    description=(
        "Send the image as the multipart field `file` or as the body itself (`Content-Type: image/*` or "
        "`application/octet-stream`), or the id of an earlier upload as the form field `upload_id` (not both; an "
        "empty field counts as absent).\n\n"
        "- `format=png` (default): a palette PNG at the image's displayed size whose pixel values are class ids "
        "and whose palette holds the class colors: viewable and machine-readable.\n"
        "- `format=overlay`: the image with the non-background classes blended over it at opacity `alpha`.\n"
        "- `format=json`: per class its pixel count, fraction, bounding box and COCO-style RLE; for a model with "
        "instances also `count` and `instances` (per instance: id, class_id, area, bbox, centroid, RLE).\n"
        "- `format=instances` (models with instances, see `GET /v1/models/{name}`; 422 otherwise): a 16-bit "
        "grayscale PNG at the image's displayed size whose pixel values are instance ids (0 = background, 1..N), "
        "with `X-Instance-Count: N`; 422 when N > 65535.\n\n"
        "Every response carries `Server-Timing` (decode, queue, model, post, encode) and `X-Model`."
    ),
    response_class=Response,
    openapi_extra={"requestBody": PREDICT_BODY},
    responses={
        200: {
            "description": "The mask.",
            "model": Prediction,  # the application/json schema, with the models it refers to
            "content": {"image/png": PNG_BINARY, "application/json": {"example": PREDICTION_EXAMPLE}},
            "headers": {
                "X-Instance-Count": {
                    "description": "format=instances: the number of instances N (the PNG's largest id).",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
        },
        **{k: ERRORS[k] for k in (400, 401, 404, 413, 415, 422, 503, 504)},
    },
)
async def predict(
    request: Request,
    state: StateDep,
    engine: EngineDep,
    store: StoreDep,
    model: Annotated[
        str | None, Query(description="Model name; the default model when omitted.", examples=["polyp"])
    ] = None,
    format: Annotated[
        Literal["png", "overlay", "json", "instances"],
        Query(description="Response format (instances: models with instances only).", examples=["json"]),
    ] = "png",
    alpha: Annotated[float, Query(ge=0, le=1, description="Mask opacity for format=overlay.", examples=[0.5])] = 0.5,
) -> Response:
    settings = state.settings
    t0 = time.perf_counter()
    m = engine.get(model)  # 404 for an unknown model before any work is done
    request.state.model = m.name  # for the access log and metrics
    if format == "instances" and m.card.instances is None:
        raise InvalidRequest(f"model {m.name!r} does not produce instances; format=instances needs one that does")
    sent = await read_image_or_upload_id(request, settings.max_upload_bytes)
    data = sent.data
    if sent.upload_id is not None:  # in the store's threads: a lookup and a read of up to 20 MB block
        data = await state.gate().run(store.read, sent.upload_id)
    if data is None:
        raise UnknownUpload(f"no upload with id {sent.upload_id!r}")
    ask = Ask(m.name, format, alpha, settings.png_compress_level)
    request.state.timings = timings = {}  # filled below, read by the access log
    answer = await pipeline.predict(
        engine,
        ask,
        data,
        settings.max_pixels,
        state.executor,
        timeout_s=settings.request_timeout_s,
        disconnected=request.is_disconnected,  # a client that hangs up stops its job
        started=t0,  # reading the body counts as decoding
    )
    timings.update(answer.timings)
    headers = {"X-Model": answer.model, "X-Model-Version": answer.version, "Server-Timing": server_timing(timings)}
    if format == "instances":
        headers["X-Instance-Count"] = str(answer.instances)
    return Response(answer.body, media_type=answer.media_type, headers=headers)
