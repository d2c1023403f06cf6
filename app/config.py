"""Service settings, read from ``UNETSEG_*`` environment variables (and a ``.env`` file if present)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every field has a default and a one-line description; the README's settings table repeats them."""

    model_config = SettingsConfigDict(env_prefix="UNETSEG_", env_file=".env", extra="ignore", frozen=True)

    weights_dir: Path = Field(
        Path("weights"), description="Folder of model bundles; every sub-folder with a card.json is served."
    )
    data_dir: Path = Field(Path("data"), description="Where uploads and their metadata database are kept.")
    database_url: str = Field(
        "", description="Upload metadata: postgresql://user:pw@host/db, sqlite:///path (empty: SQLite in the data dir)."
    )
    blob_url: str = Field(
        "", description="Upload bytes: file:///path (a shared mount) or s3://bucket/prefix (empty: the data dir)."
    )
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    default_model: str = Field(
        "polyp", description="Model used when a request names none (falls back to the first loaded)."
    )
    host: str = Field("127.0.0.1", description="Address `unetseg serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `unetseg serve` listens on.")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest accepted image file, in bytes (413 above)."
    )
    max_pixels: int = Field(
        40_000_000, gt=0, description="Largest accepted width x height, checked before decoding (413 above)."
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Inference dtype; auto takes the first precision the bundle's card lists that the device supports.",
    )
    compile: bool = Field(
        False, description="Compile models with torch.compile at start-up (slower start, faster steady state)."
    )
    graph: Literal["auto", "script", "eager"] = Field(
        "auto",
        description="How forward passes run: script (a frozen TorchScript graph traced at start-up, which runs "
        "without the Python interpreter), eager, or auto (script on CPU, eager on CUDA); ignored with compile.",
    )
    max_batch: int = Field(8, ge=1, description="Most inputs (images or tiles) per forward pass.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for others to fill a batch.")
    streams: int = Field(
        1,
        ge=1,
        description="Forward passes each model runs at once (worker threads); on CPU they share the torch threads.",
    )
    queue_size: int = Field(
        64, ge=1, description="Requests waiting per model before new ones get 503 with Retry-After."
    )
    max_inflight_mb: int = Field(
        1024,
        ge=0,
        description="MiB that requests in flight may hold (images, tile accumulators, masks); over it 503 (0 = none).",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A prediction not finished after this many seconds gets 504."
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    io_threads: int = Field(0, ge=0, description="Threads decoding and encoding images (0 = number of CPU cores).")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level for PNG responses, 0-9.")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API key, or several separated by commas; when set, every /v1 endpoint needs one.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS (none by default)."
    )
    max_store_bytes: int = Field(
        0, ge=0, description="Quota for stored uploads in bytes; the oldest are evicted first (0 = none)."
    )
    retention_s: float = Field(
        0, ge=0, description="Uploads older than this many seconds are evicted (0 = kept forever)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Access log format: text or one JSON object per line."
    )
    log_level: str = Field("info", description="Logging level.")
    warmup: bool = Field(True, description="Run a forward pass per model and input shape before reporting ready.")
    max_job_bytes: int = Field(
        4 * 1024**3,
        gt=0,
        description="Largest body POST /v1/jobs accepts, in bytes, streamed to the store (413 above).",
    )
    max_job_pixels: int = Field(
        10_000_000_000, gt=0, description="Largest width x height of a slide job at the level it runs at (413 above)."
    )
    max_jobs: int = Field(100, ge=1, description="Jobs queued or running across the store before new ones get 503.")
    job_concurrency: int = Field(1, ge=0, description="Jobs each replica runs at once (0: this replica runs none).")
    job_retention_s: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="Finished jobs and their results are removed after this many seconds (0 = kept).",
    )
    job_region_px: int = Field(
        2048,
        ge=256,
        multiple_of=256,
        description="Side of the square regions a slide is segmented in (multiple of 256).",
    )
    job_halo_px: int = Field(
        128, ge=0, description="Context around each slide region, and the widest object merged across region borders."
    )
    job_lease_s: float = Field(
        30.0, gt=0, description="A running job whose replica has not reported for this long is taken over by another."
    )
    job_attempts: int = Field(
        3,
        ge=1,
        description="Starts a job gets (the first and resumes after a replica died) before it is marked failed.",
    )

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
