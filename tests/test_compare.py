"""``python -m app.compare``: grid, per-run records, resume, statistics, plots (tiny models)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from tiny import write_yaml

from app.compare import cli, report
from app.compare.collect import machine
from app.compare.plan import build_plan
from app.compare.timing import batch_size_of

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "configs" / "methods"
PNG = b"\x89PNG\r\n\x1a\n"


class CrashAt(L.Callback):
    """Raises after step ``$COMPARE_TEST_CRASH_AT`` when that variable is set (a killed run)."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        at = os.environ.get("COMPARE_TEST_CRASH_AT")
        if at and trainer.global_step == int(at):
            raise RuntimeError(f"simulated crash at step {at}")


def base_yaml(folder: Path, ckpt: Path, glue_dir: Path) -> Path:
    """Tiny BERT on the small MRPC files: 6 batches per epoch, 4 steps, validation every 2."""
    return write_yaml(folder / "base.yaml", {
        "model": {"class_path": "app.modules.classification.ClassificationModule",
                  "init_args": {"checkpoint": str(ckpt)}},
        "data": {"class_path": "app.data.glue.GLUEDataModule",
                 "init_args": {"task": "mrpc", "data_dir": str(glue_dir), "max_length": 32,
                               "batch_size": 8}},
        "trainer": {"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1,
                    "enable_model_summary": False, "accelerator": "cpu", "devices": 1},
    })


def compare(*args: str) -> tuple[int, str]:
    """``python -m app.compare ... --in-process``: exit status and what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["--in-process", *args])  # before a trailing --extra
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt, glue_dir: Path):
    """LoRA and rsLoRA (the shipped fragments at rank 2) x seeds 0 and 1, run in-process."""
    folder = tmp_path_factory.mktemp("compare")
    base = base_yaml(folder, tiny_ckpt("bert"), glue_dir)
    args = ["--base", str(base), "--methods", "lora", "rslora", "--seeds", "0", "1",
            "--ranks", "2", "--out", str(folder / "out"), "--warmup-steps", "1"]
    code, printed = compare(*args)
    assert code == 0, printed[-3000:]
    return folder / "out", args, printed


NAMES = ["lora-r2-s0", "lora-r2-s1", "rslora-r2-s0", "rslora-r2-s1"]


def test_two_methods_two_seeds_give_the_expected_table(grid, tiny_ckpt) -> None:
    from peft import LoraConfig

    from app.modules.adapted import count_parameters
    from app.modules.classification import ClassificationModule

    out, _, printed = grid
    assert printed.count(": running") == 4 and "4/4 runs finished" in printed
    lines = (out / "summary.md").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    assert columns[:6] == ["method", "rank", "n", "val/score best", "val/score final",
                           "Δ best vs lora (paired)"]
    assert {"time/step median (ms)", "samples/s", "peak memory", "optimizer state",
            "trainable params", "adapter size", "drift max"} <= set(columns)
    table = lines[head + 2:lines.index("", head)]  # the main table, up to its blank line
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    # First the no-learning floor (majority class of the tiny MRPC train set), then the runs.
    assert rows[0][0] == "*majority (no learning)*" and rows[0][3] == rows[0][4]
    rows = rows[1:]
    assert [r[:3] for r in rows] == [["lora", "2", "2"], ["rslora", "2", "2"]]
    assert rows[0][5] == "(baseline)" and rows[1][5].endswith("(n=2)")

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == [NAMES[0], NAMES[2], NAMES[1], NAMES[3]]  # run order
    assert json.loads((out / "results.json").read_text())["runs"][0]["name"] == NAMES[0]

    module = ClassificationModule(checkpoint=str(tiny_ckpt("bert")), task="mrpc", num_labels=2,
                                  adapter=LoraConfig(r=2, lora_alpha=16, lora_dropout=0.05))
    module.configure_model()
    expected_trainable, expected_total = count_parameters(module.model)
    for name in NAMES:
        r = json.loads((out / "runs" / name / "result.json").read_text())
        assert (r["method"], r["rank"], r["seed"]) == (name.split("-")[0], 2,
                                                      int(name[-1]))
        assert r["trainable_params"] == expected_trainable
        assert r["total_params"] == expected_total
        assert r["time_per_step_s"] > 0 and r["samples_per_s"] > 0
        assert r["time_per_step_median_s"] > 0
        assert r["timed_steps"] == 3 and r["global_step"] == 4  # 4 steps, 1 warm-up
        assert r["loss_curve"]["step"] == [1, 2, 3, 4]
        assert all(0 < v < 5 for v in r["loss_curve"]["loss"])
        assert 0 <= r["best"] <= 1 and r["final"] is not None
        assert r["best"] >= r["final"] and r["best_step"] in (2, 4)
        assert set(r["metrics_at_best"]) >= {"val/score", "val/f1", "val/accuracy"}
        # AdamW keeps two fp32 moments per trainable parameter (plus step counters).
        assert r["optimizer_state_bytes"] >= 8 * expected_trainable
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_source"] == "rss"
        assert r["adapter_bytes"] > 0 and r["drift_max"] is None
        assert r["machine"] == {k: v for k, v in machine().items()
                                if k in ("cpu", "gpu", "torch")}
    for png in ("metric.png", "loss.png", "time.png", "memory.png", "paired.png"):
        assert (out / png).read_bytes()[:8] == PNG
    text = "\n".join(lines)
    assert "## Paired differences to `lora`" in text and "| rslora | 2 | 2 |" in text
    assert "more than one machine" not in text  # one machine: no warning


def test_rerun_does_not_redo_finished_runs(grid) -> None:
    out, args, _ = grid
    stamps = {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in NAMES}
    events = {n: sorted(p.name for p in (out / "runs" / n).glob("events.*")) for n in NAMES}
    code, printed = compare(*args)
    assert code == 0
    assert printed.count("finished earlier, skipped") == 4 and ": running" not in printed
    assert stamps == {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in NAMES}
    assert events == {n: sorted(p.name for p in (out / "runs" / n).glob("events.*"))
                      for n in NAMES}
    # Other settings in the same folder are refused instead of mixed in.
    code, _ = compare(*args, "--extra", "--trainer.max_steps", "5")
    assert code == 2


def test_crashed_run_resumes_from_its_last_checkpoint(grid, tmp_path: Path, tiny_ckpt,
                                                      glue_dir: Path, monkeypatch) -> None:
    base = base_yaml(tmp_path, tiny_ckpt("bert"), glue_dir)
    args = ["--base", str(base), "--methods", "lora", "--seeds", "0", "--ranks", "2",
            "--out", str(tmp_path / "out"), "--warmup-steps", "1", "--no-plots",
            "--extra", "--trainer.callbacks+=test_compare.CrashAt"]
    run = tmp_path / "out" / "runs" / "lora-r2-s0"
    monkeypatch.setenv("COMPARE_TEST_CRASH_AT", "3")
    code, printed = compare(*args)
    assert code == 1 and "FAILED" in printed, printed[-2000:]
    assert not (run / "result.json").exists() and (run / "checkpoints" / "last.ckpt").exists()

    monkeypatch.delenv("COMPARE_TEST_CRASH_AT")
    code, printed = compare(*args)
    assert code == 0 and "resuming from last.ckpt" in printed
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["attempts"] == 2 and resumed["global_step"] == 4
    # Resuming gives the run that never stopped (the grid's lora-r2-s0).
    whole = json.loads((grid[0] / "runs" / "lora-r2-s0" / "result.json").read_text())
    assert resumed["loss_curve"]["step"] == whole["loss_curve"]["step"]
    for a, b in zip(resumed["loss_curve"]["loss"], whole["loss_curve"]["loss"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert resumed["best"] == pytest.approx(whole["best"], abs=1e-6)


def test_subprocess_run_records_memory_and_timing(tmp_path: Path, tiny_ckpt,
                                                  glue_dir: Path) -> None:
    """The product path: each run a ``python -m app fit`` subprocess with its own log."""
    base = base_yaml(tmp_path, tiny_ckpt("bert"), glue_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "app.compare", "--base", str(base), "--methods", "lora",
         "--ranks", "2", "--out", "out", "--warmup-steps", "1", "--no-plots",
         "--extra", "--trainer.max_steps", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[1/1] lora-r2-s0: done" in proc.stdout and "all done" in proc.stdout
    run = tmp_path / "out" / "runs" / "lora-r2-s0"
    assert "-m app fit" in (run / "run.log").read_text()
    r = json.loads((run / "result.json").read_text())
    assert r["global_step"] == 2 and r["timed_steps"] == 1 and r["time_per_step_s"] > 0
    assert r["optimizer_state_bytes"] > 0 and r["peak_memory_bytes"] > 0
    assert "--model.init_args.adapter.init_args.r 2" in r["command"]


def test_geometry_optimizer_rank_and_rankless_methods(tmp_path: Path, tiny_ckpt,
                                                      glue_dir: Path) -> None:
    """StelLA reports its drift, GaLore gets the rank on its optimizer, full FT has none."""
    base = base_yaml(tmp_path, tiny_ckpt("bert"), glue_dir)
    code, printed = compare(
        "--base", str(base), "--methods", "full", "stella", "galore", "--ranks", "2",
        "--baseline", "full", "--out", str(tmp_path / "out"), "--warmup-steps", "1",
        "--no-plots", "--extra", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")
    assert code == 0, printed[-3000:]
    runs = tmp_path / "out" / "runs"
    full, stella, galore = (json.loads((runs / n / "result.json").read_text())
                            for n in ("full-s0", "stella-r2-s0", "galore-r2-s0"))
    assert full["rank"] is None and full["drift_max"] is None
    # Measured at the end although the monitor's every_n_steps (50) was never reached.
    assert stella["drift_max"] is not None and stella["drift_max"] < 1e-4
    assert galore["trainable_params"] == full["trainable_params"]
    assert 0 < galore["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| full | - | 1 |" in text and "| galore | 2 | 1 |" in text
    # The papers' claims: GaLore against full fine-tuning (its own baseline), with the
    # optimizer-state saving measured above; one seed gives no interval, so no verdict.
    claim = next(line for line in text.splitlines()
                 if line.startswith("| `galore` r2 matches `full` |"))
    ratio = galore["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    assert f"optimizer state {ratio:.3f}x (-" in claim and "iB; holds)" in claim
    # Two steps of a tiny random model: both may still predict the majority class, which
    # the verdict must say rather than read the (absent) interval.
    quality = claim.split(" | ")[4]
    assert quality == "one seed: no interval" or (
        quality.startswith("compares nothing (") and "ends at the no-learning score" in quality)
    assert claim.split(" | ")[5] == "one seed: no interval"
    assert "`stella`" not in text.split("## The papers' claims")[1]  # lora did not run


def test_plan_applies_ranks_and_seeds_where_each_method_keeps_them(tmp_path: Path) -> None:
    base = write_yaml(tmp_path / "base.yaml", {"trainer": {"max_steps": 1}})
    fragments = [METHODS / f"{m}.yaml" for m in ("full", "lora", "galore", "garare", "stella",
                                                   "asymmetric")]
    plan = build_plan([base], fragments, seeds=[0, 1], ranks=[4, 16],
                      extra=["--trainer.max_steps", "3"])
    names = [s.name for s in plan]
    assert names[:4] == ["full-s0", "lora-r4-s0", "lora-r16-s0", "galore-r4-s0"]
    assert names[11:13] == ["full-s1", "lora-r4-s1"]  # seed-major: seed 1 after all of seed 0
    assert len(plan) == 2 + 5 * 2 * 2
    by_name = {s.name: s for s in plan}
    assert by_name["full-s1"].rank_label == "-"
    assert "--model.init_args.adapter.init_args.r" in by_name["lora-r16-s0"].options
    galore = by_name["galore-r16-s1"].options
    assert galore[galore.index("--model.init_args.optimizer.init_args.rank") + 1] == "16"
    assert not by_name["galore-r16-s1"].needs_memory_monitor
    assert by_name["lora-r4-s0"].needs_memory_monitor
    for name, key in (("garare-r4-s1", "--model.init_args.optimizer.init_args.seed"),
                      ("stella-r4-s1", "--model.init_args.adapter.init_args.seed"),
                      ("asymmetric-r4-s1", "--model.init_args.adapter.init_args.init_seed")):
        options = by_name[name].options
        assert options[options.index(key) + 1] == "1", name
    assert by_name["lora-r4-s0"].options[-2:] == ("--trainer.max_steps", "3")


def _run(method: str, rank: int | None, seed: int, best: float, **more: float) -> dict:
    return {"name": f"{method}-{rank}-{seed}", "method": method, "rank": rank, "seed": seed,
            "metric": "val/score", "mode": "max", "best": best, "final": best - 0.01,
            "time_per_step_s": more.get("t", 0.1), "time_per_step_median_s": 0.09,
            "samples_per_s": 320.0,
            "peak_memory_bytes": 2**30, "optimizer_state_bytes": 3 * 2**20,
            "trainable_params": 1000, "total_params": 100000, "adapter_bytes": 5000,
            "drift_max": more.get("drift"), "wall_s": 10.0,
            "loss_curve": {"step": [1, 2, 3], "loss": [1.0, 0.8 - seed * 0.01, 0.5]}}


def test_report_only_rebuilds_the_report_with_the_command_that_makes_the_runs(grid) -> None:
    out, args, _ = grid
    stamps = {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in NAMES}
    (out / "summary.md").unlink()
    code, printed = compare("--report-only", *args)
    assert code == 0 and ": running" not in printed and "4/4 runs finished" in printed
    assert stamps == {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in NAMES}
    text = (out / "summary.md").read_text()
    assert "| lora | 2 | 2 |" in text and "| rslora | 2 | 2 |" in text
    assert "Command: `python -m app.compare --in-process --base" in text
    assert "--report-only" not in text.split("Command:")[1].split("`")[1]
    assert "report rebuilt from the finished runs with --report-only" in text


def test_statistics_match_a_hand_computation(tmp_path: Path) -> None:
    results = [
        _run("lora", 8, 0, 0.80), _run("lora", 8, 1, 0.82), _run("lora", 8, 2, 0.84),
        _run("lora", 16, 0, 0.81), _run("lora", 16, 1, 0.85),
        _run("stella", 8, 0, 0.83, drift=1e-6), _run("stella", 8, 1, 0.82, drift=3e-6),
        _run("stella", 8, 2, 0.88, drift=2e-6), _run("stella", 8, 3, 0.90, drift=2e-6),
        _run("full", None, 0, 0.86), _run("full", None, 1, 0.84),
    ]
    summary = {(r["method"], r["rank"]): r for r in report.summarize(results)}
    lora8 = summary[("lora", "8")]["best"]
    assert lora8["n"] == 3 and lora8["mean"] == pytest.approx(0.82)
    assert lora8["std"] == pytest.approx(math.sqrt((0.02**2 + 0 + 0.02**2) / 2))  # ddof=1
    stella = summary[("stella", "8")]
    assert stella["seeds"] == [0, 1, 2, 3]
    assert stella["best"]["mean"] == pytest.approx((0.83 + 0.82 + 0.88 + 0.90) / 4)
    assert stella["drift_max"]["mean"] == pytest.approx(2e-6)
    assert summary[("full", "-")]["final"]["mean"] == pytest.approx(0.84)
    assert report.mean_std([0.5])["std"] is None

    pairs = {(p["method"], p["rank"], p["baseline_rank"]): p
             for p in report.paired_differences(results, "lora")}
    # stella r8 vs lora r8 on the common seeds 0, 1, 2: differences 0.03, 0.00, 0.04.
    p = pairs[("stella", "8", "8")]
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == pytest.approx([0.03, 0.0, 0.04])
    mean = (0.03 + 0.0 + 0.04) / 3
    assert p["mean"] == pytest.approx(mean)
    assert p["std"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in (0.03, 0, 0.04))
                                               / 2))
    # full fine-tuning has no rank: against every rank of the baseline.
    assert pairs[("full", "-", "8")]["diffs"] == pytest.approx([0.06, 0.02])
    assert pairs[("full", "-", "16")]["diffs"] == pytest.approx([0.05, -0.01])
    assert ("stella", "8", "16") not in pairs

    files = report.write_report(tmp_path, results, baseline="lora")
    text = files["markdown"].read_text()
    assert "| lora | 8 | 3 | 0.8200 ± 0.0200 | 0.8100 ± 0.0200 | (baseline) |" in text
    assert f"+{mean:.4f} ± {p['std']:.4f} (n=3)" in text
    assert "r8: +0.0400 ± 0.0283 (n=2); r16: +0.0200 ± 0.0424 (n=2)" in text
    assert "| 90.0 ± 0.0 | 320.0 ± 0.0 | 1.0 ± 0.0 GiB | 3.0 ± 0.0 MiB | 1,000 (1.00%)" in text
    with files["csv"].open() as handle:
        assert len(list(csv.DictReader(handle))) == len(results)
    for key in ("plot_metric", "plot_loss", "plot_time", "plot_memory"):
        assert files[key].read_bytes()[:8] == PNG


def test_step_times_from_several_machines_are_flagged(tmp_path: Path) -> None:
    """Runs recorded in different sittings may come from different CPUs (seen: one sitting on
    an AMD EPYC, the next on an Intel Xeon at half the step time): the report says which runs
    share a machine instead of setting their step times side by side silently."""
    runs = [_run("lora", 8, 0, 0.80), _run("lora", 8, 1, 0.82), _run("stella", 8, 0, 0.83),
            _run("stella", 8, 1, 0.84)]
    for r, cpu in zip(runs, ["AMD EPYC", "Intel Xeon", "AMD EPYC", None]):
        if cpu:
            r["machine"] = {"cpu": cpu, "torch": "2.13.0"}
    text = report.write_report(tmp_path / "mixed", runs, plots=False)["markdown"].read_text()
    assert ("**The step times come from more than one machine** (runs recorded in different "
            "sittings): AMD EPYC: lora-8-0, stella-8-0; Intel Xeon: lora-8-1; not recorded: "
            "stella-8-1.") in text
    for r in runs:
        r["machine"] = {"cpu": "Intel Xeon", "gpu": "NVIDIA H200"}
    text = report.write_report(tmp_path / "one", runs, plots=False)["markdown"].read_text()
    assert "more than one machine" not in text


def test_batch_size_of_nested_batches() -> None:
    import torch

    assert batch_size_of({"input_ids": torch.zeros(5, 7), "labels": torch.zeros(5)}) == 5
    assert batch_size_of((torch.zeros(3, 2), torch.zeros(3))) == 3
    assert batch_size_of({"meta": "x"}) == 0


def test_loss_curves_of_many_methods_stay_distinct(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Eleven methods (the standard comparison) get eleven different (colour, style) lines."""
    from app.compare import plots

    figures: dict[str, object] = {}
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.setdefault(path.name, fig)
                        and path)
    methods = [f"m{i}" for i in range(11)]
    results = [_run(m, 8, s, 0.5 + 0.01 * i) for i, m in enumerate(methods) for s in (0, 1)]
    report.write_report(tmp_path, results, baseline="m0")
    lines = figures["loss.png"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"{m} r8" for m in methods]
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(styles) == 11
