"""The error responses routes document in OpenAPI; all share the ``{"detail": "..."}`` body."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorBody,
        "description": "An API key is required (UNETSEG_API_KEY is set) and was missing or wrong.",
    },
    404: {"model": ErrorBody, "description": "Unknown model or upload."},
    413: {
        "model": ErrorBody,
        "description": "The file is over UNETSEG_MAX_UPLOAD_BYTES or the image over UNETSEG_MAX_PIXELS.",
    },
    415: {
        "model": ErrorBody,
        "description": "Not an image, truncated or corrupt, or an unsupported format (e.g. SVG).",
    },
    422: {"description": "Missing or contradictory fields."},
    503: {"model": ErrorBody, "description": "Models still loading, or the model's queue is full (see Retry-After)."},
    504: {"model": ErrorBody, "description": "The prediction took longer than UNETSEG_REQUEST_TIMEOUT_S."},
}
