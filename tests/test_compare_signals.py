"""Stopping a comparison the ways users do: SIGTERM to ``python -m app.compare`` alone (``kill
PID``, ``timeout``, a scheduler signalling the main process), here with two selection runs at
once, and to ``bench/compare_glue.sh`` alone. Each time the runs in progress must stop at a
batch end with a resumable ``last.ckpt`` (the comparison waits for them, so no run outlives
it), no further run or task may start, and running the same command again must resume and
give the uninterrupted runs.

The signal comes from inside the run (``test_run_guard.SignalAtStep`` with ``ancestor``: the
run's parent or grandparent, after step 2), so it lands mid-run without timing guesses, and
only the comparison (or the script) gets it: the run hears of it only if it is passed on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import base_yaml, compare

ROOT = Path(__file__).resolve().parents[1]
TERMINATED = 128 + int(signal.SIGTERM)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def signal_ancestor(ancestor: int, once: Path | None = None, group: bool = False
                    ) -> list[str]:
    """Options adding a callback that signals the run's ``ancestor``-th parent (with
    ``group``: its whole process group) after step 2."""
    opts = ["--trainer.callbacks+=test_run_guard.SignalAtStep", "--trainer.callbacks.step=2",
            f"--trainer.callbacks.ancestor={ancestor}", "--trainer.callbacks.wait_s=1.0"]
    if group:  # and a second time, as a script forwarding the signal or a repeated kill does
        opts += ["--trainer.callbacks.group=true", "--trainer.callbacks.again_s=0.5"]
    return opts + ([f"--trainer.callbacks.once={once}"] if once else [])


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (this test's output folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_sigterm_to_the_comparison_alone_stops_parallel_runs_resumably(
        tmp_path: Path, tiny_ckpt, glue_dir: Path) -> None:
    """Two selection runs at once (``--select-jobs 2``); SIGTERM to the comparison: both stop,
    nothing else starts; the rerun resumes them and gives the one-at-a-time results."""
    base = base_yaml(tmp_path, tiny_ckpt("bert"), glue_dir)
    once = tmp_path / "signalled"
    common = ["--base", str(base), "--methods", "lora", "--ranks", "2", "--seeds", "0",
              "--lrs", "5e-4", "2e-3", "--warmup-steps", "1", "--no-plots"]
    extra = ["--extra", "--trainer.max_steps", "8", *signal_ancestor(1, once)]
    cmd = [sys.executable, "-m", "app.compare", *common, "--select-jobs", "2", "--out", "out",
           *extra]
    cut = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert cut.returncode == TERMINATED, cut.stdout[-2000:] + cut.stderr[-2000:]
    assert "terminated (SIGTERM): run the same command again to resume" in cut.stderr
    assert "2 at a time" in cut.stdout
    lines = cut.stdout.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.endswith(": running")]
    assert len(starts) == 2 and not any(": done" in ln or "FAILED" in ln for ln in lines)
    sel = tmp_path / "out" / "selection" / "runs"
    names = ["lora-r2-lr0.0005-s0", "lora-r2-lr0.002-s0"]
    stopped = []
    for name in names:
        run = sel / name
        assert not (run / "result.json").exists() and not (run / "adapter").exists()
        attempt = json.loads((run / "spec.json").read_text())["attempts"][-1]
        assert attempt["returncode"] is None and attempt["threads"] >= 1
        if (run / "checkpoints" / "last.ckpt").is_file():
            # it heard of the signal (passed on) and stopped at a batch end
            log = (run / "run.log").read_text()
            assert "SIGTERM" in log and "interrupted at step" in log
            assert "resumable checkpoint" in log
            stopped.append(name)
    assert stopped  # at least the run that sent the signal had passed step 2
    assert not (tmp_path / "out" / "runs").exists()  # the seed run never started
    assert not processes_mentioning(str(tmp_path / "out"))  # no run outlived the comparison

    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    for name in stopped:
        assert f"{name}: running (resuming from last.ckpt)" in again.stdout

    # the same comparison never stopped, one run at a time (the callback fires once only, so
    # every option is the same)
    code, printed = compare(*common, "--out", str(tmp_path / "ref"), *extra)
    assert code == 0, printed[-2000:]
    for folder, name in [("selection/runs", n) for n in names] + [("runs", "lora-r2-s0")]:
        got = json.loads((tmp_path / "out" / folder / name / "result.json").read_text())
        want = json.loads((tmp_path / "ref" / folder / name / "result.json").read_text())
        # a run stopped before its first checkpoint starts again from scratch
        assert got["global_step"] == 8 and got["attempts"] == (2 if name in stopped else 1)
        assert got["concurrent_runs"] == (2 if folder != "runs" else 1)
        assert got["lr"] == want["lr"]
        assert got["loss_curve"]["step"] == want["loss_curve"]["step"] == list(range(1, 9))
        for a, b in zip(got["loss_curve"]["loss"], want["loss_curve"]["loss"]):
            assert a == pytest.approx(b, abs=1e-5)
        assert got["final"] == pytest.approx(want["final"], abs=1e-6)


@pytest.mark.parametrize("group", [False, True], ids=["script-alone", "process-group"])
def test_sigterm_to_compare_glue_script_stops_its_run_and_starts_no_further_task(
        group: bool, tmp_path: Path, tiny_ckpt, glue_dir: Path) -> None:
    """SIGTERM to the script alone (``kill PID``), or to its whole process group (``kill --
    -PGID``: the script, the comparison and the run all get it, and the script forwards it
    to the comparison once more; here the group is signalled twice, half a second apart, so
    that a second SIGTERM surely reaches the comparison while its run is stopping: it used to
    take that for "abort" and kill the run before its ``last.ckpt``)."""
    out = tmp_path / "out"
    env = {**ENV, "TASKS": "mrpc stsb", "SMOKE_METHODS": "lora", "OUT": str(out),
           "PYTHON": sys.executable,
           "EXTRA": " ".join([f"--model.init_args.checkpoint={tiny_ckpt('bert')}",
                              f"--data.init_args.data_dir={glue_dir}",
                              *signal_ancestor(2, group=group)])}
    done = subprocess.run(["bash", str(ROOT / "bench/compare_glue.sh"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # its own group, away from pytest's
    assert done.returncode == TERMINATED, done.stdout[-2000:] + done.stderr[-2000:]
    assert "terminated (SIGTERM)" in done.stderr
    run = out / "mrpc" / "selection" / "runs" / "lora-r8-lr0.0005-s0"
    assert "SIGTERM: stopping at the end of this batch" in (run / "run.log").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "result.json").exists()
    assert not (out / "mrpc" / "selection" / "runs" / "lora-r8-lr0.002-s0").exists()
    assert not (out / "stsb").exists()  # the task loop stopped
    assert not processes_mentioning(str(out))
