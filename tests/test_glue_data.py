"""GLUE parsing on the real files in ../shared/data and on small files for the other tasks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from app.data.glue_formats import GLUE_TASKS, get_task, local_split_files, read_glue_tsv
from app.errors import ConfigError

REAL = {
    # task: (train rows, dev rows, label set)
    "cola": (8551, 1043, {0, 1}),
    "sst2": (67349, 872, {0, 1}),
    "mrpc": (3668, 408, {0, 1}),
    "stsb": (5749, 1500, None),
    "rte": (2490, 277, {0, 1}),
}


@pytest.mark.parametrize("task", sorted(REAL))
def test_real_glue_files(task: str, shared_data: Path) -> None:
    spec = get_task(task)
    files = local_split_files(spec, shared_data / "glue")
    n_train, n_dev, labels = REAL[task]
    train, skipped_train = read_glue_tsv(spec, files["train"])
    dev, skipped_dev = read_glue_tsv(spec, files["validation"])
    assert (len(train["label"]), len(dev["label"])) == (n_train, n_dev)
    assert skipped_train == skipped_dev == 0
    for key in spec.text_keys:
        assert all(isinstance(t, str) and t for t in train[key])
    if labels is None:  # STS-B: float similarity in [0, 5]
        assert all(0.0 <= y <= 5.0 for y in train["label"] + dev["label"])
        assert len(set(dev["label"])) > 50
    else:
        assert set(train["label"]) == set(dev["label"]) == labels


def test_real_rte_label_mapping(shared_data: Path) -> None:
    """RTE's textual labels map to the hub order: entailment = 0."""
    raw = (shared_data / "glue/RTE/dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = Counter(line.rsplit("\t", 1)[1] for line in raw)
    dev, _ = read_glue_tsv(get_task("rte"), shared_data / "glue/RTE/dev.tsv")
    counts = Counter(dev["label"])
    assert counts[0] == texts["entailment"] and counts[1] == texts["not_entailment"]


def test_real_mrpc_bom_and_quotes(shared_data: Path) -> None:
    """The byte-order mark is not part of the first column name and quotes are kept."""
    dev, _ = read_glue_tsv(get_task("mrpc"), shared_data / "glue/MRPC/dev.tsv")
    assert dev["sentence2"][0].startswith('"The foodservice pie business')
    assert dev["label"][0] == 1


@pytest.mark.parametrize("task", ["qqp", "mnli", "qnli", "wnli", "cola", "sst2", "mrpc", "stsb",
                                  "rte"])
def test_small_files_all_tasks(task: str, glue_dir: Path) -> None:
    spec = GLUE_TASKS[task]
    files = local_split_files(spec, glue_dir)
    assert set(files) == {"train", *spec.validation_splits}
    train, skipped = read_glue_tsv(spec, files["train"])
    assert len(train["label"]) == 48
    assert skipped == (1 if task == "qqp" else 0)  # the malformed QQP row is counted
    for split in spec.validation_splits:
        dev, _ = read_glue_tsv(spec, files[split])
        assert len(dev["label"]) == 16
    if task == "mnli":
        assert set(train["label"]) == {0, 1, 2}
        assert train["label"][:3] == [0, 1, 2]  # entailment, neutral, contradiction
        assert set(files) == {"train", "validation_matched", "validation_mismatched"}
    elif task == "stsb":
        assert train["label"][:2] == [0.5, 4.5]
    else:
        assert train["label"][:2] == [0, 1]
    # The learnable signal written by the fixture is in the first text column.
    assert train[spec.text_keys[0]][1].startswith("good")


def test_unknown_task() -> None:
    with pytest.raises(ConfigError, match="unknown GLUE task 'rtee'.*cola, sst2"):
        get_task("rtee")


def test_aliases() -> None:
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"


def test_header_mismatch(tmp_path: Path) -> None:
    bad = tmp_path / "train.tsv"
    bad.write_text("index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    with pytest.raises(ConfigError, match="expected \\['label'\\]"):
        read_glue_tsv(get_task("rte"), bad)
