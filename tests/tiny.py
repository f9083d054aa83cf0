"""Tiny models and data for tests: built from config, deterministic, offline."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the a an is are was were be been not no yes and or but if then of to in on at by for with "
    "from as it this that these those he she they we you i his her their our my your man woman "
    "dog cat car house city country company said says say found find made make good bad great "
    "small large new old first last year years day time people group police government world "
    "market price stock shares percent million billion report reports told after before over "
    "under up down out about into than more most less very also just only still even well"
).split()


def build_tokenizer(with_token_types: bool = True):
    """A WordPiece tokenizer over a fixed vocabulary (identical in every process)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
                  *("##" + c for c in chars if c.isalnum()), *WORDS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    names = ["input_ids", "token_type_ids", "attention_mask"] if with_token_types else [
        "input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=names,
    )


def tiny_config(arch: str, vocab_size: int):
    """Config of a 2-layer, hidden-32 model of the given architecture."""
    from transformers import BertConfig, DebertaV2Config, LlamaConfig, RobertaConfig

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    if arch == "bert":
        return BertConfig(**common)
    if arch == "roberta":
        return RobertaConfig(**common, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                             type_vocab_size=1)
    if arch == "deberta":
        return DebertaV2Config(**common, pad_token_id=0, type_vocab_size=0,
                               relative_attention=True, position_buckets=32,
                               pos_att_type=["p2c", "c2p"])
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           pad_token_id=0)
    raise ValueError(arch)


def build_tiny_checkpoint(arch: str, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Save a randomly initialised (seeded) base model plus tokenizer, like a hub checkpoint;
    ``dtype`` saves it in that dtype (bf16-saved hub models load as bf16)."""
    from transformers import AutoModel

    tokenizer = build_tokenizer(with_token_types=arch == "bert")
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(arch, len(tokenizer)))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- small GLUE files in the official layouts ---------------------------------------------
def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ."


def write_glue_task(root: Path, task: str, n_train: int = 48, n_dev: int = 16) -> None:
    """Write ``train.tsv`` and dev file(s) for one task with a learnable signal in the text."""
    rng = random.Random(task)
    folders = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
               "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
    folder = root / folders[task]
    folder.mkdir(parents=True, exist_ok=True)
    dev_files = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"]
    for name, n in [("train.tsv", n_train)] + [(d, n_dev) for d in dev_files]:
        lines: list[str] = []
        for i in range(n):
            a, b = _sentence(rng), _sentence(rng)
            y = i % (3 if task == "mnli" else 2)
            a = ("good " if y else "bad ") + a  # a learnable signal
            if task == "cola":
                lines.append(f"src\t{y}\t\t{a}")
            elif task == "sst2":
                lines.append(f"{a}\t{y}")
            elif task == "mrpc":
                lines.append(f"{y}\t{i}\t{i + 1}\t{a}\t\"{b}")
            elif task == "stsb":
                score = f"{y * 4 + 0.5:.3f}"
                lines.append(f"{i}\tmain\tf\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{score}")
            elif task == "qqp":
                lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{y}")
            elif task == "mnli":
                gold = ("entailment", "neutral", "contradiction")[y]
                lines.append(f"{i}\t{i}\t{i}e\tfiction\t(x)\t(y)\t(X)\t(Y)\t{a}\t{b}\t{gold}\t{gold}")
            elif task in ("qnli", "rte"):
                lines.append(f"{i}\t{a}\t{b}\t{('entailment', 'not_entailment')[y]}")
            else:
                lines.append(f"{i}\t{a}\t{b}\t{y}")
        header = {
            "cola": None, "sst2": "sentence\tlabel",
            "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                    "sentence2\tscore",
            "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                    "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                    "sentence2\tlabel1\tgold_label",
            "qnli": "index\tquestion\tsentence\tlabel",
            "rte": "index\tsentence1\tsentence2\tlabel",
            "wnli": "index\tsentence1\tsentence2\tlabel",
        }[task]
        if task == "qqp" and name == "train.tsv":
            lines.append("999\t1\t2\tmalformed row without label")  # official QQP has some
        text = "\n".join(([header] if header else []) + lines) + "\n"
        (folder / name).write_text(text, encoding="utf-8")


# -- running the real command line --------------------------------------------------------
def write_yaml(path: Path, config: dict) -> Path:
    """Dump a config dict as YAML (what a user would write)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def glue_run_config(ckpt: Path, data_dir: Path, root: Path, task: str = "rte",
                    adapter: dict | None = None, max_steps: int = 6, **trainer) -> dict:
    """A complete fit config for a tiny model on the small GLUE files."""
    model: dict = {"checkpoint": str(ckpt)}
    if adapter is not None:
        model["adapter"] = adapter
    model["optimizer"] = {"class_path": "torch.optim.AdamW",
                          "init_args": {"lr": 5e-3, "weight_decay": 0.01}}
    return {
        "seed_everything": 7,
        "model": {"class_path": "app.modules.classification.ClassificationModule",
                  "init_args": model},
        "data": {"class_path": "app.data.glue.GLUEDataModule",
                 "init_args": {"task": task, "data_dir": str(data_dir), "max_length": 32,
                               "batch_size": 8}},
        "trainer": {"max_steps": max_steps, "default_root_dir": str(root),
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "val_check_interval": max_steps,
                    "accelerator": "cpu", "devices": 1, **trainer},
    }


LORA = {"class_path": "peft.LoraConfig",
        "init_args": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}


_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
              "GROUP_RANK", "LOCAL_WORLD_SIZE")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: ``tests/`` importable, no distributed variables left
    over from an in-process run, and a fresh free ``MASTER_PORT`` so concurrent DDP jobs on
    one machine never share a rendezvous port."""
    import os
    import socket

    here = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    env.update({"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra})
    return env
