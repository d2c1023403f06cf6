"""Request bodies that carry an image, read the same way by ``POST /v1/uploads`` and ``POST /v1/predict``.

The image comes either in a form, as the file field ``file`` (multipart, as browsers, docs pages and
``curl -F file=@frame.jpg`` send it), or as the body itself with ``Content-Type: image/*`` or
``application/octet-stream`` (``curl --data-binary @frame.jpg -H 'Content-Type: image/jpeg'``). Predict's
forms may name an earlier upload as ``upload_id`` instead. Either way the same limits hold: the body limit
while the body streams in (``BodyLimitMiddleware``), then the exact per-image byte limit here, then the
pixel limit on the header before decoding. An empty form field counts as absent: docs pages send the fields
a person left blank.

The routes parse their bodies here rather than through FastAPI's form parameters, which cannot take a raw
body; the OpenAPI request bodies below document what is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from app.errors import ImageTooLarge, InvalidRequest, UnsupportedBody

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
RAW_TYPES = ("image/*", "application/octet-stream")  # image/* is any image/... type
RAW_HINT = "or the image itself as the body with Content-Type image/* or application/octet-stream"


@dataclass(frozen=True)
class Sent:
    """What a request sent: an image's bytes, or (predict only) the id of an earlier upload."""

    data: bytes | None = None
    upload_id: str | None = None


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower case ('' when there is none)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_raw(media: str) -> bool:
    return media == "application/octet-stream" or (media.startswith("image/") and len(media) > len("image/"))


async def read_image(request: Request, limit: int) -> bytes:
    """The image a request sent, as the form field ``file`` or as the body (see ``read_image_or_upload_id``)."""
    sent = await read_image_or_upload_id(request, limit, allow_upload_id=False)
    assert sent.data is not None  # without upload ids, a request that sent none is refused
    return sent.data


async def read_image_or_upload_id(request: Request, limit: int, *, allow_upload_id: bool = True) -> Sent:
    """Read the image (or the upload id) a request sent, whichever way it sent it.

    413 past ``limit`` bytes (raw bodies are cut off at the first chunk past it); 415 for a body of
    another type; 422 when the image is missing, doubled, not a file, or comes with an upload id.
    """
    media = media_type(request)
    if media in FORM_TYPES:
        return await _read_form(request, limit, allow_upload_id)
    if is_raw(media):
        return Sent(data=await _read_raw(request, limit))
    hint = _missing(allow_upload_id)
    if not media:
        # No Content-Type: nothing sent is a missing image, anything else a body of no known type.
        async for chunk in request.stream():
            if chunk:
                raise UnsupportedBody(f"the request has a body but no Content-Type. {hint}")
        raise InvalidRequest(hint)
    raise UnsupportedBody(f"a body of type {media!r} is not read. {hint}")


def _missing(allow_upload_id: bool) -> str:
    alternative = " (or the id of an earlier upload as 'upload_id')" if allow_upload_id else ""
    return f"Send the image as the multipart field 'file'{alternative}, {RAW_HINT}."


async def _read_raw(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"the image is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:  # stop reading: the rest of the body is never taken in
            raise ImageTooLarge(f"the image is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request: Request, limit: int, allow_upload_id: bool) -> Sent:
    # Starlette's default form limits: 1000 fields, 1000 files, 1 MiB per field other than files (400 past them).
    async with request.form() as form:
        files = _present(form, "file")
        ids = _present(form, "upload_id") if allow_upload_id else []
        if len(files) > 1:
            raise InvalidRequest("send one image in the 'file' field, not several")
        if len(ids) > 1:
            raise InvalidRequest("send one 'upload_id', not several")
        if files and ids:
            raise InvalidRequest("send either 'file' or 'upload_id', not both")
        if ids:
            value = ids[0]
            if not isinstance(value, str):
                raise InvalidRequest("'upload_id' must be a plain form field, not a file")
            return Sent(upload_id=value)
        if not files:
            raise InvalidRequest(_missing(allow_upload_id))
        file = files[0]
        if not isinstance(file, UploadFile):
            raise InvalidRequest("'file' must be a file (a form part with a filename), not a text field")
        # The body limit already bounds what was received; this is the exact per-image limit.
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLarge(f"the file is over the limit of {limit} bytes")
        return Sent(data=data)


def _present(form: FormData, name: str) -> list[UploadFile | str]:
    """The values of ``name`` that carry something: an empty text field or an empty, unnamed file part
    (what a form sends for a field left blank) counts as absent."""
    values: list[UploadFile | str] = []
    for value in form.getlist(name):
        if isinstance(value, str):
            if value:
                values.append(value)
        elif value.filename or (value.size or 0) > 0:
            values.append(value)
    return values


# --- as the OpenAPI document describes them ------------------------------------------------------------------

BINARY: dict[str, Any] = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
RAW_CONTENT: dict[str, Any] = {media: {"schema": BINARY} for media in RAW_TYPES}
FILE_FIELD: dict[str, Any] = {**BINARY, "description": "The image: PNG, JPEG, WebP, BMP, TIFF or GIF."}
UPLOAD_ID_FIELD: dict[str, Any] = {
    "type": "string",
    "description": "The id of an earlier upload (`POST /v1/uploads`), instead of a file.",
    "examples": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
}

UPLOAD_BODY: dict[str, Any] = {
    # The body is needed (422 without one), but openapi-python-client (0.29) writes a client that does not
    # import for a required body with several content types and nothing else optional (its issue 1451).
    "required": False,
    "description": "The image, as the multipart field `file` or as the body itself (needed: 422 without it).",
    "content": {
        "multipart/form-data": {
            "schema": {
                "title": "UploadForm",
                "type": "object",
                "properties": {"file": FILE_FIELD},
                "required": ["file"],
            },
            "encoding": {"file": {"contentType": "image/*, application/octet-stream"}},
        },
        **RAW_CONTENT,
    },
}


def image_body(name: str) -> dict[str, Any]:
    """The request body of an operation that takes what predict takes; ``name`` prefixes its schemas' titles
    (a title is a model name in generated clients, and two operations must not share one)."""
    return {
        "required": True,
        "description": "The image, as the multipart field `file` or as the body itself; or the id of an earlier "
        "upload as the form field `upload_id`. Send one of `file` and `upload_id`: an empty field counts as absent.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": f"{name}Form",
                    "type": "object",
                    "description": "`file` or `upload_id`, not both.",
                    # The example is empty: docs pages fill the field with it, and a file then goes alone.
                    "properties": {"file": FILE_FIELD, "upload_id": {**UPLOAD_ID_FIELD, "examples": [""]}},
                },
                "encoding": {"file": {"contentType": "image/*, application/octet-stream"}},
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "title": f"{name}ByUpload",
                    "type": "object",
                    "properties": {"upload_id": UPLOAD_ID_FIELD},
                    "required": ["upload_id"],
                }
            },
            **RAW_CONTENT,
        },
    }


PREDICT_BODY = image_body("Predict")
