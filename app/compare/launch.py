"""Starting, waiting for and stopping the comparison's runs (``python -m app fit`` processes).

A run is a :class:`Launched`: a subprocess writing ``run.log`` in its folder, or (tests and
debugging) a call of :func:`app.cli.main` in this process, finished when it returns. Several
subprocesses may run at once (:func:`wait_any` returns the first to end).

Stopping: Ctrl-C reaches the comparison and its runs alike (one process group); SIGTERM may
reach the comparison alone (``kill PID``, ``timeout``, a scheduler signalling the main
process), so :func:`terminate_on_sigterm` turns it into :class:`Terminated` and
:func:`stop_all` passes it on. Every run then stops at the end of its batch with a resumable
``last.ckpt`` and the comparison waits for all of them, so no run outlives the comparison; a
second Ctrl-C (or a run still going after the grace period) kills them, a second SIGTERM
does not (a process-group signal that a script also forwards arrives twice).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Launched", "Terminated", "run_in_process", "start_subprocess", "stop_all",
           "terminate_on_sigterm", "wait_any"]

GRACE_S = 120  # seconds interrupted runs get to stop cleanly
_POLL_S = 0.2


class Terminated(KeyboardInterrupt):
    """The comparison got SIGTERM (a :class:`KeyboardInterrupt`, so every ``except
    KeyboardInterrupt`` that records an interrupted attempt records this one too)."""


def terminate_on_sigterm() -> None:
    """Raise :class:`Terminated` in the main thread when SIGTERM arrives."""

    def handler(signum: int, frame: Any) -> None:
        # once is enough: a second SIGTERM must not interrupt the stopping (see stop_all)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


class Launched:
    """One started run: a subprocess (``proc``) or an in-process call that has returned
    (``code`` set)."""

    def __init__(self, run_dir: Path, proc: subprocess.Popen | None = None,
                 code: int | None = None, message: str = "") -> None:
        self.run_dir = run_dir
        self.proc = proc
        self.code = code
        self._message = message

    def poll(self) -> int | None:
        """The exit status once the run has ended, else ``None``."""
        if self.code is None and self.proc is not None:
            self.code = self.proc.poll()
        return self.code

    def message(self) -> str:
        """Why the run failed (empty when it succeeded): its status and last log line."""
        if not self.code or self.proc is None:
            return self._message
        log = self.run_dir / "run.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return f"exit status {self.code}: {lines[-1] if lines else ''} (log: {log})"


def start_subprocess(args: Sequence[str], run_dir: Path, threads: int | None = None
                     ) -> Launched:
    """Start ``python -m app ARGS``, its output appended to ``run_dir/run.log``; with
    ``threads``, its torch / OpenMP threads (unless ``OMP_NUM_THREADS`` is set already)."""
    cmd = [sys.executable, "-m", "app", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with (run_dir / "run.log").open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Launched(run_dir, proc=proc)


def run_in_process(args: Sequence[str], run_dir: Path) -> Launched:
    """Run ``app.cli.main(ARGS)`` here; returns once it has ended."""
    from app.cli import main

    try:
        main(list(args))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
        return Launched(run_dir, code=code, message=f"exit status {code}" if code else "")
    except Exception as err:  # one failing run must not stop the comparison
        return Launched(run_dir, code=1, message=f"{type(err).__name__}: {err}")
    return Launched(run_dir, code=0)


def wait_any(running: Sequence[Launched]) -> Launched:
    """Block until one of ``running`` has ended; return it."""
    while True:
        for run in running:
            if run.poll() is not None:
                return run
        time.sleep(_POLL_S)


def stop_all(running: Sequence[Launched], stop: KeyboardInterrupt) -> None:
    """Stop every run still going after ``stop`` reached the comparison, and wait for them.

    A Ctrl-C reached the runs too (same process group); a SIGTERM may not have, so it is
    passed on (a second one is harmless). Then each run gets :data:`GRACE_S` seconds to stop
    at a batch boundary and write its ``last.ckpt``; a second Ctrl-C, or a run still going
    after that, is killed."""
    procs = [r.proc for r in running if r.proc is not None and r.poll() is None]
    if isinstance(stop, Terminated):
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
    # Further SIGTERMs while the runs stop change nothing: a signal to the whole process group
    # reaches the comparison twice when a script also forwards it (bench/compare_glue.sh),
    # and taking the second one for "abort" killed the runs before their last.ckpt.
    previous = _ignore_sigterm()
    deadline = time.monotonic() + GRACE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or too slow
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ignore_sigterm() -> Any:
    """Ignore SIGTERM in this process (main thread only); the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.SIG_IGN)
