"""Resampling of images, label maps and class probabilities to a new voxel grid (pure numpy/scipy).

Follows nnU-Net v2's ``resample_data_or_seg``:

* the new shape is ``round(old_spacing / new_spacing * old_shape)``;
* voxel centres are aligned: output voxel ``i`` samples input coordinate
  ``(i + 0.5) * old / new - 0.5``, with edge values repeated outside the grid (skimage ``resize``
  with ``mode="edge"``, which nnU-Net calls);
* images use spline order 3; label maps are resampled one-hot, every class linearly, then argmax
  (or nearest neighbour when the label order is 0);
* **separate z**: when the data is anisotropic (coarsest / finest spacing > 3, nnU-Net's
  ``ANISO_THRESHOLD``), each slice is resampled in-plane with the given order and the coarse axis
  with ``order_z`` (0 = nearest, nnU-Net's default), so that thick slices are not blurred into
  each other by a cubic spline.

Speed: nothing is resampled when the shape does not change; everything stays float32; the
separate-z path resamples the coarse axis first when that shrinks it (fewer slices to interpolate
in-plane) — the two steps commute exactly because both are linear per slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: nnU-Net v2's ANISO_THRESHOLD: above this ratio of coarsest to finest spacing, z is separate.
ANISOTROPY_THRESHOLD = 3.0


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape of ``shape`` voxels of ``spacing`` resampled to ``new_spacing`` (nnU-Net: round, at least 1).

    Args:
        shape: spatial shape, one value per axis.
        spacing: current voxel size per axis (mm).
        new_spacing: target voxel size per axis (mm).

    Returns:
        The new shape, one positive integer per axis.
    """
    if not len(shape) == len(spacing) == len(new_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and new spacing "
                         f"{tuple(new_spacing)} need the same number of axes")
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing))


def _lowres_axis(spacing: Sequence[float], threshold: float) -> int | None:
    """The single coarsest axis when ``spacing`` is anisotropic, else None (also when two axes tie)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() <= threshold:
        return None
    coarsest = np.flatnonzero(spacing == spacing.max())
    return int(coarsest[0]) if coarsest.size == 1 else None


def separate_z_axis(spacing: Sequence[float], new_spacing: Sequence[float],
                    threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to resample separately, or None for a joint resampling (nnU-Net's rule).

    The current spacing decides first; if it is isotropic enough the target spacing may still be
    anisotropic (e.g. a lowres configuration), and then its coarsest axis is used. Two or three
    equally coarse axes mean no separate axis, as in nnU-Net.

    Args:
        spacing: current voxel size per axis.
        new_spacing: target voxel size per axis.
        threshold: coarsest / finest spacing ratio above which an axis is separate.

    Returns:
        The axis index or None.
    """
    axis = _lowres_axis(spacing, threshold)
    if axis is None and _lowres_axis(new_spacing, threshold) is not None:
        axis = _lowres_axis(new_spacing, threshold)
    return axis


# ----------------------------------------------------------------------------------------------
# Building blocks


def _source_coordinates(old: int, new: int) -> np.ndarray:
    """Input coordinate of each output voxel centre (pixel-centre alignment), clipped to the grid."""
    coords = (np.arange(new, dtype=np.float64) + 0.5) * (old / new) - 0.5
    return np.clip(coords, 0.0, old - 1.0)


def nearest_indices(old: int, new: int) -> np.ndarray:
    """Nearest input index of each output voxel (scipy's order-0 rounding: ``floor(x + 0.5)``)."""
    return np.floor(_source_coordinates(old, new) + 0.5).astype(np.intp)


def _resample_axis(array: np.ndarray, axis: int, new: int, order: int) -> np.ndarray:
    """Resample one axis of a float32 array with order 0 (nearest) or 1 (linear); others untouched."""
    old = array.shape[axis]
    if old == new:
        return array
    if order == 0:
        return np.take(array, nearest_indices(old, new), axis=axis)
    if order == 1:
        coords = _source_coordinates(old, new)
        low = np.floor(coords).astype(np.intp)
        high = np.minimum(low + 1, old - 1)
        shape = [1] * array.ndim
        shape[axis] = new
        weight = (coords - low).astype(np.float32).reshape(shape)
        below = np.take(array, low, axis=axis)
        above = np.take(array, high, axis=axis)
        above -= below
        above *= weight
        below += above
        return below
    # Higher orders along a single axis: scipy, the other axes kept (scale 1 there, exact).
    out_shape = list(array.shape)
    out_shape[axis] = new
    return _affine(array, out_shape, order)


def _linear(array: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Order-1 resampling as one 1-D linear pass per axis, shrinking axes first.

    Multilinear interpolation is the product of the axes' linear interpolations with the same
    source coordinates and edge clamping, so this equals scipy's order-1 ``affine_transform`` up
    to float rounding (tested to 1e-6) — at a fraction of its cost: scipy reads 8 neighbours per
    output voxel in one single-threaded pass; here each pass is two vectorised gathers. Exporting
    8 class probabilities of a 512x512x150 CT from a 3.9 mm grid took 1.7 s per class with scipy.
    """
    out = array
    for axis in sorted(range(array.ndim), key=lambda a: new_shape[a] / array.shape[a]):
        out = _resample_axis(out, axis, int(new_shape[axis]), 1)
    return out


def _affine(array: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Spline resampling of a whole float32 array to ``new_shape`` with pixel-centre alignment."""
    if order == 1:
        return _linear(array, new_shape)
    old = np.asarray(array.shape, dtype=np.float64)
    scale = old / np.asarray(new_shape, dtype=np.float64)
    # A 1-D matrix is a diagonal one: scipy takes its fast zoom/shift path.
    return ndimage.affine_transform(
        array, scale, offset=0.5 * scale - 0.5, output_shape=tuple(int(s) for s in new_shape),
        order=order, mode="nearest", prefilter=order > 1, output=np.float32,
    )


def _resample_volume(volume: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None,
                     order_z: int) -> np.ndarray:
    """Resample one float32 volume (any number of axes) jointly, or with ``axis`` separate."""
    new_shape = tuple(int(s) for s in new_shape)
    if volume.shape == new_shape:
        return volume
    if axis is None:
        return _affine(volume, new_shape, order)
    moved = np.moveaxis(volume, axis, 0)
    in_plane = tuple(s for a, s in enumerate(new_shape) if a != axis)
    n_new = new_shape[axis]
    # Per-slice resampling commutes with the (linear, slice-wise) resampling along the axis, so
    # do the cheaper order: the axis first when it shrinks, so fewer slices are interpolated.
    if n_new < moved.shape[0]:
        moved = _resample_axis(moved, 0, n_new, order_z)
    if moved.shape[1:] != in_plane:
        out = np.empty((moved.shape[0], *in_plane), dtype=np.float32)
        for index in range(moved.shape[0]):
            out[index] = _affine(moved[index], in_plane, order)
        moved = out
    if moved.shape[0] != n_new:
        moved = _resample_axis(moved, 0, n_new, order_z)
    return np.ascontiguousarray(np.moveaxis(moved, 0, axis))


# ----------------------------------------------------------------------------------------------
# Public


def resample_image(data: np.ndarray, new_shape: Sequence[int], order: int = 3, axis: int | None = None,
                   order_z: int = 0) -> np.ndarray:
    """Resample every channel of ``data`` (C, *spatial) to ``new_shape`` (float32).

    Args:
        data: channel-first array; converted to float32 if it is not.
        new_shape: target spatial shape.
        order: spline order (3 for images, 1 for probabilities).
        axis: the separately resampled spatial axis (see :func:`separate_z_axis`), or None.
        order_z: interpolation order along ``axis`` (0 nearest, 1 linear, higher: spline).

    Returns:
        A float32 array ``(C, *new_shape)``; ``data`` itself (as float32) when the shape is unchanged.
    """
    data = data.astype(np.float32, copy=False)
    new_shape = tuple(int(s) for s in new_shape)
    if data.shape[1:] == new_shape:
        return data
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for channel in range(data.shape[0]):
        out[channel] = _resample_volume(data[channel], new_shape, order, axis, order_z)
    return out


def resample_nearest(labels: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (any dtype), separable and exact (an index gather)."""
    new_shape = tuple(int(s) for s in new_shape)
    if labels.shape == new_shape:
        return labels
    index = np.ix_(*(nearest_indices(old, new) for old, new in zip(labels.shape, new_shape)))
    return labels[index]


def resample_labels(labels: np.ndarray, new_shape: Sequence[int], order: int = 1, axis: int | None = None,
                    order_z: int = 0, values: Sequence[int] | None = None) -> np.ndarray:
    """Resample a label map: one-hot + linear + argmax (``order`` 1) or nearest (``order`` 0).

    One class at a time (memory: a few float32 volumes, whatever the number of classes). With
    linear interpolation the one-hot channels sum to 1 everywhere, so the background's score is
    ``1 - sum(foreground scores)`` and needs no resampling of its own. Ties go to the lower label
    value, as ``argmax`` does.

    Args:
        labels: integer label map (spatial axes only); value 0 is background.
        new_shape: target shape.
        order: 1 = linear one-hot (nnU-Net's default for segmentations); 0 = nearest.
        axis, order_z: separate axis and its order, as in :func:`resample_image`.
        values: the foreground values to consider (default: those present).

    Returns:
        A label map of ``labels``' dtype and ``new_shape``.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if labels.shape == new_shape:
        return labels
    if order == 0:
        return resample_nearest(labels, new_shape)
    if values is None:
        values = [int(v) for v in np.unique(labels) if v != 0]
    best_value = np.zeros(new_shape, dtype=np.float32)
    best_label = np.zeros(new_shape, dtype=labels.dtype)
    total = np.zeros(new_shape, dtype=np.float32)
    for value in sorted(values):
        onehot = (labels == value).astype(np.float32)
        if not onehot.any():
            continue
        score = _resample_volume(onehot, new_shape, order, axis, order_z)
        total += score
        better = score > best_value
        best_value[better] = score[better]
        best_label[better] = value
    background = 1.0 - total
    best_label[best_value <= background] = 0
    return best_label
