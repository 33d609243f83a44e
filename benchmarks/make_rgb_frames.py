"""Synthetic endoscopy-sized RGB frames for the compute model's large-2D check (issue 15).

    python benchmarks/make_rgb_frames.py OUT [--cases 40]

writes ``OUT/imagesTr/frame_XXX_0000.png`` (530 × 621 RGB, uint8: a smooth coloured background, one
elliptic "polyp" of another tint, Gaussian noise), ``OUT/labelsTr/frame_XXX.png`` (0/1) and
``OUT/dataset.json`` (channels R, G, B). Only the shape and channels matter for the timings; the
images are not meant to be realistic. Deterministic: frame ``k`` uses ``default_rng(k)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HEIGHT, WIDTH = 530, 621


def draw_frame(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``k``: an (H, W, 3) uint8 image and its (H, W) uint8 mask."""
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    cy, cx = rng.uniform(150, 380), rng.uniform(150, 470)
    ry, rx = rng.uniform(40, 120), rng.uniform(40, 120)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    base = np.stack([180 + 40 * np.sin(xx / 37 + k), 90 + 30 * np.cos(yy / 29), 80 + 20 * np.sin((xx + yy) / 50)], -1)
    base[mask] += np.array([40, -30, -20])
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=40)
    args = parser.parse_args()
    for folder in ("imagesTr", "labelsTr"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    for k in range(args.cases):
        image, mask = draw_frame(k)
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(args.out / "imagesTr" / f"frame_{k:03d}_0000.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(args.out / "labelsTr" / f"frame_{k:03d}.png"))
    (args.out / "dataset.json").write_text(json.dumps({
        "name": "RGBFrames", "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "polyp": 1}, "numTraining": args.cases, "file_ending": ".png"}, indent=2) + "\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
