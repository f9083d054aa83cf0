"""Record the README quick start: run it as a user would and write its dev metric and wall time
to ``bench/results/quickstart.md`` / ``.json``.

    python bench/record_quickstart.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, write_results  # noqa: E402
from record_glue import best_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    root = ROOT / "runs" / "quickstart-record"
    cmd = ["lightning-cli", "fit", "--config", "configs/quickstart.yaml",
           "--trainer.default_root_dir", str(root)]
    exe = Path(sys.executable).parent / "lightning-cli"
    start = time.perf_counter()
    run_child([str(exe), *cmd[1:]], cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    run = sorted((root / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    metrics = best_metrics(run)
    row = {"command": " ".join(cmd), "wall_s": round(wall, 1), "run_dir": str(run), **metrics}
    md = ("The README quick start: all-MiniLM-L6-v2 + LoRA r=8 (query, value) on SST-2, "
          "4,000 training sentences, 1 epoch, evaluated on the full 872-sentence dev set.\n\n"
          "| dev accuracy | wall time (s, whole command incl. start-up) |\n|---|---|\n"
          f"| {metrics['val/accuracy']:.4f} | {row['wall_s']} |\n")
    write_results(ROOT / "bench" / "results" / "quickstart", row, md)
    print(md)


if __name__ == "__main__":
    main()
