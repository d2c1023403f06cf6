"""How the HTTP front ends and the engine process talk: length-prefixed JSON messages over a Unix socket, and
pixels in shared memory (files in ``/dev/shm``), never in the messages.

A front end puts a request's uint8 input in a shared array it creates, and an (H, W) uint8 array (and an
int32 one for instance ids) for the answer; it sends the names, the engine process maps them, runs the
model and writes the mask into the answer's array. The front end removes both when it has encoded the
answer. Messages (all carry ``op``; requests and their replies carry ``id``):

- ``hello`` -> the models (their cards, device, precision, graph, batch limit) and the default model;
- ``status`` -> ready or not (and why not), each model's queue depth, rejections and batch counts, GPU memory;
- ``run`` {model, input, shape, size, mask, ids, instances, extra_bytes, background} -> {timing, instances} or
  {error: {status, detail, headers}};
- ``cancel`` {id}: the request timed out or its client left (no reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024  # a hello with many large cards is far below this
# Shared arrays live where the kernel keeps them in memory.
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
SHM_PREFIX = "unetseg-"
_serial = itertools.count()


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the other side closed the connection."""
    try:
        head = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(head)
        if size > MAX_MESSAGE:
            raise ValueError(f"a message of {size} bytes is over the limit")
        message: dict[str, Any] = json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


class SharedArray:
    """A NumPy array in a file under ``SHM_DIR``, mapped by the process that creates it and by the one that
    attaches to it by name. The creator removes the file (``unlink``); each side closes its mapping."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any] | type, create: bool) -> None:
        self.name = name
        self.path = SHM_DIR / name
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        size = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array: np.ndarray | None = np.ndarray(self.shape, self.dtype, buffer=self._map)

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> SharedArray:
        """A new array, named after this process and a counter (so that leftovers of a dead process are found)."""
        return cls(f"{SHM_PREFIX}{os.getpid()}-{next(_serial)}", shape, dtype, create=True)

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> SharedArray:
        if not name.startswith(SHM_PREFIX) or "/" in name:
            raise ValueError(f"not a shared array name: {name!r}")
        return cls(name, shape, dtype, create=False)

    def close(self) -> None:
        """Unmap (once the views of the array are gone; until then the mapping lives with them)."""
        self.array = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held elsewhere keeps the mapping alive
                self._map.close()
            self._map = None

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def remove_leftovers(pid: int) -> int:
    """Remove the shared arrays a process that is gone left behind (killed between create and unlink)."""
    removed = 0
    for path in SHM_DIR.glob(f"{SHM_PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
