"""Response bodies, as the OpenAPI document shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class StoreStatus(BaseModel):
    status: Literal["ok", "unreachable"] = Field(examples=["ok"])
    detail: str | None = Field(None, description="Why the store is unreachable, when it is.")
    since: datetime = Field(description="When the store last became reachable or unreachable.")


class Status(BaseModel):
    status: str = Field(examples=["ok"])
    detail: str | None = Field(None, description="Why the service is not ready, when it is not.")
    store: StoreStatus | None = Field(
        None,
        description="/readyz: whether the upload store (its database and blobs) answers. An unreachable store "
        "leaves the service ready: predictions on images sent work; uploads and predictions by upload id get 503.",
    )


class ErrorBody(BaseModel):
    detail: str = Field(examples=["the file is not an image in a supported format (PNG, JPEG, WebP, BMP, TIFF or GIF)"])
    request_id: str = Field(
        description="The request's id, as in the X-Request-ID response header: quote it when reporting a problem.",
        examples=["3f2a9c0d5e6b4a718f0e2d1c4b5a6978"],
    )


class ClassOut(BaseModel):
    id: int = Field(examples=[1])
    name: str = Field(examples=["polyp"])
    color: tuple[int, int, int] = Field(examples=[(255, 59, 48)], description="RGB, as in the mask PNG's palette.")


class InputPolicyOut(BaseModel):
    channels: int = Field(examples=[3])
    sizing: Literal["resize", "tile"] = Field(
        description="resize: the whole image is resized to size x size; tile: native scale, size x size tiles."
    )
    size: int = Field(examples=[224])
    overlap: float = Field(examples=[0.25], description="Tile overlap (tile sizing).")
    mean: list[float]
    std: list[float]


class DatasetOut(BaseModel):
    name: str
    url: str
    license: str
    citation: str


class InstancesOut(BaseModel):
    """How the model's class map becomes instances (its card's ``instances``)."""

    method: Literal["watershed", "components"] = Field(
        description="watershed: the interior class's components are markers flooding interior and boundary; "
        "components: each connected component of the interior class is an instance."
    )
    interior: int = Field(examples=[1], description="The object class: every instance's class_id.")
    boundary: int | None = Field(examples=[2], description="The boundary class (watershed), or null.")
    min_area: int = Field(examples=[0], description="Instances smaller than this (pixels) are dropped.")


class ModelOut(BaseModel):
    name: str = Field(examples=["polyp"])
    version: str = Field(examples=["1.0.0"])
    description: str
    default: bool
    device: str = Field(examples=["cpu"])
    precision: str = Field(examples=["bfloat16"])
    graph: str = Field(
        examples=["script"],
        description="How its forward pass runs: script (a frozen TorchScript graph), eager or compiled.",
    )
    max_batch: int = Field(
        examples=[16],
        description="Most inputs (images or tiles) per forward pass: measured at warm-up unless UNETSEG_MAX_BATCH "
        "sets it.",
    )
    classes: list[ClassOut]
    input: InputPolicyOut
    metrics: dict[str, float] = Field(examples=[{"val_dice": 0.81, "val_iou": 0.72}])
    dataset: DatasetOut
    architecture: dict[str, int | str | bool]
    instances: InstancesOut | None = Field(
        description="How the model separates objects, when it does (format=instances and the JSON's "
        "instances); null for a semantic model."
    )


class ModelList(BaseModel):
    default_model: str = Field(examples=["polyp"])
    models: list[ModelOut]


class UploadOut(BaseModel):
    id: str = Field(
        description="SHA-256 of the file's bytes.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    width: int = Field(examples=[622], description="Width as displayed (EXIF orientation applied).")
    height: int = Field(examples=[529])
    format: str = Field(examples=["jpeg"])
    bytes: int = Field(examples=[48211])
    created_at: datetime


class UploadList(BaseModel):
    items: list[UploadOut]
    count: int = Field(description="Uploads stored.", examples=[12])
    total_bytes: int = Field(description="Bytes stored.", examples=[734512])
    max_bytes: int = Field(
        description="Quota in bytes; the oldest uploads are evicted first (0 = no quota).", examples=[1073741824]
    )
    retention_s: float = Field(description="Uploads older than this are evicted (0 = kept forever).", examples=[0])


class RLE(BaseModel):
    size: tuple[int, int] = Field(description="[height, width]")
    counts: list[int] = Field(description="COCO-style uncompressed RLE: column-major runs, starting with zeros.")


class ClassArea(BaseModel):
    id: int
    name: str
    pixels: int
    fraction: float
    bbox: tuple[int, int, int, int] | None = Field(description="[x, y, width, height], or null when absent.")
    rle: RLE


class Instance(BaseModel):
    id: int = Field(examples=[1], description="Its pixel value in the format=instances PNG (1..N).")
    class_id: int = Field(
        examples=[1], description="The model's object class (its card's instances.interior); boundary pixels count."
    )
    area: int = Field(examples=[412], description="Pixels.")
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height]")
    centroid: tuple[float, float] = Field(description="[x, y]: the mean of its pixels' indices, to 0.01.")
    rle: RLE


class Prediction(BaseModel):
    model: str = Field(examples=["polyp"])
    version: str = Field(examples=["1.0.0"])
    width: int
    height: int
    classes: list[ClassArea]
    count: int | None = Field(None, description="Instances found (models with instances only; absent otherwise).")
    instances: list[Instance] | None = Field(
        None, description="Each instance, in id order (models with instances only; absent otherwise)."
    )
    timings_ms: dict[str, float] = Field(
        examples=[{"decode": 4.1, "queue": 0.2, "model": 31.5, "post": 0.3, "encode": 0.9}]
    )
