"""The one device and precision choice of training and serving, checked without a GPU (the CUDA queries are
stood in for): bf16 only where it runs natively, on the named device."""

from __future__ import annotations

import pytest
import torch

from model import device as dev
from tests.helpers import FakeCuda, install_fake_cuda


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, {0: (9, 0), 1: (7, 0)})  # a Hopper card and a V100 beside it


def test_training_uses_bf16_only_where_serving_would(fake_cuda: FakeCuda) -> None:
    hopper, volta = torch.device("cuda:0"), torch.device("cuda:1")
    assert dev.training_dtype("auto", hopper) == torch.bfloat16
    # torch.cuda.is_bf16_supported() says yes on the V100 (emulation); training used to take that answer.
    assert torch.cuda.is_bf16_supported()
    fake_cuda.current = 1
    assert torch.cuda.is_bf16_supported()
    assert dev.training_dtype("auto", volta) == torch.float32
    assert not dev.device_supports(torch.bfloat16, volta) and dev.device_supports(torch.float16, volta)
    # An explicit precision is the user's choice, honoured as before.
    assert dev.training_dtype("bfloat16", volta) == torch.bfloat16
    assert dev.training_dtype("float32", hopper) == torch.float32


def test_the_cpu_takes_bf16_when_onednn_has_kernels_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(dev, "cpu_supports_bf16", lambda native=native: native)
        assert dev.training_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
        assert dev.device_supports(torch.bfloat16, cpu) is native
    assert not dev.device_supports(torch.float16, cpu)
    assert dev.device_supports(torch.float32, cpu)
    with pytest.raises(ValueError, match="precision"):
        dev.training_dtype("float16", cpu)


def test_devices_are_checked_by_name() -> None:
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "mps"):
        with pytest.raises(ValueError, match="unsupported device"):
            dev.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            dev.resolve_device("cuda")
    assert "thread" in dev.hardware(torch.device("cpu"))
