"""``bench/common.run_child``: the benchmark scripts' children hear of a SIGTERM sent to the
script alone (``kill PID``, ``timeout``), the script waits for them and stops with 143, and
what they printed is still captured when nobody signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare_signals import processes_mentioning

ROOT = Path(__file__).resolve().parents[1]

# The script under test: runs a child that writes `started`, then, on SIGTERM, writes
# `stopped` (what a run's checkpoint-on-SIGTERM stands for) and exits 143.
SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
from common import run_child
child = '''
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (folder / "stopped").write_text("yes")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(folder / "started").write_text("yes")
time.sleep(60)
'''
done = run_child([sys.executable, "-c", child, sys.argv[1]], capture_output=True, text=True)
print("child finished", done.returncode)
"""


def test_sigterm_to_the_script_reaches_its_child_and_stops_the_script(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(bench=str(ROOT / "bench")))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():  # the child is up and has its handler
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the script alone, not its child
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + int(signal.SIGTERM), (out, err)
    assert (tmp_path / "stopped").read_text() == "yes"  # the child heard of it
    assert "child finished" not in out  # the script did not go on as if nothing happened
    assert not processes_mentioning(str(tmp_path))


def test_run_child_captures_output_and_checks_the_status(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from common import run_child
    finally:
        sys.path.remove(str(ROOT / "bench"))
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    done = run_child([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    failed = run_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.returncode == 3
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_child([sys.executable, "-c", "raise SystemExit(3)"], check=True)
    assert err.value.returncode == 3
