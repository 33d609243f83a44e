"""Pure cores of ``autoseg convert dicom-rt``: ROI name matching, slice geometry, contour rasterisation.

No DICOM reading here: numpy arrays and :class:`~autoseg.imageio.Geometry` in, masks out. How
contours become voxels is described in :mod:`autoseg.convert.dicom_rt`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry

#: Relative deviation of one slice gap from the median gap above which the series is non-uniform
#: (exported ImagePositionPatient values are rounded to ~0.01 mm; 1 % of a 1 mm gap is 0.01 mm).
GAP_RTOL = 0.01
#: Gaps shorter than this (mm) are duplicate slice positions.
DUPLICATE_MM = 1e-3


def normalize_roi_name(name: str) -> str:
    """The key ROI names are compared by: lower case, without spaces, ``_``, ``-`` and ``.``."""
    return re.sub(r"[\s_\-.]+", "", name).lower()


def build_alias_index(roi_map: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Map every normalised alias (and label name) to its label.

    Args:
        roi_map: ``{label_name: [alias, ...]}`` in label order.

    Returns:
        ``{normalised alias: label_name}``.

    Raises:
        ConfigError: the map is empty, or one alias names two labels.
    """
    if not roi_map:
        raise ConfigError("the ROI map is empty; give at least one label with its ROI names")
    index: dict[str, str] = {}
    for label, aliases in roi_map.items():
        for alias in (label, *aliases):
            key = normalize_roi_name(alias)
            if not key:
                raise ConfigError(f"ROI map: label {label!r} has an empty alias; remove it")
            if index.get(key, label) != label:
                raise ConfigError(f"ROI map: alias {alias!r} names both {index[key]!r} and {label!r}; "
                                  "give each ROI name to one label")
            index[key] = label
    return index


def match_roi(name: str, alias_index: Mapping[str, str]) -> str | None:
    """The label an ROI name stands for, or None (exact match after :func:`normalize_roi_name`)."""
    return alias_index.get(normalize_roi_name(name))


def parse_roi_map(data: Any, source: str = "ROI map") -> dict[str, tuple[str, ...]]:
    """Validate a ROI map read from YAML/JSON: ``{label_name: [aliases...]}`` (a single alias may be a string).

    Raises:
        ConfigError: not a mapping of names to lists of names.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a mapping {{label_name: [ROI names...]}}, got {type(data).__name__}; "
                          "write e.g. 'Heart: [Heart, HEART_1]'")
    parsed: dict[str, tuple[str, ...]] = {}
    for label, aliases in data.items():
        if isinstance(aliases, str):
            aliases = [aliases]
        if aliases is None:
            aliases = []
        if not isinstance(label, str) or not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ConfigError(f"{source}: entry {label!r}: {aliases!r} is not a list of ROI names; "
                              "write 'label_name: [ROI name, ...]'")
        if label == "background":
            raise ConfigError(f"{source}: 'background' is the name of value 0; name the label otherwise")
        parsed[label] = tuple(aliases)
    build_alias_index(parsed)  # rejects collisions early
    return parsed


def load_roi_map(path: Path) -> dict[str, tuple[str, ...]]:
    """Read a ROI map file (YAML or JSON; JSON is YAML).

    Raises:
        ConfigError: missing, unreadable or not a ``{label: [aliases]}`` mapping.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: ROI map file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot read the ROI map ({reason}); write it as YAML or JSON") from None
    return parse_roi_map(data, source=str(path))


def physical_to_index(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map physical points (mm, ITK/DICOM patient order x, y, z) to continuous voxel indices.

    Args:
        points: ``(N, 3)`` physical coordinates.
        geometry: a 3D geometry (spacing in array order z, y, x; origin and direction ITK order).

    Returns:
        ``(N, 3)`` continuous indices in ITK order ``(i, j, k)`` = (column, row, slice); integer
        values are voxel centres.
    """
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    offset = np.asarray(points, dtype=float) - np.asarray(geometry.origin, dtype=float)
    steps = np.linalg.solve(direction, offset.T).T
    return steps / np.asarray(geometry.spacing[::-1], dtype=float)


def polygon_area(xy: np.ndarray) -> float:
    """Area of a simple closed polygon (shoelace formula), in the units of its coordinates squared."""
    x, y = np.asarray(xy, dtype=float)[:, 0], np.asarray(xy, dtype=float)[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def rasterize_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill polygons on a pixel grid by the even-odd rule (several polygons: their XOR).

    A pixel ``(row, col)`` is inside when its centre ``(x=col, y=row)`` is: an even-odd scanline
    fill whose edges are half-open in y (a vertex on a scanline is crossed once) and whose spans are
    half-open in x, so the filled pixel count matches the polygon's area to within its boundary.

    Args:
        polygons: ``(N, 2)`` vertex arrays in continuous pixel indices ``(x, y)``; closed implicitly.
            Fewer than 3 vertices fill nothing.
        shape: grid size ``(rows, columns)``.

    Returns:
        Boolean mask of ``shape``.
    """
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    valid = [np.asarray(p, dtype=float) for p in polygons]
    valid = [p for p in valid if p.ndim == 2 and len(p) >= 3]
    if not valid:
        return mask
    # Only the band of rows the polygons span is filled (most contours cover a small part of a slice).
    top = int(np.clip(np.ceil(min(p[:, 1].min() for p in valid)), 0, height))
    bottom = int(np.clip(np.ceil(max(p[:, 1].max() for p in valid)), 0, height))
    if bottom <= top:
        return mask
    toggles = np.zeros((bottom - top) * (width + 1), dtype=np.int64)
    for p in valid:
        x0, y0 = p[:, 0], p[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # Scanline r crosses an edge when min(y) <= r < max(y): rows ceil(min(y)) .. ceil(max(y)) - 1.
        first = np.clip(np.ceil(np.minimum(y0, y1)), top, bottom).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1)), top, bottom).astype(np.int64)
        counts = np.maximum(stop - first, 0)
        if not counts.sum():
            continue
        edge = np.repeat(np.arange(len(p)), counts)
        starts = np.cumsum(counts) - counts
        rows = first[edge] + (np.arange(edge.size) - starts[edge])
        x = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        # A crossing at x toggles every pixel centre c >= x, i.e. from column ceil(x) on; crossings
        # right of the grid toggle nothing (column `width` is dropped below).
        cols = np.clip(np.ceil(x), 0, width).astype(np.int64)
        toggles += np.bincount((rows - top) * (width + 1) + cols, minlength=toggles.size)
    band = np.cumsum(toggles.reshape(bottom - top, width + 1)[:, :width], axis=1) % 2
    mask[top:bottom] = band.astype(bool)
    return mask


@dataclass(frozen=True)
class RoiRaster:
    """One ROI on the CT grid.

    Attributes:
        mask: ``(Z, Y, X)`` boolean mask.
        used: number of contours rasterised.
        missed_z: patient z (mm) of each contour that lies on no CT slice.
    """

    mask: np.ndarray
    used: int
    missed_z: tuple[float, ...]


def rasterize_contours(contours: Sequence[np.ndarray], geometry: Geometry, shape: tuple[int, int, int]) -> RoiRaster:
    """Rasterise one ROI's planar contours onto a CT grid.

    Each contour goes to the slice nearest its mean continuous slice index; a contour more than
    half a slice outside the volume is missed. Contours sharing a slice are filled together (XOR).

    Args:
        contours: ``(N, 3)`` physical points (mm) per contour.
        geometry: the CT geometry.
        shape: the CT array shape ``(Z, Y, X)``.

    Returns:
        The mask, the number of contours used, and the z of each missed contour.
    """
    by_slice: dict[int, list[np.ndarray]] = {}
    missed: list[float] = []
    for points in contours:
        index = physical_to_index(points, geometry)
        k = int(np.floor(float(index[:, 2].mean()) + 0.5))
        if not 0 <= k < shape[0]:
            missed.append(float(np.asarray(points)[:, 2].mean()))
            continue
        by_slice.setdefault(k, []).append(index[:, :2])
    mask = np.zeros(shape, dtype=bool)
    for k, polygons in by_slice.items():
        mask[k] = rasterize_polygons(polygons, (shape[1], shape[2]))
    return RoiRaster(mask, sum(len(p) for p in by_slice.values()), tuple(missed))


def priority_label_map(masks: Sequence[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    """One label map from per-label masks: label ``i + 1`` for mask ``i``, later masks win overlaps."""
    out = np.zeros(shape, dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for value, mask in enumerate(masks, start=1):
        if mask is not None:
            out[mask] = value
    return out


def overlap_counts(masks: Sequence[np.ndarray | None], names: Sequence[str]) -> dict[tuple[str, str], int]:
    """Voxel counts of every overlapping pair of masks, ``{(earlier, later): voxels}``."""
    counts: dict[tuple[str, str], int] = {}
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            ma, mb = masks[a], masks[b]
            if ma is None or mb is None:
                continue
            n = int(np.count_nonzero(ma & mb))
            if n:
                counts[(names[a], names[b])] = n
    return counts


def series_geometry(positions: Sequence[Sequence[float]], orientation: Sequence[float],
                    pixel_spacing: Sequence[float], thickness: float | None, where: str) -> tuple[list[int], Geometry]:
    """Slice order and geometry of a CT series from its DICOM header values.

    Args:
        positions: ImagePositionPatient of every slice (file order).
        orientation: ImageOrientationPatient (row direction, then column direction).
        pixel_spacing: PixelSpacing ``(between rows = y, between columns = x)``.
        thickness: SliceThickness, the slice spacing of a one-slice series.
        where: names the series in messages.

    Returns:
        The slice order (indices into ``positions``, ascending along the slice normal, as ITK's and
        GDCM's position sorter) and the geometry: origin at the first slice, direction columns
        (row direction, column direction, normal), spacing from the positions.

    Raises:
        DatasetError: duplicate positions, or non-uniform gaps (a missing slice).
    """
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    pos = np.asarray(positions, dtype=float)
    along = pos @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_along = along[order]
    gaps = np.diff(sorted_along)
    if gaps.size:
        if gaps.min() < DUPLICATE_MM:
            i = int(np.argmin(gaps))
            raise DatasetError(f"{where}: two CT slices share the position {sorted_along[i]:.2f} mm along the slice "
                               "normal; remove the duplicate files (or separate two series mixed in one folder)")
        dz = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - dz) > GAP_RTOL * dz)
        if bad.size:
            i = int(bad[0])
            raise DatasetError(f"{where}: CT slice positions are not evenly spaced: gap of {gaps[i]:.3g} mm between "
                               f"{sorted_along[i]:.2f} and {sorted_along[i + 1]:.2f} mm, {dz:.3g} mm elsewhere "
                               "(a slice is missing); re-export the complete series")
    else:
        dz = float(thickness) if thickness and thickness > 0 else 1.0
    direction = np.stack([row, col, normal], axis=1)  # columns: the i, j, k axes in patient space
    geometry = Geometry(
        spacing=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in pos[order[0]]),
        direction=tuple(float(v) for v in direction.ravel()),
        ndim=3,
    )
    return order, geometry
