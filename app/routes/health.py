"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import StateDep
from app.schemas import Status

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Liveness",
    response_model=Status,
    description="200 while the process lives, whether or not the models are loaded.",
)
def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Status,
    description=(
        "200 once every model is loaded onto its device and warmed up; 503 before, if loading failed, or once "
        "a model's worker has stopped (see detail)."
    ),
    responses={
        503: {"model": Status, "description": "Models still loading, start-up failed or a worker stopped (see detail)."}
    },
)
def readyz(state: StateDep) -> Status | JSONResponse:
    failure = state.engine.failure() if state.engine is not None else None
    if state.ready.is_set() and failure is None:
        return Status(status="ready")
    error = failure or state.error
    status = "failed" if error else "loading"
    return JSONResponse(Status(status=status, detail=error).model_dump(), status_code=503, headers={"Retry-After": "1"})
