"""``autoseg find-best``: choose the best configuration or ensemble from cross-validation, and its
postprocessing.

Inputs (written by training's fold validation, DESIGN §2)::

    WORK/models/<config>/fold_<k>/validation/<case><ending>  label map, original geometry and format
    WORK/models/<config>/fold_<k>/validation/<case>.npz      "probabilities", (K, Z, Y, X) float16

A configuration is *trained* when every fold of the splits (``WORK/splits.json``, or the default
5-fold split it would get) has a label map for each of its validation cases. Every trained
configuration is scored on all cross-validation cases pooled, and so is every pair of trained
configurations that saved probabilities (mean of the probabilities, argmax). The candidate with the
highest mean foreground Dice wins (ties: the single configuration, then the first name); then
postprocessing is decided on its predictions (:mod:`autoseg.evaluation.postprocess`). The result is
``WORK/best.yaml``::

    schema_version: 1
    configurations: [3d_fullres]        # one, or the two of the chosen ensemble
    folds: [0, 1, 2, 3, 4]
    postprocessing: {all_foreground: true, per_label: [], labels: {...}, dice_before: ..., ...}
    scores: {2d: 0.81, 3d_fullres: 0.86, 2d+3d_fullres: 0.85}

References are the raw label files (``WORK/dataset.json``: ``source`` + each case's ``label``).
Work is done case by case (a bounded pool, one case per task), so memory does not grow with the
number of cases. Region-based labels (sigmoid outputs, :mod:`autoseg.regions`) are ensembled the
same way: the mean of the region probabilities, exported by :func:`autoseg.regions.regions_to_labels`
(each region thresholded at 0.5 where that is consistent).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autoseg.atomic import write_text
from autoseg.crossval import make_splits, validate_splits
from autoseg.evaluation.ensemble import average_probabilities, load_probabilities, probabilities_to_labels, probability_files
from autoseg.errors import ConfigError, DatasetError
from autoseg.evaluation.evaluate import (
    ProgressFn,
    choose_workers,
    geometry_problems,
    label_files,
    map_pool,
    process_pool,
    read_label_map,
)
from autoseg.imageio import Geometry, read_info
from autoseg.metrics import DEFAULT_NSD_TOLERANCE_MM, case_metrics, summarize
from autoseg.evaluation.postprocess import PostprocessingDecision, candidate_dice, decide_from_dice
from autoseg.regions import membership, regions_of

BEST_SCHEMA_VERSION = 1
BEST_FILE = "best.yaml"
#: Separator of an ensemble's member names in its candidate name ("2d+3d_fullres").
ENSEMBLE_JOIN = "+"
_BEST_KEYS = ("schema_version", "configurations", "folds", "postprocessing", "scores")


@dataclass(frozen=True)
class CrossValidation:
    """What find-best needs to know about an experiment's cross-validation.

    Attributes:
        work: the experiment folder.
        labels: label name -> values (from WORK/dataset.json).
        references: case id -> raw reference label file.
        splits: the folds' validation cases (fold index -> case ids).
    """

    work: Path
    labels: dict[str, list[int]]
    references: dict[str, Path]
    splits: tuple[tuple[str, ...], ...]

    @property
    def folds(self) -> list[int]:
        return list(range(len(self.splits)))

    def fold_of(self) -> dict[str, int]:
        """Case id -> the (first) fold that validates it."""
        result: dict[str, int] = {}
        for fold, cases in enumerate(self.splits):
            for case in cases:
                result.setdefault(case, fold)
        return result


@dataclass(frozen=True)
class TrainedConfiguration:
    """A configuration with validation predictions for every cross-validation case.

    Attributes:
        name: configuration name (the folder under WORK/models).
        label_maps: case id -> validation label map.
        probabilities: case id -> validation ``.npz``; empty if some case has none.
    """

    name: str
    label_maps: dict[str, Path]
    probabilities: dict[str, Path]


@dataclass(frozen=True)
class BestChoice:
    """The content of ``WORK/best.yaml``."""

    configurations: tuple[str, ...]
    folds: tuple[int, ...]
    postprocessing: PostprocessingDecision
    scores: dict[str, float]
    schema_version: int = BEST_SCHEMA_VERSION

    @property
    def name(self) -> str:
        return ENSEMBLE_JOIN.join(self.configurations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "configurations": list(self.configurations),
            "folds": list(self.folds),
            "postprocessing": self.postprocessing.to_dict(),
            "scores": {k: float(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = BEST_FILE) -> BestChoice:
        """Validate and build from plain data.

        Raises:
            ConfigError: not a mapping, an unknown or missing key, a wrong schema version.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_BEST_KEYS)}; "
                              "rerun 'autoseg find-best'")
        unknown = sorted(set(data) - set(_BEST_KEYS))
        missing = [k for k in _BEST_KEYS if k not in data]
        if unknown or missing:
            what = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
            raise ConfigError(f"{where}: {what}; rerun 'autoseg find-best'")
        if data["schema_version"] != BEST_SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema_version {data['schema_version']!r}, expected {BEST_SCHEMA_VERSION}; "
                              "rerun 'autoseg find-best'")
        try:
            return cls(
                configurations=tuple(str(c) for c in data["configurations"]),
                folds=tuple(int(f) for f in data["folds"]),
                postprocessing=PostprocessingDecision.from_dict(data["postprocessing"], f"{where}: postprocessing"),
                scores={str(k): float(v) for k, v in dict(data["scores"]).items()},
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: invalid value ({exc}); rerun 'autoseg find-best'") from None


@dataclass(frozen=True)
class FindBestResult:
    """The choice, every candidate's summary (as :func:`autoseg.metrics.summarize` returns it),
    notes on configurations that were skipped, and the written file."""

    best: BestChoice
    summaries: dict[str, dict[str, Any]]
    notes: tuple[str, ...] = ()
    path: Path | None = None
    candidates: dict[str, tuple[str, ...]] = field(default_factory=dict)


def save_best(path: Path, best: BestChoice) -> None:
    """Write best.yaml atomically."""
    write_text(Path(path), yaml.safe_dump(best.to_dict(), sort_keys=False, default_flow_style=None))


def load_best(path: Path) -> BestChoice:
    """Read and validate a best.yaml.

    Raises:
        ConfigError: missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run 'autoseg find-best {path.parent}' first")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); rerun 'autoseg find-best'") from None
    return BestChoice.from_dict(data, os.fspath(path))


# ----------------------------------------------------------------------------------------------
# Reading the experiment


def load_crossval(work: Path) -> CrossValidation:
    """Labels, reference files and splits of an experiment.

    Raises:
        DatasetError: WORK/dataset.json is missing or unreadable, or the raw dataset has moved.
        ConfigError: WORK/splits.json is invalid.
    """
    from autoseg.evaluation.evaluate import _labels_from_mapping

    work = Path(work)
    record_path = work / "dataset.json"
    if not record_path.is_file():
        raise DatasetError(f"{record_path}: not found; run 'autoseg plan RAW -o {work}' first")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and "source" not in record and "cases" not in record:
            raise DatasetError(f"{record_path}: no training data recorded (a WORK made by 'autoseg import' holds a "
                               "model, not its experiment); run find-best in the experiment that trained it")
        source = Path(record["source"])
        cases = dict(record["cases"])
        labels = _labels_from_mapping(record["labels"], os.fspath(record_path))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{record_path}: unreadable experiment record ({exc}); rerun 'autoseg plan'") from None
    if not source.is_dir():
        raise DatasetError(f"{record_path}: the raw dataset {source} is gone; move it back or rerun 'autoseg plan'")
    references = {case: source / entry["label"] for case, entry in sorted(cases.items()) if entry.get("label")}
    splits_path = work / "splits.json"
    if splits_path.is_file():
        try:
            raw = json.loads(splits_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{splits_path}: not valid JSON ({exc}); fix or delete the file") from None
        splits = validate_splits(raw, list(references), os.fspath(splits_path))
    else:
        # Training writes splits.json; without it, the default split training would create.
        splits = make_splits(list(references))
    return CrossValidation(work, labels, references, tuple(tuple(s["val"]) for s in splits))


def trained_configurations(cv: CrossValidation) -> tuple[list[TrainedConfiguration], list[str]]:
    """Configurations with validation label maps for every fold's validation cases.

    Returns:
        The trained configurations (sorted by name), and one note per configuration skipped or
        without probabilities.
    """
    models = cv.work / "models"
    names = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if models.is_dir() else []
    trained: list[TrainedConfiguration] = []
    notes: list[str] = []
    for name in names:
        label_maps: dict[str, Path] = {}
        probabilities: dict[str, Path] = {}
        complete_folds = 0
        for fold, cases in enumerate(cv.splits):
            folder = models / name / f"fold_{fold}" / "validation"
            maps = label_files(folder) if folder.is_dir() else {}
            npz = probability_files(folder) if folder.is_dir() else {}
            if all(case in maps for case in cases):
                complete_folds += 1
            label_maps.update({case: maps[case] for case in cases if case in maps})
            probabilities.update({case: npz[case] for case in cases if case in npz})
        if complete_folds < len(cv.splits):
            notes.append(f"{name}: {complete_folds} of {len(cv.splits)} folds have validation predictions "
                         "for all their cases; skipped")
            continue
        if len(probabilities) < len(label_maps):
            notes.append(f"{name}: {len(label_maps) - len(probabilities)} validation case(s) lack probabilities "
                         "(.npz); not ensembled")
            probabilities = {}
        trained.append(TrainedConfiguration(name, label_maps, probabilities))
    return trained, notes


def candidates(trained: Sequence[TrainedConfiguration]) -> dict[str, tuple[str, ...]]:
    """Candidate name -> member configurations: each configuration, then each pair with probabilities
    (class or region probabilities alike)."""
    result = {c.name: (c.name,) for c in trained}
    with_probabilities = [c.name for c in trained if c.probabilities]
    for a, b in itertools.combinations(with_probabilities, 2):
        result[f"{a}{ENSEMBLE_JOIN}{b}"] = (a, b)
    return result


# ----------------------------------------------------------------------------------------------
# One case


_Task = tuple[str, Path, dict[str, tuple[tuple[str, Path, Path | None], ...]], dict[str, list[int]], float, bool]


def candidate_prediction(case_id: str, members: Sequence[tuple[str, Path, Path | None]],
                         ref_shape: tuple[int, ...], ref_geometry: Geometry,
                         regions: np.ndarray | None = None) -> np.ndarray:
    """One candidate's label map of a case: the member's label map, or the argmax of the members'
    mean probabilities (region-based: :func:`autoseg.regions.regions_to_labels` of them).

    Args:
        members: ``(configuration, label map, npz or None)`` per member.
        regions: the ``(R, V)`` region membership of region-based labels, else None.

    Raises:
        DatasetError: a grid or shape differs from the reference (naming the case and file).
    """
    if len(members) == 1:
        name, label_map, _ = members[0]
        pred, geometry = read_label_map(label_map)
        errors, _warnings = geometry_problems(geometry, pred.shape, ref_geometry, ref_shape)
        if errors:
            raise DatasetError(f"{label_map}: case {case_id!r} ({name}): {errors[0]}; the validation prediction "
                               "must be on the grid of the raw label; rerun the fold's validation")
        return pred
    arrays = []
    for name, _label_map, npz in members:
        if npz is None:
            raise DatasetError(f"case {case_id!r} ({name}): no validation probabilities (.npz) to ensemble; "
                               "rerun the fold's validation")
        array = load_probabilities(npz)
        if array.shape[1:] != tuple(ref_shape):
            raise DatasetError(f"{npz}: case {case_id!r} ({name}): probabilities of shape {array.shape[1:]} but the "
                               f"raw label has shape {tuple(ref_shape)}; rerun the fold's validation")
        if regions is not None and array.shape[0] != regions.shape[0]:
            raise DatasetError(f"{npz}: case {case_id!r} ({name}): {array.shape[0]} probability channels but the "
                               f"labels have {regions.shape[0]} regions; rerun the fold's validation")
        arrays.append(array)
    return probabilities_to_labels(average_probabilities(arrays), regions)


def _case_task(task: _Task) -> tuple[str, dict[str, dict]]:
    """Metrics of every candidate on one case (or, with ``dice_states``, the postprocessing states)."""
    case_id, ref_path, members_of, labels, tolerance_mm, dice_states = task
    ref, ref_geometry = read_label_map(ref_path)
    regions = regions_of(labels)
    member = membership(regions) if regions is not None else None
    result: dict[str, dict] = {}
    for name, members in members_of.items():
        pred = candidate_prediction(case_id, members, ref.shape, ref_geometry, member)
        if dice_states:
            result[name] = candidate_dice(pred, ref, labels)
        else:
            result[name] = case_metrics(pred, ref, ref_geometry.spacing, labels, tolerance_mm)
    return case_id, result


def _members(configs: dict[str, TrainedConfiguration], names: tuple[str, ...],
             case: str) -> tuple[tuple[str, Path, Path | None], ...]:
    return tuple((n, configs[n].label_maps[case], configs[n].probabilities.get(case)) for n in names)


def _bytes_per_case(cv: CrossValidation, n_classes: int, n_candidates: int) -> int:
    """Working memory of one task: reference, per candidate a label map and up to two float32
    probability arrays, and the metrics' masks and distance transform (from a few headers)."""
    largest = sorted(cv.references.values(), key=lambda p: p.stat().st_size if p.exists() else 0, reverse=True)[:5]
    voxels = 0
    for path in largest:
        try:
            voxels = max(voxels, int(np.prod(read_info(path).shape)))
        except DatasetError:
            continue
    return voxels * (32 + 8 * n_classes + 4 * min(n_candidates, 2))


# ----------------------------------------------------------------------------------------------
# The stage


def choose_best(scores: dict[str, float | None], order: Sequence[str]) -> str:
    """The candidate with the highest score; ties go to the earlier name in ``order`` (singles first).

    Raises:
        DatasetError: no candidate has a score.
    """
    best: str | None = None
    for name in order:
        score = scores.get(name)
        if score is not None and (best is None or score > scores[best]):  # type: ignore[operator]
            best = name
    if best is None:
        raise DatasetError("no candidate could be scored: the labels declare no foreground class")
    return best


def _refuse_other_tasks(work: Path) -> None:
    """find-best compares label maps by Dice; a restoration experiment is refused in one line.

    Raises:
        ConfigError: WORK's plans name a task other than segmentation.
    """
    from autoseg import plans as plans_io

    path = work / "plans.yaml"
    if not path.is_file():
        return  # load_crossval says what is missing
    task = plans_io.load(path).task
    if task != "segmentation":
        raise ConfigError(f"{work}: a {task} experiment; find-best chooses among segmentation models by Dice and does "
                          "not take restoration models yet: compare the configurations' mean_psnr_db in "
                          "models/<config>/fold_<k>/metrics.json and predict with -c")


def run(work: Path, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, workers: int | None = None,
        progress: ProgressFn | None = None) -> FindBestResult:
    """Score every trained configuration and pair, choose the best, decide its postprocessing, and
    write ``WORK/best.yaml``.

    Args:
        work: the experiment folder.
        tolerance_mm: NSD tolerance in mm (reported; the choice is by mean foreground Dice).
        workers: processes (default: CPU count, bounded by free memory).
        progress: called as ``progress(done, total)`` over both passes.

    Raises:
        DatasetError: no configuration has complete cross-validation predictions, or a prediction
            does not match its reference (naming the case).
        ConfigError: an invalid splits.json, or a negative tolerance.
    """
    if tolerance_mm < 0:
        raise ConfigError(f"--tolerance {tolerance_mm}: the NSD tolerance must be >= 0 mm")
    _refuse_other_tasks(Path(work))
    cv = load_crossval(Path(work))
    trained, notes = trained_configurations(cv)
    if not trained:
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise DatasetError(f"{cv.work}: no configuration has cross-validation predictions; train folds first, e.g. "
                           f"'autoseg train {cv.work} -c 3d_fullres -f all'{detail}")
    configs = {c.name: c for c in trained}
    cands = candidates(trained)
    cases = sorted(cv.fold_of())
    n_classes = len(cv.labels)
    total = 2 * len(cases)
    offset = 0

    def report(done: int, _total: int) -> None:
        if progress:
            progress(offset + done, total)

    def tasks(selected: dict[str, tuple[str, ...]], dice_states: bool) -> list[_Task]:
        return [(case, cv.references[case], {name: _members(configs, members, case)
                                             for name, members in selected.items()},
                 cv.labels, tolerance_mm, dice_states) for case in cases]

    n_workers = choose_workers(workers, len(cases), _bytes_per_case(cv, n_classes, len(cands)))
    per_candidate: dict[str, dict[str, dict]] = {name: {} for name in cands}
    # One pool for both passes, created before the progress bar starts (see process_pool).
    with process_pool(n_workers) as pool:
        for case, metrics in map_pool(_case_task, tasks(cands, False), pool, report):
            for name, per_label in metrics.items():
                per_candidate[name][case] = per_label
        summaries = {name: summarize(dict(sorted(per_case.items()))) for name, per_case in per_candidate.items()}
        scores = {name: s["mean_foreground_dice"] for name, s in summaries.items()}
        chosen = choose_best(scores, list(cands))

        offset = len(cases)
        states = (metrics[chosen] for _, metrics in map_pool(_case_task, tasks({chosen: cands[chosen]}, True),
                                                             pool, report))
        decision = decide_from_dice(states, cv.labels)
    best = BestChoice(
        configurations=cands[chosen],
        folds=tuple(cv.folds),
        postprocessing=decision,
        scores={name: float(s) for name, s in scores.items() if s is not None},
    )
    path = cv.work / BEST_FILE
    save_best(path, best)
    return FindBestResult(best, summaries, tuple(notes), path, dict(cands))
