"""Instruction data: records, the LLM-Adapters prompt, label masking token by token,
truncation, several files mixed, the benchmark files, and the bad inputs that stop a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_causal import write_commonsense

from app.data.instruction_formats import (
    IGNORE_INDEX,
    llm_adapters_prompt,
    prompt_ids,
    read_records,
    response_ids,
)
from app.data.instructions import InstructionDataModule
from app.errors import ConfigError


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("cs"),
                             {"boolq": (30, 6), "ARC-Easy": (30, 6), "hellaswag": (0, 5)})


def _dm(ckpt: Path, cs_dir: Path, **kw) -> InstructionDataModule:
    kw.setdefault("test_tasks", ["boolq", "ARC-Easy", "hellaswag"])
    dm = InstructionDataModule(data_dir=str(cs_dir), checkpoint=str(ckpt), val_size=6, **kw)
    dm.setup("fit")
    return dm


def test_llm_adapters_prompt_is_the_papers_text() -> None:
    assert llm_adapters_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n\n                ### Instruction:\n                Q?\n\n"
        "                ### Response:\n                ")
    with_input = llm_adapters_prompt("Q?", "ctx")
    assert "paired with an input" in with_input
    assert "### Input:\n                ctx\n\n" in with_input


def test_labels_mask_prompt_and_padding_token_by_token(tiny_causal, cs_dir: Path) -> None:
    dm = _dm(tiny_causal("llama"), cs_dir)
    tok = dm.tokenizer
    records = dm.split(dm.training_records())[0]
    batch = dm.train_dataloader().collate_fn(dm.train_data[:4])
    for row, record in enumerate(records[:4]):
        prompt = prompt_ids(tok, llm_adapters_prompt(record["instruction"]))
        response = response_ids(tok, record["output"])
        n = len(prompt) + len(response)
        ids, labels, mask = (batch[k][row].tolist() for k in
                             ("input_ids", "labels", "attention_mask"))
        assert ids[:n] == prompt + response
        for i in range(len(ids)):
            if i < len(prompt):
                assert labels[i] == IGNORE_INDEX, i  # prompt
            elif i < n:
                assert labels[i] == ids[i], i  # response, EOS last
            else:
                assert (labels[i], mask[i], ids[i]) == (IGNORE_INDEX, 0, tok.pad_token_id)
        assert labels[n - 1] == tok.eos_token_id
        assert tok.decode([t for t in labels if t != IGNORE_INDEX],
                          skip_special_tokens=True) == record["output"]
        assert sum(mask[:n]) == n


def test_truncation_is_counted_and_empty_examples_dropped(tiny_causal, cs_dir: Path,
                                                          caplog) -> None:
    full = _dm(tiny_causal("llama"), cs_dir)
    lengths = sorted(len(e["input_ids"]) for e in full.train_data)
    cut = lengths[len(lengths) // 2]
    caplog.set_level(logging.INFO)
    dm = _dm(tiny_causal("llama"), cs_dir, max_length=cut)
    want = sum(n > cut for n in lengths)
    assert dm.truncated == want > 0
    assert all(len(e["input_ids"]) <= cut for e in dm.train_data)
    assert f"max_length={cut}: {want} truncated" in caplog.text
    short = min(len(e["labels"]) - e["labels"].count(IGNORE_INDEX) for e in full.train_data)
    prompts = sorted(len(e["labels"]) - short for e in full.train_data)
    some = _dm(tiny_causal("llama"), cs_dir, max_length=prompts[len(prompts) // 2])
    assert 0 < len(some.train_data) < len(full.train_data)  # prompt-only examples dropped
    assert all(any(t != IGNORE_INDEX for t in e["labels"]) for e in some.train_data)
    with pytest.raises(ConfigError, match="max_length=8: all 54 training prompts"):
        _dm(tiny_causal("llama"), cs_dir, max_length=8)


def test_files_are_mixed_and_jsonl_read(tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(json.dumps({"instruction": f"say {w}", "output": w})
                               for w in ("dog", "cat", "car")) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "add", "input": "1 2", "output": "3"}]))
    dm = InstructionDataModule(data_dir=str(cs_dir), checkpoint=str(tiny_causal("llama")),
                               train_files=[str(extra), str(alpaca)], test_tasks=["boolq"])
    records = dm.training_records()
    assert len(records) == 30 + 30 + 3 + 1
    assert {r["task"] for r in records} == {"boolq", "ARC-Easy", None}
    assert records[-1]["input"] == "1 2" and records[-2]["input"] == ""
    only = InstructionDataModule(task="instructions", data_dir=None, val_size=1,
                                 checkpoint=str(tiny_causal("llama")),
                                 train_files=[str(extra), str(alpaca)])
    only.setup("fit")
    assert len(only.train_data) + len(only.val_data) == 4


def test_benchmark_items_including_hellaswag(tiny_causal, cs_dir: Path) -> None:
    dm = _dm(tiny_causal("llama"), cs_dir, max_test_samples=4)
    by_task: dict[str, list] = {}
    for item in dm.test_data:
        by_task.setdefault(item["task"], []).append(item)
    assert {k: len(v) for k, v in by_task.items()} == {"boolq": 4, "ARC-Easy": 4,
                                                       "hellaswag": 4}
    hs = json.loads((cs_dir / "hellaswag" / "test.json").read_text())
    for item in by_task["hellaswag"]:
        assert item["options"] == ["ending1", "ending2", "ending3", "ending4"]
        assert item["options"][item["gold"]] == hs[item["index"]]["answer"]
    assert by_task["boolq"][0]["options"] == ["true", "false"]
    # validation items are scored too: held-out training records have answers
    assert all(item["option_ids"] for item in dm.val_data)
    batch = dm.val_dataloader().collate_fn(dm.val_data[:2])
    assert isinstance(batch["labels"], torch.Tensor) and len(batch["option_ids"]) == 2


def test_chat_template_option(tiny_causal, cs_dir: Path) -> None:
    dm = _dm(tiny_causal("llama"), cs_dir, template="chat")
    tok = dm.tokenizer
    example = dm.train_data[0]
    text = tok.decode(example["input_ids"])
    assert text.startswith("<s> user : please") and "</s> <s> assistant :" in text
    response = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tok.decode(response).startswith("the correct answer is")
    assert response[-1] == tok.convert_tokens_to_ids("</s>")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"test_tasks": ["mmlu"]}, "unknown commonsense task 'mmlu'"),
    ({"test_tasks": ["piqa"]}, "piqa has no file .*piqa/test.json"),
    ({"train_tasks": ["hellaswag"]}, "hellaswag has no file .*hellaswag/train.json"),
    ({"template": "vicuna"}, "template='vicuna'"),
    ({"train_files": ["no/such/file.json"]}, "neither a file nor a hub dataset"),
    ({"task": "instructions", "data_dir": None}, "train_files is empty"),
])
def test_bad_inputs_stop_before_training(tiny_causal, cs_dir: Path, kwargs, message) -> None:
    kwargs = {"data_dir": str(cs_dir), "checkpoint": str(tiny_causal("llama")), **kwargs}
    with pytest.raises(ConfigError, match=message):
        InstructionDataModule(**kwargs)


def test_records_without_instruction_or_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ConfigError, match=r"record 1 of .*bad.json has no string output"):
        read_records(bad)
    bad.write_text('{"output": "x"}\n')
    with pytest.raises(ConfigError, match=r"record 0 .*no string instruction"):
        read_records(bad)
    bad.write_text("not json")
    with pytest.raises(ConfigError, match="neither a JSON list nor JSON Lines"):
        read_records(bad)


def test_hub_dataset_offline_is_one_clear_error(tiny_causal, cs_dir: Path) -> None:
    dm = InstructionDataModule(task="instructions", data_dir=None,
                               checkpoint=str(tiny_causal("llama")),
                               train_files=["nobody/no-such-dataset"])
    with pytest.raises(ConfigError, match="hub dataset nobody/no-such-dataset could not be"):
        dm.training_records()


def test_gguf_without_the_gguf_package_says_what_to_install(tmp_path: Path,
                                                            monkeypatch) -> None:
    import importlib.util

    from app import gguf
    from app.hub import resolve_checkpoint

    real = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("APP_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "model.Q4_1.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"needs the `gguf` package.*pip install gguf==0.19.0"):
        resolve_checkpoint(str(fake))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing.gguf"))


def test_pkg_checkpoint_with_a_gguf_file_is_found_without_importing(tmp_path: Path,
                                                                    monkeypatch) -> None:
    from app.gguf import converted_folder, package_gguf_file

    pkg = tmp_path / "fake_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    (pkg / "m.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("APP_CACHE_DIR", str(tmp_path / "cache"))
    assert package_gguf_file("fake_model_pkg") == pkg / "m.Q4_1.gguf"
    assert package_gguf_file("no_such_package_xyz") is None
    folder = converted_folder(pkg / "m.Q4_1.gguf")
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("m.Q4_1-")
