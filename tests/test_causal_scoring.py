"""Commonsense answer extraction and option scoring of causal LMs, against hand computations."""

from __future__ import annotations

import pytest
import torch

from app.data.commonsense import TASKS, answer_options, extract_answer, get_task
from app.errors import ConfigError
from app.metrics.causal_scoring import choice_logprobs, greedy_continuations, plan_entries


@pytest.mark.parametrize(("task", "text", "want"), [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "True, no: the answer is true or false", "true"),  # case-sensitive, first match
    ("boolq", "I cannot tell", ""),
    ("piqa", "the correct answer is solution2.", "solution2"),
    ("piqa", "solution12 then solution2", "solution1"),  # no word boundaries, like theirs
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer format: answer5/answer1", "answer5"),
    ("ARC-Easy", "  the correct answer is answer4\n", "answer4"),
    ("ARC-Challenge", "answer 2", ""),
    ("openbookqa", "Answer1 is wrong, answer2 is right", "answer2"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5 ending3", "ending3"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "option 2", ""),
])
def test_answer_extraction(task: str, text: str, want: str) -> None:
    assert extract_answer(task, text) == want


def test_every_task_has_a_vocabulary_case() -> None:
    assert set(TASKS) == {"boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                          "ARC-Easy", "ARC-Challenge", "openbookqa"}
    with pytest.raises(ConfigError, match="unknown commonsense task 'mmlu'.*boolq"):
        get_task("mmlu")


def test_answer_options_from_the_format_line() -> None:
    assert answer_options("Q?\n\nAnswer format: answer1/answer2/answer3") == [
        "answer1", "answer2", "answer3"]
    assert answer_options("Q? Option1: a Option2: b Answer format: option1/option2") == [
        "option1", "option2"]
    assert answer_options("no format line", "piqa") == ["solution1", "solution2"]
    with pytest.raises(ConfigError, match="Answer format"):
        answer_options("no format line")


class _Toy(torch.nn.Module):
    """A tiny causal LM that ignores padding: each position sees the masked running mean of
    token and position embeddings up to itself, so scores depend on the whole context."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.pos = torch.nn.Embedding(64, 8)
        self.out = torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        x = self.emb(input_ids) + self.pos(position_ids)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        mask = mask.unsqueeze(-1).float()
        h = (x * mask).cumsum(1) / mask.cumsum(1).clamp(min=1)
        logits = self.out(torch.tanh(h))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]

        class Out:
            pass

        o = Out()
        o.logits = logits
        return o


def _by_hand(model: torch.nn.Module, prompt: list[int], option: list[int]) -> float:
    """One unpadded forward of prompt + option; sum of log p of the option tokens."""
    ids = torch.tensor([prompt + option])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(option))


def test_choice_scores_match_hand_computation() -> None:
    model = _Toy().eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 1], [2]]
    options = [
        [[9, 10, 3], [9, 10, 4]],          # shared prefix, last token differs: one forward
        [[3], [4], [5]],                   # single-token options: one forward
        [[3, 4], [5, 6, 7]],               # different lengths: one sequence per option
        [[8, 1], [8, 2, 2], [8, 1, 1]],    # mixed
    ]
    plan = plan_entries(prompts, options)
    assert [e.candidates is not None for e in plan] == [True, True, False, False, False,
                                                        False, False]
    for batch_size in (1, 3, 16):
        got = choice_logprobs(model, prompts, options, pad_id=0, batch_size=batch_size)
        for q, (prompt, opts) in enumerate(zip(prompts, options)):
            want = torch.tensor([_by_hand(model, prompt, o) for o in opts], dtype=torch.float64)
            torch.testing.assert_close(got[q], want, atol=1e-5, rtol=0)
            assert int(got[q].argmax()) == int(want.argmax())


def test_choice_scores_on_a_real_llama(tiny_causal) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal("llama")).eval()
    prompts = [[2, 10, 11, 12, 13], [2, 14, 15]]
    options = [[[20, 21, 30], [20, 21, 31]], [[40], [41, 42]]]
    got = choice_logprobs(model, prompts, options, pad_id=0, batch_size=4)
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        want = torch.tensor([_by_hand(model, prompt, o) for o in opts], dtype=torch.float64)
        torch.testing.assert_close(got[q], want, atol=1e-4, rtol=0)


def test_greedy_continuations_equal_a_manual_greedy_loop(tiny_causal) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal("llama")).eval()
    prompts = [[2, 10, 11, 12, 13, 14], [2, 15]]
    got = greedy_continuations(model, prompts, pad_id=0, eos_id=None, max_new_tokens=5,
                               batch_size=2)
    for prompt, new in zip(prompts, got):
        ids = list(prompt)
        for _ in range(5):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        assert new == ids[len(prompt):]
