"""Scoring a causal LM on multiple-choice questions: option log-likelihoods and greedy answers.

Pure torch over a Hugging Face causal LM (plain, PEFT-wrapped or with this project's layers);
no Lightning.

``choice``: the log-likelihood of each option's continuation (``the correct answer is
answer3`` after the prompt), summed over its tokens, as evaluation harnesses score multiple
choice; the highest wins. Options that share all but their last token (every LLM-Adapters
answer word: `` answer`` + ``1``..``5``) are scored from one forward pass of the prompt plus
the shared tokens; others get one sequence each. Sequences are left-padded (explicit position
ids) so that only the last positions' logits are computed.

``generate``: greedy decoding (LLM-Adapters decodes 32 new tokens), the new tokens decoded
for :func:`app.data.commonsense.extract_answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Entry:
    """One sequence to run: ``ids[n_context:]`` are scored; ``candidates`` (if any) are next
    tokens scored at the last position, one result per candidate."""

    question: int
    ids: list[int]
    n_context: int
    candidates: list[int] | None
    option: int = 0  # for entries without candidates


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def plan_entries(prompts: Sequence[Sequence[int]],
                 options: Sequence[Sequence[Sequence[int]]]) -> list[_Entry]:
    """The sequences :func:`choice_logprobs` runs (exposed for tests)."""
    entries: list[_Entry] = []
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        if not opts or any(len(o) == 0 for o in opts):
            raise ValueError(f"question {q}: every option needs at least one token")
        shared = min(_common_prefix(opts), min(len(o) for o in opts) - 1)
        if len(opts) > 1 and all(len(o) == shared + 1 for o in opts):
            entries.append(_Entry(q, list(prompt) + list(opts[0][:shared]), len(prompt),
                                  [o[shared] for o in opts]))
        else:
            entries.extend(_Entry(q, list(prompt) + list(o), len(prompt), None, k)
                           for k, o in enumerate(opts))
    return entries


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def choice_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                    options: Sequence[Sequence[Sequence[int]]], pad_id: int,
                    batch_size: int = 16) -> list[torch.Tensor]:
    """``log p(option tokens | prompt)`` of every option of every question.

    Args:
        model: A causal LM (``model(input_ids, attention_mask, position_ids,
            logits_to_keep)`` returning ``.logits``).
        prompts: Token ids of each question's context.
        options: Per question, each option's continuation token ids.
        pad_id: Padding token (masked out; any id works).
        batch_size: Sequences per forward pass.

    Returns:
        Per question a float64 tensor of one summed log-probability per option.
    """
    entries = plan_entries(prompts, options)
    scores: list[torch.Tensor] = [torch.zeros(len(o), dtype=torch.float64) for o in options]
    device = _model_device(model)
    order = sorted(range(len(entries)), key=lambda i: len(entries[i].ids))  # less padding
    for start in range(0, len(order), batch_size):
        chunk = [entries[i] for i in order[start:start + batch_size]]
        ids, mask, positions = _left_pad([e.ids for e in chunk], pad_id, device)
        # Scored targets are ids[n_context:], predicted from the position before each; with
        # candidates the last position predicts them too.
        keep = max(len(e.ids) - e.n_context + 1 for e in chunk)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       logits_to_keep=keep).logits[:, -keep:].double()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for row, e in enumerate(chunk):
            targets = e.ids[e.n_context:]
            # Position j of `logp` (of `keep`) predicts the token at sequence offset
            # len - keep + j + 1; the target at offset n_context + t sits at
            # j = n_context + t - 1 - (len - keep).
            first = e.n_context - 1 - (len(e.ids) - keep)
            base = sum(float(logp[row, first + t, tok]) for t, tok in enumerate(targets))
            if e.candidates is None:
                scores[e.question][e.option] = base
            else:
                last = logp[row, -1]
                scores[e.question] = torch.tensor([base + float(last[c]) for c in e.candidates],
                                                  dtype=torch.float64)
    return scores


@torch.no_grad()
def greedy_continuations(model: Any, prompts: Sequence[Sequence[int]], pad_id: int,
                         eos_id: int | None, max_new_tokens: int = 32,
                         batch_size: int = 8) -> list[list[int]]:
    """Greedy decoding of up to ``max_new_tokens`` after each prompt (left-padded batches).

    Returns:
        The new tokens of each prompt, cut after the first end-of-sequence token.
    """
    device = _model_device(model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask, _ = _left_pad([list(prompts[i]) for i in rows], pad_id, device)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=eos_id, num_beams=1, temperature=None,
                                   top_p=None, top_k=None)
        for row, i in enumerate(rows):
            new = generated[row, ids.shape[1]:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            out[i] = new
    return out
