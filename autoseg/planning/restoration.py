"""What the planner does differently for restoration (denoising, super-resolution): the invertible
normalisation, the outputs, and the notes that say why (pure, torch-free).

Super-resolution is planned as denoising on the targets' grid: the fingerprint's spacing and shapes
are the targets' and it records the refinement (``upsample_factor``), which plans.yaml keeps.

The memory model, spacing, patch, batch, topology and the 2d / 2.5d / 3d_fullres configurations
are segmentation's (:mod:`autoseg.planning.planner`); the network has one output per input channel
and no cascade is planned. The task itself (loss, network head, export) is
:class:`autoseg.tasks.restoration.Denoise`, above the planner.
"""

from __future__ import annotations

import math

from autoseg.dataset.fingerprint import Fingerprint
from autoseg.dataset.restoration import BODY_HU, is_ct_channel
from autoseg.errors import PlanError
from autoseg.plans import Normalization


def restoration_normalization(fp: Fingerprint) -> tuple[Normalization, ...]:
    """``linear`` per channel: ``(x - mean) / std`` with the mean and std of the inputs' body voxels
    (the fingerprint's intensity statistics of a restoration dataset), no clipping.

    Segmentation's CT scheme clips to the foreground's 0.5-99.5 percentiles, which would flatten
    air and bone for good; restoration must give them back, so its normalisation is exactly
    invertible, and the target is normalised with its input channel's numbers.

    Raises:
        PlanError: a channel has no body voxels.
    """
    result = []
    for index, (name, stats) in enumerate(zip(fp.channel_names, fp.intensity)):
        if stats.n == 0 or stats.mean is None or not math.isfinite(stats.mean):
            raise PlanError(f"channel {index} ({name}): no body voxels to compute its mean and std; run "
                            "'autoseg check' on the dataset")
        # A constant body (a phantom of one value) has std 0: 1 keeps the scheme invertible.
        std = float(stats.std) if stats.std is not None and math.isfinite(stats.std) and stats.std > 0 else 1.0
        result.append(Normalization("linear", False, None, float(stats.mean), std))
    return tuple(result)


def restoration_notes(fp: Fingerprint, normalization: tuple[Normalization, ...]) -> list[str]:
    """What the plan table says about a restoration plan and why."""
    notes = []
    for index, (name, norm) in enumerate(zip(fp.channel_names, normalization)):
        body = f"body voxels (> {BODY_HU:g} HU, lungs filled in)" if is_ct_channel(name) else "nonzero voxels"
        notes.append(f"{fp.task}: channel {index} ({name}) normalised as (x - {norm.mean:.4g}) / {norm.std:.4g}, the "
                     f"mean and std of the inputs' {body}, without clipping: invertible, so air, soft tissue and "
                     "bone come back with their values; targets use the input channel's numbers")
    notes.append(f"{fp.task}: residual U-Net (output = input + correction), one output per input channel, no "
                 "softmax, no deep supervision, L1 loss (train --loss mse for MSE); patches centred uniformly on "
                 "the body; augmentation: flips and 90° in-plane rotations only (no intensity changes, no "
                 "interpolation)")
    if fp.upsample_factor is not None:
        notes.append(f"{fp.task}: planned on the targets' grid; each input is refined ×{list(fp.upsample_factor)} "
                     "(z, y, x as read) onto it by cubic interpolation (same extent, the thick-slices convention), "
                     "then trained and predicted as denoising: the network learns what the interpolation misses")
    what = "the missing detail" if fp.upsample_factor is not None else "the noise"
    notes.append(f"3d_lowres / 3d_cascade_fullres: not planned for {fp.task} ({what} lives at full resolution, "
                 "which a coarse first stage never sees)")
    return notes
