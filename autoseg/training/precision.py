"""The numeric precision of the training step: float32, or autocast to bfloat16 / float16.

``auto`` keeps the long-standing behaviour: mixed precision on CUDA (bf16 where supported, else
fp16 with loss scaling), float32 elsewhere. ``bf16`` also turns bfloat16 autocast on for a CPU
with bf16 units (AMX or AVX-512 BF16): there a step of nnU-Net's OpenKBP plan and of the
Hippocampus default plan takes well under the float32 time (benchmarks/README.md, "Training in
bf16 on the CPU"), with the channels-last instance norm (:mod:`autoseg.networks.norm`) keeping
the layout under autocast. It is not the CPU default because the time-budget planner's rates
are float32 ones.
"""

from __future__ import annotations

import torch

from autoseg.device import cpu_flags, has_bf16_units
from autoseg.errors import ConfigError
from autoseg.training.config import TrainConfig

_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16 autocast`` or ``fp16 autocast`` (train_config.yaml's ``resolved.precision``)."""
    return _NAMES[dtype]


def step_dtype(device: torch.device, cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of the training step on ``device``, or None for float32.

    Raises:
        ConfigError: bf16 asked for where there are no bf16 units (the message says what to use).
    """
    if cfg.precision == "fp32" or not cfg.amp:
        return None
    if device.type == "cuda":
        if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                              "use --precision auto (fp16 with loss scaling)")
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.precision != "bf16":
        return None
    if device.type != "cpu":
        raise ConfigError(f"--precision bf16: not supported on {device.type}; use --precision auto")
    if not has_bf16_units(cpu_flags()):
        raise ConfigError("--precision bf16: this CPU has no bf16 units (AMX or AVX-512 BF16), where bf16 is "
                          "slower than fp32; use --precision auto")
    return torch.bfloat16
