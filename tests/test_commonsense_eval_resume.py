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
