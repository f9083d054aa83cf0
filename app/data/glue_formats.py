"""GLUE tasks and their official TSV layouts, as pure parsing code (no Lightning).

Every task is described by a :class:`GlueTask`: the text columns (named as in the hub dataset
``nyu-mll/glue`` so local and hub data give identical rows), the labels, the local file names
and the headline metric. :func:`read_glue_tsv` reads one official TSV file into a dict of columns.

Official layouts handled here (the GLUE ``download_glue_data.py`` distribution):

- CoLA: no header; columns source, label, original label, sentence. Its ``test.tsv`` has a
  header ``index sentence``.
- SST-2: header ``sentence label``.
- MRPC: header ``Quality #1 ID #2 ID #1 String #2 String``, files start with a UTF-8 byte-order
  mark; the sentences contain unbalanced double quotes, so quoting is disabled.
- STS-B: ten columns, header ``index genre filename year old_index source1 source2 sentence1
  sentence2 score``; the float score is the label.
- QQP: header ``id qid1 qid2 question1 question2 is_duplicate``; a few official rows are
  malformed and are skipped (counted and reported).
- MNLI: header with ``sentence1``, ``sentence2`` and ``gold_label``; validation comes as
  ``dev_matched.tsv`` and ``dev_mismatched.tsv``.
- QNLI, RTE: ``index`` plus two texts and a textual label (``entailment`` / ``not_entailment``).
- WNLI: ``index sentence1 sentence2 label`` with 0 / 1 labels.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ConfigError

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name: Hub configuration name (``cola``, ``sst2``, ...).
        folder: Folder name in the official GLUE distribution (``CoLA``, ``SST-2``, ...).
        text_keys: Column names of the one or two input texts, as in ``nyu-mll/glue``.
        label_names: Class names in the hub's label order; empty for the STS-B regression.
        file_columns: Official TSV column for each text key, then the label column.
        has_header: Whether the train / dev TSV files start with a header row.
        validation_splits: Split name to local file name (MNLI has two).
        headline: The metric logged as ``val/score`` and used for checkpoint selection.
    """

    name: str
    folder: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    file_columns: tuple[str | int, ...]
    has_header: bool = True
    validation_splits: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    headline: str = "accuracy"

    @property
    def num_labels(self) -> int:
        """1 for regression (STS-B), else the number of classes."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        """True for STS-B."""
        return not self.label_names


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), (3, 1),
                 has_header=False, headline="mcc"),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("sentence", "label")),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                 ("#1 String", "#2 String", "Quality")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), (),
                 ("sentence1", "sentence2", "score"), headline="pearson"),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("question1", "question2", "is_duplicate")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"),
                 ("entailment", "neutral", "contradiction"),
                 ("sentence1", "sentence2", "gold_label"),
                 validation_splits={"validation_matched": "dev_matched.tsv",
                                    "validation_mismatched": "dev_mismatched.tsv"}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
                 ("question", "sentence", "label")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                 ("sentence1", "sentence2", "label")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                 ("sentence1", "sentence2", "label")),
    )
}

# Spellings users type for the same task.
_ALIASES = {"sst-2": "sst2", "sst": "sst2", "sts-b": "stsb", "sts": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> GlueTask:
    """Look a task up by name, case-insensitively.

    Raises:
        ConfigError: For an unknown task, listing the valid names.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise ConfigError(
            f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)} "
            "(data.init_args.task)"
        )
    return GLUE_TASKS[key]


def _label_value(task: GlueTask, raw: str) -> float | int:
    if task.is_regression:
        return float(raw)
    raw = raw.strip()
    if raw.lstrip("-").isdigit():
        value = int(raw)
    elif raw in task.label_names:
        value = task.label_names.index(raw)
    else:
        raise ValueError(f"label {raw!r} is not one of {task.label_names}")
    if not 0 <= value < task.num_labels:
        raise ValueError(f"label {value} out of range for {task.num_labels} classes")
    return value


def read_glue_tsv(task: GlueTask, path: str | Path, problems: list[str] | None = None
                  ) -> tuple[dict[str, list], int]:
    """Read one official GLUE train or dev TSV file.

    Args:
        task: The task whose layout the file has.
        path: The ``.tsv`` file.
        problems: If given, one line per malformed row is appended (row number and why).

    Returns:
        ``(columns, skipped)``: a dict with the task's text keys, ``label`` and ``idx`` (row
        number), and the number of malformed rows skipped (wrong column count or bad label).

    Raises:
        ConfigError: If the file is missing, or a header lacks an expected column.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GLUE {task.name}: expected file {path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.has_header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in task.file_columns if c not in header]
        if missing:
            raise ConfigError(
                f"GLUE {task.name}: {path} has columns {header}, expected {missing} "
                f"(is this the official GLUE {task.folder} file?)"
            )
        positions = [header.index(c) for c in task.file_columns]
        width = len(header)
    else:
        positions = [int(c) for c in task.file_columns]
        width = max(positions) + 1
    columns: dict[str, list] = {key: [] for key in (*task.text_keys, "label", "idx")}
    skipped = 0
    for number, row in enumerate(rows):
        line = number + 1 + int(task.has_header)
        if len(row) < width:
            skipped += 1
            if problems is not None:
                problems.append(f"line {line} has {len(row)} of {width} columns")
            continue
        try:
            label = _label_value(task, row[positions[-1]])
        except ValueError:
            skipped += 1
            if problems is not None:
                problems.append(f"line {line} has label {row[positions[-1]][:20]!r}")
            continue
        for key, pos in zip(task.text_keys, positions[:-1]):
            columns[key].append(row[pos])
        columns["label"].append(label)
        columns["idx"].append(number)
    if not columns["label"]:
        raise ConfigError(f"GLUE {task.name}: {path} has no readable rows")
    return columns, skipped


def local_split_files(task: GlueTask, root: str | Path) -> dict[str, Path]:
    """Split name to local file for train and validation splits under ``root``.

    ``root`` may be the GLUE folder (holding ``RTE/``, ``MRPC/``, ...) or the task folder.
    """
    root = Path(root)
    folder = root / task.folder if (root / task.folder).is_dir() else root
    files = {"train": folder / "train.tsv"}
    files.update({split: folder / name for split, name in task.validation_splits.items()})
    return files
