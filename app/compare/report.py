"""Tables of a comparison: CSV and JSON of every run, Markdown mean ± std per method and rank
with the paired difference to a baseline method, and the plots (:mod:`app.compare.plots`).

Statistics: mean and sample standard deviation (``ddof=1``; none for a single run) over seeds.
The paired difference of a method to the baseline is taken seed by seed over the seeds both
finished, ``d_s = method_s - baseline_s``, and reported as the mean ± sample std of the
``d_s``; it compares with the baseline at the same rank, else the baseline's only rank; a
method without a rank (full fine-tuning) against every rank of the baseline. Each paired
difference also carries its 95% Student-t interval over seeds, the paired bootstrap interval
(5 seeds or more) and whether the interval excludes zero (:mod:`app.compare.stats`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from app.compare.claims import CLAIMS, check_claims, claims_table
from app.compare.collect import machine_label, metric_values
from app.compare.stats import bootstrap_interval, separable, t_interval
from app.compare.tables import paired_table, selection_note, selection_table

__all__ = ["mean_std", "paired_differences", "summarize", "to_markdown", "write_report"]

#: Per-run numbers summarised per method and rank, in table order.
FIELDS = ("best", "final", "time_per_step_s", "time_per_step_median_s", "samples_per_s",
          "peak_memory_bytes", "optimizer_state_bytes", "trainable_params", "total_params",
          "adapter_bytes", "drift_max", "wall_s")

CSV_COLUMNS = ("name", "method", "rank", "seed", "metric", "best", "best_step", "final",
               "final_step", "time_per_step_s", "time_per_step_std_s",
               "time_per_step_median_s", "timed_steps",
               "samples_per_s", "peak_memory_bytes", "peak_memory_source",
               "optimizer_state_bytes", "trainable_params", "total_params", "adapter_bytes",
               "adapter_folder_bytes", "drift_max", "global_step", "device", "precision",
               "world_size", "wall_s", "attempts")


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the values that are not ``None`` / NaN; ``std`` is the
    sample standard deviation (``ddof=1``), ``None`` for fewer than two values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def _rank_sort(label: str) -> tuple[int, int]:
    return (0, 0) if label == "-" else (1, int(label))


def _label(result: dict[str, Any]) -> str:
    rank = result.get("rank")
    return "-" if rank is None else str(rank)


def _with_metric(results: Sequence[dict[str, Any]], metric: str, mode: str
                 ) -> list[dict[str, Any]]:
    return [{**r, **metric_values(r, metric, mode), "metric": metric, "mode": mode}
            for r in results]


def _groups(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Results by ``(method, rank label)``: methods in order of appearance, ranks ascending."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for method in methods:
        labels = sorted({_label(r) for r in results if r["method"] == method}, key=_rank_sort)
        for label in labels:
            groups[(method, label)] = sorted(
                (r for r in results if r["method"] == method and _label(r) == label),
                key=lambda r: r["seed"])
    return groups


def summarize(results: Sequence[dict[str, Any]], metric: str = "val/score",
              mode: str = "max") -> list[dict[str, Any]]:
    """One row per method and rank: seeds and :func:`mean_std` of every field in FIELDS."""
    rows = []
    for (method, label), runs in _groups(_with_metric(results, metric, mode)).items():
        row: dict[str, Any] = {"method": method, "rank": label, "n": len(runs),
                               "seeds": [r["seed"] for r in runs],
                               "lr": sorted({r["lr"] for r in runs if r.get("lr") is not None})}
        for name in FIELDS:
            row[name] = mean_std(r.get(name) for r in runs)
        rows.append(row)
    return rows


def paired_differences(results: Sequence[dict[str, Any]], baseline: str,
                       metric: str = "val/score", mode: str = "max", field: str = "best"
                       ) -> list[dict[str, Any]]:
    """Seed-paired differences ``method - baseline`` of ``field`` for every other group.

    Returns:
        One dict per (method, rank, baseline rank): ``seeds`` (common, both finite), ``diffs``
        and :func:`mean_std` of the diffs as ``mean`` / ``std`` / ``n``. Empty if the
        baseline did not run.
    """
    groups = _groups(_with_metric(results, metric, mode))
    base = {label: {r["seed"]: r.get(field) for r in runs}
            for (method, label), runs in groups.items() if method == baseline}
    out = []
    for (method, label), runs in groups.items():
        if method == baseline or not base:
            continue
        if label in base:
            targets = [label]
        elif len(base) == 1 or label == "-":
            targets = sorted(base, key=_rank_sort)
        else:
            targets = []
        values = {r["seed"]: r.get(field) for r in runs}
        for target in targets:
            seeds = sorted(s for s in values if s in base[target]
                           and values[s] is not None and base[target][s] is not None)
            diffs = [values[s] - base[target][s] for s in seeds]
            out.append(_with_intervals({"method": method, "rank": label, "baseline": baseline,
                                        "baseline_rank": target, "field": field,
                                        "seeds": seeds, "diffs": diffs, **mean_std(diffs)}))
    return out


def _with_intervals(pair: dict[str, Any]) -> dict[str, Any]:
    ci = t_interval(pair["diffs"])
    pair["ci95"] = ci
    pair["bootstrap95"] = bootstrap_interval(pair["diffs"])
    pair["separable"] = separable(ci)
    return pair


def reference_differences(results: Sequence[dict[str, Any]], baseline: str,
                          reference: dict[str, Any] | None, metric: str = "val/score",
                          mode: str = "max", field: str = "best") -> list[dict[str, Any]]:
    """``reference - baseline`` seed by seed (the reference is the same for every seed): is
    the baseline itself separable from the no-learning score?"""
    score = ((reference or {}).get("metrics") or {}).get(metric)
    if score is None:
        return []
    out = []
    for (method, label), runs in _groups(_with_metric(results, metric, mode)).items():
        if method != baseline:
            continue
        pairs = [(r["seed"], r.get(field)) for r in runs if r.get(field) is not None]
        diffs = [score - v for _, v in pairs]
        out.append(_with_intervals({"method": "(no learning)", "rank": "-",
                                    "baseline": baseline, "baseline_rank": label,
                                    "field": field, "seeds": [s for s, _ in pairs],
                                    "diffs": diffs, **mean_std(diffs)}))
    return out


# -- Markdown -------------------------------------------------------------------------------
def _pm(stat: dict[str, Any], fmt: str, scale: float = 1.0, sign: bool = False) -> str:
    if stat["mean"] is None:
        return "n/a"
    spec = ("+" if sign else "") + fmt
    text = format(stat["mean"] * scale, spec)
    if stat["std"] is not None:
        text += " ± " + format(stat["std"] * scale, fmt)
    return text


def _bytes(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if stat["mean"] >= size:
            return _pm(stat, ".1f", 1 / size) + f" {unit}"
    return _pm(stat, ".0f") + " B"


def _params(row: dict[str, Any]) -> str:
    trainable, total = row["trainable_params"]["mean"], row["total_params"]["mean"]
    if trainable is None:
        return "n/a"
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    return f"{int(round(trainable)):,}{share}"


def _diff_cell(pairs: list[dict[str, Any]]) -> str:
    cells = []
    for p in pairs:
        value = _pm(p, ".4f", sign=True) + f" (n={p['n']})" if p["n"] else "no common seeds"
        cells.append(value if len(pairs) == 1 else f"r{p['baseline_rank']}: {value}")
    return "; ".join(cells) if cells else "n/a"


def _lr(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2g}" for v in values) if values else "fragment's"


def to_markdown(summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]],
                metric: str, baseline: str, reference: dict[str, Any] | None = None) -> str:
    """The comparison table: one row per method and rank, mean ± std over seeds; a first row
    with the no-learning reference (:mod:`app.compare.reference`) when there is one; an
    ``lr`` column when the rates were selected."""
    with_lr = any(row.get("lr") for row in summary)
    head = ["method", "rank", *(["lr"] if with_lr else []), "n", f"{metric} best",
            f"{metric} final", f"Δ best vs {baseline} (paired)", "time/step median (ms)",
            "samples/s", "peak memory", "optimizer state", "trainable params", "adapter size",
            "drift max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    score = ((reference or {}).get("metrics") or {}).get(metric)
    if score is not None:
        cells = [f"*{reference['kind']} (no learning)*", "-", *(["-"] if with_lr else []), "-",
                 f"{score:.4f}", f"{score:.4f}", *["-"] * (len(head) - 5 - with_lr)]
        lines.append("| " + " | ".join(cells) + " |")
    for row in summary:
        pairs = [p for p in paired if p["method"] == row["method"] and p["rank"] == row["rank"]]
        diff = "(baseline)" if row["method"] == baseline else _diff_cell(pairs)
        drift = row["drift_max"]
        cells = [row["method"], row["rank"], *([_lr(row.get("lr"))] if with_lr else []),
                 str(row["n"]), _pm(row["best"], ".4f"),
                 _pm(row["final"], ".4f"), diff, _pm(row["time_per_step_median_s"], ".1f", 1e3),
                 _pm(row["samples_per_s"], ".1f"), _bytes(row["peak_memory_bytes"]),
                 _bytes(row["optimizer_state_bytes"]), _params(row),
                 _bytes(row["adapter_bytes"]),
                 "-" if drift["mean"] is None else _pm(drift, ".2e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def at_floor(results: Sequence[dict[str, Any]], reference: dict[str, Any] | None,
             metric: str, tol: float = 1e-6) -> list[tuple[str, str, int, int]]:
    """``(method, rank, seeds at the floor, seeds)`` of every group with a run whose final
    ``metric`` equals the no-learning score (e.g. predicting the majority class)."""
    score = ((reference or {}).get("metrics") or {}).get(metric)
    if score is None:
        return []
    out = []
    for (method, label), runs in _groups(results).items():
        hits = sum(1 for r in runs if r.get("final") is not None
                   and abs(r["final"] - score) <= tol)
        if hits:
            out.append((method, label, hits, len(runs)))
    return out


# -- files ----------------------------------------------------------------------------------
def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per run; validation metrics at the best step and at the end as extra columns."""
    tags = sorted({t for r in results for t in (r.get("metrics_at_best") or {})})
    columns = [*CSV_COLUMNS, *(f"at_best:{t}" for t in tags), *(f"final:{t}" for t in tags)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            row = {c: r.get(c) for c in CSV_COLUMNS}
            row["rank"] = _label(r)
            row.update({f"at_best:{t}": v for t, v in (r.get("metrics_at_best") or {}).items()})
            row.update({f"final:{t}": v for t, v in (r.get("metrics_final") or {}).items()})
            writer.writerow(row)
    os.replace(tmp, path)


def _machines(results: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """``{machine: [run names]}`` of the reported runs (``not recorded`` for runs collected
    before ``result.json`` named its machine)."""
    out: dict[str, list[str]] = {}
    for result in results:
        out.setdefault(machine_label(result), []).append(result["name"])
    return out


def write_report(out: Path, results: Sequence[dict[str, Any]], *, metric: str = "val/score",
                 mode: str = "max", baseline: str = "lora", header: str = "",
                 meta: dict[str, Any] | None = None, failed: Sequence[tuple[str, str]] = (),
                 plots: bool = True, selection: Sequence[dict[str, Any]] = (),
                 reference: dict[str, Any] | None = None,
                 holdout_reference: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``summary.md`` and the PNG plots into ``out``.

    Args:
        out: The comparison folder.
        results: ``result.json`` contents of the runs to report.
        metric: The validation metric compared; ``mode`` says which direction is better.
        baseline: The method the paired differences are taken against.
        header: Markdown put above the table (what was compared, with which budget).
        meta: Extra JSON fields (command, machine, date).
        failed: ``(run name, message)`` of runs that did not finish, listed under the table.
        plots: Also draw the PNG plots (needs matplotlib).
        selection: The learning-rate selection (:func:`app.compare.select.select_rates`).
        reference: The no-learning score on the dev set
            (:func:`app.compare.reference.chance_reference`), shown in every table and plot.
        holdout_reference: The same on the held-out slice the selection validated on.

    Returns:
        ``{kind: path}`` of every file written.
    """
    out.mkdir(parents=True, exist_ok=True)
    results = _with_metric(results, metric, mode)
    summary = summarize(results, metric, mode)
    paired = [*paired_differences(results, baseline, metric, mode, "best"),
              *paired_differences(results, baseline, metric, mode, "final")]
    floor = [*reference_differences(results, baseline, reference, metric, mode, "best"),
             *reference_differences(results, baseline, reference, metric, mode, "final")]
    stuck = at_floor(results, reference, metric)
    claims = check_claims(results, [
        *paired, *(p for b in dict.fromkeys(c.baseline for c in CLAIMS) if b != baseline
                   for field in ("best", "final")
                   for p in paired_differences(results, b, metric, mode, field))],
        stuck, mode=mode)
    files = {"csv": out / "results.csv", "json": out / "results.json",
             "markdown": out / "summary.md"}
    write_csv(results, files["csv"])
    payload = {**(meta or {}), "metric": metric, "mode": mode, "baseline": baseline,
               "reference": reference, "summary": summary, "paired_differences": paired,
               "reference_differences": floor, "claims": claims,
               "selection": {"rates": list(selection), "holdout_reference": holdout_reference},
               "failed": [{"name": n, "message": m} for n, m in failed], "runs": list(results)}
    _atomic_text(files["json"], json.dumps(payload, indent=1, allow_nan=False) + "\n")
    table = to_markdown(summary, [p for p in paired if p["field"] == "best"], metric, baseline,
                        reference)
    notes = (f"\nMean ± sample std (ddof=1) over seeds; `{metric}` "
             f"({'higher' if mode == 'max' else 'lower'} is better) at its best validation and "
             f"at the end. Δ: per-seed difference to `{baseline}` (same seeds, same rank or "
             "its only rank), mean ± std. Time per optimizer step: each run's median step after "
             "warm-up (the mean is in the CSV); samples/s over the timed steps; "
             "peak memory is CUDA max allocated on GPU, process peak RSS on CPU; adapter size: "
             "the exported weight files (the whole model for full fine-tuning); drift max: the "
             "largest `manifold/drift_max` logged (geometry-aware methods only).\n")
    machines = _machines(results)
    if len(machines) > 1:
        notes += ("\n**The step times come from more than one machine** (runs recorded in "
                  "different sittings): " + "; ".join(f"{label}: {', '.join(names)}"
                                                      for label, names in machines.items())
                  + ". Compare time/step and samples/s only between runs of one machine; "
                    "rerun the others there for a timing comparison.\n")
    if reference:
        notes += (f"\nNo learning: {reference['description']}; {reference['n_eval']} "
                  "evaluation rows. A method at this score has learned nothing.\n")
        if stuck:
            notes += ("\n**At the no-learning score at the end of the run** (these rows "
                      "compare nothing; see the selection table for the rates tried): "
                      + "; ".join(f"`{m}`{'' if r == '-' else f' r{r}'} on {k} of {n} seeds"
                                  for m, r, k, n in stuck) + ".\n")
    text = (header.rstrip() + "\n\n" if header else "") + table + notes
    if paired or floor:
        text += (f"\n## Paired differences to `{baseline}`\n\n"
                 + paired_table([*floor, *paired], baseline)
                 + "\nΔ = method − baseline on each common seed; 95% CI (t): mean ± "
                   "t(0.975, n−1) · sd / √n over those seeds; 95% CI (bootstrap): paired "
                   "percentile bootstrap of the mean over seeds (exact enumeration up to 6 "
                   "seeds), only with 5 seeds or more; separable: the t-interval excludes 0 "
                   "(with 3 seeds t = 4.30, so only differences several seed-sds wide "
                   "separate). The first row asks whether the baseline itself is separable "
                   "from the no-learning score.\n")
    if claims:
        text += ("\n## The papers' claims at this scale\n\n" + claims_table(claims)
                 + "\nQuality: the paired Δ = method − baseline over common seeds and its 95% "
                   "t-interval, judged on the final score (no choice made on the reported "
                   "split; the best-validation verdict beside it). A claim of a higher score "
                   "is *reproduced* when the interval lies above 0, *not reproduced* below; a "
                   "claim of parity (the baseline's score at a saving) is *not reproduced* "
                   "when the interval lies below 0. *Not separable*: the interval contains "
                   "0, which is what parity predicts, but a few seeds cannot show "
                   "equivalence: read the interval's width. Saving: the method's mean over "
                   "the baseline's (trainable parameters include the trained head, the same "
                   "in both); it holds when below 1x. Speed: the steps until the method's "
                   "training loss (trailing mean over a tenth of the run) reaches the "
                   "baseline's at its last step, over the baseline's own, per seed; it holds "
                   "when below 1x on every seed. A side at the no-learning score compares "
                   "nothing (`app/compare/claims.py` lists the claims).\n")
    if selection:
        text += ("\n## Learning-rate selection\n\n" + selection_table(selection,
                                                                     holdout_reference)
                 + selection_note(selection, metric, holdout_reference))
    if failed:
        text += "\nRuns that did not finish:\n\n" + "".join(
            f"- `{name}`: {message}\n" for name, message in failed)
    _atomic_text(files["markdown"], text)
    if plots and results:
        from app.compare.plots import draw_all

        files.update(draw_all(out, results, summary, metric, reference=reference,
                              paired=[*floor, *paired], baseline=baseline,
                              selection=selection, holdout_reference=holdout_reference))
    return files
