"""Left/right labels: the planner leaves the left-right axis out of mirroring, in training and TTA.

A mirrored patch keeps its labels, so mirroring along the left-right axis teaches a network that a
left parotid on the right side is still "left": it can learn the organ but not its side (nnU-Net
issues #80, #869, #2225). These tests pin each link: the names, the axis from the orientation, the
plan, the augmentation and the test-time augmentation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from autoseg import plans as plans_io
from autoseg.data import AugmentationSettings, Augmenter, mirror_axes
from autoseg.errors import PlanError
from autoseg.planning import load_preset, plan
from autoseg.planning.mirroring import (
    left_right_axis,
    majority_orientation,
    mirrored_cases,
    name_words,
    planned_mirror_axes,
    sided_labels,
)
from test_data import make_config
from test_planning import make_fingerprint

OPENKBP = {"background": [0], "Brainstem": [1], "SpinalCord": [2], "RightParotid": [3], "LeftParotid": [4],
           "Esophagus": [5], "Larynx": [6], "Mandible": [7]}


@pytest.mark.parametrize(("names", "sided"), [
    (OPENKBP, ["RightParotid", "LeftParotid"]),
    (["background", "Parotid_L", "Brainstem"], ["Parotid_L"]),  # one side alone: mirroring marks both
    (["kidney_left", "kidney_right", "rib_left_1", "liver"], ["kidney_left", "kidney_right", "rib_left_1"]),
    (["Lt femur", "Left-Cerebral-White-Matter", "ctx-lh-insula", "lung_R"],
     ["Lt femur", "Left-Cerebral-White-Matter", "ctx-lh-insula", "lung_R"]),
    (["background", "Anterior", "Posterior"], []),  # MSD Hippocampus: no sides
    (["vertebrae_L1", "vertebrae_L2", "Lateral", "Rectum", "CTVHigh"], []),  # L1/L2 are levels, not sides
])
def test_labels_that_name_a_side(names, sided) -> None:
    assert sided_labels(names) == sided
    assert name_words("RightParotid") == ("right", "parotid") and name_words("CTVHigh") == ("ctv", "high")


@pytest.mark.parametrize(("orientation", "transpose", "axis"), [
    ("LPS", (0, 1, 2), 2),  # ITK x (the columns) runs left-right: numpy's last axis
    ("LPS", (1, 0, 2), 2),  # OpenKBP's plan moves y first; the left-right axis stays last
    ("RAS", (2, 0, 1), 0),  # transposed to the front
    ("PLS", (0, 1, 2), 1),  # rows and columns swapped: numpy's axis 1
    ("SPL", (0, 1, 2), 0),
    ("LP", (0, 1, 2), 2),  # a 2D image (array (1, y, x))
    ("PSA", (0, 1, 2), None),  # no axis runs left-right
    (None, (0, 1, 2), None),
])
def test_left_right_axis_from_the_orientation(orientation, transpose, axis) -> None:
    assert left_right_axis(orientation, transpose) == axis


def test_cases_in_another_orientation_are_counted() -> None:
    codes = ["LPS"] * 5 + ["RAS", "RPS", "PLS", "LAS"]  # RAS, RPS reversed; PLS another axis; LAS the same
    assert majority_orientation(codes) == "LPS" and majority_orientation([]) is None
    assert mirrored_cases(codes, "LPS") == 3


def test_planned_axes_for_3d_and_2d_patches() -> None:
    three, two = make_config(patch=(16, 16, 16)), make_config(patch=(24, 20))
    assert planned_mirror_axes(three, 2) == (0, 1) and planned_mirror_axes(three, 0) == (1, 2)
    assert planned_mirror_axes(two, 2) == (0,) and planned_mirror_axes(two, 1) == (1,)
    assert planned_mirror_axes(two, 0) is None  # sagittal slices: no in-plane flip swaps sides
    assert planned_mirror_axes(three, None) is None


def _ct(labels: dict[str, list[int]], n: int = 20, others: tuple[str, ...] = ()):
    """A CT-like fingerprint in LPS; the last ``len(others)`` cases in those orientations."""
    fp = make_fingerprint([(2.5, 1.0, 1.0)] * n, [(60, 120, 140)] * n, labels=labels)
    codes = ["LPS"] * (n - len(others)) + list(others)
    return dataclasses.replace(fp, cases=tuple(dataclasses.replace(c, orientation=o) for c, o in zip(fp.cases, codes)))


def test_plan_leaves_the_left_right_axis_unmirrored(tmp_path: Path) -> None:
    plans = plan(_ct(OPENKBP), load_preset("default"))
    for name, config in plans.configurations.items():
        assert config.mirror_axes == ((0, 1) if config.dims == 3 else (0,)), name
        assert mirror_axes(config) == config.mirror_axes and config.orientation == "LPS"
    [note] = [n for n in plans.notes if "labels name a side" in n]
    assert "RightParotid, LeftParotid" in note and "axis 2" in note and "not mirrored" in note
    assert "reorient" not in note and "sagittal" not in note
    path = tmp_path / "plans.yaml"
    plans_io.save(plans, path)
    assert "mirror_axes: [0, 1]" in path.read_text()
    assert plans_io.load(path) == plans


def test_plan_without_sides_mirrors_every_axis_and_writes_no_key() -> None:
    plans = plan(_ct({"background": [0], "liver": [1], "tumour": [2]}), load_preset("default"))
    assert all(c.mirror_axes is None for c in plans.configurations.values())
    assert mirror_axes(plans.configurations["3d_fullres"]) == (0, 1, 2)
    text = plans_io.dumps(plans)
    assert "mirror_axes" not in text and "orientation" not in text  # such plans are as before, byte for byte


@pytest.mark.parametrize(("axes", "message"), [("[0, 3]", "distinct patch axes from 0 to 2"),
                                               ("[1, 1]", "distinct patch axes")])
def test_hand_edited_mirror_axes_are_validated(tmp_path: Path, axes: str, message: str) -> None:
    path = tmp_path / "plans.yaml"
    plans_io.save(plan(_ct(OPENKBP), load_preset("default")), path)
    path.write_text(path.read_text().replace("mirror_axes: [0, 1]", f"mirror_axes: {axes}", 1))
    with pytest.raises(PlanError, match=message):
        plans_io.load(path)
    path.write_text(path.read_text().replace(f"mirror_axes: {axes}", "mirror_axes: []", 1))
    assert plans_io.load(path).configurations["3d_fullres"].mirror_axes == ()  # no mirroring at all


def _flips_seen(config, trials: int = 40) -> set[int]:
    """Axes the augmentation flipped over ``trials`` batches of an image that counts up every axis."""
    only_mirror = AugmentationSettings(p_rotation=0.0, p_scale=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0,
                                       p_contrast=0.0, p_low_res=0.0, p_gamma=0.0, p_gamma_inverted=0.0)
    augmenter = Augmenter(config, only_mirror)
    shape = augmenter.initial_patch_size
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    image = np.ascontiguousarray(np.broadcast_to(sum(g * 10.0 ** k for k, g in enumerate(grids)), (2, 1, *shape)))
    seen: set[int] = set()
    np.random.seed(0)
    for _ in range(trials):
        out, _ = augmenter(image.copy(), np.zeros((2, 1, *shape), dtype=np.int16))
        for sample in out[:, 0]:
            seen |= {a for a in range(len(shape)) if np.diff(sample, axis=a).mean() < 0}
    return seen


def test_training_augmentation_mirrors_only_the_planned_axes() -> None:
    config = make_config(patch=(16, 16, 16))
    assert _flips_seen(config) == {0, 1, 2}
    assert _flips_seen(dataclasses.replace(config, mirror_axes=(0, 1))) == {0, 1}
    assert _flips_seen(dataclasses.replace(config, mirror_axes=())) == set()


def _sided_fold(tmp_path: Path):
    """An experiment whose 3d_fullres fold 0 was trained as a left/right plan says (random weights):
    mirror axes (0, 1), orientation LPS. Returns (work, the plans without those)."""
    import phantoms
    from autoseg import crossval
    from autoseg.planning import run as experiment
    from test_predict import TRAIN_SHAPE, TRAIN_SPACING, _save_fold

    raw, work = tmp_path / "raw", tmp_path / "work"
    ids = phantoms.write_nnunet_dataset(raw, n_cases=5, shape=TRAIN_SHAPE, spacing=TRAIN_SPACING)
    _, _, plans, _ = experiment.plan_dataset(raw, work, "tiny", None, 1, None)
    crossval.load_or_create(work, ids)
    sided = dataclasses.replace(plans, configurations={**plans.configurations, "3d_fullres": dataclasses.replace(
        plans.configurations["3d_fullres"], mirror_axes=(0, 1), orientation="LPS")})
    _save_fold(work, sided, "3d_fullres", 0, seed=1)
    return work, plans


def test_tta_flips_the_axes_the_fold_was_trained_with(tmp_path: Path) -> None:
    """The checkpoint carries its configuration's mirror_axes; the predictor's TTA uses them."""
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from test_predict import _save_fold

    work, plans = _sided_fold(tmp_path)
    selections, _ = select_models(work, ["3d_fullres"], [0])
    assert Predictor(work, selections, device="cpu", tta=True).mirror_axes("3d_fullres") == (0, 1)
    assert Predictor(work, selections, device="cpu", tta=False).mirror_axes("3d_fullres") == ()
    _save_fold(work, plans, "3d_fullres", 0, seed=1)  # a fold trained with every axis mirrored
    assert Predictor(work, selections, device="cpu", tta=True).mirror_axes("3d_fullres") == (0, 1, 2)


def test_plan_table_shows_the_mirrored_axes() -> None:
    from rich.console import Console

    from autoseg.cli.dataset import print_plans

    console = Console(record=True, width=200)
    print_plans(console, plan(_ct(OPENKBP), load_preset("default")))
    text = console.export_text()
    assert "0, 1 (of 0, 1, 2; see the notes)" in text and "mirrored axes" in text
    assert "RightParotid, LeftParotid" in text
    console = Console(record=True, width=200)
    print_plans(console, plan(_ct({"background": [0], "liver": [1]}), load_preset("default")))
    assert "mirrored axes" not in console.export_text()


def test_plan_says_what_mirroring_cannot_fix() -> None:
    """Cases mirrored as arrays (RAS beside LPS) and sagittal 2D slices are said in the note."""
    plans = plan(_ct(OPENKBP, others=("RAS", "RAS")), load_preset("default"))
    [note] = [n for n in plans.notes if "labels name a side" in n]
    assert "2 case(s) run left-right along another axis or the other way" in note and "reorient them to LPS" in note
    sagittal = make_fingerprint([(1.0, 1.0, 3.0)] * 20, [(120, 140, 50)] * 20, labels=OPENKBP)  # x is coarsest
    sagittal = dataclasses.replace(sagittal, cases=tuple(dataclasses.replace(c, orientation="LPS")
                                                         for c in sagittal.cases))
    plans = plan(sagittal, load_preset("default"))
    assert plans.transpose[0] == 2  # the left-right axis is sliced along
    assert plans.configurations["2d"].mirror_axes is None and plans.configurations["3d_fullres"].mirror_axes == (1, 2)
    assert any("a sagittal slice cannot show the side" in n for n in plans.notes)


def test_prediction_estimate_counts_the_mirrored_passes() -> None:
    from autoseg.planning.compute import Throughput, prediction_seconds

    config = make_config(patch=(16, 16, 16))
    rate = Throughput(100.0, 120.0, "cpu: test", "given")
    every = prediction_seconds(config, 3, rate)
    assert prediction_seconds(dataclasses.replace(config, mirror_axes=(0, 1)), 3, rate) == pytest.approx(every / 2)
    assert prediction_seconds(dataclasses.replace(config, mirror_axes=()), 3, rate) == pytest.approx(
        prediction_seconds(config, 3, rate, tta=False))


@pytest.mark.parametrize(("direction", "warned"), [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), None),  # LPS, as trained
    ((1, 0, 0, 0, -1, 0, 0, 0, 1), None),  # LAS: left-right as trained
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), "orientation RAS"),  # mirrored left-right
    ((0, 1, 0, 1, 0, 0, 0, 0, 1), "orientation PLS"),  # left-right along the rows
])
def test_side_warning_for_an_input_oriented_against_the_model(direction, warned) -> None:
    from autoseg.planning.mirroring import side_warning

    line = side_warning(direction, "LPS", "ct.nii.gz")
    assert (line is None) if warned is None else (warned in line and "reorient the image to LPS" in line)
    assert side_warning(direction, None, "ct.nii.gz") is None  # no labels that name a side


def test_predict_warns_on_an_input_oriented_against_the_model(tmp_path: Path, cli) -> None:
    from autoseg.imageio import Geometry, write_image

    work, _ = _sided_fold(tmp_path)
    images = tmp_path / "in"
    image = np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float32)
    write_image(images / "lps_0000.nii.gz", image, Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0),
                                                          (1, 0, 0, 0, 1, 0, 0, 0, 1), 3))
    write_image(images / "ras_0000.nii.gz", image, Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0),
                                                          (-1, 0, 0, 0, -1, 0, 0, 0, 1), 3))
    result = cli("predict", work, "-i", images, "-o", tmp_path / "out", "-c", "3d_fullres", "-f", "0", "--no-tta")
    assert result.exit_code == 0, result.output
    assert "ras_0000.nii.gz: orientation RAS, but the model learned its left/right labels on LPS" in result.output
    assert "lps_0000" not in result.output.split("warning:", 1)[-1]
