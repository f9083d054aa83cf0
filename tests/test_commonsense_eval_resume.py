"""``bench/commonsense_eval.py`` resumes a task inside it: an interrupted full-test-set run
continues after the questions already written and ends with the same predictions (and a
wall time summed over the sittings) as an uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_causal import write_commonsense

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import commonsense_eval  # noqa: E402

from app.data.commonsense import task_file  # noqa: E402
from app.data.instruction_formats import read_records  # noqa: E402


def test_a_resumed_task_gives_the_uninterrupted_predictions(tiny_causal, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_causal("llama")
    data = write_commonsense(tmp_path / "cs", {"ARC-Easy": (0, 7)})
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    records = commonsense_eval.subsample(
        read_records(task_file(str(data), "ARC-Easy", "test"), "--data-dir"), None)

    def run(partial: Path | None):
        with torch.no_grad():
            return commonsense_eval.run_task(model, tokenizer, "ARC-Easy", records, "choice",
                                             4, 8, "llm_adapters", partial, chunk=3)

    acc, whole = run(None)
    partial = tmp_path / "ARC-Easy.partial.jsonl"
    run(partial)
    lines = partial.read_text().splitlines()
    assert len(lines) == 7  # every chunk appended as it finished
    partial.write_text("\n".join(lines[:3]) + "\n")  # interrupted after the first chunk
    acc2, resumed = run(partial)
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in resumed]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in whole]
    assert acc2 == acc and len(partial.read_text().splitlines()) == 7
    # a partial file from another subsample is not trusted: the task starts over
    partial.write_text(lines[1] + "\n")
    _, again = run(partial)
    assert [p["index"] for p in again] == list(range(7))


def _write_eval(folder: Path, task: str, correct: list[int]) -> None:
    """A finished evaluation of ``task`` as commonsense_eval.py leaves it (marks only)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.json").write_text(json.dumps({"accuracy": sum(correct) / len(correct)}))
    # written out of order: the pairing goes by question index
    lines = [json.dumps({"task": task, "index": i, "correct": bool(c)})
             for i, c in reversed(list(enumerate(correct)))]
    (folder / f"{task}.predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_paired_change_over_another_evaluation_matches_a_hand_computation(tmp_path) -> None:
    """``--paired-with``: per task and on average, the change on the same questions and its
    95% normal-approximation half-width, checked by hand; a baseline that has not scored
    every task yet gives no pairing (the table says to rerun) instead of a wrong one."""
    import math

    base, run = tmp_path / "zero-choice", tmp_path / "lora-choice"
    _write_eval(base, "boolq", [1, 0, 0, 1])
    _write_eval(run, "boolq", [1, 1, 0, 0])       # d = 0, +1, 0, -1
    _write_eval(base, "piqa", [0, 0, 0, 1, 1, 0])
    _write_eval(run, "piqa", [1, 1, 0, 1, 1, 0])  # d = 1, 1, 0, 0, 0, 0
    tasks = ["boolq", "piqa"]
    out = commonsense_eval.paired_rows(base, run, tasks)
    # boolq: mean 0, sample variance (1 + 1) / 3; piqa: mean 1/3, variance (2 (2/3)^2 +
    # 4 (1/3)^2) / 5 = 4/15
    var_b, var_p = (2 / 3) / 4, (4 / 15) / 6  # variance of each task's mean difference
    assert out["boolq"] == (0.0, 1.96 * math.sqrt(var_b))
    assert out["piqa"][0] == 1 / 3
    assert math.isclose(out["piqa"][1], 1.96 * math.sqrt(var_p))
    mean, half = out["average"]
    assert math.isclose(mean, (0 + 1 / 3) / 2)
    assert math.isclose(half, 1.96 * math.sqrt((var_b + var_p) / 4))
    (base / "piqa.json").unlink()  # the baseline is still scoring piqa
    assert commonsense_eval.paired_rows(base, run, tasks) is None


def test_paired_with_adds_the_change_column(tiny_causal, tmp_path: Path, monkeypatch) -> None:
    """The command as a user runs it: a zero-shot evaluation, then a second one of the same
    model named differently with ``--paired-with`` the first: every change is exactly zero;
    before the first exists the table says to rerun instead of pairing."""
    import json

    data = write_commonsense(tmp_path / "cs", {"ARC-Easy": (0, 5), "boolq": (0, 4)})
    monkeypatch.setattr(commonsense_eval, "ROOT", tmp_path)  # runs/ and bench/results/ there

    def evaluate(name: str, *more: str) -> str:
        monkeypatch.setattr(sys, "argv", [
            "commonsense_eval.py", "--checkpoint", str(tiny_causal("llama")), "--data-dir",
            str(data), "--tasks", "ARC-Easy", "boolq", "--threads", "1", "--name", name,
            *more])
        commonsense_eval.main()
        return (tmp_path / "bench" / "results" / f"commonsense_{name}_choice.md").read_text()

    early = evaluate("second", "--paired-with", "first")
    assert "No paired change: `first` has not scored every task here yet" in early
    evaluate("first")
    text = evaluate("second", "--paired-with", "first")  # every task done before: no scoring
    assert "| questions | wall (s) | change vs first (95% CI) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 and all(r.endswith("| +0.00 (+0.00, +0.00) |") for r in rows)
    payload = json.loads((tmp_path / "bench/results/commonsense_second_choice.json").read_text())
    assert payload["paired_with"] == "first"
    assert payload["paired_change"]["average"] == {"mean": 0.0, "half_width_95": 0.0}
