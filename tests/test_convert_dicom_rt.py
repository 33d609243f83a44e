"""``autoseg convert dicom-rt``: alias matching, polygon rasterisation, geometry, and whole conversions.

Synthetic patients are written with pydicom here (tiny CT slices with a non-square pixel spacing,
an RTSTRUCT with squares and circles of known area); the real fixtures in
``../shared/data/DICOM_RT_fixtures`` (see its SOURCE.md) check the area agreement on clinical
contours and the mismatched-frame and missing-slice messages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from autoseg.convert import contours as contour_core, dicom_rt
from autoseg.convert.contours import (
    build_alias_index,
    match_roi,
    overlap_counts,
    parse_roi_map,
    physical_to_index,
    polygon_area,
    priority_label_map,
    rasterize_contours,
    rasterize_polygons,
    series_geometry,
)
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry, read_image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


# ------------------------------------------------------------------------------------------------
# Synthetic DICOM writers
# ------------------------------------------------------------------------------------------------

def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


class SyntheticCt:
    """A tiny CT series: ``rows x cols`` slices at ``z`` positions, pixel spacing (row 0.8, col 1.0) mm."""

    def __init__(self, z: Sequence[float], rows: int = 24, cols: int = 20, spacing: tuple[float, float] = (0.8, 1.0),
                 origin_xy: tuple[float, float] = (-10.0, -12.0), frame: str | None = None) -> None:
        self.z, self.rows, self.cols, self.spacing, self.origin_xy = list(z), rows, cols, spacing, origin_xy
        self.frame = frame or generate_uid()
        self.series = generate_uid()
        self.study = generate_uid()
        self.sop_uids = [generate_uid() for _ in self.z]

    def hu(self, k: int) -> np.ndarray:
        """The HU values written for slice ``k`` (distinct per slice and pixel)."""
        yy, xx = np.mgrid[:self.rows, :self.cols]
        return (k * 100 + yy * 3 + xx - 500).astype(np.int16)

    def write(self, folder: Path, skip: Sequence[int] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Files named in reverse z order, so that name order is not slice order.
        for k, z in enumerate(self.z):
            if k in skip:
                continue
            ds = Dataset()
            ds.file_meta = _file_meta(CT_STORAGE, self.sop_uids[k])
            ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, self.sop_uids[k]
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = self.study, self.series, self.frame
            ds.Modality, ds.PatientID, ds.PatientName = "CT", "SYN", "Syn^Patient"
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [self.origin_xy[0], self.origin_xy[1], z]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = list(self.spacing)
            ds.SliceThickness = 2.5
            ds.Rows, ds.Columns = self.rows, self.cols
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = (self.hu(k).astype(np.int32) + 1024).astype(np.int16).tobytes()
            ds.save_as(folder / f"ct_{len(self.z) - k:03d}.dcm", enforce_file_format=True)

    def point(self, col: float, row: float, k: float) -> tuple[float, float, float]:
        """Patient coordinates (mm) of continuous index (col, row) on slice ``k`` (interpolated z)."""
        z = np.interp(k, range(len(self.z)), self.z)
        return (self.origin_xy[0] + col * self.spacing[1], self.origin_xy[1] + row * self.spacing[0], float(z))


def write_rtstruct(path: Path, ct: SyntheticCt, rois: dict[str, list[list[tuple[float, float, float]]]],
                   frame: str | None = None) -> None:
    """An RTSTRUCT with one ROI per entry; each contour is a list of patient points (mm)."""
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(RTSTRUCT_STORAGE, sop)
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ct.study, generate_uid()
    ds.Modality, ds.PatientID = "RTSTRUCT", "SYN"
    frame = frame or ct.frame
    series = Dataset()
    series.SeriesInstanceUID = ct.series
    study = Dataset()
    study.RTReferencedSeriesSequence = DicomSequence([series])
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ref.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    rois_seq, contours_seq = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        rois_seq.append(roi)
        items = []
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [round(float(v), 4) for p in points for v in p]
            items.append(contour)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = DicomSequence(items)
        contours_seq.append(roi_contour)
    ds.StructureSetROISequence = DicomSequence(rois_seq)
    ds.ROIContourSequence = DicomSequence(contours_seq)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def square(ct: SyntheticCt, k: int, c0: float, r0: float, c1: float, r1: float) -> list[tuple[float, float, float]]:
    return [ct.point(c0, r0, k), ct.point(c1, r0, k), ct.point(c1, r1, k), ct.point(c0, r1, k)]


def circle(ct: SyntheticCt, k: int, cc: float, rc: float, radius_mm: float,
           n: int = 64) -> list[tuple[float, float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x0, y0, z = ct.point(cc, rc, k)
    return [(x0 + radius_mm * np.cos(a), y0 + radius_mm * np.sin(a), z) for a in t]


def make_patient(root: Path, name: str = "P1", *, frame: str | None = None, skip: Sequence[int] = (),
                 rois: dict[str, list[list[tuple[float, float, float]]]] | None = None) -> SyntheticCt:
    """A patient folder with nested CT/ and RT/ subfolders (the LCTSC layout)."""
    ct = SyntheticCt(z=[-5.0, -2.5, 0.0, 2.5])
    ct.write(root / name / "study" / "CT", skip=skip)
    if rois is None:
        rois = {
            "Heart": [square(ct, 1, 2.5, 3.5, 9.5, 11.5)],                   # 7 x 8 = 56 pixels exactly
            "Lung L": [square(ct, 2, 1.5, 1.5, 11.5, 13.5), square(ct, 2, 4.5, 4.5, 7.5, 8.5)],  # hole: 120 - 12
            "BODY": [square(ct, 0, 0, 0, 19, 23)],
            "SpinalCord": [circle(ct, 3, 10, 12, 5.0), circle(ct, 3, 10, 12, 5.0)[::-1]],  # XOR of twins: empty
        }
    write_rtstruct(root / name / "study" / "RT" / "rs.dcm", ct, rois, frame=frame)
    (root / name / "study" / "VERSION").write_bytes(b"not a DICOM file\n")  # skipped, as DICOMDIR-side files are
    return ct


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def check_errors(root: Path) -> list[object]:
    from autoseg.planning import run as experiment

    return experiment.check(root, workers=1).errors


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Lung_L", "Lung L", "LungLeft", "L Lung", "Left Lung", "lung_l", "LUNG-L",
                                  "Lt Lung", "left  lung"])
def test_left_lung_aliases(name: str) -> None:
    assert match_roi(name, build_alias_index(dicom_rt.DEFAULT_ROI_MAP)) == "Lung_L"


@pytest.mark.parametrize("name, label", [("Lung R", "Lung_R"), ("Right Lung", "Lung_R"), ("HEART", "Heart"),
                                         ("Spinal Cord", "SpinalCord"), ("spinal_cord", "SpinalCord"),
                                         ("Oesophagus", "Esophagus"), ("Lung_L_PRV", None), ("Lungs", None),
                                         ("BODY", None)])
def test_alias_matching_is_exact_after_normalisation(name: str, label: str | None) -> None:
    assert match_roi(name, build_alias_index(dicom_rt.DEFAULT_ROI_MAP)) == label


def test_roi_map_collision_and_shape_errors() -> None:
    with pytest.raises(ConfigError, match="names both 'A' and 'B'"):
        build_alias_index({"A": ["heart"], "B": ["Heart "]})
    with pytest.raises(ConfigError, match="mapping"):
        parse_roi_map(["Heart"])
    with pytest.raises(ConfigError, match="not a list"):
        parse_roi_map({"Heart": [1, 2]})
    assert parse_roi_map({"Heart": "HRT", "Cord": None}) == {"Heart": ("HRT",), "Cord": ()}


def test_load_roi_map_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "map.yaml").write_text("Lung: [Lungs, Lung_Total]\nHeart: [Heart]\n")
    (tmp_path / "map.json").write_text(json.dumps({"Lung": ["Lungs"], "Heart": []}))
    assert list(contour_core.load_roi_map(tmp_path / "map.yaml")) == ["Lung", "Heart"]  # order kept
    assert contour_core.load_roi_map(tmp_path / "map.json")["Lung"] == ("Lungs",)
    with pytest.raises(ConfigError, match="not found"):
        contour_core.load_roi_map(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("Heart: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read the ROI map"):
        contour_core.load_roi_map(tmp_path / "bad.yaml")


def test_rasterize_square_fills_exact_pixels() -> None:
    mask = rasterize_polygons([np.array([[1.5, 2.5], [5.5, 2.5], [5.5, 4.5], [1.5, 4.5]])], (8, 8))
    expected = np.zeros((8, 8), dtype=bool)
    expected[3:5, 2:6] = True  # pixel centres with 1.5 <= x < 5.5 and 2.5 <= y < 4.5
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == polygon_area(np.array([[1.5, 2.5], [5.5, 2.5], [5.5, 4.5], [1.5, 4.5]])) == 8


def test_rasterize_orientation_and_vertex_order_do_not_matter() -> None:
    poly = np.array([[3.2, 1.1], [17.7, 4.3], [12.1, 15.9], [2.4, 11.0]])
    a = rasterize_polygons([poly], (20, 20))
    np.testing.assert_array_equal(a, rasterize_polygons([poly[::-1]], (20, 20)))
    np.testing.assert_array_equal(a, rasterize_polygons([np.roll(poly, 2, axis=0)], (20, 20)))


def test_rasterize_circle_area_within_one_percent() -> None:
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    poly = np.c_[50.3 + 30 * np.cos(t), 49.7 + 30 * np.sin(t)]
    mask = rasterize_polygons([poly], (100, 100))
    assert abs(mask.sum() - polygon_area(poly)) / polygon_area(poly) < 0.01


def test_rasterize_inner_contour_is_a_hole_and_twins_cancel() -> None:
    outer = np.array([[0.5, 0.5], [10.5, 0.5], [10.5, 10.5], [0.5, 10.5]])
    inner = np.array([[3.5, 3.5], [6.5, 3.5], [6.5, 6.5], [3.5, 6.5]])
    mask = rasterize_polygons([outer, inner], (12, 12))
    assert mask.sum() == 100 - 9 and not mask[5, 5] and mask[1, 1]
    assert not rasterize_polygons([outer, outer], (12, 12)).any()
    disjoint = rasterize_polygons([inner, inner + 5], (12, 12))
    assert disjoint.sum() == 18


def test_rasterize_clips_to_the_grid_and_ignores_degenerate() -> None:
    big = np.array([[-5.0, -5.0], [50.0, -5.0], [50.0, 3.5], [-5.0, 3.5]])
    mask = rasterize_polygons([big], (6, 7))
    assert mask[:4].all() and not mask[4:].any()
    assert not rasterize_polygons([np.array([[1.0, 1.0], [3.0, 3.0]])], (6, 7)).any()
    assert not rasterize_polygons([], (6, 7)).any()


def test_rasterize_matches_matplotlib_path_pixel_for_pixel() -> None:
    mpath = pytest.importorskip("matplotlib.path")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    centres = np.c_[xx.ravel(), yy.ravel()]
    for _ in range(20):  # random star-shaped (simple) polygons with sub-pixel vertices
        n = int(rng.integers(3, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(5, 28, n)
        poly = np.c_[32 + radii * np.cos(angles), 31.5 + radii * np.sin(angles)]
        ours = rasterize_polygons([poly], (64, 64))
        ref = mpath.Path(poly).contains_points(centres).reshape(64, 64)
        # matplotlib may disagree only for centres exactly on an edge (measure zero with random vertices).
        assert np.count_nonzero(ours != ref) == 0


def test_physical_to_index_with_rotated_direction() -> None:
    # Axes: i along -y, j along +x, k along +z (a 90-degree in-plane rotation).
    geometry = Geometry(spacing=(2.0, 0.5, 0.25), origin=(10.0, 20.0, -3.0),
                        direction=(0, 1, 0, -1, 0, 0, 0, 0, 1), ndim=3)
    index = np.array([[4.0, 6.0, 2.0]])
    d = np.array(geometry.direction, dtype=float).reshape(3, 3)
    point = np.array(geometry.origin) + d @ (index[0] * np.array([0.25, 0.5, 2.0]))
    np.testing.assert_allclose(physical_to_index(point[None], geometry), index, atol=1e-12)


def test_series_geometry_sorts_by_position_and_rejects_gaps() -> None:
    positions = [(0, 0, 5.0), (0, 0, -5.0), (0, 0, 0.0)]
    order, geometry = series_geometry(positions, (1, 0, 0, 0, 1, 0), (0.8, 1.0), 2.0, "s")
    assert order == [1, 2, 0]
    assert geometry.spacing == (5.0, 0.8, 1.0) and geometry.origin == (0.0, 0.0, -5.0)
    with pytest.raises(DatasetError, match="not evenly spaced.*a slice is missing"):
        series_geometry([(0, 0, 0.0), (0, 0, 2.5), (0, 0, 7.5)], (1, 0, 0, 0, 1, 0), (1, 1), 2.5, "s")
    with pytest.raises(DatasetError, match="share the position"):
        series_geometry([(0, 0, 0.0), (0, 0, 0.0)], (1, 0, 0, 0, 1, 0), (1, 1), 2.5, "s")
    _, single = series_geometry([(1, 2, 3.0)], (1, 0, 0, 0, 1, 0), (1, 1), 3.0, "s")
    assert single.spacing[0] == 3.0


def test_rasterize_contours_places_slices_and_reports_misses() -> None:
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 3)
    sq = lambda z: np.array([[1.5, 1.5, z], [4.5, 1.5, z], [4.5, 3.5, z], [1.5, 3.5, z]])  # noqa: E731
    raster = rasterize_contours([sq(12.0), sq(14.9), sq(30.0), sq(8.9)], geometry, (3, 6, 6))
    assert raster.used == 2 and raster.missed_z == (30.0, 8.9)
    assert raster.mask[1].sum() == 6 and raster.mask[2].sum() == 6 and not raster.mask[0].any()


def test_priority_map_and_overlaps() -> None:
    a = np.zeros((2, 3), bool)
    b = np.zeros((2, 3), bool)
    a[0, :2] = True
    b[0, 1:] = True
    labels = priority_label_map([a, None, b], (2, 3))
    np.testing.assert_array_equal(labels[0], [1, 3, 3])
    assert overlap_counts([a, None, b], ["A", "B", "C"]) == {("A", "C"): 1}


# ------------------------------------------------------------------------------------------------
# Whole conversions on synthetic patients
# ------------------------------------------------------------------------------------------------

def test_convert_synthetic_patient(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct = make_patient(src, "P1")
    before = tree_digest(src)
    progress: list[tuple[int, int]] = []
    summary = dicom_rt.run(src, tmp_path / "raw", progress=lambda d, t: progress.append((d, t)))
    assert summary.written == ("P1",) and progress == [(1, 1)]
    assert tree_digest(src) == before  # inputs untouched
    assert any("BODY" in w and "not in the ROI map" in w for w in summary.warnings)
    assert any("'Esophagus'" in w and "empty" in w for w in summary.warnings)

    image, geometry = read_image(tmp_path / "raw" / "imagesTr" / "P1_0000.nii.gz")
    label, label_geometry = read_image(tmp_path / "raw" / "labelsTr" / "P1.nii.gz")
    assert image.shape == label.shape == (1, 4, 24, 20)
    np.testing.assert_allclose(geometry.spacing, (2.5, 0.8, 1.0))
    np.testing.assert_allclose(geometry.origin, (-10.0, -12.0, -5.0))
    for k in range(4):  # slices in z order although the files are named in reverse
        np.testing.assert_array_equal(image[0, k], ct.hu(k))
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "Esophagus": 1, "Heart": 2, "Lung_L": 3, "Lung_R": 4, "SpinalCord": 5}
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 1
    heart = label[0] == 2
    assert heart.sum() == 56 and heart[1, 4:12, 3:10].all()  # rows 3.5..11.5 -> 4..11, cols 2.5..9.5 -> 3..9
    lung = label[0] == 3
    assert lung.sum() == 120 - 12 and not lung[2, 6, 6] and lung[2, 2, 2]
    assert not (label[0] == 5).any()  # twin contours cancel (XOR)
    assert check_errors(tmp_path / "raw") == []


def test_missing_slice_contour_warns_with_roi_and_z(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct = SyntheticCt(z=[-5.0, -2.5, 0.0, 2.5])
    make_patient(src, "P1", rois={"Heart": [square(ct, 1, 2.5, 3.5, 9.5, 11.5),
                                            [(p[0], p[1], 40.0) for p in square(ct, 1, 2.5, 3.5, 9.5, 11.5)]]})
    summary = dicom_rt.run(src, tmp_path / "raw")
    assert any("ROI 'Heart'" in w and "z = 40 mm" in w and "no CT slice" in w for w in summary.warnings)


def test_all_contours_off_the_ct_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct = SyntheticCt(z=[-5.0, -2.5, 0.0, 2.5])
    make_patient(src, "P1", rois={"Heart": [[(p[0], p[1], 90.0) for p in square(ct, 1, 2.5, 3.5, 9.5, 11.5)]]})
    with pytest.raises(DatasetError, match="patient P1: none of the contours.*lies on a slice"):
        dicom_rt.run(src, tmp_path / "raw")


def test_overlap_priority_vs_regions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct = SyntheticCt(z=[-5.0, -2.5, 0.0, 2.5])
    make_patient(src, "P1", rois={"Heart": [square(ct, 1, 2.5, 2.5, 8.5, 8.5)],        # 6 x 6
                                  "Lung_L": [square(ct, 1, 5.5, 5.5, 10.5, 10.5)]})   # 5 x 5, overlap 3 x 3
    prio = dicom_rt.run(src, tmp_path / "prio")
    label = read_image(tmp_path / "prio" / "labelsTr" / "P1.nii.gz")[0][0]
    assert (label == 3).sum() == 25 and (label == 2).sum() == 36 - 9  # Lung_L is later in the map: it wins
    assert any("9 voxel(s) belong to both 'Heart' and 'Lung_L'" in w and "'Lung_L' wins" in w for w in prio.warnings)

    regions = dicom_rt.run(src, tmp_path / "regions", overlap="regions")
    label = read_image(tmp_path / "regions" / "labelsTr" / "P1.nii.gz")[0][0]
    meta = json.loads((tmp_path / "regions" / "dataset.json").read_text())
    heart_values, lung_values = meta["labels"]["Heart"], meta["labels"]["Lung_L"]
    assert heart_values == [v for v in range(1, 32) if v & 2] and 6 in lung_values
    assert np.isin(label, heart_values).sum() == 36 and np.isin(label, lung_values).sum() == 25
    assert (label == 2 | 4).sum() == 9
    assert meta["regions_class_order"] == [1, 2, 4, 8, 16]
    assert regions.labels == meta["labels"]
    assert check_errors(tmp_path / "regions") == []


def test_resume_skips_done_patients_and_refuses_other_settings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_patient(src, "P1")
    make_patient(src, "P2")
    first = dicom_rt.run(src, tmp_path / "raw")
    assert first.written == ("P1", "P2")
    label = tmp_path / "raw" / "labelsTr" / "P2.nii.gz"
    label.unlink()  # as if killed before P2's label was written
    (tmp_path / "raw" / "labelsTr" / ".tmp-abc-P2.nii.gz").write_bytes(b"partial")
    again = dicom_rt.run(src, tmp_path / "raw")
    assert again.skipped == ("P1",) and again.written == ("P2",)
    assert not list((tmp_path / "raw" / "labelsTr").glob(".tmp-*"))
    with pytest.raises(ConfigError, match="other settings.*overlap"):
        dicom_rt.run(src, tmp_path / "raw", overlap="regions")


def test_frame_of_reference_mismatch_is_a_one_line_error(tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    make_patient(src, "P7", frame=generate_uid())
    result = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "patient P7" in lines[0] and "ROI 'Heart'" in lines[0] and "frame of reference" in lines[0]
    ok = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw2", "--allow-frame-mismatch")
    assert ok.exit_code == 0, ok.output
    assert "converted anyway" in ok.output


def test_series_with_a_missing_slice_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_patient(src, "P1", skip=[1])
    with pytest.raises(DatasetError, match="not evenly spaced.*a slice is missing"):
        dicom_rt.run(src, tmp_path / "raw")


def test_skip_invalid_patients(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_patient(src, "good")
    make_patient(src, "bad")
    next((src / "bad").rglob("rs.dcm")).unlink()
    with pytest.raises(DatasetError, match="patient bad: no RTSTRUCT"):
        dicom_rt.run(src, tmp_path / "raw")
    summary = dicom_rt.run(src, tmp_path / "raw2", skip_invalid=True)
    assert summary.written == ("good",) and summary.failed == ("bad",)
    assert json.loads((tmp_path / "raw2" / "dataset.json").read_text())["numTraining"] == 1
    assert check_errors(tmp_path / "raw2") == []


def test_roi_map_option_and_output_inside_source(tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    make_patient(src, "P1")
    (tmp_path / "map.yaml").write_text("Body: [BODY]\nCardiac: [heart]\n")
    result = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw", "--roi-map", tmp_path / "map.yaml")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "Body": 1, "Cardiac": 2}
    label = read_image(tmp_path / "raw" / "labelsTr" / "P1.nii.gz")[0][0]
    assert (label == 2).sum() == 56
    inside = cli("convert", "dicom-rt", src, "-o", src / "raw")
    assert inside.exit_code == 2 and "inside the input" in inside.output
    bad_mode = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw2", "--overlap", "union")
    assert bad_mode.exit_code == 2 and "unknown overlap mode 'union'" in bad_mode.output


# ------------------------------------------------------------------------------------------------
# Real fixtures (../shared/data/DICOM_RT_fixtures)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt_fixtures(shared_data: Path) -> Path:
    path = shared_data / "DICOM_RT_fixtures"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def _patient(tmp_path: Path, files: Sequence[Path], name: str) -> Path:
    """A source folder with one patient holding copies of ``files`` (the fixtures stay untouched)."""
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return tmp_path / "src"


def _ct_geometry(folder: Path) -> Geometry:
    files = dicom_rt.scan_patient(folder, "x")
    slices = next(iter(files.ct_series.values()))
    return series_geometry([s.position for s in slices], slices[0].orientation, slices[0].pixel_spacing,
                           slices[0].thickness, "x")[1]


def _area_errors(structures: dicom_rt.StructureSet, geometry: Geometry,
                 shape: tuple[int, int]) -> list[tuple[float, float, float]]:
    """(relative error, polygon area in pixels, |error| / perimeter in pixels) per contour."""
    rows = []
    for roi in structures.rois:
        for contour in roi.contours:
            xy = physical_to_index(contour, geometry)[:, :2]
            pixels = float(rasterize_polygons([xy], shape).sum())
            # Shoelace in mm^2, then mm^2 -> pixels through the pixel spacing.
            area = polygon_area(contour[:, :2]) / (geometry.spacing[1] * geometry.spacing[2])
            perimeter = float(np.hypot(*np.diff(np.vstack([xy, xy[:1]]), axis=0).T).sum())
            rows.append((abs(pixels - area) / area, area, abs(pixels - area) / perimeter))
    return rows


def test_real_contour_areas_match_shoelace(rt_fixtures: Path) -> None:
    """Every contour of the dicompyler breast RTSTRUCT (441 contours, 10 ROIs) on its CT's pixel grid.

    Contours of >= 2000 pixels (236) agree within 2 % (measured worst 0.72 %, median 0.05 %); below that the pixel
    sampling of the boundary dominates (a 560-pixel contour with a 100-pixel perimeter is off by up
    to ~3 %; one of 2 pixels rasterises to none), so every contour is held to the sampling bound
    |error| <= 0.5 x perimeter (measured 0.35 for 1-2 pixel contours, 0.16 above 50 pixels).
    The rt-utils phantom contours (26, >= 290 pixels) agree within 2 % (measured worst 1.74 %).
    """
    data = rt_fixtures / "dicompyler-core_example_data"
    geometry = _ct_geometry(data)
    rows = _area_errors(dicom_rt.read_structure_set(data / "rtss.dcm"), geometry, (512, 512))
    assert len(rows) == 441
    big = [r for r in rows if r[1] >= 2000]
    assert len(big) == 236 and max(r[0] for r in big) < 0.02
    assert max(r[2] for r in rows) < 0.5
    assert max(r[2] for r in rows if r[1] >= 50) < 0.25
    mock = rt_fixtures / "rt-utils_tests" / "mock_data"
    mock_geometry = _ct_geometry(mock)
    for name in ("rt.dcm", "non_existent_reference_rt.dcm", "invalid_reference_rt.dcm"):
        rows = _area_errors(dicom_rt.read_structure_set(mock / name), mock_geometry, (512, 512))
        assert rows and max(r[0] for r in rows) < 0.02, name


def test_real_breast_patient_converts(rt_fixtures: Path, tmp_path: Path) -> None:
    data = rt_fixtures / "dicompyler-core_example_data"
    src = _patient(tmp_path, [data / "ct.0.dcm", data / "rtss.dcm", data / "rtplan.dcm"], "breast")
    summary = dicom_rt.run(src, tmp_path / "raw", {"Body": ["BODY"], "Lung_L": ["Lt Lung"]})
    assert summary.written == ("breast",)
    assert any("ROI 'Lt Lung'" in w and "lie on no CT slice" in w for w in summary.warnings)
    assert any("not in the ROI map" in w and "Heart" in w for w in summary.warnings)
    label = read_image(tmp_path / "raw" / "labelsTr" / "breast.nii.gz")[0][0]
    geometry = _ct_geometry(data)
    body = next(r for r in dicom_rt.read_structure_set(data / "rtss.dcm").rois if r.name == "BODY")
    on_slice = [c for c in body.contours if abs(c[0, 2] - 168.56) < 0.1]
    expected = np.zeros((512, 512), dtype=bool)
    for contour in on_slice:  # XOR of the individual fills
        expected ^= rasterize_polygons([physical_to_index(contour, geometry)[:, :2]], (512, 512))
    np.testing.assert_array_equal(label[0] == 1, expected)
    area = sum(polygon_area(c[:, :2]) for c in on_slice) / (geometry.spacing[1] * geometry.spacing[2])
    assert abs(expected.sum() - area) / area < 0.02  # the BODY contours here are disjoint
    assert check_errors(tmp_path / "raw") == []


def test_real_default_map_all_contours_off_slice_is_a_clear_error(rt_fixtures: Path, tmp_path: Path, cli) -> None:
    data = rt_fixtures / "dicompyler-core_example_data"
    src = _patient(tmp_path, [data / "ct.0.dcm", data / "rtss.dcm"], "breast")
    result = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "patient breast: none of the contours" in result.output


def test_real_mismatched_frame_fixture(rt_fixtures: Path, tmp_path: Path, cli) -> None:
    mock = rt_fixtures / "rt-utils_tests" / "mock_data"
    src = _patient(tmp_path, [mock / "ct_1.dcm", mock / "ct_2.dcm", mock / "rt.dcm"], "phantom")
    (tmp_path / "map.yaml").write_text("Phantom: [ROI-1]\n")
    result = cli("convert", "dicom-rt", src, "-o", tmp_path / "raw", "--roi-map", tmp_path / "map.yaml")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "patient phantom: ROI 'ROI-1' of rt.dcm is in frame of reference 1.2.826.0.1.3680043.8.498.4132" in line
    assert "--allow-frame-mismatch" in line

    summary = dicom_rt.run(src, tmp_path / "raw2", {"Phantom": ["ROI-1"]}, allow_frame_mismatch=True)
    label = read_image(tmp_path / "raw2" / "labelsTr" / "phantom.nii.gz")[0][0]
    assert any("converted anyway" in w for w in summary.warnings)
    assert label[0].any() and not label[1].any()  # both contours lie on ct_1 (z = 60)


@pytest.mark.parametrize("rtstruct", ["non_existent_reference_rt.dcm", "invalid_reference_rt.dcm"])
def test_real_missing_slice_fixture_warns(rt_fixtures: Path, tmp_path: Path, rtstruct: str) -> None:
    mock = rt_fixtures / "rt-utils_tests" / "mock_data"
    src = _patient(tmp_path, [mock / "ct_1.dcm", mock / "ct_2.dcm", mock / rtstruct], "phantom")
    roi_map = {f"R{i}": [f"ROI-{i}"] for i in range(1, 5)}
    summary = dicom_rt.run(src, tmp_path / "raw", roi_map)
    missed = [w for w in summary.warnings if "lie on no CT slice" in w]
    assert len(missed) == 4 and all("z = 70 mm" in w for w in missed)
    assert {w.split("ROI ")[1].split(":")[0] for w in missed} == {"'ROI-1'", "'ROI-2'", "'ROI-3'", "'ROI-4'"}
    label = read_image(tmp_path / "raw" / "labelsTr" / "phantom.nii.gz")[0][0]
    assert label[0].any() and label[1].any()
    assert check_errors(tmp_path / "raw") == []


def test_truncated_ct_slice_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_patient(src, "P1")
    victim = sorted((src / "P1").rglob("ct_*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-400])  # header intact, pixel data cut short
    with pytest.raises(DatasetError, match=f"{victim.name}: cannot read the CT slice's pixels"):
        dicom_rt.run(src, tmp_path / "raw")


@pytest.mark.slow
def test_real_contours_rasterise_as_matplotlib_path(rt_fixtures: Path) -> None:
    """An independent point-in-polygon test (matplotlib.path) fills the same pixels for all 441 contours (~4 s)."""
    mpath = pytest.importorskip("matplotlib.path")
    data = rt_fixtures / "dicompyler-core_example_data"
    geometry = _ct_geometry(data)
    differing = 0
    for roi in dicom_rt.read_structure_set(data / "rtss.dcm").rois:
        for contour in roi.contours:
            xy = physical_to_index(contour, geometry)[:, :2]
            ours = rasterize_polygons([xy], (512, 512))
            x0, y0 = np.maximum(np.floor(xy.min(axis=0)).astype(int), 0)
            x1, y1 = np.minimum(np.ceil(xy.max(axis=0)).astype(int) + 1, 512)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            ref = mpath.Path(xy).contains_points(np.c_[xx.ravel(), yy.ravel()]).reshape(yy.shape)
            differing += int(np.count_nonzero(ours[y0:y1, x0:x1] != ref))
            differing += int(ours.sum() - ours[y0:y1, x0:x1].sum())  # nothing outside the bounding box
    assert differing == 0
