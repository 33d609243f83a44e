"""A cascade stage's training input: the previous stage's cross-validation segmentation of every case.

``3d_cascade_fullres`` fold k trains on ``3d_fullres``'s preprocessed data plus, for each case, the
``3d_lowres`` segmentation of that case predicted by the lowres fold that did *not* train on it
(its cross-validation prediction, written by the lowres fold's validation), as nnU-Net does: the
cascade learns from the errors the lowres stage really makes on unseen images, which is what it
gets at prediction time. Those label maps, in the image's original geometry, go through the
cascade's own transpose, crop and label resampling
(:func:`autoseg.preprocessing.pipeline.previous_stage_labels`) and are kept beside the
stage's models as ``WORK/models/<cascade>/previous_stage/<case>.npy``, each with a stamp of its
source (a new lowres validation makes it stale).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from autoseg import crossval
from autoseg.errors import ConfigError, DatasetError
from autoseg.plans import Plans, foreground_label_values


def previous_folder(work: Path, configuration: str) -> Path:
    """``WORK/models/<cascade stage>/previous_stage``: the previous stage's segmentations on its grid."""
    return Path(work) / "models" / configuration / "previous_stage"


def _source_fold(splits: list, case_id: str) -> int:
    for fold in range(len(splits)):
        if case_id in crossval.fold_cases(splits, fold)["val"]:
            return fold
    raise ConfigError(f"case {case_id!r} is in no fold's validation set of splits.json; "
                      "a cascade needs every case predicted by the previous stage's cross-validation")


def missing_previous(work: Path, plans: Plans, configuration: str, splits: list,
                     case_ids: Sequence[str]) -> dict[int, list[str]]:
    """Previous-stage folds whose cross-validation label maps of ``case_ids`` are missing: fold -> cases."""
    from autoseg.inference.inputs import output_ending
    from autoseg.preprocessing.run import load_work_cases
    from autoseg.training.validation import validation_folder

    previous = plans.configuration(configuration).previous_stage
    assert previous is not None
    cases = {case.case_id: case for case in load_work_cases(work)}
    missing: dict[int, list[str]] = {}
    for case_id in case_ids:
        fold = _source_fold(splits, case_id)
        path = validation_folder(work, previous, fold) / f"{case_id}{output_ending(cases[case_id].images[0])}"
        if not path.is_file():
            missing.setdefault(fold, []).append(case_id)
    return missing


def prepare_previous(work: Path, plans: Plans, configuration: str, splits: list, case_ids: Sequence[str],
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Put the previous stage's cross-validation segmentation of every case on the cascade's grid.

    Args:
        work: the experiment folder (its ``3d_fullres`` data preprocessed: the props give the grid).
        plans: the plans.
        configuration: the cascade stage (``3d_cascade_fullres``).
        splits: the cross-validation splits (which lowres fold predicted which case).
        case_ids: the cases the cascade's folds use.
        progress: ``progress(done, total)`` over the cases.

    Returns:
        The folder holding ``<case>.npy``.

    Raises:
        ConfigError: the previous stage (or one of its folds' validation) is missing; the message
            names the folds and the command that makes them.
    """
    from autoseg.atomic import atomic_path, write_json
    from autoseg.imageio import read_image
    from autoseg.inference.inputs import output_ending
    from autoseg.preprocessing.pipeline import previous_stage_labels
    from autoseg.preprocessing.run import load_work_cases
    from autoseg.training.run import DATA_OF
    from autoseg.training.validation import validation_folder

    config = plans.configuration(configuration)
    previous = config.previous_stage
    if previous is None:
        raise ConfigError(f"{configuration}: not a cascade stage (no previous_stage in plans.yaml)")
    missing = missing_previous(work, plans, configuration, splits, case_ids)
    if missing:
        folds = ",".join(str(f) for f in sorted(missing))
        count = sum(len(v) for v in missing.values())
        raise ConfigError(
            f"{configuration} trains on {previous}'s cross-validation predictions; {count} case(s) have none "
            f"(fold(s) {folds} of {previous} not trained or not validated): run "
            f"'autoseg train {work} -c {previous} -f {folds}' first")
    data_folder = Path(work) / "preprocessed" / DATA_OF.get(configuration, configuration)
    folder = previous_folder(work, configuration)
    folder.mkdir(parents=True, exist_ok=True)
    cases = {case.case_id: case for case in load_work_cases(work)}
    for index, case_id in enumerate(case_ids):
        source = validation_folder(work, previous, _source_fold(splits, case_id)) / \
            f"{case_id}{output_ending(cases[case_id].images[0])}"
        props_path = data_folder / f"{case_id}.json"
        stamp = {"source": str(source), "source_sha256": _sha256(source), "props_sha256": _sha256(props_path)}
        stamp_path = folder / f"{case_id}.json"
        if not _stamp_matches(stamp_path, stamp) or not (folder / f"{case_id}.npy").is_file():
            labels = read_image(source)[0][0]
            props = json.loads(props_path.read_text(encoding="utf-8"))
            try:
                on_grid = previous_stage_labels(labels, props, plans, configuration)
            except ValueError as exc:
                raise DatasetError(f"{source}: {exc}; re-run 'autoseg train {work} -c {previous} "
                                   "--validate-only'") from None
            stamp_path.unlink(missing_ok=True)
            with atomic_path(folder / f"{case_id}.npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, on_grid, allow_pickle=False)
            write_json(stamp_path, stamp)  # last: its presence marks the file finished
        if progress is not None:
            progress(index + 1, len(case_ids))
    return folder


def with_previous(cases: list, folder: Path, plans: Plans) -> list:
    """The cases (:class:`autoseg.data.Case`) with their previous-stage label maps attached."""
    values = foreground_label_values(plans.labels)
    return [case.with_previous(folder / f"{case.case_id}.npy", values) for case in cases]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_matches(path: Path, stamp: dict) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


__all__ = ["missing_previous", "prepare_previous", "previous_folder", "with_previous"]
