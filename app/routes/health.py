"""Liveness and readiness (``GET`` and ``HEAD``, which load balancers and probes also send)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import StateDep
from app.schemas import Status, StoreStatus
from app.state import AppState

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Liveness",
    response_model=Status,
    response_model_exclude={"store"},  # /readyz's
    description="200 while the process lives, whether or not the models are loaded.",
)
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Status,
    description=(
        "200 once every model is loaded onto its device and warmed up; 503 before, if loading failed, or once "
        "a model's worker has stopped (see detail). `store` says whether the upload store answers: an "
        "unreachable store leaves the service ready (predictions on images sent work), and is reported here."
    ),
    responses={
        503: {"model": Status, "description": "Models still loading, start-up failed or a worker stopped (see detail)."}
    },
)
async def readyz(state: StateDep) -> Status | JSONResponse:
    failure = state.engine.failure() if state.engine is not None else None
    store = await _store_status(state)
    if state.ready.is_set() and failure is None:
        return Status(status="ready", store=store)
    error = failure or state.error
    status = "failed" if error else "loading"
    body = Status(status=status, detail=error, store=store).model_dump(mode="json")
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def _store_status(state: AppState) -> StoreStatus | None:
    if state.store_gate is None:
        return None
    health = await state.store_gate.check()
    return StoreStatus(
        status="ok" if health.reachable else "unreachable",
        detail=health.detail,
        since=datetime.fromtimestamp(health.since, UTC),
    )


# HEAD answers as GET does, without the body (the server leaves it out); not in the OpenAPI document, whose
# operation ids would repeat.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False, response_model=None)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False, response_model=None)
