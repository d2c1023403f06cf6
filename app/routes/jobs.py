"""Jobs: an image or a whole slide segmented in the background, polled for progress, its results fetched.

``POST /v1/jobs`` takes what ``POST /v1/predict`` takes (the multipart field ``file``, an ``upload_id``, or
the image itself as the body) and answers 202 at once, with ``Location: /v1/jobs/{id}``. The body is
streamed to the job's folder in the store as it arrives (a raw body straight; a multipart file through the
parser's spooled temporary file), up to ``UNETSEG_MAX_JOB_BYTES``, then checked (a TIFF is opened and its
levels read; any other image only has its header read) before the job is queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from app.deps import EngineDep, KeyCheckedRoute, StateDep, StoreDep
from app.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobNotFinished,
    NotReady,
    UnknownJob,
    UnknownUpload,
    UnsupportedBody,
)
from app.jobs import engine as adapter
from app.jobs.pipeline import INPUT, SLIDE_RESULTS
from app.jobs.runner import JobService, result_files
from app.jobs.slide import Slide, is_tiff
from app.jobs.store import ACTIVE, Job, new_job_id
from app.routes.bodies import FORM_TYPES, _missing, _present, image_body, is_raw, media_type
from app.routes.errors import ERRORS, RETRY_AFTER, _error
from app.store import UploadStore
from model.card import SlideSpec
from model.fsync import fsync_path

router = APIRouter(tags=["jobs"], route_class=KeyCheckedRoute)

JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: _error("Unknown model, upload or job, or a result the job does not have.", "no job with id 'abc'"),
    409: _error(
        "The job is not done: queued or running (see Retry-After), failed or cancelled.",
        "job 5f0c8e3b2a4d4e6f9a1b7c2d3e4f5a6b is running",
        headers=RETRY_AFTER,
    ),
    413: _error(
        "The body is over UNETSEG_MAX_JOB_BYTES, an image over UNETSEG_MAX_PIXELS, or a slide's level over "
        "UNETSEG_MAX_JOB_PIXELS.",
        "level 0 is 120000x90000 = 10800000000 pixels; the jobs' limit is 10000000000 (UNETSEG_MAX_JOB_PIXELS)",
    ),
    503: _error(
        "Models still loading, or UNETSEG_MAX_JOBS jobs queued or running already (see Retry-After).",
        "100 jobs are queued or running, the most the service takes; retry later",
        headers=RETRY_AFTER,
    ),
}

JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
CHUNK = 4 * 1024 * 1024  # bytes written to the store at a time
JobId = Annotated[
    str,
    PathParam(
        description="The job's id, as `POST /v1/jobs` returned it.", examples=["5f0c8e3b2a4d4e6f9a1b7c2d3e4f5a6b"]
    ),
]
Format = Literal["auto", "png", "overlay", "json", "instances", "slide"]
ResultFormat = Literal["png", "overlay", "json", "instances", "tiff", "csv", "geojson"]


class Progress(BaseModel):
    stage: str = Field("queued", description="queued, segmenting, writing (a slide's outputs) or done.")
    tiles_done: int = Field(0, description="Model inputs (tiles) segmented.")
    tiles_total: int = Field(0, description="Model inputs the job has (0 until it starts).")
    regions_done: int = Field(0, description="Slide regions done (a slide job).")
    regions_total: int = Field(0, description="Slide regions (a slide job).")
    fraction: float = Field(0.0, description="tiles_done / tiles_total (1 when done).")


class ResultOut(BaseModel):
    bytes: int
    media_type: str
    url: str = Field(description="Where to get it.")


class JobOut(BaseModel):
    id: str = Field(examples=["5f0c8e3b2a4d4e6f9a1b7c2d3e4f5a6b"])
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    kind: Literal["image", "slide"] = Field(
        description="image: the predict pipeline on the whole image; slide: a TIFF segmented region by region."
    )
    model: str
    format: str = Field(description="The format asked for: png, overlay, json or instances (image), slide.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="Starts so far: more than 1 when the job was resumed after a replica died.")
    progress: Progress
    input: dict[str, Any] = Field(description="bytes, sha256 and, for a slide, its levels and the level used.")
    results: dict[str, ResultOut] = Field(description="A finished job's results by format.")
    info: dict[str, Any] = Field(
        description="Once done: size, level, per-class areas and instance count (slide), timings, regions resumed."
    )
    error: str | None = Field(description="Why the job failed (or that it was cancelled).")


class JobList(BaseModel):
    items: list[JobOut]
    counts: dict[str, int] = Field(description="Jobs per state, in the whole store.")
    limits: dict[str, int | float] = Field(
        description="max_job_bytes, max_job_pixels, max_jobs, and predict's max_upload_bytes and max_pixels."
    )


def get_jobs(request: Request) -> JobService:
    service: JobService | None = getattr(request.app.state, "jobs", None)
    if service is None:
        raise NotReady("the job store is not open")
    return service


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_out(job: Job) -> JobOut:
    p = job.progress
    total = int(p.get("tiles_total", 0))
    done = int(p.get("tiles_done", 0))
    fraction = 1.0 if job.state == "done" else (round(done / total, 4) if total else 0.0)
    stage = p.get("stage", "queued") if job.state in ACTIVE else ("done" if job.state == "done" else job.state)
    return JobOut(
        id=job.id,
        state=job.state,
        kind=job.kind,
        model=job.model,
        format=job.format,
        created_at=datetime.fromtimestamp(job.created_at, UTC),
        started_at=_time(job.info.get("started_at")),
        finished_at=_time(job.finished_at),
        attempts=job.attempts,
        progress=Progress(
            stage=stage,
            tiles_done=done,
            tiles_total=total,
            regions_done=int(p.get("regions_done", 0)),
            regions_total=int(p.get("regions_total", 0)),
            fraction=fraction,
        ),
        input=job.input,
        results={
            fmt: ResultOut(bytes=r["bytes"], media_type=r["media_type"], url=f"/v1/jobs/{job.id}/result?format={fmt}")
            for fmt, r in job.results.items()
        },
        info={k: v for k, v in job.info.items() if k not in ("started_at", "interrupted")},
        error=job.error,
    )


async def _find(service: JobService, job_id: str) -> Job:
    job = await service.call(service.store.get, job_id) if JOB_ID_RE.fullmatch(job_id) else None
    if job is None:
        raise UnknownJob(f"no job with id {job_id!r}")
    return job


class _Sink:
    """The body, written to the job's input file a few MB at a time (in the jobs' threads), hashed as it goes."""

    def __init__(self, service: JobService, path: Path, limit: int) -> None:
        self.service, self.path, self.limit = service, path, limit
        self.file = open(path, "xb")  # noqa: SIM115 - closed in close()
        self.hash = hashlib.sha256()
        self.size = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    async def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:  # stop reading: the rest of the body is never taken in
            raise ImageTooLarge(f"the body is over the jobs' limit of {self.limit} bytes (UNETSEG_MAX_JOB_BYTES)")
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_bytes = [], 0
            await self.service.call(self._write, data)

    async def close(self) -> None:
        await self.flush()
        await self.service.call(self._finish)

    def _finish(self) -> None:
        """The body made durable (its bytes and its name) before a job's row can name it."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        fsync_path(self.path.parent)

    def abort(self) -> None:
        self.file.close()


async def _receive(request: Request, service: JobService, uploads: UploadStore, target: Path, limit: int) -> _Sink:
    """Stream the job's image to ``target``: a raw body, a multipart ``file``, or a stored upload's bytes."""
    sink = _Sink(service, target, limit)
    try:
        media = media_type(request)
        if is_raw(media):
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ImageTooLarge(f"the body is over the jobs' limit of {limit} bytes (UNETSEG_MAX_JOB_BYTES)")
            async for chunk in request.stream():
                await sink.add(chunk)
        elif media in FORM_TYPES:
            async with request.form() as form:
                files, ids = _present(form, "file"), _present(form, "upload_id")
                if len(files) + len(ids) != 1:
                    raise InvalidRequest("send one image as 'file', or one 'upload_id', not both or several")
                if ids:
                    uid = ids[0]
                    if not isinstance(uid, str):
                        raise InvalidRequest("'upload_id' must be a plain form field, not a file")
                    data = await service.call(uploads.read, uid)
                    if data is None:
                        raise UnknownUpload(f"no upload with id {uid!r}")
                    await sink.add(data)
                else:
                    file = files[0]
                    if not isinstance(file, UploadFile):
                        raise InvalidRequest("'file' must be a file (a form part with a filename), not a text field")
                    while chunk := await file.read(CHUNK):
                        await sink.add(chunk)
        elif not media:
            raise InvalidRequest(_missing(True))
        else:
            raise UnsupportedBody(f"a body of type {media!r} is not read. {_missing(True)}")
        await sink.close()
    except BaseException:
        sink.abort()
        raise
    if sink.size == 0:
        raise InvalidRequest("the image is empty")
    return sink


def _probe(
    path: Path, fmt: str, level: int | None, spec: SlideSpec | None, max_pixels: int, max_job_pixels: int
) -> tuple[str, str, dict[str, Any]]:
    """(kind, format, input info) of a received body; 415 for what is not an image, 413 over the limits."""
    with open(path, "rb") as f:
        head = f.read(8)
    if is_tiff(head) and fmt in ("auto", "slide"):
        with Slide(path) as slide:
            levels = slide.levels
            chosen = slide.pick_level(level, spec.mpp if spec else None, spec.level if spec else None)
        base = levels[0]
        if fmt == "auto":
            fmt = "slide" if len(levels) > 1 or base.width * base.height > max_pixels else "png"
        if fmt == "slide":
            pixels = chosen.width * chosen.height
            if pixels > max_job_pixels:
                raise ImageTooLarge(
                    f"level {chosen.index} is {chosen.width}x{chosen.height} = {pixels} pixels; the jobs' limit is "
                    f"{max_job_pixels} (UNETSEG_MAX_JOB_PIXELS): ask for a coarser level"
                )
            info = {
                "format": "tiff",
                "width": base.width,
                "height": base.height,
                "levels": [{"width": lv.width, "height": lv.height, "mpp": lv.mpp} for lv in levels],
                "level": chosen.index,
            }
            return "slide", fmt, info
    if fmt == "slide":
        raise InvalidImage("format=slide takes a TIFF (tiled or striped, pyramidal or not)")
    if fmt == "auto":
        fmt = "png"
    try:
        with Image.open(path) as im:
            width, height, kind = im.width, im.height, (im.format or "").lower()
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidImage(
            "the file is not an image in a supported format (PNG, JPEG, WebP, BMP, TIFF or GIF)"
        ) from None
    if width * height > max_pixels:
        hint = " (format=slide segments a TIFF of any size region by region)" if kind == "tiff" else ""
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}{hint}")
    return "image", fmt, {"format": kind, "width": width, "height": height}


@router.post(
    "/jobs",
    summary="Start a job",
    status_code=202,
    response_model=JobOut,
    description=(
        "Segment an image in the background: send it as `POST /v1/predict` takes it (multipart `file`, "
        "`upload_id`, or the body itself), up to `UNETSEG_MAX_JOB_BYTES`. Answers 202 with "
        "`Location: /v1/jobs/{id}` at once; poll that for progress, then get `/v1/jobs/{id}/result`.\n\n"
        "- `format=png`, `overlay`, `json`, `instances`: the answer `predict` gives, without its time limit "
        "(within `UNETSEG_MAX_PIXELS`).\n"
        "- `format=slide`: a TIFF (BigTIFF, tiled or striped, pyramidal: OME-TIFF, SVS, generic) segmented "
        "region by region at `level` (default: full resolution), read lazily, up to `UNETSEG_MAX_JOB_PIXELS`. "
        "Results: `tiff` (a tiled pyramidal TIFF of class ids, palette colors), and for a model with instances "
        "`instances` (a tiled pyramidal TIFF of 32-bit instance ids), `csv` (id, class_id, area, centroid, "
        "bbox per instance) and `geojson` (their outlines); `json`: per-class areas and the instance count.\n"
        "- `format=auto` (default): `slide` for a pyramidal TIFF or one over `UNETSEG_MAX_PIXELS`, else `png`."
    ),
    openapi_extra={"requestBody": image_body("Job")},
    responses={
        202: {"headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}},
        **{k: JOB_ERRORS[k] for k in (400, 401, 404, 413, 415, 422, 503)},
    },
)
async def create_job(
    request: Request,
    state: StateDep,
    engine: EngineDep,
    uploads: StoreDep,
    model: Annotated[
        str | None, Query(description="Model name; the default model when omitted.", examples=["nuclei"])
    ] = None,
    format: Annotated[Format, Query(description="What to make (see above).", examples=["slide"])] = "auto",
    alpha: Annotated[float, Query(ge=0, le=1, description="Mask opacity for format=overlay.", examples=[0.5])] = 0.5,
    level: Annotated[
        int | None,
        Query(
            ge=0,
            le=64,
            description="Slide level to segment (0: full resolution); default: the model card's.",
            examples=[0],
        ),
    ] = None,
) -> JSONResponse:
    service = get_jobs(request)
    s = state.settings
    name = adapter.model_name(engine, model)  # 404 before any of the body is read
    card = adapter.model_card(engine, name)
    request.state.model = name
    if format == "instances" and card.instances is None:
        raise InvalidRequest(f"model {name!r} does not produce instances; format=instances needs one that does")
    job_id = new_job_id()
    files = service.files
    work = await service.call(files.workdir, job_id)
    try:
        sink = await _receive(request, service, uploads, work / INPUT, s.max_job_bytes)
        kind, fmt, info = await service.call(
            _probe, work / INPUT, format, level, card.slide, s.max_pixels, s.max_job_pixels
        )
        await service.call(files.save, job_id, INPUT)
        await service.call(files.release, job_id)  # freed before the row exists: from then on a runner fetches it
        params: dict[str, Any] = {"alpha": alpha} if fmt == "overlay" else {}
        if kind == "slide":
            params.update(level=info["level"], region_px=s.job_region_px, halo_px=s.job_halo_px)
        job = Job(
            job_id,
            "queued",
            service.store.clock(),
            kind,
            name,
            fmt,
            params,
            {"bytes": sink.size, "sha256": sink.hash.hexdigest(), **info},
        )
        await service.call(service.store.create, job)
    except BaseException:
        await asyncio.shield(service.call(files.delete, job_id))
        raise
    if service.runner is not None:
        service.runner.wake.set()
    body = job_out(job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get(
    "/jobs",
    summary="List jobs",
    response_model=JobList,
    description="Newest first, with the number of jobs per state and the limits jobs and predictions have.",
    responses={k: ERRORS[k] for k in (401,)},
)
async def list_jobs(
    request: Request,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most jobs to list.", examples=[100])] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Jobs to skip.", examples=[0])] = 0,
) -> JobList:
    service = get_jobs(request)
    s = state.settings
    found = await service.call(service.store.recent, limit, offset)
    counts = await service.call(service.store.counts)
    return JobList(
        items=[job_out(j) for j in found],
        counts=counts,
        limits={
            "max_job_bytes": s.max_job_bytes,
            "max_job_pixels": s.max_job_pixels,
            "max_jobs": s.max_jobs,
            "max_upload_bytes": s.max_upload_bytes,
            "max_pixels": s.max_pixels,
        },
    )


@router.get(
    "/jobs/{job_id}",
    summary="A job's state and progress",
    response_model=JobOut,
    description="State (queued, running, done, failed, cancelled), progress in tiles and regions, and once "
    "done its results, size, areas, instance count and timings; the error when it failed. Any replica answers.",
    responses={k: JOB_ERRORS[k] for k in (401, 404)},
)
async def get_job(request: Request, job_id: JobId) -> JobOut:
    return job_out(await _find(get_jobs(request), job_id))


@router.get(
    "/jobs/{job_id}/result",
    summary="A job's result",
    response_class=Response,
    description="A finished job's result in `format` (default: an image job's own format; a slide's `tiff`). "
    "`GET /v1/jobs/{id}` lists the formats a job has. 409 while the job is not done.",
    responses={
        200: {
            "description": "The result, streamed.",
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/tiff": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
                "text/csv": {"schema": {"type": "string"}},
                "application/geo+json": {"schema": {"type": "object"}},
            },
        },
        **{k: JOB_ERRORS[k] for k in (401, 404, 409)},
    },
)
async def get_result(
    request: Request,
    job_id: JobId,
    format: Annotated[
        ResultFormat | None, Query(description="Which result (see the job's `results`).", examples=["csv"])
    ] = None,
) -> Response:
    service = get_jobs(request)
    job = await _find(service, job_id)
    if job.state != "done":
        detail = f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else "")
        raise JobNotFinished(detail, {"Retry-After": "5"} if job.state in ACTIVE else None)
    available = result_files(job)
    fmt = format or ("tiff" if job.kind == "slide" else job.format)
    if fmt not in available:
        raise UnknownJob(f"job {job_id} has no {fmt!r} result; it has: {', '.join(sorted(available))}")
    rel, media = available[fmt]
    name = f"{job_id}-{rel.rsplit('/', 1)[-1]}"
    headers = {"X-Model": job.model, "Content-Disposition": f'attachment; filename="{name}"'}
    if "count" in job.info:
        headers["X-Instance-Count"] = str(job.info["count"])
    local = await service.call(service.files.local, job_id, rel)
    if local is not None:
        return FileResponse(local, media_type=media, headers=headers)
    size = await service.call(service.files.size, job_id, rel)
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(service.files.chunks(job_id, rel), media_type=media, headers=headers)


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel or remove a job",
    response_model=JobOut,
    description="A queued or running job is cancelled (200, the job): it stops within a heartbeat and its files "
    "are removed; it stays listed as cancelled (one that finished meanwhile is answered as it is, 200). A finished "
    "(or cancelled) job is removed with its results (204).",
    responses={204: {"description": "Removed."}, **{k: JOB_ERRORS[k] for k in (401, 404)}},
)
async def delete_job(request: Request, job_id: JobId) -> Response:
    service = get_jobs(request)
    job = await _find(service, job_id)
    if job.state in ACTIVE:
        found = await service.call(service.store.cancel, job_id)
        if found is None:
            raise UnknownJob(f"no job with id {job_id!r}")
        now, was = found  # the state it was in when cancelled: it may have started or ended since it was read
        if was == "queued":  # it never ran: its files are nobody's
            await service.call(service.files.delete, job_id)
        elif was == "running" and service.runner is not None and job_id in service.runner.tasks:
            service.runner.lost.add(job_id)
            service.runner.tasks[job_id].cancel()
        return JSONResponse(job_out(now).model_dump(mode="json"))
    await service.call(service.files.delete, job_id)
    await service.call(service.store.delete, job_id)
    return Response(status_code=204)


__all__ = ["SLIDE_RESULTS", "router"]
