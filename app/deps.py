"""Dependencies shared by the routes, as ``Annotated`` aliases.

They are ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a hand-off per dependency
per request for what takes microseconds."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from app.errors import NotReady, Unauthorized
from app.inference import Inference
from app.state import AppState
from app.store import UploadStore


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.unetseg
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_engine(state: StateDep) -> Inference:
    if not state.ready.is_set() and state.confirm_ready is not None:
        await state.confirm_ready()
    if not state.ready.is_set() or state.engine is None:
        raise NotReady(state.error or "the models are still loading")
    return state.engine


async def get_store(state: StateDep) -> UploadStore:
    if state.store is None:
        raise NotReady("the upload store is not open")
    return state.store


EngineDep = Annotated[Inference, Depends(get_engine)]
StoreDep = Annotated[UploadStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, when UNETSEG_API_KEY is set.")
_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`, when UNETSEG_API_KEY is set."
)


def check_api_key(request: Request) -> None:
    """When keys are configured, refuse (401) a request that offers none of them, compared in constant time.

    The key is read from ``X-API-Key``, else from ``Authorization: Bearer <key>``. Checked once per request:
    a route that checked it before reading the body (``KeyCheckedRoute``) is not checked again.
    """
    if getattr(request.state, "key_checked", False):
        return
    state: AppState = request.app.state.unetseg
    keys = state.settings.api_key
    if not keys:
        return
    offered = request.headers.get("x-api-key") or None
    if offered is None:
        scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
        if scheme.lower() == "bearer" and credentials:
            offered = credentials
    if offered is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    given = offered.encode()
    match = False
    for key in keys:  # every key is compared, so the time does not tell which one nearly matched
        match |= hmac.compare_digest(given, key.encode())
    if not match:
        raise Unauthorized("the API key is not valid")
    request.state.key_checked = True


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> None:
    """``check_api_key`` as a dependency, which puts the security schemes in the OpenAPI document."""
    check_api_key(request)


class KeyCheckedRoute(APIRoute):
    """A route that checks the API key before it reads the request body.

    FastAPI reads (and spools) a request's body before it runs any dependency, so with the dependency
    alone a client without a key could still make the server take in a whole upload before its 401.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            check_api_key(request)
            return await handler(request)

        return checked
