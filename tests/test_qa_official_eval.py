"""The files a SQuAD v2.0 run writes let the official evaluation reproduce its logged scores,
and a test-time decoding option given with ``test --ckpt_path`` takes effect."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_qa_module import qa_config, squad_file
from tiny import write_yaml

from app.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from squad_v2_eval import evaluate  # noqa: E402  (the official script's logic, no app code)


def _scores(metrics: dict, stage: str) -> dict[str, float]:
    keys = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")
    return {k: float(metrics[f"{stage}/{k}"]) for k in keys}


def test_official_v2_evaluation_reproduces_logged_scores(tiny_ckpt, tmp_path: Path) -> None:
    data = squad_file(tmp_path / "dev.json", v2=True)
    cfg = qa_config(tiny_ckpt("bert"), tmp_path, "squad_v2", data)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    fit = build_cli(["fit", "--config", str(path)])
    (fit_run,) = (tmp_path / "runs/lightning_logs").iterdir()
    # validation during fit writes its files too, and they score as logged
    gold = json.loads((fit_run / "gold_val.json").read_text())
    preds = json.loads((fit_run / "predictions_val.json").read_text())
    official = evaluate(gold, preds)
    assert official["total"] == len(preds) == sum(
        len(p["qas"]) for a in gold["data"] for p in a["paragraphs"])
    for key, value in _scores(fit.trainer.callback_metrics, "val").items():
        assert official[key] == pytest.approx(value, abs=1e-4), key

    last = fit_run / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["hyper_parameters"][
        "null_score_diff_threshold"] == 0.0
    empty = {}
    for threshold in (-1000.0, 1000.0):
        test = build_cli(["test", "--config", str(path), "--ckpt_path", str(last),
                          "--model.init_args.null_score_diff_threshold", str(threshold)])
        # the test-time option wins over the checkpoint's hyper-parameter (0.0) ...
        assert test.model.null_score_diff_threshold == threshold
        run = Path(test.trainer.log_dir)
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["init_args"]["null_score_diff_threshold"] == threshold
        preds = json.loads((run / "predictions_test.json").read_text())
        gold = json.loads((run / "gold_test.json").read_text())
        assert gold["version"] == "v2.0"
        official = evaluate(gold, preds)
        assert official["total"] == len(preds)
        for key, value in _scores(test.trainer.callback_metrics, "test").items():
            assert official[key] == pytest.approx(value, abs=1e-4), key
        empty[threshold] = sum(answer == "" for answer in preds.values())
    # ... and decides the answers: a null answer beats every span by more than -1000 and
    # by more than +1000 never
    assert empty[-1000.0] == len(preds) and empty[1000.0] == 0
