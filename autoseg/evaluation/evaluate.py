"""``autoseg evaluate``: score a folder of predicted label maps against references.

Layers (STYLE §2): :func:`evaluate_arrays` (arrays -> metrics, pure) → :func:`evaluate_case`
(files of one case) → :func:`evaluate_pairs` (many cases, a bounded process pool) → :func:`run`
(folders in, report files out).

Matching: a case id is a file name without its ending (``case_001.nii.gz`` -> ``case_001``). REF is
a folder of label maps or a raw dataset root (its ``labelsTr`` via :func:`autoseg.dataset.layout.load_dataset`).
A prediction without a reference is an error (it would be silently unscored); a reference without
a prediction is listed in the report's ``missing_predictions`` and printed as a warning, and only
the predicted cases are scored, so a partial prediction run can be evaluated.

Labels come from ``--labels`` (a dataset.json, or a folder holding one: a raw dataset or WORK), else
from REF's dataset.json when REF is a dataset, else every nonzero value found in PRED or REF (named
by its value). Metric definitions and empty-mask conventions: :mod:`autoseg.metrics`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from autoseg.atomic import write_json, write_text
from autoseg.errors import DatasetError, UnknownNameError
from autoseg.imageio import Geometry, read_image, read_info, strip_ending
from autoseg.metrics import BOTH_EMPTY_POLICIES, METRIC_NAMES, both_empty_metrics, summarize
from autoseg.tasks import get_task
from autoseg.processes import pool_context

ProgressFn = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")

REPORT_SCHEMA_VERSION = 1
#: Name of the report written into PRED when no ``--output`` is given.
DEFAULT_REPORT_NAME = "evaluation.json"
#: Label folders of a raw dataset: given as REF, the dataset.json beside them names the labels.
LABEL_FOLDERS = ("labelsTr", "labelsTs")
#: Working memory per voxel of one case: two label maps (up to int32 after conversion), boolean
#: masks, and the float64 distance transform over the bounding box.
_BYTES_PER_VOXEL = 32
HD95_DEFINITION = ("95th percentile of the pooled symmetric surface distances (medpy hd95, nnU-Net v1); "
                   "null when exactly one of prediction and reference is empty")


@dataclass(frozen=True)
class CaseResult:
    """The metrics of one case and what was noticed reading it.

    Attributes:
        case_id: the case.
        metrics: label name -> metrics.
        found_values: nonzero label values present in the prediction or the reference.
        warnings: one line each (undeclared label values, sub-voxel geometry differences).
    """

    case_id: str
    metrics: dict[str, dict[str, float | int | None]]
    found_values: tuple[int, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluationReport:
    """Everything ``autoseg evaluate`` computed (serialised by :meth:`to_dict`)."""

    pred: Path
    ref: Path
    labels: dict[str, list[int]]
    labels_source: str
    tolerance_mm: float
    cases: dict[str, dict[str, dict[str, float | int | None]]]
    summary: dict[str, Any]
    missing_predictions: tuple[str, ...]
    warnings: tuple[str, ...]
    json_path: Path | None = None
    csv_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "pred": os.fspath(self.pred),
            "ref": os.fspath(self.ref),
            "labels": self.labels,
            "labels_source": self.labels_source,
            "nsd_tolerance_mm": self.tolerance_mm,
            "hd95_definition": HD95_DEFINITION,
            "cases": self.cases,
            "summary": self.summary,
            "missing_predictions": list(self.missing_predictions),
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------
# Finding files and labels


def label_files(folder: Path, what: str = "label maps") -> dict[str, Path]:
    """Case id -> file for every supported image file in ``folder`` (hidden files skipped).

    Args:
        what: what the files are, for the error message (restoration scoring passes "images").

    Raises:
        DatasetError: the folder does not exist, or two files map to one case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found; pass a folder of {what}")
    files: dict[str, Path] = {}
    for name in sorted(os.listdir(folder)):
        stem, ending = strip_ending(name)
        if name.startswith(".") or not ending or not (folder / name).is_file():
            continue
        if stem in files:
            raise DatasetError(f"{folder}: {files[stem].name} and {name} are both case {stem!r}; "
                               "keep one file per case")
        files[stem] = folder / name
    return files


def _labels_from_mapping(raw: object, where: str) -> dict[str, list[int]]:
    """Labels of a dataset.json ``labels`` entry (nnU-Net v2 or MSD style) as name -> values."""
    from autoseg.dataset.layout import parse_labels

    issues: list = []
    labels = parse_labels({"labels": raw}, issues)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise DatasetError(f"{where}: {errors[0].problem}; {errors[0].fix}")
    return {label.name: list(label.values) for label in labels}


def labels_from_file(path: Path) -> dict[str, list[int]]:
    """Labels from a dataset.json, or from the dataset.json inside a folder (raw dataset or WORK).

    Raises:
        DatasetError: no such file, invalid JSON, or no valid ``labels`` in it.
    """
    path = Path(path)
    file = path / "dataset.json" if path.is_dir() else path
    if not file.is_file():
        raise DatasetError(f"{file}: not found; --labels takes a dataset.json or a folder that holds one")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{file}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DatasetError(f"{file}: has no 'labels'; add e.g. \"labels\": {{\"background\": 0, \"organ\": 1}}")
    return _labels_from_mapping(meta["labels"], os.fspath(file))


def reference_files(ref: Path) -> tuple[dict[str, Path], dict[str, list[int]] | None]:
    """Case id -> reference label map, and the labels when REF is a dataset.

    Args:
        ref: a folder of label maps, or a raw dataset root (one with dataset.json: its labelsTr).

    Raises:
        DatasetError: the folder is missing, or REF's dataset.json cannot be read.
    """
    from autoseg.dataset.layout import load_dataset

    ref = Path(ref)
    if not (ref / "dataset.json").is_file():
        return label_files(ref), None
    spec, issues = load_dataset(ref)
    if spec is None:
        first = next((i for i in issues if i.severity == "error"), None)
        detail = f"{first.problem}; {first.fix}" if first else "dataset.json cannot be read"
        raise DatasetError(f"{ref / 'dataset.json'}: {detail}")
    files = {case.case_id: case.label for case in spec.cases if case.label is not None}
    if not files:
        raise DatasetError(f"{ref}: the dataset has no readable label files in labelsTr/; "
                           f"run 'autoseg check {ref}'")
    return files, {label.name: list(label.values) for label in spec.labels}


# ----------------------------------------------------------------------------------------------
# One case


def read_label_map(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read a single-channel label map as an integer ``(Z, Y, X)`` array.

    Raises:
        DatasetError: unreadable, several channels, or non-integer values.
    """
    array, geometry = read_image(path)
    if array.shape[0] != 1:
        raise DatasetError(f"{path}: label map has {array.shape[0]} channels; write one integer label per voxel")
    seg = array[0]
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)) or not np.array_equal(seg, np.round(seg)):
            raise DatasetError(f"{path}: label map holds non-integer values; write integer labels")
        seg = seg.astype(np.int32)
    elif seg.dtype.kind == "b":
        seg = seg.astype(np.uint8)
    return seg, geometry


def geometry_problems(pred: Geometry, pred_shape: tuple[int, ...], ref: Geometry,
                      ref_shape: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """Differences between a prediction's and its reference's voxel grid.

    Uses the tolerances of ``autoseg check`` (spacing 1e-3 relative, origin 1e-3 mm; an origin
    shift below half a voxel or a rounding-level direction difference is only a warning).

    Returns:
        ``(errors, warnings)``, one line each.
    """
    from autoseg.dataset.check import compare_geometry

    issues = compare_geometry(pred, pred_shape, ref, ref_shape, what="prediction vs reference", case="", file="")
    return ([i.problem for i in issues if i.severity == "error"],
            [i.problem for i in issues if i.severity == "warning"])


def present_values(seg: np.ndarray) -> tuple[int, ...]:
    """The nonzero values in a label map, sorted."""
    if seg.dtype.kind in "ui" and seg.size and int(seg.min()) >= 0 and int(seg.max()) < 2**16:
        counts = np.bincount(seg.ravel())
        values = np.flatnonzero(counts)
    else:
        values = np.unique(seg)
    return tuple(int(v) for v in values if v != 0)


def evaluate_arrays(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
    labels: dict[str, list[int]] | None, tolerance_mm: float,
) -> tuple[dict[str, dict], tuple[int, ...]]:
    """Metrics of one case's arrays.

    Args:
        labels: the labels to score; ``None``: every nonzero value present in ``pred`` or ``ref``,
            named by its value.

    Returns:
        Label name -> metrics, and the nonzero values present in either array.
    """
    found = tuple(sorted(set(present_values(pred)) | set(present_values(ref))))
    chosen = labels if labels is not None else {str(v): [v] for v in found}
    # Files carry no task name; label maps are segmentation's (the only task whose outputs are files of labels).
    return get_task(None, chosen).score_case(pred, ref, spacing, nsd_tolerance_mm=tolerance_mm), found


def evaluate_case(case_id: str, pred_path: Path, ref_path: Path, labels: dict[str, list[int]] | None,
                  tolerance_mm: float) -> CaseResult:
    """Read and score one case.

    Raises:
        DatasetError: a file cannot be read, or the grids differ (the message names the case).
    """
    pred, pred_geometry = read_label_map(pred_path)
    ref, ref_geometry = read_label_map(ref_path)
    errors, geometry_warnings = geometry_problems(pred_geometry, pred.shape, ref_geometry, ref.shape)
    if errors:
        raise DatasetError(f"{pred_path}: case {case_id!r}: {errors[0]}; write the prediction on the grid of "
                           f"its reference {ref_path} (same shape, spacing, origin, direction)")
    metrics, found = evaluate_arrays(pred, ref, ref_geometry.spacing, labels, tolerance_mm)
    warnings = [f"case {case_id!r}: {w}" for w in geometry_warnings]
    if labels is not None:
        declared = {v for values in labels.values() for v in values}
        undeclared = sorted(set(found) - declared)
        if undeclared:
            warnings.append(f"case {case_id!r}: label value(s) {undeclared} are not in the labels; "
                            "they count as background")
    return CaseResult(case_id, metrics, found, tuple(warnings))


# ----------------------------------------------------------------------------------------------
# Many cases: a bounded process pool (the pattern of autoseg.dataset.scan)


def choose_workers(requested: int | None, n_tasks: int, bytes_per_task: int) -> int:
    """Worker processes: the request (default: CPU count), capped by the tasks and by free memory."""
    from autoseg.dataset.scan import available_memory_bytes

    workers = requested if requested and requested > 0 else (os.cpu_count() or 1)
    workers = min(workers, max(n_tasks, 1))
    if bytes_per_task > 0:
        workers = min(workers, max(1, int(available_memory_bytes() * 0.7 // bytes_per_task)))
    return max(1, workers)


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of ``workers`` processes, or None for 1 (work runs in-process, as tests need).

    Create it before any progress bar starts: fork is cheap and these stages import no torch, but a
    forked child must not inherit a running refresh thread.
    """
    if workers <= 1:
        yield None
        return
    context = pool_context()
    with context.Pool(workers) as pool:
        yield pool


def map_pool(func: Callable[[T], R], tasks: Sequence[T], pool: multiprocessing.pool.Pool | None,
             progress: ProgressFn | None = None) -> Iterator[R]:
    """``func`` over ``tasks`` in ``pool`` (None: in-process), results in completion order.

    A worker's exception (an :class:`~autoseg.errors.AutosegError` included) is re-raised here with
    its message; leaving :func:`process_pool` then terminates the other workers.
    """
    results = map(func, tasks) if pool is None else pool.imap_unordered(func, tasks)
    for done, result in enumerate(results, start=1):
        if progress:
            progress(done, len(tasks))
        yield result


def _case_bytes(paths: Sequence[Path]) -> int:
    """Working memory of the largest case, from the headers of the largest files (no pixels read)."""
    largest = sorted(paths, key=lambda p: p.stat().st_size if p.exists() else 0, reverse=True)[:5]
    voxels = 0
    for path in largest:
        try:
            info = read_info(path)
        except DatasetError:
            continue
        voxels = max(voxels, int(np.prod(info.shape)))
    return voxels * _BYTES_PER_VOXEL


def _evaluate_task(args: tuple[str, Path, Path, dict[str, list[int]] | None, float]) -> CaseResult:
    return evaluate_case(*args)


def evaluate_pairs(pairs: dict[str, tuple[Path, Path]], labels: dict[str, list[int]] | None,
                   tolerance_mm: float, workers: int | None = None,
                   progress: ProgressFn | None = None) -> dict[str, CaseResult]:
    """Score many cases, case id -> ``(prediction file, reference file)``; results sorted by case id.

    With ``labels=None`` every label found in any case is scored in every case (a label absent
    from both files of a case scores as both-empty).
    """
    tasks = [(case, pred, ref, labels, tolerance_mm) for case, (pred, ref) in sorted(pairs.items())]
    n_workers = choose_workers(workers, len(tasks), _case_bytes([ref for _, ref in pairs.values()]))
    with process_pool(n_workers) as pool:
        results = {r.case_id: r for r in map_pool(_evaluate_task, tasks, pool, progress)}
    results = dict(sorted(results.items()))
    if labels is None:
        every = sorted({v for r in results.values() for v in r.found_values})
        results = {case: CaseResult(case, {str(v): r.metrics.get(str(v), both_empty_metrics()) for v in every},
                                    r.found_values, r.warnings)
                   for case, r in results.items()}
    return results


# ----------------------------------------------------------------------------------------------
# The stage


def match_cases(pred_files: dict[str, Path], ref_files: dict[str, Path], pred: Path,
                ref: Path, what: str = "label maps") -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pair predictions with references.

    Args:
        what: what the predictions are, for the error message (restoration passes "images").

    Returns:
        Case id -> ``(prediction, reference)``, and the reference cases without a prediction.

    Raises:
        DatasetError: PRED holds no file, or a prediction has no reference (names the cases).
    """
    if not pred_files:
        raise DatasetError(f"{pred}: no {what} found (expected files such as case.nii.gz)")
    orphans = sorted(set(pred_files) - set(ref_files))
    if orphans:
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        raise DatasetError(f"{pred}: prediction(s) without a reference in {ref}: "
                           f"{', '.join(orphans[:5])}{more}; remove them or pass the right reference folder")
    pairs = {case: (pred_files[case], ref_files[case]) for case in sorted(pred_files)}
    return pairs, sorted(set(ref_files) - set(pred_files))


def csv_text(cases: dict[str, dict[str, dict[str, float | int | None]]]) -> str:
    """One row per case and label: ``case,label,dice,iou,hd95,nsd,tp,fp,fn,n_ref,n_pred`` (null = empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", *METRIC_NAMES])
    for case, per_label in cases.items():
        for label, metrics in per_label.items():
            writer.writerow([case, label, *("" if metrics.get(m) is None else metrics[m] for m in METRIC_NAMES)])
    return buffer.getvalue()


def write_report(report: EvaluationReport, json_path: Path) -> tuple[Path, Path]:
    """Write the report as JSON and, beside it, as CSV (same name, ``.csv``); both atomically."""
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv") if json_path.suffix else json_path.with_name(json_path.name + ".csv")
    write_json(json_path, report.to_dict())
    write_text(csv_path, csv_text(report.cases))
    return json_path, csv_path


def run(pred: Path, ref: Path, labels_file: Path | None = None, output: Path | None = None,
        tolerance_mm: float = 2.0, workers: int | None = None,
        progress: ProgressFn | None = None, both_empty: str = "exclude") -> EvaluationReport:
    """Evaluate PRED against REF and write the JSON and CSV reports.

    Args:
        pred: folder of predicted label maps.
        ref: folder of reference label maps, or a raw dataset root.
        labels_file: dataset.json, or a folder holding one, that declares the labels.
        output: JSON report path (default ``PRED/evaluation.json``); the CSV goes beside it.
        tolerance_mm: NSD tolerance in mm.
        workers: processes (default: CPU count, bounded by free memory).
        progress: called as ``progress(done, total)`` after each case.
        both_empty: how the summary treats a label absent from both prediction and reference
            (:data:`autoseg.metrics.BOTH_EMPTY_POLICIES`; default: left out of the means, counted).

    Raises:
        DatasetError: missing folders or files, a prediction without reference, mismatched grids.
        UnknownNameError: ``both_empty`` is not a policy.
    """
    if both_empty not in BOTH_EMPTY_POLICIES:
        raise UnknownNameError("--both-empty policy", both_empty, BOTH_EMPTY_POLICIES, "--both-empty")
    pred, ref = Path(pred), Path(ref)
    if tolerance_mm < 0:
        from autoseg.errors import ConfigError

        raise ConfigError(f"--tolerance {tolerance_mm}: the NSD tolerance must be >= 0 mm")
    ref_files, ref_labels = reference_files(ref)
    pairs, missing = match_cases(label_files(pred), ref_files, pred, ref)
    if labels_file is not None:
        labels, source = labels_from_file(labels_file), os.fspath(labels_file)
    elif ref_labels is not None:
        labels, source = ref_labels, os.fspath(ref / "dataset.json")
    elif ref.name in LABEL_FOLDERS and (ref.parent / "dataset.json").is_file():
        # REF is a dataset's labelsTr/: its dataset.json names the labels (numbers otherwise).
        labels, source = labels_from_file(ref.parent), os.fspath(ref.parent / "dataset.json")
    else:
        labels, source = None, "values found in the label maps"
    results = evaluate_pairs(pairs, labels, tolerance_mm, workers, progress)
    cases = {case: r.metrics for case, r in results.items()}
    if labels is None:
        every = sorted({v for r in results.values() for v in r.found_values})
        labels = {"background": [0], **{str(v): [v] for v in every}}
    warnings = [w for r in results.values() for w in r.warnings]
    if missing:
        warnings.insert(0, f"{len(missing)} reference case(s) have no prediction and were not scored: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    report = EvaluationReport(pred, ref, labels, source, tolerance_mm, cases, summarize(cases, both_empty),
                              tuple(missing), tuple(warnings))
    json_path, csv_path = write_report(report, Path(output) if output is not None else pred / DEFAULT_REPORT_NAME)
    return EvaluationReport(**{**report.__dict__, "json_path": json_path, "csv_path": csv_path})
