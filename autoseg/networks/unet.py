"""Dynamic U-Net (plain or residual encoder), 2D or 3D, built from a :class:`~autoseg.plans.Topology`.

The architecture is nnU-Net v2's (dynamic-network-architectures ``PlainConvUNet`` and
``ResidualEncoderUNet``):

* every convolution is ``Conv(k, padding=k // 2, bias) -> InstanceNorm(affine, eps 1e-5) ->
  LeakyReLU(0.01)``; a stage downsamples with a strided first convolution, never with pooling;
* the residual encoder has a stem convolution and ResNet-D ``BasicBlockD`` blocks (shortcut:
  average pooling when strided, then 1x1 convolution + norm when channels or size change);
* the decoder upsamples with ``ConvTranspose(kernel=stride, stride=stride)``, concatenates the
  skip, runs plain convolutions with the encoder kernel of that resolution, and has a 1x1
  segmentation head per level (deep supervision) of which inference uses only the last.

The network gives the same output (to float32 rounding) for an input in ``channels_last`` /
``channels_last_3d`` memory format as in the default one, and keeps that format throughout; on
the CPU that is faster for 3D (see :mod:`autoseg.networks.norm` for why the norm is our own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.analysis import check_spatial_size, validate_topology
from autoseg.networks.norm import InstanceNorm2d, InstanceNorm3d
from autoseg.plans import Topology

#: LeakyReLU slope, also the ``a`` of the He initialisation (nnU-Net: 1e-2 for both).
NEGATIVE_SLOPE = 1e-2
#: InstanceNorm epsilon (nnU-Net: 1e-5, affine).
NORM_EPS = 1e-5
#: A residual (restoration) network's full-resolution head starts at He's initialisation times this.
RESIDUAL_HEAD_SCALE = 1e-2

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: InstanceNorm2d, 3: InstanceNorm3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _norm(dims: int, channels: int) -> nn.Module:
    return _NORM[dims](channels, eps=NORM_EPS, affine=True)


class ConvBlock(nn.Module):
    """``Conv -> InstanceNorm -> LeakyReLU`` (the activation is left out for a residual branch's end).

    Args:
        dims: 2 or 3.
        in_channels, out_channels: channels in and out.
        kernel_size: per axis, odd; padded by ``k // 2`` so an unstrided conv keeps the size.
        stride: per axis.
        activation: append the LeakyReLU.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] | int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = _CONV[dims](in_channels, out_channels, tuple(kernel_size), stride=stride,
                                padding=tuple(k // 2 for k in kernel_size), bias=True)
        self.norm = _norm(dims, out_channels)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Concatenate(nn.Module):
    """The decoder's join: the upsampled features, then the skip, along the channels.

    A module of its own (without parameters) so that CPU inference can defer the copy and let
    the next convolution read both parts (:mod:`autoseg.inference.cpu`).
    """

    def forward(self, upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat((upsampled, skip), dim=1)


def _stacked(dims: int, n: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
             first_stride: Sequence[int] | int = 1) -> nn.Sequential:
    """``n`` conv blocks; the first changes the channels and carries the stride."""
    return nn.Sequential(*(
        ConvBlock(dims, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                  first_stride if i == 0 else 1)
        for i in range(n)
    ))


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``conv-norm-lrelu, conv-norm``, plus the shortcut, then LeakyReLU.

    The shortcut is the identity, or -- when the channels or the size change -- average pooling
    (kernel = stride, if strided) followed by a 1x1 convolution and a norm. Pooling before the
    projection instead of a strided 1x1 conv is the "D" variant (He et al. 2019, "Bag of Tricks"),
    as in nnU-Net's ResEnc.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int]) -> None:
        super().__init__()
        stride = tuple(stride)
        strided = any(s != 1 for s in stride)
        self.conv1 = ConvBlock(dims, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvBlock(dims, out_channels, out_channels, kernel_size, 1, activation=False)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        if strided or in_channels != out_channels:
            layers: list[nn.Module] = []
            if strided:
                layers.append(_AVG_POOL[dims](kernel_size=stride, stride=stride))
            layers += [_CONV[dims](in_channels, out_channels, 1, bias=True), _norm(dims, out_channels)]
            self.shortcut: nn.Module = nn.Sequential(*layers)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Encoder(nn.Module):
    """One module per resolution stage; returns every stage's output (the skips)."""

    def __init__(self, topology: Topology, in_channels: int) -> None:
        super().__init__()
        dims = topology.dims
        features = topology.features_per_stage
        stages: list[nn.Module] = []
        if topology.residual_encoder:
            # nnU-Net's ResEnc stem: one conv block to features[0] at full resolution, so that
            # stage 0's first residual block keeps its identity shortcut.
            self.stem: nn.Module = ConvBlock(dims, in_channels, features[0], topology.kernel_sizes[0])
            channels = features[0]
            for n, f, k, stride in zip(topology.blocks_per_stage, features, topology.kernel_sizes,
                                       topology.strides):
                stages.append(nn.Sequential(*(
                    BasicBlockD(dims, channels if b == 0 else f, f, k, stride if b == 0 else (1,) * dims)
                    for b in range(n)
                )))
                channels = f
        else:
            self.stem = nn.Identity()
            channels = in_channels
            for n, f, k, stride in zip(topology.blocks_per_stage, features, topology.kernel_sizes,
                                       topology.strides):
                stages.append(_stacked(dims, n, channels, f, k, stride))
                channels = f
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Upsample, concatenate the skip, convolve; a segmentation head per level.

    Decoder stage ``d`` (0 = deepest) works at encoder stage ``n - 2 - d``'s resolution with that
    stage's features and kernel, and ``topology.decoder_blocks_per_stage[d]`` conv blocks.
    """

    def __init__(self, topology: Topology, num_classes: int) -> None:
        super().__init__()
        dims = topology.dims
        features = topology.features_per_stage
        n = topology.num_stages
        upsample, stages, heads = [], [], []
        for d in range(n - 1):
            level = n - 2 - d
            f, below, stride = features[level], features[level + 1], tuple(topology.strides[level + 1])
            upsample.append(_TRANSPOSED_CONV[dims](below, f, stride, stride=stride, bias=True))
            stages.append(_stacked(dims, topology.decoder_blocks_per_stage[d], 2 * f, f,
                                   topology.kernel_sizes[level]))
            heads.append(_CONV[dims](f, num_classes, 1, bias=True))
        self.upsample = nn.ModuleList(upsample)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.join = Concatenate()

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> list[torch.Tensor]:
        """Logits per level, highest resolution first (only that one without deep supervision)."""
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for d, (up, stage, head) in enumerate(zip(self.upsample, self.stages, self.heads)):
            x = stage(self.join(up(x), skips[-(d + 2)]))
            if deep_supervision or d == last:
                outputs.append(head(x))
        return outputs[::-1]


class UNet(nn.Module):
    """A U-Net built from a :class:`~autoseg.plans.Topology`; see :func:`build_network`.

    Attributes:
        topology: the topology it was built from.
        in_channels, num_classes: input channels and output classes.
        deep_supervision: ``forward`` returns one logit tensor per decoder level (highest
            resolution first) when true, only the highest-resolution tensor when false. Switch it
            off for inference: the lower heads are then not computed at all.
        residual: input channels ``[start, stop)`` added to the full-resolution head's output
            (residual learning for restoration: the head predicts a correction of the input); None
            for a plain head. The sum is taken in float32, so that autocast's bf16 never rounds
            the input (bf16 keeps 8 significant bits: 1000 HU normalised by σ 270 HU falls on a grid of
            4 HU steps). No parameters: the state dict is a
            plain U-Net's. The full-resolution head starts small (:data:`RESIDUAL_HEAD_SCALE`):
            an untrained network returns nearly its input.
    """

    def __init__(self, topology: Topology, in_channels: int, num_classes: int, deep_supervision: bool = True,
                 residual: tuple[int, int] | None = None) -> None:
        super().__init__()
        validate_topology(topology)
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels ({in_channels}) and num_classes ({num_classes}) must be at least 1")
        if residual is not None and not (0 <= residual[0] and residual[1] <= in_channels
                                         and residual[1] - residual[0] == num_classes):
            raise ValueError(f"residual channels {tuple(residual)} must be {num_classes} of the {in_channels} inputs")
        self.topology = topology
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.residual = None if residual is None else (int(residual[0]), int(residual[1]))
        self.encoder = Encoder(topology, in_channels)
        self.decoder = Decoder(topology, num_classes)
        self.apply(_init_he)
        if topology.residual_encoder:
            self.apply(_zero_last_norm)
        if self.residual is not None:
            # A residual network starts close to the identity (its input channels): the first
            # updates refine a correction instead of undoing a random one, which with He's scale
            # cost 6 dB of PSNR at the start (17.7 vs 23.8 dB on the test phantoms). Not exactly
            # zero: a zero head passes no gradient to the layers before it, so they wait for it to
            # grow (test phantoms, 2d, AdamW 1e-2: 24.0 dB after 120 iterations from a zero head,
            # 24.4 dB after 90 from this one).
            with torch.no_grad():
                self.decoder.heads[-1].weight.mul_(RESIDUAL_HEAD_SCALE)
            nn.init.zeros_(self.decoder.heads[-1].bias)

    def freeze_unused_heads(self) -> None:
        """Without deep supervision only the last decoder head is used: the others get no gradient
        (which DDP refuses on its second step), so they are excluded from training."""
        for head in list(self.decoder.heads)[:-1]:
            head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x`` of shape ``(batch, in_channels, *spatial)``.

        Raises:
            ValueError: wrong number of dimensions or channels, or a spatial size that is not a
                multiple of the product of the strides per axis.
        """
        dims = self.topology.dims
        if x.dim() != dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (batch, {self.in_channels}, {', '.join(('z', 'y', 'x')[-dims:])}) "
                             f"for this {dims}D network, got {tuple(x.shape)}")
        check_spatial_size(x.shape[2:], self.topology)
        outputs = self.decoder(self.encoder(x), self.deep_supervision)
        if self.residual is not None:
            start, stop = self.residual
            outputs[0] = outputs[0].float() + x[:, start:stop].float()
        return outputs if self.deep_supervision else outputs[0]


def _init_he(module: nn.Module) -> None:
    # nnU-Net's InitWeights_He(1e-2): Kaiming normal (fan_in, leaky-ReLU gain) and zero bias.
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _zero_last_norm(module: nn.Module) -> None:
    # nnU-Net's init_last_bn_before_add_to_0 (Goyal et al. 2017): each residual block starts as
    # its shortcut, which stabilises the start of training of deep residual encoders.
    if isinstance(module, BasicBlockD):
        nn.init.zeros_(module.conv2.norm.weight)
        nn.init.zeros_(module.conv2.norm.bias)


def build_network(topology: Topology, in_channels: int, num_classes: int, deep_supervision: bool = True,
                  residual: tuple[int, int] | None = None) -> UNet:
    """Build the U-Net a configuration's topology describes.

    Args:
        topology: stages, strides, kernels, blocks; ``residual_encoder`` picks ResEnc blocks.
        in_channels: input channels (image channels x 2.5D slices).
        num_classes: output channels (labels including background, or regions).
        deep_supervision: ``forward`` returns a list of logits, highest resolution first, one
            per decoder level; set ``net.deep_supervision = False`` later for inference.
        residual: input channels added to the output (:meth:`autoseg.tasks.base.Task.residual_channels`).

    Returns:
        The network, He-initialised, on the CPU in float32.

    Raises:
        ValueError: the topology is inconsistent, or ``in_channels``/``num_classes`` < 1.
    """
    return UNet(topology, in_channels, num_classes, deep_supervision, residual)
