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
#: A target may lie this fraction of a fine voxel (of each axis) away from the fine grid: its origin
#: along the axis, and its last voxel after the spacing difference has accumulated over the axis
#: (float32 headers round far below this).
ORIGIN_TOLERANCE = 0.1
#: Direction cosines of input and target may differ this much: float32 headers round them to
#: ~1e-7; 1e-3 already moves a voxel 500 mm from the origin by 0.5 mm.
DIRECTION_TOLERANCE = 1e-5
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

    Within float32 header rounding: directions within :data:`DIRECTION_TOLERANCE`; per array axis,
    the spacing difference accumulated over the axis and the origin's offset along it each under
    :data:`ORIGIN_TOLERANCE` of that axis's fine voxel.
    """
    fix = ("write the target on the input's grid refined by an integer factor per axis, the thin slices "
           "(k - 1) / 2 thin voxels before the first thick one, as 'autoseg simulate thick-slices' does")
    turn = float(np.max(np.abs(np.asarray(coarse.direction, dtype=np.float64) - np.asarray(fine.direction))))
    if turn > DIRECTION_TOLERANCE:
        return (f"direction cosines differ from the input's by up to {turn:.3g} (more than float32 rounding, "
                f"{DIRECTION_TOLERANCE:g})"), "re-export both in one orientation"
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
    offset = np.asarray(built.origin) - np.asarray(fine.origin)
    for axis in range(3):
        step = float(fine.spacing[axis])
        # A spacing off by d mm puts the last of n voxels n d mm away from where the grid has it.
        drift = abs(float(built.spacing[axis]) - step) * int(fine_shape_[axis]) / step
        if drift > ORIGIN_TOLERANCE:
            return (f"target spacing {step:.7g} mm on {AXIS_NAMES[axis]} is not the input's "
                    f"{float(coarse.spacing[axis]):.7g} / {factors[axis]} = {float(built.spacing[axis]):.7g} mm: "
                    f"over {int(fine_shape_[axis])} voxels the grids drift {drift:.2g} voxel apart (at most "
                    f"{ORIGIN_TOLERANCE:g})"), fix
        along = abs(float(offset @ _itk_column(coarse.direction, axis))) / step
        if along > ORIGIN_TOLERANCE:
            return (f"target origin {tuple(round(o, 4) for o in fine.origin)} is not the input's fine grid's "
                    f"{tuple(round(o, 4) for o in built.origin)}: {along:.3g} voxel off along {AXIS_NAMES[axis]} "
                    f"(at most {ORIGIN_TOLERANCE:g})"), fix
    return None


def check_coarse_input(geometry: Geometry, factors: Sequence[int], min_target_spacing: Sequence[float],
                       where: str) -> None:
    """Refuse an input that already has (about) the fine spacing a super-resolution model produces.

    The input's own spacing says what it becomes: ``spacing / k`` on an axis refined by ``k``. The
    thinnest training target had ``min_target_spacing`` there, from inputs of ``k ×`` that; an input
    below the midpoint ``(k + 1) / 2 ×`` it is nearer that fine spacing than any coarse input the model
    saw. Every training input passes (its spacing is ``k ×`` a target spacing ≥ the smallest), so a
    dataset mixing thin spacings (0.625 and 1.25 mm refined ×2) validates its folds.

    Args:
        geometry: the input's geometry.
        factors: the plan's ``upsample_factor`` (array order z, y, x).
        min_target_spacing: the plan's smallest target spacing per axis (array order).
        where: the file, for the message.

    Raises:
        DatasetError: naming the axis, both spacings and the fix.
    """
    if geometry.ndim != 3:
        raise DatasetError(f"{where}: 2D image; super-resolution models take 3D images")
    for axis, (k, fine, got) in enumerate(zip(factors, min_target_spacing, geometry.spacing)):
        if k > 1 and float(got) < (k + 1) / 2 * float(fine):
            raise DatasetError(f"{where}: spacing {got:.4g} mm on {AXIS_NAMES[axis]} is already about the fine "
                               f"spacing this super-resolution model produces (its thinnest targets: {fine:.4g} mm, "
                               f"from {k * fine:.4g} mm inputs, ×{k}); give it the coarse image it was trained for, "
                               "or use this one as it is")


__all__ = ["AXIS_NAMES", "DIRECTION_TOLERANCE", "FACTOR_TOLERANCE", "ORIGIN_TOLERANCE", "check_coarse_input",
           "fine_geometry", "fine_shape", "grid_factors", "grid_issue"]
