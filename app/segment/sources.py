"""Where the bulk job's images come from: a folder (recursively) or an ``s3://`` prefix, by relative path."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class Source(Protocol):
    """Images addressed by relative POSIX paths; picklable, so that Ray actors read for themselves."""

    def list(self) -> list[str]:
        """Every image's relative path, sorted."""
        ...

    def read(self, rel: str) -> bytes:
        """The image's bytes; OSError when they cannot be read."""
        ...


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Listing:
    """What a folder holds: its images, the files named like images that are not regular files (FIFOs,
    devices, sockets, symlinks to them or to nothing) with why they were left out, and the identities
    (device, inode) of the images, so that no mask is ever written over one."""

    images: list[str]
    ignored: list[tuple[str, str]]
    inodes: frozenset[tuple[int, int]]


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "a socket" if stat.S_ISSOCK(mode) else "a directory")


@dataclass(frozen=True)
class FolderSource:
    root: Path

    def scan(self) -> Listing:
        images: list[str] = []
        ignored: list[tuple[str, str]] = []
        inodes: set[tuple[int, int]] = set()
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if not is_image_name(name):
                    continue
                rel = (here / name).relative_to(self.root).as_posix()
                try:
                    st = os.stat(here / name)  # through symlinks: what a read would open
                except OSError as exc:
                    ignored.append((rel, f"cannot be read: {exc.strerror or exc}"))
                    continue
                if not stat.S_ISREG(st.st_mode):  # a FIFO would block a read, a device never end it
                    ignored.append((rel, f"not a regular file ({_kind(st.st_mode)})"))
                    continue
                images.append(rel)
                inodes.add((st.st_dev, st.st_ino))
        return Listing(sorted(images), sorted(ignored), frozenset(inodes))

    def list(self) -> list[str]:
        return self.scan().images

    def read(self, rel: str) -> bytes:
        # Non-blocking, so that a file replaced by a FIFO since the listing cannot hang the open.
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(f"{rel}: not a regular file ({_kind(mode)})")
            return f.read()


class S3Source:
    """``s3://bucket/prefix`` through boto3, with boto3's own configuration (credentials, region and
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible server)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        # A folder: s3://b/archive/2024 holds archive/2024/x.jpg, not archive/20240/x.jpg.
        folder = prefix.strip("/")
        self.bucket, self.prefix = bucket, f"{folder}/" if folder else ""
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, str]:  # the client and lock stay behind; each process makes its own
        return {"bucket": self.bucket, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["bucket"], state["prefix"])  # type: ignore[misc]

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3

                self._client = boto3.client("s3")
            return self._client

    def list(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        out = []
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    if rel and is_image_name(PurePosixPath(rel).name):
                        out.append(rel)
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"cannot list s3://{self.bucket}/{self.prefix}: {exc}") from None
        return sorted(out)

    def read(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.prefix + rel
        try:
            body: bytes = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"cannot read s3://{self.bucket}/{key}: {exc}") from None
        return body


def open_source(src: str, dst: Path) -> Source:
    if src.startswith("s3://"):
        bucket, _, prefix = src[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{src!r} names no bucket (s3://bucket/prefix)")
        return S3Source(bucket, prefix)
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"{src} is not a folder (nor an s3:// prefix)")
    root, out = root.resolve(), dst.resolve()
    if out == root or root in out.parents:
        # Masks would land among the images: SRC/x.png would become x.png's mask.
        where = "SRC" if out == root else "inside SRC"
        raise ValueError(f"DST {dst} is {where} ({src}): give an output folder outside it")
    return FolderSource(root)


def mask_path(rel: str) -> str | None:
    """The mask's relative path for an image's, or None when the path would leave DST (an S3 key
    such as ``a/../../x.jpg``)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return p.with_suffix(".png").as_posix()
