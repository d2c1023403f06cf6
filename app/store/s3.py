"""Upload bytes as objects in an S3 bucket (``s3://bucket/prefix``) through boto3.

Keys are ``PREFIX/uploads/ab/abcdef...``. A PUT is atomic (an object is visible whole or not at all) and
answered once stored durably, so ``stage`` writes the object under its final key, outside the store's
lock; nothing reads it until its row exists. ``publish``, inside the lock, checks that the object is still
there (a delete or another replica's start-up may have removed it since: S3 reads are strongly
consistent) and writes it again if not, so a row never names a missing object. Start-up removes objects
without a row only when older than ``orphan_grace_s``, which leaves other replicas' uploads in flight
alone.

Credentials, region and endpoint come from boto3's usual sources: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``~/.aws``, an instance role; for a server other than
AWS (MinIO, Ceph, an emulator) set ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from app.errors import StoreUnavailable
from app.store import CHUNK, ID_RE, Blobs, Staged

ORPHAN_GRACE_S = 3600.0  # far longer than any upload takes between its PUT and its row


def is_missing(exc: Exception) -> bool:
    """Whether a botocore ``ClientError`` says the object does not exist (404, NoSuchKey)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def unavailable_as_503() -> Iterator[None]:
    """No answer from the endpoint, or a 5xx (SlowDown, InternalError): the store's trouble, a 503. boto3's
    managed transfers (``upload_file``, ``download_file``) say the same in their own exceptions: an upload's
    ClientError comes wrapped in S3UploadFailedError, retries run out in RetriesExceededError."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    def server_side(exc: BaseException | None) -> bool:
        response = (getattr(exc, "response", None) or {}) if isinstance(exc, ClientError) else {}
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500

    try:
        yield
    except (BotoCoreError, RetriesExceededError) as exc:
        raise StoreUnavailable(f"the upload bucket is unavailable: {exc}") from exc
    except ClientError as exc:
        if server_side(exc):
            raise StoreUnavailable(f"the upload bucket is unavailable: {exc}") from exc
        raise
    except S3UploadFailedError as exc:
        if server_side(exc.__context__) or isinstance(exc.__context__, BotoCoreError):
            raise StoreUnavailable(f"the upload bucket is unavailable: {exc}") from exc
        raise


class S3Blobs(Blobs):
    orphan_grace_s = ORPHAN_GRACE_S

    def __init__(self, bucket: str, prefix: str = "", client: Any = None, timeout_s: float = 5.0) -> None:
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise RuntimeError(
                    "UNETSEG_BLOB_URL names S3: install the 's3' extra (pip install 'unetseg[s3]')"
                ) from exc
            # boto3's defaults wait 60 s to connect and for each read, over up to 5 attempts: an endpoint that
            # went away would hold a store thread for minutes.
            config = Config(connect_timeout=timeout_s, read_timeout=max(timeout_s, 10.0), retries={"max_attempts": 2})
            client = boto3.client("s3", config=config)
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/uploads/" if prefix.strip("/") else "uploads/"
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)  # fail at start-up, not at the first upload
        except (BotoCoreError, ClientError) as exc:
            self.client.close()
            raise RuntimeError(f"UNETSEG_BLOB_URL: cannot use the S3 bucket {bucket!r}: {exc}") from exc

    def key(self, uid: str) -> str:
        return f"{self.prefix}{uid[:2]}/{uid}"

    def _put(self, uid: str, data: bytes) -> None:
        with unavailable_as_503():
            self.client.put_object(Bucket=self.bucket, Key=self.key(uid), Body=data, ChecksumAlgorithm="SHA256")

    def stage(self, uid: str, data: bytes) -> Staged:
        self._put(uid, data)
        return Staged(uid, data)

    def publish(self, staged: Staged) -> None:
        if not self.exists(staged.id):
            self._put(staged.id, staged.data)

    def discard(self, staged: Staged) -> None:
        return None  # an unpublished object has no row: start-up removes it after the grace period

    def chunks(self, uid: str) -> Iterator[bytes] | None:
        from botocore.exceptions import ClientError

        with unavailable_as_503():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(uid))
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise
        return self._pieces(response["Body"])

    def _pieces(self, body: Any) -> Iterator[bytes]:
        with unavailable_as_503(), contextlib.closing(body):
            yield from body.iter_chunks(CHUNK)

    def exists(self, uid: str) -> bool:
        from botocore.exceptions import ClientError

        with unavailable_as_503():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key(uid))
            except ClientError as exc:
                if is_missing(exc):
                    return False
                raise
        return True

    def delete(self, uid: str) -> None:
        with unavailable_as_503():
            self.client.delete_object(Bucket=self.bucket, Key=self.key(uid))

    def names(self) -> Iterator[tuple[str, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if ID_RE.fullmatch(name) and obj["Key"] == self.key(name):
                    yield name, obj["LastModified"].timestamp()

    def remove_abandoned(self) -> None:
        return None  # single PUTs: nothing is ever half-written

    def close(self) -> None:
        self.client.close()
