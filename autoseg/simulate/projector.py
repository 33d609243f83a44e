"""A parallel-beam projector and filtered back-projection, batched over slices (torch on the CPU).

Geometry (every length in pixels): the rotation axis is the centre of the ``(H, W)`` slice, at
``((H - 1) / 2, (W - 1) / 2)``; view ``i`` of ``V`` looks along angle ``θ_i = i π / V`` (a half
rotation, all a parallel beam needs); detector bin ``j`` of ``B`` measures the line
``x cos θ + y sin θ = t_j`` with ``t_j = j - (B - 1) / 2`` (``x`` along columns, ``y`` along rows,
both from the centre). Bins are one pixel wide.

* :func:`forward_project` samples each line once per pixel length, bilinearly (the rotate-and-sum
  Radon transform of scikit-image's ``radon``), zero outside the slice.
* :func:`ramp_filter` applies the band-limited ramp of Kak & Slaney (*Principles of Computerized
  Tomographic Imaging*, 1988, ch. 3 eq. 61: built from the spatially sampled kernel, which avoids
  the DC bias of a sampled ``|f|``), optionally apodised; ``skimage.transform.iradon`` uses the same.
* :func:`back_project` interpolates each filtered view linearly at ``t = x cos θ + y sin θ`` and sums
  over views times ``π / V``, so that ``back_project(ramp_filter(forward_project(f)))`` ≈ ``f``.

Why not scikit-image's ``radon``/``iradon``: they do the same arithmetic one slice at a time in
float64; batching slices as the channels of ``torch.nn.functional.grid_sample`` shares the sampling
grid between slices and uses the CPU's vector units and threads. Measured in docs/restoration.md
(a 512×512 slice, 805 views).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

FilterName = Literal["ramp", "shepp-logan", "cosine", "hamming", "hann"]
#: The reconstruction filters (the ramp times a window), as scikit-image's ``iradon`` names them.
FILTERS: tuple[str, ...] = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

#: Views projected per ``grid_sample`` call. With 8 slices per batch (the simulators' chunk) this
#: measured fastest on the 2-core development machine: a larger batch of views or slices
#: outgrows the 4 MB L2 cache per core and ran 2-3x slower per slice.
VIEWS_PER_CALL = 4


def angles(views: int) -> np.ndarray:
    """The view angles ``i π / views`` (radians), ``i = 0 .. views - 1``: a half rotation.

    Raises:
        ValueError: ``views`` < 1.
    """
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    return np.arange(views, dtype=np.float64) * (math.pi / views)


def detector_bins(support: np.ndarray) -> int:
    """How many one-pixel detector bins cover every True pixel of ``support`` from the slice centre.

    Args:
        support: ``(H, W)`` or ``(Z, H, W)`` boolean mask of the pixels that attenuate.

    Returns:
        ``2 * ceil(r) + 3`` bins for the largest centre distance ``r`` of a True pixel (one spare
        bin each side for the bilinear footprint), at least 3.
    """
    plane = support.any(axis=0) if support.ndim == 3 else support
    height, width = plane.shape
    rows, cols = np.nonzero(plane)
    if rows.size == 0:
        return 3
    radius = float(np.sqrt(((rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2).max()))
    return 2 * math.ceil(radius) + 3


def forward_project(slices: np.ndarray, theta: np.ndarray, bins: int) -> np.ndarray:
    """Parallel-beam line integrals of every slice (the Radon transform).

    Args:
        slices: ``(Z, H, W)`` float32 values per pixel (attenuation × pixel size for CT).
        theta: view angles in radians (:func:`angles`).
        bins: detector bins per view (:func:`detector_bins`).

    Returns:
        ``(Z, V, bins)`` float32 sinograms: the sum of bilinear samples one pixel apart along each
        line, i.e. the line integral in units of value × pixel.
    """
    import torch
    import torch.nn.functional as F

    depth, height, width = slices.shape
    image = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[None]
    offsets = torch.arange(bins, dtype=torch.float32) - (bins - 1) / 2
    t, s = torch.meshgrid(offsets, offsets, indexing="ij")  # detector position, position along the line
    out = torch.empty((depth, len(theta), bins), dtype=torch.float32)
    for start in range(0, len(theta), VIEWS_PER_CALL):
        chunk = torch.from_numpy(theta[start:start + VIEWS_PER_CALL]).float()
        cos, sin = chunk.cos()[:, None, None], chunk.sin()[:, None, None]
        # grid_sample's normalised coordinates (align_corners=False): pixel offset u -> 2u / size.
        grid = torch.stack(((t * cos - s * sin) * (2 / width), (t * sin + s * cos) * (2 / height)), dim=-1)
        samples = F.grid_sample(image.expand(len(chunk), -1, -1, -1), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        out[:, start:start + len(chunk)] = samples.sum(dim=-1).permute(1, 0, 2)
    return out.numpy()


def ramp_filter(sinograms: np.ndarray, name: FilterName = "ramp") -> np.ndarray:
    """Filter every view with the ramp (times a window) along the detector axis.

    Args:
        sinograms: ``(..., bins)`` float32.
        name: one of :data:`FILTERS`.

    Returns:
        The filtered sinograms, same shape, float32.

    Raises:
        ValueError: an unknown filter name.
    """
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; expected one of {', '.join(FILTERS)}")
    bins = sinograms.shape[-1]
    # Zero-padded to at least twice the detector (a power of two) so the convolution is not circular.
    size = max(64, 2 ** math.ceil(math.log2(2 * bins)))
    response = _filter_response(size, name)
    spectrum = np.fft.rfft(sinograms, n=size, axis=-1) * response
    return np.fft.irfft(spectrum, n=size, axis=-1)[..., :bins].astype(np.float32)


def _filter_response(size: int, name: str) -> np.ndarray:
    """The real frequency response (``rfft`` bins) of the ramp times its window, for unit bin spacing."""
    n = np.concatenate((np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)))
    kernel = np.zeros(size)
    kernel[0] = 0.25
    kernel[1::2] = -1 / (np.pi * n) ** 2  # Kak & Slaney eq. 61: h(0) = 1/4, h(odd k) = -1/(π k)², h(even) = 0
    response = np.real(np.fft.rfft(kernel))
    frequency = np.fft.rfftfreq(size)  # cycles per bin, 0 .. 0.5
    if name == "shepp-logan":
        response = response * np.sinc(frequency)
    elif name == "cosine":
        response = response * np.cos(np.pi * frequency)
    elif name == "hamming":
        response = response * (0.54 + 0.46 * np.cos(2 * np.pi * frequency))
    elif name == "hann":
        response = response * (0.5 + 0.5 * np.cos(2 * np.pi * frequency))
    return response


def back_project(filtered: np.ndarray, theta: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum every filtered view back over the slice: the last step of filtered back-projection.

    Args:
        filtered: ``(Z, V, bins)`` float32 ramp-filtered sinograms (:func:`ramp_filter`).
        theta: the view angles of the sinograms.
        shape: ``(H, W)`` of the slices to reconstruct.

    Returns:
        ``(Z, H, W)`` float32 images, in the sinogram's value units per pixel. Pixels farther from
        the centre than the detector reaches get 0.
    """
    import torch
    import torch.nn.functional as F

    depth, views, bins = filtered.shape
    height, width = shape
    rows = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    x, y = x.reshape(1, -1), y.reshape(1, -1)
    data = torch.from_numpy(np.ascontiguousarray(filtered, dtype=np.float32))
    out = torch.zeros((depth, height * width), dtype=torch.float32)
    for start in range(0, views, VIEWS_PER_CALL):
        chunk = torch.from_numpy(theta[start:start + VIEWS_PER_CALL]).float()
        t = x * chunk.cos()[:, None] + y * chunk.sin()[:, None]  # (k, H*W) detector positions
        grid = torch.stack((t * (2 / bins), torch.zeros_like(t)), dim=-1)[:, None]  # (k, 1, H*W, 2)
        rows_in = data[:, start:start + len(chunk)].permute(1, 0, 2)[:, :, None, :]  # (k, Z, 1, bins)
        out += F.grid_sample(rows_in, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).sum(dim=0)[:, 0]
    return (out * (math.pi / views)).reshape(depth, height, width).numpy()


def fbp(sinograms: np.ndarray, theta: np.ndarray, shape: tuple[int, int], name: FilterName = "ramp") -> np.ndarray:
    """Filtered back-projection: :func:`ramp_filter` then :func:`back_project`.

    Args:
        sinograms: ``(Z, V, bins)`` float32.
        theta: their view angles.
        shape: ``(H, W)`` of the output slices.
        name: the reconstruction filter (:data:`FILTERS`).

    Returns:
        ``(Z, H, W)`` float32.
    """
    return back_project(ramp_filter(sinograms, name), theta, shape)
