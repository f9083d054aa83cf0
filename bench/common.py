"""Helpers shared by the benchmark scripts: machine description, result files, and running a
child process that a SIGTERM of the script reaches too."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, thread count, torch version and GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line() -> str:
    """The exact command that produced a result."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(stem: Path, payload: dict[str, Any], markdown: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (with command, machine and date) atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command_line(), "machine": machine(),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               **payload}
    header = (f"Command: `{payload['command']}`  \nMachine: {payload['machine']}  \n"
              f"Date: {payload['date']}\n\n")
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", header + markdown)):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, stem.with_suffix(suffix))


def most_common_share(values: list) -> float:
    """Share of ``values`` equal to their most common value (1.0: all the same)."""
    return max(values.count(v) for v in set(values)) / len(values)


def paired_change(run: dict, base: dict, tasks: Sequence[str]) -> tuple[float, float]:
    """Change of the task-averaged accuracy of ``run`` over ``base`` on the same questions,
    and its 95% half-width (normal approximation of the paired per-question differences, each
    task weighted ``1 / len(tasks)`` as in the average). Both hold ``"questions"`` (per task,
    the question indices) and ``"correct"`` (per task, one 0/1 character per question)."""
    mean, var = 0.0, 0.0
    for t in tasks:
        if run["questions"][t] != base["questions"][t]:
            raise SystemExit(f"{t}: the runs scored different questions; delete and rerun")
        d = [int(a) - int(b) for a, b in zip(run["correct"][t], base["correct"][t])]
        m = sum(d) / len(d)
        mean += m / len(tasks)
        var += statistics.variance(d) / len(d) / len(tasks) ** 2 if len(d) > 1 else 0.0
    return mean, 1.96 * var ** 0.5


@contextmanager
def sigterm_passed_to(proc: subprocess.Popen) -> Iterator[list[bool]]:
    """While inside, a SIGTERM of this process is sent on to ``proc`` (which stops as it would
    on its own SIGTERM: the runs write a resumable ``last.ckpt``); yields a one-item list that
    turns ``[True]`` when one arrived."""
    got = [False]

    def forward(signum: int, frame: Any) -> None:
        got[0] = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_child(cmd: Sequence[str], *, check: bool = False, capture_output: bool = False,
        text: bool | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` for the benchmark scripts' children, except that a SIGTERM of
    the script (``kill PID``, ``timeout``) reaches the child too, is waited for, and then
    stops the script with status 143 (a killed script would leave its child running and
    writing results nobody collects); after a Ctrl-C, which reaches both, the script waits for
    the child and stops with 130 (a second Ctrl-C kills the child)."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    ctrl_c = False
    with subprocess.Popen(list(cmd), text=text, **kwargs) as proc, \
            sigterm_passed_to(proc) as got:
        while True:
            try:
                out, err = proc.communicate()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the child too: wait for it to stop
                if ctrl_c:  # the second one: do not wait
                    proc.kill()
                    raise
                ctrl_c = True
    if got[0] or ctrl_c:
        raise SystemExit(128 + int(signal.SIGTERM if got[0] else signal.SIGINT))
    done = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
