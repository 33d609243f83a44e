"""Image reading and writing: the only module that talks to SimpleITK.

Every image is returned as a channel-first array ``(C, Z, Y, X)`` plus a :class:`Geometry`.

Conventions (the same everywhere in autoseg):

* Array axes are numpy order ``(z, y, x)``, as ``sitk.GetArrayFromImage`` returns them.
* ``Geometry.spacing`` is in array order ``(z, y, x)``; ``origin`` and ``direction`` keep ITK's
  physical convention ``(x, y, z)`` and row-major direction cosines, as in the file.
* 2D images (PNG, TIF, BMP, 2D NIfTI) get a leading singleton axis and spacing
  :data:`SPACING_2D_AXIS` on it, so that 2D and 3D data share one code path (nnU-Net does the same).
* Multi-component pixels (RGB) and 4D files (the MSD layout's multi-channel images) become channels.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.errors import DatasetError

if TYPE_CHECKING:
    import SimpleITK

#: Spacing given to the singleton axis of a 2D image (nnU-Net uses the same value).
SPACING_2D_AXIS = 999.0

#: File endings autoseg reads, longest first so that ``.nii.gz`` wins over ``.gz``.
SUPPORTED_ENDINGS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg",
)
ENDINGS_2D: frozenset[str] = frozenset({".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"})
#: Lossy formats: read as images (Kaggle-style 2D sets ship JPEG), never written (a label map saved
#: as JPEG gets values around its labels: a 0/255 mask holds 0-8 and 247-255).
LOSSY_ENDINGS: frozenset[str] = frozenset({".jpg", ".jpeg"})


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in physical space.

    Attributes:
        spacing: voxel size in mm, array order ``(z, y, x)``.
        origin: physical position of the first voxel, ITK order ``(x, y[, z])``.
        direction: direction cosines, ITK row-major, ``ndim * ndim`` values.
        ndim: spatial dimensions of the file (2 or 3).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    ndim: int


@dataclass(frozen=True)
class ImageInfo:
    """Header-only facts about an image file (no pixels read)."""

    shape: tuple[int, int, int]
    channels: int
    geometry: Geometry
    pixel_type: str


def strip_ending(name: str) -> tuple[str, str]:
    """Split ``name`` into (stem, ending) for a supported ending, or (name, "") if none matches."""
    lower = name.lower()
    for ending in SUPPORTED_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)], name[-len(ending):]
    return name, ""


def _sitk() -> "SimpleITK":
    # Imported lazily so that `autoseg --help` and the torch-free modules start fast.
    import SimpleITK

    return SimpleITK


def _cannot_read(path: Path, exc: Exception) -> DatasetError:
    # SimpleITK messages start with a C++ source location; the last line says what went wrong,
    # except for a trailing "Reason: <errno text>" that is stale ("No such file or directory" for a
    # file that exists but is truncated), so that line is dropped.
    detail = [line.strip() for line in str(exc).strip().splitlines()
              if line.strip() and not line.strip().startswith("Reason:")]
    reason = detail[-1] if detail else type(exc).__name__
    reason = re.sub(r"^(sitk::ERROR|ITK ERROR)(: \w+\(0x[0-9a-fA-F]+\))?: ", "", reason)
    reason = reason.replace(os.fspath(path), path.name)  # the path leads the message already
    return DatasetError(f"{path}: cannot read image ({reason}); the file is corrupt, truncated or not an image: "
                        "re-export or re-copy it")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty (0 bytes); re-export or re-copy it")


def _geometry_from_sitk(spacing: tuple[float, ...], origin: tuple[float, ...],
                        direction: tuple[float, ...], dim: int) -> Geometry:
    if dim == 4:
        # 4D (MSD multi-channel): the last ITK axis is the channel axis; keep the spatial 3x3 block.
        spacing, origin = spacing[:3], origin[:3]
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
        dim = 3
    if dim == 2:
        zyx = (SPACING_2D_AXIS, float(spacing[1]), float(spacing[0]))
    elif dim == 3:
        zyx = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    else:
        raise ValueError(f"unsupported image dimension {dim}")
    return Geometry(zyx, tuple(float(v) for v in origin), tuple(float(v) for v in direction), dim)


def _header(path: Path) -> "SimpleITK.ImageFileReader":
    """A reader that has read ``path``'s header (no pixels).

    Raises:
        DatasetError: SimpleITK cannot read the header.
    """
    reader = _sitk().ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _cannot_read(path, exc) from None
    return reader


def read_info(path: Path) -> ImageInfo:
    """Read an image header only.

    Raises:
        DatasetError: the file is missing, empty, unreadable, or has an unsupported dimension.
    """
    path = Path(path)
    _check_file(path)
    if path.is_dir():
        return _dicom_series_info(path)
    reader = _header(path)
    size, dim = reader.GetSize(), reader.GetDimension()
    if dim not in (2, 3, 4):
        raise DatasetError(f"{path}: {dim}D image; autoseg reads 2D, 3D and 4D (channels last) images")
    components = reader.GetNumberOfComponents()
    if dim == 4:
        shape = (int(size[2]), int(size[1]), int(size[0]))
        channels = int(size[3]) * components
    elif dim == 3:
        shape, channels = (int(size[2]), int(size[1]), int(size[0])), components
    else:
        shape, channels = (1, int(size[1]), int(size[0])), components
    geometry = _geometry_from_sitk(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dim)
    pixel_type = _sitk().GetPixelIDValueAsString(reader.GetPixelID())
    return ImageInfo(shape, channels, geometry, pixel_type)


def read_image(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read an image file (or a DICOM series folder) as ``(C, Z, Y, X)`` plus its geometry.

    The dtype is kept as stored; callers convert. Raises :class:`DatasetError` for missing, empty,
    truncated, corrupt or unsupported files.
    """
    sitk = _sitk()
    path = Path(path)
    _check_file(path)
    nifti = _nifti_header(path) if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")) else None
    float_nifti = nifti is not None and nifti.float_dtype is not None
    try:
        if path.is_dir():
            source = _read_dicom_series(path)
        elif float_nifti:
            # ITK reads the header and geometry; the voxels are read below, as stored (_NiftiHeader).
            source = sitk.ImageFileReader()
            source.SetFileName(os.fspath(path))
            source.ReadImageInformation()
        else:
            source = sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        raise _cannot_read(path, exc) from None
    dim = source.GetDimension()
    if dim not in (2, 3, 4):
        raise DatasetError(f"{path}: {dim}D image; autoseg reads 2D, 3D and 4D (channels last) images")
    geometry = _geometry_from_sitk(source.GetSpacing(), source.GetOrigin(), source.GetDirection(), dim)
    if float_nifti:
        array, components = _read_nifti_floats(path, nifti, tuple(reversed(source.GetSize()))), 1
    else:
        array, components = sitk.GetArrayFromImage(source), source.GetNumberOfComponentsPerPixel()
        if nifti is not None:
            _check_nifti_length(path, nifti)
    return _channels_first(array, components, dim, str(path)), geometry


def _channels_first(array: np.ndarray, components: int, dim: int, where: str) -> np.ndarray:
    """SimpleITK's array of a ``dim``-D image with ``components`` per pixel as ``(C, Z, Y, X)``."""
    if components > 1:
        # Vector pixels (RGB): components are the last numpy axis -> move to the front.
        array = np.moveaxis(array, -1, 0)
        if dim == 2:
            array = array[:, None]
        elif dim == 4:
            raise DatasetError(f"{where}: 4D image with vector pixels is not supported; store one channel per file")
    elif dim == 2:
        array = array[None, None]
    elif dim == 3:
        array = array[None]
    # dim == 4 already reads as (C, Z, Y, X).
    if min(array.shape) == 0:
        raise DatasetError(f"{where}: image has zero size {array.shape[1:]}; the file holds no voxels")
    return np.ascontiguousarray(array)


def is_sitk_image(value: object) -> bool:
    """True when ``value`` is a ``SimpleITK.Image`` (checked without importing SimpleITK for other values)."""
    return type(value).__module__.startswith("SimpleITK") and type(value).__name__ == "Image"


def from_sitk(image: "SimpleITK.Image", where: str = "image") -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image in memory as ``(C, Z, Y, X)`` plus its geometry, as :func:`read_image` reads a file.

    Raises:
        DatasetError: not a 2D, 3D or 4D image, or an empty one.
    """
    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise DatasetError(f"{where}: {dim}D image; autoseg reads 2D, 3D and 4D (channels last) images")
    geometry = _geometry_from_sitk(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), dim)
    array = _sitk().GetArrayFromImage(image)
    return _channels_first(array, image.GetNumberOfComponentsPerPixel(), dim, where), geometry


@dataclass(frozen=True)
class _NiftiHeader:
    """What autoseg checks itself in a NIfTI file, because ITK's NIfTI reader hides two problems.

    ITK 5.4 (SimpleITK 2.5) reads a truncated .nii/.nii.gz without error, zero-filling the missing
    voxels, and replaces every NaN and ±Inf voxel with 0 (fixed only in ITK 6, ITK PR #6683): both
    would pass ``autoseg check`` silently. So the file's length is checked against the header, and
    float voxels are read here, as stored (ITK still reads the header and the geometry).

    Attributes:
        offset: byte offset of the voxels (``vox_offset``) in the uncompressed file.
        nbytes: byte size of the voxel data the header declares.
        float_dtype: numpy dtype (with byte order) of unscaled float32/float64 scalar voxels, which
            are read here; None for every other file, read by ITK.
    """

    offset: int
    nbytes: int
    float_dtype: str | None


#: NIfTI datatype codes of real floating-point voxels -> numpy type (FLOAT32, FLOAT64).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_header(path: Path) -> _NiftiHeader | None:
    """The fields of a NIfTI-1/2 header that autoseg checks; None if it cannot be parsed (ITK decides)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            slope, inter = struct.unpack(endian + "2f", head[112:120])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            slope, inter = struct.unpack(endian + "2d", head[176:192])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:1 + dims[0]]):
        return None
    voxels = int(np.prod([int(d) for d in dims[1:1 + dims[0]]]))
    # Scaled voxels (scl_slope not 0 or 1, or an intercept) and vector voxels (dim[5]) stay with ITK.
    unscaled = slope in (0.0, 1.0) and inter == 0.0 and dims[0] <= 4
    dtype = _NIFTI_FLOATS.get(datatype) if unscaled else None
    return _NiftiHeader(max(offset, 348), voxels * bitpix // 8, (endian + dtype) if dtype else None)


def _check_nifti_length(path: Path, header: _NiftiHeader) -> None:
    """Raise when the file holds less voxel data than its header declares (a cheap check)."""
    expected = header.offset + header.nbytes
    if not path.name.lower().endswith(".gz"):
        if path.stat().st_size < expected:
            raise _truncated(path, path.stat().st_size, expected)
        return
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        # The gzip trailer holds the uncompressed size mod 2**32. A mismatch can also mean a
        # multi-member gzip (bgzip), so it is confirmed by decompressing before calling it truncated.
        if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
            return
    _nifti_payload(path, header)


def _nifti_payload(path: Path, header: _NiftiHeader) -> bytes:
    """The whole uncompressed file; raises when it is shorter than the header declares."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as handle:
            payload = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: file is truncated or corrupt ({exc}); re-export or re-copy it") from None
    if len(payload) < header.offset + header.nbytes:
        raise _truncated(path, len(payload), header.offset + header.nbytes)
    return payload


def _read_nifti_floats(path: Path, header: _NiftiHeader, shape: tuple[int, ...]) -> np.ndarray:
    """Float voxels as stored, NaN and ±Inf included, in ITK's array order (``shape`` from ITK)."""
    dtype = np.dtype(header.float_dtype)
    count = int(np.prod(shape))
    if count * dtype.itemsize != header.nbytes:
        raise DatasetError(f"{path}: NIfTI header declares {header.nbytes} bytes of voxels, not {count} "
                           f"{dtype.name} voxels of shape {shape}; re-export the file")
    payload = _nifti_payload(path, header)
    # NIfTI stores x fastest, as ITK's buffer does: the bytes are numpy's C order of (..., z, y, x).
    stored = np.frombuffer(payload, dtype=dtype, count=count, offset=header.offset)
    return stored.reshape(shape).astype(dtype.newbyteorder("="))


def _truncated(path: Path, size: int, expected: int) -> DatasetError:
    return DatasetError(f"{path}: file is truncated ({size} of the {expected} bytes its header declares); "
                        "re-export or re-copy it")


#: Byte offset of the ``DICM`` magic in a DICOM file: after the 128-byte preamble (PS3.10 §7.1).
_DICOM_MAGIC_OFFSET = 128


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM file: the ``DICM`` magic after the preamble, or a ``.dcm`` ending.

    The ending alone admits the few files written without the PS3.10 preamble (old ACR-NEMA
    exports); files such as ``CT.1.3.12...`` (no ending) are recognised by their magic.
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series_files(folder: Path) -> tuple[Path, ...]:
    """The files of the single DICOM series in ``folder``, in the order ITK stacks them.

    GDCM groups the files by SeriesInstanceUID and sorts them along the slice normal
    (ImagePositionPatient); :func:`read_image` of the folder stacks them in this order, so index
    ``z`` of its array is the slice of file ``z``.

    Raises:
        DatasetError: the folder holds no DICOM series, or several.
    """
    sitk = _sitk()
    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(os.fspath(folder))
    if not series:
        raise DatasetError(f"{folder}: no DICOM series found in this folder")
    if len(series) > 1:
        listing = ", ".join(series[:3]) + (", ..." if len(series) > 3 else "")
        raise DatasetError(f"{folder}: {len(series)} DICOM series mixed in one folder (SeriesInstanceUID {listing}); "
                           "put each series in its own folder")
    return tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(os.fspath(folder), series[0]))


def _read_dicom_series(folder: Path) -> "SimpleITK.Image":
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([os.fspath(f) for f in dicom_series_files(folder)])
    return reader.Execute()


def _dicom_series_info(folder: Path) -> ImageInfo:
    """Header facts of a DICOM series from its first and last files (no pixels read).

    The slice spacing is the distance between the first and the last slice positions over the
    slice count minus one, which is how ITK's series reader sets it (equal to its value on the
    real CT and MR series in ``../shared/data``).
    """
    files = dicom_series_files(folder)
    first, last = _header(files[0]), _header(files[-1])
    size = first.GetSize()
    spacing = list(first.GetSpacing())[:2]
    gap = float(np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())))
    spacing.append(gap / (len(files) - 1) if len(files) > 1 else float(first.GetSpacing()[2]))
    geometry = _geometry_from_sitk(tuple(spacing), first.GetOrigin(), first.GetDirection(), 3)
    shape = (len(files), int(size[1]), int(size[0]))
    pixel_type = _sitk().GetPixelIDValueAsString(first.GetPixelID())
    return ImageInfo(shape, first.GetNumberOfComponents(), geometry, pixel_type)


def read_dicom_files(files: Sequence[Path], kind: str = "DICOM") -> np.ndarray:
    """The pixels of DICOM slices stacked in the given order as ``(Z, Y, X)`` (rescale applied).

    For callers that sort the slices themselves (:mod:`autoseg.convert.dicom_rt`).

    Args:
        files: one single-frame DICOM file per slice, in slice order.
        kind: the modality named in error messages (``CT``).

    Raises:
        DatasetError: a slice is truncated or corrupt (the file is named), or the series reader
            fails although every slice reads alone.
    """
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([os.fspath(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError:
        # The series reader does not say which file failed; find it (only on this error path).
        for file in files:
            try:
                sitk.ReadImage(os.fspath(file))
            except RuntimeError as exc:
                detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
                last = detail[-1] if detail else ""
                reason = re.sub(r"^(sitk::ERROR|ITK ERROR)(: \w+\(0x[0-9a-fA-F]+\))?: ", "", last)
                raise DatasetError(f"{file}: cannot read the {kind} slice's pixels ({reason or type(exc).__name__}); "
                                   "the file is truncated or corrupt: re-copy it") from None
        raise DatasetError(f"{Path(files[0]).parent}: SimpleITK cannot read the {kind} series although every slice "
                           "reads alone; re-export the series") from None
    return sitk.GetArrayFromImage(image)


def to_sitk(array: np.ndarray, geometry: Geometry) -> "SimpleITK.Image":
    """Build a single-channel SimpleITK image from a ``(Z, Y, X)`` array and its geometry."""
    sitk = _sitk()
    if array.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) array, got shape {array.shape}")
    if geometry.ndim == 2:
        if array.shape[0] != 1:
            raise ValueError(f"2D geometry needs a singleton first axis, got shape {array.shape}")
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing((geometry.spacing[2], geometry.spacing[1]))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(geometry.spacing)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(path: Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Atomically write a ``(Z, Y, X)`` array with ``geometry`` to ``path`` (format from the ending).

    Raises:
        ValueError: ``path`` has a lossy ending (JPEG): autoseg never writes one (callers pick PNG).
    """
    if strip_ending(Path(path).name)[1].lower() in LOSSY_ENDINGS:
        raise ValueError(f"{path}: autoseg does not write lossy JPEG files; write PNG instead")
    sitk = _sitk()
    image = to_sitk(array, geometry)
    with atomic_path(Path(path)) as tmp:
        sitk.WriteImage(image, os.fspath(tmp), compress)
