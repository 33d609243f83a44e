"""Deep supervision: a task's loss applied to every decoder output against its downsampled target.

The task's own loss (segmentation: :mod:`autoseg.tasks.segmentation_loss`) comes from
:meth:`autoseg.tasks.Task.make_loss`; this wrapper is the same for every task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """1/2^i per output (highest resolution first), the lowest resolution nearly off, normalised.

    nnU-Net sets the lowest output's weight to 0; a tiny weight instead keeps every parameter in
    the graph, which DDP requires (nnU-Net does the same under DDP).
    """
    weights = [1.0 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 1e-6
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """A loss applied to every deep-supervision output against its downsampled target."""

    def __init__(self, loss: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(n_outputs)

    def forward(self, outputs: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            target = targets if isinstance(targets, torch.Tensor) else targets[0]
            return self.loss(outputs, target)
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} deep-supervision outputs but {len(targets)} targets")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output, target in zip(self.weights, outputs, targets):
            if weight > 0:
                total = total + weight * self.loss(output, target)
        return total
