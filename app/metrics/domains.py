"""Accuracy per group (domain) as one torchmetrics object: the same states on every rank."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GroupAccuracy(Metric):
    """Accuracy of each of ``num_groups`` groups (e.g. the domains of a DomainBed split).

    States are two ``num_groups`` vectors (correct and total counts) summed across processes,
    so every rank computes the same result even when a rank saw no example of some group (a
    per-group ``MulticlassAccuracy`` that is computed only where it was updated would hang
    under DDP).

    Args:
        num_groups: Number of groups; group ids must lie in ``[0, num_groups)``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_groups: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self.add_state("correct", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        """Count hits per group.

        Args:
            preds: Predicted class ids, shape ``(N,)``.
            target: True class ids, shape ``(N,)``.
            groups: Group id of each example, shape ``(N,)``.

        Raises:
            ValueError: For a group id outside ``[0, num_groups)``.
        """
        groups = groups.long()
        if groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups):
            raise ValueError(f"group ids must be in [0, {self.num_groups}), got "
                             f"{sorted(set(groups.tolist()))}")
        hits = (preds == target).to(torch.float64)
        self.correct += torch.bincount(groups, weights=hits, minlength=self.num_groups).long()
        self.total += torch.bincount(groups, minlength=self.num_groups)

    def compute(self) -> torch.Tensor:
        """Accuracy per group; ``nan`` for a group without examples.

        torchmetrics squeezes a one-element result to a scalar: ``reshape(-1)`` it.
        """
        total = self.total.double()
        return torch.where(total > 0, self.correct.double() / total.clamp(min=1),
                           torch.full_like(total, float("nan"))).float()
