"""Thick slices from thin ones, for super-resolution pairs (thick input -> the thin original).

A thick slice is the mean of ``k`` adjacent thin slices: a box slice-sensitivity profile ``k``
thin slices wide, which is what a scanner's "thick" reconstruction of the same data does to first
order (real profiles are smoother at the edges). Slab ``j`` averages thin slices ``j k .. j k + k - 1``
and sits at their centre, so the output's slice spacing is ``k`` times the input's and its origin
moves ``(k - 1) / 2`` thin slices along the slice axis: the slabs cover exactly the thin slices
they average.

A remainder (``Z mod k`` trailing slices that fill no whole slab) is dropped, from the input and
from the target alike, so that both cover the same physical extent and the target has exactly
``k`` slices per input slice. :func:`kept_slices` says how many remain.
"""

from __future__ import annotations

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry
from autoseg.simulate.low_dose import to_dtype


def check_factor(factor: int) -> None:
    """Raise unless ``factor`` is a usable slab width.

    Raises:
        ConfigError: ``factor`` < 2.
    """
    if factor < 2:
        raise ConfigError(f"--factor {factor}: a thick slice averages at least 2 thin slices; use --factor 2 or more")


def kept_slices(depth: int, factor: int, where: str = "image") -> int:
    """How many thin slices the whole slabs cover: ``depth - depth mod factor``.

    Raises:
        DatasetError: fewer than ``factor`` slices (no slab at all).
    """
    if depth < factor:
        raise DatasetError(f"{where}: {depth} slice(s), fewer than --factor {factor}; no thick slice can be made")
    return depth - depth % factor


def average_slices(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean of every ``factor`` adjacent slices (axis 0), in the input's dtype.

    Args:
        volume: ``(Z, Y, X)``; a trailing ``Z mod factor`` slices are dropped.
        factor: slices per slab, at least 2.

    Returns:
        ``(Z // factor, Y, X)`` means, rounded and clipped for integer dtypes.
    """
    kept = kept_slices(volume.shape[0], factor)
    slabs = volume[:kept].reshape(kept // factor, factor, *volume.shape[1:])
    return to_dtype(slabs.mean(axis=1, dtype=np.float64), volume.dtype)


def thick_geometry(geometry: Geometry, factor: int) -> Geometry:
    """The geometry of the slabs of :func:`average_slices`: spacing ×``factor`` on z, origin at the
    first slab's centre (moved ``(factor - 1) / 2`` thin slices along the direction's z column).

    Args:
        geometry: the thin volume's geometry (3D).
        factor: slices per slab.
    """
    thin = geometry.spacing[0]
    shift = (factor - 1) / 2 * thin
    axis_z = geometry.direction[2::3]  # ITK row-major: column 2 is the slice axis in physical space
    origin = tuple(o + shift * d for o, d in zip(geometry.origin, axis_z))
    return Geometry((thin * factor, geometry.spacing[1], geometry.spacing[2]), origin, geometry.direction, 3)
