"""Which axes to mirror: every axis, except the left-right one when a label names a side.

Mirroring a training patch (and averaging mirrored predictions at test time) tells the network
that an image and its mirror image are labelled alike. For a left parotid and a right parotid that
is false along the left-right axis: half the mirrored patches show the left gland on the right side
still labelled "left", and the network can only learn the structure, not its side. nnU-Net mirrors
every axis by default; its users meet this as swapped or mixed left/right labels and are told to
switch to a no-mirroring trainer and find the axis by trial and error (nnU-Net issues #80, #869,
#2225, #2654); TotalSegmentator trains without mirroring for the same reason.

autoseg decides it in the plan, from two things the fingerprint already has:

* **the labels**: a label whose name holds a side word — ``left``/``right``, ``l``/``r``,
  ``lt``/``rt``, ``lh``/``rh`` as a separate word or camel-case part (``Parotid_L``, ``kidney_left``,
  ``LeftParotid``, FreeSurfer's ``ctx-lh-*``). A pair is the usual case, but one side alone is enough:
  a mirrored ``Parotid_L`` teaches the network to mark both parotids;
* **the orientation** of the images (their direction matrices, :func:`autoseg.dataset.fingerprint.
  orientation_code`): the image axis that runs along the patient's left-right direction, the most
  common one over the cases. autoseg does not reorient images, so cases whose left-right runs along
  another axis or the other way (RAS beside LPS) are mirror images of the rest as arrays: the note
  names how many, as no choice of axes can fix that.

The configurations then mirror every other axis (``mirror_axes`` in the plan, which the user may
edit). A 2D configuration whose slices are perpendicular to the left-right axis (sagittal) keeps
both its axes, and the note says such slices cannot show the side at all. Pure functions; the
note goes into the plan's notes.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from autoseg.plans import Configuration

#: Words that name a side (lower case; whole words of a label name).
SIDE_WORDS = frozenset({"left", "right", "l", "r", "lt", "rt", "lh", "rh"})


def name_words(name: str) -> tuple[str, ...]:
    """A label name's words, lower case: split at non-alphanumerics and camel-case humps
    (``"RightParotid"`` → ``("right", "parotid")``, ``"parotid_L"`` → ``("parotid", "l")``)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return tuple(w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w)


def sided_labels(names: Iterable[str]) -> list[str]:
    """The label names that name a side (``LeftParotid``, ``kidney_right``, ``ctx-lh-insula``)."""
    return [n for n in names if SIDE_WORDS & set(name_words(n))]


def _left_right_of(code: str) -> tuple[int, str] | None:
    """(ITK axis, ``L`` or ``R``) of the axis of an orientation code that runs left-right, if any."""
    return next(((i, letter) for i, letter in enumerate(code) if letter in "LR"), None)


def majority_orientation(orientations: Sequence[str]) -> str | None:
    """The most common orientation code (ties: the first in sorted order); None without cases."""
    counts = Counter(orientations)
    return max(sorted(counts), key=lambda c: counts[c]) if counts else None


def left_right_axis(orientation: str | None, transpose: Sequence[int]) -> int | None:
    """The array axis, after ``transpose``, that runs along the patient's left-right direction.

    Args:
        orientation: an orientation code (one letter per ITK axis, ``"LPS"``; two for a 2D image).
        transpose: the plan's axis order.

    Returns:
        0, 1 or 2, or None when the orientation has no left-right axis (or is unknown).
    """
    found = _left_right_of(orientation) if orientation else None
    if found is None:
        return None
    array_axis = 2 - found[0]  # ITK (x, y, z) is numpy's (z, y, x); 2D images are (1, y, x)
    return list(transpose).index(array_axis)


def mirrored_cases(orientations: Sequence[str], majority: str) -> int:
    """How many cases run left-right along another axis or the other way than ``majority``."""
    reference = _left_right_of(majority)
    return sum(1 for code in orientations if _left_right_of(code) != reference)


def planned_mirror_axes(config: Configuration, lr_axis: int | None) -> tuple[int, ...] | None:
    """The ``mirror_axes`` of a configuration given the left-right array axis (None: mirror every axis).

    A 3D patch's axes are the array's; a 2D patch's are the array's axes 1 and 2 (it slices along 0).
    """
    if lr_axis is None:
        return None
    if config.dims == 3:
        return tuple(a for a in range(3) if a != lr_axis)
    if lr_axis == 0:
        return None  # slices perpendicular to left-right: no mirror of a slice swaps sides
    return tuple(a for a in range(2) if a != lr_axis - 1)


def mirroring_note(sided: Sequence[str], lr_axis: int | None, orientation: str | None, others: int,
                   sagittal_2d: bool) -> str:
    """The plan's note on the sided labels and the axis left unmirrored."""
    shown = ", ".join(sided[:4]) + (f" and {len(sided) - 4} more" if len(sided) > 4 else "")
    if lr_axis is None:
        return (f"labels name a side ({shown}) but the images' orientation {orientation!r} has no left-right "
                "axis: every axis is mirrored; set mirror_axes per configuration if that is wrong")
    note = (f"labels name a side ({shown}): axis {lr_axis} (left-right in the images' orientation {orientation}) "
            "is not mirrored in training or TTA, as a mirrored image would swap the sides; mirror_axes per "
            "configuration says so")
    if others:
        note += (f". {others} case(s) run left-right along another axis or the other way: autoseg does not "
                 f"reorient, so they show the sides mirrored; reorient them to {orientation} before training")
    if sagittal_2d:
        note += ". 2d and 2.5d slice along the left-right axis: a sagittal slice cannot show the side; prefer 3d"
    return note


def with_mirror_axes(configs: Mapping[str, Configuration], labels: Iterable[str], orientations: Sequence[str],
                     transpose: Sequence[int], notes: list[str]) -> dict[str, Configuration]:
    """``configs`` with ``mirror_axes`` set when a label names a side (a note says so).

    Args:
        configs: the planned configurations.
        labels: the label names.
        orientations: every case's orientation code.
        transpose: the plan's axis order.
        notes: the plan's notes, appended to.
    """
    sided = sided_labels(labels)
    if not sided:
        return dict(configs)
    majority = majority_orientation(orientations)
    lr_axis = left_right_axis(majority, transpose)
    others = mirrored_cases(orientations, majority) if majority and lr_axis is not None else 0
    sagittal_2d = lr_axis == 0 and any(c.dims == 2 for c in configs.values())
    notes.append(mirroring_note(sided, lr_axis, majority, others, sagittal_2d))
    return {name: dataclasses.replace(config, mirror_axes=planned_mirror_axes(config, lr_axis), orientation=majority)
            for name, config in configs.items()}


def side_warning(direction: Sequence[float], trained: str | None, source: str) -> str | None:
    """A warning when an input's left-right runs along another axis or the other way than the
    ``trained`` orientation of a model whose labels name a side (its output's sides would be swapped
    or meaningless), else None."""
    from autoseg.dataset.fingerprint import orientation_code

    if trained is None or _left_right_of(trained) is None:
        return None
    code = orientation_code(tuple(direction))
    if _left_right_of(code) == _left_right_of(trained):
        return None
    return (f"{source}: orientation {code}, but the model learned its left/right labels on {trained} images: "
            f"autoseg does not reorient, so the sides in its output may be swapped; reorient the image to "
            f"{trained} and predict again")


__all__ = ["SIDE_WORDS", "left_right_axis", "majority_orientation", "mirrored_cases", "mirroring_note",
           "name_words", "planned_mirror_axes", "side_warning", "sided_labels", "with_mirror_axes"]
