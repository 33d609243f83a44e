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
* explicit VR little endian, uncompressed: a compressed source's transfer syntax is not kept.

Each output slice is matched to its source file by ImagePositionPatient along the slice normal
(never by file name). Pixels are read by :mod:`autoseg.imageio` (SimpleITK); pydicom only copies
headers and writes the files.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.atomic import atomic_folder
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry, dicom_series_files

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

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
#: Longest SeriesDescription (VR LO: 64 characters).
_LO_MAX = 64


@dataclass(frozen=True)
class SeriesWritten:
    """What :func:`write_dicom_series` wrote.

    Attributes:
        folder: the series' folder.
        files: one file per slice.
        clipped: voxels whose value lay outside the stored range and were clipped to it.
        stored_range: the stored range (from BitsStored and PixelRepresentation).
    """

    folder: Path
    files: int
    clipped: int
    stored_range: tuple[int, int]


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
    """The series' headers (no pixels), checked to be single-frame grayscale slices with a position.

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
        DatasetError: see :func:`_read_headers` and :func:`slice_order`.
    """
    from autoseg.imageio import read_info

    sources = _read_headers(dicom_series_files(series_folder))
    slice_order(_positions(sources), read_info(series_folder).geometry, str(series_folder))


def _positions(sources: list[pydicom.Dataset]) -> np.ndarray:
    """``(N, 3)``: each slice's ImagePositionPatient."""
    return np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources], dtype=np.float64)


def slice_order(positions: np.ndarray, geometry: Geometry, where: str) -> np.ndarray:
    """The array slice ``z`` of each source file, from its ImagePositionPatient along the slice normal.

    ITK stacks a series' files sorted along the slice axis (the direction's third column) from the
    origin, whatever the gaps between them; so slice ``z`` is the file of rank ``z`` along that axis.
    The first of them must lie at the origin (the check that both sort the same way).

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of the files, in mm (patient x, y, z).
        geometry: the series' geometry as :func:`autoseg.imageio.read_image` stacked it.
        where: names the series in errors.

    Returns:
        ``(N,)`` the slice index of each file.

    Raises:
        DatasetError: two files at one position, or no file at the image's origin.
    """
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    along = (np.asarray(positions, dtype=np.float64) - np.asarray(geometry.origin, dtype=np.float64)) @ direction[:, 2]
    order = np.argsort(along, kind="stable")
    index = np.empty(len(along), dtype=np.int64)
    index[order] = np.arange(len(along))
    tolerance = _POSITION_TOLERANCE * float(geometry.spacing[0])
    ranked = along[order]
    if len(ranked) > 1 and float(np.min(np.diff(ranked))) < tolerance:
        raise DatasetError(f"{where}: two slices at one position along the slice normal; the series cannot be "
                           "written back slice for slice: use --output-format nifti")
    if abs(float(ranked[0])) > tolerance:
        raise DatasetError(f"{where}: no slice at the image's origin (the first lies {float(ranked[0]):.3g} mm from it "
                           "along the normal); the series cannot be written back slice for slice: use "
                           "--output-format nifti")
    return index


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
                  frame_uid: str, series_number: int, description: str, derivation: str) -> pydicom.Dataset:
    """A copy of ``source``'s header as a slice of the derived series, holding ``pixels``.

    Args:
        source: the source slice's header (no pixels).
        pixels: the stored pixels ``(Rows, Columns)``, of the source's pixel type.
        series_uid, study_uid, frame_uid: the derived series' UIDs (the study and frame of
            reference are the source's, or new ones where the source's are blank).
        series_number: the new SeriesNumber.
        description: the SeriesDescription (at most 64 characters).
        derivation: the DerivationDescription.
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
        folder: the series' folder to write (replaced if it exists).
        restored: ``(Z, Y, X)`` in the source's rescaled units (HU), on the series' grid as
            :func:`autoseg.imageio.read_image` of ``series_folder`` stacks it.
        geometry: that grid's geometry.
        series_folder: the folder of the source series.
        what: said after the source's SeriesDescription (``denoised by autoseg 2d``).
        derivation: the DerivationDescription (model, folds, checkpoint, TTA).

    Returns:
        What was written, with the number of clipped voxels (also logged as a warning).

    Raises:
        ConfigError: pydicom is not installed.
        DatasetError: the source headers do not match the image or cannot be written back.
    """
    require_pydicom()
    from pydicom.uid import generate_uid

    series_folder = Path(series_folder)
    files = dicom_series_files(series_folder)
    sources = _read_headers(files)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if restored.ndim != 3 or restored.shape != (len(sources), rows, columns):
        raise DatasetError(f"{series_folder}: the series has {len(sources)} slices of {rows}x{columns}, the restored "
                           f"image shape {restored.shape}; predict this series again")
    index = slice_order(_positions(sources), geometry, str(series_folder))
    first = sources[0]
    study_uid = str(first.get("StudyInstanceUID", "") or "")
    frame_uid = str(first.get("FrameOfReferenceUID", "") or "")
    for name, value in (("StudyInstanceUID", study_uid), ("FrameOfReferenceUID", frame_uid)):
        if not value:
            log.warning("%s: empty %s in the source (de-identified); the denoised series gets a new one",
                        series_folder, name)
    study_uid, frame_uid = study_uid or generate_uid(), frame_uid or generate_uid()
    series_uid = generate_uid()
    number = first.get("SeriesNumber")
    series_number = (int(number) if number not in (None, "") else 0) + SERIES_NUMBER_OFFSET
    description = _description(str(first.get("SeriesDescription", "") or ""), what)
    width = max(4, len(str(len(sources))))
    clipped, bounds = 0, (0, 0)
    with atomic_folder(Path(folder)) as tmp:
        for source, z in zip(sources, index):
            signed = int(source.PixelRepresentation) == 1
            slope = float(source.get("RescaleSlope", 1) or 1)
            intercept = float(source.get("RescaleIntercept", 0) or 0)
            pixels, count = to_stored(restored[z], slope, intercept, int(source.BitsAllocated),
                                      int(source.BitsStored), signed)
            clipped += count
            bounds = stored_range(int(source.BitsStored), signed)
            ds = derived_slice(source, pixels, series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid,
                               series_number=series_number, description=description, derivation=derivation)
            ds.save_as(os.fspath(tmp / f"{int(z) + 1:0{width}d}.dcm"), enforce_file_format=True)
    if clipped:
        log.warning("%s: %d voxel(s) of the restored image outside the source's stored range %s (BitsStored %d) "
                    "were clipped to it", folder, clipped, list(bounds), int(first.BitsStored))
    return SeriesWritten(Path(folder), len(sources), clipped, bounds)
