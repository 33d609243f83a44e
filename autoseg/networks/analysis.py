"""Torch-free facts about a :class:`~autoseg.plans.Topology`: validity, input multiple, FLOPs.

Kept free of torch so that benchmarks and reports can compute them without importing it; the
network in :mod:`autoseg.networks.unet` uses the same checks. The layer-by-layer walk below
mirrors the modules :func:`autoseg.networks.unet.build_network` creates, and
``tests/test_networks.py`` holds it to a count taken from forward hooks on the real modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.plans import Topology


def validate_topology(topology: Topology) -> None:
    """Check that a topology's per-stage lists are consistent with each other.

    :func:`autoseg.plans.load` checks the same for plans read from disk; this covers topologies
    built in code.

    Raises:
        ValueError: a list has the wrong length, an entry the wrong number of axes, or a value
            is not positive.
    """
    n = topology.num_stages
    if n < 1:
        raise ValueError("topology has no stages: features_per_stage is empty")
    dims = topology.dims
    if dims not in (2, 3):
        raise ValueError(f"topology kernel_sizes[0] has {dims} axes; only 2D and 3D networks exist")
    for key in ("strides", "kernel_sizes", "blocks_per_stage"):
        if len(getattr(topology, key)) != n:
            raise ValueError(f"topology.{key} has {len(getattr(topology, key))} entries; "
                             f"features_per_stage has {n} (one per stage)")
    if len(topology.decoder_blocks_per_stage) != n - 1:
        raise ValueError(f"topology.decoder_blocks_per_stage has {len(topology.decoder_blocks_per_stage)} "
                         f"entries; a {n}-stage encoder has {n - 1} decoder stages")
    for key in ("strides", "kernel_sizes"):
        for i, entry in enumerate(getattr(topology, key)):
            if len(entry) != dims:
                raise ValueError(f"topology.{key}[{i}] = {list(entry)} has {len(entry)} axes, expected {dims}")
            if any(v < 1 for v in entry):
                raise ValueError(f"topology.{key}[{i}] = {list(entry)} must be positive")
    for i, kernel in enumerate(topology.kernel_sizes):
        if any(k % 2 == 0 for k in kernel):
            # 'same' padding k // 2 only keeps the size for odd kernels.
            raise ValueError(f"topology.kernel_sizes[{i}] = {list(kernel)}: kernels must be odd")
    if any(f < 1 for f in topology.features_per_stage):
        raise ValueError(f"topology.features_per_stage {list(topology.features_per_stage)} must be positive")
    if any(b < 1 for b in topology.blocks_per_stage) or any(b < 1 for b in topology.decoder_blocks_per_stage):
        raise ValueError("topology.blocks_per_stage and decoder_blocks_per_stage must be at least 1 per stage")


def input_multiple(topology: Topology) -> tuple[int, ...]:
    """The product of the strides per axis: every input size must be a multiple of it."""
    divisor = [1] * topology.dims
    for stride in topology.strides:
        divisor = [d * s for d, s in zip(divisor, stride)]
    return tuple(divisor)


def check_spatial_size(size: Sequence[int], topology: Topology) -> None:
    """Raise unless ``size`` can pass through the network's strides and back unchanged.

    Raises:
        ValueError: wrong number of axes, or a size that is not a multiple of the product of
            that axis' strides (the message names both and suggests a padded size).
    """
    size = tuple(int(s) for s in size)
    multiple = input_multiple(topology)
    if len(size) != len(multiple):
        raise ValueError(f"input spatial size {size} has {len(size)} axes; this {len(multiple)}D network "
                         f"needs {len(multiple)}")
    bad = [axis for axis, (s, m) in enumerate(zip(size, multiple)) if s < 1 or s % m]
    if bad:
        padded = tuple(max(m, math.ceil(s / m) * m) for s, m in zip(size, multiple))
        axes = ", ".join(f"axis {a} size {size[a]} needs a multiple of {multiple[a]}" for a in bad)
        raise ValueError(f"input spatial size {size} is not divisible by {multiple} (the product of the "
                         f"strides per axis): {axes}; pad the input to {padded}")


def conv_flops(
    topology: Topology,
    patch_size: Sequence[int],
    in_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
) -> float:
    """Forward FLOPs per sample of every convolution in the network, counted as 2 x MACs.

    Counts the encoder convolutions (and, with a residual encoder, the stem and the 1x1 shortcut
    projections), the decoder's transposed and plain convolutions and the segmentation head(s).
    Biases, normalisation, activations, pooling and concatenation are left out: they are
    memory-bound and small next to the convolutions, and the result is meant as the arithmetic
    floor of a speed benchmark. A backward pass costs about twice this (gradients with respect to
    inputs and to weights).

    Args:
        topology: the network's topology.
        patch_size: spatial input size, one value per axis.
        in_channels: input channels.
        num_classes: output channels of the segmentation head(s).
        deep_supervision: count the head at every decoder level (training), not only the
            highest-resolution one (inference). The default matches :func:`build_network`.

    Returns:
        FLOPs for one sample, as a float (the counts exceed 2**31 for realistic patches).

    Raises:
        ValueError: the topology is inconsistent, or ``patch_size`` is not a multiple of the
            product of the strides per axis.
    """
    validate_topology(topology)
    check_spatial_size(patch_size, topology)
    features = topology.features_per_stage
    sizes: list[tuple[int, ...]] = []
    size = tuple(int(p) for p in patch_size)
    for stride in topology.strides:
        size = tuple(s // st for s, st in zip(size, stride))
        sizes.append(size)
    vox = [math.prod(s) for s in sizes]
    kernel = [math.prod(k) for k in topology.kernel_sizes]

    macs = 0
    if topology.residual_encoder:
        macs += math.prod(patch_size) * in_channels * features[0] * kernel[0]  # stem
        channels = features[0]
        for s, (n_blocks, f) in enumerate(zip(topology.blocks_per_stage, features)):
            for b in range(n_blocks):
                block_in = channels if b == 0 else f
                macs += vox[s] * block_in * f * kernel[s]  # conv1 (strided in the first block)
                macs += vox[s] * f * f * kernel[s]  # conv2
                if b == 0 and (block_in != f or any(st != 1 for st in topology.strides[s])):
                    macs += vox[s] * block_in * f  # 1x1 shortcut projection
            channels = f
    else:
        channels = in_channels
        for s, (n_convs, f) in enumerate(zip(topology.blocks_per_stage, features)):
            for _ in range(n_convs):
                macs += vox[s] * channels * f * kernel[s]
                channels = f

    n = topology.num_stages
    for d in range(n - 1):
        level = n - 2 - d  # decoder stage d works at encoder stage `level`'s resolution
        f = features[level]
        # Transposed conv with kernel == stride: every output voxel receives exactly one tap.
        macs += vox[level] * features[level + 1] * f
        channels = 2 * f  # upsampled features concatenated with the skip
        for _ in range(topology.decoder_blocks_per_stage[d]):
            macs += vox[level] * channels * f * kernel[level]
            channels = f
        if deep_supervision or d == n - 2:
            macs += vox[level] * f * num_classes
    return float(2 * macs)
