"""Sliding-window inference: Gaussian-weighted windows, batched, with mirroring test-time augmentation.

The pure core of prediction (nnU-Net v2's ``predict_sliding_window_return_logits``): a network
function, a preprocessed ``(C, z, y, x)`` tensor and a patch size in, logits ``(K, z, y, x)`` out.
No files, no plans; :mod:`autoseg.inference.predictor` builds the network function from checkpoints.

* Windows overlap by ``1 - step`` of the patch (0.5: nnU-Net's default). Their starts are spread
  evenly so that the first window touches the first voxel and the last the last one
  (nnU-Net's ``compute_steps_for_sliding_window``).
* Each window's logits are weighted by a Gaussian importance map (σ = patch / 8, nnU-Net), because
  a network sees less context near a patch border and is less accurate there; the sum is divided
  by the summed weights.
* Images smaller than the patch are padded with 0 (the mean after normalisation) symmetrically and
  the result is cropped back, as nnU-Net does.
* Mirroring TTA averages the predictions of every combination of flips over the mirror axes
  (2**n forward passes for n axes), each flipped back. The mirrored copies of a window go through
  the network together, in batches of ``forward_batch`` samples.
* 2D configurations (``len(patch_size) == 2``) predict slice by slice along axis 0, batching
  slices; 2.5D ones feed each slice with its ``±k`` neighbours stacked as channels exactly as the
  training sampler does (:func:`autoseg.data.sampler.stack_context`: offset-major, centre slice
  in the middle, edge slices repeated at the volume ends).

Everything is accumulated on the data's device in float32.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch

#: Gaussian σ as a fraction of the patch size per axis (nnU-Net v2: 1/8).
SIGMA_SCALE = 1.0 / 8.0
#: Samples per network call on the CPU, as voxels: 2 patches of the default 3D plan (40×56×40).
#: On a 2-core AVX2 CPU (channels-last, autoseg.inference.cpu's tuning) a batch of 1 costs 0.130 s
#: per sample, 2, 4 and 8 cost 0.107-0.108 s (a whole TTA case: 4.31 s at 2, 4.40 s at 4 or 8), so
#: the smallest efficient batch is taken; 2D slices are batched to the same volume.
CPU_FORWARD_VOXELS = 2 * 40 * 56 * 40
#: The same on a GPU, where larger batches keep the device busy (8 default 3D patches).
GPU_FORWARD_VOXELS = 8 * 40 * 56 * 40
#: Fewest 2D slices per network call on the CPU, however large the slice: a 512² denoising network
#: (features 32-512, 8 stages; 2-core Sapphire Rapids, torch 2.13) took 0.463-0.477 s per slice at
#: batch 1 and 0.429-0.440 s at 2 (-7 %; 24 slices, two runs each), its deep 4² and 8² stages being
#: too small to keep both cores busy at 1. A slice's activations are small next to a 3D patch's.
CPU_MIN_SLICES = 2

NetFn = Callable[[torch.Tensor], torch.Tensor]
WindowProgress = Callable[[int, int], None]


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """First index of every window along one axis (nnU-Net's ``compute_steps_for_sliding_window``).

    Args:
        size: the (padded) image size along the axis, at least ``patch``.
        patch: the window size.
        step: the stride as a fraction of ``patch``, in (0, 1].

    Returns:
        Window starts, evenly spread from 0 to ``size - patch`` (both included).

    Raises:
        ValueError: ``size < patch`` or ``step`` outside (0, 1].
    """
    if size < patch:
        raise ValueError(f"image size {size} is smaller than the patch {patch}; pad it first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    count = int(math.ceil((size - patch) / (patch * step))) + 1
    if count == 1:
        return [0]
    spacing = (size - patch) / (count - 1)
    return [int(round(spacing * i)) for i in range(count)]


@functools.lru_cache(maxsize=16)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    # Separable, so computed per axis: an exact Gaussian (nnU-Net filters a delta with scipy,
    # truncating at 4σ and replacing the zeros by the smallest weight; the same to 1e-3 inside).
    weights = torch.ones((), dtype=torch.float64)
    for size in patch:
        centre, sigma = size // 2, size * sigma_scale
        axis = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float64) - centre) / sigma) ** 2)
        weights = weights[..., None] * axis
    weights /= weights.max()
    # Never exactly 0, so every voxel a window covers gets weight (corners of 3D patches: ~4e-11).
    return weights.clamp_min(1e-30).to(torch.float32)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The importance map of a window: a Gaussian of σ = ``patch * sigma_scale``, maximum 1.

    Cached per patch size, so it is computed once per process.

    Args:
        patch_size: window size per axis.
        sigma_scale: σ as a fraction of the window size (1/8: nnU-Net).
        device: where the returned tensor lives.

    Returns:
        float32 tensor of shape ``patch_size``, positive everywhere.
    """
    return _gaussian(tuple(int(p) for p in patch_size), float(sigma_scale)).to(device)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): the flips of mirroring TTA (nnU-Net v2)."""
    axes = tuple(sorted(set(int(a) for a in axes)))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def default_forward_batch(patch_size: Sequence[int], device: torch.device | str = "cpu") -> int:
    """Samples per network call for ``patch_size``: :data:`CPU_FORWARD_VOXELS` (or GPU) / patch voxels,
    and on the CPU at least :data:`CPU_MIN_SLICES` for 2D patches."""
    cpu = torch.device(device).type == "cpu"
    batch = max(1, (CPU_FORWARD_VOXELS if cpu else GPU_FORWARD_VOXELS) // math.prod(int(p) for p in patch_size))
    return max(batch, CPU_MIN_SLICES) if cpu and len(patch_size) == 2 else batch


def count_windows(shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> int:
    """How many windows :func:`sliding_window` runs for a ``(z, y, x)`` image (before mirroring)."""
    spatial, patch = _window_geometry(shape, patch_size)
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    return math.prod(len(window_starts(s, p, step if p > 1 else 1.0)) for s, p in zip(padded, patch))


def _window_geometry(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spatial shape and the 3-axis window: a 2D patch becomes ``(1, py, px)`` (one slice)."""
    spatial = tuple(int(s) for s in shape)
    patch = tuple(int(p) for p in patch_size)
    if len(spatial) != 3:
        raise ValueError(f"expected a (z, y, x) spatial shape, got {spatial}")
    if len(patch) == 2:
        patch = (1, *patch)
    elif len(patch) != 3:
        raise ValueError(f"patch_size needs 2 (slice-wise) or 3 values, got {patch}")
    return spatial, patch


def sliding_window(
    net_fn: NetFn,
    data: torch.Tensor,
    patch_size: Sequence[int],
    step: float = 0.5,
    *,
    mirror_axes: Sequence[int] = (),
    context_slices: int = 0,
    forward_batch: int | None = None,
    importance: torch.Tensor | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    progress: WindowProgress | None = None,
) -> torch.Tensor:
    """Logits of a whole image from a network that takes patches.

    Args:
        net_fn: maps a batch ``(B, C', *patch_size)`` to logits ``(B, K, *patch_size)`` (any float
            dtype; accumulated as float32). For 2D patches ``C' = C * (2 * context_slices + 1)``.
        data: ``(C, z, y, x)`` float tensor, on the device the network runs on.
        patch_size: 3 values (3D windows) or 2 (slice by slice along axis 0).
        step: stride between windows as a fraction of the patch (0.5: nnU-Net's default).
        mirror_axes: spatial axes of the patch (0-based: ``(0, 1, 2)`` in 3D, ``(0, 1)`` in 2D) to
            flip for mirroring TTA; empty for none.
        context_slices: 2.5D: ``k`` neighbouring slices on each side as extra channels (2D only).
        forward_batch: samples per ``net_fn`` call (default :func:`default_forward_batch`).
        importance: the window weights (default: :func:`gaussian_importance` of the patch).
        memory_format: layout of the network's input (``torch.channels_last_3d`` is faster for 3D
            on the CPU).
        progress: called as ``progress(done, total)`` after each batch of windows.

    Returns:
        float32 logits ``(K, z, y, x)`` on ``data``'s device.

    Raises:
        ValueError: the shapes or options are inconsistent (a caller's bug).
    """
    if data.dim() != 4:
        raise ValueError(f"expected data of shape (C, z, y, x), got {tuple(data.shape)}")
    spatial, patch = _window_geometry(data.shape[1:], patch_size)
    net_dims = len(patch_size)
    if context_slices and net_dims != 2:
        raise ValueError("context_slices (2.5D) needs a 2D patch")
    if any(not 0 <= a < net_dims for a in mirror_axes):
        raise ValueError(f"mirror axes {tuple(mirror_axes)} out of range for a {net_dims}D patch")
    device = data.device
    combos = mirror_combinations(mirror_axes)
    flips = [tuple(a + 2 for a in combo) for combo in combos]  # tensor dims of (B, C, *patch)
    if forward_batch is None:
        forward_batch = default_forward_batch(patch_size, device)
    # Enough windows per step that their mirrored copies fill one network call.
    windows_per_step = max(1, forward_batch // len(combos))

    with torch.inference_mode():
        data = data.float()
        # Pad each axis up to the patch, symmetrically with 0 (nnU-Net's pad_nd_image).
        pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch)]
        if any(lo or hi for lo, hi in pad):
            flat = [v for lo, hi in reversed(pad) for v in (lo, hi)]
            data = torch.nn.functional.pad(data, flat)
        padded = tuple(data.shape[1:])
        weights = importance.to(device, torch.float32) if importance is not None else \
            gaussian_importance(patch[-net_dims:], device=device)
        weights = weights.reshape(patch)

        starts = [window_starts(s, p, step if p > 1 else 1.0) for s, p in zip(padded, patch)]
        windows = list(itertools.product(*starts))
        num_classes: int | None = None
        logits: torch.Tensor | None = None
        weight_sum = torch.zeros(padded, dtype=torch.float32, device=device)

        for first in range(0, len(windows), windows_per_step):
            chunk = windows[first:first + windows_per_step]
            batch = torch.stack([_window_input(data, start, patch, net_dims, context_slices) for start in chunk])
            summed = _mirrored_forward(net_fn, batch, flips, forward_batch, memory_format)  # (B, K, *patch)
            if net_dims == 2:
                summed = summed.unsqueeze(2)
            if logits is None:
                num_classes = summed.shape[1]
                logits = torch.zeros((num_classes, *padded), dtype=torch.float32, device=device)
            for start, prediction in zip(chunk, summed):
                box = tuple(slice(s, s + p) for s, p in zip(start, patch))
                logits[(slice(None), *box)].addcmul_(prediction, weights)
                weight_sum[box] += weights
            if progress is not None:
                progress(min(first + windows_per_step, len(windows)), len(windows))

        assert logits is not None  # at least one window always exists
        # Every mirrored copy added its prediction: divide by their number with the weights.
        weight_sum *= float(len(combos))
        logits /= weight_sum
        crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad, spatial))
        return logits[(slice(None), *crop)].contiguous()


def _window_input(data: torch.Tensor, start: Sequence[int], patch: Sequence[int], net_dims: int,
                  context_slices: int) -> torch.Tensor:
    """The network input of one window: ``(C, *patch)`` in 3D, ``(C * (2k + 1), py, px)`` in 2D/2.5D."""
    z, y, x = start
    if net_dims == 3:
        return data[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]]
    ys, xs = slice(y, y + patch[1]), slice(x, x + patch[2])
    if context_slices == 0:
        return data[:, z, ys, xs]
    # stack_context's layout: slices z-k..z+k (edge slices repeated), offset-major channels.
    depth = data.shape[1]
    index = torch.arange(z - context_slices, z + context_slices + 1, device=data.device).clamp_(0, depth - 1)
    planes = data[:, :, ys, xs].index_select(1, index)  # (C, 2k+1, py, px)
    return planes.transpose(0, 1).reshape(-1, *planes.shape[2:])


def _mirrored_forward(net_fn: NetFn, batch: torch.Tensor, flips: list[tuple[int, ...]], forward_batch: int,
                      memory_format: torch.memory_format) -> torch.Tensor:
    """Sum over mirror combinations of ``flip(net(flip(batch)))``, the copies batched together."""
    n = batch.shape[0]
    inputs = torch.cat([batch.flip(dims) if dims else batch for dims in flips]) if len(flips) > 1 else batch
    total: torch.Tensor | None = None
    for first in range(0, inputs.shape[0], forward_batch):
        part = inputs[first:first + forward_batch].contiguous(memory_format=memory_format)
        out = net_fn(part).float()
        # Sample i of the mirror-major input is window i % n under flip i // n: flip it back.
        for offset in range(out.shape[0]):
            index = first + offset
            dims = flips[index // n]
            prediction = out[offset].flip([d - 1 for d in dims]) if dims else out[offset]
            if total is None:
                total = torch.zeros((n, *prediction.shape), dtype=torch.float32, device=prediction.device)
            total[index % n] += prediction
    assert total is not None
    return total
