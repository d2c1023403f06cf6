"""How the HTTP front ends and the engine process talk: length-prefixed JSON messages over a Unix socket, and
pixels in shared memory (``/dev/shm``), never in the messages.

A front end puts a request's uint8 input in a shared array, and keeps an (H, W) uint8 array (and an int32
one for instance ids) for the answer; it sends where they are, the engine process runs the model and writes
the mask into the answer's array. Where: an offset in the front end's ``Arena`` (one file it made at start,
which the engine process maps once per connection), or, for arrays the arena has no room for, the name of a
``SharedArray`` file of their own. Mapping a new file for every array cost 0.8 CPU-ms per request (both
sides, a 352 x 352 x 3 input and a 512 x 512 mask on the 2-core VM); a block of the arena, 0.03.
Messages (all carry ``op``; requests and their replies carry ``id``):

- ``arena`` {name, size}: the front end's arena (sent first; no reply);
- ``hello`` -> the models (their cards, device, precision, graph, batch limit) and the default model;
- ``status`` -> ready or not (and why not), each model's queue depth, rejections and batch counts, GPU memory;
- ``run`` {model, input, shape, size, mask, ids, instances, extra_bytes, background} (``input``, ``mask``,
  ``ids``: an arena offset, or a file's name) -> {timing} or {error: {status, detail, headers}}, or
  {cancelled: true} after a ``cancel``: every ``run`` is answered once, and only then does the front end
  reuse its arena blocks (the engine process may be writing them until it answers);
- ``cancel`` {id}: the request timed out or its client left.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import mmap
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024  # a hello with many large cards is far below this
# Shared arrays live where the kernel keeps them in memory.
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
SHM_PREFIX = "unetseg-"
# A front end's arena: pages are only taken as blocks are first used, and freed blocks are used again, so it
# holds about what its requests in flight need at the busiest (a 352 px input and a 512 x 512 mask: 0.6 MB).
ARENA_BYTES = 32 * 1024 * 1024
ALIGN = 64
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


class MappedFile:
    """A file under ``SHM_DIR`` mapped into this process: made (``create``) by one process, opened by name by
    the other. The maker removes the file (``unlink``); each side closes its mapping."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        if not name.startswith(SHM_PREFIX) or "/" in name:
            raise ValueError(f"not a shared memory name: {name!r}")
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap (once the views of it are gone; until then the mapping lives with them)."""
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held elsewhere keeps the mapping alive
                self._map.close()
            self._map = None

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class SharedArray(MappedFile):
    """A NumPy array in a file of its own; ``ref`` (its name) goes in messages."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any] | type, create: bool) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        super().__init__(name, max(1, int(np.prod(self.shape)) * self.dtype.itemsize), create)
        self.ref = name
        self.array: np.ndarray | None = np.ndarray(self.shape, self.dtype, buffer=self._map)

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> SharedArray:
        """A new array, named after this process and a counter (so that leftovers of a dead process are found)."""
        return cls(f"{SHM_PREFIX}{os.getpid()}-{next(_serial)}", shape, dtype, create=True)

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> SharedArray:
        return cls(name, shape, dtype, create=False)

    def close(self) -> None:
        self.array = None
        super().close()


class Arena(MappedFile):
    """One shared-memory file for many arrays: the front end that creates it allocates and frees blocks
    (``allocate``, from any thread); the engine process attaches it once per connection and views blocks by
    offset (``view``). Blocks are first-fit, aligned to ``ALIGN`` bytes; a free block joins its free
    neighbours."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.size = int(size)
        super().__init__(name, self.size, create)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted by offset

    @classmethod
    def create(cls, size: int = ARENA_BYTES) -> Arena:
        """A new arena, named after this process (so that a dead process's is found by ``remove_leftovers``)."""
        return cls(f"{SHM_PREFIX}{os.getpid()}-arena-{next(_serial)}", size, create=True)

    @classmethod
    def attach(cls, name: str, size: int) -> Arena:
        return cls(name, size, create=False)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> ArenaArray | None:
        """A block for an array of ``shape`` and ``dtype``, or None when no free block is large enough."""
        dt = np.dtype(dtype)
        need = -(-max(1, int(np.prod(shape)) * dt.itemsize) // ALIGN) * ALIGN
        with self._lock:
            for i, (offset, size) in enumerate(self._free):
                if size >= need:
                    if size == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, size - need)
                    break
            else:
                return None
        return ArenaArray(self, offset, need, shape, dt)

    def give_back(self, offset: int, size: int) -> None:
        with self._lock:
            i = bisect.bisect(self._free, (offset, size))
            if i < len(self._free) and offset + size == self._free[i][0]:  # joins the next free block
                size += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and the one before
                offset, prev = self._free[i - 1][0], self._free[i - 1][1]
                self._free[i - 1] = (offset, prev + size)
            else:
                self._free.insert(i, (offset, size))

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> np.ndarray:
        """The array at ``offset`` (the engine process's side); a ValueError outside the arena."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        if self._map is None or offset < 0 or offset % ALIGN or offset + nbytes > self.size:
            raise ValueError(f"no array of {nbytes} bytes at offset {offset} of the arena")
        return np.ndarray(tuple(int(v) for v in shape), dt, buffer=self._map, offset=offset)


class ArenaArray:
    """A front end's array in a block of its arena, with ``SharedArray``'s interface: ``ref`` (its offset) goes
    in messages; ``unlink`` gives the block back (once)."""

    def __init__(self, arena: Arena, offset: int, nbytes: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.arena = arena
        self.ref = offset
        self.nbytes = nbytes
        self.shape = tuple(int(v) for v in shape)
        self.array: np.ndarray | None = arena.view(offset, self.shape, dtype)
        self._given_back = False

    def close(self) -> None:
        self.array = None

    def unlink(self) -> None:
        if not self._given_back:
            self._given_back = True
            self.array = None
            self.arena.give_back(self.ref, self.nbytes)


def attach(ref: int | str, shape: tuple[int, ...], dtype: np.dtype[Any] | type, arena: Arena | None) -> np.ndarray:
    """The engine process's view of a front end's array: an offset in its arena, or a ``SharedArray``'s name
    (mapped here and unmapped when the view goes)."""
    if isinstance(ref, int):
        if arena is None:
            raise ValueError("an arena offset from a front end that sent no arena")
        return arena.view(ref, shape, dtype)
    shared = SharedArray.attach(ref, shape, dtype)
    assert shared.array is not None
    return shared.array


def remove_leftovers(pid: int) -> int:
    """Remove the shared arrays a process that is gone left behind (killed between create and unlink)."""
    removed = 0
    for path in SHM_DIR.glob(f"{SHM_PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
