"""Instruction records ``{instruction, input, output}``: reading, prompting, tokenising.

Pure functions, no Lightning. Records come in the Alpaca / LLM-Adapters layouts: a JSON list
of objects (``alpaca_data.json``, LLM-Adapters' ``dataset/<task>/{train,test}.json``) or JSON
Lines (one object per line). ``input`` may be missing or empty; extra fields (``answer``) are
kept.

Prompts follow the template of LLM-Adapters (Hu et al. 2023), which the DoRA and StelLA
commonsense experiments use verbatim, including its indentation inside the prompt (their
``generate_prompt`` is an indented triple-quoted string; the fine-tuned models saw exactly
that text, so it is reproduced rather than tidied). ``template="chat"`` uses the tokenizer's
chat template instead (one user turn holding instruction and input, the output as the
assistant turn).

Tokenising keeps prompt and response apart: ``labels`` are ``-100`` on every prompt token,
so the loss covers the response tokens (and the end-of-sequence token) only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.errors import ConfigError

Template = Literal["llm_adapters", "chat"]
IGNORE_INDEX = -100

_INDENT = " " * 16
LLM_ADAPTERS_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
LLM_ADAPTERS_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)


def read_records(path: str | Path, option: str = "data.init_args.train_files"
                 ) -> list[dict[str, Any]]:
    """Read a JSON list or JSON Lines file of instruction records and validate them.

    Args:
        path: The file.
        option: The config option that named it (for messages).

    Raises:
        ConfigError: Missing file, unreadable JSON, or a record without a string
            ``instruction`` / ``output``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option}: {path} does not exist (expected a JSON list or JSON Lines "
                          "file of {instruction, input, output} records)")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option}: {path} is neither a JSON list nor JSON Lines ({err})"
                          ) from None
    return validate_records(records, str(path), option)


def validate_records(records: Iterable[Any], source: str, option: str) -> list[dict[str, Any]]:
    """Check every record has string ``instruction`` and ``output``; fill a missing ``input``.

    Raises:
        ConfigError: Naming the source, the first bad record's index and what it lacks.
    """
    out: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(f"{option}: record {index} of {source} is a "
                              f"{type(record).__name__}, not an object with instruction/output")
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise ConfigError(
                f"{option}: record {index} of {source} has no string {' / '.join(missing)} "
                f"(keys: {sorted(record)}); every record needs instruction and output "
                "(input optional), the Alpaca / LLM-Adapters layout")
        record = dict(record)
        record["input"] = record.get("input") or ""
        out.append(record)
    if not out:
        raise ConfigError(f"{option}: {source} holds no records")
    return out


def llm_adapters_prompt(instruction: str, input_text: str = "") -> str:
    """The LLM-Adapters prompt (everything before the response)."""
    if input_text:
        return LLM_ADAPTERS_WITH_INPUT.format(instruction=instruction, input=input_text)
    return LLM_ADAPTERS_NO_INPUT.format(instruction=instruction)


def chat_prompt(tokenizer: Any, instruction: str, input_text: str = "") -> str:
    """The tokenizer's chat template for one user turn, ending where the assistant starts.

    Raises:
        ConfigError: The tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.init_args.template=chat but the tokenizer has no chat template; "
                          "use template: llm_adapters")
    content = prompt_content({"instruction": instruction, "input": input_text})
    return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)


def build_prompt(tokenizer: Any, record: dict[str, Any], template: Template) -> str:
    """The prompt text of a record under ``template``."""
    if template == "chat":
        return chat_prompt(tokenizer, record["instruction"], record.get("input", ""))
    if template != "llm_adapters":
        raise ConfigError(f"data.init_args.template={template!r}: choose llm_adapters or chat")
    return llm_adapters_prompt(record["instruction"], record.get("input", ""))


def prompt_ids(tokenizer: Any, prompt: str, template: Template = "llm_adapters") -> list[int]:
    """Prompt tokens, with the tokenizer's leading special tokens (BOS) where it adds them;
    none for ``chat``, whose template writes its own."""
    ids = tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]
    sep = getattr(tokenizer, "sep_token_id", None)
    # BERT-style post-processors append [SEP]: a prompt must end where the response starts.
    if sep is not None and ids and ids[-1] == sep and len(ids) > 1:
        ids = ids[:-1]
    return list(ids)


def response_ids(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Response tokens (no special tokens) plus the end-of-sequence token."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        ids.append(eos)
    return ids


@dataclass
class Tokenised:
    """One training example: ``labels`` is ``-100`` on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenise_example(prompt: list[int], response: list[int], max_length: int) -> Tokenised:
    """Concatenate prompt and response tokens, mask the prompt, cut at ``max_length``.

    Like LLM-Adapters (``cutoff_len``), too long examples are cut on the right, so the end of
    the response (and its end-of-sequence token) is what is lost.
    """
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + list(response)
    truncated = len(ids) > max_length
    return Tokenised(ids[:max_length], labels[:max_length], truncated)


def chat_response(tokenizer: Any, record: dict[str, Any], prompt: str) -> str | None:
    """The assistant turn of the chat template as text after ``prompt`` (``None``: not a
    prefix, use the plain output plus EOS)."""
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_content(record)},
         {"role": "assistant", "content": record["output"]}], tokenize=False)
    return full[len(prompt):] if full.startswith(prompt) else None


def prompt_content(record: dict[str, Any]) -> str:
    """The user-turn text of a record (instruction, then input)."""
    return (f"{record['instruction']}\n\n{record['input']}" if record.get("input")
            else record["instruction"])
