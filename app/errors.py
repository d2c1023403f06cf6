"""Domain errors. Code below the routes raises these; one handler in ``main`` renders ``{"detail": ...}``."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status_code: ClassVar[int] = 500
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = {**self.default_headers, **(headers or {})}


class InvalidImage(ServiceError):
    """Not an image, a truncated or corrupt one, or a format the service does not read."""

    status_code = 415


class UnsupportedBody(ServiceError):
    """A request body of a type the route does not read (neither a form nor an image)."""

    status_code = 415


class ImageTooLarge(ServiceError):
    """Over the byte or pixel limits."""

    status_code = 413


class UnknownModel(ServiceError):
    status_code = 404


class UnknownUpload(ServiceError):
    status_code = 404


class UnknownJob(ServiceError):
    status_code = 404


class JobNotFinished(ServiceError):
    """A job's result asked for before the job is done (or after it failed or was cancelled)."""

    status_code = 409


class InvalidRequest(ServiceError):
    """Missing or contradictory fields."""

    status_code = 422


class Unauthorized(ServiceError):
    status_code = 401
    default_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class NotReady(ServiceError):
    status_code = 503
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Overloaded(ServiceError):
    """The model's queue is full, or the service is shutting down: come back shortly."""

    status_code = 503

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after_s)})


class StoreUnavailable(ServiceError):
    """The upload store (its database, or where its bytes are kept) cannot be reached or did not answer in
    time: uploads and predictions by upload id wait for it; nothing else does."""

    status_code = 503

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after_s)})


class RequestTimeout(ServiceError):
    status_code = 504


class InferenceFailed(ServiceError):
    """The model failed on this input; other requests are unaffected."""

    status_code = 500
