"""Training data order that depends only on (seed, epoch) and survives a checkpoint.

A plain ``DataLoader(shuffle=True)`` draws its permutation from the global random state, so a
resumed run sees a different order than one never stopped. :class:`EpochShuffleSampler` draws
the permutation of epoch ``e`` from ``seed`` and ``e`` alone (Lightning calls ``set_epoch``),
and :class:`ResumableDataLoader` implements Lightning's ``state_dict`` / ``load_state_dict``
protocol so a run saved mid-epoch continues with the next unseen batch. Under data
parallelism the sampler shards the epoch's order itself (padding like ``DistributedSampler``,
which it subclasses so that Lightning does not wrap it), so every rank resumes at its own
next batch too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """Indices ``0..size-1`` in an order fixed by ``(seed, epoch)``, sharded over ranks.

    With ``num_replicas`` R > 1 the epoch's order is padded by repeating its start to a
    multiple of R and rank ``k`` takes every R-th index from position ``k`` (the
    ``DistributedSampler`` convention), so the ranks see disjoint shards of one order.

    Args:
        size: Dataset length.
        seed: Base seed (the run seed).
        shuffle: ``False`` keeps the natural order.
        num_replicas: Number of data-parallel ranks.
        rank: This process's rank.
        epoch_fn: Where the epoch comes from when iteration starts (the DataModules pass
            ``lambda: trainer.current_epoch``). ``None``: the last :meth:`set_epoch` value.
            Lightning's ``set_epoch`` argument is ``epoch_progress.current.processed``, which
            runs one ahead of ``trainer.current_epoch`` after a restart from a checkpoint
            written at the end of an epoch (Lightning re-runs that epoch's end and counts it
            again), so a resumed run would see the order of the epoch after the right one.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0, epoch_fn: Callable[[], int] | None = None) -> None:
        # DistributedSampler.__init__ would query torch.distributed; set its fields directly.
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = False
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.epoch_fn = epoch_fn
        self._skip: tuple[int, int] | None = None  # (epoch, samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning at every epoch start)."""
        self.epoch = epoch

    def skip_next(self, samples: int, epoch: int | None = None) -> None:
        """Start the next iteration of ``epoch`` (default: the current one) ``samples`` in."""
        self._skip = (self.epoch if epoch is None else epoch, samples)

    def order(self) -> torch.Tensor:
        """This rank's index order for the current epoch."""
        if not self.shuffle:
            full = torch.arange(self.size)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            full = torch.randperm(self.size, generator=generator)
        if self.num_replicas == 1:
            return full
        padded = torch.cat([full, full.repeat(math.ceil(self.total_size / self.size))])
        return padded[: self.total_size][self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.epoch = int(self.epoch_fn())
        start = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                start = self._skip[1]
            self._skip = None
        yield from self.order()[start:].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    ``progress_fn`` (set by the DataModule) returns how many batches of the current epoch the
    trainer has processed; it is read when a checkpoint is written.
    """

    progress_fn: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler) or self.progress_fn is None:
            return {}
        return {"epoch": sampler.epoch, "batches": int(self.progress_fn()),
                "batch_size": self.batch_size, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, EpochShuffleSampler):
            return
        sampler.set_epoch(int(state["epoch"]))
        sampler.skip_next(int(state["batches"]) * int(state["batch_size"]), int(state["epoch"]))


def training_loader(dataset: Any, batch_size: int, seed: int, trainer: Any = None,
                    **kwargs: Any) -> ResumableDataLoader:
    """The resumable training loader the DataModules use.

    Args:
        dataset: A map-style dataset.
        batch_size: Batch size per device.
        seed: Run seed (``PL_GLOBAL_SEED`` when ``seed_everything`` is set).
        trainer: The Lightning trainer, to read the epoch progress at save time.
        **kwargs: Other DataLoader arguments (collate_fn, num_workers, ...).
    """
    replicas = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
    sampler = EpochShuffleSampler(len(dataset), seed, num_replicas=replicas, rank=rank,
                                  epoch_fn=epoch_fn)
    loader = ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 generator=private_generator(seed), **kwargs)
    if trainer is not None:
        def progress() -> int:
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed

        loader.progress_fn = progress
    return loader


def run_seed() -> int:
    """The run seed set by ``seed_everything`` (0 when none was set)."""
    import os

    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def private_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader's worker base seed.

    Without one, every ``iter(loader)`` draws from the global generator, so the number of
    loaders iterated (sanity check, validation) would shift the dropout masks of training.
    """
    return torch.Generator().manual_seed(seed)
