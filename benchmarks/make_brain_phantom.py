"""A two-channel brain MRI phantom set of a real-sized shape, for the compute-budget benchmark.

Issue 15 reports a 240×240×48 two-channel brain MRI set (FLAIR + IR, 8 tissue classes, 3 mm
slices) on which the ``cpu`` plan reached 4 epochs in 6 minutes. No labelled multi-channel brain
MRI of that size is in ``../shared/data`` and this machine reaches no download site, so this
script draws one: a procedural head (scalp, skull, outer CSF, cortex with random thickness, white
matter, ventricles, basal ganglia, cerebellum, brainstem, white-matter lesions) deformed by a
smooth random field per case, imaged in two contrasts — FLAIR (CSF dark, lesions bright) and a
T1-weighted inversion recovery (white matter bright, CSF dark) — with partial volume over the
3 mm slices, a multiplicative bias field and Rician noise. The shapes and contrasts are those of a
real brain MRI; the anatomy is not a patient's, so Dice here measures convergence, not clinical
accuracy. Deterministic: case ``k`` is drawn from ``numpy.random.default_rng(seed + k)``.

    python benchmarks/make_brain_phantom.py OUT --cases 30 [--seed 0]

writes ``OUT/imagesTr/brain_XXX_0000.nii.gz`` (FLAIR), ``_0001`` (IR), ``OUT/labelsTr`` and
``OUT/dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: Image grid (x, y, z) and spacing in mm: 240×240 in-plane at 0.96 mm, 48 slices of 3 mm.
SHAPE, SPACING = (240, 240, 48), (0.958, 0.958, 3.0)
#: Slices are drawn at 1 mm and averaged over 3 (partial volume of a 3 mm slice).
SUBSLICES = 3
LABELS = {"background": 0, "cortical_gm": 1, "basal_ganglia": 2, "white_matter": 3, "wm_lesions": 4,
          "csf": 5, "ventricles": 6, "cerebellum": 7, "brainstem": 8}
#: Mean intensity per tissue in each contrast (arbitrary units, as scanners write them).
#: Keys: the labels above, plus scalp and skull in the background.
FLAIR = {"bg": 0, "scalp": 420, "skull": 40, 1: 520, 2: 480, 3: 400, 4: 900, 5: 90, 6: 60, 7: 500, 8: 430}
IR = {"bg": 0, "scalp": 600, "skull": 60, 1: 380, 2: 450, 3: 700, 4: 300, 5: 80, 6: 50, 7: 420, 8: 600}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth random field: normal noise on a coarse grid, linearly upsampled to ``shape``."""
    noise = rng.standard_normal(coarse).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse)]
    field = ndimage.zoom(noise, zoom, order=1, mode="nearest")[tuple(slice(0, s) for s in shape)]
    return amplitude * field


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    """Normalised radius of each point in an axis-aligned ellipsoid (≤ 1 inside)."""
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)


def draw_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: FLAIR, IR (float32) and labels (uint8), arrays in (z, y, x) order."""
    nz = SHAPE[2] * SUBSLICES
    fine = (nz, SHAPE[1], SHAPE[0])
    zz, yy, xx = np.meshgrid(
        (np.arange(nz) - nz / 2 + 0.5) * SPACING[2] / SUBSLICES,
        (np.arange(SHAPE[1]) - SHAPE[1] / 2 + 0.5) * SPACING[1],
        (np.arange(SHAPE[0]) - SHAPE[0] / 2 + 0.5) * SPACING[0], indexing="ij", sparse=True)
    # Pose and size of this head, then a smooth deformation (about 3 mm).
    scale = rng.uniform(0.88, 1.08, 3)
    angle = rng.uniform(-0.12, 0.12)
    shift = rng.uniform(-6, 6, 3)
    c, s = np.cos(angle), np.sin(angle)
    x = ((c * xx - s * yy - shift[0]) / scale[0]).astype(np.float32)
    y = ((s * xx + c * yy - shift[1]) / scale[1]).astype(np.float32)
    z = np.broadcast_to((zz - shift[2]) / scale[2], fine).astype(np.float32)
    x, y = np.broadcast_to(x, fine).copy(), np.broadcast_to(y, fine).copy()
    for axis in (x, y, z):
        axis += _smooth_field(rng, fine, (6, 8, 8), 3.0)

    brain = _ellipsoid(x, y, z, (0, 5, 10), (68, 86, 62))
    head = _ellipsoid(x, y, z, (0, 5, 8), (80, 98, 76))
    labels = np.zeros(fine, np.uint8)
    tissue_bg = np.zeros(fine, np.uint8)  # 0 air, 1 scalp, 2 skull
    tissue_bg[head <= 1.0] = 1
    tissue_bg[(head <= 0.93) & (brain > 1.0)] = 2
    cortex_depth = 0.86 + _smooth_field(rng, fine, (10, 14, 14), 0.03)  # folding: varying thickness
    labels[brain <= 1.0] = LABELS["csf"]
    labels[brain <= 0.95] = LABELS["cortical_gm"]
    labels[brain <= cortex_depth] = LABELS["white_matter"]
    for side in (-1, 1):
        bg = _ellipsoid(x, y, z, (side * rng.uniform(18, 24), rng.uniform(8, 14), rng.uniform(0, 8)), (8, 14, 12))
        labels[bg <= 1.0] = LABELS["basal_ganglia"]
        vent = _ellipsoid(x, y, z, (side * rng.uniform(5, 8), rng.uniform(4, 10), rng.uniform(10, 16)),
                          (rng.uniform(3.5, 6), rng.uniform(20, 26), rng.uniform(12, 16)))
        labels[vent <= 1.0] = LABELS["ventricles"]
    for _ in range(rng.integers(0, 7)):  # white-matter lesions near the ventricles
        centre = (rng.uniform(-30, 30), rng.uniform(-25, 35), rng.uniform(10, 40))
        blob = _ellipsoid(x, y, z, centre, tuple(rng.uniform(2.5, 7, 3)))
        labels[(blob <= 1.0) & (labels == LABELS["white_matter"])] = LABELS["wm_lesions"]
    cerebellum = _ellipsoid(x, y, z, (0, -48, -38), (46, 26, 20))
    labels[(cerebellum <= 1.0) & (brain <= 1.05)] = LABELS["cerebellum"]
    stem = _ellipsoid(x, y, z, (0, -14, -40), (10, 12, 34))
    labels[(stem <= 1.0) & (head <= 0.93)] = LABELS["brainstem"]
    tissue_bg[labels > 0] = 0

    def contrast(table: dict) -> np.ndarray:
        values = np.zeros(16, np.float32)
        for key, value in table.items():
            if isinstance(key, int):
                values[key] = value
        image = values[labels]
        image[tissue_bg == 1] = table["scalp"]
        image[tissue_bg == 2] = table["skull"]
        image *= 1.0 + _smooth_field(rng, fine, (4, 5, 5), 0.03)  # tissue texture
        return image

    flair, ir = contrast(FLAIR), contrast(IR)
    bias = np.exp(_smooth_field(rng, fine, (3, 4, 4), 0.12))
    out = []
    for image, gain in ((flair, rng.uniform(0.8, 1.25)), (ir, rng.uniform(0.8, 1.25))):
        image = ndimage.gaussian_filter(image * bias * gain, (0.0, 0.6, 0.6))
        thick = image.reshape(SHAPE[2], SUBSLICES, SHAPE[1], SHAPE[0]).mean(axis=1)
        sigma = 18.0 * gain
        noisy = np.hypot(thick + rng.normal(0, sigma, thick.shape), rng.normal(0, sigma, thick.shape))
        out.append(noisy.astype(np.float32))
    # The label of a 3 mm slice: its middle 1 mm sub-slice (what a rater drawing on it would mark).
    thick_labels = labels[SUBSLICES // 2::SUBSLICES]
    return out[0], out[1], np.ascontiguousarray(thick_labels)


def write_case(out: Path, name: str, flair: np.ndarray, ir: np.ndarray, labels: np.ndarray) -> None:
    for array, path in ((flair, out / "imagesTr" / f"{name}_0000.nii.gz"), (ir, out / "imagesTr" / f"{name}_0001.nii.gz"),
                        (labels, out / "labelsTr" / f"{name}.nii.gz")):
        image = sitk.GetImageFromArray(np.round(array).astype(np.int16) if array.dtype != np.uint8 else array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-SHAPE[0] * SPACING[0] / 2, -SHAPE[1] * SPACING[1] / 2, -SHAPE[2] * SPACING[2] / 2))
        sitk.WriteImage(image, str(path), useCompression=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for folder in ("imagesTr", "labelsTr"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k in range(args.cases):
        name = f"brain_{k:03d}"
        write_case(args.out, name, *draw_case(np.random.default_rng(args.seed + k)))
        print(f"{name} ({time.perf_counter() - start:.0f} s)", flush=True)
    (args.out / "dataset.json").write_text(json.dumps({
        "name": "BrainPhantom2ch", "description": "procedural two-channel brain MRI phantom (benchmarks/make_brain_phantom.py)",
        "channel_names": {"0": "FLAIR", "1": "IR"}, "labels": LABELS, "numTraining": args.cases,
        "file_ending": ".nii.gz"}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
