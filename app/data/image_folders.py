"""Parsing and splitting of multi-domain image datasets (DomainBed layout), no Lightning.

The on-disk layout shared by PACS, VLCS, OfficeHome, TerraIncognita and DomainNet is one folder
per domain holding one sub-folder per class::

    root/<domain>/<class>/<image>.jpg

DomainNet also ships official split files ``root/<domain>_train.txt`` / ``<domain>_test.txt``
whose lines are ``<domain>/<class>/<image>.jpg <label>``.

Splits follow DomainBed (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", 2021):
leave the test domains out completely and model-select on a held-out fraction of *each* training
domain ("training-domain validation").
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
"""File suffixes (compared lower-cased) that count as images."""

T = TypeVar("T")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_domains(root: str | os.PathLike[str]) -> list[str]:
    """Return the sorted names of the domain folders under ``root`` (hidden folders skipped).

    Args:
        root: Dataset folder holding one sub-folder per domain.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_domain_folders(root: str | os.PathLike[str]) -> dict[str, list[tuple[str, str]]]:
    """Index a ``root/<domain>/<class>/<image>`` tree.

    Images are found recursively inside each class folder (like torchvision's ``ImageFolder``)
    and matched by extension (jpg, jpeg, png, bmp; case-insensitive). Domains, classes and files
    are sorted, so the result is deterministic. Domain folders without any class folder are left
    out (e.g. stray folders beside the domains).

    Args:
        root: Dataset folder holding one sub-folder per domain.

    Returns:
        ``{domain: [(relpath, class_name), ...]}`` with ``relpath`` relative to ``root`` and
        ``/``-separated (``"photo/dog/001.jpg"``).

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
    """
    root = Path(root)
    result: dict[str, list[tuple[str, str]]] = {}
    for domain in list_domains(root):
        class_dirs = sorted(
            p for p in (root / domain).iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not class_dirs:
            continue
        items: list[tuple[str, str]] = []
        for class_dir in class_dirs:
            found: list[str] = []
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(
                    Path(dirpath, f).relative_to(root).as_posix()
                    for f in filenames
                    if _is_image(f)
                )
            items.extend((rel, class_dir.name) for rel in sorted(found))
        result[domain] = items
    return result


def list_domain_classes(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Return ``{domain: sorted class folder names}`` without listing any image.

    Two directory listings per domain, so it is cheap even for DomainNet's 600k images: the
    CLI uses it to tell the model the number of classes at start-up. Domains without class
    folders are left out, as in :func:`scan_domain_folders`.

    Args:
        root: Dataset folder holding one sub-folder per domain.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
    """
    root = Path(root)
    result: dict[str, list[str]] = {}
    for domain in list_domains(root):
        classes = sorted(
            p.name for p in (root / domain).iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if classes:
            result[domain] = classes
    return result


def read_split_file(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Read a DomainNet split file (lines ``relative/path.jpg label``; blank lines ignored).

    Args:
        path: The split file, e.g. ``domain_net/clipart_train.txt``.

    Returns:
        ``[(relpath, label), ...]`` in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: For a malformed line; the message names the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist")
    items: list[tuple[str, int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            # rsplit keeps paths that contain spaces (OfficeHome's "Real World") intact.
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(
                    f"{path}:{lineno}: malformed split line {line!r}; expected "
                    "'<relative/path.jpg> <non-negative integer label>'"
                )
            items.append((parts[0], int(parts[1])))
    return items


def build_class_index(
    items_by_domain: Mapping[str, Sequence[tuple[object, str]]],
    allow_missing_classes: bool = False,
) -> list[str]:
    """Return the sorted union of class names; label ``i`` is ``class_names[i]``.

    Args:
        items_by_domain: ``{domain: [(item, class_name), ...]}``, e.g. from
            :func:`scan_domain_folders`.
        allow_missing_classes: If true, a class absent from some domain is only logged at WARNING.

    Raises:
        ValueError: If a class is missing from a domain (and that is not allowed), naming both.
    """
    per_domain = {d: {c for _, c in items} for d, items in items_by_domain.items()}
    classes = sorted(set().union(*per_domain.values()))
    missing = [(c, d) for d, have in per_domain.items() for c in classes if c not in have]
    if missing:
        listed = ", ".join(f"class {c!r} missing from domain {d!r}" for c, d in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        if not allow_missing_classes:
            raise ValueError(
                f"{listed}{more}. Every domain must contain every class; pass "
                "allow_missing_classes=True to accept this."
            )
        log.warning("%s%s", listed, more)
    return classes


def resolve_domains(
    found: Sequence[str],
    test_domains: Sequence[str],
    train_domains: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Check the requested domains against the ones found and return ``(train, test)``.

    Args:
        found: Domains present in the data.
        test_domains: Held-out domains (order kept, duplicates dropped).
        train_domains: Training domains; ``None`` means every found domain not in
            ``test_domains`` (in ``found`` order).

    Raises:
        ValueError: If no test domain is given, a requested domain does not exist (the message
            lists the found ones), a test domain is also a training domain, or nothing is left
            to train on.
    """
    test = list(dict.fromkeys(test_domains))
    if not test:
        raise ValueError(f"give at least one test domain; found domains: {sorted(found)}")
    requested = test + list(train_domains or [])
    unknown = [d for d in dict.fromkeys(requested) if d not in found]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; found domains: {sorted(found)}")
    if train_domains is None:
        train = [d for d in found if d not in test]
    else:
        train = list(dict.fromkeys(train_domains))
        both = [d for d in train if d in test]
        if both:
            raise ValueError(
                f"domain(s) {both} are both test and train domains; a test domain must be left "
                "out of train_domains"
            )
    if not train:
        raise ValueError(
            f"no training domain left: test domains {test} cover all found domains {list(found)}"
        )
    return train, test


@dataclass
class DomainSplit(Generic[T]):
    """Train / validation / test lists of ``(domain, item)`` pairs."""

    train: list[tuple[str, T]] = field(default_factory=list)
    """Training-domain items minus the hold-out."""
    val: list[tuple[str, T]] = field(default_factory=list)
    """The held-out fraction of each training domain (training-domain validation)."""
    test: list[tuple[str, T]] = field(default_factory=list)
    """Every item of the test domains, grouped by test domain in the order requested."""


def holdout_rng(seed: int, domain: str) -> random.Random:
    """A per-domain RNG, so adding or dropping a domain leaves other domains' splits unchanged.

    Python seeds ``random.Random`` from a string with SHA-512, which is stable across processes
    (unlike ``hash()``).
    """
    return random.Random(f"{seed}:{domain}")


def leave_one_domain_out(
    items_by_domain: Mapping[str, Sequence[T]],
    test_domains: Sequence[str],
    holdout_fraction: float = 0.2,
    seed: int = 0,
    train_domains: Sequence[str] | None = None,
) -> DomainSplit[T]:
    """Split DomainBed-style: test domains fully held out, a fraction of each train domain to val.

    From each training domain, ``int(len(domain) * holdout_fraction)`` items (DomainBed rounds
    down) are drawn at random, deterministic given ``seed`` and the domain name, into ``val``.
    Domains neither in ``train_domains`` nor in ``test_domains`` are unused.

    Args:
        items_by_domain: ``{domain: [item, ...]}``; items can be anything (paths, row indices).
        test_domains: Domains whose every item goes to ``test``.
        holdout_fraction: Fraction of each training domain held out for validation, in [0, 1).
        seed: Seed of the hold-out draw.
        train_domains: Training domains; ``None`` means all domains not in ``test_domains``.

    Returns:
        The split; within a domain, items keep their input order.

    Raises:
        ValueError: See :func:`resolve_domains`; also for a ``holdout_fraction`` outside [0, 1)
            or an empty training set.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    train_names, test_names = resolve_domains(list(items_by_domain), test_domains, train_domains)
    split: DomainSplit[T] = DomainSplit()
    for domain in train_names:
        items = list(items_by_domain[domain])
        n_val = int(len(items) * holdout_fraction)
        val_idx = set(holdout_rng(seed, domain).sample(range(len(items)), n_val))
        for i, item in enumerate(items):
            (split.val if i in val_idx else split.train).append((domain, item))
    for domain in test_names:
        split.test.extend((domain, item) for item in items_by_domain[domain])
    if not split.train:
        raise ValueError(
            f"the training set is empty: training domains {train_names} have "
            f"{sum(len(items_by_domain[d]) for d in train_names)} image(s) before the "
            f"{holdout_fraction:.0%} hold-out"
        )
    return split


def split_from_files(
    root: str | os.PathLike[str],
    test_domains: Sequence[str],
    train_domains: Sequence[str] | None = None,
    allow_missing_classes: bool = False,
) -> tuple[list[str], list[str], DomainSplit[tuple[str, str]]]:
    """Split DomainNet by its official files instead of a random hold-out.

    Train is ``<domain>_train.txt`` of the training domains, val their ``<domain>_test.txt``, and
    test every file listed for the test domains (train and test lists), as DomainBed tests on
    whole domains. A domain is a folder with a ``<domain>_train.txt`` beside it. The class of an
    image is its parent folder; the file's label must equal that class's index in the sorted
    class names (DomainNet's labels are alphabetical).

    Args:
        root: The DomainNet folder (domain folders and split files side by side).
        test_domains: Domains held out for testing.
        train_domains: Training domains; ``None`` means all others.
        allow_missing_classes: See :func:`build_class_index`.

    Returns:
        ``(class_names, domain_names, split)`` with split items ``(relpath, class_name)``.

    Raises:
        FileNotFoundError: For a missing split file.
        ValueError: For unknown domains, malformed lines or a label that contradicts its folder.
    """
    root = Path(root)
    domains = [d for d in list_domains(root) if (root / f"{d}_train.txt").is_file()]
    train, test = resolve_domains(domains, test_domains, train_domains)
    files = {(d, part): root / f"{d}_{part}.txt" for d in domains for part in ("train", "test")}
    rows = {
        key: [(rel, Path(rel).parent.name, label) for rel, label in read_split_file(path)]
        for key, path in files.items()
    }
    by_domain = {d: [(r, c) for p in ("train", "test") for r, c, _ in rows[d, p]] for d in domains}
    classes = build_class_index(by_domain, allow_missing_classes)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    for key, items in rows.items():
        for rel, cls, label in items:
            if class_to_idx[cls] != label:
                raise ValueError(
                    f"{files[key]}: label {label} of {rel!r} does not match its class folder "
                    f"{cls!r} (index {class_to_idx[cls]} in the sorted class names)"
                )
    split: DomainSplit[tuple[str, str]] = DomainSplit()
    for d in train:
        split.train += [(d, (r, c)) for r, c, _ in rows[d, "train"]]
        split.val += [(d, (r, c)) for r, c, _ in rows[d, "test"]]
    for d in test:
        split.test += [(d, item) for item in by_domain[d]]
    if not split.train:
        raise ValueError(f"the training set is empty: the split files of {train} list no image")
    return classes, domains, split
