"""Record PACS leave-one-domain-out results with a small randomly initialised ViT on CPU.

For each method fragment: ``lightning-cli fit`` on three PACS domains (model selection on the
20% hold-out of each, ``val/score``), then ``lightning-cli test`` of the best checkpoint on the
held-out domain. Writes ``bench/results/<name>.md`` / ``.json`` with per-domain accuracies and
wall times. No pretrained ViT exists offline, so the backbone is random (see
``bench/make_tiny_vit.py``): methods that freeze it (LoRA, StelLA, Manifold-LoRA) only adapt
a random feature extractor, and full fine-tuning is the reference.

    python bench/record_pacs.py --methods full lora stella manifold_stiefel
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, write_results  # noqa: E402
from fragments import all_fragments, describe  # noqa: E402
from make_tiny_vit import make_vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "runs" / "vit-tiny-random"
SIZES = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
DOMAINS = tuple(SIZES)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def run(cmd: list[str], log: Path, threads: int) -> tuple[float, str]:
    """Run ``cmd`` in the project root with ``threads`` torch threads; return (wall s, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = run_child(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n"
                           + proc.stderr[-2000:])
    return wall, proc.stdout + proc.stderr


def record(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fit and test one method; return its row."""
    root = ROOT / "runs" / args.name / method
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    fit_args = [
        "--config", "configs/data/pacs.yaml",
        "--config", "configs/model/vit_tiny_random.yaml",
        "--config", f"configs/methods/{method}.yaml",
        "--model.init_args.checkpoint", str(VIT.relative_to(ROOT)),
        "--model.init_args.optimizer.init_args.lr", str(args.lr),
        "--data.init_args.test_domains", f"[{args.test_domain}]",
        "--data.init_args.batch_size", str(args.batch_size),
        "--trainer.max_steps", str(args.max_steps),
        "--trainer.val_check_interval", str(args.val_every),
        "--trainer.default_root_dir", str(root.relative_to(ROOT)),
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "10",
        "--seed_everything", str(args.seed),
    ]
    fit_cmd = [sys.executable, "-m", "app", "fit", *fit_args]
    fit_wall, out = run(fit_cmd, root / "fit.log", args.threads)
    params = re.search(r"parameters: trainable ([\d,]+) of ([\d,]+)", out)
    fit_dir = root / "lightning_logs" / "version_0"
    best = next(p for p in (fit_dir / "checkpoints").glob("step*.ckpt"))
    best_step = int(re.match(r"step(\d+)-", best.name).group(1))
    test_cmd = [sys.executable, "-m", "app", "test", "--config", str(fit_dir / "config.yaml"),
                "--ckpt_path", str(best)]
    test_wall, _ = run(test_cmd, root / "test.log", args.threads)
    fit_tags = scalars(fit_dir)
    test_tags = scalars(root / "lightning_logs" / "version_1")
    losses = fit_tags.get("train/loss", {})
    row: dict[str, Any] = {
        "method": method, "note": describe(method),
        "trainable_params": params.group(1) if params else "", "total_params":
        params.group(2) if params else "", "best_step": best_step,
        "fit_wall_s": round(fit_wall, 1), "test_wall_s": round(test_wall, 1),
        "final_train_loss": round(losses[max(losses)], 4) if losses else None,
        "run_dir": str(fit_dir.relative_to(ROOT)), "fit_cli": " ".join(["lightning-cli", "fit",
                                                                         *fit_args]),
    }
    # Lightning logs a validation at step k as event step k - 1: take the last one <= k.
    val_step = max(s for s in fit_tags["val/score"] if s <= best_step)
    for tag, values in fit_tags.items():
        if tag.startswith("val/acc"):
            row[tag] = round(values[val_step], 4)
    for tag, values in test_tags.items():
        if tag.startswith("test/acc"):
            row[tag] = round(next(iter(values.values())), 4)
    print(row, flush=True)
    return row


def majority_baselines(args: argparse.Namespace) -> dict[str, float]:
    """Accuracy of always predicting the most frequent class, per split (the floor to beat)."""
    from collections import Counter

    from app.data.images import DomainImageDataModule

    dm = DomainImageDataModule("pacs", [args.test_domain], str(VIT),
                               data_dir="../shared/data/pacs")
    dm.setup()
    out = {}
    for name, samples in [("val/acc", dm.val_set.samples),
                          (f"test/acc/{args.test_domain}", dm.test_sets[0].samples)]:
        counts = Counter(s.label for s in samples)
        out[name] = round(max(counts.values()) / len(samples), 4)
    for domain in DOMAINS:
        if domain != args.test_domain:
            index = dm.domain_names.index(domain)
            counts = Counter(s.label for s in dm.val_set.samples if s.domain == index)
            out[f"val/acc/{domain}"] = round(max(counts.values()) / sum(counts.values()), 4)
    return out


def markdown(rows: list[dict[str, Any]], baseline: dict[str, float],
             args: argparse.Namespace) -> str:
    train = [d for d in DOMAINS if d != args.test_domain]
    head = (f"| method | test: {args.test_domain} | val (pooled) | "
            + " | ".join(f"val: {d}" for d in train)
            + " | trainable / total params | best step | fit wall (s) | test wall (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['note']} | failed: {r['error']} |")
            continue
        vals = [r.get(f"test/acc/{args.test_domain}"), r.get("val/acc")]
        vals += [r.get(f"val/acc/{d}") for d in train]
        cells = " | ".join(f"{v:.4f}" if v is not None else "" for v in vals)
        lines.append(f"| {r['note']} | {cells} | {r['trainable_params']} / "
                     f"{r['total_params']} | {r['best_step']} | {r['fit_wall_s']} | "
                     f"{r['test_wall_s']} |")
    vals = [baseline[f"test/acc/{args.test_domain}"], baseline["val/acc"]]
    vals += [baseline[f"val/acc/{d}"] for d in train]
    lines.append("| majority class (always the most frequent class of the split) | "
                 + " | ".join(f"{v:.4f}" for v in vals) + " | | | | |")
    n_train = sum(n - int(n * 0.2) for d, n in SIZES.items() if d != args.test_domain)
    return (
        f"PACS, leave-one-domain-out: train on {', '.join(train)} (80%), select the checkpoint "
        f"by accuracy on the 20% hold-out of each training domain (DomainBed's "
        f"training-domain validation), test on all {args.test_domain} images. Data: "
        "../shared/data/pacs (real PACS images, resized to 112 x 112). Model: a randomly "
        "initialised ViT (image 112, patch 16, hidden 192, 6 layers, 3 heads; "
        "bench/make_tiny_vit.py, seed 0); there is no pretrained ViT offline. "
        f"{args.max_steps} steps of batch {args.batch_size} (about "
        f"{args.max_steps * args.batch_size / n_train:.1f} epochs of {n_train} images), "
        f"AdamW lr {args.lr} for every method (linear warm-up 6% then decay), DomainBed "
        f"augmentation, seed {args.seed}, "
        f"validation every {args.val_every} steps, {args.threads} torch thread(s) per run on "
        "a 2-core machine shared with other work (wall times are indicative).\n\n"
        + "\n".join(lines) + "\n\n"
        "The backbone is random (no pretrained ViT can be had offline). Full fine-tuning "
        "trains all weights from scratch; LoRA, StelLA and Manifold-LoRA train only the rank-8 "
        "updates of q_proj / v_proj and the head on top of frozen random features. At this "
        "budget none of them is near convergence: read the accuracies against the "
        "majority-class row. The run shows every method running end to end on ViT with "
        "per-domain metrics; it says nothing about the methods' relative merit with a "
        "pretrained ViT-B/16 (configs/model/vit_base.yaml), which needs the hub.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="fragments of configs/methods (default: all of them)")
    parser.add_argument("--test-domain", default="art_painting", choices=DOMAINS)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="pacs_vit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # what machine() reports
    if not (VIT / "config.json").is_file():
        make_vit(VIT)
    rows = []
    for method in args.methods or all_fragments():
        if not (ROOT / "configs" / "methods" / f"{method}.yaml").is_file():
            print(f"skipping {method}: configs/methods/{method}.yaml does not exist", flush=True)
            continue
        try:
            rows.append(record(method, args))
        except (RuntimeError, StopIteration, KeyError) as err:  # keep the other methods
            print(f"{method} failed: {err}", flush=True)
            rows.append({"method": method, "note": describe(method),
                         "error": str(err).splitlines()[0][:300]})
    baseline = majority_baselines(args)
    write_results(ROOT / "bench" / "results" / args.name, {
        "settings": vars(args), "majority_class": baseline, "rows": rows},
        markdown(rows, baseline, args))


if __name__ == "__main__":
    main()
