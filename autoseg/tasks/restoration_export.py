"""Restoration's export: the networks' correction on their grid -> the restored image in the input's
exact geometry, units and pixel type.

The predictor keeps, per configuration, the fold- and mirror-averaged *correction* on the network
grid (restored minus input, normalised units; :meth:`autoseg.tasks.restoration.Denoise.on_grid`).
Here it is resampled back to the crop box (linear, separate axis as the forward pass; a no-op when
the plan's spacing is the image's), averaged over configurations, scaled to HU by the channel's
``std`` (the ``mean`` of the invertible normalisation cancels in a difference) and added to the
input *as read*. So a zero correction gives back the input exactly, resampling never blurs what the
network left alone, and outside the crop box the input's own values stay. Integer inputs are
rounded and clipped to their pixel type's range (int16 stays int16).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.dataset.restoration import CT_PADDING_VALUES
from autoseg.imageio import Geometry, write_image
from autoseg.plans import Normalization
from autoseg.tasks.base import ConfigPrediction


def to_input_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values as ``dtype``: integers rounded half to even and clipped to the type's range."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return values > 0.5
    return values.astype(dtype)


def restored_image(predictions: Sequence[ConfigPrediction], normalization: Sequence[Normalization]) -> np.ndarray:
    """The restored image ``(C, Z, Y, X)`` in the input's grid and pixel type.

    Args:
        predictions: one per configuration, of one image (same crop box), each holding its
            correction ``(C, z, y, x)`` as ``probabilities`` and the input ``image`` as read.
        normalization: the channels' ``linear`` normalisation (its ``std`` scales the correction).

    Returns:
        The input plus the mean correction, of the input's dtype; voxels of scanner padding
        (:data:`autoseg.dataset.restoration.CT_PADDING_VALUES`) keep the input's value.

    Raises:
        ValueError: no prediction, no input image kept, or predictions that disagree (a bug).
    """
    from autoseg.preprocessing.pipeline import to_crop

    if not predictions:
        raise ValueError("no prediction to export")
    image = predictions[0].image
    if image is None:
        raise ValueError("a restoration export needs the input image (ConfigPrediction.image)")
    first = predictions[0].props
    channels = predictions[0].probabilities.shape[0]
    for p in predictions[1:]:
        if p.props["bbox"] != first["bbox"] or p.probabilities.shape[0] != channels:
            raise ValueError("predictions of one image disagree on the crop box or the number of channels")
    if channels != image.shape[0] or len(normalization) != channels:
        raise ValueError(f"{channels} correction channel(s) for an image of {image.shape[0]} and "
                         f"{len(normalization)} normalisation(s)")
    transpose = tuple(int(a) for a in first["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in first["bbox"])
    out = np.empty(image.shape, dtype=image.dtype)
    for c in range(channels):
        correction = None
        for p in predictions:
            part = to_crop(p.probabilities[c], p.props)
            correction = part.astype(np.float32, copy=True) if correction is None else correction + part
        assert correction is not None
        correction *= np.float32(float(normalization[c].std) / len(predictions))
        restored = image[c].astype(np.float32, copy=True)
        restored.transpose(transpose)[box] += correction
        # Scanner padding (-3024, -2048, ...) is not anatomy: it keeps its exact value, which viewers
        # and DICOM readers match to mask it (a learned correction is about 0 there, never exactly).
        padding = np.isin(image[c], CT_PADDING_VALUES)
        restored[padding] = image[c][padding]
        out[c] = to_input_dtype(restored, image.dtype)
    return out


def export_restored(predictions: Sequence[ConfigPrediction], geometry: Geometry, normalization: Sequence[Normalization],
                    path: Path | None = None) -> np.ndarray:
    """:func:`restored_image`, written to ``path`` (atomically, format from the ending) if given.

    Returns:
        ``(Z, Y, X)`` for a one-channel image, else ``(C, Z, Y, X)``.
    """
    out = restored_image(predictions, normalization)
    if path is not None:
        if out.shape[0] != 1:
            raise ValueError(f"{path}: writing a {out.shape[0]}-channel restored image is not supported")
        write_image(Path(path), out[0], geometry)
    return out[0] if out.shape[0] == 1 else out
