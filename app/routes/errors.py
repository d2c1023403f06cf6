"""The error responses routes document in OpenAPI; all share the ``{"detail": "...", "request_id": "..."}`` body."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorBody

REQUEST_ID_EXAMPLE = "3f2a9c0d5e6b4a718f0e2d1c4b5a6978"
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def _error(description: str, example: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": ErrorBody,
        "description": description,
        "content": {"application/json": {"example": {"detail": example, "request_id": REQUEST_ID_EXAMPLE}}},
        **extra,
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        "The body is not well-formed: a broken multipart body, a form field over 1 MB, more than 1000 fields "
        "or files, or an invalid Content-Length.",
        "Invalid multipart data.",
    ),
    401: _error(
        "An API key is required (UNETSEG_API_KEY is set) and was missing or wrong.",
        "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
    ),
    404: _error("Unknown model or upload.", "unknown model 'lungs'; available: membrane, nuclei, polyp"),
    413: _error(
        "The file is over UNETSEG_MAX_UPLOAD_BYTES or the image over UNETSEG_MAX_PIXELS.",
        "the image is 20000x20000 = 400000000 pixels; the limit is 40000000",
    ),
    415: _error(
        "Not an image, truncated or corrupt, or an unsupported format (e.g. SVG).",
        "the file is not an image in a supported format (PNG, JPEG, WebP, BMP, TIFF or GIF)",
    ),
    422: {
        "description": "Missing or contradictory fields: `detail` is a sentence (e.g. \"send either 'file' or "
        "'upload_id', not both\"), or, for a malformed parameter, the list of field errors below."
    },
    503: _error(
        "Models still loading, the model's queue is full, or the upload store is unreachable (see Retry-After).",
        "model 'polyp' has 64 requests waiting; retry shortly",
        headers=RETRY_AFTER,
    ),
    504: _error(
        "The prediction took longer than UNETSEG_REQUEST_TIMEOUT_S.", "the prediction did not finish within 60 s"
    ),
}
