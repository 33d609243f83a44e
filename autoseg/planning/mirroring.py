"""Which axes to mirror: every axis, except the left-right one when labels come in left/right pairs.

Mirroring a training patch (and averaging mirrored predictions at test time) tells the network
that an image and its mirror image are labelled alike. For a left parotid and a right parotid that
is false along the left-right axis: half the mirrored patches show the left gland on the right side
still labelled "left", and the network can only learn the structure, not its side. nnU-Net mirrors
every axis by default; its users meet this as swapped or mixed left/right labels and are told to
switch to a no-mirroring trainer and find the axis by trial and error (nnU-Net issues #80, #869,
#2225, #2654); TotalSegmentator trains without mirroring for the same reason.

autoseg decides it in the plan, from two things the fingerprint already has:

* **the labels**: a pair of label names that differ only by a side word — ``left``/``right``,
  ``l``/``r``, ``lt``/``rt`` as a separate word or camel-case part (``Parotid_L``/``Parotid_R``,
  ``kidney_left``/``kidney_right``, ``LeftParotid``/``RightParotid``);
* **the orientation** of the images (their direction matrices, :func:`autoseg.dataset.fingerprint.
  orientation_code`): the image axis that runs along the patient's left-right direction, the most
  common one over the cases.

The configurations then mirror every other axis (``mirror_axes`` in the plan, which the user may
edit). A 2D configuration whose slices are perpendicular to the left-right axis keeps both axes.
Pure functions; the planner writes the note.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from autoseg.plans import Configuration

#: Side words that make two otherwise equal label names a left/right pair (lower case).
SIDE_WORDS = (("left", "right"), ("l", "r"), ("lt", "rt"))


def name_words(name: str) -> tuple[str, ...]:
    """A label name's words, lower case: split at non-alphanumerics and camel-case humps
    (``"RightParotid"`` → ``("right", "parotid")``, ``"parotid_L"`` → ``("parotid", "l")``)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return tuple(w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w)


def left_right_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of label names that differ only by one side word, e.g. ``("LeftParotid", "RightParotid")``.

    Each pair is (left name, right name), in the order the left names come.
    """
    names = list(names)
    words = {n: name_words(n) for n in names}
    pairs = []
    for left in names:
        for right in names:
            a, b = words[left], words[right]
            if len(a) != len(b) or left == right:
                continue
            differ = [i for i in range(len(a)) if a[i] != b[i]]
            if len(differ) == 1 and (a[differ[0]], b[differ[0]]) in SIDE_WORDS:
                pairs.append((left, right))
    return pairs


def left_right_axis(orientations: Mapping[str, int], transpose: Sequence[int]) -> int | None:
    """The array axis, after ``transpose``, that runs along the patient's left-right direction.

    Args:
        orientations: orientation code (one letter per ITK axis, ``"LPS"``) → number of cases.
        transpose: the plan's axis order.

    Returns:
        0, 1 or 2 for the most common orientation, or None when it has no left-right axis.
    """
    if not orientations:
        return None
    code = max(sorted(orientations), key=lambda c: orientations[c])
    itk_axis = next((i for i, letter in enumerate(code) if letter in "LR"), None)
    if itk_axis is None:
        return None
    array_axis = 2 - itk_axis  # ITK (x, y, z) is numpy's (z, y, x); 2D images are (1, y, x)
    return list(transpose).index(array_axis)


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


def mirroring_note(pairs: Sequence[tuple[str, str]], lr_axis: int | None, orientation: str,
                   mixed: bool) -> str:
    """The plan's note on the left/right pairs and the axis left unmirrored."""
    shown = ", ".join(f"{a}/{b}" for a, b in pairs[:3]) + (f" and {len(pairs) - 3} more" if len(pairs) > 3 else "")
    if lr_axis is None:
        return (f"labels come in left/right pairs ({shown}) but the images' orientation {orientation!r} has no "
                "left-right axis: every axis is mirrored; set mirror_axes per configuration if that is wrong")
    return (f"labels come in left/right pairs ({shown}): axis {lr_axis} (left-right in the images' "
            f"orientation {orientation}{', the most common of several' if mixed else ''}) is not mirrored in "
            "training or TTA, as a mirrored image would swap the sides; mirror_axes per configuration says so")


def with_mirror_axes(configs: Mapping[str, Configuration], labels: Mapping[str, Sequence[int]],
                     orientations: Mapping[str, int], transpose: Sequence[int],
                     notes: list[str]) -> dict[str, Configuration]:
    """``configs`` with ``mirror_axes`` set when the labels have left/right pairs (a note says so)."""
    import dataclasses

    pairs = left_right_pairs(labels)
    if not pairs:
        return dict(configs)
    lr_axis = left_right_axis(orientations, transpose)
    orientation = max(sorted(orientations), key=lambda c: orientations[c]) if orientations else "unknown"
    notes.append(mirroring_note(pairs, lr_axis, orientation, len(orientations) > 1))
    return {name: dataclasses.replace(config, mirror_axes=planned_mirror_axes(config, lr_axis))
            for name, config in configs.items()}


__all__ = ["SIDE_WORDS", "left_right_axis", "left_right_pairs", "mirroring_note", "name_words",
           "planned_mirror_axes", "with_mirror_axes"]
