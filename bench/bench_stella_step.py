"""StelLA's post-step (tangent projection + retraction) on the LLaMA-3-8B adapter shapes.

r on all seven projections (q, k, v, o, gate, up, down) of every layer: per projection
``U`` is stored tall (``out x r``) and ``V^T`` wide (``r x in``), as
:class:`app.adapters.stella.StellaLinear` stores them; 32 layers give 448 factors
(hidden 4096, intermediate 14336, 8 KV heads of 128 -> k / v out 1024). Each factor starts on
the manifold (``X``, the snapshot) and the optimizer's proposal is ``N = X + step * noise``;
gradient scaling ``1 / sqrt(n / 4096)`` as in the callback. Three implementations of
``X <- R_X(P_X(s (N - X)))`` written back into the parameters, side by side in one process:

- ``official``: the public StelLA code's structure: the tangent projection per factor,
  then the polar factor of ``X + xi`` by a batched thin SVD per shape group (stacked), copied
  back into each parameter;
- ``grouped``: this project's path before the Gram form: per shape group, stack snapshots and
  proposals, project, polar factor from an ``r x r`` eigendecomposition, copy back
  (:func:`app.manifolds.batching.apply_grouped`);
- ``fused``: :func:`app.manifolds.fused.retract_fused` (what :class:`StellaCallback` runs):
  ``r x r`` Gram products per factor, one batched ``r x r`` computation, results written
  straight into the parameters.

Timing: ``--reps`` rounds, the method order rotating from round to round (interleaved); each
timed call is preceded by an untimed reset of that method's parameters to the proposal.
Reported: median and minimum seconds per post-step, the ratios to ``fused`` (of the minima:
noise from other processes only adds time; and the median of per-round ratios), the largest
orthonormality error ``||X^T X - I||_F`` over the factors, and the largest difference to the
``official`` result.

    python bench/bench_stella_step.py --threads 1          # CPU, a few minutes
    python bench/bench_stella_step.py --device cuda

Writes ``bench/results/stella_post_step.md`` and ``.json`` (command, machine, date).
Target: official / fused >= 4 on the minima, orthonormality <= 1e-5.
"""

from __future__ import annotations

import argparse
import math
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

TARGET_SPEEDUP = 4.0
TARGET_ORTHO = 1e-5


def llama3_8b_shapes(layers: int, rank: int) -> list[tuple[int, int]]:
    """Stored shapes of every StelLA factor: ``U`` (out, r) then ``V^T`` (r, in) per proj."""
    hidden, inter, kv = 4096, 14336, 1024
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                   (hidden, inter), (hidden, inter), (inter, hidden)]  # (in, out)
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in projections:
            shapes += [(fan_out, rank), (rank, fan_in)]
    return shapes


def tall(t):
    return t if t.shape[0] >= t.shape[1] else t.transpose(0, 1)


def official(snaps, params, scales) -> None:
    """Per-factor tangent projection, then a batched SVD polar factor per shape group."""
    import torch

    from app.manifolds import stiefel

    ys = []
    for snap, param, s in zip(snaps, params, scales):
        x, n = tall(snap), tall(param)
        d = s * (n - x)
        ys.append(x + (d - x @ stiefel.sym(x.transpose(0, 1) @ d)))
    groups: dict[tuple, list[int]] = {}
    for i, y in enumerate(ys):
        groups.setdefault(tuple(y.shape), []).append(i)
    for idx in groups.values():
        u, _, vh = torch.linalg.svd(torch.stack([ys[i] for i in idx]), full_matrices=False)
        for i, out in zip(idx, (u @ vh).unbind(0)):
            tall(params[i]).copy_(out)


def grouped(snaps, params, scales) -> None:
    """The pre-Gram-form callback: stacked project + eigh polar per shape group."""
    from app.manifolds import stiefel
    from app.manifolds.batching import apply_grouped

    def retract(x, n, s):
        xi = stiefel.project_tangent(x, s[:, None, None] * (n - x))
        return stiefel.retract_polar(x, xi)

    import torch

    s = [torch.tensor(v) for v in scales]
    outs = apply_grouped(retract, [tall(t) for t in snaps], [tall(t) for t in params], s)
    for param, out in zip(params, outs):
        tall(param).copy_(out)


def fused_step(snaps, params, scales) -> None:
    from app.manifolds import fused

    news = [tall(t) for t in params]
    fused.retract_fused([tall(t) for t in snaps], news, scales, outs=news)


METHODS = {"official": official, "grouped": grouped, "fused": fused_step}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--step", type=float, default=1e-3, help="size of N - X per entry")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench/results/stella_post_step"))
    args = parser.parse_args(argv)

    import torch

    from app.manifolds import stiefel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    shapes = llama3_8b_shapes(args.layers, args.rank)
    gen = torch.Generator().manual_seed(0)
    snaps, proposals = [], []
    for shape in shapes:
        n = max(shape)
        x = stiefel.random_orthonormal(n, args.rank, gen)
        noise = args.step * torch.randn(n, args.rank, generator=gen)
        stored = (lambda t: t) if shape[0] >= shape[1] else (lambda t: t.transpose(0, 1))
        snaps.append(stored(x).contiguous().to(device))
        proposals.append(stored(x + noise).contiguous().to(device))
    scales = [1.0 if max(s) == 4096 else 1.0 / math.sqrt(max(s) / 4096) for s in shapes]
    params = {name: [p.clone() for p in proposals] for name in METHODS}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(name: str) -> float:
        with torch.no_grad():
            for p, q in zip(params[name], proposals):
                p.copy_(q)
            sync()
            start = time.perf_counter()
            METHODS[name](snaps, params[name], scales)
            sync()
            return time.perf_counter() - start

    names = list(METHODS)
    for name in names:  # warm-up, untimed
        run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(run(name))
    load = {"before": load_before, "after": os.getloadavg()[0]}

    with torch.no_grad():
        ortho = {n: max(float(stiefel.drift(tall(p))) for p in params[n]) for n in names}
        diff = {n: max(float((a - b).abs().max()) for a, b in zip(params[n], params["official"]))
                for n in names}
    base_min = min(times["fused"])
    results, rows = {}, []
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        paired = statistics.median(t / f for t, f in zip(times[name], times["fused"]))
        results[name] = {"median_s": med, "min_s": low, "speedup_of_fused_min": low / base_min,
                         "speedup_of_fused_paired": paired, "max_orthonormality": ortho[name],
                         "max_abs_diff_to_official": diff[name], "times_s": times[name]}
        rows.append(f"| {name} | {med:.3f} | {low:.3f} | {low / base_min:.2f}x | "
                    f"{paired:.2f}x | {ortho[name]:.1e} | {diff[name]:.1e} |")
    speedup = results["official"]["speedup_of_fused_min"]
    met = speedup >= TARGET_SPEEDUP and ortho["fused"] <= TARGET_ORTHO
    total = sum(math.prod(s) for s in shapes)
    markdown = "\n".join([
        f"StelLA post-step on {args.device}: LLaMA-3-8B adapter shapes, r = {args.rank} on "
        f"q/k/v/o/gate/up/down of {args.layers} layers ({len(shapes)} factors, "
        f"{total / 1e6:.1f} M entries, fp32), proposal step {args.step:g} per entry; "
        f"{args.reps} interleaved rounds after one warm-up per method.",
        "",
        "| method | median s | min s | min / fused | paired / fused | max orthonormality "
        "| max diff to official |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: official / fused >= {TARGET_SPEEDUP:g}x (on the minima) with orthonormality "
        f"<= {TARGET_ORTHO:g}: **{'met' if met else 'not met'}** ({speedup:.2f}x, "
        f"{ortho['fused']:.1e}). Orthonormality: largest ||X^T X - I||_F over the factors. "
        f"torch threads: {torch.get_num_threads()}; 1-minute load average "
        f"{load['before']:.1f} before, {load['after']:.1f} after (other processes share the "
        "cores; the interleaving spreads their noise over all methods).",
    ])
    payload = {"settings": vars(args), "load_average": load, "factors": len(shapes),
               "target_speedup": TARGET_SPEEDUP, "target_met": met, "results": results}
    write_results(Path(args.out), payload, markdown)
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
