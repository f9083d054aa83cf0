"""SQuAD answers that are not where the file says: refused, or dropped and counted."""

from __future__ import annotations

from collections.abc import Sequence

from app.data.qa_formats import UNLOCATED, QAExample


def misplaced_answer(ex: QAExample) -> int | None:
    """Index of the first answer whose ``answer_start`` does not point at its text in the
    context (``None`` when all do; HotpotQA's unlocated answers are not checked here)."""
    for i, (text, start) in enumerate(zip(ex.answers, ex.answer_starts)):
        if start == UNLOCATED:
            continue
        if not 0 <= start <= len(ex.context) - len(text) or (
                ex.context[start:start + len(text)] != text):
            return i
    return None


def drop_misplaced_answers(examples: Sequence[QAExample], source: str, skip: bool
                           ) -> tuple[list[QAExample], int]:
    """Refuse (or, with ``skip``, drop and count) questions with a misplaced answer.

    A wrong ``answer_start`` would otherwise turn an answerable question into a "no answer"
    training label (the span falls outside every window) or a label on the wrong words.

    Raises:
        ValueError: On the first such question when ``skip`` is false, naming it and the
            option that allows dropping them.
    """
    kept: list[QAExample] = []
    for ex in examples:
        bad = misplaced_answer(ex)
        if bad is None:
            kept.append(ex)
            continue
        if not skip:
            start, text = ex.answer_starts[bad], ex.answers[bad]
            found = ex.context.find(text)
            there = ex.context[start:start + len(text)][:40]
            raise ValueError(
                f"{source}: question {ex.id!r}: answer_start={start} does not point at its "
                f"answer {text[:40]!r} (the context has {there!r} there"
                f"{f'; the text occurs at {found}' if found >= 0 else ''}); fix the file "
                "or set data.init_args.skip_malformed_rows: true to drop such questions")
    return kept, len(examples) - len(kept)
