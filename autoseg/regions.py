"""Region-based labels (nnU-Net's regions): the network's outputs and how they become a label map.

A dataset is *region-based* when one of its labels declares several values
(``{"background": 0, "whole": [1, 2], "core": 2}``). Then, as in nnU-Net v2, the network has one
sigmoid output per label except background, in the order of the plans' ``labels`` (background
first, then single labels by value, then regions by values: :func:`autoseg.dataset.layout.parse_labels`
sorts them, so the order does not depend on how dataset.json lists them). Output ``r`` is trained
on the mask "voxel value is one of ``values_r``": ``voxels == 2`` for ``core``, ``voxels in {1, 2}``
for ``whole``. Label maps on disk stay integer maps; the masks are made on the fly.

Export rule (:func:`regions_to_labels`). Each voxel gets the label value ``v`` whose region
membership is the most probable under the independent sigmoids, i.e. the ``v`` maximising
``sum(logit_r for the outputs r whose values contain v)`` (background, in no output, scores 0).
Whenever thresholding every output at 0.5 gives a combination some value has, that value wins, so
the rule *is* "threshold at 0.5" on consistent predictions; it also resolves inconsistent ones
("core" but not "whole") by the more confident output instead of by a declared order. Exporting a
reference's own region masks therefore gives back the reference label map exactly, provided no
two values lie in exactly the same outputs (then the lower value is written; see
:func:`indistinguishable_values`). For nested regions (BraTS: whole ⊃ core ⊃ enhancing) and
consistent predictions it equals nnU-Net's ``regions_class_order`` overwrite.

Torch-free: planning and evaluation import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Probabilities are clipped to [EPS, 1 - EPS] before taking log-odds (float16 files hold 0 and 1).
EPS = 1e-6


def is_region_based(labels: Mapping[str, Sequence[int]]) -> bool:
    """True when a label declares several values (the network then has sigmoid region outputs)."""
    return any(len(values) > 1 for values in labels.values())


def output_regions(labels: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """The values of each sigmoid output: every label except background (``[0]``), in order."""
    return tuple(tuple(int(v) for v in values) for values in labels.values() if list(values) != [0])


def output_names(labels: Mapping[str, Sequence[int]]) -> tuple[str, ...]:
    """The names of the outputs :func:`output_regions` lists, same order."""
    return tuple(name for name, values in labels.items() if list(values) != [0])


def regions_of(labels: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...], ...] | None:
    """:func:`output_regions` for a region-based dataset, None for one with softmax classes."""
    return output_regions(labels) if is_region_based(labels) else None


def num_outputs(labels: Mapping[str, Sequence[int]]) -> int:
    """Output channels of the network: one per region (no background) or one per class (with it)."""
    return len(output_regions(labels)) if is_region_based(labels) else len(labels)


def membership(regions: Sequence[Sequence[int]]) -> np.ndarray:
    """``(R, V)`` bool: ``[r, v]`` is True when label value ``v`` lies in output ``r`` (V = max value + 1)."""
    n_values = 1 + max((int(v) for values in regions for v in values), default=0)
    member = np.zeros((len(regions), n_values), dtype=bool)
    for r, values in enumerate(regions):
        member[r, [int(v) for v in values]] = True
    return member


def indistinguishable_values(regions: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Groups of label values that lie in exactly the same outputs (predictions write the lowest)."""
    member = membership(regions)
    groups: dict[bytes, list[int]] = {}
    for v in range(member.shape[1]):
        groups.setdefault(member[:, v].tobytes(), []).append(v)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def region_masks(seg: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """``(R, *seg.shape)`` bool: the mask of every output (voxel value in the output's values)."""
    return np.stack([np.isin(seg, np.asarray(values)) for values in regions])


def label_dtype(n_values: int) -> np.dtype:
    """uint8 for up to 256 label values, else uint16 (as the softmax export)."""
    return np.dtype(np.uint8) if n_values <= 256 else np.dtype(np.uint16)


def regions_to_labels(probabilities: Sequence[np.ndarray] | np.ndarray, member: np.ndarray) -> np.ndarray:
    """The label map of sigmoid region probabilities (the module docstring's export rule).

    Args:
        probabilities: ``R`` equally shaped arrays (or an ``(R, ...)`` array) in [0, 1], not modified.
        member: ``(R, V)`` bool from :func:`membership`.

    Returns:
        Label values ``0..V-1``, uint8 (uint16 beyond 256 values); ties go to the lower value.

    Raises:
        ValueError: the number of probability channels is not the number of rows of ``member``.
    """
    if len(probabilities) != member.shape[0]:
        raise ValueError(f"{len(probabilities)} probability channels for {member.shape[0]} regions")
    logits = []
    for p in probabilities:
        clipped = np.clip(np.asarray(p, dtype=np.float32), EPS, 1 - EPS)
        logits.append(np.log(clipped) - np.log1p(-clipped))
    shape = np.shape(probabilities[0])
    labels = np.zeros(shape, dtype=label_dtype(member.shape[1]))
    best = np.zeros(shape, dtype=np.float32)  # background: in no output, score 0
    for v in range(1, member.shape[1]):
        rows = np.flatnonzero(member[:, v])
        if rows.size == 0:
            continue
        score = logits[rows[0]].copy()
        for r in rows[1:]:
            score += logits[r]
        better = score > best  # strict: ties go to the lower value
        best[better] = score[better]
        labels[better] = v
    return labels


__all__ = [
    "EPS", "indistinguishable_values", "is_region_based", "label_dtype", "membership", "num_outputs",
    "output_names", "output_regions", "region_masks", "regions_of", "regions_to_labels",
]
