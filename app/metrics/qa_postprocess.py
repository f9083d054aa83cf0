"""Turn start/end logits over QA windows back into answer strings.

For every example, the ``n_best_size`` best start and end tokens of each of its windows
are paired; pairs outside the context, reversed, or longer than ``max_answer_length``
tokens are skipped, and the pair with the highest ``start_logit + end_logit`` over all
windows wins. With ``version_2_with_negative`` the null answer (score of the CLS token in
the window where it is lowest, as in the original BERT and Hugging Face code) wins when
``null_score - best_non_null_score > null_score_diff_threshold``.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.data.qa_formats import QAExample


def _row(logits: Any, i: int) -> np.ndarray:
    row = logits[i]
    if hasattr(row, "detach"):
        row = row.detach().float().cpu().numpy()
    return np.asarray(row, dtype=np.float64)


def postprocess_predictions(
    examples: Sequence[QAExample],
    features: Mapping[str, Sequence[Any]],
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Decode the best answer of every example from the logits of its windows.

    Args:
        examples: The examples the features were built from.
        features: Output of ``prepare_eval_features`` (or a ``datasets.Dataset`` of it):
            ``example_id`` and ``offset_mapping`` are read, ``cls_index`` if present.
        start_logits: ``(num_features, seq_len)`` array or tensor, or one row per feature.
        end_logits: Same shape as ``start_logits``.
        n_best_size: Start and end candidates per window.
        max_answer_length: Longest answer in tokens.
        version_2_with_negative: Whether the null answer may be predicted.
        null_score_diff_threshold: Margin by which the null score must beat the best span.

    Returns:
        Question id to answer text (``""`` for no answer), for every example.

    Raises:
        ValueError: Feature and logit counts differ, or a feature names an unknown example.
    """
    example_ids = list(features["example_id"])
    offsets_all = features["offset_mapping"]
    columns = getattr(features, "column_names", None) or list(features.keys())
    cls_all = features["cls_index"] if "cls_index" in columns else None
    if not (len(example_ids) == len(start_logits) == len(end_logits)):
        raise ValueError(
            f"{len(example_ids)} features but {len(start_logits)} start and "
            f"{len(end_logits)} end logit rows"
        )
    by_example: dict[str, list[int]] = collections.defaultdict(list)
    known = {ex.id for ex in examples}
    for i, eid in enumerate(example_ids):
        if eid not in known:
            raise ValueError(f"feature {i} belongs to unknown example {eid!r}")
        by_example[eid].append(i)

    preds: dict[str, str] = {}
    for ex in examples:
        best_score, best_text = -np.inf, ""
        null_score = np.inf
        for i in by_example.get(ex.id, []):
            starts, ends = _row(start_logits, i), _row(end_logits, i)
            offsets = offsets_all[i]
            n = min(len(offsets), len(starts), len(ends))
            cls = int(cls_all[i]) if cls_all is not None else 0
            null_score = min(null_score, float(starts[cls] + ends[cls]))
            top_s = np.argsort(starts[:n])[::-1][:n_best_size]
            top_e = np.argsort(ends[:n])[::-1][:n_best_size]
            for s in top_s:
                if offsets[s] is None:
                    continue
                for e in top_e:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_score = score
                        best_text = ex.context[offsets[s][0] : offsets[e][1]]
        if version_2_with_negative and (
            best_score == -np.inf or null_score - best_score > null_score_diff_threshold
        ):
            preds[ex.id] = ""
        else:
            preds[ex.id] = best_text
    return preds


def write_predictions_json(preds: Mapping[str, str], path: str | Path) -> Path:
    """Write ``{question id: answer}`` as the official evaluation scripts read it.

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so readers never see a half-written file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(preds), f, ensure_ascii=False, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def gold_squad_json(examples: Sequence[QAExample], version_2: bool) -> dict[str, Any]:
    """The evaluated questions as an official SQuAD JSON file (``{"version", "data"}``).

    One article per ``title``, one paragraph per distinct context, in first-seen order; each
    question keeps its id, text, gold answers (text and ``answer_start``) and, for v2.0,
    ``is_impossible``. The official evaluation script run on this file and the predictions
    scores exactly the questions the run scored.
    """
    articles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for ex in examples:
        paragraphs = articles.setdefault(ex.title, {})
        qa: dict[str, Any] = {
            "id": ex.id, "question": ex.question,
            "answers": [{"text": t, "answer_start": int(s)}
                        for t, s in zip(ex.answers, ex.answer_starts)]}
        if version_2:
            qa["is_impossible"] = bool(ex.is_impossible)
        paragraphs.setdefault(ex.context, []).append(qa)
    data = [{"title": title, "paragraphs": [{"context": c, "qas": q} for c, q in paras.items()]}
            for title, paras in articles.items()]
    return {"version": "v2.0" if version_2 else "1.1", "data": data}
