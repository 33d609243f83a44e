"""Preprocessing: resampling, the per-case pipeline and its inverse, the stage (files, resume) and its CLI.

Synthetic data only (ellipsoid phantoms from :mod:`phantoms`); the whole file runs in seconds.
The anisotropic phantom has its coarse axis last in array order (x, 5 mm), so the plan transposes
it first and resampling uses a separate z; its direction matrix and origin are not the identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import phantoms
import pytest
from typer.testing import CliRunner

from autoseg import plans as plans_io
from autoseg.cli import app
from autoseg.errors import DatasetError, PlanError
from autoseg.planning.run import plan_dataset
from autoseg.imageio import Geometry, read_image, write_image
from autoseg.plans import Normalization, Plans
from autoseg.preprocessing import run as stage
from autoseg.preprocessing.normalization import normalize_channel
from autoseg.preprocessing.pipeline import (
    class_locations,
    export_segmentation,
    geometry_from_props,
    plan_digest,
    preprocess_case,
    revert_to_original,
)
from autoseg.preprocessing.resample import compute_new_shape, resample_image, resample_labels, separate_z_axis

#: (z, y, x) array order; x is the coarse axis.
SPACING = (0.8, 0.8, 5.0)
SHAPE = (24, 28, 12)
#: A proper rotation (det +1) that permutes and flips the axes, and an off-centre origin.
DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
ORIGIN = (10.5, -3.25, 7.0)
N_CASES = 3


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * np.count_nonzero(x & y) / max(np.count_nonzero(x) + np.count_nonzero(y), 1)


def with_config(plans: Plans, name: str, **changes: object) -> Plans:
    """``plans`` with fields of one configuration replaced."""
    config = dataclasses.replace(plans.configurations[name], **changes)
    return dataclasses.replace(plans, configurations={**plans.configurations, name: config})


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An anisotropic nnU-Net-layout dataset; case_000's image has a zero border (the crop removes it)."""
    root = tmp_path_factory.mktemp("raw")
    phantoms.write_nnunet_dataset(root, n_cases=N_CASES, shape=SHAPE, spacing=SPACING, origin=ORIGIN,
                                  direction=DIRECTION)
    image_path = root / "imagesTr" / "case_000_0000.nii.gz"
    image, geometry = read_image(image_path)
    bordered = np.zeros_like(image[0])
    bordered[2:-1, 3:-2, 1:-1] = image[0, 2:-1, 3:-2, 1:-1]
    write_image(image_path, bordered, geometry)
    label_path = root / "labelsTr" / "case_000.nii.gz"
    label, _ = read_image(label_path)
    clipped = np.zeros_like(label[0])
    clipped[2:-1, 3:-2, 1:-1] = label[0, 2:-1, 3:-2, 1:-1]
    write_image(label_path, clipped, geometry)
    return root


@pytest.fixture()
def work(raw: Path, tmp_path: Path) -> Path:
    plan_dataset(raw, tmp_path / "work", planner="tiny", workers=1)
    return tmp_path / "work"


@pytest.fixture(scope="module")
def plans(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Plans:
    _, _, planned, _ = plan_dataset(raw, tmp_path_factory.mktemp("work"), planner="tiny", workers=1)
    assert planned.transpose == (2, 0, 1)  # the coarse x axis moved first
    return planned


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, Geometry]:
    image, label = phantoms.ellipsoid(SHAPE, seed=7)
    return image[None], label, phantoms.geometry(SPACING, ORIGIN, DIRECTION)


# ----------------------------------------------------------------------------------------------
# Resampling


def test_new_shape_and_separate_axis_follow_nnunet() -> None:
    assert compute_new_shape((8, 20, 24), (5.0, 0.8, 0.8), (4.0, 1.0, 1.0)) == (10, 16, 19)
    assert separate_z_axis((5.0, 0.8, 0.8), (4.0, 1.0, 1.0)) == 0
    assert separate_z_axis((1.0, 1.0, 1.0), (1.0, 1.0, 4.0)) == 2  # the target decides when the data is isotropic
    assert separate_z_axis((1.0, 1.0, 1.0), (1.5, 1.5, 1.5)) is None
    assert separate_z_axis((5.0, 5.0, 1.0), (5.0, 5.0, 1.0)) is None  # two coarse axes: no single z


def test_unchanged_shape_is_not_resampled() -> None:
    data = np.random.default_rng(0).random((2, 4, 5, 6), dtype=np.float32)
    assert resample_image(data, (4, 5, 6)) is data
    labels = np.zeros((4, 5, 6), dtype=np.int8)
    assert resample_labels(labels, (4, 5, 6)) is labels


def test_voxel_centres_are_aligned_and_edges_repeated() -> None:
    ramp = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
    up = resample_image(ramp, (1, 1, 8), order=1)
    np.testing.assert_allclose(up[0, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)
    for axis in (None, 0):
        constant = np.full((1, 5, 6, 7), 3.5, dtype=np.float32)
        out = resample_image(constant, (9, 4, 11), order=3, axis=axis, order_z=0)
        assert out.dtype == np.float32 and out.shape == (1, 9, 4, 11)
        np.testing.assert_allclose(out, 3.5, atol=1e-5)


@pytest.mark.parametrize("axis,order_z", [(None, 0), (0, 0), (0, 1), (2, 0)])
def test_label_resampling_is_argmax_of_linear_one_hot(axis: int | None, order_z: int) -> None:
    _, label = phantoms.ellipsoid((9, 13, 11), seed=1)
    new_shape = (14, 8, 17)
    out = resample_labels(label.astype(np.int8), new_shape, order=1, axis=axis, order_z=order_z)
    # Reference: every class (background included) resampled, then argmax.
    onehot = np.stack([(label == k) for k in range(3)]).astype(np.float32)
    scores = np.stack([resample_image(onehot[k:k + 1], new_shape, 1, axis, order_z)[0] for k in range(3)])
    assert out.dtype == np.int8
    assert np.mean(out == scores.argmax(0)) > 0.999  # float rounding may flip an exact tie
    nearest = resample_labels(label, new_shape, order=0)
    assert set(np.unique(nearest)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------
# The per-case pipeline and its inverse


def test_round_trip_restores_geometry_and_labels(plans: Plans, phantom: tuple) -> None:
    image, label, geometry = phantom
    # Coarser along the (transposed) coarse axis and in-plane: every axis is resampled, z separately.
    plans = with_config(plans, "3d_fullres", spacing=(4.0, 1.0, 1.0))
    data, seg, props = preprocess_case(image, label, geometry, plans, "3d_fullres", case_id="case_x")
    assert props["transpose"] == [2, 0, 1]
    assert props["spacing_after_transpose"] == [5.0, 0.8, 0.8]
    assert props["separate_axis"] == 0
    assert data.dtype == np.float32 and data.shape == (1, 15, 19, 22)
    assert seg is not None and seg.dtype == np.int8 and seg.shape == data.shape[1:]
    props = json.loads(json.dumps(props))  # what the stage stores

    assert geometry_from_props(props) == geometry
    back = revert_to_original(seg, props)
    assert back.shape == label.shape and back.dtype == seg.dtype
    assert dice(back, label, 1) > 0.95 and dice(back, label, 2) > 0.95

    onehot = np.stack([seg == k for k in range(3)]).astype(np.float32)
    probabilities = revert_to_original(onehot, props)
    assert probabilities.shape == (3, *label.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    exported = export_segmentation(onehot, props)
    assert exported.dtype == np.uint8 and exported.shape == label.shape
    assert np.array_equal(exported, probabilities.argmax(0))
    assert dice(exported, label, 1) > 0.95 and dice(exported, label, 2) > 0.95


def test_2d_configuration_resamples_only_in_plane(plans: Plans, phantom: tuple) -> None:
    image, label, geometry = phantom
    plans = with_config(plans, "2d", spacing=(1.0, 1.0, 1.0))  # axis 0's planned value is not used
    data, seg, props = preprocess_case(image, label, geometry, plans, "2d", case_id="c")
    assert props["spacing_target"] == [5.0, 1.0, 1.0]  # the case's own spacing on axis 0
    assert props["separate_axis"] == 0
    assert data.shape == (1, 12, 19, 22)
    # No slice mixing: label slices along axis 0 stay where they were.
    labelled_in = np.flatnonzero(label.transpose(2, 0, 1).any(axis=(1, 2)))
    labelled_out = np.flatnonzero(seg.any(axis=(1, 2)))
    assert np.array_equal(labelled_in, labelled_out)
    assert np.array_equal(export_segmentation(np.stack([seg == k for k in range(3)]).astype(np.float32),
                                              props).shape, label.shape)


def identity_plans(plans: Plans, **norm: object) -> Plans:
    """The plans without transpose, at spacing 1 mm (no resampling of a 1 mm image)."""
    normalization = (Normalization(**{"scheme": "zscore", **norm}),)  # type: ignore[arg-type]
    plans = with_config(plans, "3d_fullres", spacing=(1.0, 1.0, 1.0), normalization=normalization)
    return dataclasses.replace(plans, transpose=(0, 1, 2))


def test_crop_box_of_an_image_with_a_zero_border(plans: Plans) -> None:
    image = np.zeros((1, 10, 12, 14), dtype=np.int16)
    image[0, 2:8, 3:10, 4:11] = np.random.default_rng(0).integers(1, 100, size=(6, 7, 7))
    image[0, 5, 6, 7] = 0  # a hole: filled, stays inside the box
    label = np.zeros((10, 12, 14), dtype=np.uint8)
    label[3:7, 4:9, 5:10] = 1
    geometry = phantoms.geometry((1.0, 1.0, 1.0))
    data, seg, props = preprocess_case(image, label, geometry, identity_plans(plans), "3d_fullres", case_id="c")
    assert props["bbox"] == [[2, 8], [3, 10], [4, 11]]
    assert props["shape_after_crop"] == [6, 7, 7] and data.shape == (1, 6, 7, 7)
    assert np.array_equal(seg, label[2:8, 3:10, 4:11])
    assert np.array_equal(revert_to_original(seg, props), label)
    probabilities = revert_to_original(np.stack([seg == 0, seg == 1]).astype(np.float32), props)
    assert probabilities[0, 0, 0, 0] == 1.0 and probabilities[1, 0, 0, 0] == 0.0  # outside the box


def test_zscore_with_and_without_mask(plans: Plans) -> None:
    channel = np.zeros((6, 8, 8), dtype=np.float32)
    channel[:, :4, :] = np.random.default_rng(1).normal(50.0, 5.0, size=(6, 4, 8))
    channel[:, 4:, :4] = np.random.default_rng(2).normal(80.0, 5.0, size=(6, 4, 4))  # an L-shaped region
    mask = channel != 0
    masked = normalize_channel(channel, "zscore", mask=mask, use_mask=True)
    assert masked.dtype == np.float32
    assert abs(masked[mask].mean()) < 1e-5 and abs(masked[mask].std() - 1) < 1e-4
    assert np.all(masked[~mask] == 0)
    unmasked = normalize_channel(channel, "zscore", mask=mask, use_mask=False)
    assert abs(unmasked.mean()) < 1e-5 and abs(unmasked.std() - 1) < 1e-4
    assert np.all(unmasked[~mask] < 0)
    # Through the pipeline: the zero corner lies inside the crop box (the L's bounding box).
    geometry = phantoms.geometry((1.0, 1.0, 1.0))
    with_mask, _, _ = preprocess_case(channel[None], None, geometry, identity_plans(plans, use_mask=True),
                                      "3d_fullres")
    without, _, _ = preprocess_case(channel[None], None, geometry, identity_plans(plans), "3d_fullres")
    assert np.all(with_mask[0][~mask] == 0) and np.all(without[0][~mask] < 0)


def test_ct_normalisation_clips_to_the_window() -> None:
    values = np.array([-1000, -100, 50, 200, 3000], dtype=np.int16)
    out = normalize_channel(values, "ct", clip=(-100.0, 200.0), mean=50.0, std=25.0)
    np.testing.assert_allclose(out, [-6, -6, 0, 6, 6])
    assert out.dtype == np.float32


def test_class_locations_are_deterministic_and_inside_their_class(plans: Plans, phantom: tuple) -> None:
    image, label, geometry = phantom
    first = preprocess_case(image, label, geometry, plans, "3d_fullres", case_id="case_a")
    again = preprocess_case(image, label, geometry, plans, "3d_fullres", case_id="case_a")
    seg, locations = first[1], first[2]["class_locations"]
    assert locations == again[2]["class_locations"]
    assert set(locations) == {"1", "2"}
    for value, coords in locations.items():
        assert len(coords) == np.count_nonzero(seg == int(value))  # fewer than 10 000: all of them
        assert all(seg[z, y, x] == int(value) for z, y, x in coords)
    few = class_locations(seg, [1, 2, 3], seed=5, samples=20)
    assert len(few["1"]) == 20 and few["3"] == []
    assert few == class_locations(seg, [1, 2, 3], seed=5, samples=20)
    assert few["1"] != class_locations(seg, [1], seed=6, samples=20)["1"]
    assert all(seg[z, y, x] == 1 for z, y, x in few["1"])


def test_digest_ignores_the_network_but_not_the_data(plans: Plans) -> None:
    digest = plan_digest(plans, "3d_fullres")
    assert plan_digest(with_config(plans, "3d_fullres", batch_size=7), "3d_fullres") == digest
    assert plan_digest(with_config(plans, "3d_fullres", spacing=(4.0, 1.0, 1.0)), "3d_fullres") != digest
    assert plan_digest(plans, "2d") == plan_digest(plans, "2.5d")
    cascade = dataclasses.replace(plans.configurations["3d_fullres"], previous_stage="3d_lowres")
    with_cascade = dataclasses.replace(plans, configurations={**plans.configurations, "3d_cascade_fullres": cascade})
    assert plan_digest(with_cascade, "3d_cascade_fullres") == digest


# ----------------------------------------------------------------------------------------------
# The stage


def file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_stage_writes_every_recommended_configuration(work: Path) -> None:
    calls: list[tuple[int, int]] = []
    summary = stage.run(work, workers=2, progress=lambda done, total: calls.append((done, total)))
    assert list(summary.configs) == ["3d_fullres", "2d", "2.5d"]
    assert calls[-1] == (N_CASES, N_CASES)
    for name in summary.configs:
        folder = stage.preprocessed_dir(work, name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"case_{i:03d}{suffix}" for i in range(N_CASES) for suffix in (".json", ".npy", "_seg.npy"))
        data, seg, props = stage.load_case(folder, "case_001")
        assert isinstance(data, np.memmap) and data.dtype == np.float32 and seg.dtype == np.int8
        assert props["plan_digest"] == plan_digest(plans_io.load(work / "plans.yaml"), name)
    assert summary.configs["2.5d"].linked_from == "2d"
    same = stage.case_files(work / "preprocessed" / "2d", "case_000").data
    linked = stage.case_files(work / "preprocessed" / "2.5d", "case_000").data
    assert same.stat().st_ino == linked.stat().st_ino


def test_stage_round_trip_through_files_restores_the_label_exactly(work: Path, raw: Path, tmp_path: Path) -> None:
    stage.run(work, ["3d_fullres"], workers=1)
    folder = stage.preprocessed_dir(work, "3d_fullres")
    for case in ("case_000", "case_001"):
        _, seg, props = stage.load_case(folder, case)
        if case == "case_000":
            assert props["bbox"] != [[0, s] for s in props["shape_after_transpose"]]  # the border was cropped
        out = tmp_path / f"{case}.nii.gz"
        write_image(out, revert_to_original(np.asarray(seg), props), geometry_from_props(props))
        written, written_geometry = read_image(out)
        original, original_geometry = read_image(raw / "labelsTr" / f"{case}.nii.gz")
        assert written_geometry == original_geometry
        assert np.array_equal(written, original)  # case spacing = plan spacing: nothing resampled


def test_stage_resumes_and_skips_finished_cases(work: Path) -> None:
    stage.run(work, ["3d_fullres"], workers=1)
    folder = stage.preprocessed_dir(work, "3d_fullres")
    before = file_stamps(folder)
    (folder / ".tmp-abc123-case_001.npy").write_bytes(b"half")  # a killed writer's leftover
    (folder / "case_001.json").unlink()  # arrays written, props not yet: unfinished
    summary = stage.run(work, ["3d_fullres"], workers=1).configs["3d_fullres"]
    assert (summary.processed, summary.reused, summary.stale_removed) == (1, N_CASES - 1, 1)
    after = file_stamps(folder)
    assert sorted(after) == sorted(before)  # no temp file left, the props are back
    for name, stamp in after.items():
        assert (stamp == before[name]) == (not name.startswith("case_001")), name


def test_changed_plan_redoes_the_cases(work: Path) -> None:
    stage.run(work, ["3d_fullres"], workers=1)
    folder = stage.preprocessed_dir(work, "3d_fullres")
    before = file_stamps(folder)
    plans = plans_io.load(work / "plans.yaml")
    plans_io.save(with_config(plans, "3d_fullres", batch_size=3), work / "plans.yaml")
    assert stage.run(work, ["3d_fullres"], workers=1).configs["3d_fullres"].processed == 0
    changed = with_config(plans, "3d_fullres", normalization=(Normalization("zscore", use_mask=True),))
    plans_io.save(changed, work / "plans.yaml")
    summary = stage.run(work, ["3d_fullres"], workers=1).configs["3d_fullres"]
    assert (summary.processed, summary.reused) == (N_CASES, 0)
    after = file_stamps(folder)
    assert all(after[name] != before[name] for name in before)
    assert stage.read_props(folder / "case_002.json")["plan_digest"] == plan_digest(changed, "3d_fullres")


def test_stage_errors_name_the_file_and_the_fix(work: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"configuration '3d_ful' is not planned; did you mean '3d_fullres'"):
        stage.run(work, ["3d_ful"])
    (work / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"dataset\.json: not found; run 'autoseg plan RAW -o"):
        stage.run(work, ["3d_fullres"])
    with pytest.raises(PlanError, match=r"plans\.yaml: not found; run 'autoseg plan RAW -o"):
        stage.run(tmp_path / "empty")


def test_cli_missing_plans_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["preprocess", os.fspath(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "plans.yaml: not found" in lines[0] and "autoseg plan" in lines[0]


def test_cli_preprocesses_the_named_configurations(work: Path) -> None:
    result = CliRunner().invoke(app, ["preprocess", os.fspath(work), "-c", "2d,2.5d", "-j", "1"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "2.5d" in result.output and "linked from 2d" in result.output
    assert (work / "preprocessed" / "2.5d" / "case_002.json").is_file()
    assert not (work / "preprocessed" / "3d_fullres").exists()


@pytest.mark.parametrize("layout", ["png", "msd-2-channels"])
def test_stage_reads_2d_and_multichannel_datasets(layout: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    if layout == "png":
        phantoms.write_png_dataset(raw, n_cases=2)
    else:
        phantoms.write_msd_dataset(raw, n_cases=2, channels=2)
    _, _, plans, _ = plan_dataset(raw, tmp_path / "work", planner="tiny", workers=1)
    summary = stage.run(tmp_path / "work", workers=1)
    name = next(iter(summary.configs))
    data, seg, props = stage.load_case(stage.preprocessed_dir(tmp_path / "work", name), "case_000")
    assert data.shape[0] == len(plans.channel_names) == (1 if layout == "png" else 2)
    label, _ = read_image(raw / "labelsTr" / ("case_000.png" if layout == "png" else "case_000.nii.gz"))
    assert np.array_equal(revert_to_original(np.asarray(seg), props), label[0])


@pytest.mark.slow
def test_hippocampus_round_trip_is_exact(hippocampus: Path, tmp_path: Path) -> None:
    """Real data: every case at its own 1 mm spacing, so preprocess + inverse must be the identity."""
    work = tmp_path / "work"
    plan_dataset(hippocampus, work, planner="default", workers=2)
    summary = stage.run(work, ["3d_fullres"], workers=2).configs["3d_fullres"]
    assert summary.processed == summary.cases == 220
    folder = stage.preprocessed_dir(work, "3d_fullres")
    for case in ("hippocampus_001", "hippocampus_150", "hippocampus_335"):
        _, seg, props = stage.load_case(folder, case)
        label, geometry = read_image(hippocampus / "labelsTr" / f"{case}.nii.gz")
        assert geometry_from_props(props) == geometry
        assert np.array_equal(revert_to_original(np.asarray(seg), props), label[0])
        onehot = np.stack([np.asarray(seg) == k for k in range(3)]).astype(np.float32)
        assert np.array_equal(export_segmentation(onehot, props), label[0])


@pytest.mark.parametrize(("shape", "new_shape"), [
    ((5, 7, 9), (11, 3, 9)), ((20, 30, 40), (41, 61, 17)), ((1, 30, 40), (1, 64, 64)), ((13, 17), (40, 5)),
    ((4, 4, 4), (4, 9, 2)), ((2, 3, 2), (1, 1, 7)), ((6, 60, 10), (9, 512, 51)),
])
def test_linear_resampling_equals_scipy_order_1(shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
    """The separable order-1 passes give scipy's trilinear affine_transform (pixel centres aligned,
    edges clamped) up to float rounding."""
    from scipy import ndimage

    from autoseg.preprocessing.resample import _affine

    array = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    scale = np.asarray(shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    expected = ndimage.affine_transform(array, scale, offset=0.5 * scale - 0.5, output_shape=new_shape, order=1,
                                        mode="nearest", prefilter=False, output=np.float32)
    got = _affine(array, new_shape, order=1)
    assert got.dtype == np.float32 and got.shape == new_shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
