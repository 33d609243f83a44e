"""Benchmark: `autoseg plan` (check + fingerprint + plan) on a dataset folder, as a user runs it.

Runs the CLI in a fresh process each time (Python start-up and imports included, as in a user's
wall time), into a new experiment folder so nothing is reused, and prints JSON:

    python benchmarks/bench_plan.py [RAW] [--workers 2] [--repeats 3] [--planner default]

RAW defaults to ../shared/data/Task04_Hippocampus (relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO.parent / "shared" / "data" / "Task04_Hippocampus"


def run_once(raw: Path, workers: int, planner: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "autoseg", "plan", str(raw), "-o", str(Path(tmp) / "work"),
             "-j", str(workers), "--planner", planner],
            check=True, stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="?", type=Path, default=DEFAULT_RAW)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--planner", default="default")
    args = parser.parse_args()
    if not (args.raw / "dataset.json").is_file():
        sys.exit(f"{args.raw}: no dataset.json; pass a raw dataset folder")
    walls = [run_once(args.raw, args.workers, args.planner) for _ in range(args.repeats)]
    # ru_maxrss of children: the largest resident set of any finished child process (KiB on Linux).
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({
        "benchmark": "plan (check + fingerprint + plan, CLI in a fresh process)",
        "dataset": str(args.raw.name),
        "workers": args.workers,
        "planner": args.planner,
        "wall_s": {"min": round(min(walls), 3), "median": round(statistics.median(walls), 3),
                   "runs": [round(w, 3) for w in walls]},
        "peak_rss_mb_largest_process": round(peak_mb, 1),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }, indent=2))


if __name__ == "__main__":
    main()
