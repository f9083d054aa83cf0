"""``python -m app.compare --finish-by``: runs start only when expected to end in time, a
method's seeds wait for its whole learning-rate grid, and the same command continues."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare_selection import _base, _compare

from app.compare import runner
from app.compare.deadline import EXIT_DEADLINE, expected_wall, parse_finish_by

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 12, 5, 9, 0, 0).astimezone().timestamp()  # 09:00 local


@pytest.mark.parametrize("text, seconds", [
    ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400),
    ("09:30", 1800), ("08:59", 86340), ("2026-12-05T10:15", 4500),
])
def test_finish_by_forms(text: str, seconds: int) -> None:
    """Durations count from now; HH:MM is today, or tomorrow once passed; ISO is local."""
    assert parse_finish_by(text, now=NOW) - NOW == pytest.approx(seconds)


def test_finish_by_with_a_zone() -> None:
    utc = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc).timestamp()
    assert parse_finish_by("2026-12-05T13:00+00:00", now=utc) == utc + 3600


@pytest.mark.parametrize("text, why", [
    ("soon", "not a time"), ("0m", "the duration is zero"), ("24:00", "not a time of day"),
    ("2026-12-05T08:00", "that time has passed"), ("", "not a time"), ("90", "not a time"),
])
def test_bad_finish_by_names_option_value_and_forms(text: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_finish_by(text, now=NOW)
    message = str(err.value)
    assert message.startswith(f"--finish-by {text!r}: {why}") and "90m" in message
    assert "\n" not in message


def test_expected_wall_prefers_the_same_method_and_stage() -> None:
    history = [{"method": "lora", "stage": "select", "wall_s": 100.0},
               {"method": "lora", "stage": "select", "wall_s": 300.0},
               {"method": "lora", "stage": "select", "wall_s": 110.0},
               {"method": "dora", "stage": "select", "wall_s": 900.0},
               {"method": "dora", "stage": "final", "wall_s": 500.0},
               {"method": "full", "wall_s": 50.0}]  # (results from before stages: final)
    assert expected_wall("lora", "select", history) == 110.0  # median, not mean
    assert expected_wall("dora", "final", history) == 500.0
    assert expected_wall("stella", "select", history) == pytest.approx(205.0)  # stage's
    # the final stage's median (dora, full: 275) times lora's cost in selection (110 / 205)
    assert expected_wall("lora", "final", history) == pytest.approx(275.0 * 110.0 / 205.0)
    assert expected_wall("pissa", "other", history) == 205.0  # everything
    assert expected_wall("lora", "select", []) is None


def test_a_methods_first_run_of_a_stage_is_scaled_by_its_cost_in_the_other() -> None:
    """GaRare's selection runs took 1.3 times the selection median, so its first seed run is
    expected to take 1.3 times the seed median: the plain median let a 12-minute run start
    with 9 minutes left before a sitting's deadline."""
    history = [{"method": m, "stage": "select", "wall_s": w}
               for m, w in (("lora", 740.0), ("lora", 750.0), ("dora", 745.0),
                            ("garare", 960.0), ("garare", 980.0), ("full", 700.0))]
    history += [{"method": m, "stage": "final", "wall_s": w}
                for m, w in (("lora", 550.0), ("dora", 560.0), ("full", 540.0))]
    select_median = 747.5  # of the six selection runs
    assert expected_wall("garare", "final", history) == pytest.approx(550.0 * 970.0 / select_median)
    assert expected_wall("garare", "final", history) > 700.0
    assert expected_wall("stella", "final", history) == 550.0  # no runs anywhere: the median
    assert expected_wall("lora", "final", history) == 550.0  # its own runs of the stage
    # a stage with none of the method's runs in any other stage is not scaled
    only_final = [r for r in history if r["stage"] == "final"]
    assert expected_wall("garare", "final", only_final) == 550.0


def test_expected_wall_prefers_this_machines_runs() -> None:
    """A comparison resumed on a machine four times slower judges its runs by that machine's
    own finished runs, even another method's, before the fast machine's runs of the method;
    a machine without any runs yet falls back to every machine's."""
    fast, slow = {"cpu": "Intel Xeon"}, {"cpu": "AMD EPYC"}
    history = [{"method": "lora", "stage": "select", "wall_s": 560.0, "machine": fast},
               {"method": "lora", "stage": "select", "wall_s": 580.0, "machine": fast},
               {"method": "dora", "stage": "select", "wall_s": 2250.0, "machine": slow},
               {"method": "full", "stage": "select", "wall_s": 2600.0, "machine": slow},
               {"method": "lora", "stage": "final", "wall_s": 300.0, "machine": fast}]
    assert expected_wall("lora", "select", history) == 570.0  # without a host: every run's
    assert expected_wall("lora", "select", history, host="Intel Xeon") == 570.0
    assert expected_wall("lora", "select", history, host="AMD EPYC") == 2425.0  # stage's here
    assert expected_wall("full", "select", history, host="AMD EPYC") == 2600.0
    assert expected_wall("lora", "final", history, host="AMD EPYC") == 2425.0  # anything here
    assert expected_wall("lora", "final", history, host="Apple M2") == 300.0  # nothing here
    assert expected_wall("lora", "select", [{"method": "lora", "stage": "select",
                                            "wall_s": 60.0}], host="AMD EPYC") == 60.0


def test_deadline_script_helper_prints_one_absolute_time() -> None:
    """``python -m app.compare.deadline 2h`` (what bench/compare_glue.sh calls once, so every
    task's comparison gets the same deadline) prints an ISO time about 2 h ahead."""
    before = dt.datetime.now().astimezone()
    out = subprocess.run([sys.executable, "-m", "app.compare.deadline", "2h"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    ahead = dt.datetime.fromisoformat(out) - before
    assert dt.timedelta(hours=2) - dt.timedelta(seconds=2) < ahead < dt.timedelta(hours=2,
                                                                                 seconds=30)
    assert parse_finish_by(out) == pytest.approx(dt.datetime.fromisoformat(out).timestamp())
    bad = subprocess.run([sys.executable, "-m", "app.compare.deadline", "later"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --finish-by 'later'")
    assert "Traceback" not in bad.stderr


def test_runs_expected_to_end_late_are_left_for_the_next_call(
        tmp_path: Path, tiny_ckpt, glue_dir: Path, monkeypatch) -> None:
    """Every run after the first is expected to take 10 min (the estimate is forced; its
    rule is tested above) and 5 min are left: the first selection run runs, the second is
    not started, the seed does not run at a rate chosen from half the grid, the report says
    so and the exit status is 75. The same command without the deadline then runs exactly
    the two runs left."""
    hosts: list[str | None] = []

    def forced(method: str, stage: str, known: list, host: str | None = None) -> float | None:
        hosts.append(host)
        return 600.0 if known else None

    monkeypatch.setattr(runner, "expected_wall", forced)
    base = _base(tmp_path, tiny_ckpt("bert"), glue_dir)
    out = tmp_path / "out"
    args = ["--base", str(base), "--methods", "lora", "--seeds", "0", "--ranks", "2",
            "--lrs", "1e-5", "3e-2", "--select-holdout", "0.25", "--no-plots",
            "--out", str(out), "--warmup-steps", "1"]
    code, printed = _compare(*args, "--finish-by", "5m")
    assert code == EXIT_DEADLINE, printed[-3000:]
    assert hosts and set(hosts) == {runner.machine_label({"machine": runner.machine()})}
    sel = out / "selection" / "runs"
    assert (sel / "lora-r2-lr1e-05-s0" / "result.json").is_file()
    assert not (sel / "lora-r2-lr0.03-s0").exists()  # never started, nothing written
    assert not (out / "runs" / "lora-r2-s0").exists()
    assert "lora-r2-lr0.03-s0: not started: expected to take 10 min 00 s" in printed
    assert "--finish-by 5m: 2 run(s) not started" in printed
    summary = (out / "summary.md").read_text()
    assert "`selection/lora-r2-lr0.03-s0`: not started" in summary
    assert "`lora-r2-s0`: not started: its learning-rate selection is not finished" in summary
    payload = json.loads((out / "results.json").read_text())
    assert payload["runs"] == []
    assert {f["name"] for f in payload["failed"]} == {"selection/lora-r2-lr0.03-s0", "lora-r2-s0"}

    monkeypatch.undo()
    code, printed = _compare(*args)
    assert code == 0, printed[-3000:]
    assert printed.count(": running") == 2 and "lr1e-05-s0: finished earlier" in printed
    assert (out / "runs" / "lora-r2-s0" / "result.json").is_file()
