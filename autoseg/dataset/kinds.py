"""What a task's raw dataset looks like: where the training targets live and what dataset.json declares.

A torch- and numpy-free leaf of the dataset layer. The stages below the task seam
(:mod:`autoseg.tasks`: check, fingerprint, plan, preprocess) cannot ask a task object, so they read
this table by the ``task`` name that dataset.json, fingerprint.json and plans.yaml carry, and hand
restoration cases to their own restoration modules. ``dataset.json`` names its task with ``"task"``
(default ``segmentation``)::

    segmentation      imagesTr/{case}_{CCCC}{ending}  labelsTr/{case}{ending}   labels declared
    denoise           imagesTr/{case}_0000{ending}    targetsTr/{case}{ending}  degraded -> clean, same grid
    super-resolution  imagesTr/{case}_0000{ending}    targetsTr/{case}{ending}  coarse -> fine grid, same extent

Every kind is plannable today (:attr:`DatasetKind.plannable` stays for kinds that are checked first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoseg.errors import did_you_mean


@dataclass(frozen=True)
class DatasetKind:
    """The raw layout of one task.

    Attributes:
        task: the ``"task"`` value of dataset.json.
        target_folder: the folder of the training targets (``labelsTr`` or ``targetsTr``).
        target_noun: how messages call one target file (``label`` or ``target``).
        labels: dataset.json declares ``labels`` and the targets are label maps.
        same_grid: a target shares its image's voxel grid (shape, spacing, origin, direction).
        plannable: ``autoseg plan`` can plan it (False: checked only, "not supported yet").
        max_channels: the most input channels the task takes (None: any number).
    """

    task: str
    target_folder: str
    target_noun: str
    labels: bool
    same_grid: bool
    plannable: bool
    max_channels: int | None = None


#: Every dataset kind, by dataset.json's ``"task"`` value.
DATASET_KINDS: dict[str, DatasetKind] = {
    "segmentation": DatasetKind("segmentation", "labelsTr", "label", labels=True, same_grid=True, plannable=True),
    # One channel: the degraded image, one clean target file per case (AAPM/Mayo LDCT: quarter -> full dose).
    "denoise": DatasetKind("denoise", "targetsTr", "target", labels=False, same_grid=True, plannable=True,
                           max_channels=1),
    # One channel: the coarse image; the target on its grid refined by integer factors (thick -> thin slices).
    "super-resolution": DatasetKind("super-resolution", "targetsTr", "target", labels=False, same_grid=False,
                                    plannable=True, max_channels=1),
}
#: dataset.json without ``"task"``.
DEFAULT_DATASET_KIND = "segmentation"


#: One problem of dataset.json's task: ``(severity, code, problem, fix)`` (an Issue without its file).
Problem = tuple[str, str, str, str]


def parse_task(meta: Mapping[str, Any], msd: bool, num_channels: int) -> tuple[DatasetKind, list[Problem]]:
    """dataset.json's ``"task"`` (default segmentation) and every problem with it.

    Errors: an unknown task (with a did-you-mean; segmentation is assumed for the other checks), a
    restoration task in the MSD layout or with more channels than it takes. Warning: a restoration
    dataset that declares ``labels`` (said out loud, then ignored).

    Args:
        meta: dataset.json's content.
        msd: it has an MSD ``training`` list.
        num_channels: the channels it declares.

    Returns:
        The dataset kind and the problems, all about dataset.json.
    """
    raw = meta.get("task", DEFAULT_DATASET_KIND)
    if not isinstance(raw, str) or raw not in DATASET_KINDS:
        hint = did_you_mean(raw, DATASET_KINDS) if isinstance(raw, str) else ""
        return DATASET_KINDS[DEFAULT_DATASET_KIND], [(
            "error", "unknown-task", f"'task' is {raw!r}, which autoseg does not know{hint}",
            f"use one of {', '.join(repr(k) for k in DATASET_KINDS)} (or leave 'task' out for segmentation)")]
    kind, problems = DATASET_KINDS[raw], []
    if msd and not kind.labels:
        problems.append(("error", "invalid-dataset-json", f"task {raw!r} with an MSD 'training' list",
                         "restoration datasets use the nnU-Net-like layout: remove 'training' and put the images "
                         "in imagesTr/{case}_0000 and the targets in targetsTr/{case}"))
    if kind.max_channels is not None and num_channels > kind.max_channels:
        problems.append(("error", "wrong-channel-count", f"task {raw!r} takes {kind.max_channels} channel (the "
                         f"degraded image), dataset.json declares {num_channels}", "keep one channel in "
                         "channel_names (several input channels for restoration are not supported yet)"))
    if not kind.labels and "labels" in meta:
        problems.append(("warning", "labels-ignored", f"dataset.json declares 'labels' but its task is {raw!r}, "
                         f"which learns clean images from {kind.target_folder}/, not label maps; they are ignored",
                         "remove 'labels' (or remove 'task' if this is a segmentation dataset)"))
    return kind, problems
