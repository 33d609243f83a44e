"""What every converter shares: the output folder, dataset.json, the region encoding, the summary.

Conventions (DESIGN §1, §2):

* The output is the nnU-Net v2 raw layout: ``imagesTr/{case}_{CCCC}{ending}``, ``labelsTr/{case}{ending}``
  and ``dataset.json``. Every file is written atomically (:mod:`autoseg.atomic`), the label last, so
  a case whose label file exists is complete; a rerun skips it (resumable).
* ``dataset.json`` carries an ``autoseg_convert`` record (converter and the settings that shape the
  case files). A rerun with other settings into the same folder is refused instead of mixing two
  encodings in one dataset.
* Overlapping classes (regions) are encoded as a **bitmask**: class ``i`` (0-based, in the declared
  order) owns bit ``2**i``; a voxel's value is the sum of the bits of every class it belongs to. Each
  class is declared as a region listing every value with its bit set, e.g. for three classes
  ``{"background": 0, "a": [1, 3, 5, 7], "b": [2, 3, 6, 7], "c": [4, 5, 6, 7]}``. This is nnU-Net v2's
  region format (as for BraTS), and ``regions_class_order`` (the bit values) is written for nnU-Net;
  the exact inverse of region predictions is the bitwise OR of the predicted bits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.atomic import remove_stale_temp, write_text
from autoseg.errors import AutosegError, ConfigError

#: ``progress(done, total)``, called after every case (the signature :mod:`autoseg.dataset.scan` uses).
ProgressFn = Callable[[int, int], None]

#: Key of the conversion record in dataset.json.
RECORD_KEY = "autoseg_convert"

#: More classes than this cannot be encoded as a bitmask in a uint16 label map.
MAX_REGION_CLASSES = 15


@dataclass(frozen=True)
class ConvertSummary:
    """What a converter did.

    Attributes:
        root: the raw dataset folder written.
        written: case ids converted by this run.
        skipped: case ids already complete from an earlier run (left as they were).
        failed: source items (patients, case-days) left out because they were invalid
            (only with ``skip_invalid``; their reasons are among the warnings).
        warnings: one line per problem that did not stop the conversion.
        labels: the ``labels`` object written to dataset.json.
    """

    root: Path
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    warnings: tuple[str, ...]
    labels: dict[str, int | list[int]]

    @property
    def num_cases(self) -> int:
        return len(self.written) + len(self.skipped)


def bitmask_labels(names: Sequence[str]) -> dict[str, int | list[int]]:
    """The dataset.json ``labels`` of the bitmask region encoding (module docstring).

    Args:
        names: class names; class ``i`` owns bit ``2**i``.

    Returns:
        ``{"background": 0, name_i: [every value in 1 .. 2**n - 1 with bit i set]}`` (a class of a
        one-class dataset is a plain value, not a list).

    Raises:
        ConfigError: more than :data:`MAX_REGION_CLASSES` classes, or a class named "background".
    """
    if len(names) > MAX_REGION_CLASSES:
        raise ConfigError(f"{len(names)} classes cannot be encoded as overlapping regions (at most "
                          f"{MAX_REGION_CLASSES}); convert fewer classes")
    labels: dict[str, int | list[int]] = {"background": 0}
    for bit, name in enumerate(names):
        if name == "background":
            raise ConfigError("a class is named 'background', the name of value 0; rename it")
        values = [v for v in range(1, 2 ** len(names)) if v & (1 << bit)]
        labels[name] = values if len(values) > 1 else values[0]
    return labels


def encode_bitmask(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Encode per-class boolean masks as one bitmask label map (class ``i`` -> bit ``2**i``).

    Args:
        masks: boolean arrays of one shape, in class order.

    Returns:
        uint8 (up to 8 classes) or uint16 label map.
    """
    if not masks:
        raise ValueError("no masks to encode")
    dtype = np.uint8 if len(masks) <= 8 else np.uint16
    out = np.zeros(masks[0].shape, dtype=dtype)
    for bit, mask in enumerate(masks):
        out |= mask.astype(dtype) << dtype(bit)
    return out


def safe_case_id(name: str) -> str:
    """A case id usable in file names: characters other than letters, digits, ``.-`` become ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("_.")
    return cleaned or "case"


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (after resolving links)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def prepare_output(out: Path, sources: Sequence[Path], record: dict[str, Any], command: str) -> dict[str, Any]:
    """Check that ``out`` may be (re)written and remove temporary files a killed run left behind.

    A rerun with the same inputs and settings resumes; anything else into the same folder is
    refused — in particular a second conversion of *other* inputs, which would otherwise merge two
    datasets and overwrite the first one's dataset.json.

    Args:
        out: the raw dataset folder to write.
        sources: input folders/files; ``out`` must not lie inside one (inputs are never modified,
            and a rerun would read its own output as input).
        record: the settings that shape the case files (stored under ``autoseg_convert``).
        command: the command line to name in messages (``"autoseg convert dicom-rt"``).

    Returns:
        The record to store in dataset.json: ``record`` plus the absolute ``sources``.

    Raises:
        ConfigError: ``out`` lies inside a source, holds something else, was converted from other
            inputs, or with other settings.
    """
    out = Path(out)
    record = {**record, "sources": [os.fspath(Path(s).resolve()) for s in sources]}
    for source in sources:
        if is_inside(out, source):
            raise ConfigError(f"{out}: the output folder lies inside the input {source}; inputs are never "
                              "modified: choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another output folder")
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        try:
            existing = json.loads(meta_path.read_text(encoding="utf-8")).get(RECORD_KEY)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            existing = None
        if existing is None:
            raise ConfigError(f"{out}: holds a dataset.json not written by {command}; choose an empty or new "
                              "output folder")
        if isinstance(existing, dict) and existing.get("sources") != record["sources"]:
            before = ", ".join(existing.get("sources") or ["unrecorded inputs"])
            raise ConfigError(f"{out}: holds a conversion of {before}; converting {', '.join(record['sources'])} "
                              "into it would merge two datasets: choose another output folder (or delete this one)")
        if existing != record:
            changed = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
            raise ConfigError(f"{out}: was converted with other settings ({', '.join(changed)} differ); resuming "
                              "would mix two encodings: delete the folder or choose another output folder")
    elif out.is_dir() and any(not name.startswith(".") for name in os.listdir(out)):
        raise ConfigError(f"{out}: the output folder is not empty and holds no dataset.json from {command}; "
                          "choose an empty or new output folder")
    for sub in ("imagesTr", "labelsTr"):
        remove_stale_temp(out / sub)
    return record


def case_done(out: Path, case_id: str, ending: str, num_channels: int) -> bool:
    """Whether a case was completed by an earlier run (label written last, so it proves the images)."""
    label = Path(out) / "labelsTr" / f"{case_id}{ending}"
    images = [Path(out) / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(num_channels)]
    return label.is_file() and all(p.is_file() for p in images)


def convert_each(case_ids: Sequence[str], convert: Callable[[str], list[str]], out: Path, ending: str, *,
                 skip_invalid: bool, left_out: Callable[[str], str],
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[str], list[str], list[str], list[str]]:
    """Convert every case not finished by an earlier run; returns (written, skipped, failed, warnings).

    Args:
        case_ids: the cases, in order.
        convert: writes one case (atomically) and returns its warnings.
        skip_invalid: a case whose conversion raises a user error is left out with a warning
            (``left_out(case_id)`` says so) instead of stopping the run.
        progress: ``progress(done, total)`` after each case.

    Raises:
        AutosegError: a case's error, unless ``skip_invalid``.
    """
    written: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    warnings: list[str] = []
    for done, case_id in enumerate(case_ids, start=1):
        if case_done(out, case_id, ending, 1):
            skipped.append(case_id)
        else:
            try:
                warnings.extend(convert(case_id))
                written.append(case_id)
            except AutosegError as exc:
                if not skip_invalid:
                    raise
                failed.append(case_id)
                warnings.append(f"{exc} ({left_out(case_id)})")
        if progress is not None:
            progress(done, len(case_ids))
    return written, skipped, failed, warnings


def count_cases(out: Path, ending: str) -> int:
    """Number of complete cases (label files) in ``out``."""
    folder = Path(out) / "labelsTr"
    if not folder.is_dir():
        return 0
    return sum(1 for name in os.listdir(folder) if name.endswith(ending) and not name.startswith("."))


def write_dataset_json(out: Path, *, name: str, description: str, channel_names: Sequence[str],
                       labels: dict[str, int | list[int]], file_ending: str, record: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> None:
    """Atomically write the nnU-Net v2 ``dataset.json`` (``numTraining`` counts the complete cases).

    Args:
        out: the raw dataset folder.
        name: dataset name.
        description: one sentence: the source and the conversion.
        channel_names: one name per channel (selects the normalisation scheme).
        labels: the ``labels`` object.
        file_ending: ``".nii.gz"`` or ``".png"``.
        record: the conversion settings, stored under :data:`RECORD_KEY`.
        extra: further keys (e.g. ``regions_class_order``).
    """
    meta: dict[str, Any] = {
        "name": name,
        "description": description,
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": labels,
        "numTraining": count_cases(out, file_ending),
        "file_ending": file_ending,
        RECORD_KEY: record,
        **(extra or {}),
    }
    # Not key-sorted: nnU-Net pairs regions_class_order with the order of the regions in "labels".
    write_text(Path(out) / "dataset.json", json.dumps(meta, indent=2, allow_nan=False) + "\n")


def region_extra(labels: dict[str, int | list[int]]) -> dict[str, Any]:
    """``regions_class_order`` for a bitmask encoding (nnU-Net requires it when regions are declared)."""
    bits = [1 << i for i, name in enumerate(n for n in labels if n != "background")]
    return {"regions_class_order": bits} if any(isinstance(v, list) for v in labels.values()) else {}


def short_list(items: Sequence[object], limit: int = 5) -> str:
    """``"a, b, c"`` or ``"a, b, c, ... (12 in all)"`` for messages."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"
