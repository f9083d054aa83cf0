"""Question answering end to end: SQuAD v1.1 / v2.0 and HotpotQA through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import write_yaml

from app.cli import build_cli, main
from app.data.qa_formats import load_squad
from app.data.squad import split_by_article


def squad_file(path: Path, v2: bool = False) -> Path:
    """Four articles, answers placed late in long contexts so windows matter."""
    data = []
    for a in range(4):
        paragraphs = []
        for p in range(2):
            filler = " ".join(["the market said the city was old ."] * 12)
            context = f"{filler} the answer is dog{a}{p} today ."
            start = context.index(f"dog{a}{p}")
            qas = [{"id": f"q{a}{p}", "question": "what is the answer ?",
                    "answers": [{"text": f"dog{a}{p}", "answer_start": start}]}]
            if v2:
                qas[0]["is_impossible"] = False
                qas.append({"id": f"n{a}{p}", "question": "who was the king ?", "answers": [],
                            "plausible_answers": [], "is_impossible": True})
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "2.0" if v2 else "1.1", "data": data}))
    return path


def qa_config(ckpt: Path, tmp: Path, task: str, validation_file: Path) -> dict:
    return {
        "seed_everything": 3,
        "model": {"class_path": "app.modules.question_answering.QuestionAnsweringModule",
                  "init_args": {"checkpoint": str(ckpt),
                                "adapter": {"class_path": "peft.LoraConfig",
                                            "init_args": {"r": 4, "lora_alpha": 8}},
                                "optimizer": {"class_path": "torch.optim.AdamW",
                                              "init_args": {"lr": 1e-2}}}},
        "data": {"class_path": "app.data.squad.QADataModule",
                 "init_args": {"task": task, "validation_file": str(validation_file),
                               "train_articles_fraction": 0.5, "max_length": 48,
                               "doc_stride": 16, "batch_size": 8}},
        "trainer": {"max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "default_root_dir": str(tmp / "runs"),
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "accelerator": "cpu", "devices": 1},
    }


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_squad_fit_and_test(task: str, tiny_ckpt, tmp_path: Path) -> None:
    data = squad_file(tmp_path / "dev.json", v2=task == "squad_v2")
    cfg = write_yaml(tmp_path / "run.yaml",
                     qa_config(tiny_ckpt("bert"), tmp_path, task, data))
    cli = build_cli(["fit", "--config", str(cfg)])
    metrics = cli.trainer.callback_metrics
    assert {"val/exact", "val/f1", "val/score"} <= set(metrics)
    assert 0.0 <= float(metrics["val/f1"]) <= 100.0
    if task == "squad_v2":
        assert {"val/HasAns_f1", "val/NoAns_f1"} <= set(metrics)
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None, verbose=False)
    preds = json.loads((Path(cli.trainer.log_dir) / "predictions_test.json").read_text())
    # every evaluated question gets exactly one answer; half the articles are evaluated
    expected = {ex.id for ex in split_by_article(load_squad(data), 0.5, 0)[1]}
    assert set(preds) == expected


def test_hotpotqa_sample_runs(tiny_ckpt, tmp_path: Path, shared_data: Path) -> None:
    data = shared_data / "hotpotqa/hotpot_dev_distractor_v1.head53.json"
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "hotpotqa", data)
    cfg["data"]["init_args"].update(max_length=160, doc_stride=32, max_eval_samples=6)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    cli = build_cli(["fit", "--config", str(path)])
    assert "val/f1" in cli.trainer.callback_metrics


def test_split_by_article_on_real_squad(shared_data: Path) -> None:
    examples = load_squad(shared_data / "squad/dev-v1.1.json")
    train, held = split_by_article(examples, 0.8, seed=0)
    assert len(train) + len(held) == len(examples) == 10570
    assert not {e.title for e in train} & {e.title for e in held}
    assert len({e.title for e in train}) == round(0.8 * 48)


def test_decode_uses_all_windows(tiny_ckpt, tmp_path: Path) -> None:
    """Logits placed on the answer in a later window decode to the answer text."""
    from app.modules.question_answering import QuestionAnsweringModule

    data = squad_file(tmp_path / "dev.json")
    cfg = write_yaml(tmp_path / "run.yaml",
                     qa_config(tiny_ckpt("bert"), tmp_path, "squad", data))
    cli = build_cli(["--config", str(cfg)], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module: QuestionAnsweringModule = cli.model
    outputs, located = [], set()
    for i, index in enumerate(batch["feature_index"]):
        start = torch.full((48,), -10.0)
        end = torch.full((48,), -10.0)
        offsets = batch["offset_mapping"][i]
        context = batch["context"][i]
        answer = batch["answers"][i][0]
        a0 = context.index(answer)
        for t, span in enumerate(offsets):
            if span is not None and span[0] == a0:
                start[t] = 10.0
                located.add(batch["example_id"][i])
            if span is not None and span[1] == a0 + len(answer):
                end[t] = 10.0
        outputs.append({"feature_index": index, "example_id": batch["example_id"][i],
                        "offset_mapping": offsets, "context": context,
                        "answers": batch["answers"][i],
                        "answer_starts": batch["answer_starts"][i],
                        "is_impossible": False, "answer_type": "span",
                        "start": start.numpy(), "end": end.numpy()})
    windows = {}
    for o in outputs:
        windows[o["example_id"]] = windows.get(o["example_id"], 0) + 1
    assert max(windows.values()) > 1  # the contexts really are windowed
    preds, _ = module.decode(outputs)
    assert located
    for o in outputs:
        if o["example_id"] in located:  # the batch may hold only some windows of the last one
            assert preds[o["example_id"]] == o["answers"][0]


def test_bad_qa_inputs(tiny_ckpt, tmp_path: Path, capsys) -> None:
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "squad", tmp_path / "missing.json")
    path = write_yaml(tmp_path / "run.yaml", cfg)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path)])
    assert exc.value.code == 2
    assert "missing.json does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "1.1", "articles": []}))
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "squad", bad)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path)])
    assert exc.value.code == 2
    assert "'data'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["stella", "manifold_stiefel"])
def test_geometry_methods_on_question_answering(method: str, tiny_ckpt, tmp_path: Path) -> None:
    """The geometry method fragments run unchanged on the QA module (tiny BERT)."""
    root = Path(__file__).resolve().parents[1]
    data = squad_file(tmp_path / "dev.json")
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "squad", data)
    del cfg["model"]["init_args"]["adapter"], cfg["model"]["init_args"]["optimizer"]
    path = write_yaml(tmp_path / "run.yaml", cfg)
    cli = build_cli(["fit", "--config", str(path), "--config",
                     str(root / f"configs/methods/{method}.yaml")])
    assert "val/f1" in cli.trainer.callback_metrics
    from app.callbacks.factors import tall
    from app.manifolds import stiefel

    pattern = "stella_U" if method == "stella" else "lora_B"
    factors = [p for n, p in cli.model.model.named_parameters() if pattern in n]
    assert factors
    assert max(float(stiefel.drift(tall(p.detach()))) for p in factors) < 1e-3


@pytest.mark.slow
def test_squad_v2_under_two_rank_ddp_writes_every_prediction_once(tiny_ckpt,
                                                                  tmp_path: Path) -> None:
    """Two-process CPU DDP through the real CLI: the ranks train alike, and the validation
    predictions gathered from both ranks cover every held-out question exactly once (rank 0
    writes them; the run folder is a broadcast every rank must take part in)."""
    from ddp_dump import run_two_ranks

    data = squad_file(tmp_path / "dev.json", v2=True)
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "squad_v2", data)
    run_two_ranks(cfg, tmp_path, steps=4)
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    preds = json.loads((run / "predictions_val.json").read_text())
    expected = {ex.id for ex in split_by_article(load_squad(data), 0.5, 0)[1]}
    assert set(preds) == expected and len(expected) == 8
    gold = json.loads((run / "gold_val.json").read_text())
    gold_ids = {q["id"] for a in gold["data"] for p in a["paragraphs"] for q in p["qas"]}
    assert gold_ids == expected
