"""The preprocessing stage: every case of WORK's dataset through :func:`preprocess_case`, to disk.

Layout (DESIGN §2)::

    WORK/preprocessed/<config>/<case>.npy        float32 (C, z, y, x), memory-mappable
    WORK/preprocessed/<config>/<case>_seg.npy    int8/int16 (z, y, x)
    WORK/preprocessed/<config>/<case>_target.npy float32 (C, z, y, x): restoration's clean target instead
    WORK/preprocessed/<config>/<case>.json       props (geometry, crop box, class locations, plan digest)

Segmentation saves the label map; restoration (plans without labels) the clean target on the
input's grid, as its own file: a float ``(C, z, y, x)`` image is no label map, and every reader of
``_seg.npy`` (sampler, cascade, find-best) expects one.

Each file is written atomically and the ``.json`` last, after its old copy was removed: a case is
finished exactly when its ``.json`` exists with the current plan digest. A rerun skips finished
cases, so the stage resumes after a crash or ``kill -9``; leftover ``.tmp-*`` files (never under a
final name) are removed at the start.

Configurations whose data is identical (same :func:`plan_digest`: ``2.5d`` and ``2d``,
``3d_cascade_fullres`` and ``3d_fullres``) are computed once and hard-linked (copied where links
are not possible), so every configuration folder is complete on its own.

Each case is read once for all requested configurations, by a bounded pool of worker processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg import plans as plans_io
from autoseg.atomic import atomic_path, folder_lock, remove_stale_temp, write_text
from autoseg.dataset.kinds import DATASET_KINDS
from autoseg.dataset.layout import Case
from autoseg.dataset.super_resolution import fine_shape
from autoseg.errors import DatasetError, PlanError, did_you_mean
from autoseg.imageio import Geometry, read_image
from autoseg.plans import Plans
from autoseg.preprocessing.pipeline import Props, plan_digest, preprocess_case
from autoseg.preprocessing.restoration import preprocess_pair
from autoseg.preprocessing.super_resolution import refine_input
from autoseg.dataset.scan import ProgressFn, available_memory_bytes, choose_workers, estimate_case_bytes
from autoseg.processes import pool_context

#: Fraction of the available memory the workers may plan to use (the same margin as the scan).
_MEMORY_FRACTION = 0.7


# ----------------------------------------------------------------------------------------------
# Files of one case


@dataclass(frozen=True)
class CaseFiles:
    """The files of a preprocessed case (``seg`` for a label map, ``target`` for a restoration target)."""

    data: Path
    seg: Path
    props: Path
    target: Path

    def all(self) -> tuple[Path, Path, Path, Path]:
        return (self.data, self.seg, self.target, self.props)


def preprocessed_dir(work: Path, config_name: str) -> Path:
    """``WORK/preprocessed/<config>``."""
    return Path(work) / "preprocessed" / config_name


def case_files(folder: Path, case_id: str) -> CaseFiles:
    """Where a case's arrays and props live in a configuration folder."""
    folder = Path(folder)
    return CaseFiles(folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy", folder / f"{case_id}.json",
                     folder / f"{case_id}_target.npy")


def read_props(path: Path) -> Props | None:
    """A case's props, or None when the file is missing or unreadable (an unfinished case)."""
    try:
        props = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return props if isinstance(props, dict) else None


def is_finished(folder: Path, case_id: str, digest: str, with_seg: bool = True) -> bool:
    """True when the case's props carry ``digest`` and its arrays exist (the props are written last);
    ``with_seg``: its training target too (a label map, or a restoration target)."""
    files = case_files(folder, case_id)
    props = read_props(files.props)
    if props is None or props.get("plan_digest") != digest:
        return False
    return files.data.is_file() and (files.seg.is_file() or files.target.is_file() or not with_seg)


def load_case(folder: Path, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, Props]:
    """Load a preprocessed case: data, segmentation (None if absent) and props.

    Args:
        folder: ``WORK/preprocessed/<config>``.
        case_id: the case.
        mmap: memory-map the arrays read-only instead of reading them.

    Raises:
        DatasetError: the case's files are missing or unreadable.
    """
    files = case_files(folder, case_id)
    props = read_props(files.props)
    if props is None:
        raise DatasetError(f"{files.props}: missing or unreadable; run 'autoseg preprocess' on this WORK folder")
    mode = "r" if mmap else None
    try:
        data = np.load(files.data, mmap_mode=mode)
        seg = np.load(files.seg, mmap_mode=mode) if files.seg.is_file() else None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{files.data}: cannot read ({exc}); delete the case's files and rerun "
                           "'autoseg preprocess'") from None
    return data, seg, props


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _write_props(path: Path, props: Props) -> None:
    # Compact: up to 10 000 coordinates per class make indented JSON large and slow to write.
    write_text(path, json.dumps(props, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n")


def save_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, props: Props,
              target: np.ndarray | None = None) -> None:
    """Write a case's files atomically, props last (its presence marks the case finished).

    The old props go first, so a crash in between never leaves old props beside new arrays.
    ``target``: a restoration case's clean target (``<case>_target.npy``).
    """
    files = case_files(folder, case_id)
    files.props.unlink(missing_ok=True)
    _save_array(files.data, data)
    for path, array in ((files.seg, seg), (files.target, target)):
        if array is not None:
            _save_array(path, array)
        else:
            path.unlink(missing_ok=True)
    _write_props(files.props, props)


def link_case(source: Path, target: Path, case_id: str) -> None:
    """Give ``target`` the same files as ``source`` for a case (hard links; copies across devices)."""
    src, dst = case_files(source, case_id), case_files(target, case_id)
    dst.props.unlink(missing_ok=True)
    for s, d in zip(src.all(), dst.all()):
        if not s.is_file():
            d.unlink(missing_ok=True)
            continue
        with atomic_path(d) as tmp:
            tmp.unlink()
            try:
                os.link(s, tmp)
            except OSError:
                shutil.copyfile(s, tmp)


# ----------------------------------------------------------------------------------------------
# WORK/dataset.json


def load_work_cases(work: Path) -> list[Case]:
    """The training cases WORK/dataset.json lists, with absolute paths into the source dataset.

    Raises:
        DatasetError: dataset.json is missing or malformed, or the source folder has moved.
    """
    path = Path(work) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run 'autoseg plan RAW -o {work}' first")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        source = Path(record["source"])
        listed = record["cases"]
        cases = [
            Case(str(case_id), tuple(source / p for p in entry["images"]),
                 source / entry["label"] if entry.get("label") else None)
            for case_id, entry in sorted(listed.items())
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: malformed ({type(exc).__name__}: {exc}); "
                           f"re-run 'autoseg plan RAW -o {work}'") from None
    if not source.is_dir():
        raise DatasetError(f"{path}: source dataset {source} no longer exists; move it back or re-run "
                           f"'autoseg plan RAW -o {work}' with its new location")
    return cases


def read_case(case: Case, num_channels: int, target_channels: int | None = None,
              upsample_factor: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read a case's image files (stacked as channels) and label.

    Args:
        case: the case's files (one per channel, or one multi-channel file).
        num_channels: channels the plans expect.
        target_channels: None: the label file is a label map; else it is a restoration target
            with that many channels, returned whole.
        upsample_factor: super-resolution: the target lies on the image's grid refined by these
            factors (z, y, x), so its shape is the image's times them.

    Returns:
        The image ``(C, Z, Y, X)``, the label ``(Z, Y, X)`` (a target: ``(C_t, Z, Y, X)``; None
        without a label file) and the geometry of the first image file (the dataset check made the
        others agree with it).

    Raises:
        DatasetError: a file is unreadable or the channel count differs from the plans'.
    """
    arrays: list[np.ndarray] = []
    geometries: list[Geometry] = []
    for path in case.images:
        array, geometry = read_image(path)
        arrays.append(array)
        geometries.append(geometry)
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    if image.shape[0] != num_channels:
        raise DatasetError(f"{case.images[0]}: {image.shape[0]} channel(s), the plans expect {num_channels}; "
                           "re-run 'autoseg plan' if the dataset changed")
    label = None
    if case.label is not None:
        label_array, _ = read_image(case.label)
        label = label_array[0] if target_channels is None else label_array
        if target_channels is not None and label.shape[0] != target_channels:
            raise DatasetError(f"{case.label}: {label.shape[0]} channel(s), the task expects {target_channels}; "
                               "run 'autoseg check' on the dataset")
        expected = image.shape[1:] if upsample_factor is None else fine_shape(image.shape[1:], upsample_factor)
        if label.shape[-3:] != tuple(expected):
            what = "the image's" if upsample_factor is None else f"the image's refined ×{list(upsample_factor)},"
            raise DatasetError(f"{case.label}: label shape {label.shape} differs from {what} "
                               f"{tuple(expected)}; run 'autoseg check' on the dataset")
    return image, label, geometries[0]


# ----------------------------------------------------------------------------------------------
# The pool


@dataclass(frozen=True)
class _Task:
    case: Case
    configs: tuple[str, ...]


# Set once per worker by the pool initializer (inherited, not pickled, under fork).
_STATE: dict[str, Any] = {}


def _init_worker(plans: Plans, work: Path) -> None:
    _STATE["plans"] = plans
    _STATE["work"] = work


def process_case(task: _Task, plans: Plans, work: Path) -> str:
    """Read one case and write its preprocessed files for each of ``task.configs``; returns the case id.

    A restoration case (plans without labels, :mod:`autoseg.dataset.kinds`) goes through
    :func:`autoseg.preprocessing.restoration.preprocess_pair`: its target file is an image on the
    input's grid, saved as ``<case>_target.npy``. A super-resolution input is first refined onto its
    fine grid (:func:`autoseg.preprocessing.super_resolution.refine_input`), where its target lies.

    Raises:
        DatasetError: a file is unreadable, or a super-resolution target is not on its input's fine grid.
    """
    case_id = task.case.case_id
    restoration = not DATASET_KINDS[plans.task].labels
    channels = len(plans.channel_names)
    image, label, geometry = read_case(task.case, channels, channels if restoration else None,
                                       plans.upsample_factor)
    if plans.upsample_factor is not None:
        image, geometry = refine_input(image, geometry, plans.upsample_factor)
    for config_name in task.configs:
        target = None
        if restoration:
            data, target, props = preprocess_pair(image, label, geometry, plans, config_name, case_id=case_id)
            seg = None
        else:
            data, seg, props = preprocess_case(image, label, geometry, plans, config_name, case_id=case_id)
        save_case(preprocessed_dir(work, config_name), case_id, data, seg, props, target)
    return case_id


def _worker(task: _Task) -> str:
    return process_case(task, _STATE["plans"], _STATE["work"])


def _growth(plans: Plans, configs: Sequence[str]) -> float:
    """How much larger than the original a case becomes at the finest requested spacing (≥ 1).

    A super-resolution input is refined onto its target's grid first (``prod(upsample_factor)`` times
    the voxels, :func:`autoseg.preprocessing.super_resolution.refine_input`); the configurations'
    spacings are then relative to that grid (``original_median_spacing`` is the targets').
    """
    median = np.asarray(plans.original_median_spacing, dtype=np.float64)
    median_t = median[list(plans.transpose)]
    refined = 1.0 if plans.upsample_factor is None else float(np.prod(plans.upsample_factor))
    growth = 1.0
    for name in configs:
        config = plans.configuration(name)
        target = np.asarray(config.spacing, dtype=np.float64)
        ratio = median_t / target
        if config.dims == 2:
            ratio[0] = 1.0
        growth = max(growth, float(np.prod(ratio)))
    return refined * growth


def choose_preprocess_workers(requested: int | None, cases: Sequence[Case], plans: Plans,
                              configs: Sequence[str]) -> int:
    """Workers for preprocessing: :func:`autoseg.dataset.scan.choose_workers`, also bounded by upsampling.

    A case resampled to a finer spacing grows by the ratio of the volumes; the per-case memory
    estimate of the scan is scaled by that factor before dividing the free memory.
    """
    workers = choose_workers(requested, cases)
    largest = max((estimate_case_bytes(c) for c in cases), default=0) * _growth(plans, configs)
    if largest > 0:
        workers = min(workers, max(1, int(available_memory_bytes() * _MEMORY_FRACTION // largest)))
    return max(1, workers)


def _run_tasks(tasks: list[_Task], plans: Plans, work: Path, workers: int, progress: ProgressFn | None) -> None:
    done = 0
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            process_case(task, plans, work)
            done += 1
            if progress:
                progress(done, len(tasks))
        return
    # Fork where safe (autoseg.processes); the pool exists before the first progress call starts the
    # progress bar's refresh thread. Chunks amortise the per-task IPC for many small cases; a
    # worker's exception is re-raised here with its traceback attached.
    context = pool_context()
    chunksize = max(1, min(8, len(tasks) // (workers * 8)))
    with context.Pool(workers, initializer=_init_worker, initargs=(plans, work)) as pool:
        for _ in pool.imap_unordered(_worker, tasks, chunksize=chunksize):
            done += 1
            if progress:
                progress(done, len(tasks))


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class ConfigSummary:
    """What the stage did for one configuration.

    Attributes:
        name: the configuration.
        folder: ``WORK/preprocessed/<name>``.
        cases: cases in the dataset.
        processed: cases computed in this run.
        reused: cases already finished (same plan digest) and skipped.
        linked_from: the configuration whose identical data was linked, if any.
        stale_removed: leftover temporary files deleted.
    """

    name: str
    folder: Path
    cases: int
    processed: int
    reused: int
    linked_from: str | None
    stale_removed: int


@dataclass(frozen=True)
class PreprocessSummary:
    """What ``autoseg preprocess`` did."""

    configs: dict[str, ConfigSummary]
    workers: int
    seconds: float


def resolve_configs(plans: Plans, configs: Sequence[str] | None, where: str = "plans") -> list[str]:
    """The requested configurations (default: the plans' recommended ones), validated, in order.

    Args:
        plans: the plans.
        configs: requested names, or None for the recommended ones.
        where: the plans file, for error messages.

    Raises:
        PlanError: a name is not in the plans (with a did-you-mean), or none is requested or recommended.
    """
    names = list(configs) if configs else list(plans.recommended)
    if not names:
        raise PlanError(f"{where}: recommends no configuration; pass one with -c "
                        f"(planned: {', '.join(plans.configurations)})")
    resolved: list[str] = []
    for name in names:
        if name not in plans.configurations:
            raise PlanError(f"{where}: configuration {name!r} is not planned"
                            f"{did_you_mean(name, plans.configurations)}")
        if name not in resolved:
            resolved.append(name)
    return resolved


def run(work: Path, configs: Sequence[str] | None = None, workers: int | None = None,
        progress: ProgressFn | None = None) -> PreprocessSummary:
    """Preprocess every case of ``WORK`` for the given configurations; resumable.

    Args:
        work: the experiment folder (``plans.yaml`` and ``dataset.json`` from ``autoseg plan``).
        configs: configuration names (default: the plans' recommended ones).
        workers: worker processes (default: CPU count, bounded by free memory); 1 runs in-process.
        progress: called as ``progress(done, total)`` over the cases that need work.

    Returns:
        Per configuration: cases processed, reused and linked.

    Raises:
        PlanError: plans.yaml is missing or invalid, or a configuration is unknown.
        DatasetError: dataset.json is missing, the source dataset moved, or a case cannot be read.
        ConfigError: another ``autoseg preprocess`` is writing one of these configurations.
    """
    started = time.perf_counter()
    work = Path(work)
    plans_path = work / "plans.yaml"
    if not plans_path.is_file():
        raise PlanError(f"{plans_path}: not found; run 'autoseg plan RAW -o {work}' first")
    plans = plans_io.load(plans_path)
    names = resolve_configs(plans, configs, os.fspath(plans_path))
    cases = load_work_cases(work)

    # Configurations with identical data: the first of each digest computes, the others link.
    digests = {name: plan_digest(plans, name) for name in names}
    primary: dict[str, str] = {}
    for name in names:
        primary.setdefault(digests[name], name)

    with contextlib.ExitStack() as locks:  # one run per configuration folder at a time (creates the folders)
        for name in names:
            locks.enter_context(folder_lock(preprocessed_dir(work, name), "preprocess"))
        stale = {name: remove_stale_temp(preprocessed_dir(work, name)) for name in names}
        pending: dict[str, list[str]] = {}
        reused: dict[str, int] = {name: 0 for name in names}
        for case in cases:
            with_seg = case.label is not None
            for name in names:
                if is_finished(preprocessed_dir(work, name), case.case_id, digests[name], with_seg):
                    reused[name] += 1
                elif primary[digests[name]] == name:
                    pending.setdefault(case.case_id, []).append(name)

        by_id = {case.case_id: case for case in cases}
        # Largest cases first, so that no worker is left with a big one at the end.
        tasks = sorted((_Task(by_id[cid], tuple(cfgs)) for cid, cfgs in pending.items()),
                       key=lambda t: -estimate_case_bytes(t.case))
        n_workers = choose_preprocess_workers(workers, [t.case for t in tasks] or cases, plans, names)
        _run_tasks(tasks, plans, work, n_workers, progress)

        summaries: dict[str, ConfigSummary] = {}
        for name in names:
            source = primary[digests[name]]
            processed = 0
            if source != name:
                for case in cases:
                    if not is_finished(preprocessed_dir(work, name), case.case_id, digests[name], case.label is not None):
                        link_case(preprocessed_dir(work, source), preprocessed_dir(work, name), case.case_id)
                        processed += 1
            else:
                processed = sum(1 for cfgs in pending.values() if name in cfgs)
            summaries[name] = ConfigSummary(name, preprocessed_dir(work, name), len(cases), processed, reused[name],
                                            source if source != name else None, stale[name])
        return PreprocessSummary(summaries, n_workers, time.perf_counter() - started)
