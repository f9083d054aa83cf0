"""Run a comparison plan: one ``python -m app fit`` subprocess per run, resumable.

Each run lives in ``OUT/runs/<name>/``: ``spec.json`` (what the run is, and every attempt),
``run.log`` (the subprocess's output), the TensorBoard events, ``checkpoints/``, ``adapter/``,
``timing.json`` and, once finished, ``result.json`` (written atomically, last). A run with a
``result.json`` is finished and never redone; an unfinished one resumes from its
``checkpoints/last.ckpt`` (resuming gives the same numbers as never stopping) or starts again
from scratch if it has none. A failing run is reported and the others go on.

Stopping: Ctrl-C reaches the comparison and its run alike (one process group); SIGTERM may
reach the comparison alone (``kill PID``, ``timeout``, a scheduler signalling the main
process), so :func:`terminate_on_sigterm` turns it into :class:`Terminated` and the runner
passes it on to the run. Either way the run stops at the end of its batch with a resumable
``last.ckpt`` and the comparison waits for it, so no run outlives the comparison.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.compare.collect import collect_run
from app.compare.plan import RunSpec

__all__ = ["Outcome", "Terminated", "finished_result", "run_args", "run_plan",
           "terminate_on_sigterm"]

_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
_GRACE_S = 120  # seconds an interrupted run gets to stop cleanly


@dataclass
class Outcome:
    """What :func:`run_plan` did.

    Attributes:
        results: ``result.json`` contents of the plan's finished runs, in plan order.
        executed: Names of the runs launched by this call.
        failed: ``(name, message)`` of the runs that failed in this call.
    """

    results: list[dict[str, Any]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class Terminated(KeyboardInterrupt):
    """The comparison got SIGTERM (a :class:`KeyboardInterrupt`, so every ``except
    KeyboardInterrupt`` that records an interrupted attempt records this one too)."""


def terminate_on_sigterm() -> None:
    """Raise :class:`Terminated` in the main thread when SIGTERM arrives."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


class PlanMismatchError(RuntimeError):
    """A finished run in the output folder was made with other settings."""


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    os.replace(tmp, path)


def run_args(spec: RunSpec, run_dir: Path, resume_from: Path | None = None) -> list[str]:
    """The ``python -m app`` arguments of one run.

    Base and method fragments, then the progress bar off (the comparison prints its own
    progress), the run's rank / seed / extra options, and what the comparison needs: a
    TensorBoard logger writing straight into ``run_dir`` (checkpoints, adapter, config there
    too), the :class:`~app.compare.timing.StepTimer` and, unless the configs have one, the
    :class:`~app.callbacks.memory_monitor.MemoryMonitor`.
    """
    run_dir = run_dir.resolve()
    args = ["fit"]
    for config in spec.configs:
        args += ["--config", str(config)]
    args += ["--trainer.enable_progress_bar", "false", *spec.options]
    logger = {"class_path": _LOGGER,
              "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}
    timer = {"class_path": "app.compare.timing.StepTimer",
             "init_args": {"warmup_steps": spec.warmup_steps,
                           "dump_path": str(run_dir / "timing.json")}}
    args += ["--trainer.default_root_dir", str(run_dir),
             "--trainer.logger", json.dumps(logger),
             "--trainer.callbacks+=" + json.dumps(timer)]
    if spec.needs_memory_monitor:
        args.append("--trainer.callbacks+=app.callbacks.memory_monitor.MemoryMonitor")
    if resume_from is not None:
        args += ["--ckpt_path", str(resume_from)]
    return args


def finished_result(spec: RunSpec, run_dir: Path) -> dict[str, Any] | None:
    """The run's ``result.json`` if it is finished, ``None`` if not.

    Raises:
        PlanMismatchError: It was finished with other configs, rank, seed or options.
    """
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("fingerprint") != spec.fingerprint():
        raise PlanMismatchError(
            f"{run_dir} was finished with other settings (configs, rank, seed, extra arguments "
            "or warm-up steps changed); use another --out folder or delete that run folder")
    return result


def _prepare(spec: RunSpec, run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """Make the run folder ready; return the checkpoint to resume from and ``spec.json``."""
    spec_path = run_dir / "spec.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    state: dict[str, Any] = {}
    if spec_path.is_file():
        state = json.loads(spec_path.read_text())
    same = state.get("fingerprint") == spec.fingerprint()
    if not same or not last.is_file():
        # Nothing to resume (crashed before the first checkpoint) or another run's leftovers.
        shutil.rmtree(run_dir, ignore_errors=True)
        state = {"name": spec.name, "fingerprint": spec.fingerprint(), "attempts": []}
    run_dir.mkdir(parents=True, exist_ok=True)
    # Written before the run starts: a comparison killed mid-run still resumes this run.
    _write_json(spec_path, state)
    return (last if last.is_file() and same else None), state


def _launch_subprocess(args: list[str], run_dir: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "app", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path = run_dir / "run.log"
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt as stop:
            # A Ctrl-C reached the run too (same process group); a SIGTERM may not have, so
            # pass it on (a second one is harmless). Then give the run time to stop at a batch
            # boundary and write its last.ckpt; a second Ctrl-C (or a stuck run) kills it.
            if isinstance(stop, Terminated) and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_GRACE_S)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            raise
    if code == 0:
        return 0, ""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return code, f"exit status {code}: {lines[-1] if lines else ''} (log: {log_path})"


def _launch_in_process(args: list[str], run_dir: Path) -> tuple[int, str]:
    from app.cli import main

    try:
        main(args)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
        return code, f"exit status {code}" if code else ""
    except Exception as err:  # one failing run must not stop the comparison
        return 1, f"{type(err).__name__}: {err}"
    return 0, ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run_plan(plan: Sequence[RunSpec], out: Path, *, metric: str = "val/score",
             mode: str = "max", in_process: bool = False,
             echo: Callable[[str], None] = print) -> Outcome:
    """Run every unfinished run of ``plan`` in turn and collect its ``result.json``.

    Args:
        plan: The runs (see :func:`app.compare.plan.build_plan`).
        out: The comparison folder; runs go to ``out/runs/<name>/``.
        metric: Validation metric recorded as ``best`` / ``final``.
        mode: ``max`` or ``min``: which direction of ``metric`` is better.
        in_process: Run in this process instead of a subprocess (debugging and tests only:
            a crash ends the comparison and peak memory includes earlier runs).
        echo: Where progress lines go.

    Raises:
        PlanMismatchError: Before anything runs, if a finished run has other settings.
    """
    runs = out.resolve() / "runs"  # absolute: the runs' own paths must not depend on cwd
    done = {spec.name: finished_result(spec, runs / spec.name) for spec in plan}
    past = [r.get("wall_s") or 0.0 for r in done.values() if r]
    todo = [spec.name for spec in plan if done[spec.name] is None]
    echo(f"comparison: {len(plan)} runs, {len(plan) - len(todo)} finished earlier, "
         f"{len(todo)} to run -> {out}")
    launch = _launch_in_process if in_process else _launch_subprocess
    outcome, durations = Outcome(), []
    width = len(str(len(plan)))
    for index, spec in enumerate(plan, 1):
        tag = f"[{index:>{width}}/{len(plan)}] {spec.name}"
        run_dir = runs / spec.name
        if done[spec.name] is not None:
            echo(f"{tag}: finished earlier, skipped")
            outcome.results.append(done[spec.name])
            continue
        resume, state = _prepare(spec, run_dir)
        args = run_args(spec, run_dir, resume)
        echo(f"{tag}: running" + (f" (resuming from {resume.name})" if resume else ""))
        start = time.perf_counter()
        attempt: dict[str, Any] = {"resumed_from": str(resume) if resume else None}
        state["attempts"].append(attempt)
        try:
            code, message = launch(args, run_dir)
        except KeyboardInterrupt:
            attempt.update(wall_s=round(time.perf_counter() - start, 3), returncode=None)
            _write_json(run_dir / "spec.json", state)
            raise
        wall = time.perf_counter() - start
        attempt.update(wall_s=round(wall, 3), returncode=code)
        _write_json(run_dir / "spec.json", state)
        outcome.executed.append(spec.name)
        durations.append(wall)
        if code == 0 and not (run_dir / "timing.json").is_file():
            code, message = 1, "the run stopped without a result (interrupted?); rerun to resume it"
        if code == 0:
            try:
                collected = collect_run(run_dir, metric, mode)
            except Exception as err:  # unreadable events: report, keep the comparison going
                code, message = 1, f"collecting the results failed: {err!r}"
        if code == 0:
            result = {"name": spec.name, "method": spec.method, "rank": spec.rank,
                      "rank_label": spec.rank_label, "seed": spec.seed,
                      "lr": spec.lr, "stage": spec.stage,
                      "fingerprint": spec.fingerprint(),
                      "command": shlex.join([sys.executable, "-m", "app", *args]),
                      "wall_s": round(sum(a["wall_s"] for a in state["attempts"]), 3),
                      "attempts": len(state["attempts"]), **collected}
            _write_json(run_dir / "result.json", result)
            outcome.results.append(result)
            best = result["best"]
            status = f"done in {_duration(wall)}, {metric} best " + (
                "n/a" if best is None else f"{best:.4f}")
        else:
            outcome.failed.append((spec.name, message))
            status = f"FAILED after {_duration(wall)}: {message}"
        left = len(todo) - todo.index(spec.name) - 1
        mean = sum(durations + past) / len(durations + past)
        eta = f" | {left} left, ETA {_duration(left * mean)}" if left else " | all done"
        echo(f"{tag}: {status}{eta}")
    return outcome
