"""A finished run is recognised by what its configs say, not by their bytes: a comment added
to a fragment (where the house style writes each choice's reason) keeps every finished and
half-finished run, a changed value does not, and runs recorded when fingerprints hashed the
bytes are taken over and re-recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.compare.plan import build_plan
from app.compare.runner import PlanMismatchError, _prepare, finished_result

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spec_and_files(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 3\n")
    method = tmp_path / "lora.yaml"
    shutil.copy(ROOT / "configs" / "methods" / "lora.yaml", method)
    (spec,) = build_plan([base], [method], [0], [8])
    return spec, base, method


def _finish(run_dir: Path, fingerprint: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "result.json"
    path.write_text(json.dumps({"name": "lora-r8-s0", "final": 0.75,
                                "fingerprint": fingerprint}))
    return path


def test_comments_and_layout_keep_a_finished_run_values_do_not(spec_and_files,
                                                               tmp_path: Path) -> None:
    spec, base, method = spec_and_files
    run_dir = tmp_path / "runs" / spec.name
    _finish(run_dir, spec.fingerprint())
    # A comment, another key order and other spacing say the same thing: still this run.
    base.write_text("# the budget of the smoke protocol\ntrainer: {max_steps: 3}\n")
    method.write_text("# why this rank: the papers' GLUE setting\n" + method.read_text())
    assert spec.recorded_as(spec.fingerprint()) == "current"
    assert finished_result(spec, run_dir)["final"] == 0.75
    # A changed value is another run: one line that says what to do.
    base.write_text("trainer:\n  max_steps: 4\n")
    with pytest.raises(PlanMismatchError, match="finished with other settings .* delete that"):
        finished_result(spec, run_dir)


def test_a_run_recorded_byte_for_byte_is_taken_over_and_re_recorded(spec_and_files,
                                                                    tmp_path: Path) -> None:
    spec, base, method = spec_and_files
    legacy = spec.fingerprint(legacy=True)
    assert legacy["configs"] != spec.fingerprint()["configs"]  # the two hashes differ
    run_dir = tmp_path / "runs" / spec.name
    path = _finish(run_dir, legacy)
    assert finished_result(spec, run_dir)["final"] == 0.75
    assert json.loads(path.read_text())["fingerprint"] == spec.fingerprint()
    # From now on a comment edit keeps it, as for runs recorded with the parsed hash.
    method.write_text(method.read_text() + "# a note added later\n")
    assert finished_result(spec, run_dir)["final"] == 0.75
    # A legacy record whose files changed before it was taken over cannot be told from
    # another run's: it stops the comparison rather than being reported as this one.
    other = tmp_path / "runs" / "other"
    _finish(other, spec.fingerprint(legacy=True))
    method.write_text(method.read_text() + "# and another\n")
    with pytest.raises(PlanMismatchError):
        finished_result(spec, other)


def test_a_half_finished_run_resumes_across_a_comment_edit(spec_and_files,
                                                           tmp_path: Path) -> None:
    spec, _, method = spec_and_files
    run_dir = tmp_path / "runs" / spec.name
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"checkpoint")
    attempts = [{"wall_s": 12.0, "status": "interrupted"}]
    (run_dir / "spec.json").write_text(json.dumps(
        {"name": spec.name, "fingerprint": spec.fingerprint(legacy=True), "attempts": attempts}))
    resume, state = _prepare(spec, run_dir)  # recorded byte for byte: resumed, re-recorded
    assert resume == last and state["attempts"] == attempts
    assert json.loads((run_dir / "spec.json").read_text())["fingerprint"] == spec.fingerprint()
    method.write_text("# reason for a choice\n" + method.read_text())
    resume, state = _prepare(spec, run_dir)
    assert resume == last and state["attempts"] == attempts
    # Another rank is another run: its leftovers are cleared, nothing is resumed from them.
    (other,) = build_plan([spec.configs[0]], [method], [0], [4])
    other_dir = tmp_path / "runs" / other.name
    shutil.copytree(run_dir, other_dir)
    resume, state = _prepare(other, other_dir)
    assert resume is None and state["attempts"] == [] and not (other_dir / "checkpoints").exists()
