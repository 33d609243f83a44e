"""Where a training iteration's time goes: one configuration's step taken apart on this machine.

    python benchmarks/profile_train_step.py WORK [-c 3d_fullres] [--repeats 4]

Builds the trainer's network, loss and optimiser for the configuration (plans.yaml) and times,
on one fixed batch, each part of ``autoseg.training.trainer``'s step: the batch (sampling and
augmentation, ``BatchProducer.next``), forward, loss (deep supervision), backward, gradient
clipping and the optimiser step; then the same step in variants — without the deep-supervision
heads' loss, NCDHW instead of channels-last, bf16 autocast — and the arithmetic floor (FLOPs of
forward + backward ÷ this machine's measured convolution rate). Prints JSON. Medians over
``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("-c", "--config", default="3d_fullres")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    import numpy as np
    import torch

    from autoseg import plans as plans_io
    from autoseg.data import BatchProducer, load_cases
    from autoseg.networks import build_network, conv_flops
    from autoseg.tasks import get_task
    from autoseg.training.losses import DeepSupervisionLoss
    from bench_train import conv_throughput_gflops

    plans = plans_io.load(args.work / "plans.yaml")
    config = plans.configuration(args.config)
    task = get_task(plans.task, plans.labels)
    cases = load_cases(args.work / "preprocessed" / args.config)
    producer = BatchProducer(cases, config, np.random.SeedSequence(0), augment=True)
    batch = producer.next()
    n_outputs = config.topology.num_stages - 1

    def timed(fn, repeats: int = args.repeats) -> float:
        fn()
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            values.append(time.perf_counter() - start)
        return statistics.median(values)

    result: dict = {"configuration": args.config, "patch_size": list(config.patch_size),
                    "batch_size": config.batch_size, "features": list(config.topology.features_per_stage),
                    "threads": torch.get_num_threads()}
    result["batch_s"] = round(timed(producer.next), 3)

    def variant(channels_last: bool, bf16: bool, deep_supervision_loss: bool) -> dict[str, float]:
        torch.manual_seed(0)
        fmt = torch.channels_last_3d if channels_last and config.dims == 3 else torch.contiguous_format
        net = build_network(config.topology, config.input_channels, task.num_outputs, deep_supervision=True)
        net = net.to(memory_format=fmt)
        base_loss = task.make_loss(batch_dice=True)
        loss_fn = DeepSupervisionLoss(base_loss, n_outputs) if deep_supervision_loss else None
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
        image = torch.from_numpy(batch["image"]).contiguous(memory_format=fmt)
        targets = [torch.from_numpy(t) for t in batch["target"]]
        if not deep_supervision_loss:
            targets = targets[:1]
        parts: dict[str, list[float]] = {k: [] for k in ("forward", "loss", "backward", "clip", "optimizer")}

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = net(image)
                t1 = time.perf_counter()
                loss = loss_fn(outputs, targets) if loss_fn is not None else base_loss(outputs[0], targets[0])
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            t4 = time.perf_counter()
            optimizer.step()
            t5 = time.perf_counter()
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[key].append(value)

        step()
        for values in parts.values():
            values.clear()
        for _ in range(args.repeats):
            step()
        out = {k: round(statistics.median(v), 3) for k, v in parts.items()}
        out["step"] = round(sum(out.values()), 3)
        return out

    result["step_channels_last_fp32"] = variant(True, False, True)
    result["step_channels_last_fp32_no_ds_loss"] = variant(True, False, False)
    result["step_ncdhw_fp32"] = variant(False, False, True)
    result["step_channels_last_bf16"] = variant(True, True, True)
    forward = conv_flops(config.topology, config.patch_size, config.input_channels, task.num_outputs)
    flops = 3 * forward * config.batch_size
    rate = conv_throughput_gflops(channels_last=config.dims == 3)
    result["floor_s"] = round(flops / (rate * 1e9), 3)
    result["conv_gflops_fwd_bwd"] = round(rate, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
