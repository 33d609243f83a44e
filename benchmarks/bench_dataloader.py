"""Benchmark: the training data loader (sample → augment → deep-supervision targets → tensors).

Measures, for workers 0, 1, 2 (or ``--workers``), batches/s and ms per batch with training
augmentation, the consumer's wait per batch, and — with ``--step-s`` — the same while the main
process runs a torch compute loop standing in for the training step (on a small machine the
workers and the step compete for the same cores; this shows whether adding workers pays). It also
splits one in-process batch into stages and compares the spatial transform's cost at nnU-Net's
initial patch size with ours. Prints JSON, with the peak RSS of the main process and of each
worker::

    python benchmarks/bench_dataloader.py                        # ~20 synthetic Hippocampus-like cases
    python benchmarks/bench_dataloader.py --data WORK/preprocessed/3d_fullres --plans WORK/plans.yaml

The synthetic configuration is nnU-Net's Hippocampus 3d_fullres plan: patch 40×56×40, batch 8,
1 channel, 3 classes, 4 stages (strides 1, 2, 2, 2); cases of about 36×50×35 voxels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.data import AugmentationSettings, Augmenter, BatchLoader, BatchProducer, load_cases  # noqa: E402
from autoseg.data.augment import GlobalRandomState, deep_supervision_strides, downsample_seg  # noqa: E402
from autoseg.data.sampler import sample_batch  # noqa: E402
from autoseg.plans import Configuration, Normalization, Topology  # noqa: E402


def hippocampus_config(batch_size: int) -> Configuration:
    return Configuration(
        dims=3, spacing=(1.0, 1.0, 1.0), patch_size=(40, 56, 40), batch_size=batch_size,
        median_shape=(36.0, 50.0, 35.0), normalization=(Normalization("zscore"),),
        topology=Topology(
            features_per_stage=(32, 64, 128, 256),
            strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
            kernel_sizes=((3, 3, 3),) * 4, blocks_per_stage=(2, 2, 2, 2), decoder_blocks_per_stage=(2, 2, 2),
        ),
    )


def write_synthetic(folder: Path, n_cases: int, seed: int = 0) -> None:
    """Cases in the preprocessed contract: two nested ellipsoids (labels 1, 2) in z-scored noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        shape = tuple(int(s + rng.integers(-4, 5)) for s in (36, 50, 35))
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        centre = rng.uniform(-0.2, 0.2, size=3)[:, None, None, None]
        radius = np.sqrt((((grid - centre) / np.array([0.35, 0.25, 0.3])[:, None, None, None]) ** 2).sum(0))
        seg = np.where(radius < 0.5, 2, np.where(radius < 1.0, 1, 0)).astype(np.int8)
        image = (rng.normal(size=(1, *shape)) + seg[None] * 1.5).astype(np.float32)
        image = (image - image.mean()) / image.std()
        case_id = f"hippo_{i:03d}"
        np.save(folder / f"{case_id}.npy", image)
        np.save(folder / f"{case_id}_seg.npy", seg)
        locations = {}
        for label in (1, 2):
            coords = np.argwhere(seg == label)
            if len(coords) > 10_000:
                coords = coords[rng.choice(len(coords), 10_000, replace=False)]
            locations[str(label)] = coords.tolist()
        (folder / f"{case_id}.json").write_text(json.dumps({"case_id": case_id, "class_locations": locations}))


def stage_times(cases: list, config: Configuration, repeats: int) -> dict[str, float]:
    """Milliseconds per batch of each in-process stage (median over ``repeats`` batches)."""
    producer = BatchProducer(cases, config, np.random.SeedSequence([0, 0]))
    augmenter = producer.augmenter
    assert augmenter is not None
    rng = np.random.default_rng(0)
    state = GlobalRandomState(0)
    strides = deep_supervision_strides(config.topology)
    sample_ms, augment_ms, ds_ms = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = sample_batch(cases, augmenter.initial_patch_size, config.batch_size, rng,
                             final_patch_size=config.patch_size)
        t1 = time.perf_counter()
        with state:
            image, seg = augmenter(batch.image, batch.seg)
        t2 = time.perf_counter()
        downsample_seg(seg, strides)
        t3 = time.perf_counter()
        sample_ms.append((t1 - t0) * 1e3)
        augment_ms.append((t2 - t1) * 1e3)
        ds_ms.append((t3 - t2) * 1e3)
    return {"sample_ms": round(statistics.median(sample_ms), 1),
            "augment_ms": round(statistics.median(augment_ms), 1),
            "deep_supervision_ms": round(statistics.median(ds_ms), 2)}


def spatial_cost(config: Configuration, repeats: int) -> dict[str, object]:
    """Spatial transform per sample with rotation and scaling always on: our initial patch vs nnU-Net's."""
    only_spatial = AugmentationSettings(p_rotation=1.0, p_scale=1.0, p_noise=0, p_blur=0, p_brightness=0,
                                        p_contrast=0, p_low_res=0, p_gamma=0, p_gamma_inverted=0, mirror=False)
    augmenter = Augmenter(config, only_spatial)
    spatial = augmenter.transforms.transforms[0]
    rng = np.random.default_rng(0)
    out: dict[str, object] = {}
    # nnU-Net's get_patch_size for 40×56×40 at ±30°, divided by 0.85: 73×80×64.
    for name, size in (("ours", augmenter.initial_patch_size), ("nnunet", (73, 80, 64))):
        data = rng.normal(size=(1, 1, *size)).astype(np.float32)
        seg = rng.integers(0, 3, size=(1, 1, *size)).astype(np.float32)
        times = []
        with GlobalRandomState(0):
            for _ in range(repeats):
                t0 = time.perf_counter()
                spatial(data=data, seg=seg)
                times.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"initial_patch": list(size), "ms_per_sample": round(statistics.median(times), 1)}
    return out


def torch_step(seconds: float) -> tuple[Callable[[], None], int]:
    """A compute loop of about ``seconds`` alone (matmuls on every torch thread), like a CPU training step."""
    import torch

    a = torch.randn(768, 768)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a @ a
        n += 1
    reps = max(1, int(n * seconds / (time.perf_counter() - start)))

    def step() -> None:
        for _ in range(reps):
            a @ a

    return step, reps


def measure(
    cases: list, config: Configuration, workers: int, batches: int, step: Callable[[], None] | None
) -> dict[str, object]:
    start = time.perf_counter()
    with BatchLoader(cases, config, augment=True, seed=0, workers=workers, timeout_s=600) as loader:
        next(loader)  # start-up (process spawn, imports) excluded from the rate
        first = time.perf_counter() - start
        waits, t0 = [], time.perf_counter()
        for _ in range(batches):
            waits.append(next(loader).wait_s)
        elapsed = time.perf_counter() - t0
        result: dict[str, object] = {
            "workers": workers,
            "first_batch_s": round(first, 2),
            "batches_per_s": round(batches / elapsed, 2),
            "ms_per_batch": round(elapsed / batches * 1e3, 1),
            "consumer_wait_ms_median": round(statistics.median(waits) * 1e3, 1),
        }
        if step is not None:
            steps, waits, t0 = [], [], time.perf_counter()
            for _ in range(max(5, batches // 2)):
                batch = next(loader)
                waits.append(batch.wait_s)
                s0 = time.perf_counter()
                step()
                steps.append(time.perf_counter() - s0)
            total = time.perf_counter() - t0
            result["with_step"] = {
                "step_s_median": round(statistics.median(steps), 3),
                "wait_s_median": round(statistics.median(waits), 3),
                "iteration_s": round(total / len(steps), 3),
                "wait_fraction": round(sum(waits) / total, 3),
            }
        result["worker_peak_rss_mb"] = [_peak_rss_mb(p.pid) for p in loader.processes]
    return result


def _peak_rss_mb(pid: int | None) -> float | None:
    # VmHWM: the process's peak resident set so far (Linux; None elsewhere).
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a preprocessed configuration folder (default: synthetic)")
    parser.add_argument("--plans", type=Path, help="plans.yaml for --data")
    parser.add_argument("--config", default="3d_fullres", help="configuration name in --plans")
    parser.add_argument("--cases", type=int, default=20, help="synthetic cases")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step-s", type=float, default=1.0,
                        help="also time batches interleaved with a torch compute step of about this long (0: off)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is not None:
            if args.plans is None:
                sys.exit("--data needs --plans (the plans.yaml the data was preprocessed with)")
            from autoseg.plans import load

            config = load(args.plans).configuration(args.config)
            if args.batch_size:
                config = dataclasses.replace(config, batch_size=args.batch_size)
            folder = args.data
        else:
            config = hippocampus_config(args.batch_size)
            folder = Path(tmp) / "preprocessed" / "3d_fullres"
            write_synthetic(folder, args.cases)
        cases = load_cases(folder)
        # Calibrated once, before any worker exists, so every run does the same work.
        step = torch_step(args.step_s)[0] if args.step_s > 0 else None
        runs = [measure(cases, config, w, args.batches, step) for w in args.workers]
        report = {
            "benchmark": "data loader (sample + augment + deep-supervision targets + tensors)",
            "data": str(args.data) if args.data else f"synthetic, {args.cases} cases of ~36x50x35",
            "patch_size": list(config.patch_size),
            "initial_patch_size": list(Augmenter(config).initial_patch_size),
            "batch_size": config.batch_size,
            "stages_in_process": stage_times(cases, config, repeats=max(5, args.batches // 2)),
            "spatial_transform_always_on": spatial_cost(config, repeats=10) if config.patch_size == (40, 56, 40) else None,
            "runs": runs,
            # ru_maxrss is in KiB on Linux.
            "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
