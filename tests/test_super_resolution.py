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
    assert sorted(json.loads(report.read_text())["cases"]) == ["sr_000", "sr_004"]
    # A zero-correction model writes exactly the cubic refinement (refine_image) ...
    from test_restoration import _zero_correction_fold

    from autoseg.preprocessing.super_resolution import refine_image

    _zero_correction_fold(work, "3d_fullres", 4)
    cubic = tmp_path / "cubic"
    result = cli("predict", work, "-i", inputs, "-o", cubic, "-c", "3d_fullres", "-f", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for case in ("sr_000", "sr_004"):
        thick, _ = read_image(inputs / f"{case}_0000.nii.gz")
        np.testing.assert_array_equal(read_image(cubic / f"{case}.nii.gz")[0], refine_image(thick, (FACTOR, 1, 1)))
    # ... and evaluate's baseline, the thick inputs refined onto the thin grid, scores exactly as it.
    result = cli("evaluate", cubic, raw, "-o", report, "--no-panels", "--baseline-input", inputs)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    for case in ("sr_000", "sr_004"):
        scores = record["cases"][case]
        assert scores["input"] == scores["restored"] and scores["psnr_gain_db"] == 0
    assert 15 < record["summary"]["input"]["psnr_db"]["mean"] < 60  # the thick slices do lose detail


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


# ----------------------------------------------------------------------------------------------
# Review fixes: mixed thin spacings, stale caches, tight grids, padding, memory, messages, axes


def _write_sr_dataset(root: Path, thin: dict[str, tuple[np.ndarray, Geometry]], factors: tuple[int, int, int]) -> Path:
    """A super-resolution dataset whose inputs are each thin volume averaged ``factors`` per axis, on the
    grid whose fine grid is the thin one (the convention of simulate thick-slices, on any axis)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "targetsTr").mkdir()
    for case, (volume, geometry) in thin.items():
        coarse = volume.astype(np.float64)
        for axis, k in enumerate(factors):
            shape = list(coarse.shape)
            shape[axis: axis + 1] = [shape[axis] // k, k]
            coarse = coarse.reshape(shape).mean(axis=axis + 1)
        origin = np.asarray(geometry.origin, dtype=np.float64)
        for axis, k in enumerate(factors):
            column = np.asarray(geometry.direction, dtype=np.float64)[2 - axis::3]
            origin = origin + (k - 1) / 2 * geometry.spacing[axis] * column
        spacing = tuple(s * k for s, k in zip(geometry.spacing, factors))
        coarse_geometry = Geometry(spacing, tuple(origin), geometry.direction, 3)
        write_image(root / "imagesTr" / f"{case}_0000.nii.gz", np.round(coarse).astype(np.int16), coarse_geometry)
        write_image(root / "targetsTr" / f"{case}.nii.gz", volume, geometry)
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "task": "super-resolution", "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
        "numTraining": len(thin)}))
    return root


def test_mixed_thin_spacings_validate_every_training_case(tmp_path: Path) -> None:
    """0.625 and 1.25 mm thin slices refined ×2: the 1.25 mm thick inputs of the thinner cases are
    valid inputs (not "fine already", as against the median thin spacing 1.25 mm), so validating a
    fold that holds one completes; a 0.625 mm image is still refused."""
    from test_restoration import _zero_correction_fold

    from autoseg import crossval
    from autoseg.dataset.super_resolution import check_coarse_input
    from autoseg.inference.inputs import InputCase, check_inputs
    from autoseg.planning.run import plan_dataset
    from autoseg.training.validation import validate_fold

    thin = {f"sr_{i:03d}": (thin_phantom(i, (16, 24, 24)),
                            Geometry((0.625 if i < 2 else 1.25, 0.8, 0.8), ORIGIN, IDENTITY, 3)) for i in range(5)}
    raw = _write_sr_dataset(tmp_path / "raw", thin, (2, 1, 1))
    work = tmp_path / "work"
    _, _, plans, _ = plan_dataset(raw, work, "tiny", workers=1)
    assert plans.original_median_spacing[0] == pytest.approx(1.25) and plans.upsample_factor == (2, 1, 1)
    assert plans.min_target_spacing == pytest.approx((0.625, 0.8, 0.8))
    check_inputs([InputCase(c, [raw / "imagesTr" / f"{c}_0000.nii.gz"], ".nii.gz") for c in thin], plans, ["2d"])
    splits = crossval.load_or_create(work, sorted(thin))
    fold = next(k for k, split in enumerate(splits) if "sr_000" in split["val"])
    _zero_correction_fold(work, "2d", fold)
    metrics = validate_fold(work, "2d", fold, device="cpu")
    assert "sr_000" in metrics["per_case"]
    with pytest.raises(DatasetError, match="already about the fine spacing"):
        check_coarse_input(thin["sr_000"][1], plans.upsample_factor, plans.min_target_spacing, "thin.nii.gz")


def test_a_fingerprint_cached_before_super_resolution_is_scanned_again(raw: Path, tmp_path: Path) -> None:
    """A super-resolution fingerprint cached without upsample_factor (by an autoseg before it) is
    not reused: its plans would fail validation on every run."""
    from autoseg import plans as plans_io
    from autoseg.planning.run import plan_dataset

    work = tmp_path / "work"
    plan_dataset(raw, work, "tiny", workers=1)
    old = json.loads((work / "fingerprint.json").read_text())
    old.pop("upsample_factor")
    (work / "fingerprint.json").write_text(json.dumps(old))
    _, fp, _, reused = plan_dataset(raw, work, "tiny", workers=1)
    assert not reused and fp.upsample_factor == (FACTOR, 1, 1)
    assert plans_io.load(work / "plans.yaml").upsample_factor == (FACTOR, 1, 1)
    _, _, _, reused = plan_dataset(raw, work, "tiny", workers=1)
    assert reused  # a fingerprint with its factor is reused as before


def test_target_grid_tolerances_are_float32_rounding_per_axis() -> None:
    """Directions within 1e-5; spacing differences accumulated over the axis and origin offsets
    along each axis within 0.1 of that axis's own voxel."""
    from autoseg.dataset.restoration import _check_finer_grid
    from autoseg.dataset.super_resolution import grid_issue

    fine_spacing = (3.0, 0.5, 0.5)
    thin = Geometry(fine_spacing, ORIGIN, TILTED, 3)
    coarse = Geometry((6.0, 0.5, 0.5), (0.0, 0.0, 0.0), TILTED, 3)
    coarse = Geometry(coarse.spacing, tuple(np.asarray(ORIGIN) + 1.5 * np.asarray(TILTED)[2::3]), TILTED, 3)
    assert grid_issue(coarse, (10, 20, 20), thin, (20, 20, 20)) is None
    # 0.2 mm along the 3 mm axis (tilted: spread over world y and z) is 0.07 of its voxel: on the grid.
    z_column = np.asarray(TILTED)[2::3]
    along_z = Geometry(fine_spacing, tuple(np.asarray(ORIGIN) + 0.2 * z_column), TILTED, 3)
    assert grid_issue(coarse, (10, 20, 20), along_z, (20, 20, 20)) is None
    # 0.06 mm along x is 0.12 of its 0.5 mm voxel: off the grid.
    along_x = Geometry(fine_spacing, (ORIGIN[0] + 0.06, *ORIGIN[1:]), TILTED, 3)
    problem = grid_issue(coarse, (10, 20, 20), along_x, (20, 20, 20))
    assert problem is not None and "along x" in problem[0]
    # A spacing within the factor tolerance, but 0.15 voxel apart after 300 slices.
    drifting = Geometry((1.0005, 0.5, 0.5), ORIGIN, IDENTITY, 3)
    thick = Geometry((3.0, 0.5, 0.5), (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 1.0005), IDENTITY, 3)
    assert grid_factors(thick, drifting) == (3, 1, 1)
    problem = grid_issue(thick, (100, 4, 4), drifting, (300, 4, 4))
    assert problem is not None and "drift" in problem[0] and "on z" in problem[0]
    assert grid_issue(thick, (10, 4, 4), drifting, (30, 4, 4)) is None  # 0.015 voxel over 30 slices
    # Directions 1e-3 apart (0.5 mm at 500 mm): refused by the grid check and by 'autoseg check'.
    turned = Geometry(thin.spacing, thin.origin, tuple(d + (1e-3 if i == 1 else 0.0) for i, d in enumerate(TILTED)), 3)
    problem = grid_issue(coarse, (10, 20, 20), turned, (20, 20, 20))
    assert problem is not None and "direction" in problem[0]
    issues = _check_finer_grid(coarse, (10, 20, 20), turned, (20, 20, 20), case="c", file="t.nii.gz",
                               image_file="i.nii.gz")
    assert [i.code for i in issues] == ["direction-mismatch"]


def test_scanner_padding_does_not_bleed_into_the_refined_body() -> None:
    """x and y refined ×2 with padding that changes across the field of view (-3024 on the left,
    -2048 on the right): the body (40 HU) stays 40 HU up to its edge, the padding comes back exactly."""
    from autoseg.preprocessing.super_resolution import refine_image

    y, x = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
    inside = (y - 7.5) ** 2 + (x - 7.5) ** 2 <= 6.5 ** 2
    plane = np.where(inside, 40, np.where(x < 8, -3024, -2048)).astype(np.int16)
    image = np.repeat(plane[None, None], 3, axis=1)  # (1, 3, 16, 16)
    refined = refine_image(image, (1, 2, 2))[0]
    near = np.ix_(range(3), np.arange(32) // 2, np.arange(32) // 2)
    padding = np.isin(image[0], (-3024, -2048))[near]
    np.testing.assert_array_equal(refined[padding], image[0][near][padding])
    np.testing.assert_array_equal(refined[~padding], 40)


def test_preprocessing_memory_counts_the_refined_input(work: Path) -> None:
    """A refined input holds prod(upsample_factor) times the voxels of the file the estimate starts from."""
    import dataclasses

    from autoseg import plans as plans_io
    from autoseg.preprocessing.run import _growth

    plans = plans_io.load(work / "plans.yaml")
    without = dataclasses.replace(plans, upsample_factor=None, min_target_spacing=None, task="denoise")
    for configs in (["2d"], ["3d_fullres"]):
        assert _growth(plans, configs) == pytest.approx(FACTOR * _growth(without, configs))


def test_mixed_factors_name_the_file_and_break_ties_the_same_way_every_time() -> None:
    from autoseg.dataset.scan import CaseScan, dataset_issues

    scans = [CaseScan(f"c{i}", (), 3, None, None, factor, f"targetsTr/c{i}.nii.gz")
             for i, factor in enumerate([(3, 1, 1), (2, 1, 1), (3, 1, 1), (2, 1, 1)])]
    for order in (scans, scans[::-1]):
        issues = dataset_issues(order)
        assert sorted((i.case, i.file) for i in issues) == [("c0", "targetsTr/c0.nii.gz"),
                                                            ("c2", "targetsTr/c2.nii.gz")]
        assert all("a tie" in i.problem and "(1, 1, 2)" in i.problem for i in issues)
    issues = dataset_issues([*scans, CaseScan("c4", (), 3, None, None, (3, 1, 1), "targetsTr/c4.nii.gz")])
    assert sorted(i.case for i in issues) == ["c1", "c3"]
    assert all("most cases (3) by (1, 1, 3)" in i.problem and "tie" not in i.problem for i in issues)


def test_an_off_grid_baseline_input_says_why(raw: Path) -> None:
    from autoseg.preprocessing.super_resolution import onto_fine_grid

    thick, thick_geometry_read = read_image(raw / "imagesTr" / "sr_000_0000.nii.gz")
    thin, thin_geometry = read_image(raw / "targetsTr" / "sr_000.nii.gz")
    refined, _ = onto_fine_grid(thick[0], thick_geometry_read, thin.shape[1:], thin_geometry, "in.nii.gz")
    assert refined.shape == thin.shape[1:]
    shifted = Geometry(thin_geometry.spacing, tuple(o + 0.5 for o in thin_geometry.origin), thin_geometry.direction, 3)
    with pytest.raises(DatasetError, match=r"^in.nii.gz: .*voxel off along") as caught:
        onto_fine_grid(thick[0], thick_geometry_read, thin.shape[1:], shifted, "in.nii.gz")
    assert "\n" not in str(caught.value)


def test_an_old_denoise_checkpoint_in_a_work_replanned_for_super_resolution_asks_to_retrain(
        work: Path, tmp_path: Path) -> None:
    import dataclasses

    from autoseg import plans as plans_io
    from autoseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from autoseg.errors import ConfigError
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from autoseg.networks import build_network
    from autoseg.training.trainer import plans_meta

    copy = tmp_path / "work"
    copy.mkdir()
    for name in ("plans.yaml", "dataset.json"):
        shutil.copy(work / name, copy / name)
    plans = plans_io.load(copy / "plans.yaml")
    config = plans.configurations["3d_fullres"]
    net = build_network(config.topology, config.input_channels, 1, deep_supervision=False, residual=(0, 1))
    denoise = dataclasses.replace(plans, task="denoise", upsample_factor=None, min_target_spacing=None)
    save_checkpoint(copy / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt", {
        "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "epoch": 1, "configuration_name": "3d_fullres",
        "configuration": plans_io.to_dict(plans)["configurations"]["3d_fullres"], "plans": plans_meta(denoise),
        "fold": 0})
    selections, _ = select_models(copy, ["3d_fullres"], [0])
    with pytest.raises(ConfigError, match="a denoise checkpoint.*planned for super-resolution.*re-train") as caught:
        Predictor(copy, selections, device="cpu")
    assert "\n" not in str(caught.value)


# -- a non-z axis refined, tilted, with a transpose in the plans


@pytest.fixture(scope="module")
def x_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """x refined ×3 (1 mm thin, coarser than y and z: the plans transpose x first), rotated about z
    so x is no world axis; planned and preprocessed (3d_fullres), a zero-correction fold 0."""
    from test_restoration import _zero_correction_fold

    from autoseg.planning.run import plan_dataset
    from autoseg.preprocessing.run import run as preprocess

    base = tmp_path_factory.mktemp("x_refined")
    about_z = (math.cos(0.35), -math.sin(0.35), 0.0, math.sin(0.35), math.cos(0.35), 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((0.8, 0.7, 1.0), ORIGIN, about_z, 3)
    thin = {f"sr_{i:03d}": (thin_phantom(i, (10, 20, 24)), geometry) for i in range(5)}
    raw = _write_sr_dataset(base / "raw", thin, (1, 1, 3))
    work = base / "work"
    plan_dataset(raw, work, "tiny", workers=1)
    preprocess(work, ["3d_fullres"], workers=1)
    _zero_correction_fold(work, "3d_fullres", 0)
    return raw, work


def test_a_non_z_axis_refined_through_plans_preprocessing_and_prediction(x_work: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from autoseg.preprocessing.super_resolution import refine_image

    raw, work = x_work
    plans = plans_io.load(work / "plans.yaml")
    assert plans.upsample_factor == (1, 1, 3) and plans.transpose == (2, 0, 1)
    target, target_geometry = read_image(raw / "targetsTr" / "sr_001.nii.gz")
    data = np.load(work / "preprocessed" / "3d_fullres" / "sr_001.npy")
    stored = np.load(work / "preprocessed" / "3d_fullres" / "sr_001_target.npy")
    assert data.shape == stored.shape and data.shape[1:] == tuple(target.shape[1:][a] for a in plans.transpose)
    thick, geometry = read_image(raw / "imagesTr" / "sr_001_0000.nii.gz")
    selections, _ = select_models(work, ["3d_fullres"], [0])
    predictor = Predictor(work, selections, device="cpu", tta=True)
    restored = predictor.export(predictor.predict(thick, geometry), geometry, tmp_path / "sr_001.nii.gz")
    np.testing.assert_array_equal(restored, refine_image(thick, (1, 1, 3))[0])
    _, written = read_image(tmp_path / "sr_001.nii.gz")
    _close_geometry(written, target_geometry, atol=1e-5)
