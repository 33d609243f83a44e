"""Benchmark: prediction time per case (with and without TTA), start-up, overhead, arithmetic floor.

    python benchmarks/bench_predict.py [WORK] [-c 3d_fullres] [-f 0 1 2 3 4] [--cases 5] [--repeats 2]
                                       [--raw ../shared/data/Task04_Hippocampus] [--output result.json]
                                       [--engine auto|torch|openvino|onnxruntime] [--precision auto|fp32|bf16|int8]

WORK defaults to a folder under the system temp dir that is prepared once: ``autoseg plan RAW
--planner default`` (the Hippocampus default plan: features 32-256, patch 40x56x40) and a
checkpoint with random weights for every requested fold, in the trainer's format (the weights do
not change the speed; a random checkpoint avoids 5 training runs). Measured, all on the CPU:

* ``cli``: fresh ``python -m autoseg predict`` processes, as a user runs them (start-up, imports,
  checkpoint loading, reading, prediction, writing): one case, and ``--cases`` cases in one call,
  with and without TTA; wall time and peak RSS (``wait4``). ``per_additional_case_s`` =
  (wall of N cases - wall of 1 case) / (N - 1), from the fastest repeat of each.
* ``in_process``: one :class:`~autoseg.inference.predictor.Predictor` (loaded once), each case read,
  predicted and exported; the time inside the network calls only (``forward_s``: the same windows,
  the same batches) and the overhead ratio = case wall / forward time.
* ``floor``: FLOPs of every window x mirror x fold (:func:`autoseg.networks.conv_flops`, inference:
  one head) / the measured forward throughput of a representative convolution (32->32, 3^3, on
  the patch, channels-last, the predictor's batch) — and, as a tighter reference, / the
  FLOP-weighted throughput of this network's own convolution shapes.

The nnU-Net v2 reference (same machine class, 32-256-feature 3D model, 40x56x48 patch, 5 folds) is
in ``NNUNET``; the targets of the issue are checked in ``targets``. The machine's load average is
recorded before each measurement: numbers taken under load from other processes are not comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
#: nnU-Net v2 on this machine (numbers from the issue): seconds.
NNUNET = {
    "per_additional_case_tta_s": [13.6, 15.8],
    "per_additional_case_no_tta_s": [2.4, 2.7],
    "fixed_startup_s": [20.0, 24.0],
    "single_case_call_s": [38.0, 40.0],
}
#: A measurement during which other processes used more than this share of the CPUs is retried.
QUIET = 0.05
#: The issue's targets.
TARGETS = {"single_case_call_s": 19.0, "per_additional_case_vs_nnunet": 0.8, "vs_floor": 1.2,
           "predict_over_forward": 1.3}


def prepare(work: Path, raw: Path, config: str, folds: list[int]) -> None:
    """Plan ``raw`` with the default preset into ``work`` and write random-weight checkpoints."""
    if not (work / "plans.yaml").is_file():
        subprocess.run([sys.executable, "-m", "autoseg", "plan", str(raw), "-o", str(work), "--planner", "default",
                        "-j", "2"], check=True, stdout=subprocess.DEVNULL)
    import torch

    from autoseg import plans as plans_io
    from autoseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from autoseg.networks import build_network
    from autoseg.training.trainer import plans_meta

    plans = plans_io.load(work / "plans.yaml")
    cfg = plans.configuration(config)
    for fold in folds:
        path = work / "models" / config / f"fold_{fold}" / "checkpoint_final.pt"
        if path.is_file():
            continue
        torch.manual_seed(fold)
        net = build_network(cfg.topology, cfg.input_channels, plans.num_classes, deep_supervision=True)
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "epoch": 0, "configuration_name": config,
            "configuration": plans_io.to_dict(plans)["configurations"][config], "plans": plans_meta(plans),
            "fold": fold,
        })


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def busy_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (/proc/stat; 0 where absent)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def foreign_fraction(busy: float, own: float, wall: float) -> float:
    """Share of the machine's CPUs that other processes used during a measurement."""
    return round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3)


def timed_process(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and peak RSS (MB) of the process, measured with ``wait4``."""
    with tempfile.TemporaryFile() as err:
        before, busy = load(), busy_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        busy = busy_seconds() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')}")
    child = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": before,
            "foreign_cpu": foreign_fraction(busy, child, wall)}


def clean_run(cmd: list[str], retries: int) -> dict:
    """:func:`timed_process`, repeated (up to ``retries`` more times) while other processes used
    more than :data:`QUIET` of the CPUs: their load would be measured as ours."""
    result = timed_process(cmd)
    for _ in range(retries):
        if result["foreign_cpu"] <= QUIET:
            break
        time.sleep(5)
        result = timed_process(cmd)
    return result


def cli_runs(work: Path, config: str, folds: list[int], one: Path, many: Path, repeats: int, retries: int,
             engine: tuple[str, str] = ("torch", "fp32")) -> dict:
    base = [sys.executable, "-m", "autoseg", "predict", str(work), "-c", config, "-f", *map(str, folds),
            "--device", "cpu", "--engine", engine[0], "--precision", engine[1]]
    results: dict = {}
    for tta in (True, False):
        key = "tta" if tta else "no_tta"
        extra = [] if tta else ["--no-tta"]
        single, multi = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                single.append(clean_run(base + ["-i", str(one), "-o", out] + extra, retries))
            with tempfile.TemporaryDirectory() as out:
                multi.append(clean_run(base + ["-i", str(many), "-o", out] + extra, retries))
        n = len(list(many.iterdir()))
        best_single = min(r["wall_s"] for r in single)
        best_multi = min(r["wall_s"] for r in multi)
        results[key] = {
            "single_case_call": single,
            f"{n}_case_call": multi,
            "single_case_call_s": best_single,
            "per_additional_case_s": round((best_multi - best_single) / (n - 1), 3),
            "fixed_s": round(best_single - (best_multi - best_single) / (n - 1), 3),
        }
    return results


def in_process(work: Path, config: str, folds: list[int], cases: list[Path], retries: int,
               engine: tuple[str, str] = ("torch", "fp32")) -> dict:
    import torch

    from autoseg.inference.inputs import InputCase, read_input
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.models import select_models

    results: dict = {"threads": torch.get_num_threads()}
    for tta in (True, False):
        key = "tta" if tta else "no_tta"
        t0 = time.perf_counter()
        selections, _ = select_models(work, [config], folds)
        predictor = Predictor(work, selections, device="cpu", tta=tta, profile=True, engine=engine[0],
                              precision=engine[1])
        results["engine"] = predictor.engine.describe()
        load_s = time.perf_counter() - t0
        per_case = []
        with tempfile.TemporaryDirectory() as out:
            for path in cases:
                for _ in range(retries + 1):
                    stats = predictor.stats
                    before = (stats.forward_s, stats.windows, stats.samples)
                    busy, own = busy_seconds(), own_seconds()
                    t = time.perf_counter()
                    image, geometry = read_input(InputCase(path.name, (path,), ".nii.gz"))
                    predictions = predictor.predict(image, geometry)
                    predictor.export(predictions, geometry, Path(out) / path.name)
                    wall = time.perf_counter() - t
                    foreign = foreign_fraction(busy_seconds() - busy, own_seconds() - own, wall)
                    if foreign <= QUIET:
                        break
                forward = stats.forward_s - before[0]
                per_case.append({"case": path.name, "shape": list(image.shape[1:]), "wall_s": round(wall, 3),
                                 "forward_s": round(forward, 3), "windows": stats.windows - before[1],
                                 "samples": stats.samples - before[2], "foreign_cpu": foreign})
        steady = per_case[1:] or per_case  # the first case pays one-time kernel set-up
        wall = sum(c["wall_s"] for c in steady) / len(steady)
        forward = sum(c["forward_s"] for c in steady) / len(steady)
        results[key] = {
            "predictor_load_s": round(load_s, 3),
            "cases": per_case,
            "first_case_s": per_case[0]["wall_s"],
            "steady_case_s": round(wall, 3),
            "steady_forward_s": round(forward, 3),
            "predict_over_forward": round(wall / forward, 3),
            "stages_s": {"preprocess": round(predictor.stats.preprocess_s, 3),
                         "export": round(predictor.stats.export_s, 3),
                         "predict_total": round(predictor.stats.predict_s, 3)},
        }
    return results


def conv_gflops(cin: int, cout: int, size: tuple[int, ...], batch: int, seconds: float = 1.5,
                retries: int = 3) -> float:
    """Forward GFLOP/s of one 3^3 convolution, channels-last 3D, under torch.inference_mode
    (measured again while other processes used more than :data:`QUIET` of the CPUs)."""
    import torch

    conv = torch.nn.Conv3d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, cin, *size).contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * cin * cout * 27 * math.prod(size) * batch
    best = 0.0
    with torch.inference_mode():
        conv(x)
        for _ in range(retries + 1):
            busy, own = busy_seconds(), own_seconds()
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                conv(x)
                n += 1
            wall = time.perf_counter() - start
            best = max(best, flops * n / wall / 1e9)
            if foreign_fraction(busy_seconds() - busy, own_seconds() - own, wall) <= QUIET:
                break
    return best


def floor(work: Path, config: str, folds: list[int], in_proc: dict) -> dict:
    from autoseg import plans as plans_io
    from autoseg.networks import conv_flops
    from autoseg.inference.window import default_forward_batch

    plans = plans_io.load(work / "plans.yaml")
    cfg = plans.configuration(config)
    patch = tuple(cfg.patch_size)
    per_sample = conv_flops(cfg.topology, patch, cfg.input_channels, plans.num_classes, deep_supervision=False)
    batch = default_forward_batch(patch)
    f0 = cfg.topology.features_per_stage[0]
    representative = conv_gflops(f0, f0, patch, batch)
    # This network's own 3x3x3 encoder convolutions, each at its resolution (FLOP-weighted mix).
    sizes, size = [], patch
    for stride in cfg.topology.strides:
        size = tuple(s // st for s, st in zip(size, stride))
        sizes.append(size)
    mix_flops = mix_time = 0.0
    cin = cfg.input_channels
    for feats, size in zip(cfg.topology.features_per_stage, sizes):
        flops = 2 * max(cin, feats) * feats * 27 * math.prod(size) * batch
        mix_flops += flops
        mix_time += flops / (conv_gflops(max(cin, feats), feats, size, batch, 0.8) * 1e9)
        cin = feats
    mix = mix_flops / mix_time / 1e9
    out = {"conv_flops_per_window_g": round(per_sample / 1e9, 3), "forward_batch": batch,
           "representative_conv_gflops": round(representative, 1), "network_conv_mix_gflops": round(mix, 1)}
    for key in ("tta", "no_tta"):
        cases = in_proc[key]["cases"][1:] or in_proc[key]["cases"]
        samples = sum(c["samples"] for c in cases) / len(cases)  # windows x mirrors x folds
        flops = samples * per_sample
        out[key] = {"samples_per_case": samples, "flops_per_case_g": round(flops / 1e9, 1),
                    "floor_s": round(flops / representative / 1e9, 3),
                    "floor_network_mix_s": round(flops / mix / 1e9, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="?", default=Path(tempfile.gettempdir()) / "autoseg_bench_predict")
    parser.add_argument("-c", "--config", default="3d_fullres")
    parser.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cases", type=int, default=5, help="cases of the multi-case call (and in-process)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process repeats (the fastest counts)")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--engine", default="torch", help="autoseg.inference.engines: torch (today's default "
                        "without the openvino extra), openvino, onnxruntime, auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--retries", type=int, default=3,
                        help=f"repeat a measurement during which other processes used > {QUIET:.0%} of the CPUs")
    args = parser.parse_args()

    if not (args.raw / "dataset.json").is_file():
        sys.exit(f"{args.raw}: dataset not found (pass --raw)")
    prepare(args.work, args.raw, args.config, args.folds)
    images = sorted((args.raw / "imagesTr").glob("*.nii.gz"))[: args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        many = Path(tmp) / "cases"
        many.mkdir()
        for path in images:
            shutil.copy(path, many / path.name)
        result: dict = {"work": str(args.work), "configuration": args.config, "folds": args.folds,
                        "cases": [p.name for p in images], "cpus": os.cpu_count(), "nnunet_v2": NNUNET}
        if not args.skip_cli:
            imports = "import torch, scipy.ndimage, SimpleITK, autoseg.cli, autoseg.inference.run, autoseg.inference.window, " \
                      "autoseg.inference.cpu, autoseg.preprocessing.pipeline, autoseg.networks.unet"
            result["import_s"] = min(clean_run([sys.executable, "-c", imports], args.retries)["wall_s"]
                                     for _ in range(args.repeats))
            result["cli"] = cli_runs(args.work, args.config, args.folds, many / images[0].name, many, args.repeats,
                                     args.retries, (args.engine, args.precision))
        result["in_process"] = in_process(args.work, args.config, args.folds, sorted(many.iterdir()), args.retries,
                                          (args.engine, args.precision))
        result["floor"] = floor(args.work, args.config, args.folds, result["in_process"])
    targets = {}
    for key, nn in (("tta", "per_additional_case_tta_s"), ("no_tta", "per_additional_case_no_tta_s")):
        steady = result["in_process"][key]["steady_case_s"]
        targets[key] = {
            "per_case_s": steady,
            "vs_nnunet_best": round(steady / NNUNET[nn][0], 3),
            "vs_floor": round(steady / result["floor"][key]["floor_s"], 3),
            "vs_floor_network_mix": round(steady / result["floor"][key]["floor_network_mix_s"], 3),
            "predict_over_forward": result["in_process"][key]["predict_over_forward"],
        }
        if "cli" in result:
            targets[key]["single_case_call_s"] = result["cli"][key]["single_case_call_s"]
            targets[key]["cli_per_additional_case_s"] = result["cli"][key]["per_additional_case_s"]
    result["targets"] = {"limits": TARGETS, **targets}
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
