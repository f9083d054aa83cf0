"""Tests for the multi-domain image data: parsing, splitting and the DataModule (the
transforms: ``test_image_transforms.py``)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.data.image_folders import (
    build_class_index,
    leave_one_domain_out,
    read_split_file,
    scan_domain_folders,
)
from app.data.images import DomainImageDataModule, DomainImageDataset, collate_images

PACS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pacs"
COLORS = {"dog": (255, 0, 0), "horse": (0, 0, 255), "house": (0, 255, 0)}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def write_tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """Write ``root/<domain>/<class>/<i>.<ext>`` 8x8 images coloured by class."""
    exts = ["png", "jpg", "JPEG", "bmp"]
    for domain, classes in layout.items():
        for cls, n in classes.items():
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), COLORS.get(cls, (9, 9, 9))).save(
                    folder / f"{i:03d}.{exts[i % len(exts)]}"
                )
    return root


def small_layout(n: int = 5) -> dict[str, dict[str, int]]:
    return {d: {"dog": n, "horse": n + 1} for d in ("art_painting", "cartoon", "photo", "sketch")}


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    from transformers import ViTImageProcessor

    folder = tmp_path / "ckpt"
    ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=list(MEAN), image_std=list(STD)
    ).save_pretrained(folder)
    return str(folder)


# ----- parsing -----


def test_scan_domain_folders_sorted_and_filtered(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "PACS", {"photo": {"horse": 2, "dog": 4}, "cartoon": {"dog": 1}})
    (root / "photo" / "dog" / "notes.txt").write_text("not an image")
    (root / "photo" / "dog" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(root / "photo" / "dog" / "nested" / "x.PNG")
    (root / "stray").mkdir()  # no class folders: not a domain
    found = scan_domain_folders(root)
    assert list(found) == ["cartoon", "photo"]
    assert found["cartoon"] == [("cartoon/dog/000.png", "dog")]
    photo = found["photo"]
    assert [c for _, c in photo] == ["dog"] * 5 + ["horse"] * 2
    assert photo[:5] == [
        ("photo/dog/000.png", "dog"),
        ("photo/dog/001.jpg", "dog"),
        ("photo/dog/002.JPEG", "dog"),
        ("photo/dog/003.bmp", "dog"),
        ("photo/dog/nested/x.PNG", "dog"),
    ]
    assert scan_domain_folders(root) == found
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_domain_folders(tmp_path / "nowhere")


def test_read_split_file(tmp_path: Path) -> None:
    path = tmp_path / "clipart_train.txt"
    path.write_text("clipart/dog/a.jpg 0\n\nclipart/Real World/b.jpg 12\n")
    assert read_split_file(path) == [("clipart/dog/a.jpg", 0), ("clipart/Real World/b.jpg", 12)]
    path.write_text("clipart/dog/a.jpg 0\nclipart/dog/b.jpg\n")
    with pytest.raises(ValueError, match=r"clipart_train\.txt:2"):
        read_split_file(path)
    path.write_text("clipart/dog/a.jpg minus1\n")
    with pytest.raises(ValueError, match=r"clipart_train\.txt:1"):
        read_split_file(path)


def test_class_index_missing_class(caplog: pytest.LogCaptureFixture) -> None:
    items = {"a": [("x", "dog"), ("y", "cat")], "b": [("z", "dog")]}
    with pytest.raises(ValueError, match=r"'cat' missing from domain 'b'"):
        build_class_index(items)
    with caplog.at_level(logging.WARNING):
        assert build_class_index(items, allow_missing_classes=True) == ["cat", "dog"]
    assert "'cat' missing from domain 'b'" in caplog.text


# ----- splitting -----


def test_leave_one_domain_out_partition_and_holdout() -> None:
    sizes = {"a": 50, "b": 34, "c": 7, "d": 20}
    items = {d: [f"{d}/{i}" for i in range(n)] for d, n in sizes.items()}
    split = leave_one_domain_out(items, ["c"], holdout_fraction=0.2, seed=3)
    everything = [x for _, x in split.train + split.val + split.test]
    assert Counter(everything) == Counter(x for v in items.values() for x in v)  # exactly once
    assert {x for _, x in split.test} == set(items["c"])
    val_per_domain = Counter(d for d, _ in split.val)
    assert val_per_domain == {"a": 10, "b": 6, "d": 4}  # int(n * 0.2) from EACH train domain
    assert all(x.startswith(d) for d, x in split.train + split.val + split.test)
    again = leave_one_domain_out(items, ["c"], holdout_fraction=0.2, seed=3)
    assert again.val == split.val and again.train == split.train
    other = leave_one_domain_out(items, ["c"], holdout_fraction=0.2, seed=4)
    assert other.val != split.val
    only_ab = leave_one_domain_out(items, ["c"], 0.2, seed=3, train_domains=["a", "b"])
    assert {d for d, _ in only_ab.train} == {"a", "b"}
    assert [x for d, x in only_ab.val if d == "a"] == [x for d, x in split.val if d == "a"]


def test_split_errors() -> None:
    items = {"photo": ["p1", "p2"], "sketch": ["s1"], "empty": []}
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['clipart'\].*'photo'.*'sketch'"):
        leave_one_domain_out(items, ["clipart"])
    with pytest.raises(ValueError, match=r"\['sketch'\] are both test and train"):
        leave_one_domain_out(items, ["sketch"], train_domains=["photo", "sketch"])
    with pytest.raises(ValueError, match="training set is empty"):
        leave_one_domain_out(items, ["sketch"], train_domains=["empty"])
    with pytest.raises(ValueError, match="no training domain left"):
        leave_one_domain_out(items, ["photo", "sketch", "empty"])
    with pytest.raises(ValueError, match="holdout_fraction"):
        leave_one_domain_out(items, ["sketch"], holdout_fraction=1.0)


# ----- DataModule -----


def test_datamodule_batches_and_labels(tmp_path: Path, checkpoint: str) -> None:
    write_tree(tmp_path / "PACS", small_layout())
    dm = DomainImageDataModule(
        "pacs", ["sketch", "cartoon"], checkpoint, data_dir=str(tmp_path), batch_size=4
    )
    assert dm.num_labels == 2 and dm.class_names == ["dog", "horse"]
    assert dm.test_domain_names == ["sketch", "cartoon"]
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 2 * 11 and len(dm.val_set) == 2 * 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["domain"].dtype == torch.long
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and len(dm.predict_dataloader()) == 2
    for loader, domain in zip(loaders, dm.test_domain_names, strict=True):
        seen = 0
        for batch in loader:
            assert set(batch) == {"pixel_values", "labels", "domain"}
            assert (batch["domain"] == dm.domain_names.index(domain)).all()
            # Label id must match the image content: dog is red, horse is blue.
            red_minus_blue = batch["pixel_values"][:, 0].mean((1, 2)) * STD[0] + MEAN[0]
            red_minus_blue -= batch["pixel_values"][:, 2].mean((1, 2)) * STD[2] + MEAN[2]
            expected = torch.where(red_minus_blue > 0, 0, 1)
            assert torch.equal(batch["labels"], expected)
            seen += len(batch["labels"])
        assert seen == 11
    val_domains = torch.cat([b["domain"] for b in dm.val_dataloader()])
    assert sorted(val_domains.tolist()) == [0, 0, 2, 2]  # art_painting, photo hold-outs


def test_datamodule_errors(tmp_path: Path, checkpoint: str) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*'domainnet'.*'pacs'"):
        DomainImageDataModule("mnist", ["x"], checkpoint)
    dm = DomainImageDataModule("vlcs", ["LabelMe"], checkpoint, data_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"(?s)looked in.*none.*data_dir.*hub_dataset"):
        dm.setup()
    write_tree(tmp_path / "pacs", small_layout(2))
    dm = DomainImageDataModule("pacs", ["clipart"], checkpoint, data_dir=str(tmp_path / "pacs"))
    with pytest.raises(ValueError, match=r"unknown domain.*'art_painting'"):
        _ = dm.num_labels
    dm = DomainImageDataModule(
        "pacs", ["photo"], checkpoint, data_dir=str(tmp_path), train_domains=["photo", "sketch"]
    )
    with pytest.raises(ValueError, match="both test and train"):
        dm.setup()
    dm = DomainImageDataModule("pacs", ["photo"], str(tmp_path / "pacs"), data_dir=str(tmp_path))
    with pytest.raises(OSError, match="image processor"):
        dm.setup()


def test_labels_known_at_start_up_from_listings_only(
    tmp_path: Path, checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.data.images as images

    write_tree(tmp_path / "PACS", small_layout())

    def no_scan(root: object) -> None:
        raise AssertionError("the CLI links must not list every image")

    monkeypatch.setattr(images, "scan_domain_folders", no_scan)
    dm = DomainImageDataModule("pacs", ["sketch"], checkpoint, data_dir=str(tmp_path))
    assert dm.task == dm.dataset == "pacs"
    assert dm.num_labels == 2 and dm.class_names == ["dog", "horse"]
    assert dm.domain_names == ["art_painting", "cartoon", "photo", "sketch"]
    monkeypatch.undo()
    dm.setup()
    assert len(dm.test_sets[0]) == 11
    # A class folder without images would make the model's head one class too wide.
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        (tmp_path / "PACS" / domain / "zebra").mkdir()
    dm = DomainImageDataModule("pacs", ["sketch"], checkpoint, data_dir=str(tmp_path))
    assert dm.num_labels == 3
    with pytest.raises(ValueError, match=r"\['zebra'\].*hold no image"):
        dm.setup()


def test_loaders_resumable_and_seeded_by_the_run(
    tmp_path: Path, checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.data.resumable import EpochShuffleSampler, ResumableDataLoader

    write_tree(tmp_path / "PACS", small_layout())
    dm = DomainImageDataModule(
        "pacs", ["sketch"], checkpoint, data_dir=str(tmp_path), batch_size=4, augment=False
    )
    dm.setup()
    assert dm.eval_batch_size == 8 and dm.val_dataloader().batch_size == 8

    def first_labels(seed: int) -> list[int]:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader)
        assert isinstance(loader.sampler, EpochShuffleSampler) and loader.sampler.seed == seed
        return torch.cat([b["labels"] for b in loader]).tolist()

    assert first_labels(1) == first_labels(1) != first_labels(2)


def test_bad_image_skip_and_error(
    tmp_path: Path, checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_tree(tmp_path / "PACS", small_layout(3))
    (root / "photo" / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    dm = DomainImageDataModule("pacs", ["photo"], checkpoint, data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "skipped 1 unreadable image(s)" in caplog.text
    assert len(dm.test_sets[0]) == 3 + 4
    dm = DomainImageDataModule(
        "pacs", ["photo"], checkpoint, data_dir=str(tmp_path), on_bad_image="error"
    )
    with pytest.raises(OSError, match="broken.jpg"):
        dm.setup()

    # A truncated file passes the header check and fails only when decoded.
    noise = torch.randint(0, 256, (16 * 16 * 3,), generator=torch.Generator().manual_seed(0))
    path = root / "cartoon" / "dog" / "000.png"
    Image.frombytes("RGB", (16, 16), bytes(noise.tolist())).save(path)
    path.write_bytes(path.read_bytes()[:-100])  # IDAT cut short, header intact
    dm = DomainImageDataModule("pacs", ["cartoon"], checkpoint, data_dir=str(tmp_path))
    dm.setup()
    dataset = dm.test_sets[0]
    assert dataset[0] is None
    batch = collate_images([dataset[0], dataset[1]])
    assert batch["labels"].shape == (1,)
    strict = DomainImageDataset(dataset.samples, dataset.loader, dataset.transform, "error")
    with pytest.raises(OSError, match="000.png"):
        strict[0]


def test_domainnet_split_files(tmp_path: Path, checkpoint: str) -> None:
    layout = {d: {"dog": 4, "horse": 3} for d in ("real", "sketch", "clipart")}
    root = write_tree(tmp_path / "domain_net", layout)
    for domain, rows in scan_domain_folders(root).items():
        lines = [f"{rel} {0 if cls == 'dog' else 1}" for rel, cls in rows]
        (root / f"{domain}_train.txt").write_text("\n".join(lines[1:]) + "\n")
        (root / f"{domain}_test.txt").write_text(lines[0] + "\n")
    dm = DomainImageDataModule(
        "domainnet", ["sketch"], checkpoint, data_dir=str(tmp_path), use_split_files=True
    )
    dm.setup()
    assert dm.domain_names == ["clipart", "real", "sketch"]
    assert len(dm.train_set) == 2 * 6 and len(dm.val_set) == 2 and len(dm.test_sets[0]) == 7
    (root / "real_test.txt").write_text("real/dog/000.png 1\n")
    dm = DomainImageDataModule(
        "domainnet", ["sketch"], checkpoint, data_dir=str(tmp_path), use_split_files=True
    )
    with pytest.raises(ValueError, match=r"real_test\.txt.*does not match"):
        dm.setup()
    with pytest.raises(ValueError, match="use_split_files"):
        DomainImageDataModule("pacs", ["sketch"], checkpoint, use_split_files=True)


def test_hub_dataset(monkeypatch: pytest.MonkeyPatch, checkpoint: str) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = DomainImageDataModule("pacs", ["sketch"], checkpoint, hub_dataset="someone/pacs")
    with pytest.raises(FileNotFoundError, match=r"someone/pacs.*data_dir"):
        dm.prepare_data()

    rows = [
        (d, c) for d in ("art_painting", "photo", "sketch") for c in ("dog", "horse") for _ in "ab"
    ]
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8), COLORS[c]) for _, c in rows],
            "label": [c for _, c in rows],
            "domain": [d for d, _ in rows],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=["dog", "horse"]),
                "domain": datasets.Value("string"),
            }
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict(train=table))
    dm = DomainImageDataModule("pacs", ["sketch"], checkpoint, hub_dataset="someone/pacs")
    dm.setup()
    assert dm.class_names == ["dog", "horse"] and len(dm.test_sets[0]) == 4
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["labels"].tolist() == [0, 0, 1, 1]
    monkeypatch.setattr(datasets, "load_dataset", lambda name: table.remove_columns("domain"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['domain'\]"):
        DomainImageDataModule("pacs", ["sketch"], checkpoint, hub_dataset="x").setup()


# ----- the real PACS -----


@pytest.mark.skipif(not PACS.is_dir(), reason=f"real PACS not found at {PACS}")
def test_real_pacs_counts() -> None:
    found = scan_domain_folders(PACS)
    sizes = {d: len(items) for d, items in found.items()}
    assert sizes == {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    assert sum(sizes.values()) == 9991
    assert build_class_index(found) == [
        "dog", "elephant", "giraffe", "guitar", "horse", "house", "person"
    ]
    split = leave_one_domain_out(found, ["sketch"])
    assert len(split.val) == 409 + 468 + 334 and len(split.test) == 3929


@pytest.mark.skipif(not PACS.is_dir(), reason=f"real PACS not found at {PACS}")
def test_real_pacs_datamodule(checkpoint: str) -> None:
    dm = DomainImageDataModule(
        "pacs", ["photo"], checkpoint, data_dir=str(PACS.parent), batch_size=8
    )
    assert dm.num_labels == 7 and dm.domain_names == ["art_painting", "cartoon", "photo", "sketch"]
    dm.setup()
    assert len(dm.test_sets[0]) == 1670
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert batch["labels"].max() < 7
