"""One pass over a dataset's cases: read each case once, check it and (optionally) fingerprint it.

``autoseg check`` and the fingerprint share this pass so that ``autoseg plan`` reads every file
exactly once. Cases are processed by a bounded pool of worker processes; results are sorted by
case id, so nothing depends on the number of workers or the order in which they finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.dataset import check
from autoseg.dataset import fingerprint
from autoseg.dataset import restoration as restoration_checks
from autoseg.dataset import super_resolution
from autoseg.dataset.layout import Case, DatasetSpec, Issue, rel
from autoseg.errors import DatasetError
from autoseg.imageio import Geometry, read_image
from autoseg.processes import pool_context

ProgressFn = Callable[[int, int], None]

#: Bytes of working memory per byte of (uncompressed) image while scanning a case: the image as
#: stored, a float64 copy of the foreground, masks. Used to bound the number of workers.
_MEMORY_PER_IMAGE_BYTE = 6
#: Typical gzip ratio of medical images, to estimate decompressed size from the file size.
_GZIP_RATIO = 8


@dataclass(frozen=True)
class CaseScan:
    """What one case's pass produced."""

    case_id: str
    issues: tuple[Issue, ...]
    dims: int | None
    record: fingerprint.CaseRecord | None
    samples: list[np.ndarray] | None
    #: Super-resolution: the integer refinement from the input's grid to its target's (z, y, x).
    upsample_factor: tuple[int, int, int] | None = None
    #: Super-resolution: the target file (relative to the dataset root), for messages about the factor.
    target_file: str | None = None


def scan_case(case: Case, spec: DatasetSpec, want_fingerprint: bool, quota: int) -> CaseScan:
    """Read one case's files once, check them, and fingerprint the case when asked and clean."""
    root = spec.root
    issues: list[Issue] = []
    channels: list[np.ndarray] = []
    geometries: list[tuple[Geometry, tuple[int, ...], str]] = []
    expected_per_file = spec.num_channels if len(case.images) == 1 else 1
    restoration = not spec.kind.labels  # clean targets instead of label maps (autoseg.dataset.kinds)
    for path in case.images:
        file = rel(root, path)
        try:
            array, geometry = read_image(path)
        except DatasetError as exc:
            issues.append(_read_issue(exc, case.case_id, file))
            continue
        if spec.num_channels and array.shape[0] != expected_per_file:
            issues.append(Issue("error", "wrong-channel-count",
                                f"file holds {array.shape[0]} channel(s), expected {expected_per_file} "
                                f"(dataset.json declares {spec.num_channels})",
                                "fix channel_names/modality in dataset.json or re-export the image",
                                case=case.case_id, file=file))
            continue
        for c, channel in enumerate(array):
            where = file if array.shape[0] == 1 else f"{file} [channel {c}]"
            issues.extend(check.check_image_values(channel, case=case.case_id, file=where))
            index = len(channels) + c
            names = spec.channel_names
            if restoration and index < len(names) and restoration_checks.is_ct_channel(names[index]):
                issues.extend(restoration_checks.check_ct_values(channel, case=case.case_id, file=where,
                                                                 degraded=True))
        channels.extend(array)
        geometries.append((geometry, array.shape[1:], file))

    for geometry, shape, file in geometries[1:]:
        issues.extend(check.compare_geometry(geometries[0][0], geometries[0][1], geometry, shape,
                                             what=f"channel file vs {geometries[0][2]}",
                                             case=case.case_id, file=file))
    label_array, target_geometry = None, None
    if case.label is not None and restoration:
        label_array, target_geometry = _scan_target(case, spec, channels, geometries, issues)
    elif case.label is not None:
        file = rel(root, case.label)
        try:
            label, label_geometry = read_image(case.label)
        except DatasetError as exc:
            issues.append(_read_issue(exc, case.case_id, file))
        else:
            if label.shape[0] != 1:
                issues.append(Issue("error", "wrong-channel-count",
                                    f"label file holds {label.shape[0]} channels/components, expected 1",
                                    "store the label map as a single-channel integer image",
                                    case=case.case_id, file=file))
            else:
                if spec.labels:  # no labels declared: one dataset.json error, not one per case
                    issues.extend(check.check_label_values(label[0], spec.label_values,
                                                           case=case.case_id, file=file))
                if geometries:
                    issues.extend(check.compare_geometry(geometries[0][0], geometries[0][1], label_geometry,
                                                         label.shape[1:], what="label vs image",
                                                         case=case.case_id, file=file))
                label_array = label[0]

    dims = geometries[0][0].ndim if geometries else None
    record, samples, factors = None, None, None
    clean = not any(i.severity == "error" for i in issues)
    if clean and target_geometry is not None and not spec.kind.same_grid and geometries:
        factors = super_resolution.grid_factors(geometries[0][0], target_geometry)
    if want_fingerprint and clean and label_array is not None and len(channels) == spec.num_channels:
        image = np.stack(channels)
        geometry = geometries[0][0]
        single_values = sorted(label.values[0] for label in spec.labels if not label.is_region)
        if restoration:
            # No labels: the intensity statistics come from the input's body voxels (their "foreground").
            label_array = restoration_checks.body_mask(image, spec.channel_names).astype(np.uint8)
            single_values = [0]
        record, samples = fingerprint.case_fingerprint(
            case.case_id, image, label_array, geometry.spacing, geometry.direction, single_values, quota)
        if factors is not None and target_geometry is not None:
            # Super-resolution is planned on the target's grid: its spacing and shape (the crop box
            # scaled to it); the intensity statistics are the coarse input's body voxels.
            record = _on_fine_grid(record, factors, target_geometry)
    target_file = rel(root, case.label) if factors is not None and case.label is not None else None
    return CaseScan(case.case_id, tuple(issues), dims, record, samples, factors, target_file)


def _on_fine_grid(record: fingerprint.CaseRecord, factors: tuple[int, int, int],
                  target_geometry: Geometry) -> fingerprint.CaseRecord:
    """A coarse input's case record as seen on its target's (fine) grid."""
    bbox = tuple((lo * k, hi * k) for (lo, hi), k in zip(record.bbox, factors))
    return dataclasses.replace(
        record, spacing=tuple(float(f"{s:.7g}") for s in target_geometry.spacing),
        shape=super_resolution.fine_shape(record.shape, factors),
        shape_after_crop=super_resolution.fine_shape(record.shape_after_crop, factors), bbox=bbox)


def _scan_target(case: Case, spec: DatasetSpec, channels: list[np.ndarray],
                 geometries: list[tuple[Geometry, tuple[int, ...], str]],
                 issues: list[Issue]) -> tuple[np.ndarray | None, Geometry | None]:
    """Read and check a restoration case's clean target (:func:`autoseg.dataset.restoration.check_target`),
    appending to ``issues``; returns the target and its geometry when it was read, else Nones."""
    assert case.label is not None
    file = rel(spec.root, case.label)
    try:
        target, target_geometry = read_image(case.label)
    except DatasetError as exc:
        issues.append(_read_issue(exc, case.case_id, file))
        return None, None
    if not geometries or len(channels) != spec.num_channels:
        return target, target_geometry
    image = np.stack(channels)
    issues.extend(restoration_checks.check_target(
        image, geometries[0][0], geometries[0][2], target, target_geometry, same_grid=spec.kind.same_grid,
        channel_names=spec.channel_names, case=case.case_id, file=file))
    return target, target_geometry


def _read_issue(exc: DatasetError, case_id: str, file: str) -> Issue:
    message = str(exc)
    # imageio errors start with the path; the table shows the file in its own column.
    problem = message.split(": ", 1)[1] if ": " in message else message
    code = "zero-size" if "zero size" in problem or "empty (0 bytes)" in problem else "unreadable"
    fix = "re-export or re-copy the file"
    if "; " in problem:
        problem, fix = problem.split("; ", 1)
    return Issue("error", code, problem, fix, case=case_id, file=file)


# ----------------------------------------------------------------------------------------------
# The pool


def _scan_task(args: tuple[Case, DatasetSpec, bool, int]) -> CaseScan:
    case, spec, want_fingerprint, quota = args
    try:
        return scan_case(case, spec, want_fingerprint, quota)
    except MemoryError:
        return CaseScan(case.case_id, (Issue("error", "out-of-memory", "ran out of memory reading this case",
                                             "rerun with fewer workers (-j 1)", case=case.case_id),), None, None, None)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a conservative 4 GB elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def estimate_case_bytes(case: Case) -> int:
    """Working memory of scanning a case, estimated from file sizes (no reads)."""
    total = 0
    for path in (*case.images, *( [case.label] if case.label else [])):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        total += size * (_GZIP_RATIO if path.name.lower().endswith((".gz", ".nrrd", ".mha")) else 1)
    return total * _MEMORY_PER_IMAGE_BYTE


def choose_workers(requested: int | None, cases: Sequence[Case]) -> int:
    """Workers to use: the request (default: CPU count), capped by the cases and by free memory."""
    cpus = os.cpu_count() or 1
    workers = cpus if requested is None or requested <= 0 else requested
    workers = min(workers, max(len(cases), 1))
    largest = max((estimate_case_bytes(c) for c in cases), default=0)
    if largest > 0:
        workers = min(workers, max(1, int(available_memory_bytes() * 0.7 // largest)))
    return max(1, workers)


def scan_dataset(
    spec: DatasetSpec,
    *,
    want_fingerprint: bool,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> list[CaseScan]:
    """Scan every case of ``spec``; results sorted by case id.

    Args:
        want_fingerprint: also compute per-case fingerprints (for clean cases).
        workers: processes to use (``None``: CPU count, bounded by memory); 1 runs in-process.
        progress: called as ``progress(done, total)`` after each case.
    """
    cases = list(spec.cases)
    quota = fingerprint.samples_quota(len(cases))
    tasks = [(case, spec, want_fingerprint, quota) for case in cases]
    n_workers = choose_workers(workers, cases)
    results: list[CaseScan] = []
    if n_workers <= 1:
        for task in tasks:
            results.append(_scan_task(task))
            if progress:
                progress(len(results), len(tasks))
    else:
        # Fork where safe (autoseg.processes); the pool is created before any progress thread runs.
        # Chunks keep the per-task overhead small for many tiny cases.
        context = pool_context()
        chunksize = max(1, min(8, len(tasks) // (n_workers * 8)))
        with context.Pool(n_workers) as pool:
            for result in pool.imap_unordered(_scan_task, tasks, chunksize=chunksize):
                results.append(result)
                if progress:
                    progress(len(results), len(tasks))
    results.sort(key=lambda r: r.case_id)
    return results


def dataset_issues(results: Sequence[CaseScan]) -> list[Issue]:
    """Dataset-wide issues that need every case's scan (mixed 2D/3D; super-resolution factors that differ)."""
    dims = {r.case_id: r.dims for r in results if r.dims is not None}
    issues = check.check_mixed_dims(dims)
    factors: dict[tuple[int, int, int], list[CaseScan]] = {}
    for r in results:
        if r.upsample_factor is not None:
            factors.setdefault(r.upsample_factor, []).append(r)
    if len(factors) > 1:
        # One network learns one refinement; prediction builds its output grid from that factor.
        # The dataset's factor is the commonest; a tie goes to the smallest (z, y, x compared in
        # turn), so the same cases are reported on every run and the message says it was a tie.
        common = min(factors, key=lambda f: (-len(factors[f]), f))
        for factor, scans in sorted(factors.items()):
            if factor == common:
                continue
            tie = len(scans) == len(factors[common])
            most = (f"as many cases by {common[::-1]} (a tie, given to the smaller factor in z, y, x order)" if tie
                    else f"most cases ({len(factors[common])}) by {common[::-1]}")
            issues.extend(Issue("error", "mixed-upsample-factor", f"target is its input refined by {factor[::-1]} "
                                f"(x, y, z), {most}",
                                "one super-resolution dataset has one factor: split it into one dataset per "
                                "factor", case=r.case_id, file=r.target_file) for r in scans)
    return issues


def files_checksum(spec: DatasetSpec, with_mtime: bool = False) -> str:
    """SHA-256 over dataset.json and every case file's relative path and size (and mtime if asked)."""
    digest = hashlib.sha256()
    meta = spec.root / "dataset.json"
    digest.update(meta.read_bytes() if meta.is_file() else b"")
    for case in spec.cases:
        for path in (*case.images, *([case.label] if case.label else [])):
            try:
                stat = path.stat()
                entry = [rel(spec.root, path), stat.st_size] + ([stat.st_mtime_ns] if with_mtime else [])
            except OSError:
                entry = [rel(spec.root, path), -1]
            digest.update(json.dumps(entry).encode("utf-8"))
    return digest.hexdigest()


def build_fingerprint(spec: DatasetSpec, results: Sequence[CaseScan]) -> fingerprint.Fingerprint:
    """Pool the per-case records of a clean scan into the dataset fingerprint."""
    scanned = [r for r in results if r.record is not None]
    if not scanned:
        raise DatasetError(f"{spec.root}: no case could be fingerprinted; run 'autoseg check {spec.root}'")
    dims = scanned[0].dims or 3
    records = tuple(r.record for r in scanned if r.record is not None)
    pooled = fingerprint.pool_intensities([r.samples or [] for r in scanned], spec.num_channels)
    labels = {label.name: list(label.values) for label in spec.labels}
    fp = fingerprint.Fingerprint(
        dataset_name=spec.name,
        dims=dims,
        channel_names=spec.channel_names,
        labels=labels,
        cases=records,
        intensity=pooled,
        files_sha256=files_checksum(spec),
        task=spec.task,
        upsample_factor=next((r.upsample_factor for r in scanned if r.upsample_factor is not None), None),
    )
    return fingerprint.Fingerprint(**{**fp.__dict__, "summary": fingerprint.summarize(fp)})


def write_fingerprint(path: Path, fp: fingerprint.Fingerprint) -> None:
    from autoseg.atomic import write_json

    write_json(path, _jsonable(fp.to_dict()))


def _jsonable(value: object) -> object:
    """Plain JSON types only; NaN (a channel without foreground) becomes null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
