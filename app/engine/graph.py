"""A model's forward pass as a frozen TorchScript graph: one call that runs without the Python interpreter.

An eager forward pass returns to Python between every layer, and in a busy service each return waits for the
interpreter lock, which the threads parsing, decoding and encoding requests hold in turn: with one Python
thread busy beside it, an eager forward of the polyp U-Net on one CPU thread fell from 25.9 to 4.3 images/s
here, the frozen graph only from 32.6 to 23.7 (``torch.jit.freeze`` also folds batch norm into the
convolutions). ``torch.jit`` is deprecated in favour of ``torch.export``; its AOTInductor packages, the
replacement that also runs without Python, reached 16 images/s on the same CPU (below eager), so the
frozen graph is used while torch has it, and eager is the fallback whenever tracing fails or disagrees.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

log = logging.getLogger("unetseg.engine")

# torch.jit's deprecation notices (said above), and the tracer's notes on the shape checks it records as
# constants (a served model's input shape is fixed, and the graph is checked against the eager model). Set
# once here: warnings.catch_warnings() swaps the process-wide filters, which races with other threads.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=torch.jit._trace.TracerWarning)

GRAPHS = ("auto", "script", "eager")


def wants_script(graph: str, device: torch.device, compile: bool) -> bool:
    """Whether a model is run as a frozen graph: ``script`` always (unless compiled), ``auto`` on the CPU."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph mode {graph!r}: use one of {', '.join(GRAPHS)}")
    if compile or graph == "eager":
        return False
    return graph == "script" or device.type == "cpu"


def script_graph(model: torch.nn.Module, example: torch.Tensor, dtype: torch.dtype, name: str = "model") -> Any | None:
    """``model`` traced on ``example`` (B, C, h, w) and frozen, or None (logged) when that fails or the graph's
    class map differs from the eager model's on a batch of two random inputs of the same shape.

    The graph is called like the model, under the same autocast; it holds copies of the weights.
    """
    device = example.device
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    try:
        with torch.inference_mode(), autocast:
            traced = torch.jit.trace(model.eval(), example, check_trace=False)  # type: ignore[no-untyped-call]
            graph = torch.jit.freeze(traced)
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn((2, *example.shape[1:]), generator=gen).to(device)
            if example.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            want = model(x).float()
            got = graph(x).float()
    except Exception as exc:  # noqa: BLE001 - any failure leaves the eager model in place
        log.warning("model %s runs eagerly: tracing it failed (%s: %s)", name, type(exc).__name__, exc)
        return None
    agree = float((want.argmax(1) == got.argmax(1)).float().mean()) if want.shape == got.shape else 0.0
    if not bool(torch.isfinite(got).all()) or agree < 0.999:
        log.warning("model %s runs eagerly: its traced graph agrees with it on %.4f of the pixels", name, agree)
        return None
    return graph
