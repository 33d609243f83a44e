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

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
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


def check_previous_stage(work: Path, plans: Plans, configuration: str, splits: list, case_ids: Sequence[str]) -> None:
    """Every case has its previous-stage cross-validation label map, made by the fold's current weights.

    Raises:
        ConfigError: folds not trained, trained but not validated, or trained again after their
            validation; the message names them and the command that fixes it.
    """
    from autoseg.training.run import fold_folder
    from autoseg.training.validation import METRICS_FILE

    config = plans.configuration(configuration)
    previous = config.previous_stage
    if previous is None:
        raise ConfigError(f"{configuration}: not a cascade stage (no previous_stage in plans.yaml)")
    missing = missing_previous(work, plans, configuration, splits, case_ids)
    folds = sorted({_source_fold(splits, c) for c in case_ids})
    trained = [f for f in folds if (fold_folder(work, previous, f) / "checkpoint_final.pt").is_file()]
    untrained = [f for f in sorted(missing) if f not in trained]
    # A fold trained again (e.g. --resume --no-validate) after its validation: its label maps are
    # the older weights' and would not be what prediction feeds the cascade.
    stale = [f for f in trained if f not in missing and _newer(fold_folder(work, previous, f) / "checkpoint_final.pt",
                                                             fold_folder(work, previous, f) / METRICS_FILE)]
    unvalidated = sorted({f for f in missing if f in trained} | set(stale))
    lead = f"{configuration} trains on {previous}'s cross-validation predictions"
    if untrained:
        count = sum(len(missing[f]) for f in untrained)
        raise ConfigError(f"{lead}; {count} case(s) have none (fold(s) {_join(untrained)} of {previous} not trained): "
                          f"run 'autoseg train {work} -c {previous} -f {_join(untrained)}' first")
    if unvalidated:
        raise ConfigError(f"{lead}; fold(s) {_join(unvalidated)} of {previous} are trained but their validation is "
                          f"missing or older than their weights: run 'autoseg train {work} -c {previous} -f "
                          f"{_join(unvalidated)} --validate-only' first")


def _join(folds: Sequence[int]) -> str:
    return ",".join(str(f) for f in folds)


def _newer(path: Path, than: Path) -> bool:
    try:
        return path.stat().st_mtime > than.stat().st_mtime
    except FileNotFoundError:
        return True


def prepare_previous(work: Path, plans: Plans, configuration: str, splits: list, case_ids: Sequence[str],
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Put the previous stage's cross-validation segmentation of every case on the cascade's grid.

    Several processes may call it at once (torchrun ranks, folds started side by side): they take
    turns on a lock, and the later ones find the stamps current and write nothing.

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
        ConfigError: the previous stage (or one of its folds' validation) is missing or stale; the
            message names the folds and the command that makes them.
    """
    from autoseg.atomic import atomic_path, write_json
    from autoseg.imageio import read_image
    from autoseg.inference.inputs import output_ending
    from autoseg.preprocessing.pipeline import previous_stage_labels
    from autoseg.preprocessing.run import load_work_cases
    from autoseg.training.run import DATA_OF
    from autoseg.training.validation import validation_folder

    check_previous_stage(work, plans, configuration, splits, case_ids)
    previous = plans.configuration(configuration).previous_stage
    assert previous is not None
    data_folder = Path(work) / "preprocessed" / DATA_OF.get(configuration, configuration)
    folder = previous_folder(work, configuration)
    folder.mkdir(parents=True, exist_ok=True)
    cases = {case.case_id: case for case in load_work_cases(work)}
    if progress is not None:
        progress(0, len(case_ids))
    with _waiting_lock(folder / ".lock"):
        for index, case_id in enumerate(case_ids):
            source = validation_folder(work, previous, _source_fold(splits, case_id)) / \
                f"{case_id}{output_ending(cases[case_id].images[0])}"
            props_path = data_folder / f"{case_id}.json"
            stamp = {"source": source.relative_to(work).as_posix(), "source_sha256": _sha256(source),
                     "props_sha256": _sha256(props_path)}
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


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` that waits for its holder (POSIX ``flock``; released however
    the holder ends). Without fcntl (Windows) no lock: the atomic writes still keep files whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def with_previous(cases: list, folder: Path, plans: Plans) -> list:
    """The cases (:class:`autoseg.data.Case`) with their previous-stage label maps attached.

    Raises:
        ConfigError: a case's map is missing (the cascade's training prepares them first).
    """
    values = foreground_label_values(plans.labels)
    for case in cases:
        if not (folder / f"{case.case_id}.json").is_file():
            raise ConfigError(f"{folder / (case.case_id + '.npy')}: the previous stage's segmentation of "
                              f"{case.case_id!r} is missing; start the cascade's training with 'autoseg train'")
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


__all__ = ["check_previous_stage", "missing_previous", "prepare_previous", "previous_folder", "with_previous"]
