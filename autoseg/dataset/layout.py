"""Raw dataset discovery: read ``dataset.json`` and the file layout as they are, never rename.

Two layouts are read:

* **nnU-Net v2**: ``dataset.json`` with ``channel_names``, ``labels``, ``numTraining`` and
  ``file_ending``; images ``imagesTr/{case}_{CCCC}{ending}`` (one file per channel), labels
  ``labelsTr/{case}{ending}``.
* **MSD** (Medical Segmentation Decathlon): ``dataset.json`` with ``modality``, ``labels`` and
  ``training: [{image, label}]``; a multi-channel image is one 4D file.
* **Restoration** (nnU-Net-like, :mod:`autoseg.dataset.kinds`): ``dataset.json`` with ``"task":
  "denoise"`` (or ``"super-resolution"``), ``channel_names``, ``file_ending`` and no ``labels``;
  degraded images ``imagesTr/{case}_0000{ending}``, clean targets ``targetsTr/{case}{ending}``. A
  case's target takes the :attr:`Case.label` slot.

Loading collects *every* structural problem as an :class:`Issue` instead of stopping at the first,
so that ``autoseg check`` can report them all at once. Nothing here reads pixels.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoseg.channels import FALLBACK_SCHEME, is_known_channel, scheme_for_channel
from autoseg.errors import DatasetError, UnknownNameError
from autoseg.imageio import ENDINGS_2D, LOSSY_ENDINGS, SUPPORTED_ENDINGS, strip_ending
from autoseg.dataset.kinds import DATASET_KINDS, DEFAULT_DATASET_KIND, DatasetKind, parse_task

Severity = Literal["error", "warning"]
Layout = Literal["nnunet", "msd", "images"]

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Issue:
    """One problem found in a dataset.

    Attributes:
        severity: ``"error"`` blocks planning; ``"warning"`` does not.
        code: a short stable identifier (``"label-undeclared"``), for tests and filtering.
        problem: what is wrong, naming the value found.
        fix: how to fix it.
        case: the case id, when the problem belongs to one case.
        file: the file concerned, relative to the dataset root where possible.
    """

    severity: Severity
    code: str
    problem: str
    fix: str
    case: str | None = None
    file: str | None = None

    def line(self) -> str:
        """The issue as one line: ``file: problem; fix``."""
        where = self.file or self.case or "dataset"
        return f"{self.severity}: {where}: {self.problem}; {self.fix}"


@dataclass(frozen=True)
class LabelDef:
    """A declared label (one value) or region (several values, overlapping classes)."""

    name: str
    values: tuple[int, ...]

    @property
    def is_region(self) -> bool:
        return len(self.values) > 1


@dataclass(frozen=True)
class Case:
    """One case: its image file(s) and, for training data, its label file (a restoration
    dataset's clean target file: :mod:`autoseg.dataset.kinds`).

    For the nnU-Net layout ``images`` holds one file per channel (or a single RGB image that
    carries every channel, nnU-Net's convention for natural images); for MSD it holds a single file
    that carries every channel.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    """What a raw dataset declares and which files it consists of."""

    root: Path
    layout: Layout
    name: str
    channel_names: tuple[str, ...]
    labels: tuple[LabelDef, ...]
    file_ending: str
    cases: tuple[Case, ...]
    num_training_declared: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: dataset.json's ``"task"`` (:data:`autoseg.dataset.kinds.DATASET_KINDS`).
    task: str = DEFAULT_DATASET_KIND

    @property
    def kind(self) -> DatasetKind:
        """The layout of the dataset's task (where its targets live, whether it has labels)."""
        return DATASET_KINDS[self.task]

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> frozenset[int]:
        """Every value a label file may contain."""
        return frozenset(v for label in self.labels for v in label.values)

    @property
    def has_regions(self) -> bool:
        return any(label.is_region for label in self.labels)

    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]


def rel(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` when it lies below it, else as given."""
    try:
        return os.fspath(Path(path).relative_to(root))
    except ValueError:
        return os.fspath(path)


def escapes_root(relative: str) -> bool:
    """True when a path from dataset.json points outside the dataset folder (refused, never read)."""
    if os.path.isabs(relative) or re.match(r"^[A-Za-z]:[\\/]", relative):
        return True
    normalised = os.path.normpath(relative.replace("\\", "/"))
    return normalised == ".." or normalised.startswith("../")


def _listdir(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    # Hidden files (".DS_Store", the "._name" AppleDouble files found in MSD tarballs) are skipped.
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def load_dataset(root: Path) -> tuple[DatasetSpec | None, list[Issue]]:
    """Discover a raw dataset and collect every structural problem.

    Returns:
        The dataset spec (``None`` when dataset.json is missing or unusable) and the issues found.
        A spec is returned even when there are errors, so that later checks can run on what is
        readable.
    """
    root = Path(root)
    issues: list[Issue] = []
    if not root.is_dir():
        issues.append(Issue("error", "no-dataset-folder", f"dataset folder {root} does not exist",
                            "pass the folder that holds dataset.json, imagesTr/ and labelsTr/"))
        return None, issues
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        issues.append(Issue("error", "no-dataset-json", "dataset.json is missing",
                            "add dataset.json (nnU-Net v2 or MSD format) to the dataset folder",
                            file="dataset.json"))
        return None, issues
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        issues.append(Issue("error", "invalid-dataset-json", f"dataset.json is not valid JSON ({exc})",
                            "fix the JSON syntax (a JSON linter shows the position)", file="dataset.json"))
        return None, issues
    if not isinstance(meta, dict):
        issues.append(Issue("error", "invalid-dataset-json", "dataset.json does not hold a JSON object",
                            "write dataset.json as an object with channel_names/modality and labels",
                            file="dataset.json"))
        return None, issues

    layout: Layout = "msd" if "training" in meta else "nnunet"
    channel_names = _parse_channels(meta, layout, issues)
    kind, problems = parse_task(meta, layout == "msd", len(channel_names))
    issues.extend(Issue(*problem, file="dataset.json") for problem in problems)
    labels = parse_labels(meta, issues) if kind.labels else []
    num_training = meta.get("numTraining")
    if num_training is not None and not isinstance(num_training, int):
        issues.append(Issue("warning", "invalid-num-training", f"numTraining is {num_training!r}, not an integer",
                            "set numTraining to the number of training cases", file="dataset.json"))
        num_training = None

    if layout == "msd":
        cases, ending = _discover_msd(root, meta, issues)
    else:
        ending = meta.get("file_ending")
        if not isinstance(ending, str) or not ending:
            issues.append(Issue("error", "missing-key", "dataset.json has no 'file_ending'",
                                'add e.g. "file_ending": ".nii.gz" (or use the MSD "training" list)',
                                file="dataset.json"))
            cases, ending = [], ""
        else:
            if ending.lower() not in SUPPORTED_ENDINGS:
                issues.append(Issue("error", "unsupported-ending", f"file_ending {ending!r} is not supported",
                                    f"convert the images to one of {', '.join(SUPPORTED_ENDINGS)}",
                                    file="dataset.json"))
            elif ending.lower() in LOSSY_ENDINGS and kind.labels:
                issues.append(_lossy_labels_issue(f"file_ending {ending!r}: the label maps are JPEG", "dataset.json"))
            elif ending.lower() in LOSSY_ENDINGS:
                issues.append(Issue("error", "lossy-targets", f"file_ending {ending!r}: the targets are JPEG, whose "
                                    "block artefacts a restoration network would learn to reproduce",
                                    "store images and targets losslessly (.png, .nii.gz, .mha)", file="dataset.json"))
            cases = _discover_nnunet(root, ending, len(channel_names), issues, kind)

    if num_training is not None and num_training != len(cases):
        issues.append(Issue("warning", "num-training-mismatch",
                            f"numTraining is {num_training} but {len(cases)} training cases were found",
                            f"set numTraining to {len(cases)}", file="dataset.json"))
    if not cases and not any(i.severity == "error" for i in issues):
        issues.append(Issue("error", "no-cases", "no training cases found",
                            "put images in imagesTr/ and labels in labelsTr/", file="imagesTr"))

    spec = DatasetSpec(
        root=root,
        layout=layout,
        name=str(meta.get("name", root.name)),
        channel_names=tuple(channel_names),
        labels=tuple(labels),
        file_ending=ending,
        cases=tuple(cases),
        num_training_declared=num_training,
        raw=meta,
        task=kind.task,
    )
    return spec, issues


def load_dataset_strict(root: Path) -> DatasetSpec:
    """Load a dataset and raise on the first structural error (for stages after ``check``)."""
    spec, issues = load_dataset(root)
    errors = [i for i in issues if i.severity == "error"]
    if spec is None or errors:
        first = errors[0] if errors else Issue("error", "invalid", "dataset could not be read", "run autoseg check")
        more = f" (and {len(errors) - 1} more; run 'autoseg check {root}')" if len(errors) > 1 else ""
        raise DatasetError(f"{Path(root) / (first.file or '')}: {first.problem}; {first.fix}{more}")
    return spec


def _parse_channels(meta: dict[str, Any], layout: Layout, issues: list[Issue]) -> list[str]:
    key = "channel_names" if "channel_names" in meta else "modality"
    raw = meta.get(key)
    if raw is None:
        issues.append(Issue("error", "missing-key", "dataset.json has neither 'channel_names' nor 'modality'",
                            'add e.g. "channel_names": {"0": "CT"}', file="dataset.json"))
        return []
    if not isinstance(raw, dict) or not raw:
        issues.append(Issue("error", "invalid-channels", f"'{key}' must be a non-empty object, got {raw!r}",
                            'write it as {"0": "CT", "1": "T2"}', file="dataset.json"))
        return []
    expected = [str(i) for i in range(len(raw))]
    if sorted(raw, key=lambda k: (len(k), k)) != expected:
        issues.append(Issue("error", "invalid-channels",
                            f"'{key}' keys must be 0..{len(raw) - 1}, got {sorted(raw)}",
                            "number the channels from 0 without gaps", file="dataset.json"))
        return []
    names = [str(raw[k]) for k in expected]
    for index, name in enumerate(names):
        try:
            scheme_for_channel(name)
        except UnknownNameError as exc:
            issues.append(Issue("error", "unknown-normalization",
                                f"channel {index} name {name!r} selects no normalisation scheme{_tail(str(exc))}",
                                "name the modality (e.g. 'CT', 'MRI', 'T2') or a scheme "
                                "('zscore', 'ct', 'noNorm', 'rescale_to_0_1')",
                                file="dataset.json"))
            continue
        if not is_known_channel(name):
            issues.append(Issue("warning", "unknown-channel-name",
                                f"channel {index} name {name!r} is no modality autoseg knows; it will be "
                                f"normalised with {FALLBACK_SCHEME} (nnU-Net's fallback)",
                                "name the modality (e.g. 'T1', 'FLAIR', 'CT') or the scheme ('zscore') to "
                                "make the choice explicit", file="dataset.json"))
    return names


def _lossy_labels_issue(problem: str, file: str) -> Issue:
    """The error for JPEG label maps: lossy compression moves values off the labels (a 0/255 mask
    holds 0-8 and 247-255), which would become undeclared labels or be mistaken for classes."""
    return Issue("error", "lossy-labels", f"{problem}, which is lossy: mask values drift around the labels",
                 "convert the masks losslessly with a threshold: 'autoseg convert png-masks IMAGES MASKS -o RAW "
                 "--threshold 128' (images may stay JPEG)", file=file)


def _tail(message: str) -> str:
    # UnknownNameError's message ends with "; did you mean 'x'?" — keep only that part.
    return message[message.index(";"):] if ";" in message else ""


def parse_labels(meta: dict[str, Any], issues: list[Issue]) -> list[LabelDef]:
    """The ``labels`` of a dataset.json (nnU-Net or MSD style), appending problems to ``issues``."""
    raw = meta.get("labels")
    if raw is None:
        issues.append(Issue("error", "missing-key", "dataset.json has no 'labels'",
                            'add e.g. "labels": {"background": 0, "tumour": 1}', file="dataset.json"))
        return []
    if not isinstance(raw, dict) or not raw:
        issues.append(Issue("error", "invalid-labels", f"'labels' must be a non-empty object, got {raw!r}",
                            'write it as {"background": 0, "organ": 1}', file="dataset.json"))
        return []
    labels: list[LabelDef] = []
    msd_style = all(re.fullmatch(r"-?\d+", str(k)) for k in raw) and all(isinstance(v, str) for v in raw.values())
    for key, value in raw.items():
        if msd_style:  # MSD: {"0": "background", "1": "Anterior"}
            name, values = value, [int(key)]
        else:  # nnU-Net v2: {"background": 0, "organ": 1} or a region {"whole": [1, 2]}
            name = key
            values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            issues.append(Issue("error", "invalid-labels", f"label {name!r} has value {value!r}, not an integer",
                                "use integer label values (a list of integers for a region)", file="dataset.json"))
            continue
        labels.append(LabelDef(str(name), tuple(int(v) for v in values)))
    singles = sorted(label.values[0] for label in labels if not label.is_region)
    for label in labels:
        if label.is_region and 0 in label.values:
            # Region outputs are sigmoids of foreground masks; background has no output (nnU-Net v2 alike).
            issues.append(Issue("error", "invalid-labels", f"region {label.name!r} {list(label.values)} contains "
                                "background 0", f"remove 0 from {label.name!r}", file="dataset.json"))
    if labels and 0 not in singles:
        issues.append(Issue("error", "invalid-labels", "labels declare no background value 0",
                            'add "background": 0', file="dataset.json"))
    if len(singles) != len(set(singles)):
        dupes = sorted({v for v in singles if singles.count(v) > 1})
        issues.append(Issue("error", "invalid-labels", f"label values declared twice: {dupes}",
                            "give every label its own value", file="dataset.json"))
    else:
        # Regions may name values that no single label does (BraTS in nnU-Net v2: "enhancing": 3,
        # "whole": [1, 2, 3]), so consecutiveness is over every value that may occur in a file.
        values = sorted({v for label in labels for v in label.values})
        if values and values != list(range(len(values))):
            issues.append(Issue("error", "invalid-labels", f"label values must be consecutive 0..N, got {values}",
                                "renumber the labels (and the label files) to 0, 1, 2, ...", file="dataset.json"))
    labels.sort(key=lambda label: (label.is_region, label.values))
    return labels


def _discover_nnunet(root: Path, ending: str, num_channels: int, issues: list[Issue],
                     kind: DatasetKind = DATASET_KINDS[DEFAULT_DATASET_KIND]) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / kind.target_folder
    noun, folder = kind.target_noun, kind.target_folder
    if not images_dir.is_dir():
        issues.append(Issue("error", "missing-folder", "imagesTr/ is missing",
                            "put the training images in imagesTr/{case}_{CCCC}" + ending, file="imagesTr"))
        return []
    channels_by_case: dict[str, dict[int, Path]] = {}
    for name in _listdir(images_dir):
        path = images_dir / name
        if not name.endswith(ending):
            issues.append(Issue("warning", "unlisted-file", f"file does not end with file_ending {ending!r}; ignored",
                                "remove it or fix dataset.json's file_ending", file=rel(root, path)))
            continue
        match = _CHANNEL_FILE.match(name[: -len(ending)])
        if not match:
            issues.append(Issue("error", "bad-image-name",
                                "image file name lacks the _CCCC channel suffix (e.g. case_0000" + ending + ")",
                                "rename to {case}_{channel:04d}" + ending, file=rel(root, path)))
            continue
        case_id, channel = match.group("case"), int(match.group("channel"))
        channels_by_case.setdefault(case_id, {})[channel] = path

    label_files = {}
    for name in _listdir(labels_dir):
        if name.endswith(ending):
            label_files[name[: -len(ending)]] = labels_dir / name
        else:
            issues.append(Issue("warning", "unlisted-file", f"file does not end with file_ending {ending!r}; ignored",
                                "remove it or fix dataset.json's file_ending", file=rel(root, labels_dir / name)))
    if not labels_dir.is_dir():
        what = "the label maps" if kind.labels else "the clean targets"
        fix = f"put {what} in {folder}/{{case}}{ending}"
        if kind.labels and (root / "targetsTr").is_dir():
            fix += '; targetsTr/ is there: for a restoration dataset add "task": "denoise" to dataset.json'
        issues.append(Issue("error", "missing-folder", f"{folder}/ is missing", fix, file=folder))
    if not kind.labels and (root / "labelsTr").is_dir():
        issues.append(Issue("warning", "labels-ignored", f"labelsTr/ is there but the task is {kind.task!r}, which "
                            f"reads its clean targets from {folder}/; labelsTr/ is ignored",
                            'move the clean images to targetsTr/ (or remove "task" if this is a segmentation '
                            "dataset)", file="labelsTr"))

    cases: list[Case] = []
    for case_id in sorted(channels_by_case):
        found = channels_by_case[case_id]
        # nnU-Net's natural-image convention (Dataset120_RoadSegmentation): one RGB file
        # {case}_0000.png carries every channel; the scan checks that it holds them all.
        one_file = num_channels > 1 and sorted(found) == [0] and ending.lower() in ENDINGS_2D
        missing = [] if one_file else [c for c in range(num_channels) if c not in found]
        extra = sorted(c for c in found if c >= num_channels)
        for c in missing:
            issues.append(Issue("error", "missing-channel", f"channel {c} image is missing",
                                f"add imagesTr/{case_id}_{c:04d}{ending} or remove the case",
                                case=case_id, file=f"imagesTr/{case_id}_{c:04d}{ending}"))
        for c in extra:
            issues.append(Issue("error", "wrong-channel-count",
                                f"channel file {c:04d} found but dataset.json declares {num_channels} channel(s)",
                                "declare the channel in channel_names or remove the file",
                                case=case_id, file=rel(root, found[c])))
        label = label_files.pop(case_id, None)
        if label is None and labels_dir.is_dir():
            issues.append(Issue("error", f"missing-{noun}", f"{noun} file is missing",
                                f"add {folder}/{case_id}{ending} or remove the case's images",
                                case=case_id, file=f"{folder}/{case_id}{ending}"))
        if missing:
            continue
        images = (found[0],) if one_file else tuple(found[c] for c in range(num_channels))
        cases.append(Case(case_id, images, label))
    for case_id, path in sorted(label_files.items()):
        issues.append(Issue("warning", "unlisted-file", f"{noun} file has no matching image",
                            f"add imagesTr/{case_id}_0000{ending} or remove the label", case=case_id,
                            file=rel(root, path)))
    return cases


def _discover_msd(root: Path, meta: dict[str, Any], issues: list[Issue]) -> tuple[list[Case], str]:
    training = meta.get("training")
    if not isinstance(training, list):
        issues.append(Issue("error", "invalid-dataset-json", "'training' must be a list of {image, label}",
                            'write "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]',
                            file="dataset.json"))
        return [], ""
    cases: list[Case] = []
    seen: dict[str, int] = {}
    listed_images: set[str] = set()
    listed_labels: set[str] = set()
    endings: set[str] = set()
    for index, entry in enumerate(training):
        where = f"dataset.json training[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            issues.append(Issue("error", "invalid-dataset-json", f"{where} has no 'image' path",
                                'each entry needs "image" and "label" paths', file="dataset.json"))
            continue
        image_rel, label_rel = entry["image"], entry.get("label")
        paths_ok = True
        for kind, value in (("image", image_rel), ("label", label_rel)):
            if isinstance(value, str) and escapes_root(value):
                issues.append(Issue("error", "path-escapes-dataset",
                                    f"{where} {kind} path {value!r} points outside the dataset folder (refused, not read)",
                                    "use a path relative to the dataset folder, inside it", file="dataset.json"))
                paths_ok = False
        if not isinstance(label_rel, str):
            issues.append(Issue("error", "missing-label", f"{where} has no 'label' path",
                                'add "label": "./labelsTr/<case>.nii.gz"', file="dataset.json"))
            paths_ok = False
        if not paths_ok:
            continue
        image_path = root / os.path.normpath(image_rel)
        label_path = root / os.path.normpath(label_rel)
        stem, ending = strip_ending(image_path.name)
        if not ending:
            issues.append(Issue("error", "unsupported-ending", f"{where} image {image_rel!r} has an unsupported ending",
                                f"convert it to one of {', '.join(SUPPORTED_ENDINGS)}", file=rel(root, image_path)))
            continue
        endings.add(ending)
        if strip_ending(label_path.name)[1].lower() in LOSSY_ENDINGS:
            issues.append(_lossy_labels_issue(f"{where} label {label_rel!r} is JPEG", rel(root, label_path)))
        if stem in seen:
            issues.append(Issue("error", "duplicate-case", f"case id {stem!r} is listed twice "
                                f"(training[{seen[stem]}] and training[{index}])",
                                "list every case once", case=stem, file="dataset.json"))
            continue
        seen[stem] = index
        listed_images.add(os.path.normpath(rel(root, image_path)))
        listed_labels.add(os.path.normpath(rel(root, label_path)))
        missing = False
        if not image_path.is_file():
            issues.append(Issue("error", "missing-image", "image file listed in dataset.json does not exist",
                                "add the file or remove its entry from 'training'", case=stem,
                                file=rel(root, image_path)))
            missing = True
        if not label_path.is_file():
            issues.append(Issue("error", "missing-label", "label file listed in dataset.json does not exist",
                                "add the file or remove its entry from 'training'", case=stem,
                                file=rel(root, label_path)))
            missing = True
        if not missing:
            cases.append(Case(stem, (image_path,), label_path))
    for folder, listed in (("imagesTr", listed_images), ("labelsTr", listed_labels)):
        for name in _listdir(root / folder):
            relative = os.path.normpath(f"{folder}/{name}")
            if relative not in listed:
                issues.append(Issue("warning", "unlisted-file", "file is present but not listed in dataset.json 'training'",
                                    "add it to 'training' or move it out of the dataset", file=relative))
    if len(endings) > 1:
        issues.append(Issue("warning", "mixed-endings", f"images use several file endings: {sorted(endings)}",
                            "convert them to one format", file="dataset.json"))
    cases.sort(key=lambda c: c.case_id)
    return cases, (sorted(endings)[0] if endings else "")


def group_channel_files(files: list[Path], num_channels: int) -> tuple[list[Case], list[Path]]:
    """Group ``{case}_{CCCC}{ending}`` files into the channels of cases (nnU-Net's naming).

    A group whose channels are exactly ``0 .. num_channels - 1`` is a case, and so is a lone
    ``{case}_0000`` 2D file (PNG, TIF, ...) for a multi-channel model: nnU-Net's natural-image
    convention, one RGB file carrying every channel, as training reads it (its channel count is
    checked from the header later, :func:`autoseg.inference.inputs.check_inputs`). A group that has
    a channel 0 but other channels than that is refused: extra files would otherwise become cases
    of their own (``x_0001`` predicted as a second case), missing ones a case that fails later
    with a less clear message. For a one-channel model, ``{name}_{CCCC}`` files without a
    ``_0000`` beside them are not channels of anything: each stands alone under its full name.

    Args:
        files: image files (any order; those not named ``{case}_{CCCC}`` are returned untouched).
        num_channels: the model's input channels.

    Returns:
        The grouped cases (unsorted) and the files that are no channel of a case.

    Raises:
        DatasetError: a group has channel files the model does not take, or lacks some it needs.
    """
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    rest: list[Path] = []
    for path in files:
        stem, ending = strip_ending(path.name)
        match = _CHANNEL_FILE.match(stem)
        if match:
            channels = groups.setdefault((path.parent, match.group("case")), {})
            channel = int(match.group("channel"))
            if channel in channels:
                raise DatasetError(f"{path.parent}: {channels[channel].name} and {path.name} are both channel {channel} "
                                   f"of case {match.group('case')!r}; keep one of them")
            channels[channel] = path
        else:
            rest.append(path)
    cases: list[Case] = []
    expected = set(range(num_channels))
    for (folder, case_id), channels in sorted(groups.items()):
        if set(channels) == expected:
            cases.append(Case(case_id, tuple(channels[c] for c in range(num_channels)), None))
        elif num_channels > 1 and set(channels) == {0} and \
                strip_ending(channels[0].name)[1].lower() in ENDINGS_2D:
            cases.append(Case(case_id, (channels[0],), None))  # one RGB file, as _discover_nnunet reads it
        elif 0 not in channels and num_channels == 1:
            rest.extend(channels.values())
        else:
            _refuse_channel_group(folder, case_id, channels, num_channels)
    return cases, rest


def _refuse_channel_group(folder: Path, case_id: str, channels: dict[int, Path], num_channels: int) -> None:
    """Raise the one-line error for a ``{case}_{CCCC}`` group that does not fit the model."""
    takes = f"the model takes {num_channels} channel{'s' if num_channels > 1 else ''}"
    extra = sorted(set(channels) - set(range(num_channels)))
    if extra:
        names = ", ".join(channels[c].name for c in extra)
        raise DatasetError(f"{folder}: {names} look{'s' if len(extra) == 1 else ''} like channel "
                           f"{', '.join(str(c) for c in extra)} of case {case_id!r}, but {takes}; remove "
                           "or move the extra channel file(s), or, if they are separate images, rename them so "
                           "that their names do not end in _NNNN")
    ending = strip_ending(next(iter(channels.values())).name)[1]
    missing = [f"{case_id}_{c:04d}{ending}" for c in range(num_channels) if c not in channels]
    raise DatasetError(f"{folder}: case {case_id!r} lacks {', '.join(missing)}; {takes} "
                       f"({case_id}_0000{ending} .. {case_id}_{num_channels - 1:04d}{ending})")


def discover_images(folder: Path, num_channels: int) -> list[Case]:
    """Cases of a folder of images without labels (for prediction).

    Files named ``{case}_{CCCC}{ending}`` are the channels of a case
    (:func:`group_channel_files`); any other supported file is a single-file case (multi-channel
    files are split by the reader).

    Raises:
        DatasetError: two files map to one case id (``a.nii.gz`` and ``a_0000.nii.gz``), whose
            predictions would overwrite each other; channel files that do not fit the model.
    """
    files = [Path(folder) / name for name in _listdir(Path(folder)) if strip_ending(name)[1]]
    grouped, singles = group_channel_files(files, num_channels)
    cases = [Case(strip_ending(path.name)[0], (path,), None) for path in singles] + grouped
    cases.sort(key=lambda c: c.case_id)
    for first, second in zip(cases, cases[1:]):
        if first.case_id == second.case_id:
            raise DatasetError(f"{folder}: {first.images[0].name} and {second.images[0].name} are both case "
                               f"{first.case_id!r}; rename one so that every case has its own name")
    return cases
