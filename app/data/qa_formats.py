"""Extractive question answering records: SQuAD v1.1 / v2.0 and HotpotQA (distractor).

Everything is parsed into one record type, :class:`QAExample`, from either the official
JSON files (``load_squad``, ``load_hotpotqa``) or the row dicts of the hub datasets
``rajpurkar/squad``, ``rajpurkar/squad_v2`` and ``hotpotqa/hotpot_qa`` (``from_hf``).

SQuAD:
    One example per question; ``title`` is the article title. v1.1 and answerable v2.0
    questions keep every gold answer (duplicates included, as the official evaluation
    does). Unanswerable v2.0 questions get ``answers=[]``, ``is_impossible=True`` and
    ``answer_type="none"``; their ``plausible_answers`` are not gold answers for the
    official metric and are therefore not kept.

HotpotQA context:
    The ten (distractor) paragraphs are kept in the given order. Each paragraph becomes
    ``"<title>. <sentence> <sentence> ..."`` (sentences stripped of surrounding
    whitespace, joined by one space; about 1% of the official sentences carry no leading
    space, so plain concatenation would glue words) and paragraphs are joined by
    :data:`HOTPOT_PARAGRAPH_SEP`. The whole context is prefixed by
    :data:`HOTPOT_YES_NO_PREFIX` (``"yes no "``).

HotpotQA yes/no answers:
    Comparison questions answered "yes" or "no" become extractive spans over that prefix:
    ``answer_type`` is ``"yes"`` / ``"no"`` and ``answer_starts`` is 0 / 4, so the same
    span head and the same decoding serve every answer type.

HotpotQA span answers:
    The character offset is the first exact occurrence inside a supporting-fact paragraph,
    else the first exact occurrence anywhere after the prefix, else the first
    case-insensitive occurrence (the gold string is kept as the answer text). If the answer
    does not occur at all, the example is kept with ``answer_starts=[-1]``
    (:data:`UNLOCATED`): it is still scored at evaluation (the metric only needs the answer
    text) but ``prepare_train_features`` drops it. ``load_hotpotqa`` logs how many such
    examples there were; ``count_unlocated`` counts them in any list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

AnswerType = Literal["span", "yes", "no", "none"]

HOTPOT_YES_NO_PREFIX = "yes no "
"""Prepended to every HotpotQA context so that "yes" (char 0) and "no" (char 4) are spans."""
HOTPOT_PARAGRAPH_SEP = "\n\n"
"""Separator between HotpotQA paragraphs in the built context."""
UNLOCATED = -1
"""``answer_starts`` value of an answer whose text does not occur in the context."""


@dataclass
class QAExample:
    """One extractive QA question with its context and gold answers.

    Attributes:
        id: Question id, unique within a dataset.
        question: The question text.
        context: The text the answer is extracted from.
        answers: Gold answer texts (empty for an unanswerable question).
        answer_starts: Character offset of each answer in ``context`` (``UNLOCATED`` if the
            text could not be found).
        is_impossible: True for an unanswerable SQuAD v2.0 question.
        title: Article title (SQuAD) or the titles of the supporting paragraphs (HotpotQA).
        answer_type: ``"span"``, ``"yes"``, ``"no"`` or ``"none"`` (unanswerable).
    """

    id: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    is_impossible: bool = False
    title: str = ""
    answer_type: AnswerType = "span"

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.answer_starts):
            raise ValueError(
                f"question {self.id!r}: {len(self.answers)} answers but "
                f"{len(self.answer_starts)} answer starts"
            )
        if self.answer_type not in ("span", "yes", "no", "none"):
            raise ValueError(f"question {self.id!r}: unknown answer_type {self.answer_type!r}")


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _require(obj: Any, key: str, where: str, source: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ValueError(f"{source}: {where} has no {key!r}")
    return obj[key]


def _check_unique(examples: Sequence[QAExample], source: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise ValueError(f"{source}: question id {ex.id!r} appears more than once")
        seen.add(ex.id)


def load_squad(path: str | Path) -> list[QAExample]:
    """Read an official SQuAD v1.1 or v2.0 JSON file.

    Args:
        path: The JSON file (``{"version": ..., "data": [{"title", "paragraphs": [...]}]}``).

    Returns:
        One example per question, in file order.

    Raises:
        ValueError: The file is not SQuAD JSON (naming the missing field) or a question id
            appears twice.
    """
    src = str(path)
    raw = _read_json(path)
    if not isinstance(raw, Mapping) or "data" not in raw:
        raise ValueError(f"{src}: not SQuAD JSON, expected top-level key 'data'")
    examples: list[QAExample] = []
    for a, article in enumerate(raw["data"]):
        paragraphs = _require(article, "paragraphs", f"article {a}", src)
        title = str(article.get("title", ""))
        for p, para in enumerate(paragraphs):
            where = f"article {a} paragraph {p}"
            context = _require(para, "context", where, src)
            for q, qa in enumerate(_require(para, "qas", where, src)):
                qwhere = f"{where} question {q}"
                qid = str(_require(qa, "id", qwhere, src))
                question = _require(qa, "question", f"question {qid!r}", src)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else _require(qa, "answers", f"question {qid!r}", src)
                texts = [str(_require(x, "text", f"an answer of {qid!r}", src)) for x in answers]
                starts = [
                    int(_require(x, "answer_start", f"an answer of {qid!r}", src)) for x in answers
                ]
                if not impossible and not texts:
                    raise ValueError(f"{src}: question {qid!r} is answerable but has no answers")
                examples.append(
                    QAExample(
                        id=qid,
                        question=question,
                        context=context,
                        answers=texts,
                        answer_starts=starts,
                        is_impossible=impossible,
                        title=title,
                        answer_type="none" if impossible else "span",
                    )
                )
    _check_unique(examples, src)
    return examples


def build_hotpot_context(
    paragraphs: Sequence[tuple[str, Sequence[str]]],
) -> tuple[str, list[tuple[int, int]]]:
    """Build the HotpotQA context string (see the module docstring for the layout).

    Args:
        paragraphs: ``(title, sentences)`` pairs in the given order.

    Returns:
        The context and the ``(start, end)`` character span of each paragraph in it.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = len(HOTPOT_YES_NO_PREFIX)
    for title, sentences in paragraphs:
        text = " ".join(s.strip() for s in sentences if s.strip())
        para = f"{title}. {text}" if text else f"{title}."
        spans.append((pos, pos + len(para)))
        parts.append(para)
        pos += len(para) + len(HOTPOT_PARAGRAPH_SEP)
    return HOTPOT_YES_NO_PREFIX + HOTPOT_PARAGRAPH_SEP.join(parts), spans


def _locate(answer: str, context: str, spans: Iterable[tuple[int, int]]) -> int:
    """Character offset of ``answer`` in ``context``, preferring the given (start, end) spans."""
    for start, end in spans:
        i = context.find(answer, start, end)
        if i >= 0:
            return i
    body = len(HOTPOT_YES_NO_PREFIX)
    i = context.find(answer, body)
    if i >= 0:
        return i
    i = context.lower().find(answer.lower(), body)
    return i if i >= 0 else UNLOCATED


def hotpot_record_to_example(record: Mapping[str, Any], where: str = "record") -> QAExample:
    """Convert one record in the official HotpotQA layout to a :class:`QAExample`.

    Args:
        record: ``{"_id", "question", "answer", "context": [[title, [sentences]]],
            "supporting_facts": [[title, sent_id]], ...}``.
        where: How to name the record in error messages.

    Returns:
        The example; ``title`` lists the supporting titles joined by ``" | "``.
    """
    qid = str(_require(record, "_id", where, "HotpotQA"))
    question = _require(record, "question", where, "HotpotQA")
    answer = str(_require(record, "answer", where, "HotpotQA"))
    raw_ctx = _require(record, "context", where, "HotpotQA")
    paragraphs = [(str(p[0]), list(p[1])) for p in raw_ctx]
    context, para_spans = build_hotpot_context(paragraphs)
    support_titles = list(dict.fromkeys(str(sf[0]) for sf in record.get("supporting_facts", [])))
    spans = [sp for sp, (t, _) in zip(para_spans, paragraphs, strict=True) if t in support_titles]
    norm = answer.strip().lower()
    if norm in ("yes", "no"):
        answer_type: AnswerType = "yes" if norm == "yes" else "no"
        start = 0 if norm == "yes" else HOTPOT_YES_NO_PREFIX.index("no")
        answer = norm
    else:
        answer_type = "span"
        start = _locate(answer, context, spans)
    return QAExample(
        id=qid,
        question=question,
        context=context,
        answers=[answer],
        answer_starts=[start],
        is_impossible=False,
        title=" | ".join(support_titles),
        answer_type=answer_type,
    )


def load_hotpotqa(path: str | Path) -> list[QAExample]:
    """Read an official HotpotQA (distractor or fullwiki) JSON file.

    Args:
        path: The JSON file: a list of records with ``_id``, ``question``, ``answer``,
            ``context``, ``supporting_facts``, ``type``, ``level``.

    Returns:
        One example per record, in file order. See the module docstring for the context
        layout, yes/no answers and answers that cannot be located.

    Raises:
        ValueError: The file is not HotpotQA JSON (naming the record and missing field) or a
            question id appears twice.
    """
    src = str(path)
    raw = _read_json(path)
    if not isinstance(raw, list):
        # A ValueError, not a TypeError: the file's content is wrong, not the caller's types.
        raise ValueError(f"{src}: not HotpotQA JSON, expected a top-level list of records")  # noqa: TRY004
    examples = []
    for i, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise ValueError(f"{src}: record {i} is not a JSON object")  # noqa: TRY004
        for key in ("_id", "question", "answer", "context"):
            if key not in record:
                raise ValueError(f"{src}: record {i} has no {key!r}")
        examples.append(hotpot_record_to_example(record, where=f"record {i}"))
    _check_unique(examples, src)
    n = count_unlocated(examples)
    if n:
        log.warning("%s: %d of %d answers not found in their context", src, n, len(examples))
    return examples


def count_unlocated(examples: Iterable[QAExample]) -> int:
    """Number of examples with an answer whose text was not found in the context."""
    return sum(UNLOCATED in ex.answer_starts for ex in examples)


def squad_row_to_example(row: Mapping[str, Any]) -> QAExample:
    """Convert a ``rajpurkar/squad`` or ``rajpurkar/squad_v2`` hub row.

    Args:
        row: ``{"id", "title", "context", "question", "answers": {"text", "answer_start"}}``;
            v2 marks an unanswerable question by empty answer lists.
    """
    answers = row["answers"]
    texts = [str(t) for t in answers["text"]]
    impossible = not texts
    return QAExample(
        id=str(row["id"]),
        question=row["question"],
        context=row["context"],
        answers=texts,
        answer_starts=[int(s) for s in answers["answer_start"]],
        is_impossible=impossible,
        title=str(row.get("title", "")),
        answer_type="none" if impossible else "span",
    )


def hotpot_row_to_example(row: Mapping[str, Any]) -> QAExample:
    """Convert a ``hotpotqa/hotpot_qa`` hub row to the official layout, then to an example.

    Args:
        row: ``{"id", "question", "answer", "type", "level",
            "supporting_facts": {"title", "sent_id"}, "context": {"title", "sentences"}}``.
    """
    ctx = row["context"]
    sf = row.get("supporting_facts") or {"title": [], "sent_id": []}
    record = {
        "_id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "context": [[t, s] for t, s in zip(ctx["title"], ctx["sentences"], strict=True)],
        "supporting_facts": [[t, i] for t, i in zip(sf["title"], sf["sent_id"], strict=True)],
    }
    return hotpot_record_to_example(record, where=f"row {row['id']!r}")


def from_hf(rows: Iterable[Mapping[str, Any]], source: str = "hub dataset") -> list[QAExample]:
    """Convert hub dataset rows (SQuAD, SQuAD v2 or HotpotQA layout, detected per row).

    Args:
        rows: A ``datasets.Dataset`` split or any iterable of row dicts.
        source: Name used in error messages.

    Raises:
        ValueError: A row has neither layout, or a question id appears twice.
    """
    examples = []
    for i, row in enumerate(rows):
        if "supporting_facts" in row or ("answer" in row and "context" in row):
            examples.append(hotpot_row_to_example(row))
        elif "answers" in row and "context" in row:
            examples.append(squad_row_to_example(row))
        else:
            raise ValueError(
                f"{source}: row {i} is neither SQuAD (id, context, question, answers) nor "
                f"HotpotQA (id, question, answer, context); columns {sorted(row)}"
            )
    _check_unique(examples, source)
    return examples


def examples_to_hf_dict(examples: Sequence[QAExample]) -> dict[str, list[Any]]:
    """Columnar dict of the example fields, for ``datasets.Dataset.from_dict`` (caching)."""
    names = list(QAExample.__dataclass_fields__)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for ex in examples:
        for n, v in asdict(ex).items():
            out[n].append(v)
    return out


def examples_from_hf_dict(columns: Mapping[str, Sequence[Any]]) -> list[QAExample]:
    """Inverse of :func:`examples_to_hf_dict` (also accepts a ``datasets.Dataset``)."""
    names = list(QAExample.__dataclass_fields__)
    if hasattr(columns, "column_names"):  # a datasets.Dataset: iterate rows, not columns
        return [QAExample(**{k: _plain(row[k]) for k in names}) for row in columns]
    n = len(columns["id"])
    return [QAExample(**{k: _plain(columns[k][i]) for k in names}) for i in range(n)]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
