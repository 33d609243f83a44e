"""Restoration training data: image/target pairs, patches drawn over the body, and augmentation that
keeps the noise honest — pure numpy, no torch.

Sampling. There are no labels to oversample: every patch is centred on a voxel drawn uniformly from
the case's body voxels (up to 10 000 stored by the preprocessor,
:func:`autoseg.preprocessing.restoration.body_locations`; a case without them gets a uniform
position), the case uniformly with replacement. The patch bounds are the segmentation sampler's
(:func:`autoseg.data.sampler._patch_start`), and 2.5D inputs stack neighbour slices exactly as it
does (:func:`autoseg.data.sampler.stack_context`); the target is the centre slice's channels.

Augmentation, applied identically to input and target, per sample:

* mirroring of every patch axis with p 0.5;
* rotation by a multiple of 90° in-plane (the last two axes), when the in-plane patch is square and
  its two spacings equal (otherwise only 0° or 180°).

Nothing else, on purpose. Intensity transforms (brightness, contrast, gamma, added noise, blur,
low-resolution simulation) change the noise's level or spectrum relative to the signal, which is
what the network must learn to remove; interpolating rotations and scaling resample the noise with a
spline, which low-pass filters it and correlates neighbouring voxels, so the network would learn a
noise the scanner never makes. Flips and 90° rotations only permute voxels: the noise statistics of
each pair are untouched (CT noise is not rotation-invariant in every detail, streaks follow the
scan geometry, but a permuted pair is still a real low-dose/full-dose pair).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.data.sampler import _LOCATIONS, _open_npy, _patch_start, crop_padded, stack_context
from autoseg.errors import ConfigError, DatasetError
from autoseg.plans import Configuration

#: The class id under which the preprocessor stores body locations (class_locations["1"]).
BODY_CLASS = 1


class PairCase:
    """One preprocessed restoration case: input ``(C, Z, Y, X)``, target ``(C_t, Z, Y, X)``, body voxels.

    As :class:`autoseg.data.sampler.Case`, a case from disk holds only its folder and id, opens a
    fresh read-only memory map on every access and pickles small.

    Args:
        case_id: the case.
        image: the normalised input.
        target: the normalised clean target, same spatial shape.
        body: ``(n, 3)`` voxels to centre patches on (default: none, patches are placed uniformly).

    Raises:
        DatasetError: the shapes do not fit together.
    """

    def __init__(self, case_id: str, image: np.ndarray, target: np.ndarray, body: np.ndarray | None = None) -> None:
        _check_pair(case_id, image, target)
        self.case_id = case_id
        self._folder: Path | None = None
        self._image: np.ndarray | None = image
        self._target: np.ndarray | None = target
        self._shape = tuple(int(s) for s in image.shape[1:])
        self._channels = int(image.shape[0])
        self._body = np.zeros((0, 3), dtype=np.int64) if body is None else np.asarray(body, dtype=np.int64)

    @classmethod
    def from_folder(cls, folder: Path, case_id: str) -> PairCase:
        """The pair in ``folder``: ``<case>.npy``, ``<case>_target.npy``, ``<case>.json``.

        Raises:
            DatasetError: a file is missing or unreadable, or the shapes do not match.
        """
        case = cls.__new__(cls)
        case.case_id, case._folder = case_id, Path(folder)
        case._image = case._target = None
        case._body = None
        image, target = case.image, case.target
        _check_pair(case_id, image, target)
        case._shape = tuple(int(s) for s in image.shape[1:])
        case._channels = int(image.shape[0])
        if not case._path(".json").is_file():
            raise DatasetError(f"{case._path('.json')}: missing; re-run 'autoseg preprocess'")
        return case

    @property
    def image(self) -> np.ndarray:
        return self._image if self._image is not None else _open_npy(self._path(".npy"))

    @property
    def target(self) -> np.ndarray:
        return self._target if self._target is not None else _open_npy(self._path("_target.npy"))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def body(self) -> np.ndarray:
        """``(n, 3)`` body voxels (the props' class 1 locations); possibly empty."""
        if self._body is not None:
            return self._body
        return _LOCATIONS.get(self._path(".json"), self._shape).get(BODY_CLASS, np.zeros((0, 3), dtype=np.int64))

    def _path(self, suffix: str) -> Path:
        if self._folder is None:
            raise RuntimeError("an in-memory case has no folder")
        return self._folder / f"{self.case_id}{suffix}"

    def __repr__(self) -> str:
        where = f", folder={str(self._folder)!r}" if self._folder is not None else ""
        return f"PairCase({self.case_id!r}{where})"


def _check_pair(case_id: str, image: np.ndarray, target: np.ndarray) -> None:
    if image.ndim != 4 or target.ndim != 4 or tuple(image.shape[1:]) != tuple(target.shape[1:]):
        raise DatasetError(f"case {case_id!r}: image {tuple(image.shape)} and target {tuple(target.shape)} must both "
                           "be (C, Z, Y, X) with the same spatial shape; re-run 'autoseg preprocess'")
    if target.dtype.kind != "f":
        raise DatasetError(f"case {case_id!r}: the target must be a float image, got {target.dtype}; re-run "
                           "'autoseg preprocess'")


def load_pairs(folder: Path, case_ids: Sequence[str] | None = None) -> list[PairCase]:
    """Open the preprocessed restoration cases of one configuration.

    Args:
        folder: ``WORK/preprocessed/<config>``.
        case_ids: which cases (default: every ``<case>_target.npy`` there).

    Raises:
        DatasetError: the folder or a case's files are missing or inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: preprocessed folder not found; run 'autoseg preprocess' first")
    if case_ids is None:
        case_ids = sorted(p.name[: -len("_target.npy")] for p in folder.glob("*_target.npy"))
    if not case_ids:
        raise DatasetError(f"{folder}: no preprocessed restoration pairs; run 'autoseg preprocess' first")
    return [PairCase.from_folder(folder, case_id) for case_id in case_ids]


def sample_pairs(cases: Sequence[PairCase], patch_size: Sequence[int], batch_size: int, rng: np.random.Generator,
                 context_slices: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A batch of aligned input/target patches centred on body voxels.

    Args:
        cases: the cases (drawn uniformly with replacement).
        patch_size: 3 values (3D) or 2 (2D/2.5D slices along axis 0).
        batch_size: patches per batch.
        rng: the only source of randomness.
        context_slices: 2.5D: ``k`` neighbours on each side of the slice as input channels.

    Returns:
        ``image`` float32 ``(B, C (2k + 1), *patch)``, ``target`` float32 ``(B, C_t, *patch)`` (the
        centre slice's), and the case ids. Beyond the image both are padded with 0 (the mean).

    Raises:
        ConfigError: bad options.
    """
    patch = tuple(int(p) for p in patch_size)
    if not cases:
        raise ConfigError("no cases to sample from; check the split and the preprocessed folder")
    if len(patch) not in (2, 3) or any(p < 1 for p in patch) or batch_size < 1:
        raise ConfigError(f"patch_size must be 2 or 3 positive values and batch_size >= 1, got {list(patch)} "
                          f"and {batch_size}")
    if context_slices < 0 or (context_slices and len(patch) != 2):
        raise ConfigError(f"context_slices must be >= 0 and only used with 2D patches, got {context_slices}")
    channels = cases[0].channels * (2 * context_slices + 1)
    target_channels = int(cases[0].target.shape[0])
    image = np.zeros((batch_size, channels, *patch), dtype=np.float32)
    target = np.zeros((batch_size, target_channels, *patch), dtype=np.float32)
    ids = []
    for i, index in enumerate(rng.integers(len(cases), size=batch_size)):
        case = cases[int(index)]
        body = case.body
        voxel = body[int(rng.integers(len(body)))] if len(body) else None
        shape, case_image, case_target = case.shape, case.image, case.target
        if case_image.shape[0] * (2 * context_slices + 1) != channels or case_target.shape[0] != target_channels:
            raise DatasetError(f"case {case.case_id!r} has other channels than case {cases[0].case_id!r}; re-run "
                               "'autoseg preprocess'")
        if len(patch) == 3:
            start = _patch_start(shape, patch, patch, voxel, rng)
            image[i] = crop_padded(case_image, start, patch)
            target[i] = crop_padded(case_target, start, patch)
        else:
            z = int(voxel[0]) if voxel is not None else int(rng.integers(shape[0]))
            start = _patch_start(shape[1:], patch, patch, None if voxel is None else voxel[1:], rng)
            image[i] = stack_context(case_image, z, context_slices, start, patch)
            target[i] = crop_padded(case_target[:, z], start, patch)
        ids.append(case.case_id)
    return image, target, tuple(ids)


def rotation_allowed(config: Configuration) -> bool:
    """Whether 90° in-plane rotations keep a patch's shape and voxel size: the last two axes of the
    patch are equal and so are their spacings (to 0.1 %)."""
    patch, spacing = config.patch_size, config.spacing
    return patch[-1] == patch[-2] and abs(spacing[-1] - spacing[-2]) <= 1e-3 * max(spacing[-1], spacing[-2])


def augment_pairs(image: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                  rotate_90: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mirror every patch axis with p 0.5 and rotate in-plane by k·90° (k uniform in 0..3 when
    ``rotate_90``, else 0 or 2), the same for a sample's input and target.

    Args:
        image: ``(B, C, *patch)``.
        target: ``(B, C_t, *patch)``.
        rng: the only source of randomness.
        rotate_90: allow quarter turns (a square in-plane patch of isotropic in-plane spacing).

    Returns:
        New contiguous arrays of the same shapes.
    """
    image_out, target_out = np.empty_like(image), np.empty_like(target)
    spatial = image.ndim - 2
    for b in range(image.shape[0]):
        axes = [1 + a for a in range(spatial) if rng.random() < 0.5]  # axes of one sample (C, *patch)
        turns = int(rng.integers(4)) if rotate_90 else 2 * int(rng.integers(2))
        x, y = image[b], target[b]
        if axes:
            x, y = np.flip(x, axes), np.flip(y, axes)
        if turns:
            x, y = np.rot90(x, turns, axes=(-2, -1)), np.rot90(y, turns, axes=(-2, -1))
        image_out[b], target_out[b] = x, y
    return image_out, target_out


class PairProducer:
    """Produces restoration batches: sample pairs, augment them. Torch-free; runs in loader workers.

    Takes :class:`autoseg.data.loader.BatchProducer`'s arguments, so that the loader can run either
    (the ones without meaning here — oversampling, deep supervision, nnU-Net's augmentation
    settings — are accepted and ignored).

    Args:
        cases: :class:`PairCase` objects.
        config: the configuration (patch, batch size, 2.5D context, spacing).
        seed_sequence: the only source of randomness.
        augment: flips and 90° rotations (False for validation batches).
        batch_size: default ``config.batch_size``.
    """

    def __init__(self, cases: Sequence[PairCase], config: Configuration, seed_sequence: np.random.SeedSequence, *,
                 augment: bool = True, oversample: float = 0.0, batch_size: int | None = None,
                 deep_supervision: bool = False, settings: Any = None) -> None:
        self.cases = list(cases)
        self.config = config
        self.batch_size = config.batch_size if batch_size is None else batch_size
        self.augment = augment
        self.rotate_90 = rotation_allowed(config)
        sampler_seed, augment_seed = seed_sequence.spawn(2)
        self.rng = np.random.default_rng(sampler_seed)
        self.augment_rng = np.random.default_rng(augment_seed)
        # Fail in the caller, not in a worker.
        sample_pairs(self.cases[:1], config.patch_size, 1, np.random.default_rng(0), config.context_slices)

    def next(self) -> dict[str, Any]:
        """One batch as numpy: ``{"image", "target": [target], "case_ids"}`` (float32)."""
        image, target, ids = sample_pairs(self.cases, self.config.patch_size, self.batch_size, self.rng,
                                          self.config.context_slices)
        if self.augment:
            image, target = augment_pairs(image, target, self.augment_rng, self.rotate_90)
        return {"image": image, "target": [target], "case_ids": ids}


__all__ = ["PairCase", "PairProducer", "augment_pairs", "load_pairs", "rotation_allowed", "sample_pairs"]
