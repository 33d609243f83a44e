"""``autoseg evaluate`` on restoration outputs: PSNR/SSIM/RMSE in a HU window, detection, baseline, panels."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import phantoms
import pytest
from test_evaluate import one_line_error

from autoseg import image_metrics
from autoseg.errors import ConfigError
from autoseg.evaluation import restoration
from autoseg.evaluation.restoration import (
    FULL,
    Window,
    parse_window,
    restoration_metrics,
)

SHAPE = (9, 16, 14)
AAPM = Window(-160.0, 240.0)
#: skimage's SSIM constants for data range 400: C1 = (0.01 * 400)².
C1_400 = (0.01 * 400) ** 2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def write_restoration_dataset(root: Path, n: int = 2, task: str = "denoise",
                              input_offset: int = 20) -> dict[str, np.ndarray]:
    """A raw restoration dataset: ``targetsTr/<case>`` int16 HU in [-150, 220], ``imagesTr/<case>_0000``
    the target + ``input_offset`` HU (inside the AAPM window, so the hand-computed values hold)."""
    targets = {}
    for i, case in enumerate(phantoms.case_ids(n)):
        target = np.random.default_rng(i).integers(-150, 221, SHAPE).astype(np.int16)
        phantoms.write_case_image(root / "targetsTr" / f"{case}.nii.gz", target)
        phantoms.write_case_image(root / "imagesTr" / f"{case}_0000.nii.gz", (target + input_offset).astype(np.int16))
        targets[case] = target
    phantoms.write_json(root / "dataset.json", {"name": "ldct", "task": task, "channel_names": {"0": "CT"},
                                                "file_ending": ".nii.gz", "numTraining": n})
    return targets


def write_predictions(folder: Path, targets: dict[str, np.ndarray], offset: int = 10) -> None:
    for case, target in targets.items():
        phantoms.write_case_image(folder / f"{case}.nii.gz", (target + offset).astype(np.int16))




# ----------------------------------------------------------------------------------------------
# Arrays


def test_constant_offset_gives_hand_computed_psnr_rmse_and_ssim() -> None:
    reference = np.zeros(SHAPE)
    metrics = restoration_metrics(reference + 10, reference, AAPM)
    assert metrics["rmse_hu"] == pytest.approx(10.0)
    assert metrics["psnr_db"] == pytest.approx(20 * math.log10(400 / 10))
    # Constant images: no variance, so SSIM is the luminance term (2·0·10 + C1) / (0² + 10² + C1).
    assert metrics["ssim_2d"] == pytest.approx(C1_400 / (100 + C1_400))
    assert metrics["ssim_3d"] == pytest.approx(C1_400 / (100 + C1_400))
    assert metrics["ssim_2d_slices"] == SHAPE[0] and metrics["data_range"] == 400.0


def test_values_outside_the_window_count_only_up_to_its_edge() -> None:
    reference = np.zeros(SHAPE)
    image = reference + 10
    bone = np.zeros(SHAPE, bool)
    bone[2:5, 3:9, 4:10] = True
    reference[bone], image[bone] = 1000.0, 230.0  # 770 HU apart, but 10 HU from the window's top (240)
    air = np.zeros(SHAPE, bool)
    air[6:8] = True
    reference[air], image[air] = -1000.0, -3000.0  # both below -160: no error at all
    metrics = restoration_metrics(image, reference, AAPM)
    assert metrics["rmse_hu"] == pytest.approx(math.sqrt(100 * (1 - air.mean())))
    unclipped = restoration_metrics(image, reference, Window(-5000.0, 5000.0))
    assert unclipped["rmse_hu"] > 200


def test_full_window_uses_the_reference_range_without_clipping() -> None:
    reference = np.random.default_rng(0).uniform(-1000, 1000, SHAPE)
    reference.flat[0], reference.flat[1] = -1000.0, 1000.0
    metrics = restoration_metrics(reference + 10, reference, FULL)
    assert metrics["data_range"] == pytest.approx(2000.0)
    assert metrics["rmse_hu"] == pytest.approx(10.0)
    assert metrics["psnr_db"] == pytest.approx(20 * math.log10(2000 / 10))


def test_ssim_3d_in_slabs_equals_one_call_on_the_volume() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    reference = rng.normal(0, 100, (23, 12, 11))
    image = reference + rng.normal(0, 40, reference.shape)
    whole = structural_similarity(reference, image, data_range=400.0, channel_axis=None)
    for slab in (1, 4, 16, 100):
        assert image_metrics.ssim_3d(image, reference, 400.0, slab=slab) == pytest.approx(whole, abs=1e-12)


def test_small_and_identical_images() -> None:
    flat = np.zeros((1, 5, 30))  # one slice narrower than the 7-voxel window
    metrics = restoration_metrics(flat + 1, flat, AAPM)
    assert metrics["ssim_2d"] is None and metrics["ssim_3d"] is None and metrics["ssim_2d_slices"] == 0
    same = restoration_metrics(np.ones(SHAPE), np.ones(SHAPE), AAPM)
    assert same["psnr_db"] is None and same["rmse_hu"] == 0.0 and same["ssim_3d"] == pytest.approx(1.0)


def test_psnr_is_skimages_and_the_online_psnr_is_the_same_formula_capped() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    from autoseg.tasks.restoration import ONLINE_PSNR_CAP_DB, Denoise

    rng = np.random.default_rng(3)
    reference = rng.uniform(-300, 400, SHAPE)
    image = reference + rng.normal(0, 30, SHAPE)
    ref, img = (np.clip(a, -160, 240) for a in (reference, image))
    metrics = restoration_metrics(image, reference, AAPM)
    assert metrics["psnr_db"] == peak_signal_noise_ratio(ref, img, data_range=400.0)
    # The online metric: the pooled squared error of the patches, the same formula.
    sse, n = float(np.sum((img - ref) ** 2)), img.size
    online = Denoise().validation_scores(np.array([sse, n], dtype=np.float64))
    assert online[0] == pytest.approx(metrics["psnr_db"], rel=1e-12)
    # Identical images: null in the scores, the cap in the trainer's log (which needs a number).
    assert image_metrics.psnr_from_mse(0.0, 400.0) is None
    assert Denoise().validation_scores(np.array([0.0, n])) == [ONLINE_PSNR_CAP_DB]


def test_fold_validation_scores_a_case_as_evaluate_does(tmp_path: Path) -> None:
    """Denoise.score_case (fold validation's metrics.json) and `autoseg evaluate` give one case the
    same keys and values in the same window, the axial axis taken from the geometry by both."""
    from autoseg.tasks.restoration import Denoise

    # Array axis 1 runs head-feet (ITK's y index axis has the S component), so SSIM 2D averages
    # slices across axis 1, not 0.
    geometry = phantoms.geometry(spacing=(0.8, 2.5, 0.7), direction=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0))
    rng = np.random.default_rng(4)
    reference = rng.integers(-400, 500, (10, 12, 9)).astype(np.int16)
    prediction = (reference + rng.normal(0, 40, reference.shape)).round().astype(np.int16)
    pred_path = phantoms.write_case_image(tmp_path / "pred" / "c.nii.gz", prediction, geometry)
    ref_path = phantoms.write_case_image(tmp_path / "ref" / "c.nii.gz", reference, geometry)
    for window, option in ((AAPM, None), (Window(-1000.0, 1000.0), (-1000.0, 1000.0))):
        evaluated = restoration.evaluate_restoration_case("c", pred_path, ref_path, window).record()
        options = {"window": option} if option else {}
        fold = Denoise().score_case(prediction, reference, geometry.spacing, geometry=geometry, **options)["CT"]
        assert fold.pop("window") == [window.low, window.high]
        assert fold.pop("data_range") == evaluated["data_range"]
        assert fold == evaluated["restored"]
        assert fold["ssim_2d_slices"] == 12 and None not in fold.values()
    # Without a geometry the slices are taken across axis 0: another SSIM 2D.
    assert Denoise().score_case(prediction, reference, geometry.spacing)["CT"]["ssim_2d_slices"] == 10


def test_parse_window() -> None:
    assert parse_window(None) == AAPM
    assert parse_window("-1000,1000") == Window(-1000.0, 1000.0)
    assert parse_window("full") == FULL
    for bad in ("240,-160", "-160", "a,b", "1,2,3", "nan,1"):
        with pytest.raises(ConfigError, match="--window"):
            parse_window(bad)


# ----------------------------------------------------------------------------------------------
# The command


def test_detected_from_dataset_json_with_baseline_gain_and_panels(cli, tmp_path: Path) -> None:
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    targets = write_restoration_dataset(raw)
    write_predictions(pred, targets, offset=10)

    result = cli("evaluate", pred, raw, "--baseline-input", raw / "imagesTr", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "[-160, 240] HU (data range 400)" in result.output
    assert "input (baseline)" in result.output and "+6.02" in result.output

    report = json.loads((pred / "evaluation.json").read_text())
    assert report["task"] == "restoration" and report["dataset_task"] == "denoise"
    assert report["window"] == {"name": "[-160, 240]", "low": -160.0, "high": 240.0, "clipped": True,
                                "data_range": 400.0}
    assert report["definitions"]["ssim_settings"]["win_size"] == 7
    assert report["definitions"]["ssim_settings"]["gaussian_weights"] is False
    case = report["cases"]["case_000"]
    assert case["restored"]["rmse_hu"] == pytest.approx(10.0)
    assert case["restored"]["psnr_db"] == pytest.approx(20 * math.log10(40))
    assert case["input"]["rmse_hu"] == pytest.approx(20.0)
    assert case["input"]["psnr_db"] == pytest.approx(20 * math.log10(20))
    assert case["psnr_gain_db"] == pytest.approx(20 * math.log10(2))
    assert 0 < case["input"]["ssim_2d"] < case["restored"]["ssim_2d"] <= 1
    assert report["summary"]["psnr_gain_db"]["mean"] == pytest.approx(20 * math.log10(2))
    assert report["summary"]["restored"]["rmse_hu"] == {"mean": pytest.approx(10.0), "std": pytest.approx(0.0),
                                                        "n": 2}

    rows = list(csv.DictReader((pred / "evaluation.csv").open()))
    assert [r["case"] for r in rows] == ["case_000", "case_001"]
    assert rows[0]["window"] == "[-160, 240]" and float(rows[0]["data_range"]) == 400.0
    assert float(rows[0]["input_rmse_hu"]) == pytest.approx(20.0)
    assert float(rows[0]["psnr_gain_db"]) == pytest.approx(20 * math.log10(2))

    four = png_size(pred / "panels" / "case_000.png")
    assert case["panel"] == str(pred / "panels" / "case_000.png") and 0 <= case["panel_slice"] < SHAPE[0]

    # Without the input: three pictures (restored | reference | difference), so a narrower figure.
    result = cli("evaluate", pred, raw / "targetsTr", "-o", tmp_path / "plain" / "report.json", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "input (baseline)" not in result.output and "gain dB" not in result.output
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert report["dataset_task"] == "denoise" and "input" not in report["cases"]["case_000"]
    three = png_size(tmp_path / "plain" / "panels" / "case_000.png")
    assert three[0] < four[0] and three[1] == four[1]


def test_window_options_are_recorded(cli, tmp_path: Path) -> None:
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    write_predictions(pred, write_restoration_dataset(raw, n=1, task="super-resolution"))

    result = cli("evaluate", pred, raw, "--window", "-1000,1000", "--no-panels", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "[-1000, 1000] HU (data range 2000)" in result.output
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["window"]["low"] == -1000.0 and report["window"]["data_range"] == 2000.0
    assert report["cases"]["case_000"]["restored"]["psnr_db"] == pytest.approx(20 * math.log10(200))
    assert report["panels"] is None and not (pred / "panels").exists()

    result = cli("evaluate", pred, raw, "--window", "full", "--no-panels", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "window full (no clipping; data range = reference max - min, per case)" in result.output
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["window"]["name"] == "full" and report["window"]["clipped"] is False
    target = np.random.default_rng(0).integers(-150, 221, SHAPE)
    span = float(target.max() - target.min())
    assert report["cases"]["case_000"]["data_range"] == span
    assert report["cases"]["case_000"]["restored"]["psnr_db"] == pytest.approx(20 * math.log10(span / 10))
    assert next(csv.DictReader((pred / "evaluation.csv").open()))["window"] == "full"


def test_explicit_task_on_plain_folders_and_missing_predictions(cli, tmp_path: Path) -> None:
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    targets = write_restoration_dataset(raw, n=3)
    (raw / "dataset.json").unlink()  # a plain folder of images: nothing to detect
    write_predictions(pred, {case: targets[case] for case in ("case_000", "case_002")})

    result = cli("evaluate", pred, raw / "targetsTr", "--task", "restoration", "--no-panels", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "case_001" in result.output
    report = json.loads((pred / "evaluation.json").read_text())
    assert sorted(report["cases"]) == ["case_000", "case_002"] and report["missing_predictions"] == ["case_001"]
    assert report["dataset_task"] is None

    assert restoration.detect_task(raw / "targetsTr") == "segmentation"
    one_line_error(cli("evaluate", pred, raw / "targetsTr", "--task", "denoise"), "--task", "restoration")


def test_shape_mismatch_is_one_line_naming_the_file_and_both_shapes(cli, tmp_path: Path) -> None:
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    write_predictions(pred, write_restoration_dataset(raw, n=1))
    phantoms.write_case_image(pred / "case_000.nii.gz", np.arange(9 * 8 * 7, dtype=np.int16).reshape(9, 8, 7))
    one_line_error(cli("evaluate", pred, raw, "-j", "1"), "case_000.nii.gz", "(9, 8, 7)", str(SHAPE))

    # Same shape, another grid (a super-resolution output must be on the reference's grid, not only its shape).
    target = np.random.default_rng(0).integers(-150, 221, SHAPE).astype(np.int16)
    phantoms.write_case_image(pred / "case_000.nii.gz", target, phantoms.geometry(spacing=(1.5, 0.8, 0.8)))
    one_line_error(cli("evaluate", pred, raw, "-j", "1"), "case_000.nii.gz", "spacing")


def test_option_mixups_and_label_maps_are_refused(cli, tmp_path: Path) -> None:
    seg_ref, seg_pred = tmp_path / "labels", tmp_path / "seg_pred"
    _, label = phantoms.ellipsoid(SHAPE, seed=0)
    phantoms.write_case_image(seg_ref / "case_000.nii.gz", label)
    phantoms.write_case_image(seg_pred / "case_000.nii.gz", label)
    one_line_error(cli("evaluate", seg_pred, seg_ref, "--window", "full"), "--window", "--task restoration")
    one_line_error(cli("evaluate", seg_pred, seg_ref, "--task", "restoration", "-j", "1"),
                   "case_000.nii.gz", "label map")

    raw, pred = tmp_path / "raw", tmp_path / "pred"
    write_predictions(pred, write_restoration_dataset(raw, n=1))
    one_line_error(cli("evaluate", pred, raw, "--labels", raw), "--labels")
    one_line_error(cli("evaluate", pred, raw, "--window", "240,-160"), "--window")
    one_line_error(cli("evaluate", pred, raw, "--baseline-input", tmp_path / "labels", "--no-panels", "-j", "1"),
                   "case_000.nii.gz", "input", "label map")  # a label map given as the input
    (tmp_path / "empty").mkdir()
    one_line_error(cli("evaluate", pred, raw, "--baseline-input", tmp_path / "empty"), "no low-dose input", "case_000")
