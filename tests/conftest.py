"""Shared fixtures: offline settings, tiny models built from config, a deterministic tokenizer,
small GLUE files, and a helper that runs the real CLI entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import build_tiny_checkpoint, write_glue_task  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["APP_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_ckpt(arch, dtype=None)`` -> folder of a tiny pretrained ``arch`` model plus
    tokenizer (saved in ``dtype``, e.g. ``torch.bfloat16``, when given)."""
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def get(arch: str = "bert", dtype=None) -> Path:
        key = arch if dtype is None else f"{arch}-{str(dtype).rsplit('.', 1)[-1]}"
        if key not in made:
            made[key] = build_tiny_checkpoint(arch, root / key, dtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GLUE root with small files in the official layouts of all nine tasks."""
    root = tmp_path_factory.mktemp("glue")
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        write_glue_task(root, task)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_causal(arch, dtype=None)`` -> folder of a tiny causal LM (llama, qwen2, gpt2) +
    tokenizer (saved in ``dtype`` when given)."""
    from tiny_causal import build_causal_checkpoint

    root = tmp_path_factory.mktemp("tiny_causal")
    made: dict[str, Path] = {}

    def get(arch: str = "llama", dtype=None) -> Path:
        key = arch if dtype is None else f"{arch}-{str(dtype).rsplit('.', 1)[-1]}"
        if key not in made:
            made[key] = build_causal_checkpoint(arch, root / key, dtype)
        return made[key]

    return get
