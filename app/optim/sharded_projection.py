r"""GaLore / GaRare on FSDP2 shards: the projection acts on the whole (short) side.

Under :class:`app.fsdp2.AdapterFSDP2Strategy` a targeted ``p x q`` weight is sharded along
its long dimension: rows when ``p >= q`` (``Shard(0)``), columns when ``p < q``
(``Shard(1)``). GaLore and GaRare project on the *short* side (``R = G P^T`` with ``P`` of
shape ``r x q`` for ``p >= q``, ``R = P^T G`` with ``P`` of shape ``p x r`` otherwise), so:

- the projected gradient ``R``, Adam's moments and the back-projection ``D P`` (or ``P D``)
  are computed on the local rows (columns) alone: **no collective per step**;
- GaRare's seeded ``P`` spans the short side, which every rank holds whole: each rank
  generates the same ``P`` (:func:`app.optim.galore.random_projection`, seeded by the
  parameter name and the global shape), so no collective at all;
- GaLore's refresh needs the top-``r`` singular vectors on the short side: the short-side Gram
  matrix (``G^T G``, ``q x q``, for ``p >= q``; ``G G^T``, ``p x p``, otherwise) is a local
  product plus **one all-reduce of** ``min(p, q)^2`` float64 values per targeted weight and
  refresh (every ``update_proj_gap`` steps); its top-``r`` eigenvectors (replicated ``eigh``)
  are the wanted singular vectors (:func:`app.optim.subspace.gram_projection`). Nothing
  ``p x q`` is gathered. Cost per refresh and weight: ``2 max(p, q)_local min(p, q)^2`` flops
  (float64), ``8 min(p, q)^2`` bytes all-reduced (counted in ``tests/test_fsdp2.py``: 13 x 8 x
  32^2 = 106,496 bytes per refresh on the tiny BERT), one ``min(p, q)`` symmetric
  eigendecomposition; between refreshes nothing.

Status: GaLore runs under FSDP2 and reproduces a one-process run (``tests/test_fsdp2.py``: after
20 steps with refreshes at 0, 5, 10, 15 the weights agree to 1e-5; measured 1.6e-7), and its
sharded checkpoints resume bit for bit. The one-process path (SVD) and this one (Gram) share
:func:`app.optim.subspace.top_singular`: the same signs, and zero columns for the null
directions ``sigma_i <= null_rtol * sigma_1``, whose vectors the gradient does not define. That
rule is what makes the two runs agree: the tiny model's gradients are numerically rank 1 to 4
(the pooler's ``sigma_2 / sigma_1 = 8e-7``) and differ between one process and two by 1e-7 to
1e-6 relative, so before it the rounding picked the null vectors, Adam scaled them to
full-size steps and the weights drifted by 1e-3 after 20 steps (2e-4 with ``null_rtol = 1e-6``,
1.5e-5 with 1e-4). The one-process SVD path also used LAPACK's signs while this one was
sign-fixed: with the moments kept across refreshes that alone drifted by 6e-4.

GaRare deviation from the issue's sketch ("each rank generates its rows of ``P``"): with the
projection on the short side ``P`` is never sharded, so every rank draws all of it
(``r x min(p, q)``) from the same seed; nothing is communicated.

The moments are kept as ``DTensor`` s with the parameter's placement, so sharded
(distributed-checkpoint) and full optimizer state dicts save and resume them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["as_state", "check_placement", "local_view", "reducer"]


def local_view(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view sharing storage), ``t`` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def check_placement(name: str, p: Tensor) -> None:
    """Raise unless ``p`` (a ``DTensor``) is sharded along its long dimension only.

    Raises:
        ValueError: Naming the parameter, its placement and the strategy to use.
    """
    from torch.distributed.tensor import Shard

    long_dim = 0 if p.shape[0] >= p.shape[1] else 1
    bad = [pl for pl in p.placements
           if not pl.is_replicate() and not (isinstance(pl, Shard) and pl.dim == long_dim)]
    if bad:
        raise ValueError(
            f"'{name}' of shape {tuple(p.shape)} is sharded as {p.placements}; GaLore / GaRare "
            "need targeted weights sharded along their long dimension "
            "(configs/strategy/fsdp2.yaml)")


def as_state(local: Tensor, like: Tensor, rank: int) -> Tensor:
    """Wrap a local projected moment as a ``DTensor`` with ``like``'s mesh and placement.

    Its global shape is ``p x r`` for a tall ``p x q`` parameter ``like`` (rows sharded) and
    ``r x q`` for a wide one (columns sharded); ``local`` itself when ``like`` is whole.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return local
    p, q = like.shape
    shape = (p, rank) if p >= q else (rank, q)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=torch.Size(shape), stride=(shape[1], 1))


def reducer(p: Tensor) -> Any:
    """In-place all-reduce over the group sharding ``p`` (``None`` for a whole tensor)."""
    from torch.distributed.tensor import DTensor

    from app.manifolds.sharded import AllReduce

    return AllReduce(p.device_mesh.get_group()) if isinstance(p, DTensor) else None
