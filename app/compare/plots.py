"""PNG plots of a comparison (matplotlib, Agg backend): the metric per method with error bars,
the training-loss curves (mean over seeds), time per step and memory per method, the paired
differences to the baseline with their 95% intervals and the learning-rate selection. Every
plot of the metric (or of the loss) draws the no-learning reference as a dashed line."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["draw_all", "mean_curve"]

#: Line styles of the loss curves, one per block of ten methods (matplotlib has ten colours).
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any]) -> str:
    return row["method"] if row["rank"] == "-" else f"{row['method']} r{row['rank']}"


def _bars(ax: Any, rows: Sequence[dict[str, Any]], series: Sequence[tuple[str, str]],
          scale: float = 1.0) -> None:
    """Grouped bars with sample-std error bars: one group per row, one bar per series."""
    width = 0.8 / len(series)
    for i, (field, name) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        means = [(r[field]["mean"] or 0.0) * scale for r in rows]
        errs = [(r[field]["std"] or 0.0) * scale for r in rows]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
        for x, r in zip(xs, rows):
            if r[field]["mean"] is None:
                ax.annotate("n/a", (x, 0), ha="center", va="bottom")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_label(r) for r in rows], rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()


def _points(ax: Any, rows: Sequence[dict[str, Any]], series: Sequence[tuple[str, str]]
            ) -> None:
    """Means with sample-std error bars (points, so the axis need not start at zero)."""
    width = 0.5 / len(series)
    for i, (field, name) in enumerate(series):
        picked = [(j, r[field]) for j, r in enumerate(rows) if r[field]["mean"] is not None]
        xs = [j + (i - (len(series) - 1) / 2) * width for j, _ in picked]
        ax.errorbar(xs, [s["mean"] for _, s in picked], yerr=[s["std"] or 0.0 for _, s in picked],
                    fmt="o", capsize=4, label=name)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_label(r) for r in rows], rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def mean_curve(runs: Sequence[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and sample std of the loss over seeds at the steps every run logged."""
    curves = []
    for r in runs:
        curve = r.get("loss_curve") or {}
        curves.append({s: v for s, v in zip(curve.get("step", []), curve.get("loss", []))
                       if v is not None})
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    means, stds = [], []
    for s in steps:
        values = [c[s] for c in curves]
        mean = sum(values) / len(values)
        means.append(mean)
        var = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)
               if len(values) > 1 else 0.0)
        stds.append(math.sqrt(var))
    return steps, means, stds


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _floor(ax: Any, value: float | None, label: str) -> None:
    """The no-learning reference as a dashed horizontal line (labelled in the legend)."""
    if value is not None:
        ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=label)


def _reference_score(reference: dict[str, Any] | None, metric: str) -> float | None:
    return ((reference or {}).get("metrics") or {}).get(metric)


def draw_all(out: Path, results: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
             metric: str, *, reference: dict[str, Any] | None = None,
             paired: Sequence[dict[str, Any]] = (), baseline: str = "lora",
             selection: Sequence[dict[str, Any]] = (),
             holdout_reference: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``metric.png``, ``loss.png``, ``time.png``, ``memory.png`` and, when there are
    paired differences / a selection, ``paired.png`` / ``selection.png`` into ``out``.

    Returns:
        ``{"plot_metric": path, ...}`` of the files written.
    """
    plt = _pyplot()
    files: dict[str, Path] = {}
    width = max(6.0, 0.6 * len(summary) + 2)
    score = _reference_score(reference, metric)
    kind = (reference or {}).get("kind", "")

    fig, ax = plt.subplots(figsize=(width, 4.5))
    _floor(ax, score, f"{kind} (no learning): {score:.4f}" if score is not None else "")
    _points(ax, summary, [("best", "best"), ("final", "final")])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per method (mean ± std over seeds)")
    files["plot_metric"] = _save(plt, fig, out / "metric.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    longest = 1
    for index, row in enumerate(summary):
        runs = [r for r in results if r["method"] == row["method"]
                and ("-" if r.get("rank") is None else str(r["rank"])) == row["rank"]]
        steps, means, stds = mean_curve(runs)
        if not steps:
            continue
        longest = max(longest, len(steps))
        window = max(1, len(steps) // 50)
        mean = _smooth(means, window)
        std = _smooth(stds, window)
        # Ten colours, then the same colours dashed, dotted, ...: every method stays distinct.
        (line,) = ax.plot(steps, mean, label=_label(row), color=f"C{index % 10}",
                          linestyle=LINESTYLES[index // 10 % len(LINESTYLES)])
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], alpha=0.15,
                        color=line.get_color())
    window = max(1, longest // 50)
    prior = (reference or {}).get("train_loss")
    _floor(ax, prior, f"predicting the label prior: {prior:.3f}" if prior is not None else "")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss" + (f" (moving average of {window})" if window > 1 else ""))
    ax.set_title("training loss, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    files["plot_loss"] = _save(plt, fig, out / "loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 4.5))
    _bars(axes[0], summary, [("time_per_step_median_s", "time/step")], scale=1e3)
    axes[0].set_ylabel("ms per optimizer step (median of the run)")
    axes[0].set_title("time per step (after warm-up)")
    _bars(axes[1], summary, [("samples_per_s", "samples/s")])
    axes[1].set_ylabel("samples / s")
    axes[1].set_title("throughput")
    files["plot_time"] = _save(plt, fig, out / "time.png")

    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 4.5))
    _bars(axes[0], summary, [("peak_memory_bytes", "peak")], scale=2**-20)
    axes[0].set_ylabel("MiB")
    axes[0].set_title("peak memory")
    _bars(axes[1], summary, [("optimizer_state_bytes", "optimizer state")], scale=2**-20)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("optimizer state")
    states = [r["optimizer_state_bytes"]["mean"] for r in summary]
    states = [v for v in states if v]
    if states and max(states) > 100 * min(states):  # adapters (KiB) next to full FT (MiB)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("MiB (log scale)")
    files["plot_memory"] = _save(plt, fig, out / "memory.png")

    finals = [p for p in paired if p["field"] == "final" and p.get("mean") is not None]
    if finals:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(finals) + 2), 4.5))
        xs = list(range(len(finals)))
        means = [p["mean"] for p in finals]
        ci = [p.get("ci95") or {} for p in finals]
        lows = [m - c["low"] if c.get("low") is not None else 0.0 for m, c in zip(means, ci)]
        highs = [c["high"] - m if c.get("high") is not None else 0.0 for m, c in zip(means, ci)]
        ax.errorbar(xs, means, yerr=[lows, highs], fmt="o", capsize=4,
                    label="mean Δ final, 95% t-interval over seeds")
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_xticks(xs)
        ax.set_xticklabels(["no learning" if p["method"] == "(no learning)" else
                            p["method"] if p["rank"] == "-" else f"{p['method']} r{p['rank']}"
                            for p in finals], rotation=30, ha="right")
        ax.set_ylabel(f"Δ {metric} vs {baseline} (paired)")
        ax.set_title(f"paired difference to {baseline} at the end of the run")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        files["plot_paired"] = _save(plt, fig, out / "paired.png")

    if selection:
        fig, ax = plt.subplots(figsize=(8, 5))
        held = _reference_score(holdout_reference, metric)
        _floor(ax, held, f"no learning on the held-out slice: {held:.4f}"
               if held is not None else "")
        for index, c in enumerate(selection):
            pts = [(lr, v) for lr, v in zip(c["grid"], c["scores"]) if v is not None]
            if not pts:
                continue
            label = c["method"] if c["rank"] == "-" else f"{c['method']} r{c['rank']}"
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                              label=label, color=f"C{index % 10}",
                              linestyle=LINESTYLES[index // 10 % len(LINESTYLES)])
            if c["selected"] is not None:
                ax.plot([c["selected"]], [c["score"]], marker="*", markersize=14,
                        color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"held-out {metric} (selection seed)")
        ax.set_title("learning-rate selection on a held-out slice of the training set (★ chosen)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        files["plot_selection"] = _save(plt, fig, out / "selection.png")
    return files


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
