"""Postprocessing: keep the largest connected component, and decide from cross-validation whether to.

The decision follows nnU-Net (``determine_postprocessing``):

1. Try "all foreground as one": keep only the largest component of the union of every foreground
   label. Accept it only if the mean foreground Dice improves and no label's mean Dice gets worse.
2. Then, on top of the accepted state, try each foreground label alone (keep only that label's
   largest component), accepted under the same rule.

A case where a label is absent from both prediction and reference is left out of that label's mean,
as ``autoseg evaluate`` and find-best's choice leave it out (:func:`autoseg.metrics.summarize`), and
as nnU-Net (Dice NaN, ``nanmean``): counted as Dice 1 it would dilute every change on often-absent
structures. Removing components only removes voxels, so a label scored in no case before is scored
in none after; a label whose every prediction was removed where the reference has none has no mean
after (``None``), which counts as no worse.

Components use full connectivity (26 neighbours in 3D, as ``skimage.measure.label``'s default that
nnU-Net v2 uses): a component touching another only by an edge or corner is the same object.
Removed voxels become background (0).

Everything here is pure (arrays in, arrays and plain data out); :mod:`autoseg.evaluation.find_best` feeds it
the cross-validation predictions case by case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.errors import ConfigError
from autoseg.metrics import dice_per_label, foreground_labels, label_mask

BACKGROUND = 0

LabelOrRegion = int | Sequence[int]


def _largest_component_only(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` outside its largest component (what to remove)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    return (components != int(np.argmax(sizes))) & mask


def keep_largest_component(seg: np.ndarray, labels_or_values: Sequence[LabelOrRegion],
                           per_label: bool) -> np.ndarray:
    """Remove every foreground component but the largest, setting removed voxels to background.

    Args:
        seg: label map (any integer dtype), not modified.
        labels_or_values: label values to act on; an entry may be a region (a sequence of values).
        per_label: False: all of ``labels_or_values`` form one mask ("all foreground as one": only
            the largest component of their union survives). True: each entry is handled on its own
            (each keeps its own largest component).

    Returns:
        A new label map of the same dtype.
    """
    out = seg.copy()
    groups = [_values(entry) for entry in labels_or_values]
    if not per_label:
        groups = [tuple(sorted({v for group in groups for v in group}))]
    for values in groups:
        if not values:
            continue
        mask = label_mask(out, values)
        out[_largest_component_only(mask)] = BACKGROUND
    return out


def _values(entry: LabelOrRegion) -> tuple[int, ...]:
    if isinstance(entry, (int, np.integer)):
        return (int(entry),)
    return tuple(int(v) for v in entry)


@dataclass(frozen=True)
class PostprocessingDecision:
    """What to do to a prediction, as plain data (the ``postprocessing`` section of best.yaml).

    Attributes:
        all_foreground: keep only the largest component of the union of ``labels``' values.
        per_label: names of the labels whose own largest component is kept (applied after
            ``all_foreground``, in this order).
        labels: foreground label name -> values, so the decision applies without other context.
        dice_before: mean foreground Dice on the cross-validation predictions as they are.
        dice_after: the same after the decided postprocessing.
        label_dice_before, label_dice_after: per-label mean Dice, before and after (``None`` for a
            label absent from both prediction and reference in every case).
    """

    all_foreground: bool
    per_label: tuple[str, ...]
    labels: dict[str, list[int]]
    dice_before: float | None = None
    dice_after: float | None = None
    label_dice_before: dict[str, float | None] = field(default_factory=dict)
    label_dice_after: dict[str, float | None] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        return not self.all_foreground and not self.per_label

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data."""
        return {
            "all_foreground": self.all_foreground,
            "per_label": list(self.per_label),
            "labels": {k: list(v) for k, v in self.labels.items()},
            "dice_before": self.dice_before,
            "dice_after": self.dice_after,
            "label_dice_before": dict(self.label_dice_before),
            "label_dice_after": dict(self.label_dice_after),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "postprocessing") -> PostprocessingDecision:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: a key is missing or ``per_label`` names a label not in ``labels``.
        """
        try:
            labels = {str(k): [int(v) for v in (vals if isinstance(vals, list) else [vals])]
                      for k, vals in dict(data["labels"]).items()}
            decision = cls(
                all_foreground=bool(data["all_foreground"]),
                per_label=tuple(str(n) for n in data.get("per_label") or ()),
                labels=labels,
                dice_before=data.get("dice_before"),
                dice_after=data.get("dice_after"),
                label_dice_before=dict(data.get("label_dice_before") or {}),
                label_dice_after=dict(data.get("label_dice_after") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: invalid postprocessing record ({exc}); rerun 'autoseg find-best'") from None
        unknown = [n for n in decision.per_label if n not in labels]
        if unknown:
            raise ConfigError(f"{where}: per_label names unknown label(s) {unknown}; rerun 'autoseg find-best'")
        return decision


def apply_postprocessing(seg: np.ndarray, decision: PostprocessingDecision) -> np.ndarray:
    """Apply a decision to a label map (a copy is returned; the input is not modified)."""
    out = seg
    if decision.all_foreground:
        out = keep_largest_component(out, list(decision.labels.values()), per_label=False)
    for name in decision.per_label:
        out = keep_largest_component(out, [decision.labels[name]], per_label=True)
    return out if out is not seg else seg.copy()


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the defined values; None when there is none (a label absent from every pair)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _accept(before: dict[str, float | None], after: dict[str, float | None]) -> bool:
    """nnU-Net's rule: mean foreground Dice improves and no label gets worse.

    Components are only removed, so a mean can only go from defined to None, never back: that
    happens when every prediction of the label was removed from cases whose reference has none of
    it, which is no worse (and, for the overall mean, better).
    """
    mean_before, mean_after = _mean(before.values()), _mean(after.values())
    if mean_before is None:
        return False  # nothing scored before: nothing to improve
    improves = mean_after is None or mean_after > mean_before
    worse = any(a is not None and b is not None and a < b for a, b in ((after[n], before[n]) for n in before))
    return improves and not worse


def candidate_dice(pred: np.ndarray, ref: np.ndarray,
                   labels: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float | None]]:
    """One case's Dice per foreground label in every state the decision compares.

    States: ``"baseline"`` (as predicted), ``"all"`` (largest component of all foreground), and,
    with more than one foreground label, ``"baseline+<label>"`` and ``"all+<label>"`` (that label's
    largest component on top of either).

    Returns:
        State -> label name -> Dice (``None`` where the label is absent from both masks).
    """
    foreground = foreground_labels(labels)
    all_values = [v for values in foreground.values() for v in values]
    states = {"baseline": dice_per_label(pred, ref, foreground)}
    fg = keep_largest_component(pred, all_values, per_label=False)
    states["all"] = dice_per_label(fg, ref, foreground)
    if len(foreground) > 1:
        for base_name, base in (("baseline", pred), ("all", fg)):
            for name, values in foreground.items():
                changed = keep_largest_component(base, [values], per_label=True)
                states[f"{base_name}+{name}"] = dice_per_label(changed, ref, foreground)
    return states


def decide_from_dice(per_case: Iterable[dict[str, dict[str, float | None]]],
                     labels: Mapping[str, Sequence[int]]) -> PostprocessingDecision:
    """The decision from every case's :func:`candidate_dice` (see the module docstring).

    For disjoint labels, judging each label's LCC against the accepted state alone is exactly
    nnU-Net's sequential procedure, because one label's LCC does not change another label's mask;
    overlapping regions are each judged against the accepted all-foreground state alone.

    Raises:
        ValueError: no cases.
    """
    foreground = foreground_labels(labels)
    names = list(foreground)
    if not names:
        return PostprocessingDecision(False, (), {})
    # state -> label -> per-case Dice
    scores: dict[str, dict[str, list[float | None]]] = {}
    n_cases = 0
    for states in per_case:
        n_cases += 1
        for state, dice in states.items():
            per_label = scores.setdefault(state, {name: [] for name in names})
            for name in names:
                per_label[name].append(dice[name])
    if n_cases == 0:
        raise ValueError("a postprocessing decision needs at least one case")

    def means(state: str) -> dict[str, float | None]:
        return {name: _mean(values) for name, values in scores[state].items()}

    before = means("baseline")
    all_foreground = _accept(before, means("all"))
    base_name = "all" if all_foreground else "baseline"
    current = means(base_name)
    per_label = [name for name in names if len(names) > 1 and _accept(current, means(f"{base_name}+{name}"))]
    after = dict(current)
    for name in per_label:
        # Disjoint labels: a label's LCC changes only its own Dice (regions: approximately so).
        after[name] = means(f"{base_name}+{name}")[name]
    return PostprocessingDecision(
        all_foreground=all_foreground,
        per_label=tuple(per_label),
        labels={name: list(values) for name, values in foreground.items()},
        dice_before=_mean(before.values()),
        dice_after=_mean(after.values()),
        label_dice_before=before,
        label_dice_after=after,
    )


def decide_postprocessing(
    cases: Iterable[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]],
    labels: Mapping[str, Sequence[int]],
) -> PostprocessingDecision:
    """Decide postprocessing from cross-validation predictions (see the module docstring).

    The cases are read once, so a generator keeps memory to one case.

    Args:
        cases: ``(prediction, reference, spacing)`` per case; spacing is not used by Dice but is
            part of the signature so that distance-based criteria can be added.
        labels: label name -> values (background, ``[0]``, is ignored).

    Returns:
        The decision, with the mean Dice before and after.

    Raises:
        ValueError: no cases were given.
    """
    return decide_from_dice((candidate_dice(pred, ref, labels) for pred, ref, _spacing in cases), labels)
