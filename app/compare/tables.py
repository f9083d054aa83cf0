"""Markdown tables of a comparison's statistics: paired differences with their confidence
intervals (:mod:`app.compare.stats`), and the learning-rate selection."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["paired_table", "score_se", "selection_note", "selection_table"]


def _interval(ci: dict[str, Any] | None) -> str:
    if not ci or ci.get("low") is None:
        return "n/a"
    return f"[{ci['low']:+.4f}, {ci['high']:+.4f}]"


def paired_table(paired: Sequence[dict[str, Any]], baseline: str) -> str:
    """Per method and rank: the paired difference to the baseline at the end of the run and
    at the best validation point, each with its 95% t-interval over seeds (and the paired
    bootstrap with 5 seeds or more) and whether it is separable from zero."""
    head = ["method", "rank", "n", "Δ final", "95% CI (t)", "95% CI (bootstrap)",
            "separable (final)", "Δ best", "95% CI (t)", "separable (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((p["method"], p["rank"], p["baseline_rank"]) for p in paired))
    for method, rank, base_rank in keys:
        by_field = {p["field"]: p for p in paired if (p["method"], p["rank"],
                                                       p["baseline_rank"]) == (method, rank,
                                                                               base_rank)}
        final, best = by_field.get("final"), by_field.get("best")
        label = method if rank == base_rank else f"{method} (vs {baseline} r{base_rank})"
        if method == "(no learning)":
            label = f"*no learning − {baseline}*"
        n = (final or best or {}).get("n", 0)

        def mean(p: dict[str, Any] | None) -> str:
            return "n/a" if not p or p.get("mean") is None else f"{p['mean']:+.4f}"

        lines.append("| " + " | ".join([
            label, rank, str(n), mean(final), _interval((final or {}).get("ci95")),
            _interval((final or {}).get("bootstrap95")) if final and final.get("bootstrap95")
            else "n/a (< 5 seeds)", (final or {}).get("separable", "n/a"), mean(best),
            _interval((best or {}).get("ci95")), (best or {}).get("separable", "n/a")]) + " |")
    return "\n".join(lines) + "\n"


def selection_table(chosen: Sequence[dict[str, Any]],
                    reference: dict[str, Any] | None = None) -> str:
    """The learning-rate grid of every method, its held-out score per rate, the selected
    rate and its score; the no-learning score on the held-out slice as a first row."""
    metric = chosen[0]["metric"] if chosen else "val/score"
    head = ["method", "rank", "grid", f"held-out {metric} per rate", "selected lr",
            "selection score", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    score = ((reference or {}).get("metrics") or {}).get(metric)
    if score is not None:
        lines.append(f"| *{reference['kind']} (no learning)* | - | - | - | - | {score:.4f} | "
                     f"{reference['description']} |")
    n = (reference or {}).get("n_eval")
    for c in chosen:
        grid = ", ".join(f"{v:.2g}" for v in c["grid"])
        # no result: failed, diverged or not run yet (the list under the tables says which)
        scores = ", ".join("not finished" if v is None else f"{v:.4f}" for v in c["scores"])
        notes = []
        if c["edge"]:
            notes.append(f"at the {c['edge']} end of the grid")
            beyond = _beyond_grid(c, _headline(reference), n)
            if beyond:
                notes.append(beyond)
        if not c["complete"]:
            notes.append("some rates did not finish")
        if score is not None and c["score"] is not None and abs(c["score"] - score) < 1e-9:
            notes.append("no rate left the no-learning score")
        lines.append("| " + " | ".join([
            c["method"], c["rank"], grid, scores,
            "none" if c["selected"] is None else f"{c['selected']:.2g}",
            "n/a" if c["score"] is None else f"{c['score']:.4f}",
            "; ".join(notes) or "-"]) + " |")
    return "\n".join(lines) + "\n"


def selection_note(chosen: Sequence[dict[str, Any]], metric: str,
                   reference: dict[str, Any] | None = None) -> str:
    """What the selection table's numbers are: how a rate was chosen and, with the held-out
    slice's size, how far apart two held-out accuracies must be to mean anything."""
    text = ("\nEach rate ran once on the selection seed, trained on the training set minus a "
            "fixed held-out slice and validated on that slice (the dev set is not read); the "
            f"rate with the best held-out `{metric}` ({chosen[0]['select_on']} value; ties: "
            "lower held-out loss, then the smaller rate) is the one every seed ran at.")
    n = (reference or {}).get("n_eval")
    headline = _headline(reference)
    if n and headline in ("accuracy", "pearson"):
        if headline == "accuracy":
            size = (f"for an accuracy one row is {1 / n:.4f}, and its binomial standard error "
                    f"sqrt(p (1 - p) / n) is {score_se(headline, 0.75, n):.3f} at p = 0.75")
        else:
            size = ("the standard error of a Pearson correlation, about (1 - r^2) / "
                    f"sqrt(n - 1), is {score_se(headline, 0.85, n):.3f} at r = 0.85")
        text += (f" The held-out slice has {n} rows: {size}, so rates whose scores are that "
                 "close are not told apart by one run: the selection reliably avoids rates "
                 "that fail (the no-learning score), not a fine optimum, and a rate selected "
                 "at the end of its grid means little when its neighbour is within that "
                 "noise (the note says when it is not: then a rate beyond the grid may do "
                 "better).")
    elif n:
        text += (f" The held-out slice has {n} rows; one run per rate tells apart rates that "
                 "fail from rates that learn, not a fine optimum.")
    return text + "\n"


def _headline(reference: dict[str, Any] | None) -> str | None:
    """The task's headline metric (``val/score``), as the no-learning reference states it."""
    if not reference:
        return None
    return reference.get("headline", "accuracy" if reference.get("kind") == "majority"
                         else None)


def score_se(headline: str | None, score: float, n: int) -> float | None:
    """Standard error of one held-out score of ``n`` rows: binomial for an accuracy,
    ``(1 - r^2) / sqrt(n - 1)`` for a Pearson correlation; ``None`` for other metrics."""
    if n < 2 or not math.isfinite(score):
        return None
    if headline == "accuracy" and 0.0 <= score <= 1.0:
        return math.sqrt(score * (1.0 - score) / n)
    if headline == "pearson" and -1.0 <= score <= 1.0:
        return (1.0 - score * score) / math.sqrt(n - 1)
    return None


def _beyond_grid(c: dict[str, Any], headline: str | None, n: int | None) -> str | None:
    """When the rate selected at the end of the grid beats its neighbour by more than one
    standard error of the held-out score, say so: the optimum may lie beyond the grid."""
    j = 1 if c["edge"] == "lower" else -2  # the rate next to the selected end
    neighbour, score = c["scores"][j], c["score"]
    se = score_se(headline, score, n) if n and neighbour is not None else None
    if se is None or abs(score - neighbour) <= se:
        return None
    side = "below" if c["edge"] == "lower" else "above"
    return (f"beats {c['grid'][j]:.2g} by {abs(score - neighbour):.4f}, more than one standard "
            f"error ({se:.3f}): a rate {side} the grid may do better")
