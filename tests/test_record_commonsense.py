"""``bench/record_commonsense.py`` end to end on a tiny Llama: the zero-shot row and a LoRA
row come from real ``lightning-cli`` ``fit`` / ``test`` runs, the per-question marks it keeps
rebuild its accuracies and its paired change (checked against a hand computation), a rerun
reuses the runs, a rerun with other settings stops instead of mixing them, and a fit stopped
by Ctrl-C resumes from its last.ckpt when the same command is run again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare_signals import processes_mentioning
from tiny_causal import write_commonsense

ROOT = Path(__file__).resolve().parents[1]
SEVEN = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa"]


def record(ckpt: Path, data: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/record_commonsense.py"), "--methods", "lora",
         "--checkpoint", str(ckpt), "--data-dir", str(data), "--work", str(tmp / "work"),
         "--out", str(tmp / "out"), "--batch", "4", "--test-per-task", "5", "--threads", "1",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})


def test_record_commonsense_rows_and_paired_change(tiny_causal, tmp_path: Path) -> None:
    sizes = {t: (12 if t in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa") else 0, 7)
             for t in SEVEN}
    data = write_commonsense(tmp_path / "cs", sizes)
    done = record(tiny_causal("llama"), data, tmp_path, "--steps", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "out.json").read_text())
    results = payload["results"]
    assert set(results) == {"zero-shot", "lora_s0"}
    zero, lora = results["zero-shot"], results["lora_s0"]
    for row in (zero, lora):
        for task in SEVEN:  # 5 of the 7 questions of every set, the same ones in both rows
            assert len(row["questions"][task]) == len(row["correct"][task]) == 5
            assert row["questions"][task] == zero["questions"][task]
            marks = row["correct"][task]
            assert math.isclose(row["scores"][task], marks.count("1") / 5)
        assert math.isclose(row["scores"]["average"],
                            sum(row["scores"][t] for t in SEVEN) / 7)
    assert lora["settings"] == {"steps": 3, "batch": 4, "test_per_task": 5,
                                "checkpoint": str(tiny_causal("llama"))}
    assert lora["step_ms"] > 0 and lora["trainable"] != "?"
    # the paired change by hand: mean over tasks of the mean per-question difference, and
    # 1.96 * sqrt(sum_t var_t / n_t) / 7 with the sample variance
    mean, var = 0.0, 0.0
    for task in SEVEN:
        d = [int(a) - int(b) for a, b in zip(lora["correct"][task], zero["correct"][task])]
        m = sum(d) / 5
        mean += m / 7
        var += sum((x - m) ** 2 for x in d) / 4 / 5 / 49
    half = 1.96 * math.sqrt(var)
    row = next(line for line in (tmp_path / "out.md").read_text().splitlines()
               if line.startswith("| lora_s0 |"))
    assert f"{100 * mean:+.2f} ({100 * (mean - half):+.2f}, {100 * (mean + half):+.2f})" in row
    # the majority-answer row: the most common gold answer's share per task, by hand
    preds = [json.loads(x) for x in next((tmp_path / "work/zero_shot").rglob(
        "predictions_test.jsonl")).read_text().splitlines()]
    for task in SEVEN:
        gold = [p["answer"] for p in preds if p["task"] == task]
        assert len(gold) == 5
        assert math.isclose(zero["majority"][task], max(map(gold.count, gold)) / 5)
    picked = {t: [p["prediction"] for p in preds if p["task"] == t] for t in SEVEN}
    for task in SEVEN:  # the zero-shot row's share of its most common prediction
        assert math.isclose(zero["top_share"][task],
                            max(map(picked[task].count, picked[task])) / 5)
    assert all(0 < lora["top_share"][t] <= 1 for t in SEVEN)
    floor = next(line for line in (tmp_path / "out.md").read_text().splitlines()
                 if line.startswith("| majority answer |"))
    assert f"| {100 * zero['majority']['average']:.2f} |" in floor
    # a rerun reuses both rows (no new file), a rerun with other settings stops
    versions = sorted((tmp_path / "work/lora_s0").rglob("*"))
    again = record(tiny_causal("llama"), data, tmp_path, "--steps", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted((tmp_path / "work/lora_s0").rglob("*")) == versions
    other = record(tiny_causal("llama"), data, tmp_path, "--steps", "4")
    assert other.returncode != 0
    assert "was recorded with" in other.stderr and "delete" in other.stderr
    # a fit interrupted by Ctrl-C (SIGINT after step 2 of 3) stops with the command that
    # resumes; running it again resumes from last.ckpt and finishes the row
    stop = ["--seeds", "1", "--steps", "3",
            "--fit-arg=--trainer.callbacks+=test_run_guard.SignalAtStep",
            "--fit-arg=--trainer.callbacks.step=2", "--fit-arg=--trainer.callbacks.signum=2"]
    cut = record(tiny_causal("llama"), data, tmp_path, *stop)
    assert cut.returncode != 0
    assert "interrupted (130); run the same command again to resume" in cut.stderr
    fit = tmp_path / "work/lora_s1/fit"
    assert (fit / "checkpoints/last.ckpt").is_file() and not (fit / "adapter").exists()
    assert not (tmp_path / "work/lora_s1/result.json").exists()
    resumed = record(tiny_causal("llama"), data, tmp_path, *stop)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "lora_s1: resuming from" in resumed.stdout
    assert (fit / "adapter").is_dir()
    assert len(json.loads((tmp_path / "work/lora_s1/fit_walls.json").read_text())) == 2
    row = json.loads((tmp_path / "work/lora_s1/result.json").read_text())
    assert row["settings"]["fit_args"] == [a.split("=", 1)[1] for a in stop[4:]]
    assert set(json.loads((tmp_path / "out.json").read_text())["results"]) == {
        "zero-shot", "lora_s1"}
    # SIGTERM to the recorder alone (kill PID, timeout): passed on to the fit, which stops
    # with a resumable last.ckpt; the recorder waits for it and says how to resume
    term = ["--seeds", "2", "--steps", "3",
            "--fit-arg=--trainer.callbacks+=test_run_guard.SignalAtStep",
            "--fit-arg=--trainer.callbacks.step=2", "--fit-arg=--trainer.callbacks.ancestor=1",
            "--fit-arg=--trainer.callbacks.wait_s=1.0"]
    cut = record(tiny_causal("llama"), data, tmp_path, *term)
    assert "interrupted (143); run the same command again to resume" in cut.stderr, (
        cut.stdout[-2000:] + cut.stderr[-2000:])
    fit = tmp_path / "work/lora_s2/fit"
    assert (fit / "checkpoints/last.ckpt").is_file() and not (fit / "adapter").exists()
    assert not processes_mentioning(str(fit))  # the fit did not outlive the recorder


def test_seed_options_and_seed_means_against_a_hand_computation() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import record_commonsense
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def row(bits: str) -> dict:  # the same two questions' marks on every task
        acc = bits.count("1") / len(bits)
        return {"scores": {**{t: acc for t in SEVEN}, "average": acc},
                "questions": {t: [0, 1] for t in SEVEN}, "correct": {t: bits for t in SEVEN}}

    # every seed the fragment pins follows the run's seed, as in python -m app.compare
    assert record_commonsense.run_seed_options("lora", 3) == ["--seed_everything", "3"]
    assert record_commonsense.run_seed_options("stella", 3) == [
        "--seed_everything", "3", "--model.init_args.adapter.init_args.seed", "3"]

    results = {"zero-shot": row("00"), "lora_s0": row("10"), "lora_s1": row("11"),
               "lora_s2": row("10"), "stella_s0": row("11")}
    means = record_commonsense.seed_means(results)
    assert set(means) == {"lora"}  # one StelLA seed: no mean row
    m = means["lora"]
    assert m["seeds"] == 3 and m["scores"]["average"] == pytest.approx(2 / 3)
    # paired changes 0.5, 1.0, 0.5: mean 2/3, sd sqrt(1/12), t(0.975, 2) = 4.3027
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert m["change"]["mean"] == pytest.approx(2 / 3)
    assert m["change"]["low"] == pytest.approx(2 / 3 - half, rel=1e-5)
    assert m["change"]["high"] == pytest.approx(2 / 3 + half, rel=1e-5)
