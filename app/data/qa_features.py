"""Windowed features for extractive QA, the Hugging Face way.

Question first, context second (reversed for tokenizers that pad on the left), the context
truncated with ``truncation="only_second"`` and split into overlapping windows of
``max_length`` tokens that share ``doc_stride`` tokens (``return_overflowing_tokens`` with
``stride=doc_stride``). One example can therefore give several features.

``doc_stride=0`` means "no windows": an example whose context does not fit in one window
raises a ValueError instead of being truncated silently.

Training features carry ``start_positions`` / ``end_positions`` (the CLS index, 0 for
BERT-like tokenizers, when the answer is not wholly inside the window or the question is
unanswerable). Examples whose answer could not be located in the context
(``answer_starts == [UNLOCATED]``, see :mod:`app.data.qa_formats`) are dropped.

Evaluation features keep ``example_id``, ``cls_index`` and ``offset_mapping`` with the
offsets of every non-context token set to None, which is what
:func:`app.metrics.qa_postprocess.postprocess_predictions` reads. Drop those columns before
collating model inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from app.data.qa_formats import UNLOCATED, QAExample

Features = dict[str, list[Any]]


def _check_args(tokenizer: PreTrainedTokenizerBase, max_length: int, doc_stride: int) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; QA windowing needs offset "
            "mappings (load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if doc_stride < 0:
        raise ValueError(f"doc_stride must be >= 0, got {doc_stride}")


def _tokenize(
    examples: Sequence[QAExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    doc_stride: int,
    padding: bool | str,
) -> tuple[Any, int]:
    """Tokenize into windows; returns the encoding and the index of the context sequence."""
    _check_args(tokenizer, max_length, doc_stride)
    pad_on_right = tokenizer.padding_side == "right"
    # Some SQuAD questions start with a lot of whitespace that only wastes window room.
    questions = [ex.question.lstrip() for ex in examples]
    contexts = [ex.context for ex in examples]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    q_lens = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for ex, q_len in zip(examples, q_lens, strict=True):
        room = max_length - q_len - specials
        if room <= 0:
            raise ValueError(
                f"question {ex.id!r} has {q_len} tokens, which with {specials} special tokens "
                f"leaves no room for context in max_length={max_length}; raise max_length"
            )
        if doc_stride >= room and doc_stride > 0:
            raise ValueError(
                f"doc_stride={doc_stride} must be smaller than max_length - question length "
                f"- special tokens = {max_length} - {q_len} - {specials} = {room} "
                f"(question {ex.id!r}); lower doc_stride or raise max_length"
            )
    first, second = (questions, contexts) if pad_on_right else (contexts, questions)
    enc = tokenizer(
        first,
        second,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )
    if doc_stride == 0:
        mapping = enc["overflow_to_sample_mapping"]
        for i in range(1, len(mapping)):
            if mapping[i] == mapping[i - 1]:
                ex = examples[mapping[i]]
                n_ctx = len(tokenizer(ex.context, add_special_tokens=False)["input_ids"])
                raise ValueError(
                    f"doc_stride=0 but the context of question {ex.id!r} has {n_ctx} tokens, "
                    f"more than fit beside its {q_lens[mapping[i]]}-token question in "
                    f"max_length={max_length}; set doc_stride > 0 to split it into windows"
                )
    return enc, 1 if pad_on_right else 0


def _cls_index(input_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> int:
    cls = tokenizer.cls_token_id
    if cls is not None and cls in input_ids:
        return list(input_ids).index(cls)
    return 0


def _model_inputs(enc: Any, keep: Sequence[int]) -> Features:
    out: Features = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in enc:
            out[key] = [enc[key][i] for i in keep]
    return out


def prepare_train_features(
    examples: Sequence[QAExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    padding: bool | str = "max_length",
) -> Features:
    """Tokenize examples into training windows with start/end token labels.

    Args:
        examples: The examples. Only the first gold answer is used as the label.
        tokenizer: A fast tokenizer (offset mappings are required).
        max_length: Tokens per window, question and special tokens included.
        doc_stride: Tokens shared by consecutive windows; 0 disables windowing.
        padding: Passed to the tokenizer (``"max_length"`` gives fixed-size windows).

    Returns:
        Columns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
        makes them), ``start_positions``, ``end_positions``, one row per window.

    Raises:
        ValueError: Bad ``doc_stride`` / ``max_length`` for some example (named), or a slow
            tokenizer.
    """
    enc, ctx_seq = _tokenize(examples, tokenizer, max_length, doc_stride, padding)
    keep: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        if ex.is_impossible or not ex.answers:
            keep.append(i)
            starts.append(cls)
            ends.append(cls)
            continue
        start_char = ex.answer_starts[0]
        if start_char == UNLOCATED:
            continue
        end_char = start_char + len(ex.answers[0])
        seq_ids = enc.sequence_ids(i)
        ctx = [k for k, s in enumerate(seq_ids) if s == ctx_seq]
        keep.append(i)
        if not ctx or not (offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char):
            starts.append(cls)
            ends.append(cls)
            continue
        first, last = ctx[0], ctx[-1]
        tok_start = first
        while tok_start <= last and offsets[tok_start][0] <= start_char:
            tok_start += 1
        tok_end = last
        while tok_end >= first and offsets[tok_end][1] >= end_char:
            tok_end -= 1
        starts.append(tok_start - 1)
        ends.append(tok_end + 1)
    out = _model_inputs(enc, keep)
    out["start_positions"] = starts
    out["end_positions"] = ends
    return out


def prepare_eval_features(
    examples: Sequence[QAExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    padding: bool | str = "max_length",
) -> Features:
    """Tokenize examples into evaluation windows that can be decoded back to text.

    Args:
        examples: The examples.
        tokenizer: A fast tokenizer (offset mappings are required).
        max_length: Tokens per window, question and special tokens included.
        doc_stride: Tokens shared by consecutive windows; 0 disables windowing.
        padding: Passed to the tokenizer.

    Returns:
        The model input columns plus ``example_id``, ``cls_index`` and ``offset_mapping``
        (``(start, end)`` character offsets into the context, None outside the context).

    Raises:
        ValueError: Bad ``doc_stride`` / ``max_length`` for some example (named), or a slow
            tokenizer.
    """
    enc, ctx_seq = _tokenize(examples, tokenizer, max_length, doc_stride, padding)
    keep = list(range(len(enc["input_ids"])))
    out = _model_inputs(enc, keep)
    out["example_id"] = [examples[j].id for j in enc["overflow_to_sample_mapping"]]
    out["cls_index"] = [_cls_index(ids, tokenizer) for ids in enc["input_ids"]]
    out["offset_mapping"] = [
        [tuple(o) if s == ctx_seq else None for o, s in zip(offs, enc.sequence_ids(i), strict=True)]
        for i, offs in enumerate(enc["offset_mapping"])
    ]
    return out
