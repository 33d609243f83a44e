"""``autoseg evaluate`` on synthetic folders: reports, label sources, matching and geometry errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import phantoms
import pytest

from autoseg.evaluation import evaluate
from autoseg.errors import DatasetError
from autoseg.imageio import read_image


def write_folder(folder: Path, n: int = 3, shape: tuple[int, int, int] = (8, 10, 9)) -> dict[str, np.ndarray]:
    """Phantom label maps ``case_000...`` (labels 1 shell, 2 core) in ``folder``."""
    maps = {}
    for i, case in enumerate(phantoms.case_ids(n)):
        _, label = phantoms.ellipsoid(shape, seed=i)
        phantoms.write_case_image(folder / f"{case}.nii.gz", label)
        maps[case] = label
    return maps


def one_line_error(result: object, *needles: str) -> str:
    """The CLI failed with one ``error:`` line holding every needle, and no traceback; that line."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[-1], result.output
    return lines[-1]


def test_report_json_and_csv(cli, tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    maps = write_folder(ref)
    shutil.copytree(ref, pred)
    wrong = maps["case_001"].copy()
    wrong[wrong == 2] = 1  # the core predicted as shell
    phantoms.write_case_image(pred / "case_001.nii.gz", wrong)

    result = cli("evaluate", pred, ref, "-o", tmp_path / "out" / "report.json", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "mean foreground Dice" in result.output

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["labels"] == {"background": [0], "1": [1], "2": [2]}  # every value found
    assert sorted(report["cases"]) == ["case_000", "case_001", "case_002"]
    perfect = report["cases"]["case_000"]["2"]
    assert perfect["dice"] == 1.0 and perfect["hd95"] == 0.0 and perfect["nsd"] == 1.0
    missed = report["cases"]["case_001"]["2"]
    assert missed["dice"] == 0.0 and missed["hd95"] is None and missed["fn"] == int((maps["case_001"] == 2).sum())
    core = report["summary"]["labels"]["2"]
    assert core["dice"]["mean"] == pytest.approx(2 / 3)
    assert core["hd95"]["n_undefined"] == 1 and core["hd95"]["n"] == 2
    assert report["missing_predictions"] == []

    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert len(rows) == 3 * 2
    assert list(rows[0]) == ["case", "label", "dice", "iou", "hd95", "nsd", "tp", "fp", "fn", "n_ref", "n_pred"]
    row = next(r for r in rows if r["case"] == "case_001" and r["label"] == "2")
    assert row["dice"] == "0.0" and row["hd95"] == ""


def test_reference_dataset_labels_and_missing_predictions(cli, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    ids = phantoms.write_nnunet_dataset(raw, n_cases=3)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in ids[:2]:
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    (pred / f"{ids[0]}.npz").write_bytes(b"")  # other files in PRED are ignored

    result = cli("evaluate", pred, raw, "-j", "1")
    assert result.exit_code == 0, result.output
    assert "case_002" in result.output and "warning" in result.output
    report = json.loads((pred / "evaluation.json").read_text())  # default: inside PRED
    assert report["missing_predictions"] == ["case_002"]
    assert sorted(report["cases"]) == ids[:2]
    assert set(report["cases"]["case_000"]) == {"shell", "core"}
    assert report["summary"]["mean_foreground_dice"] == 1.0
    assert (pred / "evaluation.csv").is_file()


def test_labels_option_with_a_region(cli, tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    maps = write_folder(ref, n=2)
    pred.mkdir()
    for case, label in maps.items():
        swapped = np.where(label == 2, 1, np.where(label == 1, 2, 0)).astype(np.uint8)
        phantoms.write_case_image(pred / f"{case}.nii.gz", swapped)
    work = tmp_path / "work"
    phantoms.write_json(work / "dataset.json", {"labels": {"background": 0, "shell": 1, "core": 2,
                                                           "whole": [1, 2]}})
    result = cli("evaluate", pred, ref, "--labels", work, "-o", tmp_path / "r.json", "--tolerance", "1", "-j", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["nsd_tolerance_mm"] == 1.0
    assert report["summary"]["labels"]["whole"]["dice"]["mean"] == 1.0
    assert report["summary"]["labels"]["core"]["dice"]["mean"] == 0.0


def test_geometry_mismatch_names_the_case(cli, tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    maps = write_folder(ref)
    shutil.copytree(ref, pred)
    phantoms.write_case_image(pred / "case_001.nii.gz", maps["case_001"], phantoms.geometry(spacing=(3.0, 0.9, 0.8)))
    for workers in ("1", "2"):
        one_line_error(cli("evaluate", pred, ref, "-j", workers), "case_001", "spacing")
    phantoms.write_case_image(pred / "case_001.nii.gz", maps["case_001"][:-1])
    one_line_error(cli("evaluate", pred, ref, "-j", "1"), "case_001", "shape")
    assert not (pred / "evaluation.json").exists()


def test_prediction_without_reference_is_an_error(cli, tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    write_folder(ref, n=2)
    shutil.copytree(ref, pred)
    shutil.copy(pred / "case_000.nii.gz", pred / "stray.nii.gz")
    one_line_error(cli("evaluate", pred, ref), "stray", "without a reference")
    one_line_error(cli("evaluate", tmp_path / "nowhere", ref), "not found")


def test_evaluate_case_and_label_map_reading(tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    maps = write_folder(ref, n=1)
    pred.mkdir()
    extra = maps["case_000"].copy()
    extra[0, 0, 0] = 5  # a value the labels do not declare
    phantoms.write_case_image(pred / "case_000.nii.gz", extra.astype(np.float32))  # float label map
    result = evaluate.evaluate_case("case_000", pred / "case_000.nii.gz", ref / "case_000.nii.gz",
                                    {"background": [0], "shell": [1], "core": [2]}, 2.0)
    assert result.metrics["core"]["dice"] == 1.0
    assert any("[5]" in w for w in result.warnings)
    phantoms.write_case_image(pred / "case_000.nii.gz", extra.astype(np.float32) + 0.5)
    with pytest.raises(DatasetError, match="non-integer"):
        evaluate.read_label_map(pred / "case_000.nii.gz")
    seg, _ = evaluate.read_label_map(ref / "case_000.nii.gz")
    assert np.array_equal(seg, read_image(ref / "case_000.nii.gz")[0][0])


def _often_absent(tmp_path: Path) -> tuple[Path, Path]:
    """4 cases of label 1 ("organ"): present in the references of 2, never found by the prediction;
    absent from both in the other 2. Labels declared by a dataset.json beside labelsTr."""
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    (raw / "labelsTr").mkdir(parents=True)
    pred.mkdir()
    for i, case in enumerate(phantoms.case_ids(4)):
        _, label = phantoms.ellipsoid((8, 10, 9), seed=i)
        reference = (label > 0).astype(np.uint8) if i < 2 else np.zeros_like(label, dtype=np.uint8)
        phantoms.write_case_image(raw / "labelsTr" / f"{case}.nii.gz", reference)
        phantoms.write_case_image(pred / f"{case}.nii.gz", np.zeros_like(reference))
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    return raw, pred


def test_label_absent_from_both_is_excluded_from_the_mean_by_default(cli, tmp_path: Path) -> None:
    """A model that never finds a structure scores 0, not 0.5 from two correctly predicted absences."""
    raw, pred = _often_absent(tmp_path)
    report = evaluate.run(pred, raw / "labelsTr", workers=1)
    organ = report.summary["labels"]["organ"]
    assert report.summary["both_empty"] == "exclude"
    assert organ["dice"]["mean"] == 0.0 and organ["dice"]["n"] == 2 and organ["n_both_empty"] == 2
    assert report.summary["mean_foreground_dice"] == 0.0
    # Per case, the absence is still recorded as perfect (the JSON keeps every pair).
    assert report.cases["case_002"]["organ"]["dice"] == 1.0

    flattering = evaluate.run(pred, raw / "labelsTr", workers=1, both_empty="perfect")
    assert flattering.summary["labels"]["organ"]["dice"]["mean"] == 0.5

    result = cli("evaluate", pred, raw / "labelsTr", "-j", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "absent from both prediction and reference is left out of its means" in text
    assert "2 (+2 absent, excluded)" in text
    # labelsTr given as REF: the label names come from the dataset.json beside it, not numbers.
    assert "organ" in result.output and f"labels from {raw / 'dataset.json'}" in text

    bad = cli("evaluate", pred, raw / "labelsTr", "-j", "1", "--both-empty", "one")
    one_line_error(bad, "--both-empty", "'one'")


def test_label_absent_from_every_pair_is_na_not_a_score(cli, tmp_path: Path) -> None:
    """A declared structure no case has and no prediction finds: no mean (None, "n/a"), left out of
    the overall mean; the table used to fail on it."""
    raw, pred = _often_absent(tmp_path)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "tumour": 2}}))
    report = evaluate.run(pred, raw / "labelsTr", workers=1)
    tumour = report.summary["labels"]["tumour"]
    assert tumour["n_both_empty"] == 4 and tumour["dice"]["mean"] is None and tumour["dice"]["n"] == 0
    assert report.summary["mean_foreground_dice"] == 0.0  # organ's, not (0 + 1) / 2
    saved = json.loads(report.json_path.read_text())
    assert saved["summary"]["labels"]["tumour"]["dice"]["mean"] is None

    result = cli("evaluate", pred, raw / "labelsTr", "-j", "1")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    row = next(line for line in result.output.splitlines() if "tumour" in line)
    assert "0 (+4 absent, excluded)" in " ".join(row.split()) and "n/a" in row, result.output
