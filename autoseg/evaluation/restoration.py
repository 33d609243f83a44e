"""``autoseg evaluate`` for restoration (denoising, super-resolution): PSNR, SSIM and RMSE in a HU window.

Layers (STYLE §2): :func:`autoseg.image_metrics.restoration_metrics` (arrays -> metrics, pure; the
definitions fold validation shares) → :func:`evaluate_restoration_case` (files of one case, and its
picture) → :func:`evaluate_restoration_pairs` (many cases, the bounded process pool of
:mod:`autoseg.evaluation.evaluate`) → :func:`run` (folders in, report files out).

Conventions (docs/evaluation.md, "Restoration"): the window, PSNR, RMSE, SSIM 2D and 3D are
:mod:`autoseg.image_metrics`'s. A case equal to its reference in the window has a null PSNR and a
warning. Means over cases are arithmetic means of the per-case values (PSNR in dB, as reported in
the literature), with their population standard deviation.

The reference folder is REF's ``targetsTr`` when REF is a restoration dataset (its dataset.json
says ``"task": "denoise"`` or ``"super-resolution"``), or REF itself. Case matching and missing
predictions behave as for segmentation (:func:`autoseg.evaluation.evaluate.match_cases`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.atomic import atomic_path, write_json, write_text
from autoseg.errors import ConfigError, DatasetError, UnknownNameError
from autoseg.evaluation.evaluate import (
    DEFAULT_REPORT_NAME,
    ProgressFn,
    choose_workers,
    geometry_problems,
    label_files,
    map_pool,
    match_cases,
    process_pool,
)
from autoseg.image_metrics import (
    DEFAULT_WINDOW,
    FULL,
    METRIC_KEYS,
    SSIM_3D_SLAB,
    SSIM_SETTINGS,
    SSIM_WIN_SIZE,
    Window,
    clip_to_window,
    data_range_of,
    restoration_metrics,
)
from autoseg.imageio import Geometry, read_image, read_info

REPORT_SCHEMA_VERSION = 1

#: dataset.json ``task`` values scored as restoration (the ones ``autoseg check`` accepts).
RESTORATION_DATASET_TASKS = ("denoise", "super-resolution")
#: Folders of clean targets in a restoration dataset: given as REF, its dataset.json sits beside them.
TARGET_FOLDERS = ("targetsTr", "targetsTs")
#: The ``--task`` choices of ``autoseg evaluate``.
EVALUATE_TASKS = ("auto", "segmentation", "restoration")

#: An integer image with 2 to this many distinct values is taken for a label map (a constant image
#: is not: it is scored, badly).
LABEL_MAP_MAX_VALUES = 16
#: Where the panel pictures go, inside the report's folder.
PANELS_FOLDER = "panels"

#: Working memory per voxel of one case: the files as read (up to float32 each: prediction,
#: reference, input) and the float64 clipped copies that the metrics use.
_BYTES_PER_VOXEL = 40
#: Working memory per voxel of an SSIM slab: skimage keeps about 20 float64 maps (inputs, local
#: means, variances, covariance and the terms of the SSIM map).
_SSIM_BYTES_PER_VOXEL = 160


def parse_window(text: str | None) -> Window:
    """``--window``: ``L,H`` in HU (``-1000,1000``), ``full``, or None for :data:`DEFAULT_WINDOW`.

    Raises:
        ConfigError: not two numbers with L < H, nor ``full``.
    """
    if text is None:
        return Window(*DEFAULT_WINDOW)
    if text.strip().lower() == "full":
        return FULL
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"--window {text!r}: expected two numbers in HU, 'L,H' (e.g. --window -1000,1000), "
                          "or 'full'")
    if low >= high:
        raise ConfigError(f"--window {text!r}: the lower bound must be below the upper one (e.g. -160,240)")
    return Window(low, high)


# ----------------------------------------------------------------------------------------------
# Arrays (the metrics themselves: autoseg.image_metrics)


def largest_error_slice(image: np.ndarray, reference: np.ndarray, window: Window, axis: int = 0) -> int:
    """The slice across ``axis`` with the largest mean squared error in the window (the panel's slice)."""
    errors = [float(np.mean(np.square(clip_to_window(np.take(image, k, axis), window)
                                      - clip_to_window(np.take(reference, k, axis), window))))
              for k in range(reference.shape[axis])]
    return int(np.argmax(errors)) if errors else 0


def render_panel(path: Path, image: np.ndarray, reference: np.ndarray, window: Window, *,
                 baseline: np.ndarray | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 0,
                 index: int | None = None, title: str = "",
                 psnr: tuple[float | None, float | None] = (None, None),
                 names: tuple[str, str] = ("low-dose input", "full-dose reference")) -> int:
    """Write a PNG: [low-dose |] restored | full-dose | restored - full-dose, one slice.

    The images share the window's gray scale (:data:`FULL`: the reference slice's min to max);
    the difference (of the clipped images, as scored) uses a diverging map symmetric about 0,
    ±the 99.5th percentile of its magnitude on the slice, so that a few outliers do not wash it out.

    Args:
        path: the PNG (written atomically).
        image, reference, baseline: ``(Z, Y, X)`` volumes of one shape; ``baseline`` is the
            degraded input (left out when None).
        axis, index: the slice (default index: :func:`largest_error_slice`).
        psnr: the restored and the input PSNR of the case, shown under their images.
        names: what the input and the reference are called (:func:`panel_names`).

    Returns:
        The slice index drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = largest_error_slice(image, reference, window, axis) if index is None else index
    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    aspect = float(spacing[rows_axis]) / float(spacing[cols_axis])
    ref = clip_to_window(np.take(reference, index, axis), window)
    img = clip_to_window(np.take(image, index, axis), window)
    if window.full:
        low, high = float(ref.min()), float(ref.max())
        high = high if high > low else low + 1.0
    else:
        low, high = float(window.low), float(window.high)
    difference = img - ref
    spread = float(np.percentile(np.abs(difference), 99.5)) if difference.size else 0.0
    spread = spread if spread > 0 else 1.0

    def _with_psnr(name: str, value: float | None) -> str:
        return name if value is None else f"{name}\nPSNR {value:.2f} dB"

    panels: list[tuple[str, np.ndarray, bool]] = []
    if baseline is not None:
        panels.append((_with_psnr(names[0], psnr[1]), clip_to_window(np.take(baseline, index, axis), window), False))
    panels += [(_with_psnr("restored", psnr[0]), img, False), (names[1], ref, False),
               ("restored - reference (HU)", difference, True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.9), squeeze=False)
    for ax, (name, plane, is_difference) in zip(axes[0], panels):
        if is_difference:
            shown = ax.imshow(plane, cmap="RdBu_r", vmin=-spread, vmax=spread, aspect=aspect,
                              interpolation="nearest")
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        else:
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return index


def panel_names(dataset_task: str | None) -> tuple[str, str]:
    """What a panel calls the input and the reference: low-dose/full-dose unless the dataset is super-resolution."""
    if dataset_task == "super-resolution":
        return "low-resolution input", "high-resolution reference"
    return "low-dose input", "full-dose reference"


# ----------------------------------------------------------------------------------------------
# Files


def dataset_task(folder: Path) -> str | None:
    """The ``task`` of ``folder/dataset.json``; None when there is none (or it cannot be read:
    segmentation's reader then says what is wrong with it)."""
    file = Path(folder) / "dataset.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    task = meta.get("task") if isinstance(meta, dict) else None
    return task if isinstance(task, str) else None


def reference_dataset_task(ref: Path) -> str | None:
    """The dataset task REF belongs to: REF's own dataset.json, or, for a ``targetsTr``/``targetsTs``
    folder, the one beside it."""
    ref = Path(ref)
    task = dataset_task(ref)
    if task is None and ref.name in TARGET_FOLDERS:
        task = dataset_task(ref.parent)
    return task


def detect_task(ref: Path, requested: str = "auto") -> str:
    """``restoration`` or ``segmentation``: as requested, or (``auto``) from REF's dataset.json.

    Raises:
        UnknownNameError: ``requested`` is not one of :data:`EVALUATE_TASKS`.
    """
    if requested not in EVALUATE_TASKS:
        raise UnknownNameError("evaluation task", requested, EVALUATE_TASKS, "--task")
    if requested != "auto":
        return requested
    return "restoration" if reference_dataset_task(ref) in RESTORATION_DATASET_TASKS else "segmentation"


def target_files(ref: Path) -> dict[str, Path]:
    """Case id -> clean reference image: REF's ``targetsTr`` when REF is a dataset, else REF's files.

    Raises:
        DatasetError: the folder is missing or a dataset has no ``targetsTr``.
    """
    ref = Path(ref)
    if (ref / "dataset.json").is_file():
        targets = ref / TARGET_FOLDERS[0]
        if not targets.is_dir():
            raise DatasetError(f"{ref}: a dataset without {TARGET_FOLDERS[0]}/; restoration is scored against "
                               f"the clean targets ({TARGET_FOLDERS[0]}/<case>.nii.gz); pass the folder that holds them")
        ref = targets
    files = label_files(ref, "images")
    if not files:
        raise DatasetError(f"{ref}: no reference images found (expected files such as case.nii.gz)")
    return files


def input_files(folder: Path, cases: Sequence[str]) -> dict[str, Path]:
    """Case id -> degraded input for ``cases``: ``<case>.ext``, or a raw dataset's ``<case>_0000.ext``.

    Raises:
        DatasetError: the folder is missing, or has no input for some of ``cases`` (named).
    """
    folder = Path(folder)
    wanted = set(cases)
    found: dict[str, Path] = {}
    for stem, path in label_files(folder, "low-dose images").items():
        match = re.fullmatch(r"(.+)_0000", stem)
        case = stem if stem in wanted else match.group(1) if match and match.group(1) in wanted else None
        if case is not None and (case not in found or stem == case):
            found[case] = path
    missing = sorted(wanted - set(found))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{folder}: no low-dose input for case(s) {', '.join(missing[:5])}{more} (looked for "
                           "<case>.nii.gz and <case>_0000.nii.gz); pass the folder of the inputs that were restored")
    return found


def read_intensity_image(path: Path, role: str, refuse_label_maps: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a single-channel real-valued image as ``(Z, Y, X)`` (dtype kept).

    Args:
        role: what the file is, for messages ("prediction", "reference", "input").
        refuse_label_maps: also refuse an integer image with 2 to :data:`LABEL_MAP_MAX_VALUES`
            distinct values (a label map handed to restoration scoring).

    Raises:
        DatasetError: unreadable, several channels, complex or non-finite values, or a label map.
    """
    array, geometry = read_image(path)
    if array.shape[0] != 1:
        raise DatasetError(f"{path}: {role} has {array.shape[0]} channels; restoration is scored on "
                           "single-channel images")
    image = array[0]
    if image.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: {role} has {image.dtype} voxels; restoration is scored on real-valued images")
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise DatasetError(f"{path}: {role} has {bad} NaN or Inf voxel(s); replace them before scoring")
    if refuse_label_maps and image.dtype.kind in "biu" and image.size:
        span = int(image.max()) - int(image.min())
        values = np.unique(image) if span <= 255 else None
        if values is not None and 2 <= len(values) <= LABEL_MAP_MAX_VALUES:
            shown = ", ".join(str(int(v)) for v in values[:8])
            raise DatasetError(f"{path}: {role} looks like a label map (values {shown}), not an image; restoration "
                               "is scored on intensity images (score label maps against label maps, without "
                               "--task restoration)")
    return image, geometry


def _check_grid(path: Path, image: np.ndarray, geometry: Geometry, ref_path: Path, reference: np.ndarray,
                ref_geometry: Geometry, role: str, case_id: str) -> list[str]:
    """Errors for a grid that differs from the reference's (shape first: one line, both shapes)."""
    if image.shape != reference.shape:
        raise DatasetError(f"{path}: {role} shape {tuple(image.shape)} differs from the reference {ref_path.name} "
                           f"shape {tuple(reference.shape)} (z, y, x); write it on the reference's grid")
    errors, warnings = geometry_problems(geometry, image.shape, ref_geometry, reference.shape)
    if errors:
        raise DatasetError(f"{path}: case {case_id!r}: {errors[0].replace('prediction', role)}; write it on the "
                           f"grid of its reference {ref_path} (same shape, spacing, origin, direction)")
    return [f"case {case_id!r}: {w.replace('prediction', role)}" for w in warnings]


@dataclass(frozen=True)
class RestorationCaseResult:
    """The scores of one case.

    Attributes:
        case_id: the case.
        restored: the prediction's metrics (:func:`restoration_metrics`).
        baseline: the degraded input's metrics, when it was given.
        data_range: the data range used.
        panel: the picture written, if any, and its slice index.
        warnings: one line each.
    """

    case_id: str
    restored: dict[str, float | int | None]
    baseline: dict[str, float | int | None] | None = None
    data_range: float = 0.0
    panel: Path | None = None
    panel_slice: int | None = None
    warnings: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The case's entry in the report's ``cases``."""
        out: dict[str, Any] = {"restored": _scores(self.restored), "data_range": self.data_range}
        if self.baseline is not None:
            out["input"] = _scores(self.baseline)
            out["psnr_gain_db"] = psnr_gain(self.restored, self.baseline)
        if self.panel is not None:
            out["panel"] = os.fspath(self.panel)
            out["panel_slice"] = self.panel_slice
        return out


def _scores(metrics: dict[str, float | int | None]) -> dict[str, float | int | None]:
    return {k: metrics[k] for k in (*METRIC_KEYS, "ssim_2d_slices")}


def psnr_gain(restored: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    """Restored PSNR - input PSNR in dB (None when either is undefined)."""
    if restored.get("psnr_db") is None or baseline.get("psnr_db") is None:
        return None
    return float(restored["psnr_db"]) - float(baseline["psnr_db"])


def evaluate_restoration_case(case_id: str, pred_path: Path, ref_path: Path, window: Window,
                              input_path: Path | None = None, panel_path: Path | None = None,
                              dataset_task: str | None = None, refuse_label_maps: bool = True,
                              ) -> RestorationCaseResult:
    """Read and score one case (and its degraded input), and write its panel.

    Args:
        case_id: the case, for messages.
        pred_path, ref_path, input_path: the restored image, its clean reference, the degraded input.
        window: the HU window.
        panel_path: the PNG to write (None: none).
        dataset_task: the reference dataset's task, which names the panel's images.
        refuse_label_maps: refuse integer images with few values (:func:`read_intensity_image`).

    Raises:
        DatasetError: a file cannot be read, is not a real-valued single-channel image, or is not on
            the reference's grid (the message names the file and both shapes).
    """
    from autoseg.overlay import axial_axis

    reference, ref_geometry = read_intensity_image(ref_path, "reference", refuse_label_maps)
    image, geometry = read_intensity_image(pred_path, "prediction", refuse_label_maps)
    warnings = _check_grid(pred_path, image, geometry, ref_path, reference, ref_geometry, "prediction", case_id)
    baseline = None
    if input_path is not None:
        baseline, input_geometry = read_intensity_image(input_path, "input", refuse_label_maps)
        if dataset_task == "super-resolution":  # the coarse input refined as the model's is: the cubic baseline
            from autoseg.preprocessing.super_resolution import onto_fine_grid

            baseline, input_geometry = onto_fine_grid(baseline, input_geometry, reference.shape, ref_geometry,
                                                      f"{input_path} (vs {ref_path.name})")
        warnings += _check_grid(input_path, baseline, input_geometry, ref_path, reference, ref_geometry, "input",
                                case_id)
    axis = axial_axis(ref_geometry)
    data_range = data_range_of(reference, window)
    restored = restoration_metrics(image, reference, window, axis=axis, data_range=data_range)
    scored_input = (restoration_metrics(baseline, reference, window, axis=axis, data_range=data_range)
                    if baseline is not None else None)
    if data_range <= 0:
        warnings.append(f"case {case_id!r}: the reference is constant, so the full range has no extent; "
                        "PSNR and SSIM are null (use --window L,H)")
    for name, scores in (("prediction", restored), ("input", scored_input)):
        if scores is not None and scores["rmse_hu"] == 0 and data_range > 0:
            warnings.append(f"case {case_id!r}: the {name} equals the reference in the window; PSNR is infinite "
                            "and recorded as null")
    if reference.ndim == 3 and reference.shape[0] > 1 and restored["ssim_3d"] is None and data_range > 0:
        warnings.append(f"case {case_id!r}: shape {tuple(reference.shape)} is below the {SSIM_WIN_SIZE}-voxel SSIM "
                        "window on an axis; SSIM 3D is null")
    index = None
    if panel_path is not None:
        index = largest_error_slice(image, reference, window, axis)
        render_panel(panel_path, image, reference, window, baseline=baseline, spacing=ref_geometry.spacing,
                     axis=axis, index=index,
                     title=f"{case_id}: axial slice {index} (largest restored error), window {window.describe()}",
                     psnr=(restored["psnr_db"], scored_input["psnr_db"] if scored_input else None),
                     names=panel_names(dataset_task))
    return RestorationCaseResult(case_id, restored, scored_input, data_range, panel_path, index, tuple(warnings))


def _case_bytes(paths: Sequence[Path], with_input: bool) -> int:
    """Working memory of the largest case, from the headers of the largest files (no pixels read)."""
    largest = sorted(paths, key=lambda p: p.stat().st_size if p.exists() else 0, reverse=True)[:5]
    worst = 0
    for path in largest:
        try:
            shape = read_info(path).shape
        except DatasetError:
            continue
        slab = (SSIM_3D_SLAB + SSIM_WIN_SIZE - 1) * shape[1] * shape[2]
        worst = max(worst, int(np.prod(shape)) * (_BYTES_PER_VOXEL + (12 if with_input else 0))
                    + slab * _SSIM_BYTES_PER_VOXEL)
    return worst


def _restoration_task(args: tuple[str, Path, Path, Window, Path | None, Path | None, str | None],
                      ) -> RestorationCaseResult:
    return evaluate_restoration_case(*args)


def evaluate_restoration_pairs(pairs: dict[str, tuple[Path, Path]], window: Window,
                               inputs: dict[str, Path] | None = None, panels: Path | None = None,
                               workers: int | None = None, progress: ProgressFn | None = None,
                               dataset_task: str | None = None) -> dict[str, RestorationCaseResult]:
    """Score many cases, case id -> ``(prediction, reference)``; results sorted by case id.

    Args:
        inputs: case id -> degraded input (scored as the baseline).
        panels: folder for the ``<case>.png`` pictures (None: none written).
        workers: processes (default: CPU count, bounded by free memory for the largest case).
        dataset_task: the reference dataset's task (names the panels' images).
    """
    tasks = [(case, pred, ref, window, inputs.get(case) if inputs else None,
              panels / f"{case}.png" if panels is not None else None, dataset_task)
             for case, (pred, ref) in sorted(pairs.items())]
    n_workers = choose_workers(workers, len(tasks), _case_bytes([ref for _, ref in pairs.values()], bool(inputs)))
    with process_pool(n_workers) as pool:
        results = {r.case_id: r for r in map_pool(_restoration_task, tasks, pool, progress)}
    return dict(sorted(results.items()))


# ----------------------------------------------------------------------------------------------
# The stage


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present)), "n": len(present)}


def summarize_restoration(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, population std and count of each metric over the cases (null values left out)."""
    summary: dict[str, Any] = {"n_cases": len(cases)}
    for image in ("restored", "input"):
        scored = [record[image] for record in cases.values() if image in record]
        if scored:
            summary[image] = {key: _stats([s[key] for s in scored]) for key in METRIC_KEYS}
    if any("psnr_gain_db" in record for record in cases.values()):
        summary["psnr_gain_db"] = _stats([record.get("psnr_gain_db") for record in cases.values()])
    return summary


@dataclass(frozen=True)
class RestorationReport:
    """Everything restoration scoring computed (serialised by :meth:`to_dict`)."""

    pred: Path
    ref: Path
    dataset_task: str | None
    window: Window
    cases: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    missing_predictions: tuple[str, ...]
    warnings: tuple[str, ...]
    baseline_input: Path | None = None
    panels: Path | None = None
    json_path: Path | None = None
    csv_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "task": "restoration",
            "dataset_task": self.dataset_task,
            "pred": os.fspath(self.pred),
            "ref": os.fspath(self.ref),
            "baseline_input": None if self.baseline_input is None else os.fspath(self.baseline_input),
            "window": self.window.to_dict(),
            "definitions": {
                "psnr_db": "10 log10(data_range^2 / MSE) over the case, both images clipped to the window "
                           "(skimage peak_signal_noise_ratio); null when MSE is 0",
                "rmse_hu": "sqrt(MSE) in HU, both images clipped to the window",
                "ssim_2d": "mean of the SSIM of each axial slice",
                "ssim_3d": "SSIM over the volume (channel_axis None)",
                "ssim_settings": SSIM_SETTINGS,
                "psnr_gain_db": "restored PSNR - input PSNR",
                "summary": "arithmetic mean and population std over the cases (null values left out)",
                "panels": "one axial slice per case: the slice where the restored image's mean squared error "
                          "in the window is largest",
            },
            "panels": None if self.panels is None else os.fspath(self.panels),
            "cases": self.cases,
            "summary": self.summary,
            "missing_predictions": list(self.missing_predictions),
            "warnings": list(self.warnings),
        }


def csv_text(cases: dict[str, dict[str, Any]], window: Window) -> str:
    """One row per case: the window and data range, the restored scores, then the input's and the gain."""
    with_input = any("input" in record for record in cases.values())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "window", "data_range", *METRIC_KEYS,
                     *([f"input_{k}" for k in METRIC_KEYS] + ["psnr_gain_db"] if with_input else [])])
    name = "full" if window.full else f"[{window.low:g}, {window.high:g}]"

    def cell(value: Any) -> Any:
        return "" if value is None else value

    for case, record in cases.items():
        row = [case, name, record["data_range"], *(cell(record["restored"][k]) for k in METRIC_KEYS)]
        if with_input:
            row += [*(cell(record.get("input", {}).get(k)) for k in METRIC_KEYS), cell(record.get("psnr_gain_db"))]
        writer.writerow(row)
    return buffer.getvalue()


def run(pred: Path, ref: Path, output: Path | None = None, window: Window | None = None,
        baseline_input: Path | None = None, workers: int | None = None, progress: ProgressFn | None = None,
        panels: bool = True) -> RestorationReport:
    """Score restored images in PRED against the clean references in REF; write JSON, CSV and panels.

    Args:
        pred: folder of restored images (case id = file name without its ending).
        ref: folder of clean reference images, a restoration dataset root (its ``targetsTr``), or
            its ``targetsTr``.
        output: JSON report (default ``PRED/evaluation.json``); the CSV goes beside it and the
            panels into ``panels/`` beside it.
        window: the HU window (default :data:`DEFAULT_WINDOW`).
        baseline_input: folder of the degraded inputs (``<case>`` or ``<case>_0000`` files), scored
            against the same references as a baseline (a super-resolution dataset's coarse inputs
            are refined onto the references' grid by cubic interpolation first: the cubic baseline).
        workers: processes (default: CPU count, bounded by free memory).
        progress: called as ``progress(done, total)`` after each case.
        panels: write ``panels/<case>.png``.

    Raises:
        DatasetError: missing folders or files, a prediction without reference, a file not on its
            reference's grid, or not a real-valued image.
    """
    pred, ref = Path(pred), Path(ref)
    window = window if window is not None else Window(*DEFAULT_WINDOW)
    pairs, missing = match_cases(label_files(pred, "images"), target_files(ref), pred, ref, "images")
    inputs = input_files(baseline_input, list(pairs)) if baseline_input is not None else None
    json_path = Path(output) if output is not None else pred / DEFAULT_REPORT_NAME
    panels_dir = json_path.parent / PANELS_FOLDER if panels else None
    task = reference_dataset_task(ref)
    results = evaluate_restoration_pairs(pairs, window, inputs, panels_dir, workers, progress, task)
    cases = {case: r.record() for case, r in results.items()}
    warnings = [w for r in results.values() for w in r.warnings]
    if missing:
        warnings.insert(0, f"{len(missing)} reference case(s) have no prediction and were not scored: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    report = RestorationReport(pred, ref, task, window, cases, summarize_restoration(cases),
                               tuple(missing), tuple(warnings), baseline_input, panels_dir)
    csv_path = json_path.with_suffix(".csv") if json_path.suffix else json_path.with_name(json_path.name + ".csv")
    write_json(json_path, report.to_dict())
    write_text(csv_path, csv_text(cases, window))
    return RestorationReport(**{**report.__dict__, "json_path": json_path, "csv_path": csv_path})
