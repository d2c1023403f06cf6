from __future__ import annotations

import numpy as np
import pytest
import torch

from model.bundle import InputPolicy
from model.inference import blended_logits, finish, make_plan, resize_argmax, tile_origins, to_tensor
from model.unet import UNet, UNetConfig


def policy(sizing: str = "tile", size: int = 32, channels: int = 3, overlap: float = 0.25) -> InputPolicy:
    return InputPolicy(channels, (0.5,) * channels, (0.25,) * channels, sizing, size, overlap)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(10, 32, 0.25), (32, 32, 0.25), (33, 32, 0.25), (100, 32, 0.5), (4000, 256, 0.25)]
)
def test_tiles_cover_the_image_and_overlap(length: int, tile: int, overlap: float) -> None:
    starts = tile_origins(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + min(tile, length) == length
    gaps = np.diff(starts)
    assert (gaps <= tile * (1 - overlap) + 1).all()  # never less overlap than asked


def test_resize_plan_has_one_input_of_the_policy_size() -> None:
    img = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    plan = make_plan(img, policy("resize", 32))
    assert plan.inputs.shape == (1, 3, 32, 32)
    mask = finish(plan, torch.randn(1, 2, 32, 32))
    assert mask.shape == (70, 50) and mask.dtype == np.uint8


def test_logits_are_resized_before_the_argmax() -> None:
    # Two classes whose logits cross between pixels: the upsampled-logit boundary falls between the
    # low-resolution pixels, which nearest upsampling of the class map cannot produce.
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1] = torch.tensor([[-1.0, 3.0]])
    mask = resize_argmax(logits[0], 1, 8).numpy()
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]  # nearest would give 4 + 4


def test_banded_resize_equals_single_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.inference as inf

    logits = torch.randn(3, 9, 11)
    whole = resize_argmax(logits, 157, 203).numpy()
    monkeypatch.setattr(inf, "BAND_PIXELS", 203 * 7)  # 7-row bands
    banded = resize_argmax(logits, 157, 203).numpy()
    assert (whole == banded).mean() > 0.999  # identical up to float rounding at exact ties


def test_tiled_equals_untiled_and_has_no_seams() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=3, num_classes=2, base_width=4, depth=2)).eval()
    rng = np.random.default_rng(0)
    # A smooth image, so the network's output is smooth too and seams would stand out.
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(small).resize((150, 130), Image.Resampling.BICUBIC))
    p = policy("tile", 64, overlap=0.5)
    plan = make_plan(img, p)
    assert plan.inputs.shape[0] > 4
    with torch.no_grad():
        tiled = blended_logits(plan, model(plan.inputs))
        whole = model(to_tensor(img, p)[None])[0]  # the whole image in one pass
    assert tiled.shape == whole.shape == (2, 130, 150)
    # A binary model's blended logits are (0, class 1 minus class 0): the same argmax and softmax.
    assert bool((tiled[0] == 0).all())
    tiled, whole = tiled[1:] - tiled[:1], whole[1:] - whole[:1]
    err = (tiled - whole).abs()
    assert float(err.mean()) < 0.05 * float(whole.abs().mean())
    assert ((tiled[0] > 0) == (whole[0] > 0)).float().mean() > 0.98
    # No seam: the error along tile borders is not much larger than elsewhere.
    borders = {y for y, _ in plan.origins} | {y + 64 for y, _ in plan.origins}
    rows = [r for r in borders if 0 < r < 130]
    assert float(err[:, rows].mean()) < 3 * float(err.mean()) + 1e-4


def test_tiles_of_a_small_image_are_padded_with_the_mean() -> None:
    img = np.full((20, 50), 200, dtype=np.uint8)
    plan = make_plan(img, policy("tile", 32, channels=1))
    assert plan.inputs.shape == (2, 1, 32, 32)  # one shape for every input of the model
    assert bool((plan.inputs[:, :, 20:] == 0).all()) and bool((plan.inputs[:, :, :20] != 0).all())
    logits = torch.randn(2, 3, 32, 32)
    logits[:, 2, 20:] = 100  # what the padding predicts never reaches the mask
    mask = finish(plan, logits)
    assert mask.shape == (20, 50)
    assert plan.origins == [(0, 0), (0, 18)]
    assert torch.allclose(blended_logits(plan, logits)[:, :, :18], logits[0, :, :20, :18])  # tile 0 alone


def test_channel_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="channels"):
        make_plan(np.zeros((8, 8, 3), np.uint8), policy("resize", 16, channels=1))


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_already_at_the_input_size_is_copied_as_pillow_would_give_it(channels: int) -> None:
    from PIL import Image

    from model.pixels import resize_image

    policy = InputPolicy(channels, (0.5,) * channels, (0.25,) * channels, "resize", 24)
    image = np.random.default_rng(channels).integers(0, 256, (24, 24, channels), dtype=np.uint8)
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    out = resize_image(image, policy)
    assert out.shape == (24, 24, channels) and out.flags.writeable and out.flags.c_contiguous
    assert np.array_equal(out, np.array(pil).reshape(24, 24, channels))
    out[0, 0] ^= 255
    assert not np.array_equal(out, image)  # a copy: the caller's image is never written
