"""Service settings, read from ``UNETSEG_*`` environment variables (and a ``.env`` file if present)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_WEIGHTS_DIR = Path("weights")


def shipped_weights_dirs() -> list[Path]:
    """Where the bundles that come with unetseg are: beside the package in a checkout (and an editable
    install), or under the installation's ``share/unetseg`` (a wheel installs them there)."""
    return [Path(__file__).resolve().parents[1] / "weights", Path(sys.prefix) / "share" / "unetseg" / "weights"]


def holds_bundles(folder: Path) -> bool:
    """A bundle folder itself, or a folder with at least one (a sub-folder with a card.json)."""
    if (folder / "card.json").is_file():
        return True
    return folder.is_dir() and any((child / "card.json").is_file() for child in folder.iterdir())


class SettingsError(ValueError):
    """A setting whose value cannot be used; the message names its environment variable."""


def load_settings(**values: Any) -> Settings:
    """``Settings(**values)`` over the environment, with an error that names each variable at fault (not
    pydantic's traceback)."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            given = "" if name == "api_key" else f" (given {error.get('input')!r})"  # keys are secrets
            problems.append(f"UNETSEG_{name.upper()}: {error['msg']}{given}")
        raise SettingsError("; ".join(problems)) from None


class Settings(BaseSettings):
    """Every field has a default and a one-line description; the settings table in docs/api.md repeats them."""

    model_config = SettingsConfigDict(env_prefix="UNETSEG_", env_file=".env", extra="ignore", frozen=True)

    weights_dir: Path = Field(
        DEFAULT_WEIGHTS_DIR,
        description="Folder of model bundles; every sub-folder with a card.json is served. When left at "
        "weights and there is none in the working folder: the bundles shipped with unetseg, wherever it runs.",
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
    max_batch: int = Field(
        0,
        ge=0,
        description="Most inputs (images or tiles) per forward pass; 0: measured per model at warm-up (the smallest "
        "batch that reaches 95% of the best throughput, trying up to 64 on a GPU and 16 on a CPU).",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for others to fill a batch.")
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay each model's forward pass as CUDA graphs captured per batch size."
    )
    streams: int = Field(
        0,
        ge=0,
        description=(
            "Forward passes each model runs at once (worker threads); on CPU they share the torch threads "
            "(0: one per torch thread on the CPU, at most 8, a lone request still on all of them; one on a GPU)."
        ),
    )
    queue_size: int = Field(
        64, ge=1, description="Requests waiting per model before new ones get 503 with Retry-After."
    )
    max_inflight_mb: int = Field(
        1024,
        ge=0,
        description=(
            "MiB that requests in flight may hold (images, tile accumulators, masks), and apart from that "
            "the request bodies being read (not the jobs'); over it 503 (0 = none)."
        ),
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A prediction not finished after this many seconds gets 504."
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    io_threads: int = Field(0, ge=0, description="Threads decoding and encoding images (0 = number of CPU cores).")
    store_threads: int = Field(
        4,
        ge=1,
        description="Threads (and PostgreSQL connections) for upload store calls, apart from the I/O threads.",
    )
    store_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest a store call waits for a store thread, a connection or the database before 503.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a request's headers within this is closed."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body not received whole within this many seconds gets 408."
    )
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
    workers: int = Field(
        1,
        ge=0,
        description="HTTP front-end processes of `unetseg serve`; above 1 they share one engine process that holds "
        "the models (0: one per two CPU cores, at most 8, on a CUDA host; 1 on a CPU).",
    )
    engine_socket: str = Field(
        "",
        description="Unix socket of a shared engine process; set by `unetseg serve --workers` for its front ends "
        "(empty: the models run in this process).",
    )
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

    @field_validator("weights_dir")
    @classmethod
    def _shipped_by_default(cls, value: Path) -> Path:
        # Left at its default, the folder is ./weights when there is one (a checkout, the Docker image), else
        # the shipped bundles: `unetseg predict` then works from any folder, and so do Ray replicas.
        if value != DEFAULT_WEIGHTS_DIR or holds_bundles(value):
            return value
        return next((d for d in shipped_weights_dirs() if holds_bundles(d)), value)

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
