"""Reading raw datasets as they are: nnU-Net v2 and MSD layouts, 2D PNG, unlabelled image folders."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import phantoms
import pytest

from autoseg.dataset.layout import LabelDef, discover_images, load_dataset, load_dataset_strict
from autoseg.errors import DatasetError
from autoseg.imageio import SPACING_2D_AXIS, read_image
from autoseg.dataset.scan import scan_case


def _errors(issues):
    return [i for i in issues if i.severity == "error"]


def _scan_issues(spec):
    return [issue for case in spec.cases for issue in scan_case(case, spec, False, 0).issues]


# ----------------------------------------------------------------------------------------------
# Layouts


def test_nnunet_layout_is_read_as_is(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_Phantom"
    ids = phantoms.write_nnunet_dataset(root, n_cases=3, channels=("T1", "T2"))
    before = phantoms.tree_digest(root)

    spec, issues = load_dataset(root)

    assert issues == []
    assert spec is not None and spec.layout == "nnunet"
    assert spec.name == "Dataset001_Phantom"
    assert spec.channel_names == ("T1", "T2") and spec.num_channels == 2
    assert spec.file_ending == ".nii.gz"
    assert spec.num_training_declared == 3
    assert spec.case_ids() == ids == ["case_000", "case_001", "case_002"]
    assert [(label.name, label.values) for label in spec.labels] == [("background", (0,)), ("shell", (1,)),
                                                                      ("core", (2,))]
    first = spec.cases[0]
    assert first.images == (root / "imagesTr" / "case_000_0000.nii.gz", root / "imagesTr" / "case_000_0001.nii.gz")
    assert first.label == root / "labelsTr" / "case_000.nii.gz"
    assert phantoms.tree_digest(root) == before  # nothing renamed or written


def test_msd_layout_single_channel(tmp_path: Path) -> None:
    root = tmp_path / "Task99_Phantom"
    ids = phantoms.write_msd_dataset(root, n_cases=3)

    spec, issues = load_dataset(root)

    assert issues == []
    assert spec is not None and spec.layout == "msd"
    assert spec.channel_names == ("MRI",)
    assert spec.case_ids() == ids
    assert spec.file_ending == ".nii.gz"
    assert [(label.name, label.values) for label in spec.labels] == [("background", (0,)), ("shell", (1,)),
                                                                      ("core", (2,))]
    assert spec.cases[1].images == (root / "imagesTr" / "case_001.nii.gz",)
    assert spec.cases[1].label == root / "labelsTr" / "case_001.nii.gz"


def test_msd_layout_4d_multichannel(tmp_path: Path) -> None:
    root = tmp_path / "Task98_Multi"
    phantoms.write_msd_dataset(root, n_cases=2, channels=("FLAIR", "T2"), spacing=(2.5, 0.9, 0.7),
                               origin=(10.0, -20.0, 5.0))

    spec, issues = load_dataset(root)
    assert issues == []
    assert spec is not None and spec.num_channels == 2
    assert len(spec.cases[0].images) == 1  # one 4D file carries both channels

    array, geometry = read_image(spec.cases[0].images[0])
    assert array.shape == (2, *phantoms.SHAPE_3D)
    assert geometry.ndim == 3
    assert geometry.spacing == pytest.approx((2.5, 0.9, 0.7))
    assert geometry.origin == pytest.approx((10.0, -20.0, 5.0))
    assert len(geometry.direction) == 9  # the spatial 3x3 block, channel axis dropped
    np.testing.assert_allclose(array[1], 2 * array[0], rtol=1e-5)  # channel order kept
    assert _scan_issues(spec) == []  # 4D image and 3D label share a grid


def test_png_2d_dataset(tmp_path: Path) -> None:
    root = tmp_path / "png"
    ids = phantoms.write_png_dataset(root, n_cases=2)

    spec, issues = load_dataset(root)
    assert issues == []
    assert spec is not None and spec.file_ending == ".png" and spec.case_ids() == ids

    image, geometry = read_image(spec.cases[0].images[0])
    label, _ = read_image(spec.cases[0].label)
    assert image.shape == (1, 1, *phantoms.SHAPE_2D) and image.dtype == np.uint8
    assert geometry.ndim == 2 and geometry.spacing == (SPACING_2D_AXIS, 1.0, 1.0)
    assert set(np.unique(label)) == {0, 1}
    assert _scan_issues(spec) == []


def test_rgb_png_carries_every_channel_in_one_file(tmp_path: Path) -> None:
    # nnU-Net's natural-image convention: channel_names R, G, B and only {case}_0000.png.
    import SimpleITK as sitk

    root = tmp_path / "rgb"
    phantoms.write_png_dataset(root, n_cases=2)
    phantoms.edit_dataset_json(root, channel_names={"0": "R", "1": "G", "2": "B"})
    for path in sorted((root / "imagesTr").glob("*.png")):
        gray = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([gray, gray // 2, gray // 3], -1), isVector=True), str(path))

    spec, issues = load_dataset(root)
    assert issues == []
    assert spec is not None and [len(c.images) for c in spec.cases] == [1, 1]
    assert read_image(spec.cases[0].images[0])[0].shape == (3, 1, *phantoms.SHAPE_2D)
    assert _scan_issues(spec) == []
    # The same files given to predict (imagesTs is named alike): one case each, not "lacks x_0001.png".
    found = discover_images(root / "imagesTr", num_channels=3)
    assert [(c.case_id, c.images) for c in found] == [(c.case_id, c.images) for c in spec.cases]


def test_gray_png_with_three_declared_channels_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    phantoms.write_png_dataset(root, n_cases=1)
    phantoms.edit_dataset_json(root, channel_names={"0": "R", "1": "G", "2": "B"})
    spec, issues = load_dataset(root)
    assert spec is not None and issues == []
    [issue] = _scan_issues(spec)
    assert issue.code == "wrong-channel-count" and "holds 1 channel(s), expected 3" in issue.problem


# ----------------------------------------------------------------------------------------------
# dataset.json details


@pytest.mark.parametrize("labels", [
    {"background": 0, "shell": 1, "core": 2},           # nnU-Net v2
    {"0": "background", "1": "shell", "2": "core"},     # MSD
], ids=["nnunet-style", "msd-style"])
def test_label_dict_styles(tmp_path: Path, labels: dict) -> None:
    phantoms.write_nnunet_dataset(tmp_path, n_cases=1, labels=labels)
    spec, issues = load_dataset(tmp_path)
    assert issues == []
    assert spec is not None
    assert spec.labels == (LabelDef("background", (0,)), LabelDef("shell", (1,)), LabelDef("core", (2,)))
    assert spec.label_values == frozenset({0, 1, 2}) and not spec.has_regions


def test_regions_are_parsed_as_region_labels(tmp_path: Path) -> None:
    # BraTS in nnU-Net v2: overlapping regions, one value (3) declared only as a single label.
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    phantoms.write_nnunet_dataset(tmp_path, n_cases=1, labels=labels,
                                  extra_json={"regions_class_order": [1, 2, 3]})
    spec, issues = load_dataset(tmp_path)
    assert issues == []
    assert spec is not None and spec.has_regions
    by_name = {label.name: label for label in spec.labels}
    assert by_name["whole tumor"].values == (1, 2, 3) and by_name["whole tumor"].is_region
    assert by_name["tumor core"].values == (2, 3) and by_name["tumor core"].is_region
    assert not by_name["enhancing tumor"].is_region and not by_name["background"].is_region
    assert spec.label_values == frozenset({0, 1, 2, 3})


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "a": 2}, "consecutive 0..N, got [0, 2]"),
    ({"a": 1, "b": 2}, "no background value 0"),
    ({"background": 0, "a": 1, "b": 1}, "declared twice: [1]"),
    ({"background": 0, "a": 1.5}, "not an integer"),
])
def test_invalid_labels_are_structural_errors(tmp_path: Path, labels: dict, expected: str) -> None:
    phantoms.write_nnunet_dataset(tmp_path, n_cases=1, labels=labels)
    _, issues = load_dataset(tmp_path)
    assert any(expected in i.problem and i.file == "dataset.json" for i in _errors(issues)), issues


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    nn, msd = tmp_path / "nn", tmp_path / "msd"
    phantoms.write_nnunet_dataset(nn, n_cases=2)
    phantoms.write_msd_dataset(msd, n_cases=2)
    for root, image_name in ((nn, "case_000_0000.nii.gz"), (msd, "case_000.nii.gz")):
        # AppleDouble files as found in the MSD tarballs, and Finder's .DS_Store: not images.
        (root / "imagesTr" / f"._{image_name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / "labelsTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
        (root / "imagesTr" / ".DS_Store").write_bytes(b"Bud1")
        spec, issues = load_dataset(root)
        assert issues == [], root
        assert spec is not None and spec.case_ids() == ["case_000", "case_001"]


def test_load_dataset_strict_raises_one_line(tmp_path: Path) -> None:
    phantoms.write_nnunet_dataset(tmp_path, n_cases=2)
    (tmp_path / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset_strict(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "labelsTr/case_001.nii.gz" in message and "label file is missing" in message


# ----------------------------------------------------------------------------------------------
# Unlabelled image folders (prediction input)


def test_discover_images_plain_names(tmp_path: Path) -> None:
    image, _ = phantoms.ellipsoid()
    for name in ("liver_7.nii.gz", "scan_2019.nii.gz", "a.nrrd"):
        phantoms.write_case_image(tmp_path / name, image)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._liver_7.nii.gz").write_bytes(b"\x00")

    cases = discover_images(tmp_path, num_channels=1)

    assert [c.case_id for c in cases] == ["a", "liver_7", "scan_2019"]
    assert all(c.label is None and len(c.images) == 1 for c in cases)
    assert cases[1].images == (tmp_path / "liver_7.nii.gz",)


def test_discover_images_channel_names(tmp_path: Path) -> None:
    image, _ = phantoms.ellipsoid()
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", "p2_0001.nii.gz"):
        phantoms.write_case_image(tmp_path / name, image)

    cases = {c.case_id: c for c in discover_images(tmp_path, num_channels=2)}

    assert cases["p1"].images == (tmp_path / "p1_0000.nii.gz", tmp_path / "p1_0001.nii.gz")
    assert cases["p2"].images == (tmp_path / "p2_0000.nii.gz", tmp_path / "p2_0001.nii.gz")
    assert sorted(cases) == ["p1", "p2"]


@pytest.mark.parametrize(("names", "channels", "message"), [
    # nnU-Net refuses these too; autoseg used to predict x_0001 as a second case, silently.
    (("x_0000.nii.gz", "x_0001.nii.gz"), 1,
     r"x_0001.nii.gz looks like channel 1 of case 'x', but the model takes 1 channel; remove or move"),
    (("x_0000.nii.gz", "x_0001.nii.gz", "x_0002.nii.gz"), 2,
     r"x_0002.nii.gz looks like channel 2 of case 'x', but the model takes 2 channels"),
    (("x_0000.nii.gz", "y_0000.nii.gz", "y_0001.nii.gz"), 2, r"case 'x' lacks x_0001.nii.gz; the model takes 2"),
    (("x_0001.nii.gz",), 2, r"case 'x' lacks x_0000.nii.gz; the model takes 2"),
    (("x_0000.nii.gz", "x_0000.nrrd"), 1, r"x_0000.nii.gz and x_0000.nrrd are both channel 0 of case 'x'"),
])
def test_discover_images_refuses_channel_files_that_do_not_fit(tmp_path: Path, names: tuple[str, ...],
                                                               channels: int, message: str) -> None:
    image, _ = phantoms.ellipsoid()
    for name in names:
        phantoms.write_case_image(tmp_path / name, image)
    with pytest.raises(DatasetError, match=message):
        discover_images(tmp_path, num_channels=channels)


def test_discover_images_numbered_names_without_channel_0_stand_alone(tmp_path: Path) -> None:
    """For a one-channel model, ``scan_2019``-like numbers that no ``_0000`` accompanies are names."""
    image, _ = phantoms.ellipsoid()
    for name in ("visit_0003.nii.gz", "visit_0004.nii.gz"):
        phantoms.write_case_image(tmp_path / name, image)
    assert [c.case_id for c in discover_images(tmp_path, num_channels=1)] == ["visit_0003", "visit_0004"]


def test_discover_images_single_channel_suffix(tmp_path: Path) -> None:
    image, _ = phantoms.ellipsoid()
    for name in ("a_0000.nii.gz", "b_0000.nii.gz"):
        phantoms.write_case_image(tmp_path / name, image)
    cases = discover_images(tmp_path, num_channels=1)
    assert [(c.case_id, c.images) for c in cases] == [("a", (tmp_path / "a_0000.nii.gz",)),
                                                      ("b", (tmp_path / "b_0000.nii.gz",))]


def test_discover_images_refuses_two_files_for_one_case(tmp_path: Path) -> None:
    image, _ = phantoms.ellipsoid()
    for name in ("a.nii.gz", "a_0000.nii.gz"):
        phantoms.write_case_image(tmp_path / name, image)
    with pytest.raises(DatasetError, match=r"a.nii.gz and a_0000.nii.gz are both case 'a'; rename one"):
        discover_images(tmp_path, num_channels=1)


# ----------------------------------------------------------------------------------------------
# The reader: what ITK's NIfTI reader would hide


def test_phantom_geometry_round_trips(tmp_path: Path) -> None:
    angle = math.radians(30)
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0)
    phantoms.write_nnunet_dataset(tmp_path, n_cases=1, spacing=(2.0, 0.5, 0.6), origin=(1.0, 2.0, 3.0),
                                  direction=direction)
    array, geometry = read_image(tmp_path / "imagesTr" / "case_000_0000.nii.gz")
    assert array.shape == (1, *phantoms.SHAPE_3D)
    assert geometry.spacing == pytest.approx((2.0, 0.5, 0.6))
    assert geometry.origin == pytest.approx((1.0, 2.0, 3.0))
    assert geometry.direction == pytest.approx(direction, abs=1e-6)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_non_finite_voxels_survive_reading_nifti(tmp_path: Path, ending: str) -> None:
    # ITK 5.4's NIfTI reader turns NaN and ±Inf into 0; autoseg restores them from the file.
    image, _ = phantoms.ellipsoid()
    image[1, 2, 3], image[4, 5, 6], image[7, 8, 9] = np.nan, np.inf, -np.inf
    path = phantoms.write_case_image(tmp_path / f"x{ending}", image)
    array, _ = read_image(path)
    assert np.isnan(array[0, 1, 2, 3]) and array[0, 4, 5, 6] == np.inf and array[0, 7, 8, 9] == -np.inf
    finite = np.isfinite(image)
    np.testing.assert_array_equal(array[0][finite], image[finite])


@pytest.mark.parametrize("shape, dtype, direction", [
    ((12, 16, 14), "float32", (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),   # negative determinant
    ((5, 7, 9), "float64", (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),     # permuted axes
    ((16, 14), "float32", None),                                                  # 2D NIfTI
    ((12, 16, 14), "int16", None),                                                # read by ITK
])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_nifti_voxels_match_simpleitk(tmp_path: Path, shape, dtype: str, direction, ending: str) -> None:
    # Float NIfTI voxels are read by autoseg itself (to keep NaN/Inf): same array as ITK's.
    import SimpleITK as sitk

    image, _ = phantoms.ellipsoid(shape)
    geom = phantoms.geometry(spacing=(2.0, 0.5, 0.7)[-len(shape):], direction=direction)
    path = phantoms.write_case_image(tmp_path / f"x{ending}", image.astype(dtype), geom)
    array, geometry = read_image(path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert array.dtype == expected.dtype and array.flags.writeable
    np.testing.assert_array_equal(array.reshape(expected.shape), expected)
    assert array.shape == (1, *((1,) if len(shape) == 2 else ()), *shape)
    assert geometry.direction == pytest.approx(geom.direction)


@pytest.mark.parametrize("ending, dtype", [(".nii.gz", "float32"), (".nii.gz", "int16"), (".nii", "int16"),
                                           (".nii", "float64")])
def test_truncated_nifti_is_refused(tmp_path: Path, ending: str, dtype: str) -> None:
    # ITK reads a truncated NIfTI without complaint and zero-fills the missing voxels.
    image, _ = phantoms.ellipsoid()
    path = phantoms.write_case_image(tmp_path / f"x{ending}", image.astype(dtype))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DatasetError, match="truncated"):
        read_image(path)


def test_multi_member_gzip_nifti_is_not_called_truncated(tmp_path: Path) -> None:
    # bgzip-style files end with a member whose trailer does not hold the whole size.
    image, _ = phantoms.ellipsoid()
    path = phantoms.write_case_image(tmp_path / "x.nii.gz", image.astype(np.int16))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    array, _ = read_image(path)
    np.testing.assert_array_equal(array[0], image.astype(np.int16))


# ----------------------------------------------------------------------------------------------
# Real data


def test_real_hippocampus_is_read(hippocampus: Path) -> None:
    spec, issues = load_dataset(hippocampus)
    assert _errors(issues) == []
    assert spec is not None and spec.layout == "msd"
    assert len(spec.cases) == 220
    declared = json.loads((hippocampus / "dataset.json").read_text())
    assert spec.num_training_declared == declared["numTraining"] == 220
    assert spec.channel_names == ("MRI",)
    assert [label.name for label in spec.labels] == ["background", "Anterior", "Posterior"]
