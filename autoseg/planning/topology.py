"""U-Net topology from spacing and patch size, and an analytic memory estimate (torch-free).

The rules are nnU-Net v2's (``get_pool_and_conv_props``): pool an axis while its feature map is at
least ``2 * min_edge`` voxels (``3 * min_edge`` if it is the only axis left) and its spacing is
within 2x of the finest; a kernel is 1 on an axis until that axis' spacing comes within 2x of the
finest, then 3. The bottleneck always uses 3s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.plans import Topology


def pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[int], min_edge: int
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Strides and kernels for a patch, and the patch padded to a valid size.

    Returns:
        ``(strides, kernel_sizes, patch_size, divisor)``: one stride and kernel per stage (stage 0
        has stride 1), the patch rounded up to a multiple of ``divisor`` (2^pools per axis).
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        finest_all = min(current_spacing)
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / finest_all < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**p for p in pools]
    padded = [int(s) if s % d == 0 else int(s + d - s % d) for s, d in zip(patch_size, divisor)]
    return strides, kernels, padded, divisor


def features_per_stage(num_stages: int, base: int, maximum: int) -> tuple[int, ...]:
    """``base * 2**i`` capped at ``maximum`` (nnU-Net: 32 .. 320 in 3D, 512 in 2D)."""
    return tuple(min(maximum, base * 2**i) for i in range(num_stages))


def stage_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Feature-map size at each stage (integer division, as strided convolutions give)."""
    sizes = []
    size = list(patch_size)
    for stride in strides:
        size = [s // st for s, st in zip(size, stride)]
        sizes.append(size)
    return sizes


def estimate_feature_map_units(
    patch_size: Sequence[int], topology: Topology, num_classes: int, deep_supervision: bool = False
) -> int:
    """Sum of the output sizes (channels x voxels) of every convolution, per sample.

    This is the quantity nnU-Net's ``compute_conv_feature_map_size`` returns (and what its memory
    references are calibrated on): encoder convolutions (and residual-block shortcut projections),
    decoder transposed convolutions and convolutions, and the segmentation head(s).
    """
    sizes = stage_sizes(patch_size, topology.strides)
    vox = [math.prod(s) for s in sizes]
    features = topology.features_per_stage
    total = 0
    if topology.residual_encoder:
        total += features[0] * math.prod(patch_size)  # stem convolution
        in_channels = features[0]
        for s, (n_blocks, f) in enumerate(zip(topology.blocks_per_stage, features)):
            # First block: two convs at the strided size, plus a 1x1 projection if channels or size change.
            projection = in_channels != f or any(st != 1 for st in topology.strides[s])
            total += (2 + int(projection)) * f * vox[s]
            total += (n_blocks - 1) * 2 * f * vox[s]
            in_channels = f
    else:
        for s, (n_convs, f) in enumerate(zip(topology.blocks_per_stage, features)):
            total += n_convs * f * vox[s]
    n = topology.num_stages
    for d in range(n - 1):
        level = n - 2 - d  # decoder stage d works at encoder stage `level`'s resolution
        f = features[level]
        total += topology.decoder_blocks_per_stage[d] * f * vox[level]  # convolutions
        total += f * vox[level]  # transposed convolution
        if deep_supervision or d == n - 2:
            total += num_classes * vox[level]
    return int(total)
