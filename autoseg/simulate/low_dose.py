"""Low-dose CT from a routine-dose CT volume: projection-domain noise, added to the image.

The model, per axial slice (a parallel-beam approximation of a fan-beam scanner; docs/restoration.md):

1. **HU → attenuation.** ``μ = μ_water (1 + HU / 1000)``, clipped at 0 (air), times the pixel size:
   attenuation per pixel, so that line integrals are dimensionless. Padding (values below
   :data:`PADDING_BELOW_HU`, e.g. GE's -3024 outside the scan circle) is projected as air.
2. **Project** (:func:`autoseg.simulate.projector.forward_project`): line integrals ``p`` over
   ``V`` views and one-pixel bins; the expected full-dose counts per ray are ``N = I0 e^-p``.
3. **Add only the missing noise** (after Zeng et al., "A simple low-dose X-ray CT simulation from
   high-dose scan", IEEE TNS 62(5), 2015): the image already holds the noise of the full-dose
   scan, whose counts have variance ``N + σe²`` (Poisson plus electronic noise). A scan at dose
   fraction ``a`` has counts of mean ``a N`` and variance ``a N + σe²``. Scaling the full-dose
   counts by ``a`` leaves variance ``a² (N + σe²)``, so independent Gaussian noise of variance
   ``a (1 - a) N + (1 - a²) σe²`` is added to ``a N``; the counts are clamped at
   :data:`MIN_COUNTS` (photon starvation) and logged. The noise sinogram is the low-dose line
   integral minus the full-dose one, ``ln(a N / counts)``, less the log's expected bias (half the
   relative variance): zero-mean, and zero for every ray at ``a = 1``.
4. **Reconstruct only the noise** by filtered back-projection and add it to the original image
   (in HU). The original keeps its resolution and texture; re-reconstructing the whole image
   instead would add this projector's own blur and streaks to every pair. The default filter is
   the ramp times a Hann window, not the bare ramp: clinical kernels roll off towards the Nyquist
   frequency, and with the bare ramp the noise added at dose 0.5 measured 1.5-2.2x the whole ROI
   standard deviation of the originals (docs/restoration.md), where a consistent model adds as
   much as the quantum noise already there (halving the dose doubles its variance).
5. **Restore** the padding voxels as they were; clip below at the input's own minimum (scanners
   store CT numbers from -1024 HU up; LIDC's are clamped at -1000) so that noisy air never looks
   like padding; round and clip to the input's dtype.

Everything here is pure (arrays in, arrays out); :mod:`autoseg.simulate.run` reads and writes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.simulate.projector import (
    FILTERS,
    angles,
    back_project,
    detector_bins,
    forward_project,
    ramp_filter,
)

#: Linear attenuation of water, per mm, at ~70 keV: the effective energy of a 120 kVp CT beam.
#: NIST's X-ray mass attenuation table (Hubbell & Seltzer, NISTIR 5632) gives 0.2059 cm²/g at
#: 60 keV and 0.1837 at 80 keV; 0.192 cm²/g × 1 g/cm³ is the usual figure in between.
MU_WATER_PER_MM = 0.0192
#: Voxels below this are padding, not tissue: -1024 HU is the lowest CT number scanners store
#: (12-bit range -1024..3071); GE pads outside the scan circle with -3024, others with -2048.
PADDING_BELOW_HU = -1024.0
#: Incident photons per ray at full dose for a 1 mm × 1 mm ray and :data:`REFERENCE_VIEWS` views.
#: 1e5 is the usual full-dose blank-scan flux of sinogram-domain low-dose simulations (e.g.
#: RED-CNN, Chen et al., IEEE TMI 36(12), 2017), and the order of magnitude of a 120 kVp,
#: ~200 mAs scan: ~1e6 photons per mm² per mAs at the isocentre, 0.2 mAs per view.
DEFAULT_PHOTONS = 1e5
#: Views of the scan that :data:`DEFAULT_PHOTONS` refers to (a clinical scanner takes ~1000 per
#: rotation: GE LightSpeed 984, Siemens 1152).
REFERENCE_VIEWS = 1000
#: Standard deviation of the detector's electronic noise, in photon counts: a variance of 10, the
#: order used in sinogram-domain low-dose simulations (not checked against a primary source here;
#: it matters only on rays of tens of counts). docs/restoration.md says more.
DEFAULT_ELECTRONIC_NOISE = math.sqrt(10.0)
#: The smallest count a ray keeps before the log (photon starvation: a detector reports about
#: one photon at least after its offset correction); lower counts would make the log undefined.
MIN_COUNTS = 1.0
#: Largest log-bias correction of a ray: the bias Var(x) / 2 at a relative noise of ~45 %, beyond
#: which the delta method no longer holds (a few counts per ray; the clamp then sets the value).
MAX_LOG_BIAS = 0.1
#: Slices projected together: they share the sampling grid (projector.VIEWS_PER_CALL says why 8).
SLICES_PER_BATCH = 8
#: A CT in HU has air (-1000 HU) around the patient or in the lungs; a volume without a voxel
#: below this holds no air and is not in HU (raw stored values, MR, a normalised image).
AIR_BELOW_HU = -500.0
#: In-plane pixels must be square to this relative tolerance: the projector samples in pixels.
SQUARE_PIXEL_TOLERANCE = 0.01

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class LowDose:
    """How to simulate a low-dose scan.

    Attributes:
        dose: fraction of the full dose, in (0, 1]; 0.25 is the AAPM challenge's quarter dose.
        photons: incident photons per ray at full dose, for a 1 mm² ray and
            :data:`REFERENCE_VIEWS` views (scaled to the image's pixel size, slice spacing and
            ``views``, :func:`photons_per_ray`).
        electronic_noise: standard deviation of the electronic noise, in counts.
        views: views per half rotation; None: :func:`default_views` of the image width.
        filter: the reconstruction filter of the noise (:data:`autoseg.simulate.projector.FILTERS`).
    """

    dose: float
    photons: float = DEFAULT_PHOTONS
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE
    views: int | None = None
    filter: str = "hann"

    def __post_init__(self) -> None:
        if not 0 < self.dose <= 1:
            raise ConfigError(f"--dose {self.dose:g}: the dose is a fraction of the full dose, in (0, 1] "
                              "(0.25 is a quarter dose)")
        if not self.photons > 0:
            raise ConfigError(f"--photons {self.photons:g}: must be positive (1e5 photons per ray is usual)")
        if not self.electronic_noise >= 0:
            raise ConfigError(f"--electronic-noise {self.electronic_noise:g}: must be 0 or more (counts)")
        if self.views is not None and self.views < 16:
            raise ConfigError(f"--views {self.views}: too few views for a CT scan; use at least 16 "
                              "(default: pi/2 x the image width)")
        if self.filter not in FILTERS:
            raise ConfigError(f"--filter {self.filter!r}: unknown filter; expected one of {', '.join(FILTERS)}")


def default_views(width: int) -> int:
    """Views of a half rotation that sample the image's finest detail around its edge.

    Angular sampling needs ``V ≥ (π / 2) · width`` views for one-pixel bins over a ``width``-pixel
    field of view (Kak & Slaney 1988, ch. 5.1.1): 805 for 512 pixels. Fewer views give the noise a
    streaky texture towards the edge of the field; its variance is kept by :func:`photons_per_ray`.
    """
    return math.ceil(math.pi / 2 * width)


def photons_per_ray(photons: float, pixel_mm: float, slice_mm: float, views: int) -> float:
    """Incident full-dose photons on one simulated ray: ``photons`` scaled to its size and view count.

    A ray of the simulation is one pixel wide and one slice thick, and the scan's photons are
    shared out over ``views``; the image noise variance goes as 1 / (photons per ray × views), so
    this keeps the noise of the reference scan whatever the sampling.

    Args:
        photons: photons per 1 mm² ray of a :data:`REFERENCE_VIEWS`-view scan.
        pixel_mm: in-plane pixel size (the bin width).
        slice_mm: slice thickness (the slice spacing: NIfTI stores no thickness).
        views: views of the simulation.
    """
    return photons * pixel_mm * slice_mm * REFERENCE_VIEWS / views


def case_seed(seed: int, case_id: str) -> int:
    """A case's own seed, from the run's seed and the case id: the same whatever other cases run.

    Returns:
        A 63-bit integer: the first 8 bytes of ``sha256("{seed}:{case_id}")``.
    """
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_ct(volume: np.ndarray, where: str) -> None:
    """Raise unless ``volume`` looks like a CT in Hounsfield units.

    Args:
        volume: ``(Z, Y, X)`` CT numbers.
        where: the file named in the error.

    Raises:
        DatasetError: every voxel is padding, or no voxel is air (below :data:`AIR_BELOW_HU`).
    """
    tissue = volume[volume >= PADDING_BELOW_HU]
    if tissue.size == 0:
        raise DatasetError(f"{where}: every voxel is below {PADDING_BELOW_HU:g} HU (padding); the image is empty")
    low = float(tissue.min())
    if low > AIR_BELOW_HU:
        raise DatasetError(f"{where}: values do not look like Hounsfield units (lowest {low:g}, but air is "
                           f"-1000 HU and a CT holds air); give CT images in HU (DICOM rescale applied)")


def check_pixels(spacing: tuple[float, float, float], where: str) -> None:
    """Raise unless the in-plane pixels of ``spacing`` (``(z, y, x)`` mm) are square.

    Raises:
        DatasetError: the pixel sides differ by more than :data:`SQUARE_PIXEL_TOLERANCE`.
    """
    row_mm, col_mm = float(spacing[1]), float(spacing[2])
    if abs(row_mm - col_mm) > SQUARE_PIXEL_TOLERANCE * max(row_mm, col_mm):
        raise DatasetError(f"{where}: pixels are {row_mm:g} x {col_mm:g} mm, not square; the projector needs square "
                           "pixels: resample the image in-plane first")


def noise_sinogram(line_integrals: np.ndarray, dose: float, photons: float, electronic_noise: float,
                   rng: np.random.Generator) -> np.ndarray:
    """The low-dose minus full-dose line integrals of one slice's rays (module docstring, step 3).

    Args:
        line_integrals: ``(V, B)`` full-dose line integrals ``p`` (dimensionless).
        dose: fraction of the full dose, in (0, 1].
        photons: incident full-dose photons per ray (:func:`photons_per_ray`).
        electronic_noise: standard deviation of the electronic noise, in counts.
        rng: the case's generator; draws ``V × B`` standard normals.

    Returns:
        ``(V, B)`` float32 ``ln(a N / counts)`` less its expected bias; exactly 0 at dose 1.
    """
    counts = photons * np.exp(-line_integrals.astype(np.float64))
    variance = dose * (1 - dose) * counts + (1 - dose ** 2) * electronic_noise ** 2
    mean = dose * counts
    noisy = mean + np.sqrt(variance) * rng.standard_normal(line_integrals.shape)
    # The clamp never exceeds the mean, so a ray without added noise stays exactly unchanged.
    logged = np.log(mean / np.maximum(noisy, np.minimum(MIN_COUNTS, mean)))
    # The log of noisy counts is biased: E[-ln(1 + x)] ≈ Var(x) / 2 for x = noise / mean (delta
    # method), which would brighten the image's centre at low dose (+4 HU at dose 0.1 in the
    # water-cylinder test). Scanners correct low-signal data; a denoiser should not learn a shift.
    # Capped where the approximation fails (starved rays, where the clamp decides the value).
    return (logged - np.minimum(variance / (2 * mean ** 2), MAX_LOG_BIAS)).astype(np.float32)


def simulate_low_dose(volume: np.ndarray, spacing: tuple[float, float, float], settings: LowDose,
                      rng: np.random.Generator, progress: ProgressFn | None = None) -> np.ndarray:
    """A low-dose version of a full-dose CT volume (module docstring).

    Args:
        volume: ``(Z, Y, X)`` CT numbers in HU, any integer or float dtype.
        spacing: voxel size in mm, ``(z, y, x)``.
        settings: dose, photons, electronic noise, views, filter.
        rng: the case's generator (:func:`case_seed`); slices draw from it in order.
        progress: called with the number of slices done after each batch.

    Returns:
        ``(Z, Y, X)`` in ``volume``'s dtype: padding voxels unchanged, the rest with the added noise,
        clipped below at the input's lowest non-padding value, rounded for integer dtypes.

    Raises:
        DatasetError: not a CT in HU (:func:`check_ct`), or non-square pixels.
    """
    check_pixels(spacing, "image")
    check_ct(volume, "image")
    slice_mm, col_mm = float(spacing[0]), float(spacing[2])
    depth, height, width = volume.shape
    hu = volume.astype(np.float32)
    padding = hu < PADDING_BELOW_HU
    floor = float(hu[~padding].min())
    attenuation = np.clip(MU_WATER_PER_MM * (1 + hu / 1000), 0, None) * col_mm
    attenuation[padding] = 0
    views = settings.views or default_views(max(height, width))
    theta = angles(views)
    ray_photons = photons_per_ray(settings.photons, col_mm, slice_mm, views)
    # Project only as wide as the attenuating content reaches; noise covers every ray of the image.
    bins_object = detector_bins(attenuation > 0)
    bins = detector_bins(np.ones((height, width), dtype=bool))
    offset = (bins - bins_object) // 2  # both odd: the bin grids line up
    to_hu = 1000 / (MU_WATER_PER_MM * col_mm)
    out = np.empty_like(hu)
    for start in range(0, depth, SLICES_PER_BATCH):
        batch = slice(start, min(start + SLICES_PER_BATCH, depth))
        projected = forward_project(attenuation[batch], theta, bins_object)
        noise = np.zeros((projected.shape[0], views, bins), dtype=np.float32)
        for i, sinogram in enumerate(projected):
            full = np.zeros((views, bins), dtype=np.float32)
            full[:, offset:offset + bins_object] = sinogram
            noise[i] = noise_sinogram(full, settings.dose, ray_photons, settings.electronic_noise, rng)
        filtered = ramp_filter(noise, settings.filter)  # type: ignore[arg-type]
        added = back_project(filtered, theta, (height, width)) * to_hu
        out[batch] = hu[batch] + added
        if progress is not None:
            progress(batch.stop)
    np.maximum(out, floor, out=out)
    out[padding] = hu[padding]
    return to_dtype(out, volume.dtype)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype``: rounded and clipped to its range for integers, cast for floats."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
