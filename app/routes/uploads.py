"""Uploads: images stored by content (SHA-256) so they can be predicted on again without resending."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from app.deps import KeyCheckedRoute, StateDep, StoreDep
from app.errors import UnknownUpload
from app.imaging import decode
from app.routes.bodies import UPLOAD_BODY, read_image
from app.routes.errors import ERRORS
from app.schemas import UploadList, UploadOut
from app.store import Upload

router = APIRouter(tags=["uploads"], route_class=KeyCheckedRoute)

SQLITE_MAX_INT = 2**63 - 1  # larger integers cannot be bound to an SQLite query
UploadId = Annotated[
    str,
    Path(
        description="The upload's id: the SHA-256 of its bytes, as returned by `POST /v1/uploads`.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    ),
]


def to_out(u: Upload) -> UploadOut:
    return UploadOut(id=u.id, width=u.width, height=u.height, format=u.format, bytes=u.bytes, created_at=u.created_at)


@router.post(
    "/uploads",
    summary="Upload an image",
    status_code=201,
    response_model=UploadOut,
    description="Store an image for later predictions. The id is the SHA-256 of the bytes: uploading the same "
    "file again answers 200 with the existing upload instead of 201. The image is fully decoded first, so "
    "only valid images are stored.\n\n"
    "Send the image as the multipart field `file`, or as the body itself with `Content-Type: image/*` or "
    "`application/octet-stream`.",
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        200: {"model": UploadOut, "description": "The same bytes were already stored."},
        **{k: ERRORS[k] for k in (400, 401, 413, 415, 422, 503)},
    },
)
async def create_upload(
    request: Request,
    state: StateDep,
    store: StoreDep,
) -> JSONResponse:
    data = await read_image(request, state.settings.max_upload_bytes)
    loop = asyncio.get_running_loop()
    decoded = await loop.run_in_executor(state.executor, decode, data, state.settings.max_pixels)
    upload, created = await state.gate().run(store.put, data, decoded.width, decoded.height, decoded.format)
    body = to_out(upload).model_dump(mode="json")
    return JSONResponse(body, status_code=201 if created else 200, headers={"Location": f"/v1/uploads/{upload.id}"})


@router.get(
    "/uploads",
    summary="List uploads",
    response_model=UploadList,
    description="Newest first, with the store's totals, quota and retention.",
    responses={k: ERRORS[k] for k in (401, 503)},
)
async def list_uploads(
    state: StateDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most uploads to list.", examples=[100])] = 100,
    offset: Annotated[int, Query(ge=0, le=SQLITE_MAX_INT, description="Uploads to skip.", examples=[0])] = 0,
) -> UploadList:
    stats, recent = await state.gate().run(lambda: (store.stats(), store.recent(limit, offset)))
    return UploadList(
        items=[to_out(u) for u in recent],
        count=stats.count,
        total_bytes=stats.bytes,
        max_bytes=stats.max_bytes,
        retention_s=stats.retention_s,
    )


@router.get(
    "/uploads/{upload_id}",
    summary="Describe an upload",
    description="The stored upload's metadata. Unknown and malformed ids are 404.",
    response_model=UploadOut,
    responses={k: ERRORS[k] for k in (401, 404, 503)},
)
async def get_upload(upload_id: UploadId, state: StateDep, store: StoreDep) -> UploadOut:
    upload = await state.gate().run(store.describe, upload_id)
    if upload is None:
        raise UnknownUpload(f"no upload with id {upload_id!r}")
    return to_out(upload)


@router.delete(
    "/uploads/{upload_id}",
    summary="Delete an upload",
    description="Remove the upload's file and its metadata. Unknown and malformed ids are 404.",
    status_code=204,
    responses={k: ERRORS[k] for k in (401, 404, 503)},
)
async def delete_upload(upload_id: UploadId, state: StateDep, store: StoreDep) -> Response:
    if not await state.gate().run(store.delete, upload_id):
        raise UnknownUpload(f"no upload with id {upload_id!r}")
    return Response(status_code=204)
