from __future__ import annotations

import itertools

import pytest
import torch

from model.unet import UNet, UNetConfig, count_parameters


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 13), (33, 17), (64, 64), (5, 100)])
def test_any_size_gives_same_size_logits(h: int, w: int) -> None:
    model = UNet(UNetConfig(in_channels=3, num_classes=3, base_width=4, depth=2)).eval()
    out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 3, h, w)


@pytest.mark.parametrize(
    ("norm", "upsample", "residual", "skip"),
    list(
        itertools.product(
            ["batch", "group", "instance", "none"], ["transpose", "bilinear"], [False, True], [True, False]
        )
    ),
)
def test_every_option_runs_forward_and_backward(norm: str, upsample: str, residual: bool, skip: bool) -> None:
    cfg = UNetConfig(
        in_channels=1,
        num_classes=2,
        base_width=4,
        depth=2,
        norm=norm,
        upsample=upsample,  # type: ignore[arg-type]
        residual=residual,
        skip=skip,
    )
    model = UNet(cfg)
    x = torch.randn(2, 1, 19, 23)
    out = model(x)
    assert out.shape == (2, 2, 19, 23)
    out.square().mean().backward()  # type: ignore[no-untyped-call]
    grad = model.first_layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradients_reach_every_parameter() -> None:
    model = UNet(UNetConfig(base_width=4, depth=3))
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # type: ignore[no-untyped-call]
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_skip_off_is_a_plain_encoder_decoder() -> None:
    on = UNet(UNetConfig(base_width=4, depth=2, skip=True))
    off = UNet(UNetConfig(base_width=4, depth=2, skip=False))
    # Without skips the decoder convolutions take only the upsampled features.
    assert on.ups[0].conv.body[0].in_channels == 16  # 8 upsampled + 8 from the encoder
    assert off.ups[0].conv.body[0].in_channels == 8
    assert count_parameters(off) < count_parameters(on)
    # And the output depends on the input only through the bottleneck: zeroing the decoder's
    # path from the bottleneck makes the output independent of the input.
    off.eval()
    with torch.no_grad():
        for p in off.downs[-1].parameters():
            p.zero_()
        a = off(torch.randn(1, 3, 16, 16))
        b = off(torch.randn(1, 3, 16, 16))
    assert torch.allclose(a, b)


def test_skip_on_output_depends_on_encoder_features_directly() -> None:
    on = UNet(UNetConfig(base_width=4, depth=2, skip=True)).eval()
    with torch.no_grad():
        for p in on.downs[-1].parameters():
            p.zero_()
        a = on(torch.randn(1, 3, 16, 16))
        b = on(torch.randn(1, 3, 16, 16))
    assert not torch.allclose(a, b)


def test_padding_is_cropped_and_does_not_leak_between_samples() -> None:
    model = UNet(UNetConfig(base_width=4, depth=2)).eval()
    x = torch.randn(3, 3, 21, 22)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_bad_config_and_input_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=1)
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        UNetConfig(depth=0)
    with pytest.raises(ValueError, match="unknown architecture field"):
        UNetConfig.from_dict({"width": 3})
    model = UNet(UNetConfig(in_channels=3, base_width=4, depth=2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 8, 8))
