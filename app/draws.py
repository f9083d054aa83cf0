r"""Every random draw of the project that must be reproducible without the global RNG.

Seeded per layer / parameter so that every data-parallel rank, every rebuild and a resumed run
get the same tensors: :func:`seed_of` mixes a run seed with names and counters (splitmix64's
finaliser, names through ``zlib.crc32``, never Python's salted ``hash``), and
:func:`random_orthonormal` is the one sign-fixed QR draw (Asymmetric LoRA's frozen factor,
Manifold-LoRA's and StelLA's inits, GaRare's projections). Pure tensor code, no Lightning.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["mix64", "random_orthonormal", "seed_of"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_of(seed: int, *parts: str | int) -> int:
    """A generator seed from a run seed and names / counters: ``h = mix64(seed)``, then
    ``h = mix64(h ^ part)`` per part (``zlib.crc32`` of a string part).

    The mixing matters: torch's CPU generator (mt19937) keeps only the low 32 bits of its
    seed, so every input bit must reach them.

    Returns:
        A seed in ``[0, 2**63)``.
    """
    h = mix64(seed & _MASK64)
    for part in parts:
        value = zlib.crc32(part.encode("utf-8")) if isinstance(part, str) else part & _MASK64
        h = mix64(h ^ value)
    return h & _MASK63


@torch.no_grad()
def random_orthonormal(
    n: int,
    p: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_shape: tuple[int, ...] = (),
) -> Tensor:
    r"""Random point ``Q`` on ``St(n, p)``: QR of a Gaussian with sign correction.

    .. math::

        G = Q R,\quad Q \leftarrow Q \operatorname{diag}(\operatorname{sign}(\operatorname{diag} R))

    The sign correction makes ``Q`` unique (Haar-distributed for ``n x n``; Mezzadri 2007,
    "How to generate random matrices from the classical compact groups"). Sampling uses
    only ``generator``, never the global RNG, so every data-parallel rank seeded alike
    draws the same matrix.

    Args:
        n: Rows, ``n >= p``.
        p: Columns.
        generator: Source of randomness; its device must match ``device``.
        dtype: Output dtype (sampled and factored in at least float32).
        device: Output device.
        batch_shape: Leading batch dimensions.

    Returns:
        Orthonormal matrices ``(*batch_shape, n, p)`` in ``dtype``.

    Raises:
        ValueError: If ``n < p``.
    """
    if n < p:
        raise ValueError(f"need n >= p for a tall Stiefel factor, got n={n}, p={p}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(*batch_shape, n, p, generator=generator, dtype=work, device=device)
    q, r = torch.linalg.qr(g)
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(work)
    return (q * sign.unsqueeze(-2)).to(dtype)
