"""CPU inference speed-ups that leave the results unchanged (to float32 rounding).

Measured on the project's 2-vCPU development machine (an AVX-512 Xeon; figures in
``benchmarks/README.md``) with the default plan's Hippocampus network (features 32-256, patch
40x56x40, channels-last 3D, torch 2.13), 5 folds in one process, per sample at batch 2: 96-98 ms
with every change below, of which the convolutions take ~88 %; the arithmetic floor (its
convolution FLOPs at the throughput of a 32->32 3^3 convolution on the patch) is 83 ms.

* **Freed memory is kept for reuse** (:func:`keep_freed_memory`). glibc serves large blocks with
  ``mmap`` and returns them to the OS when freed, so each new activation (23 MB at full
  resolution) is fresh memory whose first touch page-faults: ~47 000 faults per forward pass,
  10-14 % of the time. With ``mallopt`` glibc takes every block from its heap and keeps freed
  memory for reuse (0 faults). Process-wide: the process's RSS then stays at its peak instead of
  shrinking.
* **Inference instance norm** (:func:`prepare_for_cpu_inference`): inside a ``Conv -> Norm ->
  Act`` block the norm's input is the convolution's fresh output, so it may be normalised in place:
  sums and sums of squares, then centre, scale and shift in one pass — fewer full-size passes and
  temporaries than the training norm, which must keep its input for the backward pass. The sums
  are taken over 1 MB pieces, so that the squares' pass reads the piece from the cache the sums'
  pass just brought it into (norm of a 2x32x40x56x40 tensor 2.66 -> 2.14 ms, 2x64x20x28x20
  0.82 -> 0.58 ms). When a channel's mean is large against its spread (mean² > 100 variances,
  where E[x²] - mean² would lose digits) the tensor is centred first and the variance
  recomputed, as in training.
* **No copy for the decoder's concatenation** (:class:`DeferredConcatenate`): a convolution over
  ``cat(upsampled, skip)`` is the convolution of ``upsampled`` with the first half of the weights
  plus that of ``skip`` with the second half; oneDNN adds the second into the first's output as
  it writes it (a fused "sum"). At full resolution this skips a 46 MB copy: the default network
  2.5-3 % faster per sample (an A/B of 5 networks in one process: 101.0 -> 98.2 ms).
* **oneDNN for every convolution** (:class:`MkldnnConvolution`, :class:`MkldnnTransposedConvolution`):
  for a batch of 1 PyTorch sends small 3D convolutions and transposed convolutions to slower
  native kernels (10 % of a batch-1 pass; prediction without TTA of an image that fits one window
  runs batches of 1).
* **Weights packed once** (:class:`MkldnnConvolution`): oneDNN wants the weights in a blocked
  layout and otherwise reorders them on every call; they are packed per input shape and kept
  (2 % per sample at batch 1 and 2; memory: one more copy of a convolution's weights per kept
  input shape, up to two shapes — the decoder's split convolutions keep halves as well).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import NamedTuple

import torch
from torch import nn

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
#: Free memory at the top of the heap kept rather than returned to the OS.
TRIM_THRESHOLD = 2**30
#: Extra memory requested from the OS whenever the heap grows (fewer, larger requests).
TOP_PAD = 64 * 2**20
#: Values per piece of the norm's sums (1 MB of float32: it stays in a core's L2 cache between
#: the two reductions; 64k-value pieces cost more in calls than they save, 1M-value ones less).
STATS_CHUNK = 2**18
#: Input shapes (e.g. batch sizes) for which a convolution keeps its weights packed for oneDNN.
PACKED_SHAPES = 2
#: The decoder's concatenation is left to the convolution (:class:`DeferredConcatenate`) from this
#: many values of the concatenated tensor on. At 2x(32+32)x40x56x40 and 2x(64+64)x20x28x20 it
#: saves 4 and 1 ms; at 2x(128+128)x10x14x10 two half convolutions cost 0.5 ms more than the copy.
DEFER_CONCAT_MIN = 2**21
#: The variance comes from one read (E[x²] - mean²) unless a channel's mean² exceeds this many
#: variances; then it is recomputed from centred values. float32 keeps the relative error of the
#: variance below about (1 + ratio) * 1.2e-7, i.e. 1.2e-5: float32 rounding of the normalised values.
CANCELLATION_RATIO = 100.0


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module doc); once per process.

    Returns:
        True when the setting took effect (Linux with glibc), False elsewhere (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mmap at all: glibc's mmap threshold cannot exceed 32 MiB, and the decoder's concatenated
    # activations (46 MB at full resolution, batch 2) would still page-fault on every pass.
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                and mallopt(_M_TOP_PAD, TOP_PAD))


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class InferenceInstanceNorm(nn.Module):
    """Affine instance norm that overwrites its input (inference only: the input must be a fresh
    tensor nothing else reads, as a convolution's output inside a ``ConvBlock``).

    For a channels-last CPU float32 input it normalises in place through a ``(B, voxels, C)``
    view (reductions over the voxel axis are contiguous per channel, so they vectorise); any
    other input goes to the wrapped module.

    Args:
        norm: the trained norm (its ``weight``, ``bias`` and ``eps`` are used, not copied).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.inner
        layout = _CHANNELS_LAST.get(x.dim())
        if (layout is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.is_contiguous()
                or not x.is_contiguous(memory_format=layout) or torch.is_grad_enabled()):
            return norm(x)
        batch, channels = x.shape[:2]
        flat = x.movedim(1, -1).view(batch, -1, channels)  # a view (x is channels-last): updated in place
        voxels = flat.shape[1]
        sums, squares = _channel_sums(flat)
        mean = sums / voxels
        variance = squares / voxels - mean * mean
        if bool((mean * mean > CANCELLATION_RATIO * variance).any()):
            # E[x²] - mean² lost too many digits for some channel: centre first, on the mean of
            # the training norm's reduction (at such offsets its rounding is a visible share of
            # the spread, so the training network's own rounding is the one to reproduce).
            flat.sub_(flat.mean(dim=1, keepdim=True))
            variance, mean = _channel_sums(flat)[1] / voxels, torch.zeros_like(mean)
        scale = norm.weight * torch.rsqrt(variance + norm.eps)
        torch.addcmul(norm.bias - mean * scale, flat, scale, out=flat)  # one pass: centre, scale and shift
        return x


def _channel_sums(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1, C)`` sums and sums of squares over the voxels of a ``(B, voxels, C)`` view, one
    cache-sized piece of voxels at a time (see :data:`STATS_CHUNK`)."""
    batch, voxels, channels = flat.shape
    rows = max(1, STATS_CHUNK // (batch * channels))
    if voxels <= 2 * rows:
        return flat.sum(dim=1, keepdim=True), (flat * flat).sum(dim=1, keepdim=True)
    pieces = -(-voxels // rows)
    sums = flat.new_empty((pieces, batch, 1, channels))
    squares = flat.new_empty((pieces, batch, 1, channels))
    scratch = flat.new_empty((batch, rows, channels))
    for index, start in enumerate(range(0, voxels, rows)):
        piece = flat[:, start:start + rows]
        torch.sum(piece, dim=1, keepdim=True, out=sums[index])
        squared = torch.mul(piece, piece, out=scratch[:, :piece.shape[1]])
        torch.sum(squared, dim=1, keepdim=True, out=squares[index])
    return sums.sum(dim=0), squares.sum(dim=0)


class ChannelPair(NamedTuple):
    """Two tensors that stand for their concatenation along the channels (first, then second)."""

    first: torch.Tensor
    second: torch.Tensor


def _fused_sum_available() -> bool:
    try:
        return (bool(torch.backends.mkldnn.is_available()) and bool(torch.backends.mkldnn.enabled)
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))
    except (AttributeError, RuntimeError):
        return False


class DeferredConcatenate(nn.Module):
    """The decoder's join for CPU inference: large channels-last float32 inputs are passed on as a
    :class:`ChannelPair` for the next :class:`MkldnnConvolution` to read without the copy; any
    other input is concatenated as in training."""

    def forward(self, upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor | ChannelPair:
        layout = _CHANNELS_LAST.get(upsampled.dim())
        if (layout is not None and upsampled.numel() + skip.numel() >= DEFER_CONCAT_MIN
                and not torch.is_grad_enabled() and _fused_sum_available()
                and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.is_contiguous()
                        and t.is_contiguous(memory_format=layout) for t in (upsampled, skip))):
            return ChannelPair(upsampled, skip)
        return torch.cat((upsampled, skip), dim=1)


class MkldnnConvolution(nn.Module):
    """A convolution that always runs oneDNN's kernel and returns a channels-last tensor.

    PyTorch picks its native im2col kernel instead of oneDNN for a batch of 1 when
    ``N * C * D * H <= 20480`` (``ConvUtils.h``: "for some case, native is faster"): true for the
    first convolution (1 input channel) and the deep stages of a 3D U-Net. On channels-last input
    that kernel first copies input and weights to NCDHW and is 2.4x slower (a 128->128 3^3
    convolution on 1x128x10x14x10: 35 against 15 ms), and its NCDHW output sends the next norm to
    the slow path too. Batches of 2 and more already use oneDNN.

    The weights are packed in oneDNN's blocked layout for each input shape (at most
    :data:`PACKED_SHAPES` shapes kept per weight; a new shape beyond that drops the others):
    unpacked, oneDNN reorders them on every call (0.5 ms of a 3 ms 256->256 3^3 convolution on
    2x256x5x7x5). These copies, and the halves of :meth:`accept_pairs`, are made on first use
    and made again when the trained weight changes (its version or storage); they are not part of
    the state dict and are dropped when the module is copied or pickled.

    Args:
        conv: the trained ``nn.Conv2d`` / ``nn.Conv3d`` (its parameters are used, with the
            derived copies above).
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.inner = conv
        self.layout = _CHANNELS_LAST[conv.weight.dim()]
        self.split: int | None = None
        self.packing = True  # False once packing failed (a PyTorch without these oneDNN entry points)
        self._derived: dict[tuple[str, tuple[int, ...] | None], torch.Tensor] = {}
        self._weight_token: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_derived"], state["_weight_token"] = {}, None  # oneDNN's opaque tensors cannot be copied
        return state

    def packed_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """The input shapes each weight (``"weight"``, or the halves ``"first"`` and ``"second"``)
        is currently packed for."""
        shapes: dict[str, list[tuple[int, ...]]] = {}
        for name, shape in self._derived:
            if shape is not None:
                shapes.setdefault(name, []).append(shape)
        return shapes

    def accept_pairs(self, first_channels: int) -> None:
        """Let :meth:`forward` take a :class:`ChannelPair` whose first tensor has
        ``first_channels`` channels (the weights are split along their input channels)."""
        self.split = first_channels

    def forward(self, x: torch.Tensor | ChannelPair) -> torch.Tensor:
        conv = self.inner
        if isinstance(x, ChannelPair):
            if self.split is not None and x.first.shape[1] == self.split and not torch.is_grad_enabled():
                try:
                    return self._pair_forward(x)
                except RuntimeError:  # oneDNN refused the fused sum: concatenate from now on
                    self.split = None
            x = torch.cat(x, dim=1)
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or not torch.backends.mkldnn.enabled):
            return conv(x)
        return self._convolution(x, self._weight("weight", x), conv.bias)

    def _convolution(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = self.inner
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if weight.is_mkldnn:
            out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")
        else:
            out = torch.ops.aten.mkldnn_convolution(x, weight, bias, *args)
        return out.contiguous(memory_format=self.layout)  # a no-op when oneDNN returned channels-last

    def _pair_forward(self, x: ChannelPair) -> torch.Tensor:
        """``conv(cat(first, second))`` without the concatenation: the first half's convolution,
        then the second's, which oneDNN adds into that output in place."""
        conv = self.inner
        out = self._convolution(x.first, self._weight("first", x.first), conv.bias)
        return torch.ops.mkldnn._convolution_pointwise_(
            out, x.second, self._weight("second", x.second), None, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "add", 1.0, None, [], None)

    def _weight(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The trained weight (``"weight"``) or its input-channel half (``"first"``, ``"second"``),
        packed for inputs shaped like ``x`` where packing is available."""
        weight = self.inner.weight
        # (An inference tensor, e.g. a copy made under torch.inference_mode, has no version.)
        token = (0 if weight.is_inference() else weight._version, weight.data_ptr())
        if token != self._weight_token:  # new or changed weights: nothing derived from the old ones
            self._derived.clear()
            self._weight_token = token
        plain = self._derived.get((name, None))
        if plain is None:
            plain = weight.detach()
            if name != "weight":
                assert self.split is not None
                half = slice(None, self.split) if name == "first" else slice(self.split, None)
                plain = plain[:, half].contiguous(memory_format=self.layout)
            self._derived[(name, None)] = plain
        if not self.packing:
            return plain
        key = (name, tuple(x.shape))
        packed = self._derived.get(key)
        if packed is None:
            packed = self._pack(plain, x)
            if packed is None:
                self.packing = False
                return plain
            kept = [k for k in self._derived if k[0] == name and k[1] is not None]
            if len(kept) >= PACKED_SHAPES:
                for k in kept:
                    del self._derived[k]
            self._derived[key] = packed
        return packed

    def _pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """``weight`` reordered by oneDNN for inputs shaped like ``x``; None where this PyTorch
        cannot (the entry points are private: missing in some builds; older versions take no input
        shape)."""
        conv = self.inner
        try:
            reorder = getattr(torch._C._nn, f"mkldnn_reorder_conv{weight.dim() - 2}d_weight")
            args = (weight.to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            try:
                return reorder(*args, list(x.shape))  # type: ignore[no-any-return]
            except TypeError:  # older signature: no input shape (a layout for any input)
                return reorder(*args)  # type: ignore[no-any-return]
        except (AttributeError, RuntimeError, TypeError):
            return None


class MkldnnTransposedConvolution(nn.Module):
    """A transposed convolution that always runs oneDNN's kernel.

    For a batch of 1 PyTorch runs the decoder's upsampling (kernel = stride = 2) with its native
    ``slow_conv_transpose3d`` and copies to and from NCDHW around it: 0.70 / 1.49 ms against
    oneDNN's 0.38 / 0.59 ms for 1x256x5x7x5 -> 128 and 1x128x10x14x10 -> 64 channels (batch 2:
    the same kernel either way).

    Args:
        conv: the trained ``nn.ConvTranspose2d`` / ``nn.ConvTranspose3d`` (parameters used, not copied).
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.inner = conv
        self.layout = _CHANNELS_LAST[conv.weight.dim()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.inner
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
                or conv.padding_mode != "zeros" or not torch.backends.mkldnn.enabled
                or not hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise")):
            return conv(x)
        out = torch.ops.mkldnn._convolution_transpose_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.output_padding), list(conv.stride),
            list(conv.dilation), conv.groups, "none", [], "")
        return out.contiguous(memory_format=self.layout)


def prepare_for_cpu_inference(net: nn.Module) -> nn.Module:
    """Swap the norm of every ``Conv -> Norm -> Act`` block for :class:`InferenceInstanceNorm`,
    every convolution for :class:`MkldnnConvolution` and every transposed one for
    :class:`MkldnnTransposedConvolution`.

    The decoder's concatenations become :class:`DeferredConcatenate`, read by the first
    convolution of each decoder stage. Only norms that directly follow their block's convolution
    are swapped, so the in-place update never touches a tensor used elsewhere. Call it after the
    weights are loaded (the state dict's keys gain ``.inner``), and run the network on
    channels-last input. The convolutions keep packed copies of their weights (see
    :class:`MkldnnConvolution`).

    Args:
        net: a network from :func:`autoseg.networks.build_network`, in eval mode.

    Returns:
        The same network, modified.
    """
    from autoseg.networks.norm import InstanceNorm2d, InstanceNorm3d
    from autoseg.networks.unet import Concatenate, ConvBlock, Decoder

    for module in list(net.modules()):
        if isinstance(module, ConvBlock) and isinstance(module.norm, (InstanceNorm2d, InstanceNorm3d)):
            module.norm = InferenceInstanceNorm(module.norm)
        for name, child in module.named_children():
            if type(child) in (nn.Conv2d, nn.Conv3d):
                setattr(module, name, MkldnnConvolution(child))
            elif type(child) in (nn.ConvTranspose2d, nn.ConvTranspose3d):
                setattr(module, name, MkldnnTransposedConvolution(child))
    for decoder in [m for m in net.modules() if isinstance(m, Decoder) and type(m.join) is Concatenate]:
        for up, stage in zip(decoder.upsample, decoder.stages):
            stage[0].conv.accept_pairs(getattr(up, "inner", up).out_channels)
        decoder.join = DeferredConcatenate()
    return net
