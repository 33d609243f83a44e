"""This machine's convolution rate, measured once and cached: the input of the planner's compute
model (:mod:`autoseg.planning.compute`).

The representative convolution is the default network's first stage (32 -> 32 channels, 3^3
kernel, a 2 x 40x56x40 batch; channels-last on the CPU, as training runs it; under the training's
mixed precision on CUDA), timed forward + backward for training and forward alone for prediction,
for about a second each after a warm-up.
The result is cached per device, CPU count and torch version in
``$XDG_CACHE_HOME/autoseg/throughput.json`` (``~/.cache``), so planning twice on one machine gives
the same plans; ``--throughput GFLOPS`` replaces the measurement (and the cache) altogether.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.atomic import write_text

if TYPE_CHECKING:
    from autoseg.planning.compute import Throughput

#: The representative convolution: channels, kernel, batch, spatial size.
CHANNELS, KERNEL, BATCH, SIZE = 32, 3, 2, (40, 56, 40)
#: Seconds of timed calls per measurement (after one warm-up call).
MEASURE_S = 1.0


def cache_file() -> Path:
    """``$XDG_CACHE_HOME/autoseg/throughput.json`` (``~/.cache/autoseg/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoseg" / "throughput.json"


def device_key(device: str) -> str:
    """What a measurement holds for: the device, the CPU count and torch's version (for the CPU
    without importing torch, so a cached plan needs no torch start-up). Thread limits
    (``OMP_NUM_THREADS``, taskset, cgroups) are not in it: plan with ``--throughput`` there."""
    from importlib.metadata import version

    if device.startswith("cuda"):
        import torch

        # "mixed precision": the rate is measured under autocast (an older fp32 entry is not reused).
        name = f"{torch.cuda.get_device_name(torch.device(device))}, mixed precision"
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} CPUs"
    return f"{device.split(':')[0]}: {name}, torch {version('torch')}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(device: str = "cpu") -> tuple[float, float]:
    """Training (forward + backward) and forward GFLOP/s of the representative convolution."""
    import torch

    dev = torch.device(device)
    layout = torch.channels_last_3d if dev.type == "cpu" else torch.contiguous_format
    conv = torch.nn.Conv3d(CHANNELS, CHANNELS, KERNEL, padding=KERNEL // 2).to(dev, memory_format=layout)
    x = torch.randn(BATCH, CHANNELS, *SIZE, device=dev).contiguous(memory_format=layout).requires_grad_()
    flops = 2 * CHANNELS * CHANNELS * KERNEL**3 * BATCH * SIZE[0] * SIZE[1] * SIZE[2]

    def rate(step, factor: float) -> float:  # noqa: ANN001
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < MEASURE_S:
            step()
            calls += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return factor * flops * calls / (time.perf_counter() - start) / 1e9

    # On CUDA training and prediction run under mixed precision (bf16 where supported, else fp16:
    # autoseg.training.trainer); the rate is measured the same way, or a GPU plan would be sized on
    # fp32 convolutions several times slower than the ones it gets.
    amp = None
    if dev.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def train_step() -> None:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            out = conv(x).float().sum()
        out.backward()

    def forward_step() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            conv(x)

    return rate(train_step, 3.0), rate(forward_step, 1.0)


def machine_rates(device: str = "cpu", *, refresh: bool = False) -> tuple[float, float, str, str]:
    """The cached measurement for ``device`` (measured and cached on first use, or with ``refresh``).

    Returns:
        Training and forward GFLOP/s, what was measured (:func:`device_key`), and when and where
        it is cached.
    """
    key = device_key(device)
    path = cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    if refresh or not _valid(entry):
        train, infer = measure(device)
        entry = {"train_gflops": round(train, 1), "infer_gflops": round(infer, 1),
                 "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        cached[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(cached, indent=2, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home: measure again next time
    return (float(entry["train_gflops"]), float(entry["infer_gflops"]), key,
            f"measured {entry.get('measured', '?')}, cached in {path}")


def machine_throughput(device: str = "cpu") -> Throughput:
    """:func:`machine_rates` as the planner's :class:`~autoseg.planning.compute.Throughput`."""
    from autoseg.planning.compute import Throughput

    train, infer, key, source = machine_rates(device)
    return Throughput(train, infer, key, source)


def _valid(entry: object) -> bool:
    """A cache entry with two finite positive rates (anything else is measured again)."""
    import math

    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
        and math.isfinite(entry[k]) and entry[k] > 0 for k in ("train_gflops", "infer_gflops"))


__all__ = ["cache_file", "device_key", "machine_rates", "machine_throughput", "measure"]
