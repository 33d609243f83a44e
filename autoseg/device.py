"""Device selection shared by training and prediction."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> "torch.device":
    """``auto`` -> CUDA if available, else CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Shared by training and prediction; imports torch only when called.

    Raises:
        ConfigError: an unknown or unavailable device.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


#: Tasks whose CPU training ``--precision auto`` runs in bf16 (measured: segmentation).
CPU_BF16_TASKS = frozenset({"segmentation"})


def auto_cpu_bf16(task: str, flags: frozenset[str]) -> bool:
    """Whether ``train --precision auto`` trains ``task`` in bf16 on a CPU with these flags: AMX
    only (where it was measured; :mod:`autoseg.training.precision`)."""
    return task in CPU_BF16_TASKS and "amx_bf16" in flags


def has_bf16_units(flags: frozenset[str]) -> bool:
    """Whether the CPU computes bf16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16 is
    emulated and slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)
