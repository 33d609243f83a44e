"""Per-case dataset checks on pixels and geometry, and the dataset-wide checks that follow them.

The structural checks (dataset.json, file layout) live in :mod:`autoseg.dataset.layout`; the reading loop
that runs these functions once per case (shared with the fingerprint) lives in :mod:`autoseg.dataset.scan`.
Every function here is pure: arrays and geometries in, :class:`Issue` objects out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.dataset.layout import Issue
from autoseg.imageio import Geometry

#: Relative spacing difference tolerated between a case's files (ITK's own default is 1e-6;
#: exported NIfTI headers commonly differ by float32 rounding, ~1e-7 relative).
SPACING_RTOL = 1e-3
#: Origin difference (mm) below which two files are taken to share a grid.
ORIGIN_ATOL = 1e-3
#: Origin difference, as a fraction of the finest voxel size, up to which a mismatch is a warning.
ORIGIN_WARN_VOXELS = 0.5
#: Direction-cosine difference below which directions match, and up to which it is a warning.
DIRECTION_ATOL = 1e-5
DIRECTION_WARN = 1e-2
#: Lossy binary masks: every value within this distance of 0 or 255 (JPEG moves a 0/255 edge by a
#: few grey levels; Kvasir-SEG's masks hold 0-8 and 247-255).
LOSSY_MARGIN = 32


def looks_lossy_binary(values: Sequence[int]) -> bool:
    """True for the values of a 0/255 mask saved lossily: more than two, all near 0 or near 255.

    Args:
        values: the distinct values found in one or more masks.

    Returns:
        Whether they cluster around 0 and 255 only (with at least one value near each).
    """
    distinct = sorted({int(v) for v in values})
    near_low = [v for v in distinct if 0 <= v <= LOSSY_MARGIN]
    near_high = [v for v in distinct if 255 - LOSSY_MARGIN <= v <= 255]
    return len(distinct) > 2 and bool(near_low) and bool(near_high) and len(near_low) + len(near_high) == len(distinct)


def compare_geometry(
    a: Geometry, shape_a: tuple[int, ...], b: Geometry, shape_b: tuple[int, ...],
    *, what: str, case: str, file: str, subject: str = "label",
) -> list[Issue]:
    """Issues for two files of one case that should share a voxel grid (``what`` names the pair,
    ``subject`` the second file's role in the fixes: ``label``, or a restoration ``target``)."""
    issues: list[Issue] = []
    if a.ndim != b.ndim:
        issues.append(Issue("error", "dimension-mismatch", f"{what}: {a.ndim}D vs {b.ndim}D",
                            "store both with the same number of dimensions", case=case, file=file))
        return issues
    if tuple(shape_a) != tuple(shape_b):
        issues.append(Issue("error", "shape-mismatch", f"{what}: shape {_xyz(shape_a)} vs {_xyz(shape_b)} (x, y, z)",
                            "resample or re-export so both have the same size", case=case, file=file))
    sa, sb = np.array(a.spacing), np.array(b.spacing)
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0):
        issues.append(Issue("error", "spacing-mismatch",
                            f"{what}: spacing {_fmt(a.spacing[::-1])} vs {_fmt(b.spacing[::-1])} mm (x, y, z)",
                            "write both with the same voxel spacing", case=case, file=file))
    oa, ob = np.array(a.origin), np.array(b.origin)
    shift = float(np.max(np.abs(oa - ob))) if oa.shape == ob.shape else float("inf")
    if shift > ORIGIN_ATOL:
        warn_limit = ORIGIN_WARN_VOXELS * float(min(a.spacing))
        severity = "warning" if shift <= warn_limit else "error"
        issues.append(Issue(severity, "origin-mismatch",
                            f"{what}: origin {_fmt(a.origin)} vs {_fmt(b.origin)} (off by {shift:.4g} mm)",
                            f"sub-voxel: harmless, the {subject} is used on the image grid" if severity == "warning"
                            else f"the files do not overlap voxel for voxel; re-export the {subject} on the image grid",
                            case=case, file=file))
    da, db = np.array(a.direction), np.array(b.direction)
    turn = float(np.max(np.abs(da - db))) if da.shape == db.shape else float("inf")
    if turn > DIRECTION_ATOL:
        severity = "warning" if turn <= DIRECTION_WARN else "error"
        issues.append(Issue(severity, "direction-mismatch",
                            f"{what}: direction cosines differ by up to {turn:.3g}",
                            "negligible rounding; the image's direction is used" if severity == "warning"
                            else "the files are oriented differently; re-export them in one orientation",
                            case=case, file=file))
    return issues


def check_image_values(image: np.ndarray, *, case: str, file: str) -> list[Issue]:
    """NaN/Inf voxels (error) and constant intensity (warning) in one channel."""
    issues: list[Issue] = []
    if image.dtype.kind == "f":
        finite = np.isfinite(image)
        if not finite.all():
            bad = int(image.size - np.count_nonzero(finite))
            issues.append(Issue("error", "non-finite", f"{bad} voxel(s) are NaN or Inf",
                                "replace them (e.g. with the background value) before training",
                                case=case, file=file))
            return issues
    lo, hi = image.min(), image.max()
    if lo == hi:
        issues.append(Issue("warning", "constant-image", f"every voxel has the value {lo.item()!r}",
                            "check the export: the image carries no information", case=case, file=file))
    return issues


def check_label_values(label: np.ndarray, declared: frozenset[int], *, case: str, file: str) -> list[Issue]:
    """Non-integer, non-finite and undeclared values in a label map."""
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            return [Issue("error", "non-finite", "label map holds NaN or Inf values",
                          "store labels as integers", case=case, file=file)]
        values = np.unique(label)
        fractional = values[values != np.round(values)]
        if fractional.size:
            shown = ", ".join(f"{v:g}" for v in fractional[:5])
            return [Issue("error", "non-integer-label", f"label map holds non-integer values ({shown})",
                          "labels must be whole numbers; was the label resampled with linear interpolation? "
                          "Re-export with nearest-neighbour", case=case, file=file)]
        values = values.astype(np.int64)
    elif label.dtype.kind in "iub":
        values = _unique_ints(label)
    else:
        return [Issue("error", "non-integer-label", f"label map has pixel type {label.dtype}",
                      "store labels as an integer image", case=case, file=file)]
    undeclared = sorted(int(v) for v in values if int(v) not in declared)
    if not undeclared:
        return []
    found = sorted(int(v) for v in values)
    if set(found) == {0, 255} or (set(found) <= {0, 255} and 255 in found):
        fix = "binary mask saved as 0/255: map 255 → 1 (e.g. 'autoseg convert png-masks --map 255=1')"
    elif looks_lossy_binary(found):
        # Declaring every grey level would make as many classes; the mask needs thresholding.
        fix = ("these look like a 0/255 mask saved lossily (JPEG): threshold it, e.g. 'autoseg convert png-masks "
               "IMAGES MASKS -o RAW --threshold 128'")
    else:
        fix = f"declare them in dataset.json 'labels' (declared: {sorted(declared)}) or fix the label map"
    return [Issue("error", "label-undeclared",
                  f"label values {undeclared} are not declared (values found: {found[:20]})", fix,
                  case=case, file=file)]


def _unique_ints(label: np.ndarray) -> np.ndarray:
    # bincount is several times faster than np.unique for small non-negative integers.
    if label.dtype.kind in "ub" and label.dtype.itemsize <= 2:
        counts = np.bincount(label.ravel())
        return np.flatnonzero(counts)
    return np.unique(label)


def check_mixed_dims(dims_by_case: dict[str, int]) -> list[Issue]:
    """Error when 2D and 3D cases are mixed; names the minority."""
    if len(set(dims_by_case.values())) < 2:
        return []
    n2 = sorted(c for c, d in dims_by_case.items() if d == 2)
    n3 = sorted(c for c, d in dims_by_case.items() if d == 3)
    minority, kind = (n2, "2D") if len(n2) <= len(n3) else (n3, "3D")
    shown = ", ".join(minority[:5]) + (" ..." if len(minority) > 5 else "")
    return [Issue("error", "mixed-dimensions",
                  f"{len(n2)} 2D and {len(n3)} 3D cases are mixed; {kind} cases: {shown}",
                  "a dataset must be all 2D or all 3D; split it into two datasets", file="imagesTr")]


def _xyz(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in reversed(tuple(shape)))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

