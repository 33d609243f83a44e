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

import os
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
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp",
)
ENDINGS_2D: frozenset[str] = frozenset({".png", ".tif", ".tiff", ".bmp"})


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
    detail = str(exc).strip().splitlines()
    # SimpleITK messages start with a C++ source location; the last line says what went wrong.
    reason = detail[-1].strip() if detail else type(exc).__name__
    return DatasetError(f"{path}: cannot read image ({reason}); the file is corrupt, truncated or not an image")


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


def read_info(path: Path) -> ImageInfo:
    """Read an image header only.

    Raises:
        DatasetError: the file is missing, empty, unreadable, or has an unsupported dimension.
    """
    sitk = _sitk()
    path = Path(path)
    _check_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _cannot_read(path, exc) from None
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
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    return ImageInfo(shape, channels, geometry, pixel_type)


def read_image(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read an image file (or a DICOM series folder) as ``(C, Z, Y, X)`` plus its geometry.

    The dtype is kept as stored; callers convert. Raises :class:`DatasetError` for missing, empty,
    corrupt or unsupported files.
    """
    sitk = _sitk()
    path = Path(path)
    _check_file(path)
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        raise _cannot_read(path, exc) from None
    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise DatasetError(f"{path}: {dim}D image; autoseg reads 2D, 3D and 4D (channels last) images")
    geometry = _geometry_from_sitk(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), dim)
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        # Vector pixels (RGB): components are the last numpy axis -> move to the front.
        array = np.moveaxis(array, -1, 0)
        if dim == 2:
            array = array[:, None]
        elif dim == 4:
            raise DatasetError(f"{path}: 4D image with vector pixels is not supported; store one channel per file")
    elif dim == 2:
        array = array[None, None]
    elif dim == 3:
        array = array[None]
    # dim == 4 already reads as (C, Z, Y, X).
    if min(array.shape) == 0:
        raise DatasetError(f"{path}: image has zero size {array.shape[1:]}; the file holds no voxels")
    return np.ascontiguousarray(array), geometry


def _read_dicom_series(folder: Path) -> "SimpleITK.Image":
    sitk = _sitk()
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(os.fspath(folder))
    if not series:
        raise DatasetError(f"{folder}: no DICOM series found in this folder")
    if len(series) > 1:
        raise DatasetError(f"{folder}: {len(series)} DICOM series in one folder; put each series in its own folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(os.fspath(folder), series[0]))
    return reader.Execute()


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
    """Atomically write a ``(Z, Y, X)`` array with ``geometry`` to ``path`` (format from the ending)."""
    sitk = _sitk()
    image = to_sitk(array, geometry)
    with atomic_path(Path(path)) as tmp:
        sitk.WriteImage(image, os.fspath(tmp), compress)
