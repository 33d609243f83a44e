"""Super-resolution's first step: a coarse input refined onto its fine grid, before the denoise pipeline.

Training and prediction both start here, so the network always sees the same interpolation: every
channel is resampled to ``k ×`` its shape per axis by the cubic spline of the image path
(:func:`autoseg.preprocessing.resample.resample_image`, order 3 on every axis, no separate z: its
nearest-neighbour z would only repeat thick slices). Its pixel-centre alignment puts the values on
exactly the fine grid of :mod:`autoseg.dataset.super_resolution`. Then:

* scanner padding (-3024, -2048, ...) is copied from the nearest input voxel, exactly, so the
  restoration export keeps it as it keeps a denoised image's;
* the result is stored in the input's pixel type (integers rounded, clipped), as the restored image
  is: an untrained network (zero correction) writes exactly this image, the cubic baseline.

From there a super-resolution case is a denoising case on the fine grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.dataset.restoration import CT_PADDING_VALUES
from autoseg.dataset.super_resolution import (
    fine_geometry,
    fine_shape,
    grid_factors,
    grid_issue,
)
from autoseg.imageio import Geometry
from autoseg.preprocessing.resample import nearest_indices, resample_image


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values as ``dtype``: integers rounded half to even and clipped to the type's range."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def refine_image(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """A coarse image on its fine grid: cubic, scanner padding from the nearest voxel, the input's dtype.

    Args:
        image: ``(C, Z, Y, X)`` as read (integer or float pixels).
        factors: voxels per input voxel along each spatial axis (z, y, x), each >= 1.

    Returns:
        ``(C, Z k_z, Y k_y, X k_x)`` of ``image.dtype`` (a float copy for float inputs).

    Raises:
        ValueError: not ``(C, Z, Y, X)``, or a factor below 1.
    """
    if image.ndim != 4 or len(factors) != 3 or min(factors) < 1:
        raise ValueError(f"refining an image of shape {image.shape} by {tuple(factors)}: needs (C, Z, Y, X) and "
                         "three factors >= 1")
    dtype = image.dtype if image.dtype.kind in "iuf" else np.dtype(np.float32)
    shape = fine_shape(image.shape[1:], factors)
    fine = resample_image(image.astype(np.float32), shape, 3, None, 0)
    nearest = np.ix_(*(nearest_indices(old, new) for old, new in zip(image.shape[1:], shape)))
    out = np.empty((image.shape[0], *shape), dtype=dtype)
    for c in range(image.shape[0]):
        padding = np.isin(image[c], CT_PADDING_VALUES)
        if padding.any():
            near = image[c][nearest]
            where = padding[nearest]
            fine[c][where] = near[where]
        out[c] = _to_dtype(fine[c], dtype)
    return out


def refine_input(image: np.ndarray, geometry: Geometry, factors: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """:func:`refine_image` and the fine grid's geometry (:func:`autoseg.dataset.super_resolution.fine_geometry`)."""
    return refine_image(image, factors), fine_geometry(geometry, factors)


def onto_fine_grid(image: np.ndarray, geometry: Geometry, shape: Sequence[int],
                   grid: Geometry) -> tuple[np.ndarray, Geometry]:
    """A ``(Z, Y, X)`` image refined onto ``grid`` (of ``shape``) when that is its fine grid
    (:func:`autoseg.dataset.super_resolution.grid_issue`), else the image as it is (a grid check
    after this says what is wrong). ``autoseg evaluate`` scores a super-resolution baseline so.
    """
    if image.ndim != 3 or geometry.ndim != 3 or tuple(image.shape) == tuple(shape):
        return image, geometry
    factors = grid_factors(geometry, grid)
    if factors is None or grid_issue(geometry, image.shape, grid, shape) is not None:
        return image, geometry
    refined, fine = refine_input(image[None], geometry, factors)
    return refined[0], fine


__all__ = ["onto_fine_grid", "refine_image", "refine_input"]
