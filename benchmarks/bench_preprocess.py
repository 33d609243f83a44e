"""Benchmark ``autoseg preprocess``: wall time and peak memory per configuration.

Plans the dataset once (``--planner``, not timed) into a temporary WORK, then for each planned
configuration runs ``autoseg preprocess WORK -c CONFIG -j N`` from scratch in a fresh Python
process, as a user would, and prints JSON::

    {"3d_fullres": {"wall_s": 1.6, "stage_s": 1.2, "peak_rss_mb": 120.0, "peak_rss_main_mb": 120.0,
                    "peak_rss_worker_mb": 95.0, "cases": 220, "workers": 2, "wall_runs": [...]}, ...}

``wall_s`` is the whole command (interpreter start, imports, stage), the median over ``--repeat``
runs; ``stage_s`` the stage alone. Peak RSS comes from ``resource.getrusage``: the main process
(RUSAGE_SELF) and the largest worker (RUSAGE_CHILDREN); ``peak_rss_mb`` is the larger of the two.

Usage::

    python benchmarks/bench_preprocess.py [DATASET] [-j 2] [--planner default] [-c 3d_fullres] [--repeat 3]

DATASET defaults to ``../shared/data/Task04_Hippocampus`` relative to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "Task04_Hippocampus"


def _measure(work: Path, config: str, workers: int, result: Path) -> None:
    """Child process: run the CLI command in-process, write timing and peak RSS to ``result``."""
    started = time.perf_counter()
    from autoseg.cli import app

    app(["preprocess", os.fspath(work), "-c", config, "-j", str(workers)], standalone_mode=False)
    stage_s = time.perf_counter() - started
    # ru_maxrss is in KiB on Linux.
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.write_text(json.dumps({"stage_s": stage_s, "main_mb": main_mb, "worker_mb": worker_mb}))


def _run_one(work: Path, config: str, workers: int) -> dict[str, float]:
    shutil.rmtree(work / "preprocessed", ignore_errors=True)
    result = work / f".bench-{config}.json"
    command = [sys.executable, os.fspath(Path(__file__).resolve()), "--measure", os.fspath(work), config,
               "-j", str(workers), "--result", os.fspath(result)]
    started = time.perf_counter()
    # The CLI's output and progress bar are discarded; shown only when the command fails.
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"autoseg preprocess -c {config} failed with exit code {done.returncode}")
    measured = json.loads(result.read_text())
    result.unlink()
    return {"wall_s": wall, **measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--planner", default="default")
    parser.add_argument("-c", "--config", action="append", help="configuration(s) to time (default: all planned)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is reported")
    parser.add_argument("--measure", nargs=2, metavar=("WORK", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        _measure(Path(args.measure[0]), args.measure[1], args.workers, args.result)
        return 0
    if not (args.dataset / "dataset.json").is_file():
        print(json.dumps({"skipped": f"no dataset at {args.dataset}"}))
        return 0

    from autoseg.planning.run import plan_dataset

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = Path(tmp) / "work"
        _, _, plans, _ = plan_dataset(args.dataset, work, planner=args.planner, workers=args.workers)
        n_cases = len(json.loads((work / "dataset.json").read_text())["cases"])
        report: dict[str, dict[str, object]] = {}
        for config in args.config or list(plans.configurations):
            runs = [_run_one(work, config, args.workers) for _ in range(max(1, args.repeat))]
            report[config] = {
                "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
                "stage_s": round(statistics.median(r["stage_s"] for r in runs), 2),
                "peak_rss_mb": round(max(max(r["main_mb"], r["worker_mb"]) for r in runs), 1),
                "peak_rss_main_mb": round(max(r["main_mb"] for r in runs), 1),
                "peak_rss_worker_mb": round(max(r["worker_mb"] for r in runs), 1),
                "cases": n_cases,
                "workers": args.workers,
                "wall_runs": [round(r["wall_s"], 2) for r in runs],
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
