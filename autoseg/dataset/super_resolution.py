"""Super-resolution grids: a coarse input, and the fine grid its output is written on (pure, numpy only).

The fine grid of an input refines each array axis ``a`` by an integer factor ``k_a`` over the same
physical extent, with the convention of ``autoseg simulate thick-slices``
(:func:`autoseg.simulate.thick_slices.thick_geometry`): coarse voxel ``j`` is the mean of fine voxels
``j k .. j k + k - 1`` and sits at their centre. So the fine grid has ``k`` times the voxels, spacing
``/ k``, and its origin (the centre of the first fine voxel) lies ``(k - 1) / 2`` fine voxels *before*
the coarse origin along that axis's direction. This is also the pixel-centre alignment of
:mod:`autoseg.preprocessing.resample` (output voxel ``i`` samples input ``(i + 0.5) / k - 0.5``), so
resampling an input to ``k`` times its shape puts its values on exactly this grid.

A super-resolution dataset's targets must lie on their input's fine grid (:func:`grid_issue`), one
factor for the whole dataset, recorded in plans.yaml as ``upsample_factor``; prediction builds the
output grid from an input alone (:func:`fine_geometry`, :func:`fine_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.errors import DatasetError
from autoseg.imageio import Geometry

#: A spacing ratio within this relative distance of an integer is that integer (NIfTI stores
#: spacings as float32: 3 × 0.7 mm reads back as 2.0999999 mm).
FACTOR_TOLERANCE = 1e-3
#: A target origin may lie this fraction of a fine voxel away from the fine grid's (float32 headers).
ORIGIN_TOLERANCE = 0.1
#: Array axis names, for messages.
AXIS_NAMES = ("z", "y", "x")


def _itk_column(direction: Sequence[float], axis: int, ndim: int = 3) -> np.ndarray:
    """The physical direction of array axis ``axis`` (ITK column ``ndim - 1 - axis`` of the row-major matrix)."""
    return np.asarray(direction, dtype=np.float64)[ndim - 1 - axis::ndim]


def fine_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """The fine grid's shape: every axis ``k`` times as many voxels."""
    return tuple(int(s) * int(k) for s, k in zip(shape, factors))


def fine_geometry(geometry: Geometry, factors: Sequence[int]) -> Geometry:
    """The fine grid of a coarse ``geometry`` refined by ``factors`` (array order z, y, x), same extent.

    The inverse of :func:`autoseg.simulate.thick_slices.thick_geometry` for ``factors = (k, 1, 1)``:
    spacing ``/ k``, the origin moved back ``(k - 1) / 2`` fine voxels along each refined axis.

    Raises:
        ValueError: not 3D, or a factor below 1.
    """
    if geometry.ndim != 3 or len(factors) != 3 or min(factors) < 1:
        raise ValueError(f"fine grid of a {geometry.ndim}D geometry by {tuple(factors)}: needs 3D and factors >= 1")
    spacing = tuple(float(s) / int(k) for s, k in zip(geometry.spacing, factors))
    origin = np.asarray(geometry.origin, dtype=np.float64)
    for axis, (k, s) in enumerate(zip(factors, spacing)):
        if k > 1:
            origin = origin - (k - 1) / 2 * s * _itk_column(geometry.direction, axis)
    return Geometry(spacing, tuple(float(o) for o in origin), geometry.direction, 3)  # type: ignore[arg-type]


def grid_factors(coarse: Geometry, fine: Geometry) -> tuple[int, int, int] | None:
    """The integer refinement per array axis from the ``coarse`` spacing to the ``fine`` one, or None
    where a ratio is no integer (within :data:`FACTOR_TOLERANCE`) or below 1."""
    factors = []
    for c, f in zip(coarse.spacing, fine.spacing):
        ratio = float(c) / float(f)
        k = round(ratio)
        if k < 1 or abs(ratio - k) > FACTOR_TOLERANCE * k:
            return None
        factors.append(int(k))
    return (factors[0], factors[1], factors[2])


def grid_issue(coarse: Geometry, coarse_shape: Sequence[int], fine: Geometry,
               fine_shape_: Sequence[int]) -> tuple[str, str] | None:
    """Why ``fine`` is not ``coarse``'s fine grid (:func:`fine_geometry`), as ``(problem, fix)``; None when it is.

    Assumes the spacing is equal or finer on every axis and the directions agree (checked before).
    """
    fix = ("write the target on the input's grid refined by an integer factor per axis, the thin slices "
           "(k - 1) / 2 thin voxels before the first thick one, as 'autoseg simulate thick-slices' does")
    factors = grid_factors(coarse, fine)
    if factors is None:
        ratios = ", ".join(f"{c / f:.4g}" for c, f in zip(coarse.spacing[::-1], fine.spacing[::-1]))
        return f"spacing ratio input / target ({ratios}) (x, y, z) is not a whole number per axis", fix
    if max(factors) == 1:
        return "target on the input's own grid: nothing to super-resolve", 'use "task": "denoise" for such pairs'
    expected = fine_shape(coarse_shape, factors)
    if tuple(fine_shape_) != expected:
        return (f"target shape {tuple(fine_shape_)[::-1]} is not the input's {tuple(coarse_shape)[::-1]} × "
                f"{factors[::-1]} = {expected[::-1]} (x, y, z)"), fix
    built = fine_geometry(coarse, factors)
    off = np.abs(np.asarray(built.origin) - np.asarray(fine.origin))
    if float(off.max()) > ORIGIN_TOLERANCE * min(fine.spacing):
        return (f"target origin {tuple(round(o, 4) for o in fine.origin)} is not the input's fine grid's "
                f"{tuple(round(o, 4) for o in built.origin)} (off by up to {float(off.max()):.3g} mm)"), fix
    return None


def check_coarse_input(geometry: Geometry, factors: Sequence[int], fine_spacing: Sequence[float], where: str) -> None:
    """Refuse an input that already has (about) the fine spacing a super-resolution model produces.

    An axis refined by ``k`` expects inputs of about ``k ×`` the fine spacing; an input whose spacing
    there is closer to the fine spacing (below the midpoint ``(k + 1) / 2 ×``) is no coarse input.

    Args:
        geometry: the input's geometry.
        factors: the plan's ``upsample_factor`` (array order z, y, x).
        fine_spacing: the fine spacing the model was trained to produce (array order).
        where: the file, for the message.

    Raises:
        DatasetError: naming the axis, both spacings and the fix.
    """
    if geometry.ndim != 3:
        raise DatasetError(f"{where}: 2D image; super-resolution models take 3D images")
    for axis, (k, fine, got) in enumerate(zip(factors, fine_spacing, geometry.spacing)):
        if k > 1 and float(got) < (k + 1) / 2 * float(fine):
            raise DatasetError(f"{where}: spacing {got:.4g} mm on {AXIS_NAMES[axis]} is already about the fine "
                               f"spacing this super-resolution model produces ({fine:.4g} mm from {k * fine:.4g} mm "
                               f"inputs, ×{k}); give it the coarse image it was trained for, or use this one as it is")


__all__ = ["AXIS_NAMES", "FACTOR_TOLERANCE", "ORIGIN_TOLERANCE", "check_coarse_input", "fine_geometry",
           "fine_shape", "grid_factors", "grid_issue"]
