"""Intensity normalisation: the numpy implementation of each scheme of :mod:`autoseg.channels`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autoseg.errors import UnknownNameError


def normalize_ct(image: np.ndarray, clip_low: float, clip_high: float, mean: float, std: float) -> np.ndarray:
    """Clip to the dataset's foreground percentiles, then global mean/std (nnU-Net's CT scheme)."""
    # float32 first, then clipped in place: np.clip of an int16 CT with float bounds makes a float64
    # array (8 bytes a voxel: 840 MB for a 512x512x400 CT) before the cast. The same values: the
    # bounds are rounded to float32 either way and rounding is monotonic.
    out = np.array(image, dtype=np.float32, copy=True)
    np.clip(out, clip_low, clip_high, out=out)
    out -= np.float32(mean)
    out /= np.float32(max(std, 1e-8))
    return out


def normalize_linear(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(image - mean) / std`` with the dataset's numbers and no clipping: exactly invertible
    (restoration's scheme; its inverse is :func:`autoseg.preprocessing.restoration.denormalize`)."""
    out = image.astype(np.float32, copy=True)
    out -= np.float32(mean)
    out /= np.float32(max(std, 1e-8))
    return out


def normalize_zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image z-score; statistics (and output) restricted to ``mask`` when given."""
    out = image.astype(np.float32, copy=True)
    values = out[mask] if mask is not None else out
    if values.size == 0:
        return np.zeros_like(out)
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    out -= np.float32(mean)
    out /= np.float32(max(std, 1e-8))
    if mask is not None:
        out[~mask] = 0
    return out


def normalize_rescale(image: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] by the image's own min and max."""
    out = image.astype(np.float32, copy=True)
    lo, hi = float(out.min()), float(out.max())
    out -= np.float32(lo)
    out /= np.float32(max(hi - lo, 1e-8))
    return out


def normalize_rgb(image: np.ndarray) -> np.ndarray:
    """8-bit colour channel to [0, 1]."""
    return image.astype(np.float32) / np.float32(255.0)


NORMALIZERS: dict[str, Callable[..., np.ndarray]] = {
    "ct": normalize_ct,
    "zscore": normalize_zscore,
    "none": lambda image: image.astype(np.float32, copy=False),
    "rescale_0_1": normalize_rescale,
    "rgb_0_1": normalize_rgb,
    "linear": normalize_linear,
}


def normalize_channel(
    channel: np.ndarray,
    scheme: str,
    *,
    mask: np.ndarray | None = None,
    use_mask: bool = False,
    clip: tuple[float, float] | None = None,
    mean: float | None = None,
    std: float | None = None,
) -> np.ndarray:
    """Normalise one channel with a scheme from the plans (the preprocessor's single entry point).

    Args:
        channel: the channel's voxels, any numeric dtype.
        scheme: a name from :data:`SCHEMES`.
        mask: the nonzero region of the case (same shape as ``channel``); used by ``zscore`` when
            ``use_mask`` is set (nnU-Net: only its z-score honours ``use_mask_for_norm``).
        use_mask: restrict the z-score statistics (and output) to ``mask``.
        clip, mean, std: the dataset's foreground window and statistics, for ``ct``; ``linear``
            takes mean and std only.

    Returns:
        A float32 array of ``channel``'s shape.

    Raises:
        UnknownNameError: ``scheme`` is not a known scheme.
        ValueError: ``ct`` without clip/mean/std, ``linear`` without mean/std, or ``use_mask`` without a mask (plans validation
            rules both out, so this is a bug in the caller).
    """
    if scheme not in NORMALIZERS:
        raise UnknownNameError("normalisation scheme", scheme, NORMALIZERS)
    if scheme == "ct":
        if clip is None or mean is None or std is None:
            raise ValueError("scheme 'ct' needs clip, mean and std")
        return normalize_ct(channel, clip[0], clip[1], mean, std)
    if scheme == "linear":
        if mean is None or std is None:
            raise ValueError("scheme 'linear' needs mean and std")
        return normalize_linear(channel, mean, std)
    if scheme == "zscore":
        if use_mask and mask is None:
            raise ValueError("z-score with use_mask needs the nonzero mask")
        return normalize_zscore(channel, mask if use_mask else None)
    return NORMALIZERS[scheme](channel)
