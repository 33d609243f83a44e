"""Benchmark: autoseg and nnU-Net v2 side by side on one dataset, same machine, same run.

    python benchmarks/bench_vs_nnunet.py --nnunet-python /path/to/nnunet-venv/bin/python \\
        [--dataset ../shared/data/OpenKBP_HN_CT] [--big-ct ../shared/data/CT_full_dose/LIDC-IDRI-0314.nii.gz] \\
        [--out /tmp/vs-nnunet] [--stages plan,preprocess,train,predict] [--iters 6] [-j 2] [--train-bf16]

Each step is a fresh process of each tool, one after the other (never concurrently), timed by
wall clock; peak memory is the largest sum of the resident set sizes of the process and all its
descendants, sampled every 0.1 s from /proc (workers count: nnU-Net preprocesses and predicts with
worker processes). Prints one JSON object; the plans of both tools are summarised in it.

- plan: ``autoseg plan`` vs ``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment``.
- preprocess (3d_fullres): ``autoseg preprocess -j N`` vs ``nnUNetv2_preprocess -np N``.
- train: seconds per iteration at nnU-Net's own 3d_fullres plan (patch, batch, network), data
  loading included, first iteration skipped: autoseg through its trainer with nnU-Net's plan
  written into its plans.yaml (``benchmarks/bench_train.py``), nnU-Net through
  ``nnUNetv2_train`` with a trainer that runs ``--iters`` iterations and no final validation.
- predict: one big CT (``--big-ct``) with the fold just trained (nnU-Net's network size):
  ``autoseg predict`` (default engine, and ``--engine torch``; with and without
  ``--save-probabilities``) vs ``nnUNetv2_predict`` (its defaults, and ``--save_probabilities``).

The nnU-Net side needs a Python environment with ``nnunetv2`` (``--nnunet-python``); its CLI
entry points are looked up beside that interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 501

#: nnU-Net trainer for the benchmark: ``--iters`` iterations, one epoch, no final validation; it
#: prints the steady-state seconds per iteration (data wait included, iteration 0 skipped).
BENCH_TRAINER = '''
import os, time, json
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_bench(nnUNetTrainer):
    # nnU-Net records its constructor's arguments by name: the signature must be spelled out.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERS", "6"))
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 1
        self._entries = []

    def train_step(self, batch):
        self._entries.append(time.perf_counter())
        out = super().train_step(batch)
        if len(self._entries) == self.num_iterations_per_epoch:
            end = time.perf_counter()
            steady = (end - self._entries[1]) / (len(self._entries) - 1)
            print("BENCH_RESULT " + json.dumps({"s_per_it": steady, "iters": len(self._entries)}), flush=True)
        return out

    def perform_actual_validation(self, save_probabilities=False):
        pass
'''


# ----------------------------------------------------------------------------------------------
# Measuring a command


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and every descendant, MB (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total / 2**20


def measure(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run ``command``; wall seconds, peak tree RSS (MB), its stdout (for BENCH_RESULT lines).

    Raises:
        SystemExit: the command failed (its log's tail is printed).
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_mb(process.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if log is not None:
        log.write_text(output)
    if process.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    result: dict[str, Any] = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak[0], 1)}
    for line in output.splitlines():
        if line.startswith("BENCH_RESULT "):
            reported = json.loads(line[len("BENCH_RESULT "):])
            result["s_per_it"] = reported.get("s_per_it")
            result["reported"] = reported
    return result


# ----------------------------------------------------------------------------------------------
# Setup


def nnunet_env(out: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(out / "nnunet_raw"), "nnUNet_preprocessed": str(out / "nnunet_preprocessed"),
            "nnUNet_results": str(out / "nnunet_results")}


def setup_nnunet(nnunet_python: Path, dataset: Path, out: Path) -> str:
    """The raw dataset linked into nnU-Net's layout, and the benchmark trainer installed; the
    dataset's folder name."""
    name = f"Dataset{DATASET_ID:03d}_{dataset.name.replace('_', '')}"
    raw = out / "nnunet_raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    for item in ("imagesTr", "labelsTr", "dataset.json"):
        link = raw / item
        if not link.exists():
            link.symlink_to((dataset / item).resolve())
    site = subprocess.run([str(nnunet_python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # In the top folder: nnU-Net searches its modules before its subpackages, so the lookup never
    # imports the Primus trainers (timm, which needs torchvision; not installed with CPU torch here).
    trainer = Path(site) / "training" / "nnUNetTrainer" / "nnUNetTrainer_bench.py"
    trainer.write_text(BENCH_TRAINER)
    return name


def tool(nnunet_python: Path, name: str) -> str:
    return str(nnunet_python.parent / name)


def autoseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoseg", *args]


# ----------------------------------------------------------------------------------------------
# Plans side by side


def nnunet_plan_summary(plans_file: Path) -> dict[str, Any]:
    plans = json.loads(plans_file.read_text())
    out: dict[str, Any] = {}
    for name, config in plans["configurations"].items():
        arch = config.get("architecture", {}).get("arch_kwargs", {})
        out[name] = {
            "spacing": config.get("spacing"), "patch": config.get("patch_size"), "batch": config.get("batch_size"),
            "normalization": config.get("normalization_schemes"), "features": arch.get("features_per_stage"),
            "stages": arch.get("n_stages"), "inherits_from": config.get("inherits_from"),
            "previous_stage": config.get("previous_stage"), "next_stage": config.get("next_stage"),
        }
    return out


def autoseg_plan_summary(plans_file: Path) -> dict[str, Any]:
    from autoseg import plans as plans_io

    plans = plans_io.load(plans_file)
    out: dict[str, Any] = {}
    for name, config in plans.configurations.items():
        out[name] = {
            "spacing": list(config.spacing), "patch": list(config.patch_size), "batch": config.batch_size,
            "normalization": [n.scheme for n in config.normalization], "features": list(config.topology.features_per_stage),
            "stages": config.topology.num_stages, "previous_stage": config.previous_stage,
        }
    out["recommended"] = list(plans.recommended)
    return out


def adopt_nnunet_plan(work: Path, plans_file: Path, configuration: str = "3d_fullres") -> None:
    """Write nnU-Net's patch, batch and network (features, strides, kernels) for ``configuration``
    into autoseg's plans.yaml, so both train the same network on the same patches.

    nnU-Net's axes are its transposed ones; autoseg's plans use the same transpose rule (the
    coarsest axis first), checked here by comparing spacings.
    """
    import dataclasses

    from autoseg import plans as plans_io

    nn = json.loads(plans_file.read_text())["configurations"][configuration]
    arch = nn["architecture"]["arch_kwargs"]
    plans = plans_io.load(work / "plans.yaml")
    config = plans.configurations[configuration]
    if [round(s, 3) for s in config.spacing] != [round(s, 3) for s in nn["spacing"]]:
        raise SystemExit(f"spacings differ (autoseg {config.spacing}, nnU-Net {nn['spacing']}): the patch "
                         "cannot be carried over")
    topology = dataclasses.replace(
        config.topology,
        features_per_stage=tuple(int(f) for f in arch["features_per_stage"]),
        strides=tuple(tuple(int(v) for v in s) for s in arch["strides"]),
        kernel_sizes=tuple(tuple(int(v) for v in k) for k in arch["kernel_sizes"]),
        blocks_per_stage=tuple(int(b) for b in arch["n_conv_per_stage"]),
        decoder_blocks_per_stage=tuple(int(b) for b in arch["n_conv_per_stage_decoder"]),
    )
    adopted = dataclasses.replace(config, patch_size=tuple(int(p) for p in nn["patch_size"]),
                                  batch_size=int(nn["batch_size"]), topology=topology)
    plans_io.save(dataclasses.replace(plans, configurations={**plans.configurations, configuration: adopted}),
                  work / "plans.yaml")


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-python", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "OpenKBP_HN_CT")
    parser.add_argument("--big-ct", type=Path,
                        default=ROOT.parent / "shared" / "data" / "CT_full_dose" / "LIDC-IDRI-0314.nii.gz")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vs-nnunet"))
    parser.add_argument("--stages", default="plan,preprocess,train,predict")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--train-bf16", action="store_true",
                        help="train stage: also time autoseg under 'train --precision bf16' (CPU bf16 autocast: "
                             "train's default on a CPU with AMX; the first row is fp32)")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    work = out / "autoseg_work"
    env = nnunet_env(out)
    name = setup_nnunet(args.nnunet_python, args.dataset, out)
    nn_plans = out / "nnunet_preprocessed" / name / "nnUNetPlans.json"
    report: dict[str, Any] = {"dataset": str(args.dataset), "cpus": os.cpu_count(), "workers": args.workers}

    if "plan" in stages:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / "nnunet_preprocessed", ignore_errors=True)
        ours = measure(autoseg_cmd("plan", str(args.dataset), "-o", str(work), "-j", str(args.workers)),
                       log=logs / "autoseg_plan.log")
        fp = measure([tool(args.nnunet_python, "nnUNetv2_extract_fingerprint"), "-d", str(DATASET_ID), "-np",
                      str(args.workers)], env, logs / "nnunet_fingerprint.log")
        pl = measure([tool(args.nnunet_python, "nnUNetv2_plan_experiment"), "-d", str(DATASET_ID)], env,
                     logs / "nnunet_plan.log")
        report["plan"] = {
            "autoseg": ours,
            "nnunet": {"wall_s": round(fp["wall_s"] + pl["wall_s"], 2), "fingerprint": fp, "plan_experiment": pl,
                       "peak_rss_mb": max(fp["peak_rss_mb"], pl["peak_rss_mb"])},
            "autoseg_plans": autoseg_plan_summary(work / "plans.yaml"),
            "nnunet_plans": nnunet_plan_summary(nn_plans),
        }

    save = lambda: (out / "report.json").write_text(json.dumps(report, indent=1))  # noqa: E731 - after every stage
    save()
    if "preprocess" in stages:
        shutil.rmtree(work / "preprocessed", ignore_errors=True)
        shutil.rmtree(out / "nnunet_preprocessed" / name / "nnUNetPlans_3d_fullres", ignore_errors=True)
        ours = measure(autoseg_cmd("preprocess", str(work), "-c", "3d_fullres", "-j", str(args.workers)),
                       log=logs / "autoseg_preprocess.log")
        theirs = measure([tool(args.nnunet_python, "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                          "-np", str(args.workers)], env, logs / "nnunet_preprocess.log")
        report["preprocess_3d_fullres"] = {"autoseg": ours, "nnunet": theirs,
                                           "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
                                           "rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3)}

    save()
    if "train" in stages:
        adopt_nnunet_plan(work, nn_plans)
        shutil.rmtree(work / "models", ignore_errors=True)
        shutil.rmtree(out / "nnunet_results", ignore_errors=True)
        ours = measure([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), str(work), "-c", "3d_fullres",
                        "--iters", str(args.iters), "--precision", "fp32", "--keep", "--json-line"],
                       log=logs / "autoseg_train.log")
        theirs = measure([tool(args.nnunet_python, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr",
                          "nnUNetTrainer_bench", "-device", "cpu"], {**env, "BENCH_ITERS": str(args.iters)},
                         logs / "nnunet_train.log")
        ours_bf16 = None
        if args.train_bf16:  # last (into a scratch folder): a CPU without bf16 units refuses it
            try:
                ours_bf16 = measure([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), str(work), "-c",
                                     "3d_fullres", "--iters", str(args.iters), "--precision", "bf16", "--json-line"],
                                    log=logs / "autoseg_train_bf16.log")
            except SystemExit as exc:
                ours_bf16 = {"error": str(exc)}
        report["train_3d_fullres_at_nnunet_plan"] = {
            "autoseg": ours, "nnunet": theirs,
            "s_per_it_ratio": round(ours["s_per_it"] / theirs["s_per_it"], 3) if "s_per_it" in ours else None,
        }
        if ours_bf16 is not None:
            report["train_3d_fullres_at_nnunet_plan"]["autoseg_bf16"] = ours_bf16
            report["train_3d_fullres_at_nnunet_plan"]["s_per_it_ratio_bf16"] = (
                round(ours_bf16["s_per_it"] / theirs["s_per_it"], 3) if "s_per_it" in ours_bf16 else None)

    save()
    if "predict" in stages:
        inputs = out / "big_ct_input"
        inputs.mkdir(exist_ok=True)
        link = inputs / "bigct_0000.nii.gz"
        if not link.exists():
            link.symlink_to(args.big_ct.resolve())
        runs: dict[str, Any] = {}
        for label, extra in (("autoseg", []), ("autoseg_torch", ["--engine", "torch"]),
                             ("autoseg_save_probabilities", ["--save-probabilities"])):
            target = out / f"pred_{label}"
            shutil.rmtree(target, ignore_errors=True)
            runs[label] = measure(autoseg_cmd("predict", str(work), "-i", str(inputs), "-o", str(target), "-c",
                                              "3d_fullres", "-f", "0", "--device", "cpu", *extra),
                                  log=logs / f"{label}_predict.log")
        for label, extra in (("nnunet", []), ("nnunet_save_probabilities", ["--save_probabilities"])):
            target = out / f"pred_{label}"
            shutil.rmtree(target, ignore_errors=True)
            runs[label] = measure([tool(args.nnunet_python, "nnUNetv2_predict"), "-i", str(inputs), "-o", str(target),
                                   "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_bench",
                                   "-device", "cpu", *extra], env, logs / f"{label}_predict.log")
        runs["wall_ratio"] = round(runs["autoseg"]["wall_s"] / runs["nnunet"]["wall_s"], 3)
        runs["rss_ratio"] = round(runs["autoseg"]["peak_rss_mb"] / runs["nnunet"]["peak_rss_mb"], 3)
        runs["wall_ratio_torch"] = round(runs["autoseg_torch"]["wall_s"] / runs["nnunet"]["wall_s"], 3)
        report["predict_big_ct"] = runs
    text = json.dumps(report, indent=1)
    (out / "report.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
