"""Restoration's losses and online metric (torch): L1 or MSE between the restored and the clean
patch, and the windowed squared errors behind the per-epoch PSNR."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from autoseg.errors import UnknownNameError


class _FloatLoss(nn.Module):
    """A pixel-wise loss computed in float32 (under autocast the output may be bf16/fp16)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output.float(), target.float())


#: The losses ``autoseg train --loss`` offers for restoration. L1 is the default: it is what the
#: strongest LDCT denoisers train with and keeps edges sharper than MSE, whose optimum is the
#: conditional mean and blurs what the network cannot decide (Zhao et al., IEEE TCI 3(1), 2017,
#: "Loss functions for image restoration with neural networks"); MSE optimises PSNR directly.
LOSSES: dict[str, type[nn.Module]] = {"l1": nn.L1Loss, "mse": nn.MSELoss}
DEFAULT_LOSS = "l1"


def make_loss(name: str | None = None) -> nn.Module:
    """The restoration loss called ``name`` (None: :data:`DEFAULT_LOSS`).

    Raises:
        UnknownNameError: not one of :data:`LOSSES` (with a did-you-mean).
    """
    name = DEFAULT_LOSS if name is None else name
    if name not in LOSSES:
        raise UnknownNameError("restoration loss", name, LOSSES, "--loss")
    return _FloatLoss(LOSSES[name]())


@torch.no_grad()
def windowed_squared_errors(output: torch.Tensor, target: torch.Tensor, means: Sequence[float],
                            stds: Sequence[float], windows: Sequence[Sequence[float]]) -> np.ndarray:
    """Per channel, the summed squared error of the un-normalised, window-clipped images and the
    number of voxels: ``[sse_0, ..., sse_C-1, n_0, ..., n_C-1]`` (float64, additive over batches).

    Args:
        output, target: ``(B, C, *spatial)`` on the normalised scale.
        means, stds: the ``linear`` normalisation of each channel (its inverse gives HU for CT).
        windows: the ``[low, high]`` window of each channel, in its original units.
    """
    sse, count = [], []
    for c, (mean, std, window) in enumerate(zip(means, stds, windows)):
        restored = (output[:, c].float() * std + mean).clamp_(window[0], window[1])
        clean = (target[:, c].float() * std + mean).clamp_(window[0], window[1])
        sse.append(float(((restored - clean) ** 2).sum(dtype=torch.float64)))
        count.append(float(restored.numel()))
    return np.array(sse + count, dtype=np.float64)
