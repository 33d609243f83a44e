"""Per-voxel uncertainty maps of a prediction (``autoseg predict --save-uncertainty``).

Two maps, each in [0, 1] and written in the input's exact geometry (size, spacing, origin,
direction) as float32 images beside the label map:

* ``<case>_entropy``: the normalised Shannon entropy ``H(p) / log(K)`` of the class probabilities
  ``p`` whose argmax is the label map (softmax of the folds' mean logits, configurations averaged
  in the original grid: exactly what ``--save-probabilities`` writes). 0 where one class holds all
  the probability, 1 where the ``K`` classes are equally likely. It sees every source of doubt, in
  the image (noise, partial volume) as in the model. Region-based labels (independent sigmoid
  outputs, :mod:`autoseg.regions`): the mean over the ``R`` outputs of the binary entropy
  ``H_b(p_r) / log 2``, which is the joint entropy of the independent outputs over ``R log 2``.
* ``<case>_disagreement``: how much the folds disagree on the label: the fraction of pairs of
  folds whose labels differ at the voxel (each fold's label is the argmax of its own logits,
  sliding window and TTA included; for region-based labels, :func:`autoseg.regions.regions_to_labels`
  of its own sigmoids). 0 where every fold draws the same label; 1 where two folds
  draw different labels, or more generally where every fold draws its own; 5 folds split 4 to 1
  give 0.4, 3 to 2 give 0.6. With one fold it is 0 everywhere: a single model cannot disagree
  with itself.

Why pairwise label disagreement rather than the fraction of folds that differ from the ensemble,
or the variance or KL divergence of the folds' probabilities: it is symmetric in the folds (no
reference label whose own noise enters the map), reads as a probability (that two folds drawn at
random disagree), spans [0, 1] for any number of folds (against the ensemble, two folds that
differ give 0.5 at most), is insensitive to how confident (how well calibrated) each fold's
softmax is, and needs one uint8 volume per fold at network resolution instead of ``K`` float
volumes, so the memory stays that of a normal prediction plus one logits volume. The entropy map
already carries the spread of the probabilities.

Both maps are computed at network resolution (the disagreement per configuration, in
:meth:`autoseg.inference.predictor.Predictor.predict`) or class by class in the crop box (the entropy) and
resampled back with the inverse of the preprocessing used for the probabilities (linear, separate
axis for anisotropic spacing): no ``(K, Z, Y, X)`` float array at the original resolution. Outside
the crop box (background by construction) both are 0. With several configurations the
disagreement maps (each among the folds of one configuration) are averaged, weighted by the
configurations' fold counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.imageio import Geometry, write_image

if TYPE_CHECKING:
    from autoseg.tasks.base import ConfigPrediction
    from autoseg.preprocessing.pipeline import Props

#: The two maps, in the order written; ``<case>_<name><ending>``.
MAP_NAMES: tuple[str, str] = ("entropy", "disagreement")
#: Label-map endings that store float voxels; any other (PNG, BMP, TIF) gets ``.nii.gz`` maps.
_FLOAT_ENDINGS = frozenset({".nii.gz", ".nii", ".nrrd", ".mha"})


def uncertainty_paths(output: Path, case_id: str, ending: str) -> tuple[Path, Path]:
    """The entropy and disagreement files of a case whose label map has ``ending``.

    Args:
        output: the output folder.
        case_id: the case's name.
        ending: the label map's ending (``.nii.gz``, ``.png``, ...).

    Returns:
        ``(<case>_entropy<ending>, <case>_disagreement<ending>)``; ``.nii.gz`` for endings that
        cannot hold float voxels.
    """
    ending = ending if ending.lower() in _FLOAT_ENDINGS else ".nii.gz"
    entropy, disagreement = (Path(output) / f"{case_id}_{name}{ending}" for name in MAP_NAMES)
    return entropy, disagreement


def entropy_term(probability: np.ndarray) -> np.ndarray:
    """``-p log p`` per voxel, float32, with ``0 log 0 = 0`` (the limit).

    Probabilities are clipped to [0, 1] first: linear resampling keeps them there, float rounding
    may not by an ulp.
    """
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
    term = np.zeros(p.shape, dtype=np.float32)
    positive = p > 0
    term[positive] = -p[positive] * np.log(p[positive])
    return term


def binary_entropy_term(probability: np.ndarray) -> np.ndarray:
    """``H_b(p) = -p log p - (1 - p) log(1 - p)`` per voxel, float32 (one sigmoid output)."""
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
    return entropy_term(p) + entropy_term(1.0 - p)


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """``H(p) / log(K)`` over the first axis of ``(K, ...)`` probabilities, float32 in [0, 1].

    Raises:
        ValueError: fewer than two classes (the entropy is then undefined).
    """
    num_classes = probabilities.shape[0]
    if num_classes < 2:
        raise ValueError(f"normalised entropy needs at least 2 classes, got {num_classes}")
    total = np.zeros(probabilities.shape[1:], dtype=np.float32)
    for k in range(num_classes):
        total += entropy_term(probabilities[k])
    return np.clip(total / np.float32(math.log(num_classes)), 0.0, 1.0)


def fold_disagreement(fold_labels: Sequence[np.ndarray]) -> np.ndarray:
    """The fraction of pairs of folds whose label maps differ, voxel by voxel.

    Args:
        fold_labels: one label map per fold, all of one shape.

    Returns:
        float32 map in [0, 1]; zeros for a single fold.

    Raises:
        ValueError: no fold, or the shapes differ.
    """
    if not fold_labels:
        raise ValueError("no fold label map")
    shape = fold_labels[0].shape
    count = np.zeros(shape, dtype=np.float32)
    for i, labels in enumerate(fold_labels):
        if labels.shape != shape:
            raise ValueError(f"fold label maps of shapes {shape} and {labels.shape}")
        for other in fold_labels[:i]:
            count += labels != other
    pairs = len(fold_labels) * (len(fold_labels) - 1) // 2
    return count / np.float32(pairs) if pairs else count


def uncertainty_maps(predictions: Sequence["ConfigPrediction"],
                     regions: bool = False) -> tuple[np.ndarray, np.ndarray, "Props"]:
    """The normalised entropy and the fold disagreement in the crop box of the original grid.

    The entropy is accumulated class by class: each class's probability is resampled to the crop
    box and averaged over configurations as :func:`autoseg.tasks.segmentation_export.export_prediction` does, so the
    working memory is a few float32 crop volumes whatever the number of classes.

    Args:
        predictions: one per configuration, of one image; ``disagreement`` set on each
            (``Predictor.predict(..., uncertainty=True)``).
        regions: the probabilities are independent sigmoid region outputs (mean binary entropy),
            not softmax classes.

    Returns:
        ``(entropy, disagreement, props)``: float32 crop-box maps (transposed axes, as the
        preprocessing leaves them) and the props that place them in the original grid.

    Raises:
        ValueError: no prediction, a prediction without its disagreement map, or predictions that
            disagree on the crop box or the number of classes (a caller's bug).
    """
    from autoseg.preprocessing.pipeline import to_crop

    if not predictions:
        raise ValueError("no prediction")
    first = predictions[0].props
    num_classes = predictions[0].probabilities.shape[0]
    for p in predictions:
        if p.disagreement is None:
            raise ValueError(f"{p.configuration}: predicted without uncertainty=True")
        if p.props["bbox"] != first["bbox"] or p.probabilities.shape[0] != num_classes:
            raise ValueError("predictions of one image disagree on the crop box or the number of classes")
    entropy: np.ndarray | None = None
    for k in range(num_classes):
        mean: np.ndarray | None = None
        for p in predictions:
            part = np.asarray(to_crop(p.probabilities[k], p.props), dtype=np.float32)
            if mean is None:
                mean = part.copy()  # a copy: resampling may return a view of the probabilities
            else:
                mean += part
        assert mean is not None
        mean /= np.float32(len(predictions))
        term = binary_entropy_term(mean) if regions else entropy_term(mean)
        if entropy is None:
            entropy = term
        else:
            entropy += term
    assert entropy is not None
    # Normalised by the maximum: log K for K classes, R log 2 for R independent binary outputs.
    scale = num_classes * math.log(2) if regions else math.log(max(num_classes, 2))
    entropy = np.clip(entropy / np.float32(scale), 0.0, 1.0)
    folds = sum(p.folds for p in predictions)
    disagreement = np.zeros(entropy.shape, dtype=np.float32)
    for p in predictions:
        assert p.disagreement is not None
        disagreement += np.float32(p.folds / folds) * to_crop(p.disagreement, p.props)
    return entropy, np.clip(disagreement, 0.0, 1.0), first


def to_original(crop_map: np.ndarray, props: "Props") -> np.ndarray:
    """A crop-box map pasted into the original grid (axes restored, 0 outside the crop box)."""
    shape = tuple(int(s) for s in props["shape_original"])
    transpose = tuple(int(a) for a in props["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in props["bbox"])
    full = np.zeros(shape, dtype=np.float32)
    full.transpose(transpose)[box] = crop_map
    return full


def export_uncertainty(predictions: Sequence["ConfigPrediction"], geometry: Geometry,
                       paths: tuple[Path, Path] | None = None, regions: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both maps in the original geometry; written (atomically, float32) when ``paths`` is given.

    Args:
        predictions: as for :func:`uncertainty_maps`.
        geometry: the input's geometry, written as it is.
        paths: ``(entropy, disagreement)`` files (:func:`uncertainty_paths`), or None.
        regions: sigmoid region outputs (see :func:`uncertainty_maps`).

    Returns:
        ``(entropy, disagreement)``, float32 ``(Z, Y, X)`` in [0, 1].
    """
    entropy, disagreement, props = uncertainty_maps(predictions, regions)
    maps = (to_original(entropy, props), to_original(disagreement, props))
    if paths is not None:
        for path, volume in zip(paths, maps):
            write_image(Path(path), volume, geometry)
    return maps
