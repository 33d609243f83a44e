"""Per-case preprocessing and its exact inverse: pure functions on arrays, no files.

Forward (:func:`preprocess_case`), in nnU-Net v2's order (``DefaultPreprocessor.run_case_npy``)::

    transpose (plans.transpose) -> crop to the nonzero box -> normalise per channel -> resample

Inverse (:func:`revert_to_original`, :func:`export_segmentation`): resample back to the cropped
shape, paste into the full (transposed) grid, transpose back. The ``props`` dict the forward pass
returns holds everything the inverse needs and is JSON-serialisable (it is stored next to the
arrays as ``<case>.json``).

Training and prediction call the same functions, so a prediction goes back into exactly the
geometry the image came from.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import numpy as np

from autoseg.dataset.fingerprint import bbox_of, nonzero_box, nonzero_mask
from autoseg.imageio import Geometry
from autoseg.plans import Configuration, Plans, foreground_label_values
from autoseg.preprocessing.normalization import normalize_channel
from autoseg.preprocessing.resample import (
    compute_new_shape,
    resample_image,
    resample_labels,
    resample_nearest,
    resample_rows,
    rows_resamplable,
    separate_z_axis,
)

#: Bump when the forward pass changes its output for the same plan: old files are then redone.
PREPROCESSING_VERSION = 1
#: Foreground voxels remembered per class for oversampling (nnU-Net v2: 10 000).
CLASS_LOCATION_SAMPLES = 10_000

Props = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# What the data depends on


def plan_digest(plans: Plans, config_name: str) -> str:
    """SHA-256 of everything in the plans that the preprocessed arrays depend on.

    That is the transpose, labels, channels, the fingerprint the plan came from, and the
    configuration's dims, spacing, normalisation and resampling — not its patch, batch or network,
    so re-planning a network does not redo preprocessing, and configurations with the same data
    (``2d`` and ``2.5d``; ``3d_fullres`` and ``3d_cascade_fullres``) share one digest.

    Raises:
        PlanError: ``config_name`` is not in the plans.
    """
    config = plans.configuration(config_name)
    record = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "transpose": list(plans.transpose),
        "labels": {k: list(v) for k, v in sorted(plans.labels.items())},
        "channel_names": list(plans.channel_names),
        "fingerprint_sha256": plans.fingerprint_sha256,
        "dims": config.dims,
        # 2D configurations keep each case's own spacing on axis 0; its planned value is unused.
        "spacing": [float(s) for s in (config.spacing[1:] if config.dims == 2 else config.spacing)],
        "normalization": [
            {"scheme": n.scheme, "use_mask": n.use_mask, "clip": list(n.clip) if n.clip else None,
             "mean": n.mean, "std": n.std}
            for n in config.normalization
        ],
        "resampling": {
            "image_order": config.resampling.image_order,
            "label_order": config.resampling.label_order,
            "order_z": config.resampling.order_z,
            "anisotropy_threshold": config.resampling.anisotropy_threshold,
        },
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def foreground_values(plans: Plans) -> list[int]:
    """Every foreground label value the plans declare (regions contribute their values)."""
    return foreground_label_values(plans.labels)


def label_dtype(plans: Plans) -> np.dtype:
    """int8 for label values up to 127, else int16 (nnU-Net stores segmentations as int8/int16)."""
    largest = max([0, *foreground_values(plans)])
    return np.dtype(np.int8) if largest <= np.iinfo(np.int8).max else np.dtype(np.int16)


def target_spacing(config: Configuration, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """The spacing a case is resampled to (array order after transpose).

    3D configurations resample all three axes. 2D configurations (``2d``, ``2.5d``) resample only
    in-plane: axis 0 keeps the case's own spacing, as nnU-Net does for its 2D configuration.
    """
    if config.dims == 2:
        return (float(spacing[0]), float(config.spacing[1]), float(config.spacing[2]))
    return (float(config.spacing[0]), float(config.spacing[1]), float(config.spacing[2]))


def resampling_axis(config: Configuration, spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> int | None:
    """The separately resampled axis: always 0 for 2D configurations (in-plane only), else nnU-Net's rule."""
    if config.dims == 2:
        return 0
    return separate_z_axis(spacing, new_spacing, config.resampling.anisotropy_threshold)


# ----------------------------------------------------------------------------------------------
# Forward


def crop_mask(image: np.ndarray) -> np.ndarray:
    """The nonzero mask of ``image`` (C, Z, Y, X), as :func:`autoseg.dataset.fingerprint.nonzero_mask`.

    Fast path: when every voxel of some channel is nonzero the mask is all true, and the hole
    filling (the slow part on large volumes) is skipped; the result is the same.
    """
    for channel in image:
        if np.all(channel != 0):
            return np.ones(image.shape[1:], dtype=bool)
    return nonzero_mask(image)


def class_locations(seg: np.ndarray, values: list[int], seed: int,
                    samples: int = CLASS_LOCATION_SAMPLES) -> dict[str, list[list[int]]]:
    """Up to ``samples`` voxel coordinates ``[z, y, x]`` of each foreground value, drawn with ``seed``.

    Deterministic: the same segmentation and seed give the same coordinates (sorted in memory
    order). Values absent from ``seg`` get an empty list.

    Args:
        seg: the preprocessed label map.
        values: foreground values to sample.
        seed: the random seed (see :func:`case_seed`).
        samples: how many coordinates per value at most.

    Returns:
        ``{"1": [[z, y, x], ...], ...}`` with string keys (JSON).
    """
    rng = np.random.default_rng(seed)
    flat = seg.ravel()
    locations: dict[str, list[list[int]]] = {}
    for value in values:
        where = np.flatnonzero(flat == value)
        if where.size > samples:
            where = np.sort(rng.choice(where, size=samples, replace=False))
        coords = np.stack(np.unravel_index(where, seg.shape), axis=1) if where.size else np.zeros((0, 3), np.intp)
        locations[str(value)] = coords.tolist()
    return locations


def case_seed(case_id: str) -> int:
    """The class-location seed of a case: a stable hash of its id (same on every run and worker)."""
    return zlib.crc32(case_id.encode("utf-8"))


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    plans: Plans,
    config_name: str,
    *,
    case_id: str = "",
) -> tuple[np.ndarray, np.ndarray | None, Props]:
    """Preprocess one case for ``config_name``: transpose, crop, normalise, resample.

    Args:
        image: ``(C, Z, Y, X)`` as read by :func:`autoseg.imageio.read_image` (any numeric dtype).
        label: ``(Z, Y, X)`` integer label map on the image grid, or None (prediction).
        geometry: the image's geometry.
        plans: the dataset's plans.
        config_name: which configuration's spacing and normalisation to use.
        case_id: the case's id (recorded, and the seed of the class locations).

    Returns:
        ``data`` float32 ``(C, z, y, x)``, ``seg`` int8/int16 ``(z, y, x)`` or None, and ``props``:
        what :func:`revert_to_original` needs, plus class locations for foreground oversampling.

    Raises:
        PlanError: ``config_name`` is not in the plans.
        ValueError: the arrays do not match each other or the plans (a caller's bug; the dataset
            check rules these out for user data).
    """
    config = plans.configuration(config_name)
    if image.ndim != 4:
        raise ValueError(f"expected an image (C, Z, Y, X), got shape {image.shape}")
    if image.shape[0] != len(config.normalization):
        raise ValueError(f"image has {image.shape[0]} channel(s); the plans normalise {len(config.normalization)}")
    if label is not None and label.shape != image.shape[1:]:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape[1:]}")

    transpose = tuple(int(a) for a in plans.transpose)
    image_t = image.transpose(0, *(a + 1 for a in transpose))
    label_t = label.transpose(transpose) if label is not None else None
    spacing_t = tuple(float(geometry.spacing[a]) for a in transpose)

    # The filled mask only matters to a z-score restricted to it; the crop box is the same without
    # filling (fingerprint.nonzero_box), and for CT (no masked channel) no whole-volume mask is made.
    mask: np.ndarray | None = None
    if any(norm.use_mask for norm in config.normalization):
        mask = crop_mask(image_t)
        bbox = bbox_of(mask)
    else:
        bbox = nonzero_box(image_t)
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    if mask is not None:
        mask = mask[box]
    cropped_shape = tuple(int(hi - lo) for lo, hi in bbox)

    data = np.empty((image.shape[0], *cropped_shape), dtype=np.float32)
    for c, norm in enumerate(config.normalization):
        data[c] = normalize_channel(image_t[c][box], norm.scheme, mask=mask, use_mask=norm.use_mask,
                                    clip=norm.clip, mean=norm.mean, std=norm.std)

    new_spacing = target_spacing(config, spacing_t)
    new_shape = compute_new_shape(cropped_shape, spacing_t, new_spacing)
    axis = resampling_axis(config, spacing_t, new_spacing)
    resampling = config.resampling
    data = resample_image(data, new_shape, resampling.image_order, axis, resampling.order_z)

    values = foreground_values(plans)
    seg = None
    locations: dict[str, list[list[int]]] = {}
    if label_t is not None:
        seg = np.array(label_t[box], dtype=label_dtype(plans), order="C")
        seg = np.ascontiguousarray(resample_labels(seg, new_shape, resampling.label_order, axis,
                                                   resampling.order_z, values))
        locations = class_locations(seg, values, case_seed(case_id))

    props: Props = {
        "case_id": case_id,
        "plan_digest": plan_digest(plans, config_name),
        "shape_original": [int(s) for s in image.shape[1:]],
        "channels": int(image.shape[0]),
        "dtype_original": str(image.dtype),
        "geometry": {
            "spacing": [float(s) for s in geometry.spacing],
            "origin": [float(v) for v in geometry.origin],
            "direction": [float(v) for v in geometry.direction],
            "ndim": int(geometry.ndim),
        },
        "transpose": list(transpose),
        "shape_after_transpose": [int(s) for s in image_t.shape[1:]],
        "spacing_after_transpose": list(spacing_t),
        "bbox": [[int(lo), int(hi)] for lo, hi in bbox],
        "shape_after_crop": list(cropped_shape),
        "spacing_target": list(new_spacing),
        "shape_after_resample": [int(s) for s in new_shape],
        "separate_axis": axis,
        "order_z": int(resampling.order_z),
        "class_locations": locations,
    }
    return np.ascontiguousarray(data), seg, props


def previous_stage_labels(labels: np.ndarray, props: Props, plans: Plans, config_name: str) -> np.ndarray:
    """A previous stage's label map, in the original geometry, on a cascade stage's grid.

    The same transpose, crop and label resampling as :func:`preprocess_case` gives the case's
    reference segmentation (nnU-Net v2 preprocesses ``seg_from_prev_stage`` alike), so the lowres
    stage's prediction lines up voxel for voxel with the full-resolution image.

    Args:
        labels: ``(Z, Y, X)`` integer label map in the image's original grid.
        props: the case's props for ``config_name`` (:func:`preprocess_case`).
        plans: the dataset's plans.
        config_name: the cascade stage.

    Returns:
        The label map on ``props["shape_after_resample"]``, of the plans' label dtype.

    Raises:
        ValueError: the label map does not have the original image's shape.
    """
    if tuple(labels.shape) != tuple(props["shape_original"]):
        raise ValueError(f"previous stage's label map has shape {labels.shape}; the image has "
                         f"{tuple(props['shape_original'])}")
    resampling = plans.configuration(config_name).resampling
    cropped = np.array(labels.transpose(tuple(props["transpose"]))[_crop_slices(props)], dtype=label_dtype(plans))
    return np.ascontiguousarray(resample_labels(cropped, props["shape_after_resample"], resampling.label_order,
                                                props["separate_axis"], resampling.order_z, foreground_values(plans)))


# ----------------------------------------------------------------------------------------------
# Inverse


def geometry_from_props(props: Props) -> Geometry:
    """The original image's geometry, as recorded by :func:`preprocess_case`."""
    g = props["geometry"]
    spacing = tuple(float(s) for s in g["spacing"])
    return Geometry(spacing, tuple(float(v) for v in g["origin"]),  # type: ignore[arg-type]
                    tuple(float(v) for v in g["direction"]), int(g["ndim"]))


def _check_shape(array: np.ndarray, props: Props, what: str) -> None:
    expected = tuple(props["shape_after_resample"])
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(f"{what} has spatial shape {tuple(array.shape[-3:])}; the preprocessed case "
                         f"{props.get('case_id', '')!r} has {expected}")


def _transposed_view(out: np.ndarray, props: Props) -> np.ndarray:
    """A view of an original-order (Z, Y, X) array with its axes in the preprocessed order."""
    return out.transpose(tuple(props["transpose"]))


def _crop_slices(props: Props) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in props["bbox"])


def to_crop(volume: np.ndarray, props: Props) -> np.ndarray:
    """One class's probabilities (or any float map) on the network grid back to the crop box:
    linear, separate axis as the forward pass (one class at a time keeps memory bounded)."""
    crop_shape = tuple(props["shape_after_crop"])
    return resample_image(volume[None], crop_shape, 1, props["separate_axis"], props["order_z"])[0]


def to_crop_rows(volume: np.ndarray, props: Props, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` (axis 0, preprocessed axis order) of :func:`to_crop`'s result, bitwise
    equal, computed from the network-grid rows they need (:func:`autoseg.preprocessing.resample.resample_rows`)."""
    crop_shape = tuple(props["shape_after_crop"])
    return resample_rows(volume, crop_shape, start, stop, 1, props["separate_axis"], props["order_z"])


def crop_slabs(props: Props, voxels: int) -> list[tuple[int, int]]:
    """Slabs ``[start, stop)`` of axis 0 of the crop box with about ``voxels`` voxels each, for
    :func:`to_crop_rows`; one slab of everything where the inverse cannot be cut
    (:func:`autoseg.preprocessing.resample.rows_resamplable`: a separate axis other than 0, or
    order_z above 1), so that nothing is resampled twice."""
    crop_shape = tuple(int(s) for s in props["shape_after_crop"])
    same = tuple(int(s) for s in props["shape_after_resample"]) == crop_shape
    if not same and not rows_resamplable(1, props["separate_axis"], int(props["order_z"])):
        return [(0, crop_shape[0])]
    plane = max(1, int(np.prod(crop_shape[1:], dtype=np.int64)))
    step = max(1, int(voxels) // plane)
    return [(start, min(start + step, crop_shape[0])) for start in range(0, crop_shape[0], step)]


def revert_to_original(array: np.ndarray, props: Props) -> np.ndarray:
    """Put an array on the preprocessed grid back into the original image's grid.

    Args:
        array: class probabilities or logits ``(K, z, y, x)`` (float), or a label map ``(z, y, x)``,
            on the grid :func:`preprocess_case` produced (``props["shape_after_resample"]``).
        props: the case's props.

    Returns:
        ``(K, Z, Y, X)`` float32 — linearly resampled (separate axis as in the forward pass),
        outside the crop box probability 1 for class 0 and 0 for the others — or ``(Z, Y, X)`` of the
        label map's dtype (nearest neighbour, 0 outside the box), in the original axis order.

    Raises:
        ValueError: the array's shape does not match ``props``.
    """
    shape = tuple(props["shape_original"])
    box = _crop_slices(props)
    if array.ndim == 3:
        _check_shape(array, props, "label map")
        out = np.zeros(shape, dtype=array.dtype)
        _transposed_view(out, props)[box] = resample_nearest(array, props["shape_after_crop"])
        return out
    if array.ndim != 4:
        raise ValueError(f"expected probabilities (K, z, y, x) or a label map (z, y, x), got shape {array.shape}")
    _check_shape(array, props, "probabilities")
    out = np.zeros((array.shape[0], *shape), dtype=np.float32)
    out[0] = 1.0
    # Class by class: one float32 volume of working memory beyond the output.
    for k in range(array.shape[0]):
        _transposed_view(out[k], props)[box] = to_crop(array[k], props)
    return out


def export_segmentation(probabilities: np.ndarray, props: Props) -> np.ndarray:
    """The label map of class probabilities (or logits) in the original grid: argmax after the inverse.

    Never holds more than three float32 volumes of the cropped size (running argmax class by
    class), however many classes there are.

    Args:
        probabilities: ``(K, z, y, x)`` on the preprocessed grid; class index = label value.
        props: the case's props.

    Returns:
        ``(Z, Y, X)`` uint8 label map (uint16 for more than 256 classes), 0 outside the crop box.

    Raises:
        ValueError: the array's shape does not match ``props``.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities (K, z, y, x), got shape {probabilities.shape}")
    _check_shape(probabilities, props, "probabilities")
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    best_value = to_crop(probabilities[0], props)
    best_label = np.zeros(best_value.shape, dtype=dtype)
    for k in range(1, probabilities.shape[0]):
        score = to_crop(probabilities[k], props)
        better = score > best_value  # strict: ties go to the lower class, as argmax does
        best_value[better] = score[better]
        best_label[better] = k
    out = np.zeros(tuple(props["shape_original"]), dtype=dtype)
    _transposed_view(out, props)[_crop_slices(props)] = best_label
    return out
