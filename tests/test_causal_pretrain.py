"""Pretraining mode: documents packed into blocks, a Llama from config with random weights,
GaRare through the real CLI with validation perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_causal_cli import run_cli, run_dir
from tiny import WORDS

from app.data.text_blocks import TextBlocksDataModule, pack_blocks, read_documents
from app.errors import ConfigError
from app.modules.causal_lm import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]


def test_pack_blocks_joins_documents_with_eos_and_drops_the_tail() -> None:
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_blocks([[1, 2, 3]], block_size=4, eos_id=None) == []


def test_documents_of_text_and_qa_files(tmp_path: Path, shared_data: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond one\n")
    assert read_documents(txt) == ["first paragraph\nstill first", "second one"]
    squad = read_documents(shared_data / "squad" / "dev-v1.1.json")
    hotpot = read_documents(shared_data / "hotpotqa" / "hotpot_dev_distractor_v1.head53.json")
    assert len(squad) == len(set(squad)) > 1000  # 2,067 unique paragraphs, each once
    assert any(p.startswith("Ed Wood is a 1994 American") for p in hotpot)
    bad = tmp_path / "x.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ConfigError, match="neither SQuAD"):
        read_documents(bad)


def _corpus(folder: Path, n: int = 40) -> Path:
    import random

    rng = random.Random(0)
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(12))
                                for _ in range(n)))
    return path


def test_validation_documents_are_held_out(tiny_causal, tmp_path: Path) -> None:
    dm = TextBlocksDataModule(train_files=[str(_corpus(tmp_path))], val_fraction=0.25,
                              block_size=16, checkpoint=str(tiny_causal("llama")))
    train, val = dm.documents()
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    dm.setup("fit")
    assert all(len(b["input_ids"]) == 16 for b in dm.train_data + dm.val_data)
    batch = dm.train_dataloader().collate_fn(dm.train_data[:2])
    assert torch.equal(batch["labels"], batch["input_ids"])  # every token is a target


def test_random_init_builds_the_configured_shape(tiny_causal) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = tiny_causal("llama")
    torch.manual_seed(5)
    module = CausalLMModule(checkpoint=str(ckpt), task="pretraining", random_init=True,
                            model_config={"num_hidden_layers": 1, "intermediate_size": 48})
    module.configure_model()
    layers = module.model.model.layers
    assert len(layers) == 1 and layers[0].mlp.up_proj.out_features == 48
    pretrained = AutoModelForCausalLM.from_pretrained(ckpt)
    assert not torch.equal(layers[0].self_attn.q_proj.weight,
                           pretrained.model.layers[0].self_attn.q_proj.weight)
    assert all(p.requires_grad for p in module.model.parameters())
    with pytest.raises(ConfigError, match="random_init.*set adapter: null"):
        from peft import LoraConfig

        CausalLMModule(checkpoint=str(ckpt), random_init=True, adapter=LoraConfig(r=2))


def test_garare_pretraining_through_the_cli(tiny_causal, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli(
        "fit", "--config", str(ROOT / "configs/data/pretrain_wiki.yaml"),
        "--config", str(ROOT / "configs/methods/garare.yaml"),
        "--model.init_args.checkpoint", str(tiny_causal("llama")),
        "--model.init_args.model_config", "{num_hidden_layers: 1}",
        "--model.init_args.optimizer.init_args.rank", "4",
        "--model.init_args.optimizer.init_args.target_modules",
        "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "--data.init_args.train_files", f"[{_corpus(tmp_path)}]",
        "--data.init_args.block_size", "16", "--data.init_args.batch_size", "4",
        "--data.init_args.val_fraction", "0.25", "--seed_everything", "1",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    acc = EventAccumulator(str(run_dir(tmp_path / "run")))
    acc.Reload()
    loss = acc.Scalars("val/loss")[-1].value
    assert acc.Scalars("val/ppl")[-1].value == pytest.approx(math.exp(loss), rel=1e-5)
    assert acc.Scalars("val/score")[-1].value == pytest.approx(-loss, rel=1e-6)
    assert loss < math.log(300)  # the vocabulary (248 tokens) bounds an untrained loss
