"""LightningDataModule for multi-domain image classification (DomainBed sets and DomainNet).

Local data uses the datasets' own layout, one folder per domain with one sub-folder per class
(see :mod:`app.data.image_folders`); DomainNet may also use its official split files. Users with
the hub can instead pass ``hub_dataset``: a dataset with columns ``image``, ``label``, ``domain``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader

from app.data.image_datasets import (
    DATASETS,
    DomainImageDataset,
    FileLoader,
    HubLoader,
    Sample,
    collate_images,
    find_dataset_folder,
)
from app.data.image_folders import (
    DomainSplit,
    build_class_index,
    leave_one_domain_out,
    list_domain_classes,
    resolve_domains,
    scan_domain_folders,
    split_from_files,
)
from app.data.image_transforms import EvalTransform, TrainTransform, image_geometry
from app.data.resumable import private_generator, run_seed, training_loader
from app.errors import ConfigError
from app.hub import resolve_checkpoint

log = logging.getLogger(__name__)


class DomainImageDataModule(LightningDataModule):
    """Leave-domains-out image classification data (DomainBed protocol).

    Train is the training domains minus a random ``holdout_fraction`` of each, val is those
    hold-outs (training-domain validation), test is every image of each test domain.
    ``test_dataloader`` / ``predict_dataloader`` return one loader per test domain, in the
    order of :attr:`test_domain_names` (the order given in ``test_domains``), so metrics can
    be reported per domain. Batches are ``{"pixel_values", "labels", "domain"}``, where
    ``domain`` indexes :attr:`domain_names`. Batches mix the training domains (ERM sampling).

    The training order depends only on the run seed and the epoch and is saved in checkpoints
    (:func:`app.data.resumable.training_loader`), as in the GLUE module; with
    ``num_workers=0`` the augmentation draws from torch's global generator, which the task
    module checkpoints, so a resumed run continues exactly. (With workers, each worker's
    augmentation stream starts afresh on resume.)

    The CLI links ``task`` and ``test_domains`` to the model at parse time and
    :attr:`num_labels`, :attr:`class_names` and :attr:`domain_names` at instantiation; for
    local folders these come from directory listings only, so start-up stays fast on
    DomainNet.
    """

    def __init__(
        self,
        task: str,
        test_domains: list[str],
        checkpoint: str,
        data_dir: str | None = None,
        train_domains: list[str] | None = None,
        holdout_fraction: float = 0.2,
        image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        use_split_files: bool = False,
        on_bad_image: Literal["skip", "error"] = "skip",
        hub_dataset: str | None = None,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        allow_missing_classes: bool = False,
    ) -> None:
        """Store the options; nothing is read until :meth:`setup` (or a property needs it).

        Args:
            task: The dataset: ``pacs``, ``vlcs``, ``office_home``, ``terra_incognita`` or
                ``domainnet`` (named ``task`` like the other DataModules' option, which the CLI
                links to the model).
            test_domains: Held-out domains, e.g. ``["sketch"]``.
            checkpoint: Model checkpoint (hub name or folder) whose image processor gives the
                input size and normalisation; linked from the model.
            data_dir: Folder with one sub-folder per domain, or its parent; ``None`` means
                ``./data``. Ignored when ``hub_dataset`` is set.
            train_domains: Training domains; ``None`` means all domains not tested on.
            holdout_fraction: Fraction of each training domain held out for validation.
            image_size: Square input size overriding the processor's.
            batch_size: Training examples per batch (per device).
            eval_batch_size: Examples per validation / test batch (default ``2 * batch_size``).
            num_workers: DataLoader worker processes.
            seed: Seed of the hold-out split. The training order follows the run seed
                (``seed_everything``), as in every DataModule here.
            use_split_files: DomainNet only: train on ``<domain>_train.txt`` and validate on
                ``<domain>_test.txt`` of the training domains instead of a random hold-out.
            on_bad_image: ``skip`` drops unreadable images (count logged at WARNING),
                ``error`` raises naming the file.
            hub_dataset: Hugging Face dataset with columns ``image``, ``label``, ``domain``,
                loaded with ``datasets.load_dataset`` (all splits pooled).
            augment: Use DomainBed's training augmentation; else the eval transform.
            crop_scale: Area range of the random resized crop (torchvision's is (0.08, 1)).
            allow_missing_classes: Only warn if a class is missing from a domain.

        Raises:
            ValueError: For an unknown dataset or an invalid option.
        """
        super().__init__()
        if task not in DATASETS:
            raise ValueError(f"unknown dataset {task!r}; valid: {sorted(DATASETS)}")
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if use_split_files and (task != "domainnet" or hub_dataset):
            raise ValueError("use_split_files works only for task='domainnet' from data_dir")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        if batch_size < 1 or (eval_batch_size or 1) < 1 or num_workers < 0:
            raise ValueError("batch sizes must be >= 1 and num_workers >= 0")
        self.save_hyperparameters()
        self.task = self.dataset = task
        self.data_dir, self.checkpoint = data_dir, checkpoint
        self.test_domains, self.train_domains = list(test_domains), train_domains
        self.holdout_fraction, self.image_size, self.seed = holdout_fraction, image_size, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.use_split_files, self.hub_dataset = use_split_files, hub_dataset
        self.on_bad_image, self.allow_missing_classes = on_bad_image, allow_missing_classes
        self.augment, self.crop_scale = augment, tuple(crop_scale)
        self._index: tuple[list[str], list[str], DomainSplit[Any], Any] | None = None
        self._listing: tuple[list[str], list[str]] | None = None
        self.train_set: DomainImageDataset | None = None
        self.val_set: DomainImageDataset | None = None
        self.test_sets: list[DomainImageDataset] = []

    # ----- index: parsing and splitting (cached; no image is opened) -----

    def _build_index(self) -> tuple[list[str], list[str], DomainSplit[Any], Any]:
        """Return ``(class_names, domain_names, split of (item, class_name), loader)``."""
        if self._index is not None:
            return self._index
        if self.hub_dataset:
            by_domain, loader = self._hub_items()
        else:
            root = find_dataset_folder(self.dataset, self.data_dir)
            if self.use_split_files:
                classes, domains, split = split_from_files(
                    root, self.test_domains, self.train_domains, self.allow_missing_classes
                )
                self._index = (classes, domains, split, FileLoader(root))
                return self._index
            by_domain, loader = scan_domain_folders(root), FileLoader(root)
        classes = build_class_index(by_domain, self.allow_missing_classes)
        if self._listing is not None and self._listing != (classes, sorted(by_domain)):
            empty = sorted(set(self._listing[0]) - set(classes))
            raise ValueError(
                f"class folder(s) {empty} in {self.data_dir or 'data'} hold no image; the "
                "model was built for the class folders found at start-up. Remove them"
            )
        split = leave_one_domain_out(
            by_domain, self.test_domains, self.holdout_fraction, self.seed, self.train_domains
        )
        self._index = (classes, sorted(by_domain), split, loader)
        return self._index

    def _load_hub(self) -> Any:
        import datasets

        try:
            loaded = datasets.load_dataset(self.hub_dataset)
        except Exception as exc:  # offline, unknown name, auth: all mean "not available"
            raise FileNotFoundError(
                f"could not load hub dataset {self.hub_dataset!r} ({type(exc).__name__}: {exc}). "
                "Offline, set data_dir to a folder with one sub-folder per domain instead."
            ) from exc
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets(list(loaded.values()))
        missing = {"image", "label", "domain"} - set(loaded.column_names)
        if missing:
            raise ValueError(
                f"hub dataset {self.hub_dataset!r} lacks column(s) {sorted(missing)}; "
                f"it has {loaded.column_names}"
            )
        return loaded

    def _hub_items(self) -> tuple[dict[str, list[tuple[int, str]]], HubLoader]:
        data = self._load_hub()

        def names(column: str) -> list[str]:
            values = list(data[column])
            feature = data.features[column]
            if hasattr(feature, "int2str"):
                return [feature.int2str(int(v)) for v in values]
            if all(isinstance(v, int) for v in values):  # zero-pad so sorting keeps int order
                width = len(str(max(values, default=0)))
                return [f"{v:0{width}d}" for v in values]
            return [str(v) for v in values]

        by_domain: dict[str, list[tuple[int, str]]] = {}
        for row, (domain, label) in enumerate(zip(names("domain"), names("label"), strict=True)):
            by_domain.setdefault(domain, []).append((row, label))
        return dict(sorted(by_domain.items())), HubLoader(data, str(self.hub_dataset))

    # ----- Lightning hooks -----

    def prepare_data(self) -> None:
        """Download the hub dataset into the ``datasets`` cache (local folders need nothing)."""
        if self.hub_dataset:
            self._load_hub()

    def _processor(self) -> Any:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(resolve_checkpoint(self.checkpoint))
        except (OSError, ValueError) as exc:
            raise OSError(
                f"cannot load an image processor from checkpoint {self.checkpoint!r}; save one "
                "there (e.g. ViTImageProcessor(...).save_pretrained(folder))"
            ) from exc

    def _samples(
        self, pairs: Sequence[tuple[str, tuple[Any, str]]], loader: Any
    ) -> list[Sample]:
        classes, domains, _, _ = self._build_index()
        c_idx = {c: i for i, c in enumerate(classes)}
        d_idx = {d: i for i, d in enumerate(domains)}
        samples = [Sample(item, c_idx[c], d_idx[d]) for d, (item, c) in pairs]
        if not isinstance(loader, FileLoader):
            return samples
        good, bad = [], []
        for sample in samples:
            path = loader.root / str(sample.source)
            try:
                with Image.open(path):  # header only: cheap, catches non-images and empty files
                    good.append(sample)
            except (OSError, SyntaxError, ValueError) as exc:
                if self.on_bad_image == "error":
                    raise OSError(f"cannot read image {path}: {exc}") from exc
                bad.append(path)
        if bad:
            log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0])
        return good

    def setup(self, stage: str | None = None) -> None:
        """Parse and split the data, check images open, and build the datasets (idempotent)."""
        if self.train_set is not None:
            return
        _, _, split, loader = self._build_index()
        geometry = image_geometry(self._processor(), image_size=self.image_size)
        eval_tf = EvalTransform(geometry)
        train_tf = TrainTransform(geometry, scale=self.crop_scale) if self.augment else eval_tf

        def make(pairs: Sequence[tuple[str, Any]], tf: Any) -> DomainImageDataset:
            return DomainImageDataset(self._samples(pairs, loader), loader, tf, self.on_bad_image)

        self.train_set = make(split.train, train_tf)
        self.val_set = make(split.val, eval_tf)
        self.test_sets = [
            make([p for p in split.test if p[0] == d], eval_tf) for d in self.test_domain_names
        ]

    # ----- properties (linked into the model at instantiation) -----

    def _names(self) -> tuple[list[str], list[str]]:
        """``(class_names, domain_names)``, from directory listings while no index is built.

        Local folders (without split files) are only listed here, two levels deep, and the
        requested domains checked, so the CLI learns the label set without listing a single
        image; :meth:`_build_index` later confirms it. Otherwise the index is built.
        """
        if self._index is not None:
            return list(self._index[0]), list(self._index[1])
        try:  # at start-up: one `error:` line from the CLI, not a traceback
            if self.hub_dataset or self.use_split_files:
                classes, domains, _, _ = self._build_index()
                return list(classes), list(domains)
            if self._listing is None:
                listing = list_domain_classes(find_dataset_folder(self.dataset, self.data_dir))
                resolve_domains(list(listing), self.test_domains, self.train_domains)
                by_domain = {d: [(None, c) for c in names] for d, names in listing.items()}
                classes = build_class_index(by_domain, self.allow_missing_classes)
                self._listing = (classes, sorted(listing))
        except (FileNotFoundError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"data.init_args ({self.dataset}): {err}") from err
        return list(self._listing[0]), list(self._listing[1])

    @property
    def class_names(self) -> list[str]:
        """Sorted class names; label ``i`` is ``class_names[i]``."""
        return self._names()[0]

    @property
    def num_labels(self) -> int:
        """Number of classes (link this to the model)."""
        return len(self.class_names)

    @property
    def domain_names(self) -> list[str]:
        """All domains found, sorted; a batch's ``domain`` indexes this list."""
        return self._names()[1]

    @property
    def test_domain_names(self) -> list[str]:
        """Test domains in the order of the test / predict dataloaders."""
        return list(dict.fromkeys(self.test_domains))

    # ----- loaders -----

    def _loader(self, data: DomainImageDataset | None, train: bool = False) -> DataLoader:
        """The resumable seeded loader for training, a plain ordered one for evaluation."""
        if data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        kwargs: dict[str, Any] = {
            "collate_fn": collate_images,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if train:
            return training_loader(data, self.batch_size, run_seed(), self.trainer, **kwargs)
        return DataLoader(data, batch_size=self.eval_batch_size,
                          generator=private_generator(run_seed()), **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training domains (minus their hold-outs)."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the hold-outs of all training domains."""
        return self._loader(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test domain, in :attr:`test_domain_names` order."""
        if not self.test_sets:
            raise RuntimeError("call setup() before asking for a dataloader")
        return [self._loader(d) for d in self.test_sets]

    def predict_dataloader(self) -> list[DataLoader]:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()
