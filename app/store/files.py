"""Upload bytes as files in a folder: the data folder by default, or a shared mount (``file:///path``).

Layout under the root:

    uploads/ab/abcdef...    the uploaded bytes, named by their SHA-256
    tmp/                    files being written

A blob is written to ``tmp/``, flushed and fsynced (``stage``), then renamed into place and its folder
fsynced (``publish``, inside the store's write lock; atomic on POSIX). A writer holds an exclusive
``flock`` on its temporary file for the file's whole life, so start-up removes exactly the temporary files
whose writer is gone (a killed process's locks are released by the kernel) and never another replica's
upload in flight. Published files only appear together with their row, under the lock, so a file without
a row is a crash's leftover and goes at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.store import CHUNK, ID_RE, BlobDamaged, Blobs, Staged
from model.fsync import fsync_path


def _pieces(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while piece := f.read(CHUNK):
            yield piece


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class FileBlobs(Blobs):
    orphan_grace_s = 0.0

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, uid: str) -> Path:
        return self.files / uid[:2] / uid

    def _locked_temp(self, uid: str) -> tuple[int, Path]:
        while True:
            path = self.tmp / f"{uid}.{uuid.uuid4().hex}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Between the open and the lock, another process's start-up may have taken the unlocked file
            # for a dead writer's and removed it: then this one is not in tmp/ any more; start again.
            if _same_file(path, fd):
                return fd, path
            os.close(fd)

    def stage(self, uid: str, data: bytes) -> Staged:
        fd, path = self._locked_temp(uid)
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
            os.fsync(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return Staged(uid, data, (fd, path))

    def publish(self, staged: Staged) -> None:
        _, path = staged.handle
        final = self.path_for(staged.id)
        final.parent.mkdir(exist_ok=True)
        os.replace(path, final)
        fsync_path(final.parent)

    def discard(self, staged: Staged) -> None:
        fd, path = staged.handle
        if _same_file(path, fd):  # not published
            path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock

    def chunks(self, uid: str) -> Iterator[bytes] | None:
        try:
            f = open(self.path_for(uid), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise BlobDamaged(f"is not a file ({exc.strerror})") from None
        return _pieces(f)

    def exists(self, uid: str) -> bool:
        return self.path_for(uid).is_file()

    def delete(self, uid: str) -> None:
        path = self.path_for(uid)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:  # a folder where the blob was (nothing of ours lives under a blob's name)
            shutil.rmtree(path)

    def names(self) -> Iterator[tuple[str, float]]:
        for sub in self.files.iterdir():
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                if ID_RE.fullmatch(p.name):
                    try:
                        yield p.name, p.stat().st_mtime
                    except FileNotFoundError:
                        continue

    def staged(self) -> list[Path]:
        """The temporary files now in ``tmp/`` (in flight, or left by a crash)."""
        return list(self.tmp.iterdir())

    def remove_abandoned(self) -> None:
        for path in self.staged():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # published or discarded meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its writer is alive
                continue
            try:
                if _same_file(path, fd):
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)
