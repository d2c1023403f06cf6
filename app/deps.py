"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.engine import Engine
from app.errors import NotReady, Unauthorized
from app.state import AppState
from app.store import UploadStore


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.unetseg
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_engine(state: StateDep) -> Engine:
    if not state.ready.is_set() or state.engine is None:
        raise NotReady(state.error or "the models are still loading")
    return state.engine


def get_store(state: StateDep) -> UploadStore:
    if state.store is None:
        raise NotReady("the upload store is not open")
    return state.store


EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[UploadStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, when UNETSEG_API_KEY is set.")
_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`, when UNETSEG_API_KEY is set."
)


def require_api_key(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> None:
    """When keys are configured, accept a request only with one of them, compared in constant time."""
    keys = state.settings.api_key
    if not keys:
        return
    offered = header if header is not None else (bearer.credentials if bearer is not None else None)
    if offered is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    given = offered.encode()
    match = False
    for key in keys:  # every key is compared, so the time does not tell which one nearly matched
        match |= hmac.compare_digest(given, key.encode())
    if not match:
        raise Unauthorized("the API key is not valid")
