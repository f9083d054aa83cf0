"""SQuAD exact match and F1 with the official answer normalisation.

Follows the official SQuAD v2.0 evaluation script (which gives the v1.1 numbers on v1.1
data): answers are lower-cased, stripped of punctuation and of the articles a/an/the, and
their whitespace folded; the score of a prediction is the maximum over the gold answers.
A question with no gold answer (SQuAD v2.0 unanswerable) has the single gold ``""``: the
empty prediction scores 1 on it and anything else 0. The same scores serve HotpotQA
answers (the HotpotQA script normalises the same way).

A question with no prediction at all scores 0 (as in the official v1.1 script) and still
counts in the totals.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from app.data.qa_formats import QAExample

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, remove articles (a, an, the), fold whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: Sequence[str]) -> list[str]:
    # Official v2 script: gold answers that normalise to nothing are dropped; no gold left
    # means "no answer", whose only correct prediction is the empty string.
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def _exact(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    pred_toks = normalize_answer(pred).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """Exact match (0 or 1) of ``pred`` against the best of ``golds`` (empty: no answer)."""
    return max(_exact(pred, g) for g in _golds(golds))


def f1(pred: str, golds: Sequence[str]) -> float:
    """Token F1 (0 to 1) of ``pred`` against the best of ``golds`` (empty: no answer)."""
    return max(_f1(pred, g) for g in _golds(golds))


def _example_scores(
    preds: Mapping[str, str], examples: Sequence[QAExample]
) -> list[tuple[float, float, bool]]:
    """(exact, f1, has_answer) for each example; a missing prediction scores 0."""
    out = []
    for ex in examples:
        has_ans = bool(ex.answers) and not ex.is_impossible
        golds = ex.answers if has_ans else []
        if ex.id in preds:
            pred = preds[ex.id]
            out.append((exact_match(pred, golds), f1(pred, golds), has_ans))
        else:
            out.append((0.0, 0.0, has_ans))
    return out


def _summary(
    em_sum: float, f1_sum: float, total: int, breakdown: dict[str, tuple[float, float, int]] | None
) -> dict[str, float]:
    def pct(x: float, n: int) -> float:
        return 100.0 * x / n if n else 0.0

    out: dict[str, float] = {
        "exact": pct(em_sum, total),
        "f1": pct(f1_sum, total),
        "total": float(total),
    }
    for name, (em, f, n) in (breakdown or {}).items():
        if n:
            out[f"{name}_exact"] = pct(em, n)
            out[f"{name}_f1"] = pct(f, n)
            out[f"{name}_total"] = float(n)
    return out


def squad_scores(
    preds: Mapping[str, str],
    examples: Sequence[QAExample],
    version_2_with_negative: bool | None = None,
) -> dict[str, float]:
    """Official SQuAD scores of predictions, in percent.

    Args:
        preds: Question id to predicted answer text (``""`` predicts "no answer").
        examples: The gold examples; predictions for other ids are ignored.
        version_2_with_negative: Whether to add the ``HasAns_*`` / ``NoAns_*`` breakdown;
            None adds it when any example is unanswerable.

    Returns:
        ``exact``, ``f1``, ``total`` and, for v2, ``HasAns_exact``, ``HasAns_f1``,
        ``HasAns_total``, ``NoAns_exact``, ``NoAns_f1``, ``NoAns_total`` (the official key
        names; a group with no question is left out).
    """
    scores = _example_scores(preds, examples)
    if version_2_with_negative is None:
        version_2_with_negative = any(not s[2] for s in scores)
    breakdown = None
    if version_2_with_negative:
        has = [s for s in scores if s[2]]
        no = [s for s in scores if not s[2]]
        breakdown = {
            "HasAns": (sum(s[0] for s in has), sum(s[1] for s in has), len(has)),
            "NoAns": (sum(s[0] for s in no), sum(s[1] for s in no), len(no)),
        }
    return _summary(
        sum(s[0] for s in scores), sum(s[1] for s in scores), len(scores), breakdown
    )


class SQuADMetric(Metric):
    """Exact match and F1 accumulated as per-example score sums, summed across processes.

    Each ``update`` scores its examples at once, so the state is six sums (exact, F1 and
    count for answerable and unanswerable questions) that reduce correctly under DDP. The
    caller must give each question to exactly one process exactly once (score after
    post-processing all windows of a question on one rank, without sampler padding),
    since sums cannot drop duplicates.

    Args:
        version_2_with_negative: As in :func:`squad_scores`; None adds the HasAns / NoAns
            breakdown once any unanswerable question has been seen.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, version_2_with_negative: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version_2_with_negative = version_2_with_negative
        for name in ("has_em", "has_f1", "has_n", "no_em", "no_f1", "no_n"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, preds: Mapping[str, str], examples: Sequence[QAExample]) -> None:
        """Score predictions for ``examples`` (a missing prediction scores 0)."""
        sums = [0.0] * 6
        for em, f, has_ans in _example_scores(preds, examples):
            k = 0 if has_ans else 3
            sums[k] += em
            sums[k + 1] += f
            sums[k + 2] += 1
        for name, value in zip(
            ("has_em", "has_f1", "has_n", "no_em", "no_f1", "no_n"), sums, strict=True
        ):
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, torch.Tensor]:
        """The :func:`squad_scores` dictionary as float tensors."""
        has = (self.has_em.item(), self.has_f1.item(), round(self.has_n.item()))
        no = (self.no_em.item(), self.no_f1.item(), round(self.no_n.item()))
        v2 = self.version_2_with_negative
        if v2 is None:
            v2 = no[2] > 0
        out = _summary(
            has[0] + no[0], has[1] + no[1], has[2] + no[2],
            {"HasAns": has, "NoAns": no} if v2 else None,
        )
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
