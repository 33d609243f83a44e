"""Intensity normalisation schemes: which scheme a channel gets, and the numpy implementations.

Torch-free; the planner, the dataset check and the preprocessor all use it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autoseg.errors import UnknownNameError

#: Scheme names that may be written in plans.yaml.
SCHEMES: tuple[str, ...] = ("ct", "zscore", "none", "rescale_0_1", "rgb_0_1")

# Channel names (case-insensitive) that select a scheme. A channel may also be named after a
# scheme directly ("zscore", "noNorm", ... as nnU-Net allows). Anything else is an error: nnU-Net
# silently z-scores unknown names, which hides typos such as "CT " or "Ct-scan".
_CHANNEL_TO_SCHEME: dict[str, str] = {
    **{name: "ct" for name in ("ct", "cta", "cbct", "ct_normalization", "ctnormalization")},
    **{
        name: "zscore"
        for name in (
            "zscore", "z-score", "zscorenormalization", "mri", "mr", "t1", "t1w", "t1c", "t1ce",
            "t1gd", "t1-gd", "t1_gd", "t2", "t2w", "t2*", "flair", "adc", "dwi", "pd", "pdw", "swi",
            "dce", "bold", "cine", "native", "nonnative", "pet", "spect", "us", "ultrasound", "xr",
            "x-ray", "xray", "dx", "cr", "mg", "mammography", "em", "microscopy", "fluorescence",
            "histology", "oct", "fundus", "endoscopy", "r", "g", "b", "red", "green", "blue",
            "gray", "grey", "greyscale", "grayscale", "intensity", "image",
        )
    },
    **{name: "none" for name in ("none", "nonorm", "no_norm", "no-norm", "raw")},
    **{name: "rescale_0_1" for name in ("rescale_0_1", "rescale_to_0_1", "rescaleto01")},
    **{name: "rgb_0_1" for name in ("rgb_0_1", "rgb_to_0_1", "rgbto01")},
}


def scheme_for_channel(channel_name: str) -> str:
    """The normalisation scheme for a channel name from dataset.json.

    Raises:
        UnknownNameError: the name selects no scheme (the message suggests the closest name).
    """
    key = channel_name.strip().lower()
    if key in _CHANNEL_TO_SCHEME:
        return _CHANNEL_TO_SCHEME[key]
    raise UnknownNameError("channel name", channel_name, _CHANNEL_TO_SCHEME)


def known_channel_names() -> list[str]:
    """All channel names that select a scheme (lower case)."""
    return sorted(_CHANNEL_TO_SCHEME)


def normalize_ct(image: np.ndarray, clip_low: float, clip_high: float, mean: float, std: float) -> np.ndarray:
    """Clip to the dataset's foreground percentiles, then global mean/std (nnU-Net's CT scheme)."""
    out = np.clip(image, clip_low, clip_high).astype(np.float32, copy=False)
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
        clip, mean, std: the dataset's foreground window and statistics, for ``ct``.

    Returns:
        A float32 array of ``channel``'s shape.

    Raises:
        UnknownNameError: ``scheme`` is not a known scheme.
        ValueError: ``ct`` without clip/mean/std, or ``use_mask`` without a mask (plans validation
            rules both out, so this is a bug in the caller).
    """
    if scheme not in NORMALIZERS:
        raise UnknownNameError("normalisation scheme", scheme, NORMALIZERS)
    if scheme == "ct":
        if clip is None or mean is None or std is None:
            raise ValueError("scheme 'ct' needs clip, mean and std")
        return normalize_ct(channel, clip[0], clip[1], mean, std)
    if scheme == "zscore":
        if use_mask and mask is None:
            raise ValueError("z-score with use_mask needs the nonzero mask")
        return normalize_zscore(channel, mask if use_mask else None)
    return NORMALIZERS[scheme](channel)
