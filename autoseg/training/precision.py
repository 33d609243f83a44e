"""The numeric precision of the training step: float32, or autocast to bfloat16 / float16.

``auto``: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling), as nnU-Net
does; on a CPU with AMX tiles (Intel Sapphire Rapids and later) bfloat16 autocast for segmentation,
where a step of nnU-Net's OpenKBP plan takes 0.53x the float32 time and the Hippocampus default
plan's 0.63x, at the same Dice (benchmarks/README.md, "Training in bf16 on the CPU"; the
channels-last instance norm of :mod:`autoseg.networks.norm` keeps the layout under autocast);
float32 everywhere else. Restoration and super-resolution stay float32 on the CPU (a regression's
output resolution is not measured in bf16 here), and so do CPUs with AVX-512 BF16 but no AMX
(not measured); ``bf16`` asks for it on any CPU with bf16 units, ``fp32`` turns autocast off.

The time-budget planner's rates are float32 ones: in bf16 the budget buys more iterations than the
plan's table says, never fewer (the training runs on elapsed time).

A fold keeps its precision: the checkpoint records the resolved one and ``--resume`` refuses to
continue it in another (:func:`resume_check`).
"""

from __future__ import annotations

import torch

from autoseg.device import auto_cpu_bf16, cpu_flags, has_bf16_units
from autoseg.errors import ConfigError
from autoseg.training.config import TrainConfig

_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
#: The ``--precision`` that resumes a fold trained at each resolved precision.
_FLAG_FOR = {"fp32": "fp32", "bf16 autocast": "bf16", "fp16 autocast": "auto"}


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16 autocast`` or ``fp16 autocast`` (train_config.yaml's ``resolved.precision``)."""
    return _NAMES[dtype]


def step_dtype(device: torch.device, cfg: TrainConfig, task: str = "segmentation") -> torch.dtype | None:
    """The autocast dtype of the training step on ``device`` for ``task``, or None for float32.

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
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and auto_cpu_bf16(task, cpu_flags()) else None
    if device.type != "cpu":
        raise ConfigError(f"--precision bf16: not supported on {device.type}; use --precision auto")
    if not has_bf16_units(cpu_flags()):
        raise ConfigError("--precision bf16: this CPU has no bf16 units (AMX or AVX-512 BF16), where bf16 is "
                          "slower than fp32; use --precision auto")
    return torch.bfloat16


def resume_check(saved: dict, resolved: str, device: torch.device) -> str | None:
    """Why a checkpoint cannot be resumed at the ``resolved`` precision, or None when it can.

    ``saved`` is the checkpoint: ``precision_resolved`` where it records one; before that, a CPU
    fold's flag says it (``auto`` trained in float32 on the CPU then), a CUDA fold's is not checked.
    """
    before = saved.get("precision_resolved")
    if before is None:
        flag = saved.get("precision", "auto")
        if flag == "bf16":
            before = "bf16 autocast"
        elif flag == "fp32" or device.type == "cpu":
            before = "fp32"
    if before is None or before == resolved:
        return None
    return (f"this fold trained in {before} and would go on in {resolved}; resume with "
            f"--precision {_FLAG_FOR.get(before, 'auto')}")
