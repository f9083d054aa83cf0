"""Run a comparison plan: one ``python -m app fit`` subprocess per run, resumable.

Each run lives in ``OUT/runs/<name>/``: ``spec.json`` (what the run is, and every attempt),
``run.log`` (the subprocess's output), the TensorBoard events, ``checkpoints/``, ``adapter/``,
``timing.json`` and, once finished, ``result.json`` (written atomically, last). A run with a
``result.json`` is finished and never redone; an unfinished one resumes from its
``checkpoints/last.ckpt`` (resuming gives the same numbers as never stopping) or starts again
from scratch if it has none. A failing run is reported and the others go on.

Runs go one at a time, or ``jobs`` at once (CPU runs sharing the cores, each with
``cores / jobs`` threads; only for runs whose step times are not reported). Stopping (Ctrl-C,
SIGTERM) is :mod:`app.compare.launch`'s: every run in progress stops with a resumable
``last.ckpt`` and the comparison waits for them. With ``finish_by``
(:mod:`app.compare.deadline`) a run starts only if it is expected to end by then; the others
are left for the next call.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.compare.collect import collect_run, machine, machine_label
from app.compare.deadline import expected_wall
from app.compare.launch import Launched, run_in_process, start_subprocess, stop_all, wait_any
from app.compare.plan import RunSpec

__all__ = ["Outcome", "finished_result", "run_args", "run_plan"]

_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


@dataclass
class Outcome:
    """What :func:`run_plan` did.

    Attributes:
        results: ``result.json`` contents of the plan's finished runs, in plan order.
        executed: Names of the runs launched by this call.
        failed: ``(name, message)`` of the runs that failed in this call.
        deferred: ``(name, message)`` of the runs not started because they were not expected
            to end by ``finish_by``.
    """

    results: list[dict[str, Any]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str]] = field(default_factory=list)


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
    recorded = spec.recorded_as(result.get("fingerprint"))
    if recorded is None:
        raise PlanMismatchError(
            f"{run_dir} was finished with other settings (configs, rank, seed, extra arguments "
            "or warm-up steps changed); use another --out folder or delete that run folder")
    if recorded == "legacy":  # same run: record the fingerprint that survives comment edits
        result["fingerprint"] = spec.fingerprint()
        _write_json(path, result)
    return result


def _prepare(spec: RunSpec, run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """Make the run folder ready; return the checkpoint to resume from and ``spec.json``."""
    spec_path = run_dir / "spec.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    state: dict[str, Any] = {}
    if spec_path.is_file():
        state = json.loads(spec_path.read_text())
    same = spec.recorded_as(state.get("fingerprint")) is not None
    if same:
        state["fingerprint"] = spec.fingerprint()
    if not same or not last.is_file():
        # Nothing to resume (crashed before the first checkpoint) or another run's leftovers.
        shutil.rmtree(run_dir, ignore_errors=True)
        state = {"name": spec.name, "fingerprint": spec.fingerprint(), "attempts": []}
    run_dir.mkdir(parents=True, exist_ok=True)
    # Written before the run starts: a comparison killed mid-run still resumes this run.
    _write_json(spec_path, state)
    return (last if last.is_file() and same else None), state


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class _Attempt:
    """A run started by :func:`run_plan` and its bookkeeping."""

    spec: RunSpec
    tag: str
    args: list[str]
    state: dict[str, Any]
    record: dict[str, Any]
    start: float
    launched: Launched | None = None

    def close(self, returncode: int | None) -> float:
        """Record this attempt's wall time and status in ``spec.json``; its wall seconds."""
        wall = time.perf_counter() - self.start
        self.record.update(wall_s=round(wall, 3), returncode=returncode)
        _write_json(self.launched.run_dir / "spec.json", self.state)
        return wall


def run_plan(plan: Sequence[RunSpec], out: Path, *, metric: str = "val/score",
             mode: str = "max", in_process: bool = False, jobs: int = 1,
             finish_by: float | None = None, history: Sequence[dict[str, Any]] = (),
             echo: Callable[[str], None] = print) -> Outcome:
    """Run every unfinished run of ``plan`` and collect its ``result.json``.

    Args:
        plan: The runs (see :func:`app.compare.plan.build_plan`).
        out: The comparison folder; runs go to ``out/runs/<name>/``.
        metric: Validation metric recorded as ``best`` / ``final``.
        mode: ``max`` or ``min``: which direction of ``metric`` is better.
        in_process: Run in this process instead of a subprocess (debugging and tests only:
            a crash ends the comparison and peak memory includes earlier runs).
        jobs: Runs at once (subprocesses only). Above 1 each gets ``cores / jobs`` torch
            threads and they share the machine, so their step times are not comparable with
            one-at-a-time runs (``result.json`` records ``concurrent_runs``).
        finish_by: Seconds since the epoch by which every run must have ended: a run is
            started only if the wall time expected of it
            (:func:`app.compare.deadline.expected_wall` over ``history``, the plan's finished
            runs and those of this call, this machine's first) fits; the others go to
            ``Outcome.deferred``. Without any finished run there is no estimate and the run
            starts.
        history: ``result.json`` contents of other finished runs (the selection runs, for
            the seeds' plan) that inform the expected wall times.
        echo: Where progress lines go.

    Raises:
        PlanMismatchError: Before anything runs, if a finished run has other settings.
        ValueError: ``jobs`` below 1, or above 1 with ``in_process``.
    """
    if jobs < 1 or (jobs > 1 and in_process):
        raise ValueError(f"jobs={jobs}: give 1 or more (1 with in_process)")
    runs = out.resolve() / "runs"  # absolute: the runs' own paths must not depend on cwd
    done = {spec.name: finished_result(spec, runs / spec.name) for spec in plan}
    past = [r.get("wall_s") or 0.0 for r in done.values() if r]
    todo = [spec.name for spec in plan if done[spec.name] is None]
    echo(f"comparison: {len(plan)} runs, {len(plan) - len(todo)} finished earlier, "
         f"{len(todo)} to run -> {out}" + (f", {jobs} at a time" if jobs > 1 else ""))
    threads = max(1, _cores() // jobs) if jobs > 1 else None
    outcome, durations = Outcome(), []
    host = machine_label({"machine": machine()}) if finish_by is not None else None
    width = len(str(len(plan)))
    queue: list[tuple[RunSpec, str]] = []
    for index, spec in enumerate(plan, 1):
        tag = f"[{index:>{width}}/{len(plan)}] {spec.name}"
        if done[spec.name] is not None:
            echo(f"{tag}: finished earlier, skipped")
        else:
            queue.append((spec, tag))
    running: list[_Attempt] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                spec, tag = queue.pop(0)
                late = _too_late(spec, finish_by, host,
                                 [*history, *(r for r in done.values() if r), *outcome.results])
                if late:
                    echo(f"{tag}: not started: {late}")
                    outcome.deferred.append((spec.name, f"not started: {late}"))
                    continue
                running.append(_start(spec, tag, runs / spec.name, in_process, threads, echo))
            if not running:  # every remaining run was deferred
                break
            ended = wait_any([a.launched for a in running])
            attempt = next(a for a in running if a.launched is ended)
            running.remove(attempt)
            wall = attempt.close(ended.code)
            outcome.executed.append(attempt.spec.name)
            durations.append(wall)
            status = _collect(attempt, wall, metric, mode, jobs, outcome)
            left = len(queue) + len(running)
            mean = sum(durations + past) / len(durations + past)
            eta = (f" | {left} left, ETA {_duration(left * mean / jobs)}" if left
                   else " | all done")
            echo(f"{attempt.tag}: {status}{eta}")
    except KeyboardInterrupt as stop:
        stop_all([a.launched for a in running], stop)
        for attempt in running:
            attempt.close(None)
        raise
    order = {spec.name: i for i, spec in enumerate(plan)}
    outcome.results = sorted([r for r in done.values() if r] + outcome.results,
                             key=lambda r: order[r["name"]])
    return outcome


def _too_late(spec: RunSpec, finish_by: float | None, host: str | None,
              known: list[dict[str, Any]]) -> str:
    """Why ``spec`` must not start before ``finish_by`` (empty: it may start)."""
    if finish_by is None:
        return ""
    wall = expected_wall(spec.method, spec.stage, known, host=host)
    left = finish_by - time.time()
    if wall is None or wall <= left:
        return ""
    return (f"expected to take {_duration(wall)}, {_duration(max(left, 0.0))} left before "
            "--finish-by; run the same command again to continue")


def _start(spec: RunSpec, tag: str, run_dir: Path, in_process: bool, threads: int | None,
           echo: Callable[[str], None]) -> _Attempt:
    resume, state = _prepare(spec, run_dir)
    args = run_args(spec, run_dir, resume)
    echo(f"{tag}: running" + (f" (resuming from {resume.name})" if resume else ""))
    record: dict[str, Any] = {"resumed_from": str(resume) if resume else None,
                              "threads": threads}
    state["attempts"].append(record)
    attempt = _Attempt(spec, tag, args, state, record, time.perf_counter())
    try:
        attempt.launched = (run_in_process(args, run_dir) if in_process
                            else start_subprocess(args, run_dir, threads))
    except KeyboardInterrupt:
        attempt.launched = Launched(run_dir, code=None)
        attempt.close(None)
        raise
    return attempt


def _collect(attempt: _Attempt, wall: float, metric: str, mode: str, jobs: int,
             outcome: Outcome) -> str:
    """Write an ended run's ``result.json`` (or record its failure); its progress status."""
    spec, run_dir, launched = attempt.spec, attempt.launched.run_dir, attempt.launched
    code, message = launched.code, launched.message()
    if code == 0 and not (run_dir / "timing.json").is_file():
        code, message = 1, "the run stopped without a result (interrupted?); rerun to resume it"
    if code == 0:
        try:
            collected = collect_run(run_dir, metric, mode)
        except Exception as err:  # unreadable events: report, keep the comparison going
            code, message = 1, f"collecting the results failed: {err!r}"
    if code != 0:
        outcome.failed.append((spec.name, message))
        return f"FAILED after {_duration(wall)}: {message}"
    attempts = attempt.state["attempts"]
    result = {"name": spec.name, "method": spec.method, "rank": spec.rank,
              "rank_label": spec.rank_label, "seed": spec.seed,
              "lr": spec.lr, "stage": spec.stage,
              "fingerprint": spec.fingerprint(),
              "command": shlex.join([sys.executable, "-m", "app", *attempt.args]),
              "wall_s": round(sum(a["wall_s"] for a in attempts), 3),
              "attempts": len(attempts), "concurrent_runs": jobs,
              # (the machine whose step times these are; only this process knows it)
              "machine": {k: v for k, v in machine().items() if k in ("cpu", "gpu", "torch")},
              **collected}
    _write_json(run_dir / "result.json", result)
    outcome.results.append(result)
    best = result["best"]
    return f"done in {_duration(wall)}, {metric} best " + (
        "n/a" if best is None else f"{best:.4f}")
