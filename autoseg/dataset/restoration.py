"""Restoration datasets (denoising, super-resolution): the per-case checks of a target file, and the
body mask that stands in for labels in the fingerprint and in patch sampling.

Pure functions: arrays and geometries in, :class:`~autoseg.dataset.layout.Issue` objects (or masks)
out. The scan (:mod:`autoseg.dataset.scan`) calls them for datasets whose ``"task"`` has targets
instead of labels (:mod:`autoseg.dataset.kinds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.channels import scheme_for_channel
from autoseg.dataset.check import check_image_values, compare_geometry
from autoseg.dataset.layout import Issue
from autoseg.dataset.super_resolution import DIRECTION_TOLERANCE, grid_issue
from autoseg.errors import UnknownNameError
from autoseg.imageio import Geometry

#: Lowest plausible CT value of a clean image: air is -1000 HU and scanners clamp at -1024 (12-bit
#: storage with intercept -1024); anything below -1100 is not tissue or air.
HU_MIN = -1100.0
#: Highest plausible CT value without an extended HU scale: cortical bone ~1900 HU, dental enamel
#: ~3000 HU, the 12-bit ceiling 3071 HU. Metal on extended-scale scanners exceeds it (a warning).
HU_MAX = 4000.0
#: Values scanners write outside the reconstructed field of view: -2048 (Siemens, Philips),
#: -3024 (GE: -1024 - 2000), -2000 and -3000 (other exports). Not implausible HU.
CT_PADDING_VALUES: tuple[float, ...] = (-3024.0, -3000.0, -2048.0, -2000.0)
#: The body of a CT: denser than lung parenchyma (-900 .. -500 HU, lungs are filled in as holes)
#: and than air; the couch is included, which does not matter for an intensity scale.
BODY_HU = -500.0
#: A clean target may have this fraction of its voxels below HU_MIN before a warning (0.1 %).
IMPLAUSIBLE_FRACTION = 1e-3
#: Voxels below BODY_HU needed to judge where the air lies (fewer: no air to speak of).
AIR_MIN_VOXELS = 100


def is_ct_channel(name: str) -> bool:
    """True when the channel's name selects the CT scheme (``CT``, ``LDCT``, ``NCCT``, ...)."""
    try:
        return scheme_for_channel(name) == "ct"
    except UnknownNameError:
        return False


def body_mask(image: np.ndarray, channel_names: Sequence[str]) -> np.ndarray:
    """The body voxels of a ``(C, Z, Y, X)`` image: what restoration's intensity statistics and patch
    sampling use instead of the foreground of a label map.

    A CT channel counts voxels above :data:`BODY_HU` with the holes of each axis-0 slice filled (the
    lungs, enclosed in-plane, become body); any other channel counts nonzero voxels. The channels'
    masks are joined. An image with no such voxel (a phantom of air) gives the whole image, so that
    the statistics and the sampler always have voxels.

    Args:
        image: ``(C, Z, Y, X)`` in its stored units (HU for CT).
        channel_names: one name per channel.

    Returns:
        ``(Z, Y, X)`` bool mask.
    """
    mask = np.zeros(image.shape[1:], dtype=bool)
    for channel, name in zip(image, channel_names):
        mask |= (channel > BODY_HU) if is_ct_channel(name) else (channel != 0)
    # In-plane connectivity only: each axis-0 slice is filled on its own (a chest's lungs touch the
    # volume's first and last slices, so a 3D fill would leave them out).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_fill_holes(mask, structure=structure)
    return mask if mask.any() else np.ones(image.shape[1:], dtype=bool)


def check_ct_values(channel: np.ndarray, *, case: str, file: str, degraded: bool = False) -> list[Issue]:
    """Implausible HU in a CT channel.

    * error: the air is not at about -1000 HU (the median of the voxels below -500 HU, scanner
      padding left out, is below :data:`HU_MIN`): the image is not in HU (an intercept applied twice,
      or values stored without theirs). Noise cannot move a median.
    * warning, clean targets only: more than :data:`IMPLAUSIBLE_FRACTION` of the voxels lie below
      :data:`HU_MIN` without being padding. A degraded input is spared: low-dose noise in air
      legitimately reaches below -1100 HU (σ 100 HU puts 16 % of the air there).
    * warning: voxels above :data:`HU_MAX` (metal on an extended HU scale, or a missing rescale).
    * warning: an unsigned pixel type, which holds no negative HU.

    Args:
        channel: one CT channel as read.
        case, file: for the messages.
        degraded: the channel is a degraded input (noise tails below -1100 HU are expected).
    """
    issues: list[Issue] = []
    if channel.dtype.kind in "ub":
        issues.append(Issue("warning", "ct-unsigned", f"pixel type {channel.dtype} cannot hold negative HU",
                            "was the rescale intercept (usually -1024) dropped on export? Store CT as signed "
                            "HU (int16 or float)", case=case, file=file))
    if channel.dtype.kind == "f" and not np.isfinite(channel).all():
        return issues  # reported by check_image_values
    padding = np.isin(channel, CT_PADDING_VALUES)
    air = channel[(channel < BODY_HU) & ~padding]
    air_level = float(np.median(air)) if air.size >= AIR_MIN_VOXELS else None
    if air_level is not None and air_level < HU_MIN:
        issues.append(Issue("error", "implausible-hu", f"the air lies at {air_level:g} HU (median of the voxels below "
                            f"{BODY_HU:g}), not at about -1000", "the image is not in HU: check the rescale slope and "
                            "intercept of the export (applied twice?)", case=case, file=file))
    elif not degraded:
        low = (channel < HU_MIN) & ~padding
        count = int(np.count_nonzero(low))
        if count > IMPLAUSIBLE_FRACTION * channel.size:
            issues.append(Issue("warning", "implausible-hu", f"{count} voxel(s) below {HU_MIN:g} HU (minimum "
                                f"{float(channel[low].min()):g}) that are no scanner padding "
                                f"({', '.join(f'{v:g}' for v in CT_PADDING_VALUES)})",
                                "a clean target below air (-1000 HU) is noise or a rescale problem; clip it at "
                                "-1024, or mark the field-of-view padding with -2048 or -3024", case=case, file=file))
    high = int(np.count_nonzero(channel > HU_MAX))
    if high:
        issues.append(Issue("warning", "implausible-hu", f"{high} voxel(s) above {HU_MAX:g} HU (maximum "
                            f"{float(channel.max()):g})", "fine for metal on an extended-HU scanner; otherwise "
                            "the image is not in HU (a missing rescale?)", case=case, file=file))
    return issues


def check_target(
    image: np.ndarray, image_geometry: Geometry, image_file: str,
    target: np.ndarray, target_geometry: Geometry, *,
    same_grid: bool, channel_names: Sequence[str], case: str, file: str,
) -> list[Issue]:
    """Every problem of a restoration target beside its degraded image.

    Denoising (``same_grid``): shape, spacing, origin and direction must match the image's (a pair
    that does not overlap voxel for voxel teaches a shift, not a denoiser). Super-resolution: the
    target lies on the input's grid refined by an integer factor per axis, over the same physical extent
    (:func:`autoseg.dataset.super_resolution.grid_issue`). Both: channel count, NaN/Inf,
    constant values, HU plausibility of CT channels, and the pixel type beside the image's.

    Args:
        image: the degraded image ``(C, Z, Y, X)``, as read.
        image_geometry, image_file: its geometry and file (for the messages).
        target: the clean target, as read.
        target_geometry: its geometry.
        same_grid: denoising (True) or super-resolution (False).
        channel_names: the dataset's channels (a ``CT`` one gets the HU checks).
        case, file: the case and the target's file, for the messages.

    Returns:
        The issues, possibly none.
    """
    issues: list[Issue] = []
    if target.shape[0] != image.shape[0]:
        return [Issue("error", "wrong-channel-count", f"target holds {target.shape[0]} channel(s), its image "
                      f"{image.shape[0]}", "store the clean target with as many channels as the degraded image",
                      case=case, file=file)]
    if target.dtype.kind not in "iuf" or image.dtype.kind not in "iuf":
        kind = target.dtype if target.dtype.kind not in "iuf" else image.dtype
        return [Issue("error", "pixel-type", f"pixel type {kind} is not a number type a network can learn",
                      "store images and targets as integers or floats (int16 HU for CT)", case=case, file=file)]
    if same_grid:
        issues.extend(compare_geometry(image_geometry, image.shape[1:], target_geometry, target.shape[1:],
                                       what=f"target vs {image_file}", case=case, file=file, subject="target"))
    else:
        issues.extend(_check_finer_grid(image_geometry, image.shape[1:], target_geometry, target.shape[1:],
                                        case=case, file=file, image_file=image_file))
    for c, (channel, name) in enumerate(zip(target, channel_names)):
        where = file if target.shape[0] == 1 else f"{file} [channel {c}]"
        issues.extend(check_image_values(channel, case=case, file=where))
        if is_ct_channel(name):
            issues.extend(check_ct_values(channel, case=case, file=where))
    if image.dtype != target.dtype:
        issues.append(Issue("warning", "pixel-type-mismatch", f"target pixel type {target.dtype}, image "
                            f"{image.dtype}", f"fine: predictions are written as the input's {image.dtype}; store "
                            "both alike to compare them voxel for voxel", case=case, file=file))
    return issues


def _check_finer_grid(a: Geometry, shape_a: Sequence[int], b: Geometry, shape_b: Sequence[int], *,
                      case: str, file: str, image_file: str) -> list[Issue]:
    """Super-resolution: the target on the image's grid refined by integer factors, same physical extent."""
    if a.ndim != b.ndim:
        return [Issue("error", "dimension-mismatch", f"target vs {image_file}: {b.ndim}D vs {a.ndim}D",
                      "store both with the same number of dimensions", case=case, file=file)]
    if a.ndim != 3:
        return [Issue("error", "dimension-mismatch", f"{a.ndim}D images: super-resolution takes 3D volumes",
                      'use 3D images (or "task": "denoise" for 2D pairs on one grid)', case=case, file=file)]
    issues: list[Issue] = []
    coarser = [axis for axis, (sa, sb) in enumerate(zip(a.spacing, b.spacing)) if sb > sa * 1.001]
    if coarser:
        issues.append(Issue("error", "target-coarser", f"target spacing {tuple(b.spacing[::-1])} mm is coarser "
                            f"than the image's {tuple(a.spacing[::-1])} (x, y, z)",
                            "a super-resolution target has the finer grid: swap images and targets?",
                            case=case, file=file))
    extent_a = np.asarray(shape_a, dtype=float) * np.asarray(a.spacing)
    extent_b = np.asarray(shape_b, dtype=float) * np.asarray(b.spacing)
    off = float(np.max(np.abs(extent_a - extent_b) - np.asarray(a.spacing)))
    if off > 0:
        issues.append(Issue("error", "extent-mismatch", f"target covers {tuple(np.round(extent_b[::-1], 2))} mm, "
                            f"the image {tuple(np.round(extent_a[::-1], 2))} mm (x, y, z)",
                            "the pair must show the same field of view: re-export one of them",
                            case=case, file=file))
    turn = float(np.max(np.abs(np.array(a.direction) - np.array(b.direction))))
    if turn > DIRECTION_TOLERANCE:  # the fine grid is built along the input's directions
        issues.append(Issue("error", "direction-mismatch", f"target vs {image_file}: direction cosines differ by "
                            f"up to {turn:.3g} (more than float32 rounding, {DIRECTION_TOLERANCE:g})",
                            "re-export both in one orientation", case=case, file=file))
    if not issues:
        # Predictions are written on the input's fine grid (autoseg.dataset.super_resolution): a
        # target elsewhere would be scored, and learnt, shifted.
        problem = grid_issue(a, shape_a, b, shape_b)
        if problem is not None:
            issues.append(Issue("error", "target-grid", f"target vs {image_file}: {problem[0]}", problem[1],
                                case=case, file=file))
    return issues
