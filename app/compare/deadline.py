"""``--finish-by``: a time by which a comparison must have stopped, for sittings and job limits.

A comparison of many runs outlives a sitting, a batch job's wall-time limit or a shared
machine's free hours. Stopping it with a signal keeps the interrupted runs resumable, but their
progress lives in ``last.ckpt`` files that a fresh machine or clone does not have. With a
deadline the comparison instead starts a run only when it is expected to end in time (the
wall time of the same method's finished runs of the same stage on this machine, else the
stage's scaled by the method's relative cost in the other stage, else of any finished run on
it, else of the runs of other machines), lets the runs in progress finish,
reports, and exits with :data:`EXIT_DEADLINE`; the same command continues later.

    python -m app.compare ... --finish-by 21:30          # today (tomorrow if already past)
    python -m app.compare ... --finish-by 2h             # or 90m, 1h30m, 45s
    python -m app.compare ... --finish-by 2026-12-05T21:30
    python -m app.compare.deadline 2h                    # prints the absolute time (scripts)
"""

from __future__ import annotations

import datetime as _dt
import re
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from app.compare.collect import machine_label

__all__ = ["EXIT_DEADLINE", "expected_wall", "parse_finish_by"]

#: Exit status of a comparison that left runs unstarted for its ``--finish-by`` (EX_TEMPFAIL:
#: nothing failed; run the same command again to continue).
EXIT_DEADLINE = 75

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")


def _usage(text: str, why: str) -> ValueError:
    return ValueError(f"--finish-by {text!r}: {why}; give a clock time (21:30), an ISO "
                      "date-time (2026-12-05T21:30) or a duration from now (90m, 2h, 1h30m)")


def parse_finish_by(text: str, now: float | None = None) -> float:
    """The deadline ``text`` names, as seconds since the epoch.

    ``HH:MM`` is local time today, or tomorrow when it has passed; an ISO date-time without a
    zone is local time and must lie ahead; a duration (``90m``, ``2h``, ``1h30m``, ``45s``)
    counts from ``now``.

    Raises:
        ValueError: One line naming the option, the value and the accepted forms.
    """
    now = time.time() if now is None else now
    value = text.strip()
    match = _DURATION.match(value)
    if value and match and any(match.groups()):
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        if h * 3600 + m * 60 + s <= 0:
            raise _usage(text, "the duration is zero")
        return now + h * 3600 + m * 60 + s
    local_now = _dt.datetime.fromtimestamp(now).astimezone()
    clock = _CLOCK.match(value)
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        if hour > 23 or minute > 59:
            raise _usage(text, "not a time of day")
        when = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if when.timestamp() <= now:
            when += _dt.timedelta(days=1)
        return when.timestamp()
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise _usage(text, "not a time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=local_now.tzinfo)
    if when.timestamp() <= now:
        raise _usage(text, f"that time has passed (now {local_now.isoformat(timespec='seconds')})")
    return when.timestamp()


def expected_wall(method: str, stage: str, history: Iterable[Mapping[str, Any]],
                  host: str | None = None) -> float | None:
    """Expected wall seconds of a run of ``method`` in ``stage`` (``final`` / ``select``):
    the median ``wall_s`` of the same method's finished runs of that stage; else that stage's
    median scaled by the method's relative cost in the other stages (its median over their
    median: GaRare's selection runs took 1.3 times the selection median, so its first seed
    run is expected to take 1.3 times the seed median, not the median); else the method's;
    else every finished run's; ``None`` without any.

    With ``host`` (this machine's :func:`app.compare.collect.machine_label`) the runs recorded
    on that machine are searched first, in the same order, and the other machines' runs only
    when it has none: a comparison that moves between machines (one CPU model runs the same
    run four times as fast as another) must not judge its runs by the other machine's."""
    runs = [r for r in history if r.get("wall_s")]
    here = [r for r in runs if host is not None and machine_label(dict(r)) == host]
    for pool in (here, runs):
        same = [float(r["wall_s"]) for r in pool
                if r.get("method") == method and _stage(r) == stage]
        if same:
            return statistics.median(same)
        staged = [float(r["wall_s"]) for r in pool if _stage(r) == stage]
        if staged:
            return statistics.median(staged) * _relative_cost(method, stage, pool)
        for keep in (lambda r: r.get("method") == method, lambda r: True):
            walls = [float(r["wall_s"]) for r in pool if keep(r)]
            if walls:
                return statistics.median(walls)
    return None


def _stage(run: Mapping[str, Any]) -> Any:
    return run.get("stage", "final")  # results from before stages were final runs


def _relative_cost(method: str, stage: str, pool: list[Mapping[str, Any]]) -> float:
    """The median, over the other stages where ``method`` has finished runs, of its median
    wall time there divided by that stage's median; 1.0 where it has none."""
    ratios = []
    for other in {_stage(r) for r in pool} - {stage}:
        everyone = [float(r["wall_s"]) for r in pool if _stage(r) == other]
        mine = [float(r["wall_s"]) for r in pool
                if _stage(r) == other and r.get("method") == method]
        if mine:
            ratios.append(statistics.median(mine) / statistics.median(everyone))
    return statistics.median(ratios) if ratios else 1.0


def main(argv: list[str] | None = None) -> int:
    """``python -m app.compare.deadline WHEN``: print the deadline as an ISO date-time, so a
    script that starts several comparisons gives them all the same one."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m app.compare.deadline WHEN (21:30, 2026-12-05T21:30, 90m)",
              file=sys.stderr)
        return 2
    try:
        when = parse_finish_by(args[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_dt.datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
