"""Image-quality metrics of restoration in an intensity window: PSNR, RMSE, SSIM 2D and 3D (numpy, skimage).

The one definition that fold validation (:meth:`autoseg.tasks.restoration.Denoise.score_case`),
the trainer's online PSNR (:func:`psnr_from_mse`) and ``autoseg evaluate``
(:mod:`autoseg.evaluation.restoration`) share; docs/evaluation.md, "Restoration", describes it:

* **Window.** Both images are clipped to ``[L, H]`` before anything is computed, and the data
  range of PSNR and SSIM is ``H - L``. The default is the AAPM/Mayo Low-Dose CT Grand Challenge
  window ``[-160, 240]`` HU (data range 400; McCollough et al., Med. Phys. 44(10), 2017): what a
  reader sees is compared, and a difference in air or metal outside it does not dominate the
  score. :data:`FULL` means no clipping, with the data range of each case taken as its
  reference's max - min.
* **PSNR** ``10 log10(data_range² / MSE)`` with the MSE over the whole case (the formula and
  arithmetic of skimage's ``peak_signal_noise_ratio``); None when the MSE is 0 (the images are
  equal in the window). **RMSE** ``sqrt(MSE)`` in the images' units (HU for CT), in the window.
* **SSIM** with skimage ``structural_similarity``: the uniform :data:`SSIM_WIN_SIZE`-wide window
  (skimage's default, not the 11×11 Gaussian with σ 1.5 of Wang et al. 2004, which gives other
  numbers), K1 0.01, K2 0.03, sample covariance, ``data_range`` always given. "SSIM 2D" is the mean
  over axial slices (the LDCT literature's convention; slices smaller than the window in-plane have
  none), "SSIM 3D" one value over the volume (``channel_axis=None``), computed in slabs of slices
  so that its working memory does not grow with the volume (the same value as one call on the
  whole volume).

This module is a leaf (numpy only at import; skimage is imported by the functions that need it),
so that the tasks, below :mod:`autoseg.evaluation`, can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The AAPM/Mayo Low-Dose CT Grand Challenge display window for abdominal CT, in HU (data range 400).
DEFAULT_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: SSIM window: skimage's default uniform 7×7 (7×7×7 in 3D); gaussian_weights=False. The other
#: common choice, an 11×11 Gaussian with σ 1.5 (Wang et al. 2004), gives different numbers.
SSIM_WIN_SIZE = 7
SSIM_GAUSSIAN_WEIGHTS = False
#: Every setting of structural_similarity (``autoseg evaluate`` writes it into its report).
SSIM_SETTINGS: dict[str, Any] = {"win_size": SSIM_WIN_SIZE, "gaussian_weights": SSIM_GAUSSIAN_WEIGHTS,
                                 "K1": 0.01, "K2": 0.03, "use_sample_covariance": True,
                                 "library": "skimage.metrics.structural_similarity"}
#: Output slices per SSIM-3D slab (each slab reads 3 more slices on each side).
SSIM_3D_SLAB = 16
#: The keys of :func:`restoration_metrics` that are scores, in table order.
METRIC_KEYS = ("psnr_db", "ssim_2d", "ssim_3d", "rmse_hu")


@dataclass(frozen=True)
class Window:
    """The intensity window in which restoration is scored.

    Attributes:
        low, high: the window (HU for CT); both None for :data:`FULL` (no clipping, data range =
            the reference's max - min over each case).

    Raises:
        ValueError: one bound is None and the other not, a bound is not finite, or low >= high.
    """

    low: float | None
    high: float | None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            return
        if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)) \
                or not self.low < self.high:
            raise ValueError(f"window ({self.low}, {self.high}) must be [low, high] with finite low < high")

    @property
    def full(self) -> bool:
        return self.low is None

    def describe(self) -> str:
        """``[-160, 240] HU (data range 400)`` or the full-range wording, for table headers."""
        if self.full:
            return "full (no clipping; data range = reference max - min, per case)"
        return f"[{self.low:g}, {self.high:g}] HU (data range {self.high - self.low:g})"

    def to_dict(self) -> dict[str, Any]:
        if self.full:
            return {"name": "full", "low": None, "high": None, "clipped": False,
                    "data_range": "per case: the reference's max - min (cases.<case>.data_range)"}
        return {"name": f"[{self.low:g}, {self.high:g}]", "low": self.low, "high": self.high, "clipped": True,
                "data_range": self.high - self.low}


#: No clipping (``autoseg evaluate --window full``).
FULL = Window(None, None)


def clip_to_window(image: np.ndarray, window: Window) -> np.ndarray:
    """``image`` as float64, clipped to the window (a copy; unclipped for :data:`FULL`)."""
    out = np.array(image, dtype=np.float64)
    if not window.full:
        np.clip(out, window.low, window.high, out=out)
    return out


def data_range_of(reference: np.ndarray, window: Window) -> float:
    """``H - L``, or for :data:`FULL` the reference's max - min."""
    if window.full:
        return float(np.max(reference)) - float(np.min(reference)) if reference.size else 0.0
    return float(window.high - window.low)


def psnr_from_mse(mse: float, data_range: float) -> float | None:
    """``10 log10(data_range² / MSE)`` in dB, as skimage's ``peak_signal_noise_ratio`` computes it;
    None when the MSE or the data range is not positive (infinite or undefined PSNR)."""
    if not (mse > 0 and data_range > 0):
        return None
    return float(10 * np.log10((data_range ** 2) / mse))


def _ssim(reference: np.ndarray, image: np.ndarray, data_range: float, full: bool = False) -> Any:
    from skimage.metrics import structural_similarity

    return structural_similarity(reference, image, win_size=SSIM_WIN_SIZE, gaussian_weights=SSIM_GAUSSIAN_WEIGHTS,
                                 data_range=data_range, channel_axis=None, full=full)


def ssim_2d(image: np.ndarray, reference: np.ndarray, data_range: float, axis: int = 0) -> tuple[float | None, int]:
    """Mean SSIM over the slices across ``axis`` (axial slices for the axial axis).

    Returns:
        The mean and how many slices it is over; ``(None, 0)`` when a slice is smaller than
        :data:`SSIM_WIN_SIZE` in-plane.
    """
    image, reference = np.moveaxis(image, axis, 0), np.moveaxis(reference, axis, 0)
    if reference.shape[0] == 0 or min(reference.shape[1:]) < SSIM_WIN_SIZE:
        return None, 0
    values = [float(_ssim(reference[k], image[k], data_range)) for k in range(reference.shape[0])]
    return float(np.mean(values)), len(values)


def ssim_3d(image: np.ndarray, reference: np.ndarray, data_range: float, slab: int = SSIM_3D_SLAB) -> float | None:
    """SSIM over the volume (skimage, ``channel_axis=None``); None when an axis is shorter than the window.

    skimage's mean SSIM is the mean of the SSIM map without a border of ``(win - 1) / 2`` voxels,
    and a map value there depends only on voxels within that distance. So the volume is taken in
    slabs of ``slab`` output slices plus that border on each side, and the cropped maps' sums are
    pooled: the same number as one call on the whole volume, in a working memory of one slab.
    """
    if reference.ndim != 3 or min(reference.shape) < SSIM_WIN_SIZE:
        return None
    pad = (SSIM_WIN_SIZE - 1) // 2
    total, count = 0.0, 0
    for start in range(pad, reference.shape[0] - pad, slab):
        stop = min(start + slab, reference.shape[0] - pad)
        _, ssim_map = _ssim(reference[start - pad:stop + pad], image[start - pad:stop + pad], data_range, full=True)
        inner = ssim_map[pad:pad + stop - start, pad:-pad, pad:-pad]
        total += float(inner.sum(dtype=np.float64))
        count += inner.size
    return total / count


def restoration_metrics(image: np.ndarray, reference: np.ndarray, window: Window | None = None, *, axis: int = 0,
                        data_range: float | None = None) -> dict[str, float | int | None]:
    """PSNR, SSIM (2D per slice, averaged; and 3D) and RMSE of one image against its reference.

    Args:
        image, reference: ``(Z, Y, X)`` arrays of one shape, in the same units (HU for CT).
        window: both are clipped to it first (:data:`FULL`: not clipped); default :data:`DEFAULT_WINDOW`.
        axis: the axial axis (2D SSIM averages the slices across it).
        data_range: override (default: :func:`data_range_of` the reference).

    Returns:
        ``psnr_db``, ``ssim_2d``, ``ssim_3d``, ``rmse_hu``, ``ssim_2d_slices`` (slices averaged) and
        ``data_range``. PSNR is None when the images are equal in the window (infinite PSNR); PSNR
        and SSIM are None when the data range is 0 (a constant reference under :data:`FULL`); SSIM
        values are None for images smaller than :data:`SSIM_WIN_SIZE`.

    Raises:
        ValueError: the shapes differ (callers check files first and say which).
    """
    image, reference = np.asarray(image), np.asarray(reference)
    window = Window(*DEFAULT_WINDOW) if window is None else window
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from the reference's {reference.shape}")
    dr = data_range_of(reference, window) if data_range is None else float(data_range)
    ref, img = clip_to_window(reference, window), clip_to_window(image, window)
    mse = float(np.mean(np.square(img - ref, dtype=np.float64))) if ref.size else 0.0
    result: dict[str, float | int | None] = {"psnr_db": None, "ssim_2d": None, "ssim_3d": None,
                                             "rmse_hu": math.sqrt(mse), "ssim_2d_slices": 0, "data_range": dr}
    if dr <= 0:
        return result
    result["psnr_db"] = psnr_from_mse(mse, dr)
    result["ssim_2d"], result["ssim_2d_slices"] = ssim_2d(img, ref, dr, axis)
    result["ssim_3d"] = ssim_3d(img, ref, dr)
    return result


__all__ = ["DEFAULT_WINDOW", "FULL", "METRIC_KEYS", "SSIM_3D_SLAB", "SSIM_GAUSSIAN_WEIGHTS", "SSIM_SETTINGS",
           "SSIM_WIN_SIZE", "Window", "clip_to_window", "data_range_of", "psnr_from_mse", "restoration_metrics",
           "ssim_2d", "ssim_3d"]
