"""Cross-validation splits: ``WORK/splits.json``, 5-fold KFold over sorted case ids (seed 12345).

The defaults are nnU-Net's, so fold k holds out the same cases in both tools. A user-given splits
file (hand-edited ``splits.json`` or ``--splits PATH``) is honoured after validation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from autoseg.atomic import write_json
from autoseg.errors import ConfigError

NUM_FOLDS = 5
SPLIT_SEED = 12345

Split = dict[str, list[str]]


def make_splits(case_ids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[Split]:
    """KFold(num_folds, shuffle, seed) over the sorted case ids.

    Raises:
        ConfigError: fewer cases than folds.
    """
    from sklearn.model_selection import KFold

    ids = sorted(case_ids)
    if len(ids) < num_folds:
        raise ConfigError(f"{len(ids)} case(s) cannot be split into {num_folds} folds; "
                          f"add cases or give a splits file with fewer folds")
    folds = KFold(n_splits=num_folds, shuffle=True, random_state=seed)
    return [{"train": [ids[i] for i in train], "val": [ids[i] for i in val]} for train, val in folds.split(ids)]


def validate_splits(splits: object, case_ids: Sequence[str], where: str) -> list[Split]:
    """Check a splits structure against the dataset's cases.

    Raises:
        ConfigError: not a list of {train, val}, an unknown case, a case twice in one fold, or a
            case both in train and val of one fold (the message names the fold and the case).
    """
    known = set(case_ids)
    if not isinstance(splits, list) or not splits:
        raise ConfigError(f"{where}: expected a list of folds, each {{\"train\": [...], \"val\": [...]}}")
    result: list[Split] = []
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise ConfigError(f"{where}: fold {k} must have exactly the keys 'train' and 'val'")
        for part in ("train", "val"):
            ids = fold[part]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
                raise ConfigError(f"{where}: fold {k} {part!r} must be a non-empty list of case ids")
            unknown = sorted(set(ids) - known)
            if unknown:
                raise ConfigError(f"{where}: fold {k} {part!r} names unknown case(s) {unknown[:5]}; "
                                  "use the case ids of the dataset (see WORK/dataset.json)")
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ConfigError(f"{where}: fold {k} {part!r} lists case(s) {duplicates[:5]} twice")
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            raise ConfigError(f"{where}: fold {k} has case(s) {overlap[:5]} in both train and val")
        result.append({"train": list(fold["train"]), "val": list(fold["val"])})
    return result


def load(path: Path, case_ids: Sequence[str]) -> list[Split]:
    """Read and validate a splits file.

    Raises:
        ConfigError: missing, not JSON, or invalid for these cases.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: splits file not found; training writes WORK/splits.json "
                          "(or pass --splits to 'autoseg train')")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix or delete the file") from None
    return validate_splits(data, case_ids, str(path))


def load_or_create(work: Path, case_ids: Sequence[str], splits_file: Path | None = None) -> list[Split]:
    """The splits of an experiment: a given file, else WORK/splits.json, else new 5-fold splits.

    A given file is validated and copied to WORK/splits.json so the record stays in the experiment.
    """
    path = Path(splits_file) if splits_file is not None else Path(work) / "splits.json"
    if path.is_file() or splits_file is not None:
        splits = load(path, case_ids)
        if splits_file is not None:
            write_json(Path(work) / "splits.json", splits)
        return splits
    splits = make_splits(case_ids)
    write_json(path, splits)
    return splits


def fold_cases(splits: list[Split], fold: int) -> Split:
    """The train/val cases of one fold.

    Raises:
        ConfigError: the fold does not exist.
    """
    if not 0 <= fold < len(splits):
        raise ConfigError(f"fold {fold} does not exist; the splits have folds 0..{len(splits) - 1}")
    return splits[fold]
