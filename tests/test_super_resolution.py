"""Super-resolution: thick slices in, the thin originals out, through check, plan, train, predict, evaluate.

Thin CT phantoms (int16, 18 slices of 1 mm × 32 × 32 of 0.8 mm) with anatomy that changes along z —
an elliptic body of soft tissue whose size varies slice by slice, a bone disc that drifts, scanner
padding outside a circular field of view — go through ``autoseg simulate thick-slices --factor 3``
(6 slices of 3 mm). One 2d fold of the ``tiny`` preset is trained for a few iterations and shared by
the prediction tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.super_resolution import fine_geometry, fine_shape, grid_factors
from autoseg.errors import DatasetError
from autoseg.imageio import Geometry, read_image, write_image
from autoseg.simulate.thick_slices import average_slices, thick_geometry

THIN_SHAPE = (18, 32, 32)
THIN_SPACING = (1.0, 0.8, 0.8)
FACTOR = 3
AIR, SOFT, BONE, PADDING = -1000, 40, 1000, -2048
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: A rotation about x by 20° and an origin off 0: the slice axis is no physical axis.
TILTED = (1.0, 0.0, 0.0, 0.0, math.cos(0.35), -math.sin(0.35), 0.0, math.sin(0.35), math.cos(0.35))
ORIGIN = (-12.5, 30.25, -101.0)


def thin_phantom(seed: int, shape: tuple[int, int, int] = THIN_SHAPE) -> np.ndarray:
    """An int16 HU volume whose anatomy changes along z (see the module docstring)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    phase = rng.uniform(0, 2 * np.pi)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    ry = shape[1] * (0.3 + 0.08 * np.sin(2 * np.pi * z / 7 + phase))
    volume = np.full(shape, float(AIR))
    volume[((y - cy) / ry) ** 2 + ((x - cx) / (shape[2] * 0.35)) ** 2 <= 1] = SOFT
    by = cy + 4 * np.sin(2 * np.pi * z / 9 + phase)
    volume[((y - by) / 3.5) ** 2 + ((x - cx - 2) / 3.5) ** 2 <= 1] = BONE
    volume += rng.normal(0, 10, shape)
    outside = ((y - cy) / (shape[1] / 2)) ** 2 + ((x - cx) / (shape[2] / 2)) ** 2 > 1
    volume[outside] = PADDING
    return np.round(volume).astype(np.int16)


def write_ct_folder(root: Path, n_cases: int = 5, geometry: Geometry | None = None) -> Path:
    geometry = geometry or Geometry(THIN_SPACING, ORIGIN, TILTED, 3)
    for i in range(n_cases):
        write_image(root / f"sr_{i:03d}.nii.gz", thin_phantom(i), geometry)
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoseg.simulate.run import run_thick_slices

    base = tmp_path_factory.mktemp("super_resolution")
    out = base / "raw"
    run_thick_slices(write_ct_folder(base / "ct"), out, FACTOR)
    return out


@pytest.fixture(scope="module")
def work(raw: Path) -> Path:
    """Planned with the tiny preset; 2d fold 0 trained for 3 iterations (and validated)."""
    from autoseg.planning.run import plan_dataset
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig

    folder = raw.parent / "work"
    plan_dataset(raw, folder, "tiny", workers=1)
    cfg = TrainConfig(epochs=1, iters_per_epoch=3, val_iters=1, device="cpu", workers=0, seed=3, optimizer="adamw",
                      lr=2e-2)
    training.run(folder, "2d", "0", cfg)
    return folder


def _close_geometry(a: Geometry, b: Geometry, atol: float = 1e-9) -> None:
    assert a.ndim == b.ndim
    for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------
# The fine grid


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_the_fine_grid_of_thick_slices_is_the_thin_grid_they_came_from(factor: int) -> None:
    """Golden: fine_geometry inverts simulate's thick_geometry (tilted, off-origin), and the shapes match."""
    for direction in (IDENTITY, TILTED):
        thin = Geometry((1.25, 0.7, 0.9), ORIGIN, direction, 3)
        thick = thick_geometry(thin, factor)
        _close_geometry(fine_geometry(thick, (factor, 1, 1)), thin, atol=1e-12)
        assert grid_factors(thick, thin) == (factor, 1, 1)
    volume = thin_phantom(0, (4 * factor + 1, 8, 8))
    assert fine_shape(average_slices(volume, factor).shape, (factor, 1, 1)) == (4 * factor, 8, 8)
    # In-plane factors follow the same rule: the first fine voxel (k - 1) / 2 fine voxels before.
    coarse = Geometry((2.0, 1.6, 1.2), (0.0, 0.0, 0.0), IDENTITY, 3)
    fine = fine_geometry(coarse, (1, 2, 3))
    assert fine.spacing == pytest.approx((2.0, 0.8, 0.4)) and fine.origin == pytest.approx((-0.4, -0.4, 0.0))


def test_simulated_pairs_lie_on_the_fine_grid_of_their_input(raw: Path) -> None:
    """The grid prediction builds from an input alone is the target's, as the files store it."""
    for case in ("sr_000", "sr_003"):
        thick, thick_geometry_read = read_image(raw / "imagesTr" / f"{case}_0000.nii.gz")
        thin, thin_geometry = read_image(raw / "targetsTr" / f"{case}.nii.gz")
        factors = grid_factors(thick_geometry_read, thin_geometry)
        assert factors == (FACTOR, 1, 1)
        assert fine_shape(thick.shape[1:], factors) == thin.shape[1:] == THIN_SHAPE
        _close_geometry(fine_geometry(thick_geometry_read, factors), thin_geometry, atol=1e-5)  # float32 headers


def test_refined_input_is_the_cubic_spline_on_the_fine_grid() -> None:
    from autoseg.preprocessing.super_resolution import refine_image

    # A linear ramp along z: each slab's mean is the ramp at the slab centre, the cubic spline
    # reproduces a line, so the refined interior is the thin ramp itself (the edges are held flat,
    # which the spline's prefilter carries a few coarse voxels inwards, shrinking ~4× per voxel).
    z = np.arange(48, dtype=np.float64)
    thin = np.broadcast_to((10.0 * z - 100.0)[:, None, None], (48, 4, 5)).copy()
    thick = average_slices(thin.astype(np.float32), 3)
    refined = refine_image(thick[None], (3, 1, 1))
    assert refined.dtype == np.float32 and refined.shape == (1, 48, 4, 5)
    np.testing.assert_allclose(refined[0, 15:-15], thin[15:-15], atol=0.05)
    # Integer inputs stay integers; scanner padding comes back exactly from its nearest voxel.
    ct = thin_phantom(2, (6, 16, 16))
    out = refine_image(ct[None], (2, 1, 1))
    assert out.dtype == np.int16 and out.shape == (1, 12, 16, 16)
    padding = np.repeat(ct == PADDING, 2, axis=0)
    assert (out[0][padding] == PADDING).all() and not (out[0][~padding] == PADDING).any()


# ----------------------------------------------------------------------------------------------
# Check


def _copy(raw: Path, tmp_path: Path) -> Path:
    out = tmp_path / "raw"
    shutil.copytree(raw, out)
    return out


def test_check_refuses_targets_off_the_fine_grid(raw: Path, tmp_path: Path) -> None:
    from autoseg.planning.run import check

    assert not check(raw, workers=1).errors
    root = _copy(raw, tmp_path)
    target, geometry = read_image(root / "targetsTr" / "sr_001.nii.gz")
    shifted = Geometry(geometry.spacing, tuple(o + 0.5 for o in geometry.origin), geometry.direction, 3)
    write_image(root / "targetsTr" / "sr_001.nii.gz", target[0], shifted)  # half a thin slice off
    thick, thick_geo = read_image(root / "imagesTr" / "sr_002_0000.nii.gz")
    write_image(root / "targetsTr" / "sr_002.nii.gz", thick[0].repeat(2, axis=0),  # factor 2, not 3
                fine_geometry(thick_geo, (2, 1, 1)))
    report = check(root, workers=1)
    problems = {(i.case, i.code) for i in report.errors}
    assert ("sr_001", "target-grid") in problems
    assert ("sr_002", "mixed-upsample-factor") in problems
    assert all("\n" not in i.problem for i in report.errors)
    with pytest.raises(DatasetError, match="error"):
        from autoseg.planning.run import plan_dataset

        plan_dataset(root, tmp_path / "work", "tiny", workers=1)


# ----------------------------------------------------------------------------------------------
# Plan, preprocess, train, predict, evaluate


def test_plan_is_on_the_targets_grid_and_records_the_factor(work: Path, raw: Path) -> None:
    from autoseg import plans as plans_io

    plans = plans_io.load(work / "plans.yaml")
    assert plans.task == "super-resolution" and plans.upsample_factor == (FACTOR, 1, 1)
    assert "upsample_factor: [3, 1, 1]" in (work / "plans.yaml").read_text()
    assert plans.original_median_spacing == pytest.approx(THIN_SPACING, rel=1e-6)
    fingerprint = json.loads((work / "fingerprint.json").read_text())
    assert fingerprint["upsample_factor"] == [FACTOR, 1, 1]
    assert all(c["shape"] == list(THIN_SHAPE) for c in fingerprint["cases"])
    assert set(plans.configurations) == {"2d", "2.5d", "3d_fullres"}
    assert all(c.normalization[0].scheme == "linear" for c in plans.configurations.values())
    assert any("refined ×[3, 1, 1]" in note for note in plans.notes)
    # Preprocessed on the thin grid: input and target of one shape, the target's.
    folder = work / "preprocessed" / "2d"
    data = np.load(folder / "sr_000.npy")
    target = np.load(folder / "sr_000_target.npy")
    assert data.shape == target.shape and data.shape[1] == THIN_SHAPE[0]


def test_fold_trains_and_validates_on_the_fine_grid(work: Path, raw: Path) -> None:
    fold = work / "models" / "2d" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["task"] == "super-resolution" and metrics["per_case"]
    case = next(iter(metrics["per_case"]))
    restored, geometry = read_image(fold / "validation" / f"{case}.nii.gz")
    target, target_geometry = read_image(raw / "targetsTr" / f"{case}.nii.gz")
    assert restored.shape == target.shape and restored.dtype == np.int16
    _close_geometry(geometry, target_geometry, atol=1e-5)


def test_predict_writes_the_thin_grid_and_evaluate_compares_it(work: Path, raw: Path, tmp_path: Path, cli) -> None:
    inputs = tmp_path / "thick"
    inputs.mkdir()
    for case in ("sr_000", "sr_004"):
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inputs / f"{case}_0000.nii.gz")
    out = tmp_path / "out"
    result = cli("predict", work, "-i", inputs, "-o", out, "-c", "2d", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for case in ("sr_000", "sr_004"):
        restored, geometry = read_image(out / f"{case}.nii.gz")
        target, target_geometry = read_image(raw / "targetsTr" / f"{case}.nii.gz")
        assert restored.shape == target.shape == (1, *THIN_SHAPE) and restored.dtype == np.int16
        # The NIfTI headers hold float32: the grid built from the input is written as the target's.
        assert geometry.spacing == target_geometry.spacing and geometry.direction == target_geometry.direction
        np.testing.assert_allclose(geometry.origin, target_geometry.origin, rtol=0, atol=1e-5)
        assert (restored[target == PADDING] == PADDING).all()
    report = tmp_path / "evaluation.json"
    result = cli("evaluate", out, raw, "-o", report, "--no-panels")
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert sorted(record["cases"]) == ["sr_000", "sr_004"]
    assert record["summary"]["restored"]["psnr_db"]["mean"] > 15
    # The thick inputs as the baseline: refined by cubic interpolation onto the thin grid first.
    result = cli("evaluate", out, raw, "-o", report, "--no-panels", "--baseline-input", inputs)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert record["summary"]["input"]["psnr_db"]["mean"] > 15 and "psnr_gain_db" in record["cases"]["sr_000"]


def test_an_untrained_model_writes_the_cubic_baseline(work: Path, raw: Path, tmp_path: Path) -> None:
    """A zero correction gives the refined input back exactly: the network only adds to the cubic spline."""
    from test_restoration import _zero_correction_fold

    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from autoseg.preprocessing.super_resolution import refine_image

    _zero_correction_fold(work, "3d_fullres", 4)
    thick, geometry = read_image(raw / "imagesTr" / "sr_002_0000.nii.gz")
    selections, _ = select_models(work, ["3d_fullres"], [4])
    predictor = Predictor(work, selections, device="cpu", tta=False)
    restored = predictor.export(predictor.predict(thick, geometry), geometry, tmp_path / "sr_002.nii.gz")
    np.testing.assert_array_equal(restored, refine_image(thick, (FACTOR, 1, 1))[0])
    _, written_geometry = read_image(tmp_path / "sr_002.nii.gz")
    _, target_geometry = read_image(raw / "targetsTr" / "sr_002.nii.gz")
    _close_geometry(written_geometry, target_geometry, atol=1e-5)


def test_a_thin_input_is_refused_in_one_line(work: Path, raw: Path, tmp_path: Path, cli) -> None:
    inputs = tmp_path / "thin"
    inputs.mkdir()
    shutil.copy(raw / "targetsTr" / "sr_001.nii.gz", inputs / "sr_001_0000.nii.gz")
    result = cli("predict", work, "-i", inputs, "-o", tmp_path / "out", "-c", "2d", "--device", "cpu")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "already about the fine spacing this super-resolution model produces" in result.output
    assert not (tmp_path / "out" / "sr_001.nii.gz").exists()
    from autoseg import Segmenter

    segmenter = Segmenter.load(work, device="cpu", configurations=["2d"], folds=[0])
    with pytest.raises(DatasetError, match="already about the fine spacing") as caught:
        segmenter(str(inputs / "sr_001_0000.nii.gz"))
    assert "\n" not in str(caught.value)


def test_plans_refuse_a_factor_without_super_resolution_and_the_reverse(work: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.errors import PlanError

    data = plans_io.to_dict(plans_io.load(work / "plans.yaml"))
    with pytest.raises(PlanError, match="upsample_factor"):
        plans_io.from_dict({**data, "task": "denoise"})
    without = dict(data)
    without.pop("upsample_factor")
    with pytest.raises(PlanError, match="upsample_factor"):
        plans_io.from_dict(without)
    with pytest.raises(PlanError, match="at least one >= 2"):
        plans_io.from_dict({**data, "upsample_factor": [1, 1, 1]})
