"""``autoseg predict`` on DICOM series: input discovery, geometry, DICOM SEG output, errors.

Synthetic series are written with pydicom (a rotated, anisotropic CT series whose files are not
named in slice order); the real series in ``../shared/data`` (TotalSegmentator's CT example,
TCIA Brain-Tumor-Progression MR; see their SOURCE.md) are used when present. Networks have random
weights: what is tested is where predictions go and how they are encoded.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import phantoms
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry, dicom_series_files, read_image, read_info
from autoseg.inference.inputs import find_input_cases
from autoseg.inference.run import run
from test_predict import _assert_clean_failure, _experiment, _image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: A rotation of 30° about the patient's z axis: row and column directions of every slice.
ANGLE = math.pi / 6
ROW = (math.cos(ANGLE), math.sin(ANGLE), 0.0)
COL = (-math.sin(ANGLE), math.cos(ANGLE), 0.0)


def write_series(folder: Path, volume: np.ndarray, spacing: Sequence[float] = (2.5, 0.8, 0.9),
                 origin: Sequence[float] = (12.5, -40.25, 7.125), *, study: str | None = None,
                 series: str | None = None, blank_uids: bool = False, rescale: tuple[float, float] = (1.0, 0.0),
                 bits_stored: int = 16, signed: bool = True) -> list[str]:
    """Write a ``(Z, Y, X)`` int16 volume as single-frame CT slices; returns the SOPInstanceUIDs by z.

    ``spacing`` is (z, y, x) in mm; slice ``z`` lies at ``origin + z * spacing[0] * normal``. Files
    are named in reverse slice order, so that name order is not slice order. ``rescale`` is
    (slope, intercept): the volume's values are stored as ``(value - intercept) / slope``, in
    ``bits_stored`` bits of 16, ``signed`` or not (they must fit).
    """
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(ROW, COL)
    study, series, frame = study or generate_uid(), series or generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(volume.shape[0])]
    for z in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_STORAGE, uids[z]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = (CT_STORAGE, uids[z]) if not blank_uids else ("", "")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = (study, series) if not blank_uids else ("", "")
        ds.FrameOfReferenceUID = frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.StudyID = "CT", "SYN", "Syn^Patient", "1"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.AccessionNumber = "", "O", "", ""
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240101", "120000", 1, z + 1
        ds.Manufacturer = "synthetic"
        position = np.asarray(origin) + z * spacing[0] * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*ROW, *COL)]
        ds.PixelSpacing = [spacing[1], spacing[2]]  # between rows (y), between columns (x)
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        stored = np.rint((volume[z] - rescale[1]) / rescale[0])
        ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16 if signed else np.uint16).tobytes()
        ds.save_as(folder / f"slice_{volume.shape[0] - z:03d}.dcm", enforce_file_format=True)
    return uids


def _volume(shape: tuple[int, int, int] = (10, 23, 19), seed: int = 3) -> np.ndarray:
    image, _ = phantoms.ellipsoid(shape, seed=seed)
    return np.round(image).astype(np.int16)


def _expected_direction() -> tuple[float, ...]:
    # ITK's direction matrix has the row, column and slice-normal directions as its columns.
    columns = np.stack([ROW, COL, np.cross(ROW, COL)], axis=1)
    return tuple(float(v) for v in columns.ravel())


def _assert_same_geometry(geometry: Geometry, expected: Geometry, atol: float = 1e-5) -> None:
    # NIfTI stores the affine in float32: equal to the series' geometry within float32 precision.
    assert geometry.ndim == expected.ndim
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(geometry, field), getattr(expected, field), atol=atol, err_msg=field)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D experiment (labels shell and core) with two 3d_fullres folds of random weights."""
    return _experiment(tmp_path_factory.mktemp("dcm"), phantoms.write_nnunet_dataset, {"3d_fullres": (0, 1)},
                       shape=(16, 14, 12), spacing=(2.5, 0.8, 0.9))


@pytest.fixture(scope="module")
def coarse_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model planned at 6 mm, so that real 512 x 512 series take a few hundred windows."""
    return _experiment(tmp_path_factory.mktemp("coarse"), phantoms.write_nnunet_dataset, {"3d_fullres": (0,)},
                       shape=(16, 14, 12), spacing=(6.0, 6.0, 6.0))


# ----------------------------------------------------------------------------------------------
# Reading a series


def test_series_reads_with_its_geometry(tmp_path: Path) -> None:
    volume = _volume()
    write_series(tmp_path / "s", volume)
    image, geometry = read_image(tmp_path / "s")
    np.testing.assert_array_equal(image[0], volume)  # slice z of the array is the slice at z (sorted by position)
    _assert_same_geometry(geometry, Geometry((2.5, 0.8, 0.9), (12.5, -40.25, 7.125), _expected_direction(), 3))
    info = read_info(tmp_path / "s")
    assert info.shape == volume.shape and info.channels == 1
    _assert_same_geometry(info.geometry, geometry, atol=1e-9)
    assert [f.name for f in dicom_series_files(tmp_path / "s")][:2] == ["slice_010.dcm", "slice_009.dcm"]


def test_discovery_names_cases_after_their_folders(tmp_path: Path) -> None:
    write_series(tmp_path / "one", _volume((3, 8, 7)))
    [case] = find_input_cases([tmp_path / "one"], 1)
    assert case.case_id == "one" and case.images == (tmp_path / "one",) and case.ending == ".nii.gz"
    root = tmp_path / "root"
    write_series(root / "patient1" / "ct", _volume((3, 8, 7)))
    write_series(root / "patient2" / "ct", _volume((3, 8, 7)))
    write_series(root / "patient2" / "mr", _volume((3, 8, 7)))
    (root / "README.txt").write_text("not a series\n")  # beside the series folders: ignored
    cases = find_input_cases([root], 1)
    assert [c.case_id for c in cases] == ["patient1_ct", "patient2_ct", "patient2_mr"]  # "ct" twice: paths
    assert cases[2].images == (root / "patient2" / "mr",)


def test_discovery_errors(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", _volume((3, 8, 7)))
    (tmp_path / "mixed" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"notes.txt: not a DICOM file, in the DICOM series folder"):
        find_input_cases([tmp_path / "mixed"], 1)
    write_series(tmp_path / "ok", _volume((3, 8, 7)))
    with pytest.raises(DatasetError, match=r"a single DICOM file; give the folder of its series"):
        find_input_cases([tmp_path / "ok" / "slice_001.dcm"], 1)
    both = tmp_path / "both"
    write_series(both, _volume((3, 8, 7)))
    for file in both.iterdir():
        file.rename(file.with_suffix(""))  # DICOM files without an ending, recognised by their magic
    _image(both / "x.nii.gz")
    with pytest.raises(DatasetError, match="holds both images and DICOM files"):
        find_input_cases([both], 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no DICOM series in it or below"):
        find_input_cases([tmp_path / "empty"], 1)


def test_two_series_in_one_folder_is_an_error(work: Path, tmp_path: Path, cli) -> None:
    write_series(tmp_path / "two", _volume((3, 8, 7)))
    write_series(tmp_path / "b", _volume((3, 8, 7)))
    shutil.move(tmp_path / "b" / "slice_001.dcm", tmp_path / "two" / "other_001.dcm")  # a second series' slice
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work, "-i", tmp_path / "two", "-o", out), out,
                          "DICOM series mixed in one folder", 1)


# ----------------------------------------------------------------------------------------------
# Predicting a series


def test_series_is_predicted_as_nifti_in_its_geometry(work: Path, tmp_path: Path, cli) -> None:
    write_series(tmp_path / "series" / "CT_abdomen", _volume())
    image, geometry = read_image(tmp_path / "series" / "CT_abdomen")
    out = tmp_path / "out"
    result = cli("predict", work, "-i", tmp_path / "series", "-o", out, "--no-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["CT_abdomen.nii.gz"]
    labels, out_geometry = read_image(out / "CT_abdomen.nii.gz")
    assert labels.shape == image.shape and labels.dtype == np.uint8
    _assert_same_geometry(out_geometry, geometry)


def _seg_frames(labels: np.ndarray) -> int:
    """Frames of a BINARY SEG with empty frames omitted: one per (segment, slice) that is not empty."""
    return sum(int((labels[z] == v).any()) for v in range(1, int(labels.max()) + 1) for z in range(labels.shape[0]))


def _check_seg(seg_path: Path, nifti: Path, uids_by_z: Sequence[str], names: Sequence[str]) -> None:
    hd = pytest.importorskip("highdicom")
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == set(uids_by_z)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == list(names)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "autoseg" and algorithm.AlgorithmVersion
    labels = read_image(nifti)[0][0]
    assert int(seg.NumberOfFrames) == max(_seg_frames(labels), 1)
    mask = seg.get_pixels_by_source_instance(list(uids_by_z), combine_segments=True, relabel=False)
    np.testing.assert_array_equal(mask, labels)  # voxel for voxel, slice z <-> the slice at z


def test_dicom_seg_references_the_series_and_matches_the_label_map(work: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("highdicom")
    uids = write_series(tmp_path / "in" / "s1", _volume(seed=4))
    out = tmp_path / "out"
    result = cli("predict", work, "-i", tmp_path / "in", "-o", out, "--output-format", "nifti",
                 "--output-format", "dicom-seg", "--no-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["s1.dcm", "s1.nii.gz"]
    assert len(np.unique(read_image(out / "s1.nii.gz")[0])) > 1  # a real test: not all background
    _check_seg(out / "s1.dcm", out / "s1.nii.gz", uids, ["shell", "core"])
    # dicom-seg alone writes only the SEG; --continue then skips the case.
    alone = run(work, [tmp_path / "in"], tmp_path / "seg_only", output_format="dicom-seg", tta=False, device="cpu")
    assert alone.written == (tmp_path / "seg_only" / "s1.dcm",)
    assert [p.name for p in (tmp_path / "seg_only").iterdir()] == ["s1.dcm"]
    again = run(work, [tmp_path / "in"], tmp_path / "seg_only", output_format="dicom-seg", resume=True)
    assert again.skipped == (tmp_path / "seg_only" / "s1.dcm",) and not again.written


def test_dicom_seg_errors(work: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    nifti = _image(tmp_path / "x.nii.gz")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work, "-i", nifti, "-o", out, "--output-format", "dicom-seg"), out,
                          "is not a DICOM series", 2)
    _assert_clean_failure(cli("predict", work, "-i", nifti, "-o", out, "--output-format", "dicom-sg"), out,
                          "did you mean 'dicom-seg'?", 2)
    # "dicom" is a restored image series (restoration models): a segmentation model is sent to dicom-seg.
    _assert_clean_failure(cli("predict", work, "-i", nifti, "-o", out, "--output-format", "dicom"), out,
                          "a segmentation model writes a DICOM SEG: use --output-format dicom-seg", 2)
    write_series(tmp_path / "blank", _volume((3, 8, 7)), blank_uids=True)
    _assert_clean_failure(cli("predict", work, "-i", tmp_path / "blank", "-o", out, "--output-format", "dicom-seg"),
                          out, "empty StudyInstanceUID", 1)
    _assert_clean_failure(cli("predict", work, "-i", tmp_path / "blank", "-o", tmp_path / "blank" / "out"),
                          tmp_path / "blank" / "out", "inside the input DICOM series folder", 2)
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed
    write_series(tmp_path / "fine", _volume((3, 8, 7)))
    _assert_clean_failure(cli("predict", work, "-i", tmp_path / "fine", "-o", out, "--output-format", "dicom-seg"),
                          out, "pip install 'autoseg[dicom]'", 2)
    with pytest.raises(ConfigError, match="needs highdicom"):
        run(work, [tmp_path / "fine"], out, output_format=["dicom-seg"])


# ----------------------------------------------------------------------------------------------
# Real series (../shared/data), skipped when absent


@pytest.fixture(scope="module")
def brain_mr(shared_data: Path) -> Path:
    path = shared_data / "BrainTumorProgression_MR_DICOM" / "TestVolumes"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def total_ct(shared_data: Path) -> Path:
    path = shared_data / "TotalSegmentator_examples" / "example_ct_dicom"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def test_real_mr_series_are_discovered_with_their_geometry(brain_mr: Path) -> None:
    cases = find_input_cases([brain_mr], 1)
    assert [c.case_id for c in cases] == ["11-T1post-18670", "11_HCropVolume", "13_HCropVolume", "14_HCropVolume",
                                          "26401-T1prereg-52906", "36468-FLAIRreg-58706", "37830-T2reg-78532"]
    for case in cases:
        info = read_info(case.images[0])
        image, geometry = read_image(case.images[0])
        assert info.shape == image.shape[1:]
        _assert_same_geometry(info.geometry, geometry, atol=1e-9)
    # SliceThickness says 5 mm, the positions 6.5 mm apart: the spacing comes from the positions.
    t1 = next(c for c in cases if c.case_id == "11-T1post-18670")
    assert read_info(t1.images[0]).geometry.spacing[0] == pytest.approx(6.5, abs=1e-5)


@pytest.mark.slow
def test_real_mr_series_to_nifti_and_seg(coarse_work: Path, brain_mr: Path, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    series = brain_mr / "Study3" / "11-T1post-18670"
    out = tmp_path / "out"
    summary = run(coarse_work, [series], out, output_format=["auto", "dicom-seg"], tta=False, device="cpu",
                  save_uncertainty=True)
    assert summary.written == (out / "11-T1post-18670.nii.gz",)
    image, geometry = read_image(series)
    labels, out_geometry = read_image(out / "11-T1post-18670.nii.gz")
    assert labels.shape == image.shape
    _assert_same_geometry(out_geometry, geometry)
    assert read_image(out / "11-T1post-18670_entropy.nii.gz")[0].shape == image.shape
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in dicom_series_files(series)]
    _check_seg(out / "11-T1post-18670.dcm", out / "11-T1post-18670.nii.gz", uids, ["shell", "core"])


@pytest.mark.slow
def test_real_ct_series_to_nifti_and_seg(coarse_work: Path, total_ct: Path, tmp_path: Path, cli) -> None:
    """The TotalSegmentator CT example (JPEG 2000, UIDs blanked by its de-identification)."""
    out = tmp_path / "out"
    result = cli("predict", coarse_work, "-i", total_ct, "-o", out, "--no-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    image, geometry = read_image(total_ct)
    labels, out_geometry = read_image(out / "example_ct_dicom.nii.gz")
    assert labels.shape == image.shape == (1, 20, 512, 512)
    _assert_same_geometry(out_geometry, geometry)
    # Its StudyInstanceUID and SeriesInstanceUID are blank: a SEG cannot reference them.
    pytest.importorskip("highdicom")
    refused = cli("predict", coarse_work, "-i", total_ct, "-o", tmp_path / "seg", "--output-format", "dicom-seg")
    assert refused.exit_code == 1 and "empty StudyInstanceUID" in refused.output, refused.output
    # With the UIDs restored (the SOP Instance UIDs come from the file meta), the SEG is written.
    fixed = tmp_path / "fixed" / "example_ct_dicom"
    fixed.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for file in dicom_series_files(total_ct):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(fixed / file.name)
    summary = run(coarse_work, [fixed], tmp_path / "seg", output_format=["nifti", "dicom-seg"], tta=False,
                  device="cpu")
    assert summary.written == (tmp_path / "seg" / "example_ct_dicom.nii.gz",)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            for f in dicom_series_files(fixed)]
    _check_seg(tmp_path / "seg" / "example_ct_dicom.dcm", tmp_path / "seg" / "example_ct_dicom.nii.gz", uids,
               ["shell", "core"])


def test_output_inside_a_dicom_input_root_is_refused(work: Path, tmp_path: Path, cli) -> None:
    """A root of several series is searched below its top level: outputs inside it would become inputs."""
    root = tmp_path / "dicom_root"
    write_series(root / "s1", _volume((3, 8, 7)))
    write_series(root / "s2", _volume((3, 8, 7), seed=5))
    out = root / "predictions"
    _assert_clean_failure(cli("predict", work, "-i", root, "-o", out), out, "which holds DICOM series", 2)
