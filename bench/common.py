"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
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
