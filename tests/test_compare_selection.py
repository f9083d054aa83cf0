"""Learning-rate selection in ``python -m app.compare``: held out from the training set, never
the reported dev set; resumable; rebuilt by ``--report-only``; grids declared by the fragments."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import pytest
from tiny import write_yaml

from app.compare import cli
from app.compare.plan import build_plan
from app.compare.select import (
    check_holdout_support,
    fragment_lr_grid,
    method_grids,
    select_rates,
    selection_plan,
)
from app.compare.tables import score_se, selection_note, selection_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


def _compare(*args: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = cli.main(["--in-process", *args])
    return code, buffer.getvalue()


def _base(folder: Path, ckpt: Path, glue_dir: Path) -> Path:
    return write_yaml(folder / "base.yaml", {
        "model": {"class_path": "app.modules.classification.ClassificationModule",
                  "init_args": {"checkpoint": str(ckpt)}},
        "data": {"class_path": "app.data.glue.GLUEDataModule",
                 "init_args": {"task": "mrpc", "data_dir": str(glue_dir), "max_length": 32,
                               "batch_size": 8}},
        "trainer": {"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1,
                    "enable_model_summary": False, "accelerator": "cpu", "devices": 1},
    })


def _shuffled_dev_copy(glue_dir: Path, target: Path) -> Path:
    """The same GLUE folder with the MRPC dev labels permuted (train untouched)."""
    shutil.copytree(glue_dir, target)
    dev = target / "MRPC" / "dev.tsv"
    header, *rows = dev.read_text(encoding="utf-8").splitlines()
    labels = [r.split("\t", 1)[0] for r in rows]
    flipped = ["1" if y == "0" else "0" for y in labels]  # every label changes
    random.Random(0).shuffle(rows)
    rows = [f"{y}\t{r.split(chr(9), 1)[1]}" for y, r in zip(flipped, rows)]
    dev.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return target


def test_selection_never_reads_the_reported_dev_set(tmp_path: Path, tiny_ckpt,
                                                    glue_dir: Path) -> None:
    ckpt = tiny_ckpt("bert")
    shuffled = _shuffled_dev_copy(glue_dir, tmp_path / "glue_shuffled")
    picked = {}
    for name, data in (("real", glue_dir), ("shuffled", shuffled)):
        base = _base(tmp_path / name, ckpt, data)
        args = ["--base", str(base), "--methods", "lora", "--seeds", "0", "--ranks", "2",
                "--lrs", "1e-5", "3e-2", "--select-holdout", "0.25", "--no-plots",
                "--out", str(tmp_path / name / "out"), "--warmup-steps", "1"]
        code, printed = _compare(*args)
        assert code == 0, printed[-3000:]
        payload = json.loads((tmp_path / name / "out" / "results.json").read_text())
        picked[name] = payload
        if name == "real":
            # Resume: nothing reruns; --report-only rebuilds the same selection.
            code, again = _compare(*args)
            assert code == 0 and ": running" not in again
            code, _ = _compare("--report-only", *args)
            rebuilt = json.loads((tmp_path / name / "out" / "results.json").read_text())
            assert code == 0 and rebuilt["selection"] == payload["selection"]
    real, shuf = picked["real"]["selection"], picked["shuffled"]["selection"]
    assert real["rates"][0]["grid"] == [1e-5, 3e-2]
    # Same held-out scores to the last bit and the same rate: the dev labels are never read.
    assert real["rates"] == shuf["rates"]
    assert real["rates"][0]["selected"] in (1e-5, 3e-2)
    # 12 held-out rows of the 48 training rows validate the selection runs.
    assert real["holdout_reference"]["n_eval"] == 12
    # ... while the reported runs do read the dev set (which differs).
    assert picked["real"]["runs"][0]["lr"] == real["rates"][0]["selected"]
    assert (picked["real"]["runs"][0]["val_curves"] != picked["shuffled"]["runs"][0]["val_curves"])
    text = (tmp_path / "real" / "out" / "summary.md").read_text()
    assert "## Learning-rate selection" in text and "| lora | 2 | 1e-05, 0.03 |" in text
    # The note sizes the held-out noise: 12 rows, one row 1/12, sqrt(0.75 * 0.25 / 12) = 0.125.
    assert "The held-out slice has 12 rows: for an accuracy one row is 0.0833" in text
    assert "is 0.125 at p = 0.75" in text
    run = tmp_path / "real" / "out" / "selection" / "runs" / "lora-r2-lr0.03-s0"
    assert (run / "result.json").is_file()


def test_holdout_is_a_fixed_slice_of_train(tiny_ckpt, glue_dir: Path) -> None:
    from app.data.glue import GLUEDataModule, holdout_split

    def rows(**kw) -> tuple[list[int], list[int]]:
        dm = GLUEDataModule(task="mrpc", data_dir=str(glue_dir),
                            checkpoint=str(tiny_ckpt("bert")), max_length=32, **kw)
        dm.prepare_data()
        dm.setup("fit")
        return list(dm.datasets["train"]["idx"]), list(dm.datasets["validation"]["idx"])

    train, held = rows(holdout_fraction=0.25, holdout_seed=3)
    assert len(train) == 36 and len(held) == 12 and not set(train) & set(held)
    assert sorted(train + held) == list(range(48))  # every training row, once
    assert rows(holdout_fraction=0.25, holdout_seed=3) == (train, held)  # fixed
    assert rows(holdout_fraction=0.25, holdout_seed=4)[1] != held  # seeded
    assert holdout_split(48, 0.25, 3) == (train, held)
    assert len(rows()[1]) == 16  # without the option: the dev set


def test_every_fragment_declares_a_grid_around_its_own_rate() -> None:
    import yaml

    grids = method_grids(METHODS, None)
    assert set(grids) == {p.stem for p in METHODS}
    for path in METHODS:
        lr = yaml.safe_load(path.read_text())["model"]["init_args"]["optimizer"]["init_args"][
            "lr"]
        grid = grids[path.stem]
        assert len(grid) >= 3 and min(grid) <= lr <= max(grid), (path.stem, grid, lr)


def test_grid_errors_and_tie_breaks(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  init_args:\n    adapter: null\n")
    with pytest.raises(ValueError, match="declares no '# lr_grid"):
        method_grids([bare], None)
    assert method_grids([bare], [2e-3, 1e-3, 2e-3]) == {"bare": [1e-3, 2e-3]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("# lr_grid: [0.001, -1]\nmodel: {}\n")
    with pytest.raises(ValueError, match="positive numbers"):
        fragment_lr_grid(bad)
    with pytest.raises(ValueError, match="--lrs"):
        method_grids([bare], [0.0])
    check_holdout_support([ROOT / "configs/data/glue_mrpc.yaml"])
    with pytest.raises(ValueError, match="holdout_seed"):  # images: no seeded slice option
        check_holdout_support([ROOT / "configs/data/pacs.yaml"])

    base = tmp_path / "base.yaml"
    base.write_text("model:\n  init_args: {}\n")
    plan = selection_plan(build_plan([base], [bare], [0], None), {"bare": [1e-4, 1e-3, 1e-2]},
                          (0.1, 0))
    assert [s.name for s in plan] == ["bare-lr0.0001-s0", "bare-lr0.001-s0", "bare-lr0.01-s0"]
    assert plan[0].options[-6:] == ("--data.init_args.holdout_fraction", "0.1",
                                    "--data.init_args.holdout_seed", "0",
                                    "--model.init_args.optimizer.init_args.lr", "0.0001")

    def result(lr: float, score: float, loss: float) -> dict:
        return {"method": "bare", "rank": None, "lr": lr, "metric": "val/score", "mode": "max",
                "best": score, "final": score, "metrics_final": {"val/loss": loss}}

    # A tie on the score goes to the lower held-out loss; the middle rate is not an edge.
    chosen = select_rates(plan, [result(1e-4, 0.7, 0.60), result(1e-3, 0.7, 0.55),
                                 result(1e-2, 0.6, 0.5)])
    assert chosen[0]["selected"] == 1e-3 and chosen[0]["edge"] is None
    # A diverged (missing) rate is skipped; the winner at the end of the grid is flagged.
    chosen = select_rates(plan, [result(1e-4, 0.6, 0.6), result(1e-3, 0.7, 0.6)])
    assert chosen[0]["selected"] == 1e-3 and chosen[0]["scores"][2] is None
    assert not chosen[0]["complete"]
    chosen = select_rates(plan, [result(1e-4, 0.8, 0.6), result(1e-3, 0.7, 0.6)])
    assert chosen[0]["edge"] == "lower"
    # The table says a missing rate did not finish (failed, diverged or not run yet), not more.
    row = selection_table(chosen).splitlines()[-1]
    assert "0.8000, 0.7000, not finished" in row and "some rates did not finish" in row
    assert "failed" not in row


def test_selection_table_says_when_the_optimum_may_lie_beyond_the_grid() -> None:
    def chosen(scores: list[float]) -> dict:
        best = max(range(len(scores)), key=lambda i: scores[i])
        grid = [2e-4, 5e-4, 1e-3]
        return {"method": "pissa", "rank": "8", "grid": grid, "scores": scores,
                "selected": grid[best], "score": scores[best], "complete": True,
                "edge": {0: "lower", 2: "upper"}.get(best), "metric": "val/score",
                "select_on": "final"}

    majority = {"kind": "majority", "description": "d", "n_eval": 367, "headline": "accuracy",
                "metrics": {"val/score": 0.6894}}
    # v2 MRPC PiSSA: 290/367 at 1e-3 against 279/367 at 5e-4 (11 rows, 0.0300); the binomial
    # SE at p = 290/367 is sqrt(0.7902 * 0.2098 / 367) = 0.0213 < 0.0300: flagged.
    row = selection_table([chosen([0.7166, 0.7602, 0.7902])], majority).splitlines()[-1]
    assert "at the upper end of the grid; beats 0.0005 by 0.0300, more than one standard " \
           "error (0.021): a rate above the grid may do better" in row
    # 2 rows apart (0.0054) is within the noise: only the edge is noted.
    row = selection_table([chosen([0.7629, 0.7575, 0.6894])], majority).splitlines()[-1]
    assert row.endswith("| 0.0002 | 0.7629 | at the lower end of the grid |")
    # Pearson on 575 rows: SE (1 - 0.85^2) / sqrt(574) = 0.01158; 0.85 - 0.83 = 0.02 > SE.
    pearson = dict(majority, kind="constant", n_eval=575, headline="pearson")
    assert score_se("pearson", 0.85, 575) == pytest.approx(0.2775 / 574 ** 0.5)
    row = selection_table([chosen([0.85, 0.83, 0.80])], pearson).splitlines()[-1]
    assert "beats 0.0005 by 0.0200, more than one standard error (0.012): a rate below" in row
    # A metric without a standard error here (MCC), or no held-out size: no claim is made.
    assert score_se("mcc", 0.5, 500) is None
    mcc = dict(majority, headline="mcc")
    assert "beats" not in selection_table([chosen([0.85, 0.60, 0.50])], mcc)
    assert "beats" not in selection_table([chosen([0.85, 0.60, 0.50])])
    note = selection_note([chosen([0.85, 0.83, 0.80])], "val/score", pearson)
    assert "The held-out slice has 575 rows: the standard error of a Pearson correlation" in note
    assert "is 0.012 at r = 0.85" in note and "for an accuracy" not in note


@pytest.mark.parametrize("args, message", [
    (["--select-jobs", "0"], "--select-jobs 0: give 1 or more"),
    (["--select-jobs", "2", "--in-process"], "--select-jobs 2: give 1 or more (1 with"),
    (["--select-lr", "--select-holdout", "1.5"],
     "--select-holdout 1.5: give a fraction between 0 and 1"),
    (["--finish-by", "soon"], "--finish-by 'soon': not a time; give a clock time (21:30)"),
    (["--finish-by", "2020-01-01T10:00"], "--finish-by '2020-01-01T10:00': that time has passed"),
    (["--finish-by", "25:10"], "--finish-by '25:10': not a time of day"),
])
def test_bad_selection_options_stop_with_one_line(args, message, tmp_path: Path,
                                                  capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--base", str(ROOT / "configs/data/glue_mrpc.yaml"), "--methods", "lora",
                  "--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:") or "error:" in ln]
    assert not (tmp_path / "out").exists()  # nothing written
