"""``autoseg predict --output-format dicom``: a denoise model's restored image as a DICOM series.

Synthetic CT series are written with :func:`test_predict_dicom.write_series` (rotated slices, files
named in reverse slice order) from :func:`test_restoration.phantom` volumes; the denoise model is
the ``tiny`` preset's 2d fold trained for two iterations (its correction is small but not zero).
The real CT series in ``../shared/data`` are written back through the series writer when present.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import AutosegError, ConfigError, DatasetError
from autoseg.imageio import Geometry, dicom_series_files, read_image
from autoseg.inference.dicom_series import (
    check_series_source,
    check_series_target,
    check_slice_order,
    to_stored,
    write_dicom_series,
)
from autoseg.inference.inputs import InputCase
from autoseg.inference.outputs import CaseOutputs
from autoseg.inference.run import _check_task_outputs, _is_done, run
from test_predict import _assert_clean_failure, _image
from test_predict_dicom import _assert_same_geometry, write_series
from test_restoration import phantom, write_denoise_dataset

pydicom = pytest.importorskip("pydicom")

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

#: The CT convention of most scanners: stored = HU + 1024.
INTERCEPT = -1024.0


@pytest.fixture(scope="module")
def denoise_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic denoising dataset planned with the tiny preset; 2d fold 0 trained for 2 iterations."""
    from autoseg.planning.run import plan_dataset
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig

    root = tmp_path_factory.mktemp("restoration_dicom")
    write_denoise_dataset(root / "raw")
    plan_dataset(root / "raw", root / "work", "tiny", workers=1)
    cfg = TrainConfig(epochs=1, iters_per_epoch=2, val_iters=1, device="cpu", workers=0, seed=3, optimizer="adamw",
                      lr=2e-2)
    training.run(root / "work", "2d", "0", cfg)
    return root / "work"


@pytest.fixture(scope="module")
def series_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two series: ``ct_a`` int16 stored as HU + 1024; ``ct_b`` uint16 in half-HU steps (slope 0.5),
    floored at -1024 HU (stored 0: a restored value below it is clipped)."""
    root = tmp_path_factory.mktemp("series") / "in"
    _, noisy = phantom(7, (9, 30, 26))
    write_series(root / "ct_a", noisy, rescale=(1.0, INTERCEPT))
    _, other = phantom(8, (9, 30, 26))
    write_series(root / "ct_b", np.maximum(other, -1024), rescale=(0.5, INTERCEPT), signed=False)
    return root


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]


def _check_series(out: Path, source: Path, nifti: Path, step: float, low: float) -> None:
    """``out`` is ``source`` denoised: same geometry, the NIfTI's values within ``step / 2`` (clipped
    at ``low``), new UIDs, the patient, study and frame of reference kept, matched slice for slice."""
    image, geometry = read_image(source)
    restored, _ = read_image(nifti)
    written, written_geometry = read_image(out)  # SimpleITK (GDCM) reads the series back
    assert written.shape == image.shape
    _assert_same_geometry(written_geometry, geometry, atol=1e-6)
    expected = np.maximum(restored[0].astype(np.float64), low)
    assert np.abs(written[0] - expected).max() <= step / 2 + 1e-6
    assert not np.array_equal(restored, image)  # the model changed the image: a real test

    sources = {tuple(np.round([float(v) for v in ds.ImagePositionPatient], 4)): ds for ds in _headers(source)}
    outputs = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
    assert len(outputs) == len(sources) == image.shape[1]
    series_uids = {str(ds.SeriesInstanceUID) for ds in outputs}
    sop_uids = {str(ds.SOPInstanceUID) for ds in outputs}
    assert len(series_uids) == 1 and len(sop_uids) == len(outputs)
    assert not series_uids & {str(ds.SeriesInstanceUID) for ds in sources.values()}
    assert not sop_uids & {str(ds.SOPInstanceUID) for ds in sources.values()}
    axis = np.asarray(geometry.direction).reshape(3, 3)[:, 2]
    for ds in outputs:
        src = sources[tuple(np.round([float(v) for v in ds.ImagePositionPatient], 4))]
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert "denoised by autoseg 2d" in ds.SeriesDescription and ds.SeriesNumber == src.SeriesNumber + 1000
        assert "autoseg" in ds.DerivationDescription and "2d folds 0" in ds.DerivationDescription
        for name in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "InstanceNumber",
                     "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
                     "PixelRepresentation", "BitsStored"):
            assert ds[name].value == src[name].value, name
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        # The file holds the slice at its own position (never the file name's order).
        z = round(float((np.asarray(ds.ImagePositionPatient, float) - geometry.origin) @ axis) / geometry.spacing[0])
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(values, written[0, z])


def test_denoised_series_keeps_the_source_and_matches_the_nifti(denoise_work: Path, series_inputs: Path,
                                                                tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    result = cli("predict", denoise_work, "-i", series_inputs, "-o", out, "--output-format", "nifti",
                 "--output-format", "dicom", "--no-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["ct_a", "ct_a.nii.gz", "ct_b", "ct_b.nii.gz"]
    _check_series(out / "ct_a", series_inputs / "ct_a", out / "ct_a.nii.gz", 1.0, -np.inf)
    _check_series(out / "ct_b", series_inputs / "ct_b", out / "ct_b.nii.gz", 0.5, INTERCEPT)
    below = int(np.count_nonzero(np.rint((read_image(out / "ct_b.nii.gz")[0] - INTERCEPT) / 0.5) < 0))
    clipped = [line for line in result.output.splitlines() if "were clipped" in line]  # said by the CLI
    said = (f"warning: {out / 'ct_b'}: {below} voxel(s) of the restored image outside the source's stored range "
            "[0, 65535] (BitsStored 16) were clipped to it")
    assert below > 0  # the fixture clips: the warning is really tested
    assert clipped == [said]
    # dicom alone writes only the series; --continue then skips the cases; a new run replaces it.
    alone = run(denoise_work, [series_inputs / "ct_a"], tmp_path / "only", ["2d"], output_format="dicom", tta=False,
                device="cpu")
    assert alone.written == (tmp_path / "only" / "ct_a",) and [p.name for p in (tmp_path / "only").iterdir()] == ["ct_a"]
    again = run(denoise_work, [series_inputs / "ct_a"], tmp_path / "only", ["2d"], output_format="dicom", resume=True)
    assert again.skipped == (tmp_path / "only" / "ct_a",) and not again.written
    before = {str(ds.SeriesInstanceUID) for ds in _headers(tmp_path / "only" / "ct_a")}
    run(denoise_work, [series_inputs / "ct_a"], tmp_path / "only", ["2d"], output_format="dicom", tta=False,
        device="cpu")
    after = _headers(tmp_path / "only" / "ct_a")
    assert len(after) == 9 and {str(ds.SeriesInstanceUID) for ds in after}.isdisjoint(before)
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["ct_a"]  # no temporary folder left


def test_dicom_output_refusals(denoise_work: Path, series_inputs: Path, tmp_path: Path, cli,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    nifti = _image(tmp_path / "x.nii.gz")
    _assert_clean_failure(cli("predict", denoise_work, "-i", nifti, "-o", out, "--output-format", "dicom"), out,
                          "is not a DICOM series", 2)
    _assert_clean_failure(cli("predict", denoise_work, "-i", series_inputs, "-o", out, "--output-format",
                              "dicom-seg"), out, "not available for a denoise model", 2)
    with pytest.raises(ConfigError, match="a segmentation model writes a DICOM SEG: use --output-format dicom-seg"):
        _check_task_outputs("segmentation", False, False, ("dicom",))
    twice = tmp_path / "twice" / "ct"  # two files at one position: refused before any prediction
    write_series(twice, phantom(3, (4, 30, 26))[1], rescale=(1.0, INTERCEPT))
    first, second = sorted(twice.iterdir())[:2]
    moved = pydicom.dcmread(second)
    moved.ImagePositionPatient = pydicom.dcmread(first).ImagePositionPatient
    moved.save_as(second)
    _assert_clean_failure(cli("predict", denoise_work, "-i", twice, "-o", out, "--output-format", "dicom"), out,
                          "two slices at one position along the slice normal", 1)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    _assert_clean_failure(cli("predict", denoise_work, "-i", series_inputs, "-o", out, "--output-format", "dicom"),
                          out, "needs pydicom, which is not installed: pip install 'autoseg[dicom]'", 2)


# ----------------------------------------------------------------------------------------------
# The writer's parts


def test_files_must_advance_along_the_normal_in_the_readers_order() -> None:
    """File z (ITK's stacking order) is slice z: checked, never re-sorted by position."""
    geometry = Geometry((2.5, 0.8, 0.9), (10.0, -5.0, 7.0), (1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0), 3)  # coronal
    axis = np.array([0.0, 1.0, 0.0])  # the direction's third column
    orientation = np.tile([1.0, 0, 0, 0, 0, -1.0], (4, 1))
    positions = np.array([10.0, -5.0, 7.0]) + np.outer([0, 1, 2, 3], axis) * 2.5
    check_slice_order(positions, orientation, geometry, "s")
    check_slice_order(positions + np.outer([0, 0.2, 0, 1.4], axis), orientation, geometry, "s")  # gaps
    with pytest.raises(DatasetError, match=r"s: the slices are stacked out of position order .* \(slices 2 and 3 at 5 and 2.5 mm\)"):
        check_slice_order(positions[[0, 2, 1, 3]], orientation, geometry, "s")  # by InstanceNumber, say
    with pytest.raises(DatasetError, match="out of position order"):
        check_slice_order(positions[::-1] - axis * 7.5, orientation, geometry, "s")  # decreasing along the normal
    with pytest.raises(DatasetError, match="two slices at one position"):
        check_slice_order(positions[[0, 1, 1, 2]], orientation, geometry, "s")
    with pytest.raises(DatasetError, match="the first slice lies 1.2 mm from the image's origin"):
        check_slice_order(positions + axis * 1.2, orientation, geometry, "s")
    turned = orientation.copy()
    turned[2] = [1.0, 0, 0, 0, 1.0, 0]
    with pytest.raises(DatasetError, match="slice 3 has another ImageOrientationPatient than the first"):
        check_slice_order(positions, turned, geometry, "s")


def _shuffle_instance_numbers(folder: Path, numbers: list[int]) -> list[Path]:
    """Give the files (in position order) these InstanceNumbers; returns the files by InstanceNumber."""
    files = list(dicom_series_files(folder))
    for file, number in zip(files, numbers):
        ds = pydicom.dcmread(file)
        ds.InstanceNumber = number
        ds.ContentDate, ds.ContentTime = "20000101", "101010"
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20000101", "101010"
        ds.save_as(file)
    return [f for _, f in sorted(zip(numbers, files))]


def test_each_slice_is_written_into_its_own_file(tmp_path: Path) -> None:
    """File names and InstanceNumbers out of position order: every output file holds the slice at
    its position; the new instances are dated now."""
    source = tmp_path / "ct"
    write_series(source, phantom(4, (5, 30, 26))[1], rescale=(1.0, INTERCEPT))
    _shuffle_instance_numbers(source, [3, 1, 5, 2, 4])
    image, geometry = read_image(source)
    restored = image[0] + np.arange(5, dtype=np.float64)[:, None, None] * 7  # each slice told apart
    before = datetime.datetime.now()
    written = write_dicom_series(tmp_path / "out", restored, geometry, source, what="denoised by autoseg 2d",
                                 derivation="test")
    assert written.clipped_voxels == 0 and written.warnings == ()
    back, back_geometry = read_image(tmp_path / "out")
    _assert_same_geometry(back_geometry, geometry, atol=1e-6)
    np.testing.assert_array_equal(back[0], restored)
    sources = {str(ds.InstanceNumber): ds for ds in _headers(source)}
    axis = np.asarray(geometry.direction).reshape(3, 3)[:, 2]
    for file in sorted((tmp_path / "out").iterdir()):
        ds = pydicom.dcmread(file)
        assert ds.ImagePositionPatient == sources[str(ds.InstanceNumber)].ImagePositionPatient
        z = round(float((np.asarray(ds.ImagePositionPatient, float) - geometry.origin) @ axis) / geometry.spacing[0])
        np.testing.assert_array_equal(ds.pixel_array * 1.0 + INTERCEPT, restored[z])
        for date, time in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime")):
            stamp = datetime.datetime.strptime(f"{ds[date].value}{ds[time].value}", "%Y%m%d%H%M%S.%f")
            assert before - datetime.timedelta(seconds=1) <= stamp <= datetime.datetime.now(), (date, stamp)
        assert "by autoseg" in ds.DerivationDescription  # the mark of an autoseg series


def test_series_stacked_by_instance_number_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When GDCM cannot sort by position it stacks by InstanceNumber: the writer must not re-sort."""
    import autoseg.imageio
    import autoseg.inference.dicom_series as dicom_series

    source = tmp_path / "ct"
    write_series(source, phantom(4, (4, 30, 26))[1], rescale=(1.0, INTERCEPT))
    by_number = _shuffle_instance_numbers(source, [1, 3, 2, 4])  # the first at the origin, then 2 before 1
    monkeypatch.setattr(autoseg.imageio, "dicom_series_files", lambda folder: tuple(by_number))
    monkeypatch.setattr(dicom_series, "dicom_series_files", lambda folder: tuple(by_number))
    with pytest.raises(DatasetError, match=r"ct: the slices are stacked out of position order .*slices 2 and 3.*"
                                           "use --output-format nifti"):
        check_series_source(source)
    image, geometry = read_image(source)  # stacked by InstanceNumber, as the reader would
    with pytest.raises(DatasetError, match="out of position order"):
        write_dicom_series(tmp_path / "out", image[0], geometry, source, what="d", derivation="test")
    assert not (tmp_path / "out").exists()


def test_source_headers_that_cannot_be_written_back_are_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the check before any prediction (never a crash after it)."""
    volume = phantom(5, (3, 30, 26))[1]
    turned = tmp_path / "turned"
    write_series(turned, volume, rescale=(1.0, INTERCEPT))
    file = dicom_series_files(turned)[1]
    ds = pydicom.dcmread(file)
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (1, 0, 0, 0, 0.99995, 0.01)]  # GDCM still sorts by position
    ds.save_as(file)
    with pytest.raises(DatasetError, match="slice 2 has another ImageOrientationPatient than the first"):
        check_series_source(turned)
    big = tmp_path / "big"
    write_series(big, volume, rescale=(1.0, INTERCEPT))
    file = dicom_series_files(big)[0]
    ds = pydicom.dcmread(file)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian
    ds.PixelData = np.frombuffer(ds.PixelData, "<i2").astype(">i2").tobytes()
    pydicom.filewriter.dcmwrite(file, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    assert not pydicom.dcmread(file).is_little_endian and dicom_series_files(big)[0] == file
    with pytest.raises(DatasetError, match=r"Explicit VR Big Endian .* convert the series to little endian first"):
        check_series_source(big)
    classless = tmp_path / "classless"
    write_series(classless, volume, rescale=(1.0, INTERCEPT))
    for file in dicom_series_files(classless):
        ds = pydicom.dcmread(file)
        del ds.SOPClassUID
        del ds.file_meta.MediaStorageSOPClassUID
        pydicom.filewriter.dcmwrite(file, ds, enforce_file_format=False)
    with pytest.raises(DatasetError, match="no SOPClassUID in the DICOM header"):
        check_series_source(classless)
    # A write that fails (a full disk) is one line, and leaves nothing behind.
    good = tmp_path / "good"
    write_series(good, volume, rescale=(1.0, INTERCEPT))
    image, geometry = read_image(good)

    def full(self, *args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.Dataset, "save_as", full)
    with pytest.raises(DatasetError, match=r"out: cannot write the DICOM series \(No space left on device\)"):
        write_dicom_series(tmp_path / "o" / "out", image[0], geometry, good, what="d", derivation="test")
    assert not any((tmp_path / "o").iterdir())


def test_non_finite_restored_values_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "ct"
    write_series(source, phantom(4, (3, 30, 26))[1], rescale=(1.0, INTERCEPT))
    image, geometry = read_image(source)
    restored = image[0].astype(np.float32)
    restored[1, 2, 3], restored[2, 0, 0] = np.nan, np.inf
    with pytest.raises(AutosegError, match="holds 2 NaN or infinite value"):
        write_dicom_series(tmp_path / "out", restored, geometry, source, what="d", derivation="test")
    assert not (tmp_path / "out").exists()


def test_clipping_is_reported_per_stored_range(tmp_path: Path) -> None:
    """Slices of different BitsStored: each clipped count is said with its own range."""
    source = tmp_path / "ct"
    write_series(source, np.maximum(phantom(4, (3, 30, 26))[1], -1024), rescale=(1.0, INTERCEPT), signed=False)
    last = dicom_series_files(source)[-1]
    ds = pydicom.dcmread(last)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(last)
    image, geometry = read_image(source)
    restored = image[0].astype(np.float64)
    restored[0, :2] = -2000  # below stored 0 in the first slice only
    written = write_dicom_series(tmp_path / "out", restored, geometry, source, what="d", derivation="test")
    assert written.clipped == (2 * 26, 0, 0) and written.bits_stored == (16, 16, 12)
    assert written.warnings == (f"{tmp_path / 'out'}: 52 voxel(s) of the restored image outside the source's stored "
                                "range [0, 65535] (BitsStored 16) were clipped to it",)
    restored[2, 0, :3] = 5000  # above 4095 in the 12-bit slice
    written = write_dicom_series(tmp_path / "out", restored, geometry, source, what="d", derivation="test")
    said = (f"{tmp_path / 'out'}: 52 voxel(s) of the restored image outside the source's stored range [0, 65535] "
            "(BitsStored 16); 3 voxel(s) of the restored image outside the source's stored range [0, 4095] "
            "(BitsStored 12) were clipped to it")
    assert written.warnings == (said,)


def test_only_an_earlier_autoseg_series_is_replaced(tmp_path: Path) -> None:
    source = tmp_path / "ct"
    write_series(source, phantom(4, (3, 30, 26))[1], rescale=(1.0, INTERCEPT))
    image, geometry = read_image(source)
    out = tmp_path / "out" / "ct"
    write_dicom_series(out, image[0], geometry, source, what="d", derivation="test")
    check_series_target(out, "ct")  # ours: may be replaced
    foreign = tmp_path / "foreign"
    shutil.copytree(source, foreign)  # a DICOM series autoseg did not write
    with pytest.raises(ConfigError, match=r"foreign: holds files that are not an autoseg DICOM series .* move it "
                                          "away or choose another -o"):
        write_dicom_series(foreign, image[0], geometry, source, what="d", derivation="test")
    assert sorted(p.name for p in foreign.iterdir()) == sorted(p.name for p in source.iterdir())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not an autoseg DICOM series"):
        check_series_target(out, "ct")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")  # dangling
    with pytest.raises(ConfigError, match="link: a symbolic link"):
        check_series_target(link, "ct")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="link: a symbolic link"):
        write_dicom_series(link, image[0], geometry, source, what="d", derivation="test")
    assert not any((tmp_path / "elsewhere").iterdir())


def test_cli_refuses_a_foreign_folder_before_predicting(denoise_work: Path, series_inputs: Path, tmp_path: Path,
                                                         cli) -> None:
    out = tmp_path / "out"
    (out / "ct_a").mkdir(parents=True)
    (out / "ct_a" / "scan.dcm").write_bytes(b"not autoseg's")
    result = cli("predict", denoise_work, "-i", series_inputs, "-o", out, "--output-format", "dicom")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds files that are not an autoseg DICOM series" in lines[0], result.output
    assert sorted(p.name for p in out.iterdir()) == ["ct_a"] and (out / "ct_a" / "scan.dcm").read_bytes() == \
        b"not autoseg's"


def test_continue_needs_files_and_a_whole_series_folder(tmp_path: Path) -> None:
    source = tmp_path / "in" / "ct"
    write_series(source, phantom(4, (3, 30, 26))[1], rescale=(1.0, INTERCEPT))
    case = InputCase("ct", (source,), ".nii.gz")
    labels = CaseOutputs((tmp_path / "ct.nii.gz",))
    labels.labels[0].mkdir()  # a folder where a label map goes is no label map
    assert not _is_done(case, labels)
    labels.labels[0].rmdir()
    labels.labels[0].write_bytes(b"x")
    assert _is_done(case, labels)
    series = CaseOutputs((), series=tmp_path / "ct")
    series.series.mkdir()
    assert not _is_done(case, series)  # an empty folder is no series
    for z in range(3):
        (series.series / f"{z + 1:04d}.dcm").write_bytes(b"x")
    assert _is_done(case, series)


def test_stored_values_are_rounded_and_clipped_to_the_stored_range() -> None:
    stored, clipped = to_stored(np.array([-1030.0, -1024.0, -1023.4, 3071.0, 3072.0]), 1.0, -1024.0, 16, 12, False)
    assert stored.dtype == np.uint16 and stored.tolist() == [0, 0, 1, 4095, 4095] and clipped == 2
    stored, clipped = to_stored(np.array([-3024.0, 0.25, 40.0]), 0.5, -1024.0, 16, 16, True)
    assert stored.dtype == np.int16 and stored.tolist() == [-4000, 2048, 2128] and clipped == 0


# ----------------------------------------------------------------------------------------------
# Real series (../shared/data), skipped when absent


@pytest.mark.parametrize("name", ["CT_full_dose/CRLM-CT-1004_dicom", "TotalSegmentator_examples/example_ct_dicom"])
def test_real_ct_series_are_written_back(shared_data: Path, name: str, tmp_path: Path) -> None:
    """CRLM-CT-1004 (explicit VR, int16, padding -3024 HU) and the TotalSegmentator example (JPEG
    2000, uint16 in 12 bits, Study/Series/SOP UIDs blanked): shifted by -30 HU and written back,
    equal to the shifted image but where it left the stored range; uncompressed; new UIDs."""
    source = shared_data / name
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    image, geometry = read_image(source)
    shifted = image[0].astype(np.int32) - 30
    written = write_dicom_series(tmp_path / "out", shifted, geometry, source, what="denoised by autoseg 2d",
                                 derivation="test")
    back, back_geometry = read_image(tmp_path / "out")
    _assert_same_geometry(back_geometry, geometry, atol=1e-6)
    assert len(set(written.stored_ranges)) == 1
    low = written.stored_ranges[0][0] + INTERCEPT
    np.testing.assert_array_equal(back[0], np.maximum(shifted, low))
    assert written.clipped_voxels == int(np.count_nonzero(shifted < low))
    assert (written.clipped_voxels > 0) == any("were clipped" in line for line in written.warnings)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(source)]
    outputs = _headers(tmp_path / "out")
    assert all(ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for ds in outputs)
    study = str(sources[0].StudyInstanceUID)
    studies = {str(ds.StudyInstanceUID) for ds in outputs}
    assert studies == {study} if study else len(studies) == 1 and "" not in studies  # blank: a new one
    assert any("empty StudyInstanceUID" in line for line in written.warnings) == (not study)
    meta_uids = {str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in sources}
    assert {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in outputs} == meta_uids
    assert all(list(ds.ImageType) == ["DERIVED", "SECONDARY", *list(sources[0].ImageType)[2:]] for ds in outputs)


@pytest.mark.slow
def test_real_ct_series_denoised_to_dicom(denoise_work: Path, shared_data: Path, tmp_path: Path, cli) -> None:
    """CRLM-CT-1004 (41 slices of 512 x 512, 5 mm) through the denoise model: the DICOM series reads
    back with the source's geometry, equal to the NIfTI of the same run, in the source's study."""
    source = shared_data / "CT_full_dose" / "CRLM-CT-1004_dicom"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    out = tmp_path / "out"
    result = cli("predict", denoise_work, "-i", source, "-o", out, "--output-format", "nifti,dicom", "--no-tta",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    written, geometry = read_image(out / source.name)
    image, source_geometry = read_image(source)
    _assert_same_geometry(geometry, source_geometry, atol=1e-6)
    np.testing.assert_array_equal(written, read_image(out / f"{source.name}.nii.gz")[0])
    assert not np.array_equal(written, image)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(source)]
    outputs = _headers(out / source.name)
    assert {str(ds.StudyInstanceUID) for ds in outputs} == {str(sources[0].StudyInstanceUID)}
    assert {str(ds.SeriesDescription) for ds in outputs} == {"CT CH/AB/PEL denoised by autoseg 2d"}
    assert {int(ds.SeriesNumber) for ds in outputs} == {int(sources[0].SeriesNumber) + 1000}


def test_a_series_folder_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from autoseg.atomic import atomic_folder

    final = tmp_path / "case"
    with atomic_folder(final) as tmp:
        (tmp / "0001.dcm").write_bytes(b"first")
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "0001.dcm").write_bytes(b"second")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["case"] and (final / "0001.dcm").read_bytes() == b"first"
    with atomic_folder(final) as tmp:
        (tmp / "0002.dcm").write_bytes(b"third")
    assert [p.name for p in tmp_path.iterdir()] == ["case"] and [p.name for p in final.iterdir()] == ["0002.dcm"]


def test_a_failed_replace_puts_the_earlier_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoseg import atomic
    from autoseg.atomic import atomic_folder

    final = tmp_path / "case"
    with atomic_folder(final) as tmp:
        (tmp / "0001.dcm").write_bytes(b"first")
    replace, calls = os.replace, []

    def second_fails(src, dst) -> None:
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output error"), atomic_folder(final) as tmp:
        (tmp / "0001.dcm").write_bytes(b"second")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["case"] and (final / "0001.dcm").read_bytes() == b"first"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="not replaced"), atomic_folder(link):
        pass
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
