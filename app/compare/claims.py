"""The papers' claims, checked against a comparison's own numbers.

A comparison answers the question its users bring: does the method do what its paper says,
at this scale? Each :class:`Claim` names a method, the baseline its paper compared it with,
what the paper claims on quality and, for the methods sold on a saving, the cost it saves.

Quality is judged by the seed-paired difference ``method - baseline`` and its 95% Student-t
interval over seeds, the same numbers as the paired-difference table
(:func:`app.compare.report.paired_differences`), on the score at the end of the run (no
choice made on the reported split) and, for reference, at the best validation point:

- ``better`` (the paper reports a higher score): **reproduced** if the interval lies on the
  better side of 0, **not reproduced** if it lies on the worse side, **not separable** if it
  contains 0.
- ``parity`` (the paper reports the baseline's score at a lower cost): **not reproduced** if
  the interval lies on the worse side of 0, **reproduced** if on the better side, **not
  separable** if it contains 0: what parity predicts, but a few seeds cannot show
  equivalence, so the interval's width is part of the answer.

A saving is judged on the mean of a per-run field (``trainable_params``,
``optimizer_state_bytes``): it **holds** if the method's mean is below the baseline's. A
claim of faster training (Manifold-LoRA: the baseline's training loss in about half the
epochs) is judged seed by seed: the step at which the method's training loss, as a trailing
mean over a tenth of the run, first reaches the baseline's at its last step, over the step at
which the baseline's first does (:func:`steps_to_loss`); it **holds** if that ratio is below
1 on every common seed.

A claim whose method or baseline ends a run at the no-learning score (the majority class)
compares nothing on that seed; the verdict says so instead of reading the interval.
Claims are listed only when both of their methods ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.compare.stats import separable

__all__ = ["CLAIMS", "Claim", "check_claims", "claims_table", "steps_to_loss"]


@dataclass(frozen=True)
class Claim:
    """One claim of a method's paper, in terms a comparison measures.

    Attributes:
        method: The method's fragment name (``configs/methods/<method>.yaml``).
        baseline: The fragment it is compared with.
        quality: ``"better"``: a higher score than the baseline; ``"parity"``: the baseline's
            score (at the saving in ``cost_field``).
        paper: What the paper reports, in a few words with its numbers.
        cost_field: A per-run field the method claims to be lower (``None``: no saving
            claimed).
        faster: The paper claims the baseline's training loss in fewer steps.
    """

    method: str
    baseline: str
    quality: Literal["better", "parity"]
    paper: str
    cost_field: str | None = None
    faster: bool = False


#: The claims checked in every report (the issue's list; numbers from ../shared/METHODS.md).
CLAIMS: tuple[Claim, ...] = (
    Claim("garare", "galore", "parity",
          "GaRare matches GaLore (RoBERTa-base GLUE r8: 85.9 vs 86.0) without storing a "
          "projector", "optimizer_state_bytes"),
    Claim("garare", "full", "parity",
          "GaRare near full fine-tuning (85.9 vs 86.3) at a third of its memory",
          "optimizer_state_bytes"),
    Claim("galore", "full", "parity",
          "GaLore near full fine-tuning (86.0 vs 86.3) at a third of its memory",
          "optimizer_state_bytes"),
    Claim("asymmetric", "lora", "parity",
          "training B only (A random orthonormal, frozen) matches LoRA with half the "
          "adapter's trainable factors", "trainable_params"),
    Claim("stella", "lora", "better",
          "StelLA above LoRA variants (LLaMA-3-8B commonsense 86.7 vs 81.6-82.7; GLUE)"),
    Claim("manifold_stiefel", "lora", "better",
          "Manifold-LoRA (Stiefel B) above LoRA on GLUE / SQuAD (HotpotQA r16: 61.4 vs "
          "61.5 EM), in about half the epochs of LoRA's training loss", faster=True),
    Claim("manifold_sphere", "lora", "better",
          "Manifold-LoRA (sphere B) above LoRA (HotpotQA r16: 63.4 vs 61.5 EM), in about "
          "half the epochs of LoRA's training loss", faster=True),
    Claim("allora", "lora", "better",
          "ALLoRA (no dropout, no scaling, adaptive rate) above LoRA"),
    Claim("riemannian_lora", "lora", "better",
          "Riemannian-preconditioned AdamW above plain LoRA"),
)


def _quality(claim: Claim, pair: dict[str, Any] | None, sign: int) -> str:
    if pair is None or not pair.get("n"):
        return "no common seeds"
    side = separable(pair.get("ci95"))
    if side == "n/a":
        return "one seed: no interval"
    if side == "no":
        return "not separable"
    better = (side == "yes (higher)") == (sign > 0)
    if claim.quality == "better":
        return "reproduced" if better else "not reproduced (worse)"
    return "reproduced (better)" if better else "not reproduced (worse)"


def _smoothed(curve: dict[str, Any] | None) -> tuple[list[int], list[float]]:
    """Steps and the trailing mean of the training loss over a tenth of the logged points."""
    if not curve or not curve.get("loss"):
        return [], []
    losses = [float(x) for x in curve["loss"]]
    width = max(1, len(losses) // 10)
    out, total = [], 0.0
    for i, x in enumerate(losses):
        total += x - (losses[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return [int(s) for s in curve["step"]], out


def steps_to_loss(curve: dict[str, Any] | None, target: float) -> int | None:
    """The first logged step whose smoothed training loss (:func:`_smoothed`) is at or below
    ``target``; ``None`` if it never is."""
    steps, loss = _smoothed(curve)
    return next((s for s, x in zip(steps, loss) if x <= target), None)


def _speed(results: Sequence[dict[str, Any]], claim: Claim, rank: str, base_rank: str
           ) -> dict[str, Any]:
    """Per common seed: steps for the method to reach the baseline's final smoothed training
    loss, over the steps the baseline itself took to first reach it."""
    def runs(method: str, label: str) -> dict[int, dict[str, Any]]:
        return {r["seed"]: r for r in results if r["method"] == method
                and ("-" if r.get("rank") is None else str(r["rank"])) == label}

    mine, base = runs(claim.method, rank), runs(claim.baseline, base_rank)
    ratios: list[float | None] = []
    for seed in sorted(set(mine) & set(base)):
        _, loss = _smoothed(base[seed].get("loss_curve"))
        if not loss:
            continue
        target = loss[-1]
        theirs = steps_to_loss(base[seed].get("loss_curve"), target)
        ours = steps_to_loss(mine[seed].get("loss_curve"), target)
        ratios.append(None if ours is None or not theirs else ours / theirs)
    reached = [r for r in ratios if r is not None]
    return {"ratios": ratios, "n": len(ratios), "reached": len(reached),
            "mean": sum(reached) / len(reached) if reached else None,
            "holds": None if not ratios else all(r is not None and r < 1.0 for r in ratios)}


def _mean(results: Sequence[dict[str, Any]], method: str, rank: str, field: str
          ) -> float | None:
    xs = [float(r[field]) for r in results if r["method"] == method
          and ("-" if r.get("rank") is None else str(r["rank"])) == rank
          and r.get(field) is not None]
    return sum(xs) / len(xs) if xs else None


def check_claims(results: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]],
                 floor: Sequence[tuple[str, str, int, int]] = (), *, mode: str = "max",
                 claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """Each claim whose two methods ran, judged on this comparison's runs.

    Args:
        results: The runs (``result.json`` contents with ``best`` / ``final`` filled in).
        paired: Paired differences against every baseline a claim names
            (:func:`app.compare.report.paired_differences`, ``best`` and ``final``).
        floor: :func:`app.compare.report.at_floor` of the runs.
        mode: ``"max"`` if a higher score is better, ``"min"`` if lower.
        claims: The claims to check.

    Returns:
        One dict per claim and (rank, baseline rank) pair: the claim's fields, ``rank``,
        ``baseline_rank``, ``final`` / ``best`` (the paired differences), ``quality``
        (verdict on ``final``), ``quality_best``, ``cost`` (``{"field", "method",
        "baseline", "ratio", "holds"}`` or ``None``), ``speed`` (``{"ratios", "n",
        "reached", "mean", "holds"}`` for a claim of faster training, else ``None``) and
        ``floor`` (why a side compares nothing, or ``""``).
    """
    sign = 1 if mode == "max" else -1
    ran = {r["method"] for r in results}
    stuck = {(m, rank): (k, n) for m, rank, k, n in floor}
    out = []
    for claim in claims:
        if claim.method not in ran or claim.baseline not in ran:
            continue
        mine = [p for p in paired if p["method"] == claim.method
                and p["baseline"] == claim.baseline]
        for rank, base_rank in dict.fromkeys((p["rank"], p["baseline_rank"]) for p in mine):
            by_field = {p["field"]: p for p in mine
                        if (p["rank"], p["baseline_rank"]) == (rank, base_rank)}
            why = [f"`{m}` ends at the no-learning score on {stuck[(m, r)][0]} of "
                   f"{stuck[(m, r)][1]} seeds" for m, r in ((claim.method, rank),
                                                           (claim.baseline, base_rank))
                   if (m, r) in stuck]
            cost = None
            if claim.cost_field:
                a = _mean(results, claim.method, rank, claim.cost_field)
                b = _mean(results, claim.baseline, base_rank, claim.cost_field)
                ratio = a / b if a is not None and b else None
                cost = {"field": claim.cost_field, "method": a, "baseline": b, "ratio": ratio,
                        "holds": None if ratio is None else ratio < 1.0}
            final, best = by_field.get("final"), by_field.get("best")
            out.append({"method": claim.method, "baseline": claim.baseline,
                        "claim": claim.quality, "paper": claim.paper, "rank": rank,
                        "baseline_rank": base_rank, "final": final, "best": best,
                        "quality": ("compares nothing" if why
                                    else _quality(claim, final, sign)),
                        "quality_best": _quality(claim, best, sign),
                        "cost": cost, "floor": "; ".join(why),
                        "speed": _speed(results, claim, rank, base_rank) if claim.faster
                        else None})
    return out


def _diff(pair: dict[str, Any] | None) -> str:
    if not pair or pair.get("mean") is None:
        return "n/a"
    ci = pair.get("ci95") or {}
    if ci.get("low") is None:
        return f"{pair['mean']:+.4f} (n={pair['n']})"
    return f"{pair['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] (n={pair['n']})"


_COST_NAMES = {"optimizer_state_bytes": "optimizer state", "trainable_params": "trainable"}


def _amount(field: str, value: float) -> str:
    """A signed difference of ``field`` in its unit: bytes in KiB / MiB, counts in full."""
    if not field.endswith("_bytes"):
        return f"{value:+,.0f}"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:+,.1f} {unit}"
    return f"{value:+,.0f} B"


def _cost(cost: dict[str, Any] | None) -> str:
    if not cost:
        return "-"
    name = _COST_NAMES.get(cost["field"], cost["field"])
    if cost["ratio"] is None:
        return f"{name}: n/a"
    # Three decimals and the difference itself: a small saving must not read as 1.00x.
    return (f"{name} {cost['ratio']:.3f}x ("
            f"{_amount(cost['field'], cost['method'] - cost['baseline'])}; "
            f"{'holds' if cost['holds'] else 'does not hold'})")


def _speed_cell(speed: dict[str, Any] | None) -> str:
    if not speed:
        return ""
    if not speed["n"]:
        return "steps to the baseline's loss: no loss curves"
    held = "holds" if speed["holds"] else "does not hold"
    missed = speed["n"] - speed["reached"]
    mean = "n/a" if speed["mean"] is None else f"{speed['mean']:.2f}x"
    return (f"steps to the baseline's loss {mean} ({held}"
            + (f"; not reached on {missed} of {speed['n']} seeds" if missed else "") + ")")


def claims_table(checked: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per checked claim."""
    head = ["claim", "paper", "Δ final [95% CI]", "Δ best [95% CI]", "quality (final)",
            "quality (best)", "saving / speed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in checked:
        rank = "" if c["rank"] == c["baseline_rank"] or c["rank"] == "-" else f" r{c['rank']}"
        base = "" if c["baseline_rank"] in ("-", c["rank"]) else f" r{c['baseline_rank']}"
        what = ("better than" if c["claim"] == "better" else "matches")
        quality = c["quality"] + (f" ({c['floor']})" if c["floor"] else "")
        lines.append("| " + " | ".join([
            f"`{c['method']}`{rank} {what} `{c['baseline']}`{base}", c["paper"],
            _diff(c["final"]), _diff(c["best"]), quality, c["quality_best"],
            "; ".join(x for x in (_cost(c["cost"]) if c["cost"] else "",
                                  _speed_cell(c.get("speed"))) if x) or "-"]) + " |")
    return "\n".join(lines) + "\n"
