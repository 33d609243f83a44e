"""Losses: soft Dice + cross-entropy with deep supervision (nnU-Net's defaults)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Dice smoothing (nnU-Net v2's MemoryEfficientSoftDiceLoss uses 1e-5).
DICE_SMOOTH = 1e-5


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True,
                   smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Negative mean soft Dice over the foreground classes.

    Args:
        logits: (B, K, *spatial) network output.
        target: (B, 1, *spatial) or (B, *spatial) integer labels in 0..K-1.
        batch_dice: pool the statistics over the batch (nnU-Net's default for its configurations).
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = torch.zeros_like(probs)
    foreground = target > 0
    # scatter only foreground: class c (1..K-1) goes to channel c-1
    index = (target.long() - 1).clamp(min=0).unsqueeze(1)
    onehot.scatter_(1, index, foreground.unsqueeze(1).to(onehot.dtype))
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersect = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    dice = (2 * intersect + smooth) / (denominator + smooth).clamp(min=1e-8)
    return -dice.mean()


class DiceCELoss(nn.Module):
    """Cross-entropy + soft Dice, each with weight 1 (nnU-Net's DC_and_CE_loss)."""

    def __init__(self, batch_dice: bool = True) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0] if target.ndim == logits.ndim else target
        return self.ce(logits, labels.long()) + soft_dice_loss(logits, labels, self.batch_dice)


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
