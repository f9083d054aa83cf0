"""Test-only driver: what a checkpoint of a sharded adapter model gathers, and FSDP2's
mixed-precision policy, on two gloo processes (``RANK`` / ``WORLD_SIZE`` / ``MASTER_PORT`` from
the environment). Writes ``OUT/rank<k>.json``.

- FSDP1 (``use_orig_params``, the adapter wrap policy of ``app.strategies``):
  :func:`app.strategies.gather_kept` must return the trained tensors whole, equal to the
  unsharded model's, while ``all_gather`` moves only their bytes (counted by patching it).
- FSDP2 (``app.fsdp2.shard_model`` with :func:`app.fsdp2.mixed_precision_policy` of
  ``bf16-mixed``, over a bf16 frozen base and fp32 trained tensors as the precision policy
  builds them): :func:`app.fsdp2.gather_trained` gathers only the trained tensors (every
  ``full_tensor`` counted); in the forward pass the weights are bf16; the gradients of the
  fp32 masters are fp32 and equal a one-process autocast step on the same global batch.

``python tests/sharded_save_driver.py OUT`` (run by ``test_sharded_saves.py``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def tiny_lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_config
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("bert", 120)
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"],
                                             lora_dropout=0.0, modules_to_save=["classifier"]))
    for module in model.modules():  # B = 0 would make every gradient of A zero
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model.eval()  # no dropout: runs on different process counts must be comparable


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fsdp1(model: torch.nn.Module, keep: set[str]) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from app.strategies import adapter_wrap_policy, gather_kept

    want = {n: p.detach().clone() for n, p in model.named_parameters() if n in keep}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    wrapped = FSDP(model, auto_wrap_policy=adapter_wrap_policy(model), use_orig_params=True,
                   device_id=torch.device("cpu"))
    moved: list[int] = []
    original = dist.all_gather

    def counting(tensor_list, tensor, *args, **kwargs):
        moved.append(nbytes(tensor_list))
        return original(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = counting
    try:
        got = gather_kept(wrapped, keep, shapes)
    finally:
        dist.all_gather = original
    return {"keys_equal": sorted(got) == sorted(want),
            "max_diff": max(float((got[n] - want[n]).abs().max()) for n in want),
            "shapes_equal": all(got[n].shape == want[n].shape for n in want),
            "gathered_bytes": sum(moved), "calls": len(moved)}


def fsdp2(model: torch.nn.Module, keep: set[str], world: int, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from app.fsdp2 import gather_trained, mixed_precision_policy, shard_model
    from app.precision import cast_trainable

    model = model.to(torch.bfloat16)  # the frozen base as a bf16 checkpoint loads
    cast_trainable(model, "bf16-mixed")  # fp32 masters
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 120, (4 * world, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4 * world) % 2

    def loss_of(net: torch.nn.Module, rows: slice) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(input_ids=ids[rows], labels=labels[rows]).loss

    loss_of(reference, slice(None)).backward()
    want_grads = {n: p.grad.float() for n, p in reference.named_parameters() if p.grad is not None}
    want = {n: p.detach().clone() for n, p in model.named_parameters() if n in keep}

    mesh = init_device_mesh("cpu", (world,))
    shard_model(model, mesh, mixed_precision_policy("bf16-mixed"))
    seen: set[torch.dtype] = set()
    query = next(m for n, m in model.named_modules() if n.endswith("query.base_layer"))
    query.register_forward_pre_hook(lambda m, a: seen.add(m.weight.dtype))
    per_rank = slice(4 * rank, 4 * (rank + 1))
    loss_of(model, per_rank).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grad_dtypes = sorted({str(g.dtype) for g in grads.values()})
    full_grads = {n: (g.full_tensor() if isinstance(g, DTensor) else g) for n, g in grads.items()}
    errors = [float((full_grads[n] - want_grads[n]).norm() / want_grads[n].norm().clamp(min=1e-12))
              for n in want_grads if n in full_grads]

    moved: list[int] = []
    original = DTensor.full_tensor

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        moved.append(nbytes([out]))
        return out

    DTensor.full_tensor = counting
    try:
        got = gather_trained(model, keep)
    finally:
        DTensor.full_tensor = original
    return {"keys_equal": sorted(got) == sorted(want),
            "max_diff": max(float((got[n].float() - want[n].float()).abs().max())
                            for n in want),
            "gathered_bytes": sum(moved), "forward_weight_dtypes": sorted(map(str, seen)),
            "grad_dtypes": grad_dtypes, "grad_keys_equal": sorted(full_grads) == sorted(
                want_grads), "max_rel_grad_error": max(errors)}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_lora_model()
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    report = {"world": world,
              "kept_bytes": nbytes(p for n, p in model.named_parameters() if n in keep),
              "model_bytes": nbytes(model.parameters()),
              "fsdp1": fsdp1(copy.deepcopy(model), keep),
              "fsdp2": fsdp2(copy.deepcopy(model), keep, world, rank)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
