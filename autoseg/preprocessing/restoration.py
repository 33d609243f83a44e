"""Restoration preprocessing: a degraded image and its clean target through the same forward pass.

The input goes through :func:`autoseg.preprocessing.pipeline.preprocess_case` exactly as a
segmentation image (transpose, crop to the nonzero box, normalise, cubic resampling), and the target
follows it with the *input's* crop box, the *input channel's* normalisation and the same cubic
resampling (:func:`target_on_grid`), so the pair stays aligned voxel for voxel. Instead of class
locations, the props hold up to 10 000 body voxels (:func:`autoseg.dataset.restoration.body_mask`)
from which the sampler draws patch centres.

Restoration normalises with the ``linear`` scheme, ``(x - mean) / std`` without clipping, so the
inverse (:func:`denormalize`) gives back air, soft tissue and bone with their own HU.
"""

from __future__ import annotations

import numpy as np

from autoseg.dataset.restoration import body_mask
from autoseg.imageio import Geometry
from autoseg.plans import Configuration, Normalization, Plans
from autoseg.preprocessing.normalization import normalize_channel
from autoseg.preprocessing.pipeline import Props, case_seed, class_locations, preprocess_case
from autoseg.preprocessing.resample import resample_image, resample_nearest

#: The props key of the body locations: the sampler reads them as class 1's locations.
BODY_CLASS = 1


def denormalize(values: np.ndarray, norm: Normalization) -> np.ndarray:
    """The inverse of the ``linear`` scheme: ``values * std + mean`` (float32, a new array).

    Raises:
        ValueError: ``norm`` is not an invertible scheme (only ``linear`` is).
    """
    if norm.scheme != "linear" or norm.mean is None or norm.std is None:
        raise ValueError(f"normalisation scheme {norm.scheme!r} is not invertible; restoration needs 'linear'")
    out = np.asarray(values, dtype=np.float32) * np.float32(norm.std)
    out += np.float32(norm.mean)
    return out


def _crop(array: np.ndarray, props: Props) -> np.ndarray:
    """``(C, Z, Y, X)`` in the original order -> transposed and cropped to the props' box (a view)."""
    transpose = tuple(int(a) for a in props["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in props["bbox"])
    return array.transpose(0, *(a + 1 for a in transpose))[(slice(None), *box)]


def target_on_grid(target: np.ndarray, props: Props, config: Configuration) -> np.ndarray:
    """A clean target on its input's preprocessed grid: the input's transpose, crop box,
    normalisation (per channel, the input channel's parameters) and cubic resampling.

    Args:
        target: ``(C, Z, Y, X)`` in the input's original grid.
        props: the input's props (:func:`autoseg.preprocessing.pipeline.preprocess_case`).
        config: the configuration (normalisation, resampling orders).

    Returns:
        float32 ``(C, z, y, x)`` of ``props["shape_after_resample"]``.

    Raises:
        ValueError: the target does not have the input's shape or channel count.
    """
    if tuple(target.shape[1:]) != tuple(props["shape_original"]) or target.shape[0] != len(config.normalization):
        raise ValueError(f"target of shape {target.shape} for an input of {props['channels']} channel(s) and shape "
                         f"{tuple(props['shape_original'])}")
    cropped = _crop(target, props)
    data = np.empty(cropped.shape, dtype=np.float32)
    for c, norm in enumerate(config.normalization):
        data[c] = normalize_channel(cropped[c], norm.scheme, clip=norm.clip, mean=norm.mean, std=norm.std)
    resampling = config.resampling
    return np.ascontiguousarray(resample_image(data, props["shape_after_resample"], resampling.image_order,
                                               props["separate_axis"], resampling.order_z))


def body_locations(image: np.ndarray, props: Props, channel_names: tuple[str, ...],
                   case_id: str) -> dict[str, list[list[int]]]:
    """Up to 10 000 body voxels of the input on its preprocessed grid, as class :data:`BODY_CLASS`'s
    locations (seeded by the case id, so the same on every run)."""
    mask = body_mask(_crop(image, props), channel_names).astype(np.int8)
    on_grid = resample_nearest(mask, props["shape_after_resample"])
    return class_locations(on_grid, [BODY_CLASS], case_seed(case_id))


def preprocess_pair(image: np.ndarray, target: np.ndarray | None, geometry: Geometry, plans: Plans,
                    config_name: str, *, case_id: str = "") -> tuple[np.ndarray, np.ndarray | None, Props]:
    """Preprocess a restoration case: the input as any image, the target alongside it.

    Args:
        image: the degraded image ``(C, Z, Y, X)`` as read.
        target: the clean target ``(C, Z, Y, X)`` on the image's grid, or None (prediction).
        geometry: the image's geometry.
        plans: the plans (a ``linear`` normalisation per channel).
        config_name: the configuration.
        case_id: the case (recorded; seeds the body locations).

    Returns:
        ``data`` float32 ``(C, z, y, x)``, ``target`` float32 ``(C, z, y, x)`` or None, and the props
        (with the body locations as ``class_locations``).

    Raises:
        PlanError: ``config_name`` is not in the plans.
        ValueError: the target does not fit the image.
    """
    data, _, props = preprocess_case(image, None, geometry, plans, config_name, case_id=case_id)
    config = plans.configuration(config_name)
    on_grid = None if target is None else target_on_grid(target, props, config)
    if target is not None:
        props["class_locations"] = body_locations(image, props, plans.channel_names, case_id)
    return data, on_grid, props


__all__ = ["BODY_CLASS", "body_locations", "denormalize", "preprocess_pair", "target_on_grid"]
