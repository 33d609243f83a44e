"""The ``train`` stage: resolve plans, splits and preprocessed data, then train the requested folds."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoseg import crossval
from autoseg import plans as plans_io
from autoseg.errors import ConfigError, DatasetError
from autoseg.experiment import WorkPaths
from autoseg.training.config import TrainConfig
from autoseg.training.trainer import Callbacks, FoldPaths, FoldSetup, TrainState, train_fold

#: Configurations that train on another configuration's preprocessed data.
DATA_OF = {"3d_cascade_fullres": "3d_fullres"}


@dataclass(frozen=True)
class FoldResult:
    fold: int
    state: TrainState
    folder: Path


def fold_folder(work: Path, configuration: str, fold: int) -> Path:
    return Path(work) / "models" / configuration / f"fold_{fold}"


def parse_folds(text: str, num_folds: int) -> list[int]:
    """``"0"``, ``"0,2"`` or ``"all"`` -> fold indices.

    Raises:
        ConfigError: not a fold number, or out of range.
    """
    if text.strip().lower() == "all":
        return list(range(num_folds))
    folds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(f"-f {text!r}: expected a fold number (0..{num_folds - 1}), a comma list, or 'all'")
        folds.append(int(part))
    for fold in folds:
        if fold >= num_folds:
            raise ConfigError(f"-f {fold}: the splits have folds 0..{num_folds - 1}")
    return folds


def case_ids_of(work: Path) -> list[str]:
    """The experiment's case ids (WORK/dataset.json, written by ``autoseg plan``)."""
    path = WorkPaths(Path(work)).dataset_json
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run 'autoseg plan RAW -o {work}' first")
    return sorted(json.loads(path.read_text(encoding="utf-8"))["cases"])


def run(
    work: Path,
    configuration: str,
    folds: str,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    splits_file: Path | None = None,
    callbacks_for: Callable[[int], Callbacks] | None = None,
    on_preprocess: Callable[[str], None] | None = None,
    validate: bool = True,
    validate_only: bool = False,
    on_validated: Callable[[int, dict], None] | None = None,
) -> list[FoldResult]:
    """Train ``folds`` of ``configuration`` in ``work``, then validate each fold in full.

    Preprocesses the configuration first if that was not done (``on_preprocess`` is told). After
    training, the fold's validation cases are predicted from the raw images with the predictor
    and scored into ``fold_<k>/metrics.json`` (``validate=False`` skips it; ``validate_only``
    redoes only that, from ``checkpoint_final.pt``).

    Raises:
        PlanError / DatasetError / ConfigError: missing plans, unknown configuration, bad splits.
    """
    work = Path(work)
    plans = plans_io.load(WorkPaths(work).plans)
    plans.configuration(configuration)  # raises with a did-you-mean for an unknown name
    if plans.configurations[configuration].previous_stage:
        raise ConfigError(f"{configuration}: cascade training (needs the 3d_lowres predictions) is not "
                          "supported yet; train 3d_fullres or 3d_lowres")
    data_config = DATA_OF.get(configuration, configuration)
    data_folder = work / "preprocessed" / data_config
    case_ids = case_ids_of(work)
    if not _preprocessed(data_folder, case_ids):
        from autoseg.preprocessing import run as preprocessing

        if on_preprocess:
            on_preprocess(data_config)
        preprocessing.run(work, [data_config], cfg.workers, None)
    splits = crossval.load_or_create(work, case_ids, splits_file)
    from autoseg.data import load_cases

    results = []
    if validate_only:
        from autoseg.validation import validate_fold

        for fold in parse_folds(folds, len(splits)):
            metrics = validate_fold(work, configuration, fold, "final", cfg.device)
            if on_validated:
                on_validated(fold, metrics)
            results.append(FoldResult(fold, TrainState(), fold_folder(work, configuration, fold)))
        return results
    for fold in parse_folds(folds, len(splits)):
        split = crossval.fold_cases(splits, fold)
        setup = FoldSetup(
            plans=plans, configuration=configuration, fold=fold,
            train_cases=load_cases(data_folder, split["train"]),
            val_cases=load_cases(data_folder, split["val"]),
            paths=FoldPaths(fold_folder(work, configuration, fold)),
        )
        callbacks = callbacks_for(fold) if callbacks_for else None
        state = train_fold(setup, cfg, resume=resume, callbacks=callbacks)
        if validate:
            from autoseg.validation import validate_fold

            metrics = validate_fold(work, configuration, fold, "final", cfg.device)
            if on_validated:
                on_validated(fold, metrics)
        results.append(FoldResult(fold, state, setup.paths.root))
    return results


def _preprocessed(folder: Path, case_ids: list[str]) -> bool:
    return folder.is_dir() and all((folder / f"{case_id}.json").is_file() for case_id in case_ids)
