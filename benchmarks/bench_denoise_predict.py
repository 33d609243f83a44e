"""Benchmark: denoising prediction speed of a 512×512×100 CT with the 2d configuration, against the
arithmetic floor (issue 12: within 1.3×), and peak RSS.

    python benchmarks/bench_denoise_predict.py [--ct ../shared/data/CT_full_dose/LIDC-IDRI-0314.nii.gz]
                                               [--slices 100] [--work DIR] [--planner default]

Prepares once under ``--work``: the first ``--slices`` slices of the CT as the clean target, the
same plus Gaussian noise (σ 20 HU, seeds 0-4: five cases for the split) as the "low-dose" input — the noise does not change the
speed, and it avoids the minutes of a projection-domain simulation — planned with ``--planner`` and
trained for one iteration (fold 0) (weights do not change the speed either). Then, in fresh
``autoseg predict`` processes (one case, torch engine, the only engine of restoration models), with
and without TTA: wall time and peak RSS (``wait4``), and from the predictor in-process the time in
network calls. The floor = conv FLOPs of every window × mirror (``autoseg.networks.conv_flops``,
one head) / this machine's forward convolution rate (``autoseg.networks.throughput``, the planner's
cached measurement). Prints one JSON document. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CT = HERE.parent.parent / "shared" / "data" / "CT_full_dose" / "LIDC-IDRI-0314.nii.gz"
TARGET_VS_FLOOR = 1.3
#: Training cases written (the 5-fold split needs 5; only the first is predicted).
CASES = 5


def prepare(ct: Path, slices: int, work: Path, planner: str) -> Path:
    """The one-case denoise dataset, planned and with a one-iteration 2d model; returns the input folder."""
    import numpy as np
    import SimpleITK as sitk

    import shutil

    raw, inputs = work / "raw", work / "input"
    key_file, key = work / "prepared.json", {"ct": str(ct.resolve()), "slices": slices, "planner": planner}
    if (work / "W" / "models" / "2d" / "fold_0" / "checkpoint_final.pt").is_file() and key_file.is_file() \
            and json.loads(key_file.read_text()) == key:
        return inputs
    for folder in (raw, inputs, work / "W"):  # another CT, slice count or planner: prepared again
        shutil.rmtree(folder, ignore_errors=True)
    key_file.unlink(missing_ok=True)
    image = sitk.ReadImage(str(ct))
    image = image[:, :, :slices]
    clean = sitk.GetArrayFromImage(image).astype(np.float32)
    for folder in (raw / "imagesTr", raw / "targetsTr", inputs):
        folder.mkdir(parents=True, exist_ok=True)
    for seed in range(CASES):  # the same slices under other noise: enough cases for the 5-fold split
        noisy = clean + np.random.default_rng(seed).normal(0.0, 20.0, clean.shape).astype(np.float32)
        low = sitk.GetImageFromArray(np.clip(np.rint(noisy), -32768, 32767).astype(np.int16))
        low.CopyInformation(image)
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(raw / "targetsTr" / f"ct{seed}.nii.gz"))
        sitk.WriteImage(low, str(raw / "imagesTr" / f"ct{seed}_0000.nii.gz"))
        if seed == 0:
            sitk.WriteImage(low, str(inputs / "ct_0000.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "task": "denoise", "name": "DenoiseSpeed", "channel_names": {"0": "CT"}, "numTraining": CASES,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    run([sys.executable, "-m", "autoseg", "plan", str(raw), "-o", str(work / "W"), "--planner", planner])
    run([sys.executable, "-m", "autoseg", "train", str(work / "W"), "-c", "2d", "-f", "0", "--epochs", "1",
         "--iters-per-epoch", "1", "--val-iters", "0", "--no-validate", "--device", "cpu"])
    key_file.write_text(json.dumps(key))
    return inputs


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")


def timed_predict(work: Path, inputs: Path, out: Path, tta: bool) -> dict[str, float]:
    """One fresh ``autoseg predict`` process: wall seconds and peak RSS."""
    command = [sys.executable, "-m", "autoseg", "predict", str(work / "W"), "-i", str(inputs), "-o", str(out),
               "-c", "2d", "-f", "0", "--device", "cpu", "--engine", "torch", *([] if tta else ["--no-tta"])]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"predict failed: {process.stderr.read()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def in_process(work: Path, inputs: Path, tta: bool) -> dict[str, float]:
    """Network-call time of one prediction, and the floor of its windows."""
    from autoseg.inference.inputs import InputCase, read_input
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from autoseg.networks.analysis import conv_flops
    from autoseg.networks.throughput import machine_rates

    selections, _ = select_models(work / "W", ["2d"], [0], "final")
    predictor = Predictor(work / "W", selections, device="cpu", tta=tta, engine="torch")
    image, geometry = read_input(InputCase("ct", (inputs / "ct_0000.nii.gz",), ".nii.gz"))
    start = time.perf_counter()
    predictor.predict(image, geometry)
    predict_s = time.perf_counter() - start
    config = predictor.plans.configuration("2d")
    flops = conv_flops(config.topology, config.patch_size, config.input_channels, predictor.plans.num_classes,
                       deep_supervision=False) * predictor.stats.samples
    _, infer_gflops, device, _ = machine_rates("cpu")
    floor_s = flops / (infer_gflops * 1e9)
    return {"predict_s": round(predict_s, 2), "forward_s": round(predictor.stats.forward_s, 2),
            "samples": predictor.stats.samples, "tflop": round(flops / 1e12, 3),
            "forward_gflops_measured": infer_gflops, "device": device, "floor_s": round(floor_s, 2),
            "forward_vs_floor": round(predictor.stats.forward_s / floor_s, 3),
            "predict_vs_floor": round(predict_s / floor_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoseg_bench_denoise_predict"))
    parser.add_argument("--planner", default="default")
    args = parser.parse_args()
    if not args.ct.is_file():
        sys.exit(f"{args.ct}: not found; pass --ct a CT volume (512x512 slices)")
    inputs = prepare(args.ct, args.slices, args.work, args.planner)
    from autoseg import plans as plans_io

    config = plans_io.load(args.work / "W" / "plans.yaml").configuration("2d")
    result: dict[str, object] = {
        "benchmark": "denoise prediction, 2d", "ct": str(args.ct), "slices": args.slices,
        "patch_size": list(config.patch_size), "features": list(config.topology.features_per_stage),
        "load_avg_before": os.getloadavg()[0]}
    for tta in (False, True):
        key = "tta" if tta else "no_tta"
        result[key] = {"cli": timed_predict(args.work, inputs, args.work / f"out_{key}", tta),
                       "in_process": in_process(args.work, inputs, tta)}
    result["load_avg_after"] = os.getloadavg()[0]
    result["peak_rss_this_process_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["target"] = {"predict_vs_floor_max": TARGET_VS_FLOOR,
                        "met_no_tta": result["no_tta"]["in_process"]["predict_vs_floor"] <= TARGET_VS_FLOOR,
                        "met_tta": result["tta"]["in_process"]["predict_vs_floor"] <= TARGET_VS_FLOOR}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
