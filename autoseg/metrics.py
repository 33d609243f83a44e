"""Segmentation metrics per case and label: Dice, IoU, HD95, NSD and voxel counts (numpy/scipy only).

Definitions (``A`` = predicted mask, ``B`` = reference mask of one label or region):

* **Dice** ``2|A∩B| / (|A| + |B|)``; **IoU** ``|A∩B| / |A∪B|``; ``tp``, ``fp``, ``fn``, ``n_ref``,
  ``n_pred`` are voxel counts.
* **Surfaces** are the mask voxels with at least one face neighbour outside the mask (binary
  erosion with 6-connectivity in 3D, 4-connectivity in 2D; voxels on the image border count as
  surface). A singleton image axis (a 2D image stored as ``(1, Y, X)``) is dropped first, so a 2D
  mask is not all surface.
* **HD95** is the 95th percentile (numpy's linear interpolation) of the *pooled* symmetric surface
  distances: the distances from every surface voxel of A to the surface of B and from every
  surface voxel of B to the surface of A, in one set. This is medpy's ``hd95``, used by nnU-Net v1
  and the BraTS/MSD-era evaluation scripts. MONAI's ``compute_hausdorff_distance(percentile=95)``
  instead takes the larger of the two directed 95th percentiles, which is >= this value.
* **NSD** (normalised surface Dice, Nikolov et al. 2021) at tolerance τ mm: the number of surface
  voxels of A within τ of B's surface plus those of B within τ of A's surface, over the number of
  surface voxels of both (voxel counting, distance ``<= τ``, as MONAI's ``compute_surface_dice``
  without sub-voxel surfaces; DeepMind's reference weights surfels by their area instead).

Distances are Euclidean in mm (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``)
and computed only inside the bounding box of ``A ∪ B`` plus one voxel: every surface voxel lies
inside it, so the exact distance transform gives the same values as on the whole image.

Empty masks:

* both empty: ``dice = iou = nsd = 1``, ``hd95 = 0`` in the per-case record — a correctly
  predicted absence is perfect. :func:`summarize` leaves such pairs out of its means by default and
  counts them (``n_both_empty``): on data where a structure is often absent, averaging in 1.0 for
  every absence hides a model that never finds it (33 OpenKBP CTs, a model with no brainstem
  overlap in any of the 28 patients who have one: brainstem "Dice 0.15"). nnU-Net v2 excludes them
  too (it scores the pair NaN). ``both_empty="perfect"`` keeps the old averages.
* one empty: ``dice = iou = nsd = 0``, ``hd95 = None`` — the distance to an empty surface is
  undefined; any stand-in (the image diagonal, 373 mm in the BraTS scripts) would depend on the
  image size and dominate the mean. :func:`summarize` reports ``None`` values as ``n_undefined``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

#: The metrics :func:`case_metrics` returns for each label, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "nsd", "tp", "fp", "fn", "n_ref", "n_pred")
#: Default NSD tolerance in mm (a common choice for organs; MSD/MONAI leave it to the task).
DEFAULT_NSD_TOLERANCE_MM = 2.0

LabelMetrics = dict[str, float | int | None]


def foreground_labels(labels: Mapping[str, Sequence[int] | int]) -> dict[str, tuple[int, ...]]:
    """The labels to score: every label except background (the one whose values are exactly ``[0]``).

    Args:
        labels: label name -> value(s); a list of several values is a region.

    Returns:
        Label name -> tuple of values, in the given order.
    """
    result: dict[str, tuple[int, ...]] = {}
    for name, values in labels.items():
        as_tuple = (int(values),) if isinstance(values, (int, np.integer)) else tuple(int(v) for v in values)
        if as_tuple != (0,):
            result[name] = as_tuple
    return result


def label_mask(seg: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of ``values`` (a region when there are several)."""
    if len(values) == 1:
        return seg == values[0]
    return np.isin(seg, np.asarray(values))


def both_empty_metrics() -> LabelMetrics:
    """The metrics of a label absent from both prediction and reference (see the module docstring)."""
    return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0, "n_ref": 0, "n_pred": 0}


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (outside the array counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface.

    Args:
        pred, ref: non-empty boolean masks of the same shape.
        spacing: voxel size in mm per array axis.

    Returns:
        ``(pred -> ref, ref -> pred)``: one distance per surface voxel of ``pred`` and of ``ref``.
    """
    # Only the bounding box matters (module docstring); one voxel of margin keeps the erosion at
    # the box edge the same as on the whole image.
    box = _bounding_box(pred | ref, margin=1)
    a, b = pred[box], ref[box]
    # A singleton image axis is a 2D image: erode and measure in the plane only.
    keep = [axis for axis, size in enumerate(pred.shape) if size > 1] or [0]
    a = a.reshape([a.shape[i] for i in keep])
    b = b.reshape([b.shape[i] for i in keep])
    sampling = [float(spacing[i]) for i in keep]
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return to_b, to_a


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, distances: bool = True) -> LabelMetrics:
    """Every metric of one predicted mask against its reference mask.

    Args:
        pred, ref: boolean masks of the same shape.
        spacing: voxel size in mm per array axis (``(z, y, x)``).
        nsd_tolerance_mm: NSD tolerance τ in mm.
        distances: compute HD95 and NSD (set False for a fast overlap-only result: both ``None``).

    Returns:
        ``{"dice", "iou", "hd95", "nsd", "tp", "fp", "fn", "n_ref", "n_pred"}`` as Python numbers;
        empty masks as in the module docstring.
    """
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref)) if n_pred and n_ref else 0
    counts = {"tp": tp, "fp": n_pred - tp, "fn": n_ref - tp, "n_ref": n_ref, "n_pred": n_pred}
    if n_pred == 0 and n_ref == 0:
        return {**both_empty_metrics(), **counts}
    if n_pred == 0 or n_ref == 0:
        return {"dice": 0.0, "iou": 0.0, "hd95": None, "nsd": 0.0, **counts}
    result: LabelMetrics = {
        "dice": 2.0 * tp / (n_pred + n_ref),
        "iou": tp / (n_pred + n_ref - tp),
        "hd95": None,
        "nsd": None,
        **counts,
    }
    if distances:
        to_ref, to_pred = surface_distances(pred, ref, spacing)
        pooled = np.concatenate([to_ref, to_pred])
        result["hd95"] = float(np.percentile(pooled, 95))
        within = np.count_nonzero(to_ref <= nsd_tolerance_mm) + np.count_nonzero(to_pred <= nsd_tolerance_mm)
        result["nsd"] = float(within / pooled.size)
    return result


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    labels: dict[str, list[int]],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, dict[str, float | int | None]]:
    """Metrics of one case for every foreground label (background, values ``[0]``, is skipped).

    Args:
        pred: predicted label map, ``(Z, Y, X)`` (or any shape equal to ``ref``'s).
        ref: reference label map.
        spacing: voxel size in mm in array order ``(z, y, x)``.
        labels: label name -> values; several values make a region (voxels whose label is in it).
        nsd_tolerance_mm: NSD tolerance τ in mm.

    Returns:
        Label name -> ``{"dice", "iou", "hd95", "nsd", "tp", "fp", "fn", "n_ref", "n_pred"}``
        (conventions for empty masks in the module docstring).

    Raises:
        ValueError: ``pred`` and ``ref`` differ in shape, or ``spacing`` has the wrong length.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D array")
    return {
        name: mask_metrics(label_mask(pred, values), label_mask(ref, values), spacing, nsd_tolerance_mm)
        for name, values in foreground_labels(labels).items()
    }


def dice_per_label(pred: np.ndarray, ref: np.ndarray,
                   labels: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
    """Dice of every foreground label only (no distances): the fast path for postprocessing decisions.

    Returns:
        Label name -> Dice, ``None`` for a label absent from both masks: such a pair is left out of
        the means that decide postprocessing, as :func:`summarize` leaves it out by default, so that
        find-best's choice and its postprocessing judge by the same numbers.
    """
    result: dict[str, float | None] = {}
    for name, values in foreground_labels(labels).items():
        metrics = mask_metrics(label_mask(pred, values), label_mask(ref, values), (1.0,) * pred.ndim,
                               distances=False)
        result[name] = None if is_both_empty(metrics) else float(metrics["dice"])  # type: ignore[arg-type]
    return result


def _stats(values: list[float | int | None]) -> dict[str, float | int | None]:
    defined = [float(v) for v in values if v is not None]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "median": float(np.median(defined)) if defined else None,
        "n": len(defined),
        "n_undefined": len(values) - len(defined),
    }


#: How :func:`summarize` treats a label absent from both prediction and reference: ``exclude``
#: (left out of every mean, counted; the default, as nnU-Net) or ``perfect`` (averaged in as Dice 1).
BOTH_EMPTY_POLICIES: tuple[str, ...] = ("exclude", "perfect")


def is_both_empty(record: Mapping[str, object]) -> bool:
    """True for a label absent from both prediction and reference (voxel counts both 0)."""
    return record.get("n_ref") == 0 and record.get("n_pred") == 0


def summarize(per_case: dict[str, dict[str, dict]], both_empty: str = "exclude") -> dict:
    """Aggregate per-case metrics: per label, the mean and median of every metric.

    Args:
        per_case: case id -> label name -> metrics (as :func:`case_metrics` returns them).
        both_empty: :data:`BOTH_EMPTY_POLICIES`: ``exclude`` leaves pairs where the label is
            absent from both out of the label's statistics; ``perfect`` averages them in (Dice 1).

    Returns:
        ``{"n_cases": int, "both_empty": policy, "labels": {label: {"n_both_empty": int,
        metric: {"mean", "median", "n", "n_undefined"}}}, "mean_foreground_dice": float | None}``.
        ``None`` values (HD95 with one empty mask) are left out of mean and median and counted in
        ``n_undefined``; ``mean_foreground_dice`` is the mean over labels of each label's mean Dice
        (nnU-Net's ``foreground_mean``). A label whose every pair is excluded still has every
        metric, with ``mean``/``median`` ``None`` and ``n`` 0, and is left out of
        ``mean_foreground_dice`` (``None`` when no label has a mean).

    Raises:
        ValueError: ``both_empty`` is not a policy.
    """
    if both_empty not in BOTH_EMPTY_POLICIES:
        raise ValueError(f"both_empty must be one of {BOTH_EMPTY_POLICIES}, not {both_empty!r}")
    label_names: list[str] = []
    for metrics in per_case.values():
        label_names.extend(name for name in metrics if name not in label_names)
    labels: dict[str, dict] = {}
    for name in label_names:
        records = [metrics[name] for metrics in per_case.values() if name in metrics]
        empty = sum(is_both_empty(r) for r in records)
        # Taken before the exclusion: a label absent from every pair still reports every metric,
        # as None over 0 pairs ("n/a"), never 0 or 1.
        metric_names = [m for m in METRIC_NAMES if any(m in r for r in records)]
        if both_empty == "exclude":
            records = [r for r in records if not is_both_empty(r)]
        labels[name] = {"n_both_empty": empty, **{m: _stats([r.get(m) for r in records]) for m in metric_names}}
    dice_means = [s["dice"]["mean"] for s in labels.values() if "dice" in s and s["dice"]["mean"] is not None]
    return {
        "n_cases": len(per_case),
        "both_empty": both_empty,
        "labels": labels,
        "mean_foreground_dice": float(np.mean(dice_means)) if dice_means else None,
    }


def mean_foreground_dice(per_case: dict[str, dict[str, dict]]) -> float | None:
    """Mean over foreground labels of the per-label mean Dice (see :func:`summarize`)."""
    return summarize(per_case)["mean_foreground_dice"]
