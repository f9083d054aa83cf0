"""Confidence intervals of seed-paired differences (pure Python, no SciPy).

A comparison runs every method on the same seeds; the difference of a method to the baseline
is taken seed by seed, ``d_s = method_s - baseline_s``, and these functions summarise the
``d_s``:

- :func:`t_interval`: the two-sided Student-t interval of the mean,
  ``mean ± t_{1-a/2, n-1} * sd / sqrt(n)`` (sample sd, ``ddof = 1``), for ``n >= 2``;
- :func:`bootstrap_interval`: the paired percentile bootstrap of the mean (resampling seeds
  with replacement), exact (every one of the ``n^n`` resamples) up to ``n = 6`` and with
  20,000 seeded resamples above; reported for ``n >= 5`` (fewer seeds give too few distinct
  resamples for a percentile interval to mean anything);
- :func:`separable`: whether the interval excludes zero.

The t quantile comes from the regularised incomplete beta function (continued fraction, as
in Numerical Recipes) inverted by bisection; it matches the printed tables to 1e-6.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["bootstrap_interval", "separable", "t_cdf", "t_interval", "t_quantile"]

#: Fewest seeds for which the bootstrap interval is reported.
BOOTSTRAP_MIN_N = 5
_EXACT_MAX_N = 6
_RESAMPLES = 20_000


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``t_quantile(0.975, 2) = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and two-sided t-interval of the paired differences.

    Returns:
        ``{"mean", "low", "high", "half_width", "sd", "n", "df", "t"}``; the interval fields
        are ``None`` for fewer than two differences.
    """
    xs = [float(d) for d in diffs]
    n = len(xs)
    out: dict[str, Any] = {"mean": statistics.fmean(xs) if xs else None, "low": None,
                           "high": None, "half_width": None, "sd": None, "n": n,
                           "df": n - 1 if n else None, "t": None, "level": level}
    if n < 2:
        return out
    sd = statistics.stdev(xs)
    t = t_quantile(0.5 + level / 2.0, n - 1)
    half = t * sd / math.sqrt(n)
    out.update(sd=sd, t=t, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Smallest value whose empirical CDF reaches ``q`` (the bootstrap's percentile)."""
    index = max(0, math.ceil(q * len(sorted_values) - 1e-9) - 1)
    return sorted_values[min(index, len(sorted_values) - 1)]


def bootstrap_interval(diffs: Sequence[float], level: float = 0.95, *,
                       resamples: int = _RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """Paired percentile bootstrap of the mean difference (``None`` below 5 seeds).

    Up to 6 seeds every resample of the seeds is enumerated (the exact bootstrap
    distribution, no randomness); above, ``resamples`` draws from ``random.Random(seed)``.

    Returns:
        ``{"low", "high", "level", "resamples", "exact"}``.
    """
    xs = [float(d) for d in diffs]
    n = len(xs)
    if n < BOOTSTRAP_MIN_N:
        return None
    if n <= _EXACT_MAX_N:
        means = sorted(sum(c) / n for c in itertools.product(xs, repeat=n))
        exact = True
    else:
        rng = random.Random(seed)
        means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(resamples))
        exact = False
    alpha = (1.0 - level) / 2.0
    return {"low": _percentile(means, alpha), "high": _percentile(means, 1.0 - alpha),
            "level": level, "resamples": len(means), "exact": exact}


def separable(interval: dict[str, Any] | None) -> str:
    """``"yes (higher)"`` / ``"yes (lower)"`` if the interval excludes zero, ``"no"`` if it
    contains it, ``"n/a"`` without an interval (one seed)."""
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return "n/a"
    if interval["low"] > 0:
        return "yes (higher)"
    if interval["high"] < 0:
        return "yes (lower)"
    return "no"
