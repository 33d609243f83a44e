"""Benchmark: training throughput of one configuration on preprocessed data, and its arithmetic floor.

    python benchmarks/bench_train.py WORK [-c 3d_fullres] [--iters 6] [--workers 0] [--batch-size B]
                                     [--preset-features default] [--device cpu] [--precision auto|fp32|bf16]

WORK must be planned (``autoseg plan``); it is preprocessed first if needed. Runs one epoch of
``--iters`` training iterations (no validation) through the real trainer (sampler, augmentation,
network, loss, optimiser), skips the first iteration as warm-up, and prints JSON: seconds per
iteration, samples/s, the fraction of step time spent waiting for data, peak RSS, and the
arithmetic floor = FLOPs per iteration (forward + backward ≈ 3 × forward) / measured convolution
throughput of this machine. When the step runs under bfloat16 autocast (``--precision bf16``, or
``auto`` on a CPU with AMX: ``precision_resolved`` says which) the floor is given twice: at the
float32 rate and at the bfloat16 rate of the same convolution.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def conv_throughput_gflops(channels_last: bool, seconds: float = 3.0, bf16: bool = False) -> float:
    """Measured forward+backward GFLOP/s of a representative 3D convolution (32->32, 3^3, 40x56x40),
    in float32 or under CPU bfloat16 autocast."""
    import torch

    x = torch.randn(2, 32, 40, 56, 40, requires_grad=True)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        conv = conv.to(memory_format=torch.channels_last_3d)
    flops = 2 * 32 * 32 * 27 * 40 * 56 * 40 * 2 * 3  # 2*MACs, batch 2, fwd + 2x bwd
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().sum().backward()

    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("-c", "--config", default="3d_fullres")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--keep", action="store_true",
                        help="train into WORK/models (fold 0's checkpoints kept, e.g. to predict with) instead of a scratch copy")
    parser.add_argument("--json-line", action="store_true",
                        help="also print the result as one 'BENCH_RESULT {json}' line (benchmarks/bench_vs_nnunet.py)")
    args = parser.parse_args()

    from autoseg import plans as plans_io
    from autoseg.networks import conv_flops
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig

    plans = plans_io.load(args.work / "plans.yaml")
    config = plans.configuration(args.config)
    batch = args.batch_size or config.batch_size
    cfg = TrainConfig(epochs=1, iters_per_epoch=args.iters, val_iters=0, device=args.device,
                      workers=args.workers, batch_size=batch, channels_last=not args.no_channels_last,
                      precision=args.precision)
    per_iteration: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Train in a scratch copy of the models folder so the benchmark never touches real runs.
        from autoseg.training.trainer import Callbacks

        stamps: list[float] = []
        callbacks = Callbacks(on_iteration=lambda it, loss: stamps.append(time.perf_counter()))
        import autoseg.training.run as run_module

        original = run_module.fold_folder
        if not args.keep:
            run_module.fold_folder = lambda work, c, f: Path(tmp) / c / f"fold_{f}"
        try:
            start = time.perf_counter()
            results = training.run(args.work, args.config, "0", cfg, callbacks_for=lambda fold: callbacks,
                                   validate=False)
            wall = time.perf_counter() - start
        finally:
            run_module.fold_folder = original
    per_iteration = [b - a for a, b in zip(stamps, stamps[1:])]
    record = results[0].state.history[0]
    s_per_it = sum(per_iteration) / len(per_iteration)
    forward = conv_flops(config.topology, config.patch_size, config.input_channels, plans.num_classes)
    flops_per_it = 3 * forward * batch
    gflops = conv_throughput_gflops(channels_last=not args.no_channels_last and config.dims == 3)
    result = {
        "benchmark": "training throughput",
        "configuration": args.config,
        "patch_size": list(config.patch_size),
        "batch_size": batch,
        "features": list(config.topology.features_per_stage),
        "workers": args.workers,
        "device": args.device,
        "precision": args.precision,
        "iterations_timed": len(per_iteration),
        "s_per_it": round(s_per_it, 3),
        "s_per_it_each": [round(t, 3) for t in per_iteration],
        "samples_per_s": round(batch / s_per_it, 3),
        "data_wait_fraction_epoch": record["data_wait_fraction"],
        "flops_per_it_tflop": round(flops_per_it / 1e12, 4),
        "measured_conv_gflops_fwd_bwd": round(gflops, 1),
        "arithmetic_floor_s_per_it": round(flops_per_it / (gflops * 1e9), 3),
        "wall_s_including_setup": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    import torch

    from autoseg.training.precision import precision_name, step_dtype

    result["precision_resolved"] = precision_name(step_dtype(torch.device(args.device), cfg, plans.task))
    if result["precision_resolved"] == "bf16 autocast" and args.device == "cpu":  # also --precision auto on AMX
        bf16_rate = conv_throughput_gflops(channels_last=not args.no_channels_last and config.dims == 3, bf16=True)
        result["measured_conv_gflops_fwd_bwd_bf16"] = round(bf16_rate, 1)
        result["arithmetic_floor_s_per_it_bf16"] = round(flops_per_it / (bf16_rate * 1e9), 3)
    print(json.dumps(result, indent=2))
    if args.json_line:
        print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
