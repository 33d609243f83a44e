"""Image-quality metrics of restoration in a stated intensity window: RMSE, PSNR and SSIM (numpy).

Both images are clipped to the window first, as the AAPM/Mayo Low-Dose CT Grand Challenge scored
its abdominal CT (McCollough et al., Med. Phys. 44(10), 2017): in [-160, 240] HU what a reader sees
is compared, and a difference in air or metal outside the window does not dominate the score. The
window is always reported with the numbers.

Fold validation and the trainer's online PSNR use these definitions; ``autoseg evaluate``'s
restoration metrics (:mod:`autoseg.evaluation`) are meant to agree with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: The AAPM LDCT Grand Challenge display window for abdominal CT, in HU (width 400, level 40).
AAPM_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: PSNR of identical images (an MSE of 0) is infinite; it is reported as this many dB instead, which
#: no real restoration reaches (an RMSE of 4e-3 HU in a 400 HU window is 100 dB).
PSNR_CAP_DB = 100.0
#: SSIM constants and Gaussian window of Wang et al. 2004 (IEEE TIP 13(4)): K1 0.01, K2 0.03,
#: σ 1.5 pixels, truncated at 3.5 σ (an 11-pixel window, as scikit-image's gaussian_weights).
SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_TRUNCATE = 0.01, 0.03, 1.5, 3.5


def _clipped(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float64), float(window[0]), float(window[1]))


def _check(prediction: np.ndarray, reference: np.ndarray, window: Sequence[float]) -> None:
    if np.shape(prediction) != np.shape(reference):
        raise ValueError(f"prediction of shape {np.shape(prediction)}, reference {np.shape(reference)}")
    if not float(window[1]) > float(window[0]):
        raise ValueError(f"window {tuple(window)} must be [low, high] with low < high")


def rmse(prediction: np.ndarray, reference: np.ndarray, window: Sequence[float] = AAPM_WINDOW) -> float:
    """Root-mean-square error of the two images clipped to ``window`` (in the images' units).

    Raises:
        ValueError: the shapes differ or the window is empty.
    """
    _check(prediction, reference, window)
    difference = _clipped(prediction, window) - _clipped(reference, window)
    return float(np.sqrt(np.mean(difference * difference)))


def psnr_from_mse(mse: float, window: Sequence[float]) -> float:
    """``10 log10(range² / MSE)`` with the window's width as the range, capped at :data:`PSNR_CAP_DB`."""
    width = float(window[1]) - float(window[0])
    if not mse > 0:
        return PSNR_CAP_DB
    return float(min(10.0 * math.log10(width * width / mse), PSNR_CAP_DB))


def psnr(prediction: np.ndarray, reference: np.ndarray, window: Sequence[float] = AAPM_WINDOW) -> float:
    """Peak signal-to-noise ratio in dB of the two images clipped to ``window``, the window's width
    as the peak (the AAPM challenge's convention).

    Raises:
        ValueError: the shapes differ or the window is empty.
    """
    return psnr_from_mse(rmse(prediction, reference, window) ** 2, window)


def ssim(prediction: np.ndarray, reference: np.ndarray, window: Sequence[float] = AAPM_WINDOW) -> float:
    """Mean structural similarity of the two images clipped to ``window`` (Wang et al. 2004).

    Computed slice by slice along axis 0 (the in-plane Gaussian window of σ 1.5 pixels never
    mixes slices, whose spacing is often several times the in-plane one) and averaged over every
    pixel of every slice; the window's width is the dynamic range ``L``.

    Args:
        prediction, reference: ``(Z, Y, X)`` (or ``(Y, X)``) images in the same units.
        window: the intensity window.

    Returns:
        The mean SSIM, 1 for identical images.

    Raises:
        ValueError: the shapes differ or the window is empty.
    """
    _check(prediction, reference, window)
    x, y = _clipped(prediction, window), _clipped(reference, window)
    if x.ndim == 2:
        x, y = x[None], y[None]
    width = float(window[1]) - float(window[0])
    c1, c2 = (SSIM_K1 * width) ** 2, (SSIM_K2 * width) ** 2
    sigma = (0.0,) * (x.ndim - 2) + (SSIM_SIGMA, SSIM_SIGMA)

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def image_quality(prediction: np.ndarray, reference: np.ndarray,
                  window: Sequence[float] = AAPM_WINDOW) -> dict[str, float | list[float]]:
    """``{"psnr", "ssim", "rmse", "window"}`` of one image pair (see the functions above)."""
    error = rmse(prediction, reference, window)
    return {"psnr": psnr_from_mse(error * error, window), "ssim": ssim(prediction, reference, window),
            "rmse": error, "window": [float(window[0]), float(window[1])]}


__all__ = ["AAPM_WINDOW", "PSNR_CAP_DB", "image_quality", "psnr", "psnr_from_mse", "rmse", "ssim"]
