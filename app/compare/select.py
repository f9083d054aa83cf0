"""Learning-rate selection on a held-out slice of the training set, before the seeds run.

Each method (and rank) runs once per rate of its grid, on one seed, with
``--data.init_args.holdout_fraction F``: the data module then trains on the rest of the
training set and validates on a fixed, seeded slice of it (:func:`app.data.glue.holdout_split`),
so the dev set that the tables report is never read while choosing. Every other setting (budget,
data, model, extra arguments) is the comparison's own. The rate with the best held-out
``--metric`` at the end of the run (``--select-on final``; ``best`` takes the best validation
point) is selected; ties go to the lower held-out loss, then to the smaller rate. Then every
seed runs at that rate on the full training set and is reported on the dev set.

The grid is ``--lrs`` when given, else the fragment's own, declared in a comment line of the
method fragment, next to the reason for its values::

    # lr_grid: [5.0e-4, 1.0e-3, 2.0e-3]

(a comment, so that ``lightning-cli`` never sees it). A selected rate at either end of its grid
is flagged in the report: the best rate may lie outside.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from app.compare.collect import metric_values
from app.compare.plan import RunSpec, load_fragments
from app.errors import is_positive_number

__all__ = ["LR_OPTION", "apply_rates", "fragment_lr_grid", "method_grids", "select_rates",
           "selection_plan"]

LR_OPTION = "--model.init_args.optimizer.init_args.lr"
HOLDOUT_OPTION = "--data.init_args.holdout_fraction"
HOLDOUT_SEED_OPTION = "--data.init_args.holdout_seed"
_GRID_LINE = re.compile(r"^\s*#\s*lr_grid:\s*(\[[^\]]*\])", re.MULTILINE)


def fragment_lr_grid(path: str | Path) -> list[float] | None:
    """The ``# lr_grid: [...]`` a method fragment declares, ``None`` if it declares none.

    Raises:
        ValueError: The line is there but is not a list of positive numbers.
    """
    found = _GRID_LINE.search(Path(path).read_text())
    if not found:
        return None
    try:
        values = yaml.safe_load(found.group(1))
        grid = [float(v) for v in values]
    except (yaml.YAMLError, TypeError, ValueError):
        grid = []
    if not grid or not all(is_positive_number(v) for v in grid):
        raise ValueError(f"{path}: '# lr_grid: {found.group(1)}' must list positive numbers, "
                         "e.g. '# lr_grid: [5.0e-4, 1.0e-3, 2.0e-3]'")
    return sorted(dict.fromkeys(grid))


def method_grids(methods: Sequence[str | Path], lrs: Sequence[float] | None
                 ) -> dict[str, list[float]]:
    """The grid of every method: ``lrs`` for all when given, else each fragment's own.

    Raises:
        ValueError: A rate is not positive, or a fragment declares no grid and ``lrs`` is
            not given (naming the fragment and both fixes).
    """
    if lrs:
        bad = [v for v in lrs if not is_positive_number(v)]
        if bad:
            raise ValueError(f"--lrs: {bad} are not positive learning rates")
        grid = sorted(dict.fromkeys(float(v) for v in lrs))
        return {Path(m).stem: list(grid) for m in methods}
    grids = {}
    for method in methods:
        grid = fragment_lr_grid(method)
        if grid is None:
            raise ValueError(f"--select-lr: {method} declares no '# lr_grid: [...]' line; add "
                             "one to the fragment or give the grid with --lrs")
        grids[Path(method).stem] = grid
    return grids


def check_holdout_support(base: Sequence[str | Path]) -> None:
    """Raise ``ValueError`` unless the base config's data module takes ``holdout_fraction``
    and ``holdout_seed`` (the GLUE data module does)."""
    import importlib

    data = load_fragments(base).get("data") or {}
    path = str(data.get("class_path", "")) if isinstance(data, dict) else ""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"--select-lr: cannot import the data module {path!r} of --base "
                         "to check that it can hold out part of the training set") from None
    params = inspect.signature(cls).parameters
    if "holdout_fraction" not in params or "holdout_seed" not in params:
        raise ValueError(f"--select-lr: {path} has no holdout_fraction / holdout_seed options "
                         "(a seeded held-out slice of the training set), so selection would "
                         "have to read the reported split; select the rates elsewhere and pass "
                         f"them with {LR_OPTION} in --extra")


def selection_plan(plan: Sequence[RunSpec], grids: dict[str, list[float]],
                   holdout: tuple[float, int]) -> list[RunSpec]:
    """One run per method, rank and rate, from the plan's runs of its selection seed.

    Args:
        plan: A plan built for the selection seed only (one run per method and rank).
        grids: Rates per method name.
        holdout: ``(fraction, seed)`` of the held-out slice of the training set.
    """
    fraction, seed = holdout
    out = []
    for spec in plan:
        for lr in grids[spec.method]:
            options = (*spec.options, HOLDOUT_OPTION, repr(float(fraction)),
                       HOLDOUT_SEED_OPTION, str(seed), LR_OPTION, repr(float(lr)))
            out.append(dataclasses.replace(spec, options=options, lr=float(lr),
                                           stage="select"))
    return out


def _key(spec_or_result: Any) -> tuple[str, str]:
    if isinstance(spec_or_result, RunSpec):
        return spec_or_result.method, spec_or_result.rank_label
    rank = spec_or_result.get("rank")
    return spec_or_result["method"], "-" if rank is None else str(rank)


def select_rates(selection: Sequence[RunSpec], results: Sequence[dict[str, Any]], *,
                 metric: str = "val/score", mode: str = "max", select_on: str = "final",
                 loss: str = "val/loss") -> list[dict[str, Any]]:
    """The selected rate of every method and rank.

    Args:
        selection: The selection plan (tells the grid of each method and rank).
        results: ``result.json`` of its finished runs (a failed or diverged run has none).
        metric: Held-out metric; ``mode`` says which direction is better.
        select_on: ``"final"`` (the end of the run) or ``"best"`` (best validation point).
        loss: Tie-breaker (lower wins), read at the same point.

    Returns:
        One dict per method and rank, in plan order: ``method``, ``rank``, ``grid``,
        ``scores`` (``[score or None per rate]``), ``losses``, ``selected`` (``None`` if no
        rate finished), ``score``, ``complete`` (every rate finished) and ``edge``
        (``"lower"`` / ``"upper"`` when the selected rate ends the grid, else ``None``).
    """
    if select_on not in ("final", "best"):
        raise ValueError(f"select_on must be 'final' or 'best', got {select_on!r}")
    by_run = {(r["method"], _key(r)[1], r.get("lr")): r for r in results}
    groups: dict[tuple[str, str], list[float]] = {}
    for spec in selection:
        groups.setdefault(_key(spec), []).append(float(spec.lr))
    out = []
    for (method, rank), grid in groups.items():
        grid = sorted(grid)
        scores: list[float | None] = []
        losses: list[float | None] = []
        for lr in grid:
            result = by_run.get((method, rank, lr))
            if result is None:
                scores.append(None)
                losses.append(None)
                continue
            values = metric_values(result, metric, mode)
            scores.append(values[select_on])
            where = "metrics_final" if select_on == "final" else "metrics_at_best"
            if select_on == "best" and result.get("metric") != metric:
                where = "metrics_final"  # no per-step record for another metric's best
            losses.append((result.get(where) or {}).get(loss))
        sign = 1.0 if mode == "max" else -1.0
        ranked = sorted(
            (i for i, s in enumerate(scores) if s is not None and math.isfinite(s)),
            key=lambda i: (-sign * scores[i],
                           losses[i] if losses[i] is not None else math.inf, grid[i]))
        chosen = ranked[0] if ranked else None
        edge = None
        if chosen is not None and len(grid) > 1:
            edge = "lower" if chosen == 0 else "upper" if chosen == len(grid) - 1 else None
        out.append({"method": method, "rank": rank, "grid": grid, "scores": scores,
                    "losses": losses, "selected": None if chosen is None else grid[chosen],
                    "score": None if chosen is None else scores[chosen],
                    "complete": all(s is not None for s in scores), "edge": edge,
                    "metric": metric, "select_on": select_on})
    return out


def apply_rates(plan: Sequence[RunSpec], chosen: Sequence[dict[str, Any]],
                waiting: Sequence[RunSpec] = ()) -> tuple[list[RunSpec], list[RunSpec]]:
    """``(runs at their selected rate, runs without one)`` of the final plan. A method with
    selection runs in ``waiting`` (not started yet, e.g. for ``--finish-by``) has no rate
    yet, whatever its finished rates say: its seeds wait for the whole grid."""
    rates = {(c["method"], c["rank"]): c["selected"] for c in chosen}
    unsettled = {_key(spec) for spec in waiting}
    ready, missing = [], []
    for spec in plan:
        lr = None if _key(spec) in unsettled else rates.get(_key(spec))
        if lr is None:
            missing.append(spec)
        else:
            ready.append(dataclasses.replace(
                spec, options=(*spec.options, LR_OPTION, repr(float(lr))), lr=float(lr)))
    return ready, missing
