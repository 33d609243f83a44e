"""Time the low-dose simulator's projector and measure the noise it adds to real CT; prints JSON.

    python benchmarks/bench_simulate.py projector   # a 512x512 slice: scikit-image radon+iradon vs autoseg's
    python benchmarks/bench_simulate.py noise       # ROI noise at dose 0.5 / 0.25 / 0.1 (docs/restoration.md)
    python benchmarks/bench_simulate.py volume      # whole volumes at dose 0.25, wall time per volume

Data: ``../shared/data/CT_full_dose`` (LIDC-IDRI-0314, CRLM-CT-1006). The noise part simulates
only the slices of each region of interest: every slice is simulated on its own, so the other
slices of the volume would change nothing but the random stream. scikit-image is needed for the
projector comparison only (it is not a dependency of autoseg).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from autoseg.imageio import read_image
from autoseg.simulate import projector
from autoseg.simulate.low_dose import LowDose, default_views, simulate_low_dose

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "CT_full_dose"
#: Uniform soft tissue, (slices, rows, columns) as array indices: the liver of CRLM-CT-1006
#: (35x35 pixels = 28 mm) and the heart of LIDC-IDRI-0314 (40x40 pixels = 31 mm).
ROIS = {
    "CRLM-CT-1006.nii.gz": (slice(25, 31), slice(180, 215), slice(105, 140)),
    "LIDC-IDRI-0314.nii.gz": (slice(36, 45), slice(235, 275), slice(255, 295)),
}


def bench_projector(repeats: int) -> dict:
    """Seconds per 512x512 slice: forward projection and FBP, scikit-image (one slice) vs autoseg (8 at once)."""
    volume, _ = read_image(DATA / "LIDC-IDRI-0314.nii.gz")
    slices = volume[0, 70:78].astype(np.float32)
    mu = np.clip(0.0192 * (1 + slices / 1000), 0, None) * 0.78125
    views = default_views(512)
    theta = projector.angles(views)
    result: dict = {"views": views, "slices_per_batch_autoseg": len(mu)}
    try:
        from skimage.transform import iradon, radon

        degrees = np.degrees(theta)
        disc = np.where(np.hypot(*np.mgrid[-255.5:256, -255.5:256]) < 256, mu[0], 0)  # radon(circle=True)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sinogram = radon(disc, degrees, circle=True)
            middle = time.perf_counter()
            iradon(sinogram, degrees, circle=True, filter_name="ramp")
            times.append((middle - start, time.perf_counter() - middle))
        result["skimage_s_per_slice"] = {"radon": min(t[0] for t in times), "iradon": min(t[1] for t in times)}
    except ImportError:
        result["skimage_s_per_slice"] = "scikit-image not installed"
    bins = projector.detector_bins(np.ones((512, 512), dtype=bool))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sinograms = projector.forward_project(mu, theta, bins)
        middle = time.perf_counter()
        projector.fbp(sinograms, theta, (512, 512), "ramp")
        times.append((middle - start, time.perf_counter() - middle))
    result["autoseg_s_per_slice"] = {"forward": min(t[0] for t in times) / len(mu),
                                     "fbp": min(t[1] for t in times) / len(mu), "bins": bins}
    return result


def bench_noise(doses: list[float], filters: list[str], seed: int) -> dict:
    """Per case and dose: the ROI's standard deviation (mean over its slices) before, after, and of the difference."""
    out: dict = {}
    for name, roi in ROIS.items():
        volume, geometry = read_image(DATA / name)
        original = volume[0, roi[0]]
        region = (slice(None), *roi[1:])
        rows: dict = {"roi": [[s.start, s.stop] for s in roi], "original_std": _std(original[region])}
        for filter_name in filters:
            for dose in doses:
                start = time.perf_counter()
                low = simulate_low_dose(original, geometry.spacing, LowDose(dose, filter=filter_name),
                                        np.random.default_rng(seed))
                seconds = time.perf_counter() - start
                added = low[region].astype(np.float64) - original[region]
                rows[f"{filter_name} {dose:g}"] = {"low_std": _std(low[region]), "added_std": _std(added),
                                                   "added_mean": round(float(added.mean()), 2),
                                                   "s_per_slice": round(seconds / len(original), 2)}
        out[name] = rows
    return out


def _std(values: np.ndarray) -> float:
    return round(float(values.astype(np.float64).std(axis=(1, 2)).mean()), 1)


def bench_volume(dose: float, seed: int) -> dict:
    out = {}
    for name in ROIS:
        volume, geometry = read_image(DATA / name)
        start = time.perf_counter()
        simulate_low_dose(volume[0], geometry.spacing, LowDose(dose), np.random.default_rng(seed))
        seconds = time.perf_counter() - start
        out[name] = {"shape": list(volume.shape[1:]), "seconds": round(seconds, 1),
                     "s_per_slice": round(seconds / volume.shape[1], 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("projector", "noise", "volume"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--doses", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--filters", nargs="+", default=["hann"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    if args.part == "projector":
        result = bench_projector(args.repeats)
    elif args.part == "noise":
        result = bench_noise(args.doses, args.filters, args.seed)
    else:
        result = bench_volume(args.doses[1] if len(args.doses) > 1 else args.doses[0], args.seed)
    result["torch_threads"] = torch.get_num_threads()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
