"""``autoseg find-best`` on synthetic cross-validation results, and ``autoseg ensemble``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import phantoms
import pytest
import yaml

from autoseg.evaluation import find_best
from autoseg.evaluation.ensemble import PROBABILITIES_KEY, write_probabilities
from autoseg.imageio import read_image

NUM_CLASSES = 3  # background, shell, core (phantoms.LABELS)


def class_probabilities(ref: np.ndarray, wrong: np.ndarray | None = None, wrong_conf: float = 0.6,
                        right_conf: float = 0.9) -> np.ndarray:
    """(K, Z, Y, X) probabilities: the reference class at ``right_conf``; inside ``wrong`` the next
    class gets ``wrong_conf`` and the true class most of the rest."""
    onehot = np.moveaxis(np.eye(NUM_CLASSES, dtype=np.float32)[ref], -1, 0)
    probs = onehot * right_conf + (1 - onehot) * (1 - right_conf) / (NUM_CLASSES - 1)
    if wrong is not None:
        other = np.moveaxis(np.eye(NUM_CLASSES, dtype=np.float32)[(ref + 1) % NUM_CLASSES], -1, 0)
        rest = 1 - onehot - other
        bad = other * wrong_conf + onehot * (1 - wrong_conf) * 0.75 + rest * (1 - wrong_conf) * 0.25
        probs = np.where(wrong[None], bad, probs)
    return probs.astype(np.float32)


def make_work(tmp_path: Path, n_cases: int = 4) -> tuple[Path, dict[str, np.ndarray], list[list[str]]]:
    """A raw phantom dataset and a WORK with dataset.json and a 2-fold splits.json."""
    raw, work = tmp_path / "raw", tmp_path / "work"
    ids = phantoms.write_nnunet_dataset(raw, n_cases=n_cases)
    refs = {case: read_image(raw / "labelsTr" / f"{case}.nii.gz")[0][0] for case in ids}
    phantoms.write_json(work / "dataset.json", {
        "name": "phantoms", "source": str(raw), "labels": phantoms.LABELS,
        "cases": {case: {"images": [f"imagesTr/{case}_0000.nii.gz"], "label": f"labelsTr/{case}.nii.gz"}
                  for case in ids},
    })
    half = n_cases // 2
    folds = [ids[:half], ids[half:]]
    phantoms.write_json(work / "splits.json", [{"train": folds[1 - k], "val": folds[k]} for k in range(2)])
    return work, refs, folds


def write_validation(work: Path, config: str, folds: list[list[str]], probabilities: dict[str, np.ndarray],
                     only_folds: tuple[int, ...] | None = None) -> None:
    """Label maps (argmax) and npz probabilities as the predictor's fold validation writes them."""
    for k, cases in enumerate(folds):
        if only_folds is not None and k not in only_folds:
            continue
        folder = work / "models" / config / f"fold_{k}" / "validation"
        for case in cases:
            probs = probabilities[case]
            phantoms.write_case_image(folder / f"{case}.nii.gz", np.argmax(probs, 0).astype(np.uint8))
            write_probabilities(folder / f"{case}.npz", probs)


def slab(shape: tuple[int, ...], z: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z] = True
    return mask


def test_picks_the_better_configuration_and_decides_postprocessing(cli, tmp_path: Path) -> None:
    work, refs, folds = make_work(tmp_path)
    good, bad = {}, {}
    for case, ref in refs.items():
        with_blob = ref.copy()
        with_blob[-2:, :2, :2] = 1  # a stray shell blob far from the object: all-foreground LCC helps
        good[case] = class_probabilities(with_blob)
        # Confident errors over half the volume: averaging with them spoils the ensemble too.
        bad[case] = class_probabilities(ref, wrong=slab(ref.shape, slice(0, 6)), wrong_conf=0.99)
    write_validation(work, "3d_fullres", folds, good)
    write_validation(work, "2d", folds, bad)
    write_validation(work, "2.5d", folds, good, only_folds=(0,))  # incomplete: skipped

    result = cli("find-best", work, "-j", "1")
    assert result.exit_code == 0, result.output
    assert "2.5d: 1 of 2 folds" in result.output
    best = yaml.safe_load((work / "best.yaml").read_text())
    assert list(best) == ["schema_version", "configurations", "folds", "postprocessing", "scores"]
    assert best["schema_version"] == 1
    assert best["configurations"] == ["3d_fullres"]
    assert best["folds"] == [0, 1]
    assert set(best["scores"]) == {"2d", "3d_fullres", "2d+3d_fullres"}
    assert best["scores"]["3d_fullres"] > best["scores"]["2d+3d_fullres"]
    assert best["scores"]["3d_fullres"] > best["scores"]["2d"]
    assert best["postprocessing"]["all_foreground"] is True
    assert best["postprocessing"]["dice_after"] == pytest.approx(1.0)
    loaded = find_best.load_best(work / "best.yaml")
    assert loaded.configurations == ("3d_fullres",) and loaded.postprocessing.all_foreground


def test_picks_the_ensemble_when_it_is_best(tmp_path: Path) -> None:
    work, refs, folds = make_work(tmp_path)
    a, b = {}, {}
    for case, ref in refs.items():
        # Unconfident errors in different places: the mean of the probabilities corrects both.
        a[case] = class_probabilities(ref, wrong=slab(ref.shape, slice(2, 5)))
        b[case] = class_probabilities(ref, wrong=slab(ref.shape, slice(6, 9)))
    write_validation(work, "2d", folds, a)
    write_validation(work, "3d_fullres", folds, b)
    result = find_best.run(work, workers=2)
    assert result.best.configurations == ("2d", "3d_fullres")
    assert result.best.scores["2d+3d_fullres"] == pytest.approx(1.0)
    assert max(result.best.scores["2d"], result.best.scores["3d_fullres"]) < 0.99
    assert not result.best.postprocessing.all_foreground  # nothing to remove in a perfect prediction
    assert result.path == work / "best.yaml"


def test_no_cross_validation_predictions_is_one_clear_error(cli, tmp_path: Path) -> None:
    work, _, _ = make_work(tmp_path)
    result = cli("find-best", work)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "no configuration has cross-validation predictions; train folds first" in result.output


# ----------------------------------------------------------------------------------------------
# autoseg ensemble


def write_prediction_folder(folder: Path, probabilities: dict[str, np.ndarray], geometry: object) -> None:
    for case, probs in probabilities.items():
        phantoms.write_case_image(folder / f"{case}.nii.gz", np.argmax(probs, 0).astype(np.uint8), geometry)
        write_probabilities(folder / f"{case}.npz", probs)


def test_ensemble_averages_probabilities_and_copies_geometry(cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    geometry = phantoms.geometry(spacing=(2.5, 0.7, 0.6), origin=(10.0, -4.0, 3.0))
    first, second = {}, {}
    for case in ("a", "b"):
        first[case] = rng.dirichlet(np.ones(NUM_CLASSES), size=shape).transpose(3, 0, 1, 2).astype(np.float32)
        second[case] = rng.dirichlet(np.ones(NUM_CLASSES), size=shape).transpose(3, 0, 1, 2).astype(np.float32)
    write_prediction_folder(tmp_path / "A", first, geometry)
    write_prediction_folder(tmp_path / "B", second, phantoms.geometry())  # B's geometry is not used
    out = tmp_path / "out"
    result = cli("ensemble", tmp_path / "A", tmp_path / "B", "-o", out, "--save-probabilities", "-j", "1")
    assert result.exit_code == 0, result.output
    for case in ("a", "b"):
        stored = [p.astype(np.float16).astype(np.float32) for p in (first[case], second[case])]
        expected = np.argmax((stored[0] + stored[1]) / 2, axis=0)
        label, geom = read_image(out / f"{case}.nii.gz")
        assert np.array_equal(label[0], expected)
        assert geom.spacing == pytest.approx(geometry.spacing) and geom.origin == pytest.approx(geometry.origin)
        with np.load(out / f"{case}.npz") as data:
            assert data[PROBABILITIES_KEY].dtype == np.float16
            assert np.allclose(data[PROBABILITIES_KEY], (stored[0] + stored[1]) / 2, atol=1e-3)


def test_ensemble_errors_name_the_case(cli, tmp_path: Path) -> None:
    probs = {case: np.full((NUM_CLASSES, 3, 4, 5), 1 / NUM_CLASSES, np.float32) for case in ("a", "b")}
    write_prediction_folder(tmp_path / "A", probs, phantoms.geometry())
    write_prediction_folder(tmp_path / "B", {"a": probs["a"]}, phantoms.geometry())
    result = cli("ensemble", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "out")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "'b'" in result.output and "B" in result.output
    write_probabilities(tmp_path / "B" / "b.npz", np.zeros((NUM_CLASSES, 3, 4, 6), np.float32))
    result = cli("ensemble", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "out", "-j", "1")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "'b'" in result.output and "shape" in result.output
    result = cli("ensemble", tmp_path / "A", "-o", tmp_path / "out")
    assert result.exit_code != 0 and "at least two" in result.output


def test_a_label_no_case_has_is_na_not_a_score(cli, tmp_path: Path) -> None:
    """A declared label absent from every reference and prediction has no Dice (it used to fail the
    table); the choice and the postprocessing are judged on the labels that occur."""
    work, refs, folds = make_work(tmp_path)
    meta = phantoms.read_dataset_json(work)
    phantoms.write_json(work / "dataset.json", {**meta, "labels": {**phantoms.LABELS, "cyst": 3}})
    probabilities = {case: np.concatenate([class_probabilities(ref), np.zeros((1, *ref.shape), np.float32)])
                     for case, ref in refs.items()}
    write_validation(work, "3d_fullres", folds, probabilities)
    result = cli("find-best", work, "-j", "1")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "n/a" in result.output
    best = yaml.safe_load((work / "best.yaml").read_text())
    assert best["scores"]["3d_fullres"] == pytest.approx(1.0)
    assert best["postprocessing"]["label_dice_before"]["cyst"] is None
