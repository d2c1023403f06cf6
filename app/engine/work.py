"""A request's work for the model, made lazily, and the memory budget that bounds work in flight.

A tiled image is never turned into all of its tiles at once: ``TiledWork`` keeps the decoded uint8 image,
cuts and normalises a tile when the scheduler puts it in a batch, and adds each tile's logits into one
accumulator as they come back. The accumulator (one float32 plane for a binary model, K otherwise) and
the final mask (and its temporary) are the only full-size buffers besides the decoded image: 9 bytes per
pixel for an RGB binary model, where making every tile up front took about 64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from app.errors import ImageTooLarge, Overloaded
from model.bundle import InputPolicy
from model.inference import (
    _BAND_PIXELS,
    Plan,
    blended_logits,
    finish,
    gaussian_window,
    make_plan,
    pad_tile,
    tile_origins,
)

log = logging.getLogger("unetseg.engine")

# Small buffers of a job (its batch inputs and outputs, Python objects), counted once per job.
_JOB_BYTES = 1024 * 1024


class Work(Protocol):
    """What the scheduler runs for one request: ``size`` inputs of one shape, each made on demand."""

    size: int
    shape: tuple[int, int, int]  # (C, h, w) of every input

    def item(self, index: int) -> torch.Tensor:
        """(C, h, w) float32: input ``index``, normalised."""
        ...

    def put(self, index: int, logits: torch.Tensor) -> None:
        """Take the (K, h, w) float32 logits of input ``index`` (any thread; each index once)."""
        ...


def instance_bytes(pixels: int, classes: int) -> int:
    """What making instances adds to a job: the (K, H, W) logits at the image's size and their softmax
    (float32), the ids, markers and the watershed's own buffers (about 24 bytes a pixel)."""
    return pixels * (8 * classes + 24)


class TensorWork:
    """Inputs given as one (N, C, h, w) tensor; the result is the (N, K, h, w) logits."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs
        self.size = int(inputs.shape[0])
        c, h, w = inputs.shape[1:]
        self.shape = (int(c), int(h), int(w))
        self.outputs: torch.Tensor | None = None
        self._lock = threading.Lock()

    def item(self, index: int) -> torch.Tensor:
        return self.inputs[index]

    def put(self, index: int, logits: torch.Tensor) -> None:
        with self._lock:
            if self.outputs is None:
                self.outputs = torch.empty((self.size, *logits.shape), dtype=logits.dtype)
        self.outputs[index] = logits


class TiledWork:
    """Overlapping tiles of ``policy.size`` over an (H, W[, C]) uint8 image, blended with a Gaussian window.

    Tiles are cut, normalised and padded as ``model.inference.make_plan`` makes them (``pad_tile``), and
    blended with the same window, so the mask is the one ``finish`` gives for the whole plan.
    """

    def __init__(self, image: np.ndarray, policy: InputPolicy, classes: int) -> None:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] != policy.channels:
            raise ValueError(f"image has {image.shape[2]} channels, the model takes {policy.channels}")
        self.image = image  # (H, W, C) uint8, shared with the caller: never written
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        t = policy.size
        self.tile = t
        self.shape = (policy.channels, t, t)
        self.origins = [
            (y, x)
            for y in tile_origins(self.height, t, policy.overlap)
            for x in tile_origins(self.width, t, policy.overlap)
        ]
        self.size = len(self.origins)
        self.mean = torch.tensor(policy.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(policy.std, dtype=torch.float32).view(-1, 1, 1)
        self.window = gaussian_window(t, t)
        # A binary model needs only the difference of its two logits: class 1 wins where the blended
        # difference is > 0, as the argmax of both blended logits would say (the weights are > 0).
        self.binary = classes == 2
        self.acc = torch.zeros(1 if self.binary else classes, self.height, self.width)  # (K', H, W)
        self._lock = threading.Lock()  # tiles overlap: workers on several streams add into the same pixels

    @staticmethod
    def bytes_needed(height: int, width: int, channels: int, classes: int) -> int:
        """Memory a tiled job holds: the image, the float32 accumulator, the mask and its temporary."""
        planes = 1 if classes == 2 else classes
        return height * width * (channels + 4 * planes + 2) + _JOB_BYTES

    def _valid(self, index: int) -> tuple[int, int, int, int]:
        y, x = self.origins[index]
        return y, x, min(self.tile, self.height - y), min(self.tile, self.width - x)

    def item(self, index: int) -> torch.Tensor:
        y, x, h, w = self._valid(index)
        crop = np.ascontiguousarray(self.image[y : y + h, x : x + w])
        tile = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0).sub_(self.mean).div_(self.std)
        return pad_tile(tile, self.tile)

    def put(self, index: int, logits: torch.Tensor) -> None:
        y, x, h, w = self._valid(index)
        part = logits[1:2] - logits[0:1] if self.binary else logits
        weighted = part[:, :h, :w] * self.window[:h, :w]
        with self._lock:
            self.acc[:, y : y + h, x : x + w].add_(weighted)

    def mask(self) -> np.ndarray:
        """(H, W) uint8 class ids, once every tile is in."""
        if self.binary:
            return (self.acc[0] > 0).numpy().astype(np.uint8)
        return self.acc.argmax(0).to(torch.uint8).numpy()

    def logits(self) -> torch.Tensor:
        """(K, H, W) float32 blended logits at the image's size (the weighted mean of the tiles'), once every
        tile is in. A binary model's come back as (0, class 1 minus class 0): the same argmax and softmax."""
        weight = torch.zeros(self.height, self.width)
        for index in range(self.size):
            y, x, h, w = self._valid(index)
            weight[y : y + h, x : x + w].add_(self.window[:h, :w])
        mean = self.acc / weight
        return torch.cat([torch.zeros_like(mean), mean]) if self.binary else mean


class ResizedWork(TensorWork):
    """One resized input (``make_plan``); its logits are upsampled to the image's size in bands."""

    def __init__(self, image: np.ndarray, policy: InputPolicy, size: tuple[int, int] | None) -> None:
        self.plan: Plan = make_plan(image, policy, size)
        super().__init__(self.plan.inputs)

    @staticmethod
    def bytes_needed(image: np.ndarray, size: tuple[int, int] | None, classes: int) -> int:
        """The image, the mask and the band of upsampled float32 logits ``finish`` works in."""
        h, w = size or image.shape[:2]
        pixels = int(h) * int(w)
        band = min(pixels, _BAND_PIXELS) * 4 * (1 if classes == 2 else classes)
        return int(image.nbytes) + pixels + 2 * band + _JOB_BYTES

    def mask(self) -> np.ndarray:
        assert self.outputs is not None
        return finish(self.plan, self.outputs)

    def logits(self) -> torch.Tensor:
        """(K, H, W) float32 logits upsampled to the image's size."""
        assert self.outputs is not None
        return blended_logits(self.plan, self.outputs)


def work_bytes(
    image: np.ndarray, policy: InputPolicy, classes: int, size: tuple[int, int] | None, instances: bool = False
) -> int:
    """What a request for ``image`` will hold until its mask (and its instances) are made, before any of it
    is allocated."""
    h, w = size or image.shape[:2]
    extra = instance_bytes(int(h) * int(w), classes) if instances else 0
    if policy.sizing == "resize":
        return ResizedWork.bytes_needed(image, size, classes) + extra
    h, w = image.shape[:2]
    return TiledWork.bytes_needed(h, w, policy.channels, classes) + extra


class MemoryBudget:
    """Bytes held by requests in flight, across every model: over ``limit`` a request is refused.

    A request that alone would pass the limit is refused for good (413); one that does not fit beside
    those in flight gets 503 with ``Retry-After`` (they finish and free their share). ``limit`` 0: none.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, retry_after_s: int = 1) -> None:
        mib = 1024 * 1024
        if self.limit and nbytes > self.limit:
            raise ImageTooLarge(
                f"this image needs about {math.ceil(nbytes / mib)} MiB to segment; "
                f"the service allows {self.limit // mib} MiB of work in flight"
            )
        with self._lock:
            if self.limit and self.held + nbytes > self.limit:
                raise Overloaded(
                    f"the service is segmenting {math.ceil(self.held / mib)} MiB of images, this one needs "
                    f"{math.ceil(nbytes / mib)} MiB and the limit is {self.limit // mib} MiB; retry shortly",
                    retry_after_s=retry_after_s,
                )
            self.held += nbytes
            self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


# Jobs at least this large hand their freed memory back to the system when they end.
TRIM_BYTES = 64 * 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _load_malloc_trim()


def trim_memory() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``); False where there is none.

    Without it the many tile-sized blocks a large job frees stay in the process's heap (resident) until
    the allocator happens to reuse them.
    """
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))
