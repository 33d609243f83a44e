"""Benchmark: memory and time of predicting one big CT with a 9-class model (issue 16 item 2).

    python benchmarks/bench_bigct.py [--work DIR] [--model fullres|lowres] [--features default|small]
                                     [--slices 400] [--modes no_tta tta no_tta_probs] [--engine torch]
                                     [--step 0.5] [--output result.json]

The case: ``../shared/data/CT_full_dose/LIDC-IDRI-0314.nii.gz`` (512x512x150, 0.78x0.78x1 mm, int16),
resampled along z with SimpleITK to ``--slices`` slices (400: 0.375 mm, 105 M voxels; 150: the
file itself). The model: a synthetic 9-label dataset (4 crops of 96x160x160 of that CT with 8
random spheres each) planned with the default preset, then

* ``fullres``: the plan's 3d_fullres (1x0.78x0.78 mm, patch 96x160x160, features 32-320). With
  ``--features small`` its features become 4-8 (same patch, same classes): everything outside the
  network — the memory this benchmark is about — is unchanged, and a CPU runs it in minutes.
* ``lowres``: the same network at 3.90625 mm isotropic, patch 48x128x128 (the whole CT in one
  window): the case where the network is cheap and the work around it shows (``--no-tta`` was
  only 1.5x faster than TTA there).

A checkpoint with random weights stands in for training (the weights change neither memory nor
time). Each mode runs in a fresh process (``--child``) that loads the model, reads the case,
predicts and exports it as ``autoseg predict`` does (:meth:`autoseg.inference.api.Segmenter.write_case`'s
steps, timed one by one); the parent measures its wall time and peak RSS (``wait4``). The child
also reports its peak RSS after each stage (``VmHWM``: the predictor keeps freed memory, so RSS
does not shrink) and the sizes that enter the documented bound (docs/prediction.md, "Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO.parent / "shared" / "data" / "CT_full_dose" / "LIDC-IDRI-0314.nii.gz"
#: Foreground labels of the synthetic dataset (9 classes with the background).
LABELS = 8
#: Modes: (name, TTA, --save-probabilities).
MODES = {"no_tta": (False, False), "tta": (True, False), "no_tta_probs": (False, True), "tta_probs": (True, True)}
#: The lowres variant: nnU-Net-like 3d_lowres spacing and a patch holding the whole CT.
LOWRES_SPACING = [3.90625, 3.90625, 3.90625]
LOWRES_PATCH = [48, 128, 128]
SMALL_FEATURES = [4, 8, 8, 8, 8, 8]


def make_raw(ct_path: Path, raw: Path) -> None:
    """4 crops of the CT with 8 random spheres each, in autoseg's (nnU-Net's) raw layout."""
    import numpy as np
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(ct_path))
    array = sitk.GetArrayFromImage(ct)
    rng = np.random.default_rng(0)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    zz, yy, xx = np.mgrid[0:96, 0:160, 0:160]
    for i in range(4):
        z0 = int(rng.integers(0, array.shape[0] - 96))
        y0, x0 = (int(v) for v in rng.integers(100, 512 - 260, size=2))
        image = array[z0:z0 + 96, y0:y0 + 160, x0:x0 + 160].copy()
        label = np.zeros(image.shape, np.uint8)
        for k in range(1, LABELS + 1):
            centre, radius = rng.uniform([15, 25, 25], [80, 135, 135]), rng.uniform(6, 18)
            label[((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) < radius ** 2] = k
        for data, name in ((image, f"imagesTr/c{i}_0000.nii.gz"), (label, f"labelsTr/c{i}.nii.gz")):
            out = sitk.GetImageFromArray(data)
            out.SetSpacing(ct.GetSpacing())
            out.SetDirection(ct.GetDirection())
            sitk.WriteImage(out, str(raw / name))
    meta = {"name": "BigCT9", "channel_names": {"0": "CT"}, "numTraining": 4, "file_ending": ".nii.gz",
            "labels": {"background": 0, **{f"organ{k}": k for k in range(1, LABELS + 1)}}}
    (raw / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def prepare(work: Path, ct_path: Path, model: str, features: str) -> None:
    """Plan the synthetic dataset into ``work``, edit the plan for the variant, write a random checkpoint."""
    import torch
    import yaml

    from autoseg import plans as plans_io
    from autoseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from autoseg.networks import build_network
    from autoseg.training.trainer import plans_meta

    path = work / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    if path.is_file():
        return
    raw = work.parent / f"{work.name}_raw"
    if not (raw / "dataset.json").is_file():
        make_raw(ct_path, raw)
    subprocess.run([sys.executable, "-m", "autoseg", "plan", str(raw), "-o", str(work), "-j", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    data = yaml.safe_load((work / "plans.yaml").read_text(encoding="utf-8"))
    config = data["configurations"]["3d_fullres"]
    if model == "lowres":
        config["spacing"], config["patch_size"] = LOWRES_SPACING, LOWRES_PATCH
    if features == "small":
        config["topology"]["features_per_stage"] = SMALL_FEATURES
    data["configurations"] = {"3d_fullres": config}
    data["recommended"] = ["3d_fullres"]
    (work / "plans.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    plans = plans_io.load(work / "plans.yaml")
    cfg = plans.configuration("3d_fullres")
    torch.manual_seed(0)
    net = build_network(cfg.topology, cfg.input_channels, plans.num_classes, deep_supervision=True)
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "epoch": 0, "configuration_name": "3d_fullres",
        "configuration": plans_io.to_dict(plans)["configurations"]["3d_fullres"], "plans": plans_meta(plans),
        "fold": 0,
    })


def make_case(ct_path: Path, slices: int, folder: Path) -> Path:
    """The CT resampled along z to ``slices`` slices (linear, SimpleITK), as ``folder/ct<slices>_0000.nii.gz``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ct{slices}_0000.nii.gz"
    if path.is_file():
        return path
    ct = sitk.ReadImage(str(ct_path))
    size = ct.GetSize()
    if slices == size[2]:
        sitk.WriteImage(ct, str(path))
        return path
    spacing = (ct.GetSpacing()[0], ct.GetSpacing()[1], ct.GetSpacing()[2] * size[2] / slices)
    big = sitk.Resample(ct, (size[0], size[1], slices), sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing,
                        ct.GetDirection(), -1024, ct.GetPixelID())
    sitk.WriteImage(big, str(path))
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``), MB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def stand_in_network(classes: int) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """A network that costs nothing: logits ``(B, K, *patch)`` from the first input channel (for
    measuring everything around the network in seconds; ``--no-network``)."""
    import torch

    scale = torch.linspace(-1.0, 1.0, classes).reshape(1, classes, 1, 1, 1)

    def net(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * scale.reshape(1, classes, *([1] * (x.dim() - 2)))

    return net


def child(work: Path, case_path: Path, out: Path, tta: bool, probabilities: bool, engine: str, step: float,
          no_network: bool = False) -> dict:
    """One case as ``autoseg predict`` does it (Segmenter.write_case's steps), each step timed."""
    import math

    from autoseg.inference.api import Segmenter
    from autoseg.inference.inputs import InputCase, read_input

    started = time.perf_counter()
    segmenter = Segmenter.load(work, device="cpu", tta=tta, step=step, engine=engine)
    predictor = segmenter.predictor
    if no_network:
        for models in predictor.models:
            models.nets = [stand_in_network(predictor.num_classes) for _ in models.nets]
    stages: dict = {"load_s": time.perf_counter() - started}
    hwm = {"after_load": peak_rss_mb()}
    windows: list[int] = []
    case = InputCase(case_path.name.split("_0000")[0], (case_path,), ".nii.gz")
    t0 = time.perf_counter()
    image, geometry = read_input(case)
    stages["read_s"] = time.perf_counter() - t0
    hwm["after_read"] = peak_rss_mb()
    t0 = time.perf_counter()
    predictions = predictor.predict(image, geometry, progress=lambda done, total: windows.append(total))
    stages["predict_s"] = time.perf_counter() - t0
    hwm["after_predict"] = peak_rss_mb()
    t0 = time.perf_counter()
    predictor.export(predictions, geometry, out / f"{case.case_id}.nii.gz",
                     out / f"{case.case_id}.npz" if probabilities else None)
    stages["export_s"] = time.perf_counter() - t0
    hwm["after_export"] = peak_rss_mb()
    stats = predictor.stats
    stages.update(preprocess_s=stats.preprocess_s, forward_s=stats.forward_s,
                  window_and_activation_s=stats.predict_s - stats.preprocess_s - stats.forward_s,
                  case_s=time.perf_counter() - t0 + stages["read_s"] + stages["predict_s"])
    first = predictions[0]
    sizes = {"classes": int(first.probabilities.shape[0]), "channels": int(image.shape[0]),
             "input_voxels": int(math.prod(image.shape[1:])), "input_dtype": str(image.dtype),
             "preprocessed_voxels": int(math.prod(first.probabilities.shape[1:])),
             "preprocessed_shape": list(first.probabilities.shape[1:]),
             "crop_voxels": int(math.prod(first.props["shape_after_crop"])),
             "windows": windows[-1] if windows else 0, "progress_calls": len(windows)}
    return {"engine": segmenter.engine, "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "peak_rss_mb_after": hwm, "sizes": sizes}


def run_child(args: argparse.Namespace, work: Path, case: Path, tta: bool, probabilities: bool) -> dict:
    """A fresh process for one mode; its wall time and peak RSS (``wait4``)."""
    with tempfile.TemporaryDirectory(dir=args.scratch) as out, tempfile.TemporaryFile() as result:
        cmd = [sys.executable, __file__, "--child", str(work), str(case), out, "--engine", args.engine,
               "--step", str(args.step)] + (["--tta"] if tta else []) + (["--probs"] if probabilities else []) + \
              (["--no-network"] if args.no_network else [])
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=result, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err}")
        result.seek(0)
        data = json.loads(result.read().decode())
        sizes = {p.name: p.stat().st_size for p in Path(out).iterdir()}
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "load_before": [round(v, 2) for v in os.getloadavg()], "outputs_bytes": sizes, **data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("WORK", "CASE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help="model folder (prepared once; default under the temp dir)")
    parser.add_argument("--model", choices=("fullres", "lowres"), default="fullres")
    parser.add_argument("--features", choices=("default", "small"), default="small")
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["no_tta", "no_tta_probs", "tta"])
    parser.add_argument("--engine", default="torch")
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--no-network", action="store_true",
                        help="replace the network by a stand-in that costs nothing: everything around it, in seconds")
    parser.add_argument("--scratch", type=Path, default=None, help="where outputs are written (temp dir)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    if args.child:
        work, case, out = (Path(p) for p in args.child)
        print(json.dumps(child(work, case, out, args.tta, args.probs, args.engine, args.step, args.no_network)))
        return
    if not args.ct.is_file():
        sys.exit(f"{args.ct}: CT not found (pass --ct)")
    base = Path(tempfile.gettempdir()) / "autoseg_bench_bigct"
    work = args.work or base / f"{args.model}_{args.features}"
    prepare(work, args.ct, args.model, args.features)
    case = make_case(args.ct, args.slices, base / "cases")
    result: dict = {"work": str(work), "model": args.model, "features": args.features, "case": case.name,
                    "engine": args.engine, "step": args.step, "no_network": args.no_network,
                    "cpus": os.cpu_count(), "modes": {}}
    for mode in args.modes:
        tta, probabilities = MODES[mode]
        result["modes"][mode] = run_child(args, work, case, tta, probabilities)
    walls = {m: r["stages_s"]["case_s"] for m, r in result["modes"].items()}
    if "tta" in walls and "no_tta" in walls:
        result["tta_over_no_tta"] = round(walls["tta"] / walls["no_tta"], 2)
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
