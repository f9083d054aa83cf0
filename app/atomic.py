"""Write a folder so that it appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; rename it to ``target`` on success.

    An exception inside the block leaves nothing behind, so an interrupted export or cache
    never looks finished.

    Args:
        target: The folder to create.
        replace: Replace an existing ``target``. ``False`` (caches) keeps a ``target`` that
            another process wrote meanwhile and drops ours.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists() and replace:
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.is_dir():  # another writer won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
