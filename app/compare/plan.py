"""What a comparison runs: the grid of method x rank x seed and each run's command line.

Every run gets the same base fragments and the same extra arguments; only the method fragment,
the rank and the seed differ. The rank goes where the method declares it (``rank_field`` of its
:class:`app.adapters.contract.MethodSpec`, read from the fragment's adapter / optimizer classes
by :func:`app.adapters.declared_spec`); methods without one (full fine-tuning) run once per
seed. No method is known here by name: any fragment in ``configs/methods/`` works. The
seed goes to ``seed_everything`` and to every seed a fragment pins for its
adapter or optimizer (``init_seed`` / ``seed``: the frozen A of Asymmetric LoRA, the
Manifold-LoRA and StelLA inits, GaRare's projections), so seeds vary everything random.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunSpec", "build_plan", "load_fragments", "rank_option", "fragment_rank"]

ADAPTER = "--model.init_args.adapter.init_args."
OPTIMIZER = "--model.init_args.optimizer.init_args."
_SEED_KEYS = ("init_seed", "seed")


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge like jsonargparse's repeated ``--config`` (dicts merge, the rest replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def load_fragments(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The merged content of YAML fragments, in order (enough to find ranks and seeds)."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config fragment must be a mapping")
        _merge(merged, data)
    return merged


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model") or {}
    return (model.get("init_args") or {}) if isinstance(model, dict) else {}


def _init_args(entry: Any) -> dict[str, Any] | None:
    if isinstance(entry, dict):
        return entry.get("init_args") or {}
    return None


def _class_of(entry: Any) -> type | None:
    """The class a ``{class_path: ...}`` entry names (``None`` for a null entry)."""
    if not isinstance(entry, dict) or not entry.get("class_path"):
        return None
    module, _, name = str(entry["class_path"]).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {entry['class_path']!r} cannot be imported: {err}") from None


def rank_field(config: dict[str, Any]) -> str | None:
    """The merged config's method's declared ``rank_field`` (``"adapter.r"``,
    ``"optimizer.rank"``) or ``None``."""
    from app.adapters import declared_spec

    args = _model_args(config)
    return declared_spec(_class_of(args.get("adapter")),
                         _class_of(args.get("optimizer"))).rank_field


def rank_option(config: dict[str, Any]) -> str | None:
    """The CLI option that sets the rank of this merged config's method, ``None`` if it has
    none (``--model.init_args.<owner>.init_args.<field>`` of its declared ``rank_field``)."""
    field = rank_field(config)
    if field is None:
        return None
    owner, _, name = field.partition(".")
    return f"--model.init_args.{owner}.init_args.{name}"


def fragment_rank(config: dict[str, Any]) -> int | None:
    """The rank the merged config sets itself (``None``: no rank, or the class default)."""
    field = rank_field(config)
    if field is None:
        return None
    owner, _, name = field.partition(".")
    return (_init_args(_model_args(config).get(owner)) or {}).get(name)


def seed_options(config: dict[str, Any], seed: int) -> list[str]:
    """``seed_everything`` plus every adapter / optimizer seed the config pins."""
    out = ["--seed_everything", str(seed)]
    args = _model_args(config)
    for prefix, entry in ((ADAPTER, args.get("adapter")), (OPTIMIZER, args.get("optimizer"))):
        init = _init_args(entry) or {}
        out += [arg for key in _SEED_KEYS if key in init for arg in (prefix + key, str(seed))]
    return out


def has_callback(config: dict[str, Any], name: str) -> bool:
    """Whether ``trainer.callbacks`` of the merged config names a class called ``name``."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for cb in callbacks:
        path = cb.get("class_path", "") if isinstance(cb, dict) else str(cb)
        if path.rsplit(".", 1)[-1] == name:
            return True
    return False


def _digest(path: Path) -> str:
    """What a config file says, not how: its parsed YAML, so that a comment (where the house
    style puts each fragment's reasons), key order or layout does not make a finished run
    another run. A file that is not YAML is taken byte for byte."""
    try:
        text = json.dumps(yaml.safe_load(path.read_text()), sort_keys=True, default=str)
    except (yaml.YAMLError, UnicodeDecodeError):
        return _file_digest(path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    """The file's bytes: how fingerprints were recorded before :func:`_digest` parsed them."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison.

    Attributes:
        method: The method's name (its fragment's file stem).
        fragment: The method fragment.
        rank: The rank applied, or ``None`` for a method without one.
        seed: The run's seed.
        options: The run's arguments after the ``--config`` options: rank, seeds, extras.
        configs: Every ``--config`` of the run, base fragments first.
        needs_memory_monitor: The configs do not add a MemoryMonitor themselves.
        warmup_steps: Optimizer steps the StepTimer does not time.
        lr: The learning rate this run sets (``options`` hold it), ``None``: the fragment's.
        stage: ``"final"`` (a reported run) or ``"select"`` (a learning-rate selection run on
            the held-out slice of the training set; its name carries the rate).
    """

    method: str
    fragment: Path
    rank: int | None
    seed: int
    options: tuple[str, ...]
    configs: tuple[Path, ...]
    needs_memory_monitor: bool = True
    warmup_steps: int = 5
    lr: float | None = None
    stage: str = "final"

    @property
    def name(self) -> str:
        """Folder name: ``<method>-r<rank>-s<seed>`` (``<method>-s<seed>`` without a rank);
        selection runs ``<method>-r<rank>-lr<lr>-s<seed>``."""
        rank = "" if self.rank is None else f"-r{self.rank}"
        lr = f"-lr{self.lr:g}" if self.stage == "select" and self.lr is not None else ""
        return f"{self.method}{rank}{lr}-s{self.seed}"

    @property
    def rank_label(self) -> str:
        """The rank as shown in tables: the number, or ``-``."""
        return "-" if self.rank is None else str(self.rank)

    def fingerprint(self, legacy: bool = False) -> dict[str, Any]:
        """What makes two runs the same run: config contents, rank, seed, options, warm-up.
        ``legacy``: with the configs hashed byte for byte, as runs recorded before were."""
        digest = _file_digest if legacy else _digest
        out = {"configs": [digest(p) for p in self.configs], "method": self.method,
               "rank": self.rank, "seed": self.seed, "options": list(self.options),
               "warmup_steps": self.warmup_steps}
        if self.lr is not None or self.stage != "final":  # runs recorded before: unchanged
            out.update(lr=self.lr, stage=self.stage)
        return out

    def recorded_as(self, stored: dict[str, Any] | None) -> str | None:
        """Whether a recorded fingerprint is this run's: ``"current"``, ``"legacy"`` (recorded
        byte for byte, the files unchanged since), or ``None`` (another run)."""
        if stored is None:
            return None
        if stored == self.fingerprint():
            return "current"
        return "legacy" if stored == self.fingerprint(legacy=True) else None


def build_plan(base: Sequence[str | Path], methods: Sequence[str | Path], seeds: Sequence[int],
               ranks: Sequence[int] | None, extra: Sequence[str] = (),
               warmup_steps: int = 5) -> list[RunSpec]:
    """Every method x rank x seed combination, seed-major, then method, then rank.

    Args:
        base: Data / model fragments shared by every run.
        methods: Method fragments; a method's name is its file stem (must be unique).
        seeds: Seeds; each combination runs once per seed.
        ranks: Ranks to apply; ``None`` keeps each fragment's own rank.
        extra: Arguments given to every run after the configs (``--trainer.max_steps 300``).
        warmup_steps: Optimizer steps of each run that are not timed.

    Raises:
        ValueError: A missing fragment, or two methods with the same name.
    """
    base_paths = tuple(Path(p) for p in base)
    names = [Path(m).stem for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--methods: two fragments have the same name: {names}")
    for path in (*base_paths, *map(Path, methods)):
        if not path.is_file():
            raise ValueError(f"config fragment not found: {path}")
    plan: list[RunSpec] = []
    for method in map(Path, methods):
        configs = (*base_paths, method)
        merged = load_fragments(configs)
        option = rank_option(merged)
        run_ranks: list[int | None]
        if option is None:
            run_ranks = [None]
        elif ranks:
            run_ranks = list(dict.fromkeys(ranks))
        else:
            run_ranks = [fragment_rank(merged)]
        for rank in run_ranks:
            for seed in dict.fromkeys(seeds):
                options = [] if (rank is None or option is None) else [option, str(rank)]
                options += seed_options(merged, seed)
                plan.append(RunSpec(
                    method=method.stem, fragment=method, rank=rank, seed=seed,
                    options=(*options, *extra), configs=configs,
                    needs_memory_monitor=not has_callback(merged, "MemoryMonitor"),
                    warmup_steps=warmup_steps))
    # Seed-major order: a comparison stopped early has every method on the first seeds, and
    # slow drifts of the machine's load spread over all methods instead of one.
    seed_index = {seed: i for i, seed in enumerate(dict.fromkeys(seeds))}
    return sorted(plan, key=lambda spec: seed_index[spec.seed])
