"""Training augmentation built from a configuration with batchgenerators, and deep-supervision targets.

The pipeline is nnU-Net v2's (``nnUNetTrainer.get_training_transforms``, batchgenerators flavour),
with the probabilities of DESIGN §6, all per sample:

1. spatial: rotation (p 0.2) and scaling 0.7–1.4 (p 0.2) by :class:`SpatialTransform`, which also
   takes the final patch from the centre of the enlarged patch the sampler cut (see
   :func:`initial_patch_size`). Image: cubic spline, constant 0 outside. Label: order 1 through
   batchgenerators' per-label argmax (each label's indicator interpolated linearly, the best label
   kept), so the result only holds labels that were in the input — never a blend such as 1.5
   between 1 and 2. For anisotropic 3D patches the transform runs per slice in-plane (nnU-Net's
   "dummy 2D"). Rotation ranges are nnU-Net's: ±30° about each axis in 3D and in-plane for
   anisotropic 3D, ±180° in 2D (±15° when the patch's sides differ by more than 1.5×).
2. Gaussian noise (p 0.1), Gaussian blur σ 0.5–1 (p 0.2, per channel 0.5), multiplicative
   brightness 0.75–1.25 (p 0.15), contrast 0.75–1.25 (p 0.15), low-resolution simulation zoom
   0.5–1 (p 0.25, per channel 0.5, out-of-plane axis untouched when anisotropic), gamma 0.7–1.5 on
   the inverted (p 0.1) and on the plain image (p 0.3), both keeping mean and std.
3. mirroring of every patch axis with p 0.5 each.

For 2.5D the stacked neighbour slices are channels to batchgenerators, so the per-channel
intensity transforms (blur, brightness, contrast, low resolution, gamma) treat each slice on its
own, as they treat the modalities; the spatial transform and mirroring move all slices together.

batchgenerators draws from the *global* ``np.random`` and ``random`` states; :class:`GlobalRandomState`
installs a private seeded state around each call so runs are reproducible and the caller's global
state is left untouched.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from autoseg.errors import ConfigError

if TYPE_CHECKING:
    from autoseg.plans import Configuration, Topology


@dataclass(frozen=True)
class AugmentationSettings:
    """Augmentation probabilities and ranges (nnU-Net's defaults, DESIGN §6).

    Every ``p_*`` is a per-sample probability unless named ``*_per_channel``.

    Attributes:
        p_rotation: rotate (all three axes in 3D, in-plane in 2D and anisotropic 3D).
        rotation_deg_3d: ± range per axis for 3D and anisotropic ("dummy 2D") patches (nnU-Net: 30).
        rotation_deg_2d: ± range for 2D patches (nnU-Net: 180) ...
        rotation_deg_2d_elongated: ... or this one when the 2D patch's sides differ by > 1.5× (nnU-Net: 15).
        p_scale, scale: isotropic zoom factor range (> 1 shows more of the image).
        p_noise, noise_std: additive Gaussian noise; the std is drawn from this range.
        p_blur, blur_sigma, p_blur_per_channel: Gaussian blur.
        p_brightness, brightness: multiplicative brightness.
        p_contrast, contrast: contrast around the mean, clipped to the original range.
        p_low_res, low_res_zoom, p_low_res_per_channel: down- then up-sampling (nearest down, cubic up).
        p_gamma, p_gamma_inverted, gamma: gamma on the image and on the inverted image.
        mirror: mirror each patch axis with p 0.5 (batchgenerators' fixed per-axis probability).
        anisotropy_threshold: in-plane-only spatial augmentation when a 3D patch's axis-0 spacing
            exceeds this many times the in-plane spacing, or its in-plane size this many times its
            axis-0 size (nnU-Net: 3).
    """

    p_rotation: float = 0.2
    rotation_deg_3d: float = 30.0
    rotation_deg_2d: float = 180.0
    rotation_deg_2d_elongated: float = 15.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_res: float = 0.25
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    p_low_res_per_channel: float = 0.5
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    mirror: bool = True
    anisotropy_threshold: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"augmentation {f.name} must be a probability in [0, 1], not {value!r}")
            if isinstance(value, tuple):
                if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value) or value[0] > value[1]:
                    raise ConfigError(f"augmentation {f.name} must be a range [low, high] with low <= high, "
                                      f"not {list(value)!r}")
        for name in ("scale", "brightness", "contrast", "low_res_zoom", "gamma"):
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"augmentation {name} must be positive, not {list(getattr(self, name))}")
        if min(self.noise_std) < 0 or min(self.blur_sigma) < 0:
            raise ConfigError("augmentation noise_std and blur_sigma must be >= 0")
        if self.low_res_zoom[1] > 1:
            raise ConfigError(f"augmentation low_res_zoom must be <= 1 (a downsampling), not {list(self.low_res_zoom)}")
        for name in ("rotation_deg_3d", "rotation_deg_2d", "rotation_deg_2d_elongated"):
            if not 0.0 <= getattr(self, name) <= 180.0:
                raise ConfigError(f"augmentation {name} must be in [0, 180] degrees, not {getattr(self, name)}")
        if self.anisotropy_threshold <= 1:
            raise ConfigError(f"augmentation anisotropy_threshold must be > 1, not {self.anisotropy_threshold}")

    @property
    def spatial(self) -> bool:
        """Whether any spatial (rotation/scaling) augmentation can happen."""
        return self.p_rotation > 0 or self.p_scale > 0


# ----------------------------------------------------------------------------------------------
# What the plan implies


def is_anisotropic(config: Configuration, threshold: float = 3.0) -> bool:
    """Whether a 3D configuration gets in-plane-only ("dummy 2D") spatial augmentation.

    True when axis 0's spacing exceeds ``threshold`` × the coarsest in-plane spacing (rotating out
    of plane would interpolate across coarse slices), or when the patch's largest in-plane size
    exceeds ``threshold`` × its axis-0 size (nnU-Net's rule: a thin slab rotated out of plane needs
    far more slices than it has). Always False for 2D configurations.
    """
    if config.dims != 3:
        return False
    spacing, patch = config.spacing, config.patch_size
    return spacing[0] > threshold * max(spacing[1:]) or max(patch) / patch[0] > threshold


def rotation_range_deg(config: Configuration, settings: AugmentationSettings) -> float:
    """The ± rotation range in degrees for this configuration (nnU-Net's choice per case)."""
    if config.dims == 3:
        return settings.rotation_deg_3d
    patch = config.patch_size
    return settings.rotation_deg_2d_elongated if max(patch) / min(patch) > 1.5 else settings.rotation_deg_2d


def mirror_axes(config: Configuration) -> tuple[int, ...]:
    """Spatial axes mirrored in training, which are also the axes for mirroring TTA: the plan's
    ``mirror_axes`` (the planner leaves out the left-right axis for left/right labels), else all."""
    return config.mirrored_axes


def initial_patch_size(config: Configuration, settings: AugmentationSettings) -> tuple[int, ...]:
    """The patch the sampler cuts so that the rotated or scaled final patch lies inside it.

    Per axis the larger of (a) the bounding box of the final patch under any rotation in range —
    the three 3D rotations *composed*, as :class:`SpatialTransform` applies them, maximised over a
    grid of angles — and (b) the final patch × the largest zoom-out factor (1.4). Rotation and
    zoom-out > 1 together (p 0.2 × 0.1 = 2 % of samples) may reach past it into constant-0
    padding, as nnU-Net accepts for its smaller bound. The margin is made even per axis so the
    centre crop of untransformed samples and the centre of the transform's grid coincide exactly.
    Anisotropic 3D patches keep their axis-0 size (in-plane augmentation only).

    nnU-Net (``get_patch_size``) rotates about each axis separately and divides by the *smallest*
    scale (0.85): for 40×56×40 at ±30° that is 73×80×64, short of what composed rotations need on
    axes 0 and 2 (76 and 75) and of any zoom-out beyond 1.18. Ours is 78×82×78: 1.3× the voxels,
    but a transformed sample costs 40 ms against 38 ms (``benchmarks/bench_dataloader.py``, the
    spline prefilter of the input dominates), and it is exact for 98 % of samples.

    Args:
        config: the configuration (patch size, dims, spacing).
        settings: the augmentation settings.

    Returns:
        The initial patch size; the final patch size when no spatial augmentation is enabled.
    """
    final = np.asarray(config.patch_size, dtype=float)
    if not settings.spatial:
        return tuple(int(v) for v in final)
    in_plane = is_anisotropic(config, settings.anisotropy_threshold)
    axes = slice(1, None) if in_plane else slice(None)
    sizes = final[axes]
    extent = sizes.copy()
    if settings.p_scale > 0:
        extent = np.maximum(extent, sizes * max(settings.scale[1], 1.0))
    if settings.p_rotation > 0:
        extent = np.maximum(extent, _rotated_extent(sizes, math.radians(rotation_range_deg(config, settings))))
    initial = final.astype(int)
    # +2: one voxel each side covers the angle grid's under-estimate (< 0.6 voxel measured against
    # 20 000 random rotations up to 20×320×256) and the spline's support at the border.
    grown = np.ceil(extent - 1e-6).astype(int) + 2
    grown += (grown - initial[axes]) % 2  # even margin: see the docstring
    initial[axes] = grown
    return tuple(int(v) for v in initial)


def _rotated_extent(sizes: np.ndarray, max_angle: float) -> np.ndarray:
    """Largest bounding box of a box of ``sizes`` rotated by angles in ``[-max_angle, max_angle]``."""
    # 2D: 721 angles; 3D: 9 per axis (729 rotations), extremes included. The box's corners are
    # rotated with batchgenerators' own functions, so the composition order is the transform's.
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=len(sizes)))).T * sizes[:, None]
    best = sizes.astype(float).copy()
    if len(sizes) == 2:
        for angle in np.linspace(-max_angle, max_angle, 721):
            rotated = rotate_coords_2d(corners, angle)
            best = np.maximum(best, rotated.max(axis=1) - rotated.min(axis=1))
    else:
        grid = np.linspace(-max_angle, max_angle, 9)
        for ax, ay, az in itertools.product(grid, grid, grid):
            rotated = rotate_coords_3d(corners, ax, ay, az)
            best = np.maximum(best, rotated.max(axis=1) - rotated.min(axis=1))
    return best


# ----------------------------------------------------------------------------------------------
# Deep supervision


def deep_supervision_strides(topology: Topology) -> list[tuple[int, ...]]:
    """Cumulative stride of each decoder output, highest resolution first.

    One per stage except the bottleneck (nnU-Net: ``cumprod(strides)[:-1]``): a 4-stage
    topology with strides 1, 2, 2, 2 gives 1, 2, 4.
    """
    cumulative = np.cumprod(np.asarray(topology.strides, dtype=int), axis=0)
    return [tuple(int(s) for s in row) for row in cumulative[:-1]]


def downsample_seg(seg: np.ndarray, strides: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Label maps at each deep-supervision scale, by nearest-neighbour subsampling.

    Output voxel ``i`` takes input voxel ``s * i`` (``seg[..., ::s]``): a stride-``s`` convolution
    with ``padding = kernel // 2``, as the U-Net's encoder uses, centres its output ``i`` exactly
    there, so each target voxel is the label at the centre of the feature it supervises. Labels
    stay valid integers (no averaging; "max" pooling would favour high label values).

    Args:
        seg: ``(B, 1, *patch)`` integer labels.
        strides: cumulative strides per output (:func:`deep_supervision_strides`).

    Returns:
        One contiguous array per stride, ``(B, 1, *(patch // stride))``.

    Raises:
        ConfigError: a stride does not divide the patch.
    """
    out = []
    spatial = seg.shape[2:]
    for stride in strides:
        if len(stride) != len(spatial) or any(n % s for n, s in zip(spatial, stride)):
            raise ConfigError(f"deep-supervision stride {list(stride)} does not divide the patch {list(spatial)}")
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
        out.append(np.ascontiguousarray(seg[index]))
    return out


# ----------------------------------------------------------------------------------------------
# The transform pipeline


class Augmenter:
    """Spatial + intensity augmentation of one sampled batch, built from a configuration.

    Args:
        config: the configuration to train.
        settings: probabilities and ranges (default: DESIGN §6).

    Call it as ``image, seg = augmenter(image, seg)`` with the sampler's ``(B, C', *initial)``
    image and ``(B, 1, *initial)`` seg; it returns ``(B, C', *patch)`` float32 and
    ``(B, 1, *patch)`` int16. It draws from the global ``np.random`` / ``random`` states
    (batchgenerators' design); wrap calls in :class:`GlobalRandomState` for reproducibility.
    """

    def __init__(self, config: Configuration, settings: AugmentationSettings | None = None) -> None:
        self.settings = settings if settings is not None else AugmentationSettings()
        self.config = config
        self.patch_size = tuple(int(p) for p in config.patch_size)
        self.initial_patch_size = initial_patch_size(config, self.settings)
        self.in_plane_only = is_anisotropic(config, self.settings.anisotropy_threshold)
        self.transforms = Compose(self._build())

    def _build(self) -> list[AbstractTransform]:
        s = self.settings
        angle = math.radians(rotation_range_deg(self.config, s))
        spatial_patch = self.patch_size[1:] if self.in_plane_only else self.patch_size
        spatial = SpatialTransform(
            patch_size=spatial_patch,
            patch_center_dist_from_border=None,  # unused: random_crop=False, the sampler places patches
            do_elastic_deform=False, alpha=(0.0, 0.0), sigma=(0.0, 0.0), p_el_per_sample=0.0,
            do_rotation=s.p_rotation > 0, angle_x=(-angle, angle), angle_y=(-angle, angle),
            angle_z=(-angle, angle), p_rot_per_sample=s.p_rotation, p_rot_per_axis=1.0,
            do_scale=s.p_scale > 0, scale=s.scale, p_scale_per_sample=s.p_scale,
            independent_scale_for_each_axis=False,
            border_mode_data="constant", border_cval_data=0, order_data=3,
            border_mode_seg="constant", border_cval_seg=0, order_seg=1, seg_tiebreak="nearest",
            random_crop=False,
        )
        transforms: list[AbstractTransform] = (
            [_To2D(), spatial, _To3D()] if self.in_plane_only else [spatial]
        )
        transforms += [
            GaussianNoiseTransform(noise_variance=s.noise_std, p_per_sample=s.p_noise),
            GaussianBlurTransform(blur_sigma=s.blur_sigma, different_sigma_per_channel=True,
                                  p_per_sample=s.p_blur, p_per_channel=s.p_blur_per_channel),
            BrightnessMultiplicativeTransform(multiplier_range=s.brightness, per_channel=True,
                                              p_per_sample=s.p_brightness),
            ContrastAugmentationTransform(contrast_range=s.contrast, preserve_range=True, per_channel=True,
                                          p_per_sample=s.p_contrast),
            SimulateLowResolutionTransform(zoom_range=s.low_res_zoom, per_channel=True,
                                           p_per_channel=s.p_low_res_per_channel, order_downsample=0,
                                           order_upsample=3, p_per_sample=s.p_low_res,
                                           ignore_axes=(0,) if self.in_plane_only else None),
            GammaTransform(gamma_range=s.gamma, invert_image=True, per_channel=True, retain_stats=True,
                           p_per_sample=s.p_gamma_inverted),
            GammaTransform(gamma_range=s.gamma, invert_image=False, per_channel=True, retain_stats=True,
                           p_per_sample=s.p_gamma),
        ]
        if s.mirror and mirror_axes(self.config):
            transforms.append(MirrorTransform(axes=mirror_axes(self.config), p_per_sample=1))
        return transforms

    def __call__(self, image: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment a batch; see the class docstring for shapes.

        Raises:
            ValueError: the input is not the initial patch size.
        """
        if tuple(image.shape[2:]) != self.initial_patch_size or tuple(seg.shape[2:]) != self.initial_patch_size:
            raise ValueError(f"expected patches of {self.initial_patch_size}, got image {image.shape} "
                             f"and seg {seg.shape}")
        out = self.transforms(data=image, seg=seg)
        data = np.ascontiguousarray(out["data"], dtype=np.float32)
        # The seg comes back float32 holding exact label values (argmax resampling); back to int16.
        labels = np.rint(out["seg"]).astype(np.int16)
        return data, labels


class _To2D(AbstractTransform):
    """(B, C, Z, Y, X) -> (B, C·Z, Y, X), so the spatial transform works per slice (nnU-Net's dummy 2D)."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data, seg = data_dict["data"], data_dict["seg"]
        data_dict["_shapes"] = (data.shape, seg.shape)
        data_dict["data"] = data.reshape(data.shape[0], -1, *data.shape[3:])
        data_dict["seg"] = seg.reshape(seg.shape[0], -1, *seg.shape[3:])
        return data_dict


class _To3D(AbstractTransform):
    """Inverse of :class:`_To2D` with the new in-plane size."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        (data_shape, seg_shape) = data_dict.pop("_shapes")
        data, seg = data_dict["data"], data_dict["seg"]
        data_dict["data"] = data.reshape(*data_shape[:3], *data.shape[2:])
        data_dict["seg"] = seg.reshape(*seg_shape[:3], *seg.shape[2:])
        return data_dict


class GlobalRandomState:
    """A private, seeded ``np.random`` + ``random`` state installed around a block.

    On entry the caller's global states are saved and this object's installed; on exit this
    object's (advanced) states are kept for the next block and the caller's restored. Not
    thread-safe: it swaps process-global state.

    Args:
        seed: seed of both generators (e.g. from ``np.random.SeedSequence.generate_state``).
    """

    def __init__(self, seed: int) -> None:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self._np, self._py = np.random.get_state(), random.getstate()
        np.random.set_state(saved_np)
        random.setstate(saved_py)
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> GlobalRandomState:
        self._saved = (np.random.get_state(), random.getstate())
        np.random.set_state(self._np)
        random.setstate(self._py)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._np, self._py = np.random.get_state(), random.getstate()
        if self._saved is not None:
            np.random.set_state(self._saved[0])
            random.setstate(self._saved[1])
            self._saved = None


__all__ = [
    "AugmentationSettings", "Augmenter", "GlobalRandomState", "deep_supervision_strides",
    "downsample_seg", "initial_patch_size", "is_anisotropic", "mirror_axes", "rotation_range_deg",
]
