"""Benchmark: the 3D cascade against 3d_fullres alone, on images too big for one patch (issue 16 item 5).

    python benchmarks/bench_cascade.py --out DIR [--iters 1200] [--cases 24] [--test 8]
                                       [--budget-gb 0.1] [--seed 0] [--steps data,plan,train,predict]

The data (synthetic, CT-like, written by :func:`make_raw`): 48x160x160 voxels at 1 mm, a body
(soft tissue, 40 HU, wider than the image so that no left or right outline shows), a spinal cord
on the midline (label 3, 120 HU, inside a 700 HU bone ring that is not labelled) and two glands of
the same look (70 HU, radii 5-8 mm) at mirrored positions 40-48 mm either side of the midline:
label 1 (``gland_left``) on the image's +x side (the patient's left: ITK's physical space is LPS and
the direction is the identity), label 2 (``gland_right``) on its -x side. Body position, gland sizes
and positions vary per case. A gland alone does not say which side it is on: only the context (the
midline) does, and a patch that sees one gland and not the midline cannot tell label 1 from label 2.
The label names make the planner leave the left-right axis (x) out of mirroring
(:mod:`autoseg.planning.mirroring`); with it mirrored no stage could learn the side at all. This
is the situation nnU-Net's cascade is for (large organs and left/right structures in images several
patches wide), made small enough for a 2-core CPU.

Preset: ``cpu`` with ``memory_budget_gb`` set to ``--budget-gb`` (default 0.1) so that the
3d_fullres patch covers under a quarter of the image and the planner plans 3d_lowres and
3d_cascade_fullres by itself. Folds: 3 (``--splits``), so the cascade's fold 0 needs the lowres
stage's cross-validation predictions of folds 1 and 2 (its training cases) and fold 0 (its
validation cases). Every configuration trains ``--iters`` iterations with the same seed; the held-out
test cases are predicted with ``autoseg predict`` (the cascade runs both stages) and scored with
``autoseg evaluate``. Each step is the CLI command, printed; results go to ``DIR/result.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 160, 160)
LABELS = {"background": 0, "gland_left": 1, "gland_right": 2, "cord": 3}
FOLDS = 3
CONFIGS = ("3d_lowres", "3d_fullres", "3d_cascade_fullres")


def make_case(seed: int):
    """(image int16 HU, label uint8) of one synthetic case."""
    import numpy as np

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]].astype(np.float32)
    cy, cx = SHAPE[1] / 2 + rng.uniform(-6, 6), SHAPE[2] / 2 + rng.uniform(-6, 6)
    ay, ax = rng.uniform(48, 56), 400.0  # no left or right body edge in the image
    image = np.full(SHAPE, -1000.0, np.float32)
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1
    image[body] = 40
    label = np.zeros(SHAPE, np.uint8)
    # cord with its bone ring, posterior (+y) on the midline
    ry = cy + ay * 0.55
    r2 = (yy - ry) ** 2 + (xx - cx) ** 2
    image[(r2 < 7.5 ** 2) & (r2 >= 4 ** 2)] = 700
    cord = r2 < 3.2 ** 2
    image[cord] = 120
    label[cord] = 3
    for lab, sign in ((1, 1.0), (2, -1.0)):
        gx = cx + sign * rng.uniform(40, 48)
        gy = cy + rng.uniform(-10, 10)
        gz = SHAPE[0] / 2 + rng.uniform(-6, 6)
        radii = rng.uniform(5, 8, size=3)
        gland = ((zz - gz) / radii[0]) ** 2 + ((yy - gy) / radii[1]) ** 2 + ((xx - gx) / radii[2]) ** 2 < 1
        image[gland] = 70
        label[gland] = lab
    image += rng.normal(0, 20, SHAPE).astype(np.float32) * body
    return np.clip(image, -1024, 3000).astype(np.int16), label


def make_raw(raw: Path, n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Training cases in ``raw`` (nnU-Net layout), test cases in ``raw/imagesTs`` + ``raw/labelsTs``."""
    import SimpleITK as sitk

    train = [f"bilat_{i:03d}" for i in range(n_train)]
    test = [f"bilat_{i:03d}" for i in range(n_train, n_train + n_test)]
    for i, case in enumerate(train + test):
        image, label = make_case(seed * 1000 + i)
        split = "Tr" if case in train else "Ts"
        for data, path in ((image, raw / f"images{split}" / f"{case}_0000.nii.gz"),
                           (label, raw / f"labels{split}" / f"{case}.nii.gz")):
            path.parent.mkdir(parents=True, exist_ok=True)
            out = sitk.GetImageFromArray(data)
            out.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(out, str(path), True)
    meta = {"name": "Bilateral", "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_train,
            "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return train, test


def _mean(summary: dict, name: str, value: int, metric: str) -> float | None:
    """The mean of ``metric`` for a label in evaluation.json's summary (keyed by label name; by the
    value where the dataset names none); None where it is undefined (hd95 with an empty prediction)."""
    entry = summary.get(name, summary.get(str(value), {}))
    mean = entry.get(metric, {}).get("mean")
    return None if mean is None else round(mean, 4)


def side_swapped(pred_dir: Path, ref_dir: Path) -> float:
    """The fraction of reference gland voxels (labels 1 and 2) predicted as the *other* gland."""
    import SimpleITK as sitk

    swapped = total = 0
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / ref_path.name)))
        glands = (ref == 1) | (ref == 2)
        swapped += int((glands & (pred == 3 - ref)).sum())
        total += int(glands.sum())
    return round(swapped / max(total, 1), 4)


def run(cmd: list[str], log: list[dict]) -> float:
    """Run one CLI command (printed), fail loudly, return its wall time."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    log.append({"cmd": " ".join(cmd), "wall_s": round(wall, 1)})
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=1200, help="training iterations per configuration")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--budget-gb", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="data,plan,train,predict")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    out = args.out.resolve()
    raw, work, preds = out / "raw", out / "work", out / "pred"
    autoseg = [sys.executable, "-m", "autoseg"]
    log: list[dict] = []
    if "data" in steps:
        shutil.rmtree(raw, ignore_errors=True)
        train_ids, _ = make_raw(raw, args.cases, args.test, args.seed)
        folds = [train_ids[k::FOLDS] for k in range(FOLDS)]
        splits = [{"train": sorted(set(train_ids) - set(f)), "val": sorted(f)} for f in folds]
        (out / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")
    if "plan" in steps:
        text = (REPO / "planners" / "cpu.yaml").read_text()
        preset = out / "cpu_small_patch.yaml"
        preset.write_text(text.replace("name: cpu", "name: cpu_small_patch")
                          .replace("memory_budget_gb: 2", f"memory_budget_gb: {args.budget_gb}"))
        run([*autoseg, "plan", str(raw), "-o", str(work), "--planner", str(preset)], log)
        run([*autoseg, "preprocess", str(work)], log)
    epochs = max(1, args.iters // 50)
    common = ["--epochs", str(epochs), "--iters-per-epoch", "50", "--seed", str(args.seed),
              "--splits", str(out / "splits.json"), "--optimizer", "adamw"]
    if "train" in steps:
        run([*autoseg, "train", str(work), "-c", "3d_lowres", "-f", "0,1,2", *common], log)
        run([*autoseg, "train", str(work), "-c", "3d_fullres", "-f", "0", *common], log)
        run([*autoseg, "train", str(work), "-c", "3d_cascade_fullres", "-f", "0", *common], log)
    results = {}
    if "predict" in steps:
        for config in CONFIGS:
            target = preds / config
            shutil.rmtree(target, ignore_errors=True)
            wall = run([*autoseg, "predict", str(work), "-i", str(raw / "imagesTs"), "-o", str(target),
                        "-c", config, "-f", "0"], log)
            run([*autoseg, "evaluate", str(target), str(raw / "labelsTs"), "-l", str(raw)], log)
            summary = json.loads((target / "evaluation.json").read_text())["summary"]["labels"]
            results[config] = {"predict_wall_s": round(wall, 1),
                               "gland_voxels_side_swapped": side_swapped(target, raw / "labelsTs"), **{
                name: {m: _mean(summary, name, v, m) for m in ("dice", "hd95")} for name, v in LABELS.items() if v}}
    (out / "result.json").write_text(json.dumps({"log": log, "results": results}, indent=2) + "\n")
    print(json.dumps({"log": log, "results": results}, indent=2))


if __name__ == "__main__":
    main()
