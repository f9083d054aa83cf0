"""The official SQuAD v2.0 evaluation, written from the published script's definitions.

``python bench/squad_v2_eval.py RUN/gold_test.json RUN/predictions_test.json`` prints the
same JSON summary as the official ``evaluate-v2.0.py`` (``exact``, ``f1``, ``total``,
``HasAns_*``, ``NoAns_*``) for the questions of the gold file. Independent of ``app`` on
purpose: the test that checks the project's logged EM / F1 against it must not share code
with the metric it checks. What it follows from the official script:

- answer normalisation: lower case; drop every ASCII punctuation character; replace the
  articles ``a``, ``an``, ``the`` (whole words) by a space; split on whitespace and re-join
  with single spaces;
- tokens of a text: its normalised form split on whitespace (none for an empty text);
- exact match: the normalised texts are equal (0/1);
- F1: with no tokens on either side, 1 if both are empty else 0; otherwise from the
  multiset overlap of tokens, precision and recall, 0 when nothing overlaps;
- gold answers of a question: the texts that do not normalise to the empty string; none left
  (an unanswerable question) means the only gold answer is ``""``; a question's score is the
  maximum over its gold answers;
- a question of the gold file without a prediction is reported missing and has no score:
  the overall summary averages over the scored questions only, and the ``HasAns`` /
  ``NoAns`` summaries (over every question of their kind) fail on it, as the official
  script's do;
- no null-answer probabilities: every prediction stands (threshold 1.0 over zero odds);
- summary: 100 * mean, then the same over the questions with gold answers (``HasAns``) and
  without (``NoAns``), each with its count.
"""

from __future__ import annotations

import collections
import json
import re
import string
import sys
from pathlib import Path
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    """Lower, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize(text).split() if text else []


def exact(gold: str, pred: str) -> int:
    return int(normalize(gold) == normalize(pred))


def f1(gold: str, pred: str) -> float:
    g, p = tokens(gold), tokens(pred)
    if not g or not p:
        return float(g == p)
    overlap = sum((collections.Counter(g) & collections.Counter(p)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


def evaluate(gold_file: dict[str, Any], preds: dict[str, str]) -> dict[str, float]:
    """The official summary for ``gold_file`` (parsed SQuAD JSON) and ``preds``."""
    has_answer: dict[str, bool] = {}
    em: dict[str, float] = {}
    f: dict[str, float] = {}
    for article in gold_file["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                golds = [a["text"] for a in qa["answers"] if normalize(a["text"])] or [""]
                has_answer[qid] = bool(qa["answers"])
                if qid not in preds:
                    print(f"missing prediction for {qid}", file=sys.stderr)
                    continue
                em[qid] = max(exact(g, preds[qid]) for g in golds)
                f[qid] = max(f1(g, preds[qid]) for g in golds)

    def summary(ids: list[str]) -> dict[str, float]:
        n = len(ids)
        return {"exact": 100.0 * sum(em[i] for i in ids) / n,
                "f1": 100.0 * sum(f[i] for i in ids) / n, "total": n}

    out = summary(list(em))
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [i for i, has in has_answer.items() if has == wanted]
        if ids:
            out.update({f"{name}_{k}": v for k, v in summary(ids).items()})
    return out


def main(argv: list[str]) -> None:
    gold, preds = (json.loads(Path(p).read_text()) for p in argv[:2])
    print(json.dumps(evaluate(gold, preds), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
