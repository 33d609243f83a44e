"""Super-resolution's first step: a coarse input refined onto its fine grid, before the denoise pipeline.

Training and prediction both start here, so the network always sees the same interpolation: every
channel is resampled to ``k ×`` its shape per axis by the cubic spline of the image path
(:func:`autoseg.preprocessing.resample.resample_image`, order 3 on every axis, no separate z: its
nearest-neighbour z would only repeat thick slices). Its pixel-centre alignment puts the values on
exactly the fine grid of :mod:`autoseg.dataset.super_resolution`. Then:

* scanner padding (-3024, -2048, ...) takes no part in the spline: before it, each padding voxel is
  given the value of the nearest non-padding voxel (else -2048 HU beside 40 HU tissue would ring
  tens of HU into the body, and a field of view whose padding value varies would show it); after
  it, padding is copied from the nearest input voxel, exactly, so the restoration export keeps it
  as it keeps a denoised image's;
* the result is stored in the input's pixel type (integers rounded, clipped), as the restored image
  is: an untrained network (zero correction) writes exactly this image, the cubic baseline.

From there a super-resolution case is a denoising case on the fine grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.dataset.restoration import CT_PADDING_VALUES
from autoseg.dataset.super_resolution import (
    fine_geometry,
    fine_shape,
    grid_factors,
    grid_issue,
)
from autoseg.errors import DatasetError
from autoseg.imageio import Geometry
from autoseg.preprocessing.resample import nearest_indices, resample_image


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values as ``dtype``: integers rounded half to even and clipped to the type's range."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _fill_padding(channel: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """``channel`` (float32) with every ``padding`` voxel set to its nearest non-padding voxel's value."""
    # The indices only (3 int32 per voxel): the distances are not needed.
    indices = ndimage.distance_transform_edt(padding, return_distances=False, return_indices=True)
    return channel[tuple(indices)]


def refine_image(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """A coarse image on its fine grid: cubic without the scanner padding, padding from the nearest
    voxel, the input's dtype (module docstring).

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
    nearest = np.ix_(*(nearest_indices(old, new) for old, new in zip(image.shape[1:], shape)))
    out = np.empty((image.shape[0], *shape), dtype=dtype)
    for c in range(image.shape[0]):
        channel = image[c].astype(np.float32)
        padding = np.isin(image[c], CT_PADDING_VALUES)
        if padding.any() and not padding.all():
            channel = _fill_padding(channel, padding)
        fine = resample_image(channel[None], shape, 3, None, 0)[0]
        if padding.any():
            near = image[c][nearest]
            where = padding[nearest]
            fine[where] = near[where]
        out[c] = _to_dtype(fine, dtype)
    return out


def refine_input(image: np.ndarray, geometry: Geometry, factors: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """:func:`refine_image` and the fine grid's geometry (:func:`autoseg.dataset.super_resolution.fine_geometry`)."""
    return refine_image(image, factors), fine_geometry(geometry, factors)


def onto_fine_grid(image: np.ndarray, geometry: Geometry, shape: Sequence[int], grid: Geometry,
                   where: str = "input") -> tuple[np.ndarray, Geometry]:
    """A ``(Z, Y, X)`` image refined onto ``grid`` (of ``shape``), its fine grid
    (:func:`autoseg.dataset.super_resolution.grid_issue`). ``autoseg evaluate`` scores a
    super-resolution baseline so.

    An image already of ``shape``, or of the grid's spacing (no refinement to make), comes back as it
    is: the caller's grid check says what differs.

    Raises:
        DatasetError: ``grid`` is no fine grid of the image, naming ``where`` and why.
    """
    if image.ndim != 3 or geometry.ndim != 3 or tuple(image.shape) == tuple(shape):
        return image, geometry
    factors = grid_factors(geometry, grid)
    if factors == (1, 1, 1):
        return image, geometry
    problem = grid_issue(geometry, image.shape, grid, shape)
    if problem is not None:
        raise DatasetError(f"{where}: cannot refine it onto its reference's grid: {problem[0]}; give the coarse "
                           "input whose thin grid the reference lies on")
    refined, fine = refine_input(image[None], geometry, factors)
    return refined[0], fine


__all__ = ["onto_fine_grid", "refine_image", "refine_input"]
