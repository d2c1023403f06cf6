"""Predictions: an image (sent or uploaded before) in, its segmentation mask out."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from app.deps import EngineDep, KeyCheckedRoute, StateDep, StoreDep
from app.errors import InvalidRequest, UnknownUpload
from app.imaging import encode_instances_png, encode_mask_png, encode_overlay_png, instance_summary, mask_summary
from app.routes.bodies import PREDICT_BODY, read_image_or_upload_id
from app.routes.errors import ERRORS
from app.schemas import Prediction
from app.segment import segment_image

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
    "timings_ms": {"decode": 4.1, "queue": 0.2, "model": 31.5, "encode": 0.9},
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
        "Every response carries `Server-Timing` (decode, queue, model, encode) and `X-Model`."
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
    spec = m.card.instances
    if format == "instances" and spec is None:
        raise InvalidRequest(f"model {m.name!r} does not produce instances; format=instances needs one that does")
    sent = await read_image_or_upload_id(request, settings.max_upload_bytes)
    data = sent.data
    if sent.upload_id is not None:  # in the store's threads: a lookup and a read of up to 20 MB block
        data = await state.gate().run(store.read, sent.upload_id)
    if data is None:
        raise UnknownUpload(f"no upload with id {sent.upload_id!r}")
    loop = asyncio.get_running_loop()
    t1 = time.perf_counter()
    # The pipeline `unetseg predict` and `unetseg segment` share. A model that resizes its input needs no
    # more pixels than its input size, unless the full image is drawn in the response (overlay).
    decoded, seg = await segment_image(
        engine,
        m.name,
        data,
        settings.max_pixels,
        state.executor,
        full_image=format == "overlay",
        timeout_s=settings.request_timeout_s,
        disconnected=request.is_disconnected,  # a client that hangs up stops its job
        instances=format in ("json", "instances"),  # no-op for a semantic model
    )
    t2 = time.perf_counter()
    colors = [c.color for c in m.card.classes]
    headers = {"X-Model": m.name, "X-Model-Version": m.card.version}
    # "decode" covers reading, decoding and preparing the model's inputs (resizing or tiling).
    st = seg.timings
    timings = {"decode": t1 - t0 + st["decode"] + st["prepare"], "queue": st["queue"], "model": st["model"]}
    request.state.timings = timings  # the same dict: "encode" is added below
    if format == "json":
        classes = [(c.id, c.name) for c in m.card.classes]
        summary = await loop.run_in_executor(state.executor, mask_summary, seg.mask, classes)
        extra: dict[str, object] = {}
        if spec is not None and seg.instances is not None:
            found = await loop.run_in_executor(state.executor, instance_summary, seg.instances, spec.interior)
            extra = {"count": len(found), "instances": found}
        timings["encode"] = time.perf_counter() - t2
        body = Prediction.model_validate(
            {
                "model": m.name,
                "version": m.card.version,
                "width": decoded.width,
                "height": decoded.height,
                "classes": summary,
                **extra,
                "timings_ms": {k: round(v * 1000, 3) for k, v in timings.items()},
            }
        )
        headers["Server-Timing"] = server_timing(timings)
        # count and instances are left out, not null, for a semantic model
        return JSONResponse(body.model_dump(mode="json", exclude_unset=True), headers=headers)
    if format == "instances":
        assert seg.instances is not None
        png, count = await loop.run_in_executor(
            state.executor, encode_instances_png, seg.instances, settings.png_compress_level
        )
        timings["encode"] = time.perf_counter() - t2
        headers["Server-Timing"] = server_timing(timings)
        headers["X-Instance-Count"] = str(count)
        return Response(png, media_type="image/png", headers=headers)
    if format == "overlay":
        png = await loop.run_in_executor(
            state.executor, encode_overlay_png, decoded.rgb, seg.mask, colors, alpha, settings.png_compress_level
        )
    else:
        png = await loop.run_in_executor(state.executor, encode_mask_png, seg.mask, colors, settings.png_compress_level)
    timings["encode"] = time.perf_counter() - t2
    headers["Server-Timing"] = server_timing(timings)
    return Response(png, media_type="image/png", headers=headers)
