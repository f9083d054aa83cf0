"""The pieces of an image dataset: what it is (:class:`DatasetInfo`), where its images come from
(files or a hub dataset), the torch ``Dataset`` over them and the batch collation.

Used by :class:`app.data.images.DomainImageDataModule`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset lives locally and which domains identify it."""

    folders: tuple[str, ...]
    """Folder names tried under ``data_dir`` (DomainBed's first)."""
    domains: tuple[str, ...]
    """Known domain folder names; ``data_dir`` holding any of them is the dataset folder."""


DATASETS: dict[str, DatasetInfo] = {
    "pacs": DatasetInfo(("PACS", "pacs"), ("art_painting", "cartoon", "photo", "sketch")),
    "vlcs": DatasetInfo(("VLCS", "vlcs"), ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "office_home": DatasetInfo(
        ("office_home", "OfficeHome", "officehome", "OfficeHomeDataset_10072016"),
        ("Art", "Clipart", "Product", "Real World", "Real_World", "RealWorld"),
    ),
    "terra_incognita": DatasetInfo(
        ("terra_incognita", "TerraIncognita"),
        ("location_100", "location_38", "location_43", "location_46"),
    ),
    "domainnet": DatasetInfo(
        ("domain_net", "domainnet", "DomainNet"),
        ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    ),
}


class Sample(NamedTuple):
    """One example: ``source`` is a path relative to the dataset folder or a hub row index."""

    source: str | int
    label: int
    domain: int


class FileLoader:
    """Open ``root / relpath`` as an RGB PIL image (picklable, for DataLoader workers)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, source: str | int) -> str:
        return str(self.root / str(source))

    def __call__(self, source: str | int) -> Image.Image:
        with Image.open(self.root / str(source)) as image:
            return image.convert("RGB")


class HubLoader:
    """Read the ``image`` column of one row of a ``datasets.Dataset``."""

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset, self.name = dataset, name

    def describe(self, source: str | int) -> str:
        return f"{self.name} row {source}"

    def __call__(self, source: str | int) -> Image.Image:
        image = self.dataset[int(source)]["image"]
        if isinstance(image, dict):  # undecoded {"bytes", "path"}
            image = Image.open(image.get("path") or io.BytesIO(image["bytes"]))
        return image.convert("RGB")


class DomainImageDataset(Dataset):
    """Map-style dataset of :class:`Sample`; items are dicts, ``None`` for a skipped bad image."""

    def __init__(
        self,
        samples: Sequence[Sample],
        loader: FileLoader | HubLoader,
        transform: Callable[[Image.Image], torch.Tensor],
        on_bad_image: Literal["skip", "error"] = "skip",
    ) -> None:
        self.samples, self.loader = list(samples), loader
        self.transform, self.on_bad_image = transform, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            image = self.loader(sample.source)
        except (OSError, ValueError, SyntaxError) as exc:
            where = self.loader.describe(sample.source)
            if self.on_bad_image == "error":
                raise OSError(f"cannot read image {where}: {exc}") from exc
            log.warning("skipping unreadable image %s: %s", where, exc)
            return None
        pixels = self.transform(image)
        return {"pixel_values": pixels, "label": sample.label, "domain": sample.domain}


def collate_images(examples: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Stack examples into ``pixel_values (B,3,H,W)``, ``labels (B,)``, ``domain (B,)``.

    ``None`` entries (images skipped while loading) are dropped, so a batch may be smaller.
    """
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        log.warning("dropped %d unreadable image(s) from a batch", len(examples) - len(kept))
    if not kept:
        raise RuntimeError("every image of a batch was unreadable; check the data folder")
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in kept]),
        "labels": torch.tensor([e["label"] for e in kept], dtype=torch.long),
        "domain": torch.tensor([e["domain"] for e in kept], dtype=torch.long),
    }


def find_dataset_folder(dataset: str, data_dir: str | None) -> Path:
    """Return the folder holding the domain folders of ``dataset``.

    ``data_dir`` is either that folder (it contains a known domain folder) or its parent (it
    contains one of the dataset's usual folder names, e.g. ``PACS`` or ``pacs``). ``None`` means
    ``./data``.

    Raises:
        FileNotFoundError: Saying where it looked and how to provide the data.
    """
    info = DATASETS[dataset]
    root = Path(data_dir if data_dir is not None else "data").expanduser()
    looked = [root / name for name in info.folders] + [root]
    for folder in looked[:-1]:
        if folder.is_dir():
            return folder
    if root.is_dir() and any((root / d).is_dir() for d in info.domains):
        return root
    raise FileNotFoundError(
        f"no {dataset!r} data found; looked in {[str(p) for p in looked]}. Set data_dir to a "
        f"folder with one sub-folder per domain (e.g. {list(info.domains)}), each with one "
        "sub-folder per class, or to its parent; or set hub_dataset to a Hugging Face dataset "
        "with columns image, label, domain."
    )
