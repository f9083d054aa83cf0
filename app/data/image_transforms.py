"""Image transforms for ViT fine-tuning with PIL and torch only (no torchvision).

They mirror DomainBed's torchvision pipelines (Gulrajani & Lopez-Paz, 2021):

* eval: resize the shorter side, centre crop to the model size, to tensor, normalise;
* train: ``RandomResizedCrop(size, scale=(0.7, 1.0))``, horizontal flip, ``ColorJitter(0.3, 0.3,
  0.3, 0.3)`` (the four adjustments in random order), ``RandomGrayscale(0.1)``, to tensor,
  normalise.

Size, mean and std come from a Hugging Face image processor (e.g. ``ViTImageProcessor``) or
explicit arguments. Random draws use a ``torch.Generator`` when one is passed and torch's global
RNG otherwise; the latter is what DataLoader workers seed per worker, so runs under
``seed_everything`` are reproducible and workers do not repeat each other's augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class ImageGeometry:
    """What a model expects of its input images."""

    size: tuple[int, int]
    """Output ``(height, width)``."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel std divided by after subtracting the mean."""
    resample: Image.Resampling = Image.Resampling.BILINEAR
    """PIL filter used for resizing."""


def _lookup(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, int):
        return None
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, key, None)


def _size_of(spec: Any) -> tuple[int, int] | None:
    if isinstance(spec, int):
        return (spec, spec)
    height, width = _lookup(spec, "height"), _lookup(spec, "width")
    if height and width:
        return (int(height), int(width))
    edge = _lookup(spec, "shortest_edge")
    return (int(edge), int(edge)) if edge else None


def image_geometry(
    processor: Any = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageGeometry:
    """Read size, mean, std and resampling from an image processor, with explicit overrides.

    The size is the processor's ``crop_size`` when it centre crops, else its ``size``
    (``height``/``width`` or ``shortest_edge``).

    Args:
        processor: A Hugging Face image processor, or ``None`` to use only explicit values.
        image_size: Square output size overriding the processor's.
        mean: Per-channel mean overriding the processor's ``image_mean``.
        std: Per-channel std overriding the processor's ``image_std``.

    Raises:
        ValueError: If a value is given by neither the processor nor the arguments, or is bad.
    """
    size = (image_size, image_size) if image_size else None
    if size is None and processor is not None:
        if getattr(processor, "do_center_crop", False):
            size = _size_of(getattr(processor, "crop_size", None))
        size = size or _size_of(getattr(processor, "size", None))
    mean = mean if mean is not None else getattr(processor, "image_mean", None)
    std = std if std is not None else getattr(processor, "image_std", None)
    if size is None or mean is None or std is None:
        raise ValueError(
            "image size, mean and std must come from an image processor or explicit arguments; "
            f"got size={size}, mean={mean}, std={std}"
        )
    if min(size) <= 0 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"bad image geometry: size={size}, mean={mean}, std={std}")
    resample = getattr(processor, "resample", None)
    resample = Image.Resampling(int(resample)) if resample is not None else Image.BILINEAR
    return ImageGeometry(
        size=size,
        mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in std),  # type: ignore[arg-type]
        resample=resample,
    )


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float ``(3, H, W)`` tensor in [0, 1] (RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(tensor: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a ``(3, H, W)`` tensor."""
    mean = torch.tensor(geometry.mean, dtype=tensor.dtype).view(3, 1, 1)
    std = torch.tensor(geometry.std, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor - mean) / std


def resize_center_crop(
    image: Image.Image, size: tuple[int, int], resample: Image.Resampling
) -> Image.Image:
    """Resize so the image covers ``size`` (aspect kept), then take the centre ``size`` crop."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high]``."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: return ``(left, top, w, h)``.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; if
    none fits, a centre crop clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(width - w, generator), _randint(height - h, generator), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]), as torchvision does for PIL images."""
    if abs(shift) < 1e-12:
        return image
    h, s, v = image.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8).astype(np.int16) + round(shift * 255)
    h = Image.fromarray((hue % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class EvalTransform:
    """Deterministic eval pipeline: resize, centre crop, to tensor, normalise."""

    def __init__(self, geometry: ImageGeometry) -> None:
        """Build it.

        Args:
            geometry: Output size, normalisation and resampling filter.
        """
        self.geometry = geometry

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return the normalised ``(3, H, W)`` float tensor; ``generator`` is unused."""
        image = resize_center_crop(image.convert("RGB"), self.geometry.size, self.geometry.resample)
        return normalize(to_tensor(image), self.geometry)


class TrainTransform:
    """DomainBed's training augmentation; see the module docstring."""

    def __init__(
        self,
        geometry: ImageGeometry,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.3,
        hue: float = 0.3,
        grayscale_p: float = 0.1,
    ) -> None:
        """Build it.

        Args:
            geometry: Output size, normalisation and resampling filter.
            scale: Area fraction range of the random crop; DomainBed uses (0.7, 1.0),
                torchvision's default is (0.08, 1.0).
            ratio: Aspect-ratio range of the random crop.
            flip_p: Probability of a horizontal flip.
            brightness: Brightness factor drawn from ``[1 - b, 1 + b]``.
            contrast: Contrast factor drawn from ``[1 - c, 1 + c]``.
            saturation: Saturation factor drawn from ``[1 - s, 1 + s]``.
            hue: Hue shift drawn from ``[-hue, hue]`` turns; at most 0.5.
            grayscale_p: Probability of converting to (3-channel) grayscale.

        Raises:
            ValueError: For an empty or out-of-range parameter.
        """
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad crop scale {scale} or ratio {ratio}")
        if not 0 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0:
            raise ValueError("colour jitter strengths must be >= 0 and hue in [0, 0.5]")
        self.geometry = geometry
        self.scale, self.ratio = scale, ratio
        self.flip_p, self.grayscale_p = flip_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            contrast,
            saturation,
            hue,
        )

    def color_jitter(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        """torchvision's ``ColorJitter``: the four adjustments in a random order."""
        factors = (
            _uniform(1 - self.brightness, 1 + self.brightness, generator),
            _uniform(1 - self.contrast, 1 + self.contrast, generator),
            _uniform(1 - self.saturation, 1 + self.saturation, generator),
            _uniform(-self.hue, self.hue, generator),
        )
        for op in torch.randperm(4, generator=generator).tolist():
            if op == 0:
                image = ImageEnhance.Brightness(image).enhance(factors[0])
            elif op == 1:
                image = ImageEnhance.Contrast(image).enhance(factors[1])
            elif op == 2:
                image = ImageEnhance.Color(image).enhance(factors[2])
            else:
                image = adjust_hue(image, factors[3])
        return image

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return an augmented, normalised ``(3, H, W)`` float tensor.

        Args:
            image: Input image (any PIL mode).
            generator: Source of randomness; ``None`` uses torch's global RNG.
        """
        image = image.convert("RGB")
        left, top, w, h = random_resized_crop_box(
            image.width, image.height, self.scale, self.ratio, generator
        )
        height, width = self.geometry.size
        image = image.resize(
            (width, height), self.geometry.resample, box=(left, top, left + w, top + h)
        )
        if float(torch.rand((), generator=generator)) < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = self.color_jitter(image, generator)
        if float(torch.rand((), generator=generator)) < self.grayscale_p:
            image = image.convert("L").convert("RGB")
        return normalize(to_tensor(image), self.geometry)
