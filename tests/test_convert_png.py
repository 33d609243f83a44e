"""``autoseg convert png-masks``: value maps, pairing, conversions of synthetic folders, and the real
ISBI 2012 EM membrane data (``../shared/data/ISBI2012_EM_membrane``, skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.convert import png_masks
from autoseg.convert.png_masks import (
    apply_value_map,
    label_table,
    pair_files,
    parse_label_names,
    parse_value_map,
    suggest_map,
)
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import read_image


def check_errors(root: Path) -> list[object]:
    from autoseg.planning import run as experiment

    return experiment.check(root, workers=1).errors


def write_png(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 3)
    sitk.WriteImage(image, str(path))


def make_folders(root: Path, names: tuple[str, ...] = ("a1", "a2", "a10"), mask_values: tuple[int, ...] = (0, 255),
                 rgb: bool = False, mask_suffix: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    truth = {}
    for name in names:
        shape = (9, 13, 3) if rgb else (9, 13)
        image = rng.integers(0, 256, size=shape).astype(np.uint8)
        mask = rng.choice(np.array(mask_values, dtype=np.uint8), size=(9, 13))
        write_png(root / "images" / f"{name}.png", image)
        write_png(root / "masks" / f"{name}{mask_suffix}.png", mask)
        truth[name] = (image, mask)
    return truth


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------

def test_parse_value_map() -> None:
    assert parse_value_map(["255=1"]) == {255: 1}
    assert parse_value_map(["128=2,255=1", "64:3"]) == {128: 2, 255: 1, 64: 3}
    with pytest.raises(ConfigError, match="MASK_VALUE=LABEL"):
        parse_value_map(["255"])
    with pytest.raises(ConfigError, match="mapped to both"):
        parse_value_map(["255=1", "255=2"])
    with pytest.raises(ConfigError, match="required"):
        parse_value_map([])
    assert parse_label_names(["1=cell", "2 = nucleus"]) == {1: "cell", 2: "nucleus"}
    with pytest.raises(ConfigError, match="LABEL=NAME"):
        parse_label_names(["cell"])


def test_apply_value_map_keeps_zero_as_background_unless_mapped() -> None:
    mask = np.array([[0, 255], [128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(apply_value_map(mask, {255: 1, 128: 2}), [[0, 1], [2, 1]])
    np.testing.assert_array_equal(apply_value_map(mask, {0: 1, 255: 0, 128: 0}), [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"mask values \[128\] are not mapped"):
        apply_value_map(mask, {255: 1})


def test_label_table_and_suggestion() -> None:
    assert label_table({255: 1}) == {"background": 0, "foreground": 1}
    assert label_table({255: 1}, {1: "cell"}) == {"background": 0, "cell": 1}
    assert label_table({1: 1, 2: 2}) == {"background": 0, "label_1": 1, "label_2": 2}
    with pytest.raises(ConfigError, match="without gaps"):
        label_table({255: 2})
    with pytest.raises(ConfigError, match="does not produce"):
        label_table({255: 1}, {2: "x"})
    assert suggest_map([0, 255]) == "--map 255=1"
    assert suggest_map([0, 50, 100]) == "--map 50=1 --map 100=2"


def test_pair_files(tmp_path: Path) -> None:
    images = [tmp_path / "i" / n for n in ("a1.png", "a2.png", "a10.png")]
    masks = [tmp_path / "m" / n for n in ("a1_mask.png", "a2_mask.png", "a10_mask.png")]
    pairs = pair_files(images, masks, "name", "_mask")
    assert [(c, m.name) for c, _, m in pairs] == [("a1", "a1_mask.png"), ("a2", "a2_mask.png"), ("a10", "a10_mask.png")]
    with pytest.raises(DatasetError, match="image\\(s\\) without mask: a1.png.*mask\\(s\\) without image"):
        pair_files(images, masks, "name")
    assert [m.name for _, _, m in pair_files(images, masks, "order")] == [m.name for m in masks]
    with pytest.raises(DatasetError, match="3 images but 2 masks"):
        pair_files(images, masks[:2], "order")


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------

def test_convert_synthetic_folder(tmp_path: Path) -> None:
    truth = make_folders(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    summary = png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "raw", {255: 1},
                            channel_names=["EM"], label_names={1: "cell"})
    assert summary.written == ("a1", "a2", "a10")
    assert {p: p.read_bytes() for p in before} == before  # inputs untouched
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cell": 1} and meta["channel_names"] == {"0": "EM"}
    assert meta["file_ending"] == ".png" and meta["numTraining"] == 3
    for name, (image, mask) in truth.items():
        got_image, geometry = read_image(tmp_path / "raw" / "imagesTr" / f"{name}_0000.png")
        got_label, _ = read_image(tmp_path / "raw" / "labelsTr" / f"{name}.png")
        np.testing.assert_array_equal(got_image[0, 0], image)
        np.testing.assert_array_equal(got_label[0, 0], (mask == 255).astype(np.uint8))
        assert geometry.ndim == 2
    assert check_errors(tmp_path / "raw") == []
    again = png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "raw", {255: 1})
    assert again.skipped == ("a1", "a2", "a10")


def test_unmapped_values_error_before_writing(tmp_path: Path, cli) -> None:
    make_folders(tmp_path, mask_values=(0, 128, 255))
    result = cli("convert", "png-masks", tmp_path / "images", tmp_path / "masks", "-o", tmp_path / "raw",
                 "--map", "255=1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "mask values [128] are not mapped (values found: [0, 128, 255]" in line
    assert "--map 128=1 --map 255=2" in line
    assert not (tmp_path / "raw").exists()
    ok = cli("convert", "png-masks", tmp_path / "images", tmp_path / "masks", "-o", tmp_path / "raw",
             "--map", "128=1", "--map", "255=2", "--label-name", "1=inner", "--label-name", "2=outer")
    assert ok.exit_code == 0, ok.output
    assert "3 image(s) converted" in ok.output
    assert check_errors(tmp_path / "raw") == []


def test_nifti_output_rgb_and_suffix(tmp_path: Path) -> None:
    truth = make_folders(tmp_path, rgb=True, mask_suffix="_mask")
    summary = png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "raw", {255: 1},
                            mask_suffix="_mask", file_ending=".nii.gz")
    assert summary.num_cases == 3
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".nii.gz"
    green, _ = read_image(tmp_path / "raw" / "imagesTr" / "a2_0001.nii.gz")
    np.testing.assert_array_equal(green[0, 0], truth["a2"][0][..., 1])
    assert check_errors(tmp_path / "raw") == []


def test_mask_size_mismatch_and_bad_options(tmp_path: Path) -> None:
    make_folders(tmp_path)
    write_png(tmp_path / "masks" / "a2.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(DatasetError, match="a2.png: mask is 5x5 but its image a2.png is 13x9"):
        png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "raw", {255: 1})
    with pytest.raises(ConfigError, match="file-ending"):
        png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "raw2", {255: 1}, file_ending=".jpg")
    with pytest.raises(ConfigError, match="inside the input"):
        png_masks.run(tmp_path / "images", tmp_path / "masks", tmp_path / "images" / "raw", {255: 1})
    with pytest.raises(DatasetError, match="folder not found"):
        png_masks.run(tmp_path / "nope", tmp_path / "masks", tmp_path / "raw3", {255: 1})


def test_real_isbi_membranes_pass_check(shared_data: Path, tmp_path: Path, cli) -> None:
    """ISBI 2012: masks 0 = membrane, 255 = cell interior (SOURCE.md); membranes made the foreground."""
    train = shared_data / "ISBI2012_EM_membrane" / "train"
    if not train.is_dir():
        pytest.skip(f"{train} is absent")
    result = cli("convert", "png-masks", train / "image", train / "label", "-o", tmp_path / "raw", "--map", "0=1",
                 "--map", "255=0", "--label-name", "1=membrane", "--channel-name", "EM", "--name", "ISBI2012")
    assert result.exit_code == 0, result.output
    assert "30 image(s) converted" in result.output
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "membrane": 1} and meta["numTraining"] == 30
    label, _ = read_image(tmp_path / "raw" / "labelsTr" / "0.png")
    membrane = float(label.mean())
    assert 0.1 < membrane < 0.35  # about 22 % of the pixels are membrane (SOURCE.md: 78 % are 255)
    assert check_errors(tmp_path / "raw") == []


# ------------------------------------------------------------------------------------------------
# Lossy (JPEG) images and masks, as Kaggle-style 2D sets ship them (Kvasir-SEG)
# ------------------------------------------------------------------------------------------------

def _jpeg_folders(root: Path) -> dict[str, np.ndarray]:
    """RGB JPEG images and JPEG-compressed 0/255 masks (grey levels appear around 0 and 255)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(5)
    truth = {}
    for name in ("p1", "p2"):
        mask = np.zeros((32, 40), np.uint8)
        mask[8:20, 10 + int(name[1]):30] = 255
        image = rng.integers(0, 256, size=(32, 40, 3)).astype(np.uint8)
        for folder, array in (("images", image), ("masks", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(root / folder / f"{name}.jpg"))
        truth[name] = mask
    return truth


def test_jpeg_masks_are_recognised_and_thresholded(cli, tmp_path: Path) -> None:
    truth = _jpeg_folders(tmp_path)
    stored = np.unique(read_image(tmp_path / "masks" / "p1.jpg")[0])
    assert png_masks.looks_lossy_binary(list(stored)), stored  # the fixture really is lossy

    # Mapping the grey levels one by one is the wrong advice: the error says to threshold.
    mapped = cli("convert", "png-masks", tmp_path / "images", tmp_path / "masks", "-o", tmp_path / "raw",
                 "--map", "255=1")
    assert mapped.exit_code == 1 and "look like a 0/255 mask saved lossily" in mapped.output, mapped.output
    assert "use --threshold 128" in mapped.output and "Traceback" not in mapped.output
    assert not (tmp_path / "raw").exists()

    done = cli("convert", "png-masks", tmp_path / "images", tmp_path / "masks", "-o", tmp_path / "raw",
               "--threshold", "128")
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "foreground": 1} and meta["file_ending"] == ".png"
    for name, mask in truth.items():
        label = read_image(tmp_path / "raw" / "labelsTr" / f"{name}.png")[0][0, 0]
        assert set(np.unique(label)) == {0, 1}
        assert np.mean(label == (mask > 0)) > 0.98  # JPEG moves edges by a pixel at most
    assert check_errors(tmp_path / "raw") == []


def test_threshold_and_map_rules() -> None:
    assert parse_value_map([], threshold=128) == {1: 1}
    assert parse_value_map(["1=1", "0=0"], threshold=128) == {1: 1, 0: 0}
    with pytest.raises(ConfigError, match="thresholded masks hold only 0 and 1"):
        parse_value_map(["255=1"], threshold=128)
    assert png_masks.looks_lossy_binary([0, 1, 3, 8, 247, 252, 255])
    assert not png_masks.looks_lossy_binary([0, 255])  # a clean mask
    assert not png_masks.looks_lossy_binary([0, 1, 2, 3])  # a label map


def test_jpeg_label_maps_in_a_dataset_are_an_error_naming_the_fix(cli, tmp_path: Path) -> None:
    _jpeg_folders(tmp_path)
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("p1", "p2"):
        (root / "imagesTr" / f"{name}_0000.jpg").write_bytes((tmp_path / "images" / f"{name}.jpg").read_bytes())
        (root / "labelsTr" / f"{name}.jpg").write_bytes((tmp_path / "masks" / f"{name}.jpg").read_bytes())
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "endoscopy"}, "labels": {
        "background": 0, "polyp": 1}, "numTraining": 2, "file_ending": ".jpg"}))
    result = cli("check", root, "-j", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "the label maps are JPEG" in text and "--threshold 128" in text, result.output


def test_second_conversion_into_the_same_folder_is_refused(cli, tmp_path: Path) -> None:
    make_folders(tmp_path / "a")
    make_folders(tmp_path / "b", names=("b1", "b2"))
    out = tmp_path / "raw"
    first = cli("convert", "png-masks", tmp_path / "a" / "images", tmp_path / "a" / "masks", "-o", out, "--map", "255=1")
    assert first.exit_code == 0, first.output
    before = (out / "dataset.json").read_text()
    again = cli("convert", "png-masks", tmp_path / "a" / "images", tmp_path / "a" / "masks", "-o", out, "--map", "255=1")
    assert again.exit_code == 0, again.output  # the same inputs: a resume
    other = cli("convert", "png-masks", tmp_path / "b" / "images", tmp_path / "b" / "masks", "-o", out, "--map", "255=1")
    assert other.exit_code != 0 and "would merge two datasets" in " ".join(other.output.split()), other.output
    assert (out / "dataset.json").read_text() == before
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a1.png", "a10.png", "a2.png"]
