"""A request's work for the model, made lazily and finished on the device, and what it costs in memory
(``work_bytes``, which the memory budget of ``app.budget`` bounds).

Inputs are uint8 until they reach the device. A resized image is one (C, size, size) input whose logits are
upsampled to the image's size and turned into its class map on the device when they come back (``put``);
only the (H, W) uint8 mask is copied to the host, when the answer is encoded. A tiled image is never turned
into all of its tiles at once: ``TiledWork`` keeps the decoded uint8 image, cuts a tile when the scheduler
puts it in a batch, and adds each tile's logits into one accumulator on the device as they come back. The
accumulator (one float32 plane for a binary model, K otherwise) and the final mask are the only full-size
buffers besides the decoded image: 9 bytes per pixel for an RGB binary model, where making every tile up
front took about 64. The tiling and the arithmetic are ``model.inference``'s, so the engine's masks are
the offline pipeline's.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from model.bundle import InputPolicy
from model.inference import BAND_PIXELS, Blender, TileGrid, as_hwc, resize_argmax, resize_input, resize_logits

log = logging.getLogger("unetseg.engine")

# Small buffers of a job (its batch inputs and outputs, Python objects), counted once per job.
_JOB_BYTES = 1024 * 1024


def instance_bytes(pixels: int, classes: int) -> int:
    """What making instances adds to a job: the (K, H, W) logits at the image's size and their softmax
    (float32), the ids, markers and the watershed's own buffers (about 24 bytes a pixel)."""
    return pixels * (8 * classes + 24)


class TensorWork:
    """Inputs given as one (N, C, h, w) tensor (uint8, or float32 already normalised); the result is the
    (N, K, h, w) float32 logits on the CPU."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs
        self.size = int(inputs.shape[0])
        c, h, w = inputs.shape[1:]
        self.shape = (int(c), int(h), int(w))
        self.outputs: torch.Tensor | None = None
        self._lock = threading.Lock()

    def item(self, index: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        return self.inputs[index], None

    def put(self, index: int, logits: torch.Tensor) -> None:
        with self._lock:
            if self.outputs is None:
                self.outputs = torch.empty((self.size, *logits.shape), dtype=torch.float32)
        self.outputs[index] = logits.cpu()


class ResizedWork:
    """One image resized to the model's input (``model.inference.resize_input``); its logits upsampled to the
    image's size and turned into the class map (``resize_argmax``) on the model's device.

    On a GPU that happens as the logits come back (``put``, on the worker's stream), so that only the uint8
    mask is copied to the host. On the CPU it waits for ``mask()``, which the request's own I/O thread calls:
    the worker, which every request shares, only runs forward passes, and the upsampling of many requests
    runs on as many threads. ``keep_logits``: also keep the logits, for ``logits()`` (instances).
    """

    def __init__(
        self, image: np.ndarray, policy: InputPolicy, size: tuple[int, int] | None, keep_logits: bool = False
    ) -> None:
        self.input = resize_input(image, policy)  # (C, size, size) uint8
        self.size = 1
        c, h, w = self.input.shape
        self.shape = (int(c), int(h), int(w))
        self.height, self.width = (int(v) for v in (size or image.shape[:2]))
        self.keep_logits = keep_logits
        self._mask: torch.Tensor | None = None  # (H, W) uint8 on the model's device
        self._logits: torch.Tensor | None = None  # (K, size, size) float32 on the model's device

    def item(self, index: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        return self.input, None

    def put(self, index: int, logits: torch.Tensor) -> None:
        if logits.is_cuda:
            self._mask = resize_argmax(logits, self.height, self.width)
            if self.keep_logits:
                self._logits = logits.clone()  # a CUDA graph's output memory is reused by its next replay
        else:
            self._logits = logits  # a view of its batch's output, which it keeps alive

    @staticmethod
    def bytes_needed(image: np.ndarray, size: tuple[int, int] | None, classes: int) -> int:
        """The image, the mask and the band of upsampled float32 logits ``resize_argmax`` works in."""
        h, w = size or image.shape[:2]
        pixels = int(h) * int(w)
        band = min(pixels, BAND_PIXELS) * 4 * (1 if classes == 2 else classes)
        return int(image.nbytes) + pixels + 2 * band + _JOB_BYTES

    def mask(self) -> np.ndarray:
        """(H, W) uint8 class ids on the host."""
        if self._mask is None:
            assert self._logits is not None, "the model has not run this work"
            self._mask = resize_argmax(self._logits, self.height, self.width)
        return self._mask.cpu().numpy()

    def logits(self) -> torch.Tensor:
        """(K, H, W) float32 logits upsampled to the image's size, on the host (with ``keep_logits`` on a GPU)."""
        assert self._logits is not None, "made without keep_logits, or not run"
        return resize_logits(self._logits, self.height, self.width).cpu()


class TiledWork:
    """Overlapping tiles of ``policy.size`` over an (H, W[, C]) uint8 image (``model.inference.TileGrid``),
    blended with a Gaussian window into an accumulator on ``device`` (``Blender``)."""

    def __init__(
        self, image: np.ndarray, policy: InputPolicy, classes: int, device: torch.device | str = "cpu"
    ) -> None:
        self.image = as_hwc(image, policy)  # (H, W, C) uint8, shared with the caller: never written
        self.height, self.width = int(self.image.shape[0]), int(self.image.shape[1])
        self.grid = TileGrid(self.height, self.width, policy)
        self.tile = policy.size
        self.shape = (policy.channels, policy.size, policy.size)
        self.size = len(self.grid)
        self.blender = Blender(self.grid, classes, device)
        if self.blender.acc.is_cuda:  # zeroed on this thread's stream; the worker adds on its own
            torch.cuda.current_stream(self.blender.acc.device).synchronize()
        self._lock = threading.Lock()  # tiles overlap: workers on several streams add into the same pixels

    @property
    def origins(self) -> list[tuple[int, int]]:
        return self.grid.origins

    @staticmethod
    def bytes_needed(height: int, width: int, channels: int, classes: int) -> int:
        """Memory a tiled job holds: the image, the float32 accumulator, the mask and its temporary."""
        planes = 1 if classes == 2 else classes
        return height * width * (channels + 4 * planes + 2) + _JOB_BYTES

    def item(self, index: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        tile, valid = self.grid.cut(self.image, index)
        return tile, (None if valid == (self.tile, self.tile) else valid)

    def put(self, index: int, logits: torch.Tensor) -> None:
        with self._lock:
            self.blender.add(index, logits)

    def mask(self) -> np.ndarray:
        """(H, W) uint8 class ids on the host, once every tile is in."""
        return self.blender.mask().cpu().numpy()

    def logits(self) -> torch.Tensor:
        """(K, H, W) float32 blended logits at the image's size on the host, once every tile is in."""
        return self.blender.logits().cpu()


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


# Jobs at least this large hand their freed memory back to the system when they end.
TRIM_BYTES = 64 * 1024 * 1024
