"""A restored (denoised) image written back as a DICOM series beside its source series.

``autoseg predict --output-format dicom`` of a restoration model writes ``OUT/{case}/``: one file
per source slice, each a copy of its source file's header (patient, study, frame of reference,
the slice's position and orientation) with

* a new SeriesInstanceUID (one per series) and SOPInstanceUID (one per file),
* ImageType ``DERIVED\\SECONDARY`` followed by the source's values after its first two,
* a SeriesDescription and DerivationDescription saying it was denoised by autoseg (with what),
  a new SeriesNumber, and a SourceImageSequence that references the source slice,
* the restored HU converted back with the slice's own RescaleSlope/Intercept to the source's
  stored pixel type (BitsAllocated, BitsStored, PixelRepresentation), clipped to the stored range,
* ContentDate/Time and InstanceCreationDate/Time of the time of writing,
* explicit VR little endian, uncompressed: a compressed source's transfer syntax is not kept.

Slice ``z`` of the image is written into a copy of file ``z`` of
:func:`autoseg.imageio.dicom_series_files`, the order in which ITK's series reader stacked them;
that order is checked to run along the slice normal from the image's origin (one orientation,
strictly increasing positions), so each slice lands at its own position. Pixels are read by
:mod:`autoseg.imageio` (SimpleITK); pydicom only copies headers and writes the files.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.atomic import atomic_folder
from autoseg.errors import AutosegError, ConfigError, DatasetError
from autoseg.imageio import Geometry, dicom_series_files

if TYPE_CHECKING:
    import pydicom

#: What ``pip`` needs for ``--output-format dicom`` (pydicom comes with highdicom).
INSTALL_HINT = "pip install 'autoseg[dicom]'"
#: What the descriptions say was done to the image, by task.
DONE_BY_TASK = {"denoise": "denoised"}
#: The output's SeriesNumber is the source's plus this (source 3 -> 1003; 1000 without one): a new
#: series that viewers list after the source, its origin still readable from the number.
SERIES_NUMBER_OFFSET = 1000
#: Elements that describe the source's pixel values or their encoding, stale after the pixels are
#: replaced (their VR follows PixelRepresentation, and an offset table belongs to compressed data).
_STALE = ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
          "LargestPixelValueInSeries", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "FloatPixelData",
          "DoubleFloatPixelData", "PixelDataProviderURL")
#: Two slice positions closer than this fraction of the slice spacing are one position (scanner
#: positions are rounded to 1e-3 mm or so; half a spacing apart is another slice).
_POSITION_TOLERANCE = 0.25
#: Two ImageOrientationPatient cosines further apart than this are different orientations (the
#: values are decimal strings, rounded to 1e-6 or so by scanners and converters).
_ORIENTATION_TOLERANCE = 1e-4
#: Longest SeriesDescription (VR LO: 64 characters).
_LO_MAX = 64
#: The mark of a series written by autoseg: every file's DerivationDescription holds it. Only a
#: folder whose every file is a ``.dcm`` so marked is replaced by a later run (anything else in
#: ``OUT/{case}`` is refused, never deleted).
WRITTEN_BY = "by autoseg"
#: The retired big endian transfer syntax (pydicom cannot re-encode its headers as little endian).
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(frozen=True)
class SeriesWritten:
    """What :func:`write_dicom_series` wrote.

    Attributes:
        folder: the series' folder.
        files: one file per slice.
        clipped: per slice (file order), the voxels whose value lay outside the slice's stored
            range and were clipped to it.
        stored_ranges: per slice, the stored range (from its BitsStored and PixelRepresentation).
        bits_stored: per slice, its BitsStored.
        new_uids: the source's blank UIDs (StudyInstanceUID, FrameOfReferenceUID) given new ones.
    """

    folder: Path
    files: int
    clipped: tuple[int, ...]
    stored_ranges: tuple[tuple[int, int], ...]
    bits_stored: tuple[int, ...]
    new_uids: tuple[str, ...] = field(default=())

    @property
    def clipped_voxels(self) -> int:
        """All clipped voxels."""
        return sum(self.clipped)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What to tell the user of this series, one line each: clipped voxels (by stored range)
        and new UIDs for blank ones."""
        lines = [f"{self.folder}: empty {name} in the source (de-identified); the series got a new one"
                 for name in self.new_uids]
        by_range: dict[tuple[tuple[int, int], int], int] = {}
        for count, bounds, bits in zip(self.clipped, self.stored_ranges, self.bits_stored):
            if count:
                by_range[(bounds, bits)] = by_range.get((bounds, bits), 0) + count
        if by_range:
            parts = [f"{count} voxel(s) of the restored image outside the source's stored range {list(bounds)} "
                     f"(BitsStored {bits})" for (bounds, bits), count in by_range.items()]
            lines.append(f"{self.folder}: {'; '.join(parts)} were clipped to it")
        return tuple(lines)


def require_pydicom() -> None:
    """Raise when pydicom (needed for ``--output-format dicom``) is not installed.

    Raises:
        ConfigError: pydicom is missing, with the install command.
    """
    try:
        found = importlib.util.find_spec("pydicom") is not None
    except ValueError:  # a module set to None in sys.modules (as if not installed)
        found = False
    if not found:
        raise ConfigError(f"--output-format dicom needs pydicom, which is not installed: {INSTALL_HINT}")


def _read_headers(files: tuple[Path, ...]) -> list[pydicom.Dataset]:
    """The series' headers (no pixels), checked to be single-frame grayscale slices with a position
    that can be written back (little endian, with a SOP Class).

    Raises:
        DatasetError: a header is unreadable or cannot be written back as a series slice.
    """
    import pydicom

    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(os.fspath(file), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for a damaged header
            raise DatasetError(f"{file}: cannot read the DICOM header ({exc}); re-copy the file") from None
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        if syntax == _BIG_ENDIAN or not getattr(ds, "is_little_endian", True):
            raise DatasetError(f"{file}: Explicit VR Big Endian (a retired transfer syntax), which --output-format "
                               "dicom cannot copy: convert the series to little endian first (gdcmconv --raw or "
                               "dcmconv +te) or use --output-format nifti")
        if not (str(ds.get("SOPClassUID", "") or "")
                or (meta is not None and str(meta.get("MediaStorageSOPClassUID", "") or ""))):
            raise DatasetError(f"{file}: no SOPClassUID in the DICOM header; --output-format dicom needs it to write "
                               "the slice back: use --output-format nifti")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DatasetError(f"{file}: multi-frame DICOM image; --output-format dicom writes series of single-frame "
                               "slices only: use --output-format nifti")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DatasetError(f"{file}: {ds.SamplesPerPixel} samples per pixel (colour); --output-format dicom writes "
                               "grayscale series only: use --output-format nifti")
        missing = [name for name in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
                                     "BitsAllocated", "BitsStored", "PixelRepresentation") if ds.get(name) in (None, "")]
        if missing:
            raise DatasetError(f"{file}: no {missing[0]} in the DICOM header; --output-format dicom needs it to write "
                               "the slice back: use --output-format nifti")
        if int(ds.BitsAllocated) not in (8, 16, 32) or not 0 < int(ds.BitsStored) <= int(ds.BitsAllocated):
            raise DatasetError(f"{file}: BitsAllocated {ds.BitsAllocated}, BitsStored {ds.BitsStored}; "
                               "--output-format dicom writes 8, 16 or 32 bit pixels: use --output-format nifti")
        datasets.append(ds)
    return datasets


def check_series_source(series_folder: Path) -> None:
    """Raise unless the series in ``series_folder`` can be written back as a DICOM series (headers only).

    Raises:
        DatasetError: see :func:`_read_headers` and :func:`check_slice_order`.
    """
    from autoseg.imageio import read_info

    sources = _read_headers(dicom_series_files(series_folder))
    check_slice_order(_positions(sources), _orientations(sources), read_info(series_folder).geometry,
                      str(series_folder))


def _positions(sources: list[pydicom.Dataset]) -> np.ndarray:
    """``(N, 3)``: each slice's ImagePositionPatient."""
    return np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources], dtype=np.float64)


def _orientations(sources: list[pydicom.Dataset]) -> np.ndarray:
    """``(N, 6)``: each slice's ImageOrientationPatient."""
    return np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in sources], dtype=np.float64)


def check_slice_order(positions: np.ndarray, orientations: np.ndarray, geometry: Geometry, where: str) -> None:
    """Raise unless file ``z`` (in :func:`autoseg.imageio.dicom_series_files`' order) is slice ``z``.

    ITK's series reader stacks the files in the order it is given (GDCM's: by position along the
    normal when it can, else by InstanceNumber or file name) and takes the origin from the first
    file and the slice axis from its orientation (the direction's third column). The slices are
    where the image says only when every file has that orientation and the files advance strictly
    along that axis from the origin, whatever the gaps between them; then slice ``z`` of the array
    is the pixels of file ``z``, and is written back into a copy of its header.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of the files in that order, in mm.
        orientations: ``(N, 6)`` their ImageOrientationPatient.
        geometry: the series' geometry as :func:`autoseg.imageio.read_image` stacked it.
        where: names the series in errors.

    Raises:
        DatasetError: the files differ in orientation, the first is not at the origin, or the
            order does not advance strictly along the slice axis (two files at one position, or
            stacked by InstanceNumber against their positions).
    """
    positions = np.asarray(positions, dtype=np.float64)
    orientations = np.asarray(orientations, dtype=np.float64)
    fix = "the series cannot be written back slice for slice: use --output-format nifti"
    differ = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > _ORIENTATION_TOLERANCE)
    if differ.size:
        raise DatasetError(f"{where}: slice {int(differ[0]) + 1} has another ImageOrientationPatient than the first "
                           f"({differ.size} of {len(orientations)} slices differ); {fix}")
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    along = (positions - np.asarray(geometry.origin, dtype=np.float64)) @ direction[:, 2]
    tolerance = _POSITION_TOLERANCE * float(geometry.spacing[0])
    if abs(float(along[0])) > tolerance:
        raise DatasetError(f"{where}: the first slice lies {float(along[0]):.3g} mm from the image's origin along the "
                           f"normal; {fix}")
    steps = np.diff(along)
    if steps.size and float(steps.min()) < tolerance:
        z = int(np.argmin(steps))
        what = "two slices at one position along the slice normal" if abs(float(steps[z])) < tolerance else \
            "the slices are stacked out of position order along the slice normal (by InstanceNumber or file name)"
        raise DatasetError(f"{where}: {what} (slices {z + 1} and {z + 2} at {float(along[z]):.3g} and "
                           f"{float(along[z + 1]):.3g} mm); {fix}")


def is_autoseg_series(folder: Path) -> bool:
    """Whether ``folder`` holds only an earlier autoseg DICOM series: every entry a ``.dcm`` file
    whose DerivationDescription holds :data:`WRITTEN_BY` (an empty folder counts: nothing is lost)."""
    import pydicom

    for entry in Path(folder).iterdir():
        if entry.suffix.lower() != ".dcm" or entry.is_symlink() or not entry.is_file():
            return False
        try:
            ds = pydicom.dcmread(os.fspath(entry), stop_before_pixels=True, specific_tags=["DerivationDescription"])
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: not ours to delete
            return False
        if WRITTEN_BY not in str(ds.get("DerivationDescription", "") or ""):
            return False
    return True


def check_series_target(folder: Path, case_id: str) -> None:
    """Raise unless ``folder`` may take the DICOM series of ``case_id``: absent, or an earlier
    autoseg series (which is replaced).

    Raises:
        ConfigError: a file, a symbolic link, or a folder holding anything but an autoseg series.
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise ConfigError(f"{folder}: a symbolic link; the DICOM series of case {case_id!r} is written as a folder of "
                          "that name: remove the link or choose another -o")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder; the DICOM series of case {case_id!r} is written as "
                          "that folder: move the file away")
    if not is_autoseg_series(folder):
        raise ConfigError(f"{folder}: holds files that are not an autoseg DICOM series (each a .dcm whose "
                          f"DerivationDescription says '{WRITTEN_BY}'); it would be replaced by the series of case "
                          f"{case_id!r}: move it away or choose another -o")


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The values a pixel of ``bits_stored`` bits holds (two's complement when ``signed``)."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def to_stored(values: np.ndarray, slope: float, intercept: float, bits_allocated: int, bits_stored: int,
              signed: bool) -> tuple[np.ndarray, int]:
    """Rescaled values (HU) as stored pixels: ``(value - intercept) / slope``, rounded half to even and
    clipped to the stored range.

    Returns:
        The stored pixels (``int``/``uint`` of ``bits_allocated`` bits) and how many were clipped.
    """
    low, high = stored_range(bits_stored, signed)
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    clipped = int(np.count_nonzero((stored < low) | (stored > high)))
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    return np.clip(stored, low, high).astype(dtype), clipped


def _description(source: str, what: str) -> str:
    """``{source} {what}`` within 64 characters (LO): the source's description is cut, never ``what``."""
    room = _LO_MAX - len(what) - 1
    if not source or room < 4:
        return what[:_LO_MAX]
    return f"{source[:room].rstrip()} {what}"


def derived_slice(source: pydicom.Dataset, pixels: np.ndarray, *, series_uid: str, study_uid: str,
                  frame_uid: str, series_number: int, description: str, derivation: str,
                  created: datetime.datetime | None = None) -> pydicom.Dataset:
    """A copy of ``source``'s header as a slice of the derived series, holding ``pixels``.

    Args:
        source: the source slice's header (no pixels).
        pixels: the stored pixels ``(Rows, Columns)``, of the source's pixel type.
        series_uid, study_uid, frame_uid: the derived series' UIDs (the study and frame of
            reference are the source's, or new ones where the source's are blank).
        series_number: the new SeriesNumber.
        description: the SeriesDescription (at most 64 characters).
        derivation: the DerivationDescription.
        created: the ContentDate/Time and InstanceCreationDate/Time (the time of writing; now
            when None).
    """
    import copy

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = copy.deepcopy(source)
    meta = getattr(source, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or "") or str(meta.get("MediaStorageSOPClassUID", "") if meta else "")
    source_uid = str(ds.get("SOPInstanceUID", "") or "") or str(meta.get("MediaStorageSOPInstanceUID", "")
                                                                  if meta else "")
    uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    values = list(source.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *values[2:]]
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.DerivationDescription = derivation[:1024]  # ST
    created = created or datetime.datetime.now()
    ds.ContentDate = ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = created.strftime("%H%M%S.%f")
    if sop_class and source_uid:
        reference = Dataset()
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = sop_class, source_uid
        ds.SourceImageSequence = [reference]
    for name in _STALE:
        if name in ds:
            delattr(ds, name)
    ds.add_new(0x7FE00010, "OB" if pixels.dtype.itemsize == 1 else "OW", np.ascontiguousarray(pixels).tobytes())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_dicom_series(folder: Path, restored: np.ndarray, geometry: Geometry, series_folder: Path, *,
                       what: str, derivation: str) -> SeriesWritten:
    """Write a restored image as a DICOM series, one file per slice of its source series (atomically).

    Args:
        folder: the series' folder to write (an earlier autoseg series there is replaced; anything
            else there is refused, see :func:`check_series_target`).
        restored: ``(Z, Y, X)`` in the source's rescaled units (HU), on the series' grid as
            :func:`autoseg.imageio.read_image` of ``series_folder`` stacks it.
        geometry: that grid's geometry.
        series_folder: the folder of the source series.
        what: said after the source's SeriesDescription (``denoised by autoseg 2d``).
        derivation: the DerivationDescription (model, folds, checkpoint, TTA); :data:`WRITTEN_BY`
            is added when it does not say it.

    Returns:
        What was written, with the clipped voxels per slice and the lines to warn of
        (:attr:`SeriesWritten.warnings`).

    Raises:
        ConfigError: pydicom is not installed, or ``folder`` may not be replaced.
        DatasetError: the source headers do not match the image or cannot be written back, or a
            file cannot be written.
        AutosegError: the restored image holds NaN or infinite values (nothing is written).
    """
    require_pydicom()
    from pydicom.uid import generate_uid

    series_folder, folder = Path(series_folder), Path(folder)
    check_series_target(folder, folder.name)
    files = dicom_series_files(series_folder)
    sources = _read_headers(files)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if restored.ndim != 3 or restored.shape != (len(sources), rows, columns):
        raise DatasetError(f"{series_folder}: the series has {len(sources)} slices of {rows}x{columns}, the restored "
                           f"image shape {restored.shape}; predict this series again")
    # A NaN or infinity cast to an integer type is undefined (any value); never written.
    bad = int(np.count_nonzero(~np.isfinite(restored)))
    if bad:
        raise AutosegError(f"{folder}: the restored image holds {bad} NaN or infinite value(s), which a DICOM series "
                           "cannot store; nothing written: check the model (its training may have diverged)")
    check_slice_order(_positions(sources), _orientations(sources), geometry, str(series_folder))
    first = sources[0]
    study_uid = str(first.get("StudyInstanceUID", "") or "")
    frame_uid = str(first.get("FrameOfReferenceUID", "") or "")
    new_uids = tuple(name for name, value in (("StudyInstanceUID", study_uid), ("FrameOfReferenceUID", frame_uid))
                     if not value)
    study_uid, frame_uid = study_uid or generate_uid(), frame_uid or generate_uid()
    series_uid = generate_uid()
    number = first.get("SeriesNumber")
    series_number = (int(number) if number not in (None, "") else 0) + SERIES_NUMBER_OFFSET
    description = _description(str(first.get("SeriesDescription", "") or ""), what)
    if WRITTEN_BY not in derivation:
        derivation = f"{derivation} (written {WRITTEN_BY})"
    created = datetime.datetime.now()
    width = max(4, len(str(len(sources))))
    clipped, ranges, bits = [], [], []
    try:
        with atomic_folder(folder) as tmp:
            # File z is slice z (check_slice_order): the order ITK's reader stacked them in.
            for z, (file, source) in enumerate(zip(files, sources)):
                signed = int(source.PixelRepresentation) == 1
                slope = float(source.get("RescaleSlope", 1) or 1)
                intercept = float(source.get("RescaleIntercept", 0) or 0)
                pixels, count = to_stored(restored[z], slope, intercept, int(source.BitsAllocated),
                                          int(source.BitsStored), signed)
                clipped.append(count)
                ranges.append(stored_range(int(source.BitsStored), signed))
                bits.append(int(source.BitsStored))
                ds = derived_slice(source, pixels, series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid,
                                   series_number=series_number, description=description, derivation=derivation,
                                   created=created)
                try:
                    ds.save_as(os.fspath(tmp / f"{z + 1:0{width}d}.dcm"), enforce_file_format=True)
                except (ValueError, TypeError, AttributeError) as exc:  # pydicom: a header it cannot encode
                    raise DatasetError(f"{file}: its header cannot be written back ({exc}); use --output-format "
                                       "nifti") from None
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot write the DICOM series ({exc.strerror or exc}); check the "
                           "output folder (space, permissions)") from None
    written = SeriesWritten(folder, len(sources), tuple(clipped), tuple(ranges), tuple(bits), new_uids)
    return written
