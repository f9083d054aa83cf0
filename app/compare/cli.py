"""``python -m app.compare``: run methods x ranks x seeds on one base config and report them.

    python -m app.compare --base configs/data/glue_mrpc.yaml configs/model/minilm.yaml \\
        --methods lora rslora stella --seeds 0 1 2 --ranks 8 --out runs/compare/mrpc \\
        --extra --trainer.max_steps 300

Rerunning the same command skips finished runs and resumes an interrupted one. ``--extra``
must come last: everything after it goes to every run.

With ``--select-lr`` (or ``--lrs``) each method first runs once per rate of its grid on a
held-out slice of the training set (:mod:`app.compare.select`, runs in ``OUT/selection/``),
then every seed runs at the selected rate.

With ``--finish-by`` (:mod:`app.compare.deadline`) no run starts that is not expected to end
by then; the comparison reports what finished and exits with 75, and the same command
continues later.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.compare.collect import machine
from app.compare.deadline import EXIT_DEADLINE, parse_finish_by
from app.compare.launch import Terminated, terminate_on_sigterm
from app.compare.plan import build_plan, load_fragments
from app.compare.report import write_report
from app.compare.runner import PlanMismatchError, finished_result, run_args, run_plan
from app.compare.select import (
    LR_OPTION,
    apply_rates,
    check_holdout_support,
    method_grids,
    select_rates,
    selection_plan,
)

__all__ = ["main", "parser"]

METHODS_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m app.compare``."""
    p = argparse.ArgumentParser(
        prog="python -m app.compare",
        description="Run every method x rank x seed with everything else identical, then write "
                    "results.csv / results.json / summary.md and PNG plots into --out.")
    p.add_argument("--base", nargs="+", required=True, metavar="CONFIG",
                   help="data / model fragments shared by every run (repeated --config)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="method fragments: paths, or names of files in configs/methods/ "
                        "(default: every fragment there)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED")
    p.add_argument("--ranks", nargs="+", type=int, default=None, metavar="RANK",
                   help="ranks to apply (adapter r, GaLore/GaRare rank); default: each "
                        "fragment's own. Methods without a rank (full) run once per seed")
    p.add_argument("--out", type=Path, required=True, help="comparison folder")
    p.add_argument("--metric", default="val/score", help="validation metric compared")
    p.add_argument("--mode", choices=("max", "min"), default="max",
                   help="whether larger or smaller --metric is better")
    p.add_argument("--baseline", default="lora",
                   help="method the paired differences are taken against")
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="optimizer steps of each run that are not timed")
    p.add_argument("--accelerator", help="passed as --trainer.accelerator to every run")
    p.add_argument("--devices", help="passed as --trainer.devices (each run uses them all)")
    p.add_argument("--strategy", help="passed as --trainer.strategy (e.g. ddp, fsdp)")
    p.add_argument("--select-lr", action="store_true",
                   help="select each method's learning rate first: one run per rate of its "
                        "grid (--lrs, else the fragment's '# lr_grid: [...]' line) on a "
                        "held-out slice of the TRAINING set, then the seeds at the best rate")
    p.add_argument("--lrs", nargs="+", type=float, default=None, metavar="LR",
                   help="learning-rate grid for every method (implies --select-lr)")
    p.add_argument("--select-seed", type=int, default=None,
                   help="seed of the selection runs (default: the first of --seeds)")
    p.add_argument("--select-holdout", type=float, default=0.1, metavar="FRACTION",
                   help="fraction of the training set held out for selection (default 0.1)")
    p.add_argument("--select-holdout-seed", type=int, default=0,
                   help="seed of the held-out slice (default 0)")
    p.add_argument("--select-on", choices=("final", "best"), default="final",
                   help="held-out score at the end of the run (default) or at its best "
                        "validation point")
    p.add_argument("--select-jobs", type=int, default=1, metavar="N",
                   help="selection runs at once (default 1), each with cores / N torch "
                        "threads: their step times are not reported, so only wall time "
                        "changes (2 one-thread runs do ~1.3x the work of one two-thread run "
                        "on 2 cores); the seed runs, whose step times are reported, always "
                        "run one at a time")
    p.add_argument("--finish-by", default=None, metavar="WHEN",
                   help="start no run that is not expected to end by WHEN (21:30, "
                        "2026-12-05T21:30, or from now: 90m, 2h), judged from the wall times "
                        f"of finished runs; then report and exit with {EXIT_DEADLINE}, and the "
                        "same command continues later")
    p.add_argument("--note", default="", help="Markdown put above the table (budget, data)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--dry-run", action="store_true", help="print each run's command and exit")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; report the finished runs")
    p.add_argument("--in-process", action="store_true",
                   help="run in this process (debugging and tests: a crash stops the "
                        "comparison and peak memory includes earlier runs)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="must be last: every following argument goes to every run")
    return p


def _method_path(value: str) -> Path:
    path = Path(value)
    if path.is_file() or path.suffix in (".yaml", ".yml") or "/" in value:
        return path
    return METHODS_DIR / f"{value}.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or report) a comparison; returns the exit status (1 if a run failed)."""
    p = parser()
    args = p.parse_args(argv)
    ours = {s for action in p._actions for s in action.option_strings} - {"--extra"}
    misplaced = [a for a in args.extra if a.split("=", 1)[0] in ours]
    if misplaced:
        p.error(f"{misplaced} come after --extra and would go to every run: put --extra last")
    passthrough = [arg for key in ("accelerator", "devices", "strategy")
                   if getattr(args, key) is not None
                   for arg in (f"--trainer.{key}", getattr(args, key))]
    if args.in_process and (args.devices not in (None, "1") or args.strategy):
        p.error("--in-process runs on one device: drop --devices / --strategy")
    extra = [*passthrough, *args.extra]
    methods = args.methods or sorted(f.stem for f in METHODS_DIR.glob("*.yaml"))
    method_paths = [_method_path(m) for m in methods]
    selecting = args.select_lr or bool(args.lrs)
    sel_plan: list = []
    finish_by = None
    try:
        if args.finish_by is not None and not (args.dry_run or args.report_only):
            finish_by = parse_finish_by(args.finish_by)
        plan = build_plan(args.base, method_paths, args.seeds, args.ranks, extra,
                          args.warmup_steps)
        if args.select_jobs < 1 or (args.select_jobs > 1 and args.in_process):
            raise ValueError(f"--select-jobs {args.select_jobs}: give 1 or more (1 with "
                             "--in-process, which runs in this process)")
        if selecting:
            if not 0.0 < args.select_holdout < 1.0:
                raise ValueError(f"--select-holdout {args.select_holdout}: give a fraction "
                                 "between 0 and 1, e.g. 0.1")
            grids = method_grids(method_paths, args.lrs)
            check_holdout_support(args.base)
            seed = args.seeds[0] if args.select_seed is None else args.select_seed
            sel_plan = selection_plan(
                build_plan(args.base, method_paths, [seed], args.ranks, extra,
                           args.warmup_steps),
                grids, (args.select_holdout, args.select_holdout_seed))
    except ValueError as err:
        p.error(str(err))
    runs = args.out / "runs"
    sel_runs = args.out / "selection" / "runs"
    if args.dry_run:
        for spec in sel_plan:
            cmd = [sys.executable, "-m", "app", *run_args(spec, sel_runs / spec.name)]
            print(f"selection {spec.name}: {shlex.join(cmd)}")
        for spec in plan:
            cmd = [sys.executable, "-m", "app", *run_args(spec, runs / spec.name)]
            if selecting:
                cmd += [LR_OPTION, "<selected>"]
            print(f"{spec.name}: {shlex.join(cmd)}")
        return 0
    chosen: list = []
    failed: list = []
    missing: list = []
    deferred: list = []
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if not args.in_process:  # (in-process runs take SIGTERM themselves: tests, debugging)
        terminate_on_sigterm()
    try:
        if selecting:
            if args.report_only:
                sel_results = _finished(sel_plan, sel_runs, failed, "selection/")
            else:
                sel_outcome = run_plan(sel_plan, args.out / "selection", metric=args.metric,
                                       mode=args.mode, in_process=args.in_process,
                                       jobs=args.select_jobs, finish_by=finish_by)
                sel_results = sel_outcome.results
                failed += [(f"selection/{n}", m) for n, m in sel_outcome.failed]
                deferred += [(f"selection/{n}", m) for n, m in sel_outcome.deferred]
            chosen = select_rates(sel_plan, sel_results, metric=args.metric, mode=args.mode,
                                  select_on=args.select_on)
            waiting = [spec for spec in sel_plan
                       if f"selection/{spec.name}" in dict(deferred)]
            plan, missing = apply_rates(plan, chosen, waiting)
            late = {(spec.method, spec.rank) for spec in waiting}
            for spec in missing:
                if (spec.method, spec.rank) in late:
                    deferred.append((spec.name, "not started: its learning-rate selection is "
                                                "not finished (--finish-by)"))
                else:
                    failed.append((spec.name,
                                   "no learning rate selected (no selection run finished)"))
        if args.report_only:
            results = _finished(plan, runs, failed)
        else:
            outcome = run_plan(plan, args.out, metric=args.metric, mode=args.mode,
                               in_process=args.in_process, finish_by=finish_by,
                               history=sel_results if selecting else ())
            results = outcome.results
            failed += outcome.failed
            deferred += outcome.deferred
    except PlanMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("\nterminated (SIGTERM): run the same command again to resume", file=sys.stderr)
        return 128 + int(signal.SIGTERM)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    reference = holdout_reference = None
    try:  # the no-learning floor; never a reason to lose the report
        base_config = load_fragments(args.base)
        from app.compare.reference import chance_reference

        reference = chance_reference(base_config)
        if selecting:
            holdout_reference = chance_reference(
                base_config, holdout=(args.select_holdout, args.select_holdout_seed))
    except Exception as err:  # noqa: BLE001
        print(f"note: no majority-class reference ({type(err).__name__}: {err})",
              file=sys.stderr)
    # The command that makes (and resumes) the runs; --report-only only rebuilds this report.
    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "app.compare",
                          *(a for a in given if a != "--report-only")])
    meta = {"command": command, "machine": machine(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "report_only": bool(args.report_only),
            "plan": {"base": list(args.base),
                     "methods": list(dict.fromkeys(Path(m).stem for m in method_paths)),
                     "seeds": args.seeds, "ranks": args.ranks,
                     "extra": extra, "warmup_steps": args.warmup_steps}}
    if selecting:
        meta["plan"]["selection"] = {
            "seed": sel_plan[0].seed if sel_plan else None,
            "holdout_fraction": args.select_holdout,
            "holdout_seed": args.select_holdout_seed, "select_on": args.select_on,
            "lrs": args.lrs}
    files = write_report(args.out, results, metric=args.metric, mode=args.mode,
                         baseline=args.baseline, header=_header(meta, args.note), meta=meta,
                         failed=failed + deferred, plots=not args.no_plots, selection=chosen,
                         reference=reference, holdout_reference=holdout_reference)
    print(f"{len(results)}/{len(plan) + len(missing)} runs finished; report: "
          + ", ".join(str(path) for path in files.values()))
    if failed:
        what = "not finished or not reported" if args.report_only else "failed"
        print(f"{len(failed)} run(s) {what}: " + ", ".join(n for n, _ in failed),
              file=sys.stderr)
    if deferred:
        print(f"--finish-by {args.finish_by}: {len(deferred)} run(s) not started, expected to "
              "end too late; run the same command again to continue", file=sys.stderr)
    if failed and not args.report_only:
        return 1
    return EXIT_DEADLINE if deferred else 0


def _finished(plan: list, runs: Path, failed: list, prefix: str = "") -> list:
    """Results of the plan's finished runs (``--report-only``); the others go to ``failed``
    (a run finished with other settings, e.g. at a rate the selection no longer picks, too)."""
    results = []
    for spec in plan:
        try:
            result = finished_result(spec, runs / spec.name)
        except PlanMismatchError:
            failed.append((prefix + spec.name, "finished with other settings (not reported)"))
            continue
        if result:
            results.append(result)
        else:
            failed.append((prefix + spec.name, "not finished"))
    return results


def _header(meta: dict[str, Any], note: str) -> str:
    """Markdown above the table: what was compared, the note, command, machine, date."""
    plan = meta["plan"]
    ranks = " ".join(map(str, plan["ranks"])) if plan["ranks"] else "as in the fragments"
    text = (f"# Comparison: {', '.join(dict.fromkeys(plan['methods']))}\n\n"
            f"Base: {', '.join(f'`{b}`' for b in plan['base'])}; seeds "
            f"{' '.join(map(str, plan['seeds']))}; ranks {ranks}; extra arguments: "
            f"`{shlex.join(plan['extra'])}`; {plan['warmup_steps']} warm-up steps not timed")
    if note.strip():
        text += f"\n\n{note.strip()}"
    date = meta["date"] + (" (report rebuilt from the finished runs with --report-only)"
                           if meta.get("report_only") else "")
    return (text + f"\n\nCommand: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
            f"Date: {date}\n")
