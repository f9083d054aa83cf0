"""The eight commonsense-reasoning tasks in the LLM-Adapters format, and their answer rules.

Hu et al. 2023 (LLM-Adapters) turned BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c
and OBQA into instruction records whose ``output`` is ``the correct answer is <answer>`` and
whose ``answer`` is one word of the task's vocabulary (``true``/``false``, ``solution1``/
``solution2``, ``answer1``..``answer5``, ``ending1``..``ending4``, ``option1``/``option2``).
DoRA and StelLA report accuracy on these files with LLM-Adapters' evaluation, reproduced by
:func:`extract_answer`: the first vocabulary word found in the generated text (none: wrong).

The folder names below are LLM-Adapters' ``dataset/<task>/`` names; they are the task keys
(``test/acc/ARC-Easy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ConfigError

#: What every LLM-Adapters commonsense output starts with.
RESPONSE_PREFIX = "the correct answer is "


@dataclass(frozen=True)
class CommonsenseTask:
    """One benchmark task.

    Attributes:
        name: LLM-Adapters folder name and metric key.
        vocabulary: The task's answer words, in extraction order.
    """

    name: str
    vocabulary: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        """LLM-Adapters' extraction regex: any vocabulary word, leftmost match first."""
        return re.compile("|".join(re.escape(w) for w in self.vocabulary))


_ANSWERS5 = tuple(f"answer{i}" for i in range(1, 6))
TASKS: dict[str, CommonsenseTask] = {t.name: t for t in (
    CommonsenseTask("boolq", ("true", "false")),
    CommonsenseTask("piqa", ("solution1", "solution2")),
    CommonsenseTask("social_i_qa", _ANSWERS5),
    CommonsenseTask("hellaswag", tuple(f"ending{i}" for i in range(1, 5))),
    CommonsenseTask("winogrande", ("option1", "option2")),
    CommonsenseTask("ARC-Easy", _ANSWERS5),
    CommonsenseTask("ARC-Challenge", _ANSWERS5),
    CommonsenseTask("openbookqa", _ANSWERS5),
)}

_FORMAT_LINE = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)+)")


def get_task(name: str, option: str = "data.init_args.test_tasks") -> CommonsenseTask:
    """The task called ``name``.

    Raises:
        ConfigError: Unknown name, listing the known ones.
    """
    if name not in TASKS:
        raise ConfigError(f"{option}: unknown commonsense task {name!r}; choose from "
                          f"{', '.join(TASKS)}")
    return TASKS[name]


def extract_answer(task: str, text: str) -> str:
    """LLM-Adapters' answer extraction: the first vocabulary word in ``text`` (``""``: none).

    Matching is case-sensitive and ignores word boundaries, exactly as their
    ``re.findall(r'solution1|solution2', sentence)`` (so ``"solution12"`` reads as
    ``solution1``).
    """
    found = get_task(task, "task").pattern.search(text.strip())
    return found.group(0) if found else ""


def answer_options(instruction: str, task: str | None = None) -> list[str]:
    """The answer words a question offers.

    Read from the instruction's ``Answer format: a/b/c`` line (ARC questions offer three to
    five answers); without one, the task's whole vocabulary.

    Raises:
        ConfigError: Neither a format line nor a known task.
    """
    found = _FORMAT_LINE.search(instruction)
    if found:
        return found.group(1).split("/")
    if task is not None and task in TASKS:
        return list(TASKS[task].vocabulary)
    raise ConfigError(f"cannot tell the answer options of a record without an 'Answer format:' "
                      f"line or a known task ({instruction[:80]!r})")


def task_file(data_dir: str | Path, task: str, split: str) -> Path:
    """``<data_dir>/<task>/<split>.json`` (LLM-Adapters' layout)."""
    return Path(data_dir) / task / f"{split}.json"


def missing_file_message(path: Path, task: str, option: str) -> str:
    """The message for a benchmark file that is not there."""
    return (f"{option}: {task} has no file {path}; put LLM-Adapters' dataset/{task}/"
            f"{path.name} there or leave {task} out (offline data: ../shared/data/commonsense, "
            "seven test sets, no HellaSwag)")


def encode_question(tokenizer: Any, record: dict[str, Any], task: str | None,
                    template: str = "llm_adapters") -> dict[str, Any]:
    """Token ids for scoring one benchmark record.

    Returns:
        ``prompt_ids``; ``option_ids`` (per option, the tokens of ``the correct answer is
        <option>`` as training tokenises a response, without EOS); ``options``; ``gold`` (index
        of ``record["answer"]`` among the options, -1 when absent).
    """
    from app.data.instruction_formats import build_prompt, prompt_ids, response_ids

    options = answer_options(record["instruction"], task)
    prompt = prompt_ids(tokenizer, build_prompt(tokenizer, record, template),  # type: ignore
                        template)  # type: ignore
    option_ids = [response_ids(tokenizer, RESPONSE_PREFIX + o, add_eos=False) for o in options]
    answer = record.get("answer")
    return {"prompt_ids": prompt, "option_ids": option_ids, "options": options,
            "gold": options.index(answer) if answer in options else -1}
