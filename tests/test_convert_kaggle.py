"""``autoseg convert kaggle-uwmgi``: RLE decoding, slice names, and conversions of a synthetic copy of
the competition layout (16-bit PNGs written with SimpleITK, a train.csv with RLE encoded here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.convert import kaggle_uwmgi
from autoseg.convert.kaggle_uwmgi import CLASSES, class_masks, parse_slice_name, rle_decode, rle_encode
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import read_image


def naive_rle(mask: np.ndarray) -> str:
    """The competition's encoding written out longhand (independent of the library's encoder)."""
    runs: list[int] = []
    flat = [bool(v) for v in np.asarray(mask).reshape(-1)]  # row-major over H rows x W columns
    i = 0
    while i < len(flat):
        if flat[i]:
            start = i
            while i < len(flat) and flat[i]:
                i += 1
            runs += [start + 1, i - start]  # 1-indexed start, run length
        else:
            i += 1
    return " ".join(str(v) for v in runs)


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------

def test_rle_decode_is_one_indexed_and_row_major() -> None:
    mask = rle_decode("1 3 7 2", height=2, width=4)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [0, 0, 1, 1]])
    assert not rle_decode("", 2, 4).any() and not rle_decode("   ", 2, 4).any()


def test_rle_round_trip_and_independent_encoder() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((7, 11)) < rng.uniform(0.05, 0.95)
        assert rle_encode(mask) == naive_rle(mask)
        np.testing.assert_array_equal(rle_decode(naive_rle(mask), 7, 11), mask)
    full = np.ones((3, 5), dtype=bool)
    assert rle_encode(full) == "1 15" and rle_decode("1 15", 3, 5).all()


@pytest.mark.parametrize("rle, message", [
    ("1 3 7", "not start/length pairs"),
    ("1 x", "not a non-negative integer"),
    ("1 -3", "not a non-negative integer"),
    ("0 3", "1-indexed"),
    ("4 0", "length 0"),
    ("7 3", "beyond the 2x4 = 8 pixels"),
    ("5 2 1 2", "overlap or are out of order"),
    ("1 3 2 2", "overlap or are out of order"),
])
def test_rle_decode_rejects_malformed(rle: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, 2, 4)


def test_parse_slice_name() -> None:
    parsed = parse_slice_name(Path("x/slice_0042_360_310_1.63_1.50.png"))
    assert parsed is not None
    fields = (parsed.number, parsed.width, parsed.height, parsed.pixel_width, parsed.pixel_height)
    assert fields == (42, 360, 310, 1.63, 1.5)
    assert parse_slice_name(Path("slice_0042.png")) is None


# ------------------------------------------------------------------------------------------------
# Synthetic competition folder
# ------------------------------------------------------------------------------------------------

class Competition:
    """Writes ``train/case*/case*_day*/scans/*.png`` and ``train.csv``; keeps the truth."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[dict[str, str]] = []
        self.images: dict[str, np.ndarray] = {}
        self.masks: dict[str, dict[str, np.ndarray]] = {}
        self.rng = np.random.default_rng(7)

    def add_case_day(self, case_day: str, numbers: list[int], width: int, height: int, pw: float = 1.5,
                     ph: float = 1.5, rows: bool = True) -> None:
        import SimpleITK as sitk

        case = case_day.split("_")[0]
        folder = self.root / "train" / case / case_day / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        planes, masks = [], {c: [] for c in CLASSES}
        for number in numbers:
            image = self.rng.integers(0, 40000, size=(height, width)).astype(np.uint16)
            sitk.WriteImage(sitk.GetImageFromArray(image),
                            str(folder / f"slice_{number:04d}_{width}_{height}_{pw:.2f}_{ph:.2f}.png"))
            planes.append(image)
            large = np.zeros((height, width), dtype=bool)
            small = np.zeros((height, width), dtype=bool)
            stomach = np.zeros((height, width), dtype=bool)
            if number % 2:  # every other slice annotated; the bowels overlap in a 2 x 3 block
                large[1:5, 1:6] = True
                small[3:7, 3:8] = True
                stomach[height - 2:, :2] = True
            for cls, mask in zip(CLASSES, (large, small, stomach)):
                masks[cls].append(mask)
                if rows:
                    self.rows.append({"id": f"{case_day}_slice_{number:04d}", "class": cls,
                                      "segmentation": naive_rle(mask)})
        self.images[case_day] = np.stack(planes)
        self.masks[case_day] = {c: np.stack(m) for c, m in masks.items()}

    def write_csv(self, extra: list[dict[str, str]] = ()) -> Path:  # type: ignore[assignment]
        path = self.root / "train.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "class", "segmentation"])
            writer.writeheader()
            writer.writerows([*self.rows, *extra])
        return path


@pytest.fixture
def competition(tmp_path: Path) -> Competition:
    comp = Competition(tmp_path / "uwmgi")
    comp.add_case_day("case1_day0", [1, 2, 3, 4], width=12, height=10)   # W != H catches a swap
    comp.add_case_day("case1_day3", [1, 2, 3], width=8, height=8, pw=1.63, ph=1.63)
    comp.add_case_day("case22_day1", [10, 11], width=9, height=7, rows=False)  # unannotated (a test case)
    return comp


def test_convert_synthetic_competition(competition: Competition, tmp_path: Path) -> None:
    competition.write_csv(extra=[
        {"id": "case1_day0_slice_0009", "class": "stomach", "segmentation": "1 4"},     # slice without image
        {"id": "case9_day9_slice_0001", "class": "stomach", "segmentation": ""},        # case-day without folder
    ])
    progress: list[tuple[int, int]] = []
    summary = kaggle_uwmgi.run(competition.root, tmp_path / "raw", progress=lambda d, t: progress.append((d, t)))
    assert summary.written == ("case1_day0", "case1_day3") and progress[-1] == (2, 2)
    text = "\n".join(summary.warnings)
    assert "line 23 id case1_day0_slice_0009" in text and "case9_day9" in text
    assert "case22_day1" in text and "unannotated" in text

    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "large_bowel": [1, 3, 5, 7], "small_bowel": [2, 3, 6, 7],
                              "stomach": [4, 5, 6, 7]}
    assert list(meta["labels"]) == ["background", *CLASSES]  # order pairs with regions_class_order
    assert meta["regions_class_order"] == [1, 2, 4] and meta["channel_names"] == {"0": "MRI"}
    assert meta["numTraining"] == 2

    for case_day in ("case1_day0", "case1_day3"):
        image, geometry = read_image(tmp_path / "raw" / "imagesTr" / f"{case_day}_0000.nii.gz")
        label, _ = read_image(tmp_path / "raw" / "labelsTr" / f"{case_day}.nii.gz")
        np.testing.assert_array_equal(image[0], competition.images[case_day])
        assert image.dtype == np.uint16 and label.dtype == np.uint8
        for cls, mask in class_masks(label[0]).items():
            np.testing.assert_array_equal(mask, competition.masks[case_day][cls])
        pixel = 1.5 if case_day == "case1_day0" else 1.63
        np.testing.assert_allclose(geometry.spacing, (3.0, pixel, pixel))
    label = read_image(tmp_path / "raw" / "labelsTr" / "case1_day0.nii.gz")[0][0]
    assert (label == 3).sum() == 2 * 6  # large & small bowel overlap: 2 x 3 pixels on 2 slices

    from autoseg.planning import run as experiment

    assert experiment.check(tmp_path / "raw", workers=1).errors == []


def test_slice_spacing_option_and_resume(competition: Competition, tmp_path: Path, cli) -> None:
    competition.write_csv()
    raw = tmp_path / "raw"
    result = cli("convert", "kaggle-uwmgi", competition.root, "-o", raw, "--slice-spacing", "2.5")
    assert result.exit_code == 0, result.output
    assert "2 case-day(s) converted" in result.output
    _, geometry = read_image(raw / "imagesTr" / "case1_day0_0000.nii.gz")
    assert geometry.spacing[0] == 2.5
    again = kaggle_uwmgi.run(competition.root, raw, 2.5)
    assert again.skipped == ("case1_day0", "case1_day3") and not again.written
    with pytest.raises(ConfigError, match="other settings.*slice_spacing"):
        kaggle_uwmgi.run(competition.root, raw, 3.0)
    with pytest.raises(ConfigError, match="positive"):
        kaggle_uwmgi.run(competition.root, tmp_path / "other", 0.0)


def test_malformed_rle_names_the_row(competition: Competition, tmp_path: Path, cli) -> None:
    competition.rows[4]["segmentation"] = "100 50"  # beyond a 12 x 10 slice
    competition.write_csv()
    result = cli("convert", "kaggle-uwmgi", competition.root, "-o", tmp_path / "raw")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "line 6 (id case1_day0_slice_0002, class small_bowel): RLE run 100 50 ends at pixel 149" in line
    assert "--skip-invalid" in line
    summary = kaggle_uwmgi.run(competition.root, tmp_path / "raw2", skip_invalid=True)
    assert summary.written == ("case1_day3",) and summary.failed == ("case1_day0",)


def test_unknown_class_and_bad_ids(competition: Competition, tmp_path: Path) -> None:
    competition.rows[0]["class"] = "liver"
    competition.write_csv()
    with pytest.raises(DatasetError, match=r"line 2 \(id case1_day0_slice_0001, class liver\): class 'liver' is not"):
        kaggle_uwmgi.run(competition.root, tmp_path / "raw")
    competition.rows[0]["class"] = "stomach"
    competition.write_csv(extra=[{"id": "slice_0001", "class": "stomach", "segmentation": ""}])
    with pytest.raises(DatasetError, match="id not of the form"):
        kaggle_uwmgi.run(competition.root, tmp_path / "raw")
    summary = kaggle_uwmgi.run(competition.root, tmp_path / "raw", skip_invalid=True)
    assert any("'slice_0001'" in w for w in summary.warnings)


def test_layout_errors(tmp_path: Path, competition: Competition) -> None:
    with pytest.raises(DatasetError, match="train.csv: not found"):
        kaggle_uwmgi.run(competition.root, tmp_path / "raw")
    (competition.root / "train.csv").write_text("image,label\nx,y\n")
    with pytest.raises(DatasetError, match="id, class, segmentation"):
        kaggle_uwmgi.run(competition.root, tmp_path / "raw")
    competition.write_csv()
    with pytest.raises(ConfigError, match="inside the input"):
        kaggle_uwmgi.run(competition.root, competition.root / "raw")


def test_png_size_must_match_its_name(competition: Competition, tmp_path: Path) -> None:
    competition.write_csv()
    scans = competition.root / "train" / "case1" / "case1_day3" / "scans"
    original = scans / "slice_0002_8_8_1.63_1.63.png"
    original.rename(scans / "slice_0002_8_9_1.63_1.63.png")
    with pytest.raises(DatasetError, match="slice is 8x9 but slice_0001_8_8_1.63_1.63.png is 8x8"):
        kaggle_uwmgi.run(competition.root, tmp_path / "raw")
