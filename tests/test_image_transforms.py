"""Image transforms of the multi-domain image data: normalisation and crops against hand
computations, the processor's geometry, seeded augmentation, grayscale and hue."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from app.data.image_transforms import (
    EvalTransform,
    ImageGeometry,
    TrainTransform,
    adjust_hue,
    image_geometry,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def test_eval_normalisation_matches_hand_computation() -> None:
    color = (10, 120, 250)
    geometry = ImageGeometry(size=(12, 12), mean=MEAN, std=STD)
    out = EvalTransform(geometry)(Image.new("RGB", (30, 20), color))
    assert out.shape == (3, 12, 12) and out.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255.0 - MEAN[c]) / STD[c]
        assert torch.allclose(out[c], torch.full((12, 12), expected), atol=1e-5)


def test_eval_center_crop_keeps_the_middle() -> None:
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # blue middle third
    out = EvalTransform(ImageGeometry(size=(10, 10), mean=(0, 0, 0), std=(1, 1, 1)))(image)
    assert torch.allclose(out[2], torch.ones(10, 10)) and out[0].max() < 1e-6


def test_geometry_from_processor_and_override() -> None:
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 24, "width": 32}, image_mean=MEAN, image_std=STD)
    geometry = image_geometry(proc)
    assert geometry.size == (24, 32) and geometry.mean == MEAN and geometry.std == STD
    assert image_geometry(proc, image_size=8).size == (8, 8)
    assert image_geometry(None, image_size=4, mean=MEAN, std=STD).size == (4, 4)
    with pytest.raises(ValueError, match="image size, mean and std"):
        image_geometry(None, image_size=4)


def test_train_transform_shape_and_determinism() -> None:
    image = Image.frombytes("RGB", (20, 14), bytes(range(256)) * 3 + bytes(20 * 14 * 3 - 768))
    tf = TrainTransform(ImageGeometry(size=(16, 16), mean=MEAN, std=STD))

    def run(seed: int) -> torch.Tensor:
        return tf(image, torch.Generator().manual_seed(seed))

    assert run(0).shape == (3, 16, 16)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    torch.manual_seed(5)
    a = tf(image)
    torch.manual_seed(5)
    assert torch.equal(a, tf(image))  # global RNG path (DataLoader workers)


def test_grayscale_and_hue() -> None:
    geometry = ImageGeometry(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    tf = TrainTransform(geometry, grayscale_p=1.0)
    out = tf(Image.new("RGB", (8, 8), (200, 30, 90)), torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert adjust_hue(red, 0.0) is red
    r, g, b = adjust_hue(red, 1 / 3).getpixel((0, 0))
    assert g > 200 and r < 60 and b < 60  # a third of a turn: red -> green
