"""Device selection shared by training and prediction."""

from __future__ import annotations

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
