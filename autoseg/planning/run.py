"""The experiment folder (WORK) and the stages that fill it: check, fingerprint, plan.

Layout (DESIGN §2)::

    WORK/dataset.json        normalised copy of what was read, with the source path
    WORK/fingerprint.json    deterministic dataset fingerprint
    WORK/plans.yaml          every configuration
    WORK/.cache/scan.json    what the last scan saw (file sizes and times), to reuse the fingerprint

Every file is written atomically; a stage reruns idempotently.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoseg import crossval
from autoseg import plans as plans_io
from autoseg.atomic import write_json
from autoseg.dataset.fingerprint import Fingerprint
from autoseg.dataset.layout import DatasetSpec, Issue, load_dataset
from autoseg.dataset.scan import (
    ProgressFn,
    build_fingerprint,
    dataset_issues,
    files_checksum,
    scan_dataset,
    write_fingerprint,
)
from autoseg.errors import DatasetError, PlanError
from autoseg.planning import GpuMemory, load_preset, plan, preset_for_gpu
from autoseg.planning.budget import TimeBudget
from autoseg.planning.compute import Throughput
from autoseg.plans import Plans

CACHE_VERSION = 1


@dataclass(frozen=True)
class WorkPaths:
    """Paths inside an experiment folder."""

    root: Path

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.yaml"

    @property
    def scan_cache(self) -> Path:
        return self.root / ".cache" / "scan.json"


@dataclass(frozen=True)
class CheckReport:
    """Result of checking a dataset: the spec (if dataset.json was usable) and every issue."""

    spec: DatasetSpec | None
    issues: list[Issue]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]


def check(root: Path, workers: int | None = None, progress: ProgressFn | None = None) -> CheckReport:
    """Validate a raw dataset completely; reads every file, writes nothing."""
    report, _ = _scan(Path(root), want_fingerprint=False, workers=workers, progress=progress)
    return report


def _scan(root: Path, *, want_fingerprint: bool, workers: int | None,
          progress: ProgressFn | None) -> tuple[CheckReport, Fingerprint | None]:
    spec, issues = load_dataset(root)
    if spec is None:
        return CheckReport(None, issues), None
    results = scan_dataset(spec, want_fingerprint=want_fingerprint, workers=workers, progress=progress)
    for result in results:
        issues.extend(result.issues)
    issues.extend(dataset_issues(results))
    report = CheckReport(spec, _sorted(issues))
    fp = None
    if want_fingerprint and not report.errors:
        fp = build_fingerprint(spec, results)
    return report, fp


def _sorted(issues: list[Issue]) -> list[Issue]:
    # Errors first, then by case and file, so the table reads top-down; stable for equal keys.
    return sorted(issues, key=lambda i: (i.severity != "error", i.case or "", i.file or "", i.code))


def fingerprint(root: Path, work: Path, workers: int | None = None, progress: ProgressFn | None = None,
                reuse: bool = True) -> tuple[CheckReport, Fingerprint, bool]:
    """Check and fingerprint a dataset into ``WORK`` (reused when the dataset has not changed).

    Returns:
        The check report, the fingerprint, and whether it was reused from an earlier run.

    Raises:
        DatasetError: the dataset has errors (the message says to run ``autoseg check``).
    """
    root, paths = Path(root), WorkPaths(Path(work))
    spec, structural = load_dataset(root)
    if spec is not None and reuse:
        cached = _load_cache(paths, spec)
        if cached is not None:
            return CheckReport(spec, _sorted(structural + cached[1])), cached[0], True
    report, fp = _scan(root, want_fingerprint=True, workers=workers, progress=progress)
    if report.errors or fp is None or report.spec is None:
        first = report.errors[0] if report.errors else None
        detail = f"{first.file or first.case or 'dataset'}: {first.problem}" if first else "no case could be read"
        raise DatasetError(f"{root}: {len(report.errors)} error(s) in the dataset, e.g. {detail}; "
                           f"run 'autoseg check {root}' for the full list")
    paths.root.mkdir(parents=True, exist_ok=True)
    write_fingerprint(paths.fingerprint, fp)
    write_json(paths.dataset_json, _dataset_record(report.spec))
    write_json(paths.scan_cache, {
        "version": CACHE_VERSION,
        "key": files_checksum(report.spec, with_mtime=True),
        "warnings": [asdict(i) for i in report.issues if i.severity == "warning" and i.case is not None],
    })
    return report, fp, False


def _load_cache(paths: WorkPaths, spec: DatasetSpec) -> tuple[Fingerprint, list[Issue]] | None:
    try:
        cache = json.loads(paths.scan_cache.read_text(encoding="utf-8"))
        if cache.get("version") != CACHE_VERSION or cache.get("key") != files_checksum(spec, with_mtime=True):
            return None
        fp = Fingerprint.from_dict(json.loads(paths.fingerprint.read_text(encoding="utf-8")))
        warnings = [Issue(**i) for i in cache.get("warnings", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache, or an unreadable one: scan again
    if fp.task != spec.task or (fp.task == "super-resolution" and fp.upsample_factor is None):
        # Cached by an autoseg that did not plan this task (a super-resolution fingerprint without
        # its factor): its plans would fail validation on every run. CACHE_VERSION stays, so the
        # caches of other tasks (and their plans) remain as they are.
        return None
    return fp, warnings


def _dataset_record(spec: DatasetSpec) -> dict[str, Any]:
    """The normalised copy of dataset.json kept in WORK (a restoration dataset's ``label`` entries
    are its clean targets, and it records its ``task``)."""
    task = {} if spec.task == "segmentation" else {"task": spec.task}
    return {
        **task,
        "name": spec.name,
        "source": os.fspath(spec.root.resolve()),
        "layout": spec.layout,
        "channel_names": {str(i): n for i, n in enumerate(spec.channel_names)},
        "labels": {label.name: (list(label.values) if label.is_region else label.values[0]) for label in spec.labels},
        "file_ending": spec.file_ending,
        "numTraining": len(spec.cases),
        "files_sha256": files_checksum(spec),
        "cases": {
            case.case_id: {
                "images": [os.path.relpath(p, spec.root) for p in case.images],
                "label": os.path.relpath(case.label, spec.root) if case.label else None,
            }
            for case in spec.cases
        },
    }


def detect_gpu_memory() -> GpuMemory | None:
    """Total memory of the first CUDA device, via nvidia-smi (no torch import); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
        name, mib = out[0].rsplit(",", 1)
        return GpuMemory(round(float(mib) / 1024, 1), f"detected: {name.strip()}")
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def plan_dataset(
    root: Path, work: Path, planner: str = "default", gpu_memory_gb: float | None = None,
    workers: int | None = None, progress: ProgressFn | None = None, *,
    time_budget_s: float | None = None, throughput: Throughput | None = None,
) -> tuple[CheckReport, Fingerprint, Plans, bool]:
    """Check, fingerprint (or reuse) and plan a dataset into ``WORK``.

    ``gpu_memory_gb`` given: it is the planning budget and decides the recommendation. Not given:
    the preset's budget plans (so plans do not depend on the machine), and the detected GPU's
    memory, if any, decides the recommendation. ``time_budget_s`` (with the machine's
    ``throughput``) sizes every configuration for that much time per fold
    (:mod:`autoseg.planning.budget`); the plans then depend on the throughput, which they note.
    """
    spec, _ = load_dataset(Path(root))
    if spec is not None and not spec.kind.plannable:
        raise PlanError(f"{root}: task {spec.task!r} is not supported yet: 'autoseg check' validates such a "
                        "dataset, but autoseg cannot plan or train it; denoising pairs on one grid use "
                        '"task": "denoise"')
    preset = load_preset(planner)
    if gpu_memory_gb is not None:
        preset = preset_for_gpu(preset, gpu_memory_gb)
        gpu = GpuMemory(float(gpu_memory_gb), "--gpu-memory")
    else:
        gpu = detect_gpu_memory() or GpuMemory(preset.memory_budget_gb, f"preset {preset.name}")
    report, fp, reused = fingerprint(root, work, workers=workers, progress=progress)
    budget = None
    if time_budget_s is not None:
        if throughput is None:
            raise ValueError("a time budget needs the machine's throughput")
        budget = TimeBudget(float(time_budget_s), throughput, max(1, math.ceil(fp.num_cases / crossval.NUM_FOLDS)))
    planned = plan(fp, preset, gpu, planner_name=planner if not planner.endswith((".yaml", ".yml")) else preset.name,
                   budget=budget)
    plans_io.save(planned, WorkPaths(Path(work)).plans)
    return report, fp, planned, reused
