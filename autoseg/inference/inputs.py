"""Which inputs: ``-i`` files, folders and DICOM series as cases; their headers checked against the model (torch-free)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.dataset.super_resolution import check_coarse_input
from autoseg.errors import DatasetError
from autoseg.imageio import (
    SPACING_2D_AXIS,
    SUPPORTED_ENDINGS,
    Geometry,
    is_dicom_file,
    read_image,
    read_info,
    strip_ending,
)
from autoseg.plans import Plans

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)

#: Output endings that differ from the input's: a single-file equivalent for formats that keep the
#: voxels in a second file (.mhd + .raw, .nhdr + .raw), so that the atomic rename moves everything;
#: lossless PNG for JPEG (a label map must keep its exact values).
_OUTPUT_ENDING = {".mhd": ".mha", ".nhdr": ".nrrd", ".jpg": ".png", ".jpeg": ".png"}
#: Label-map ending of a DICOM series input (``--output-format auto`` or ``nifti``).
DICOM_OUTPUT_ENDING = ".nii.gz"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One image to predict: its file(s) and the name of its output.

    Attributes:
        case_id: the output's name without ending.
        images: one file per channel, or one file carrying every channel (MSD 4D, RGB).
        ending: the output file's ending (the input's; ``.mhd``/``.nhdr`` become ``.mha``/``.nrrd``).
    """

    case_id: str
    images: tuple[Path, ...]
    ending: str


def output_ending(path: Path) -> str:
    """The ending of the label map predicted for the image ``path``: the image's own, except a
    single-file format for two-file ones (``.mhd`` -> ``.mha``) and PNG for JPEG (lossless)."""
    ending = strip_ending(path.name)[1].lower()
    return _OUTPUT_ENDING.get(ending, ending)


def find_input_cases(inputs: Sequence[Path], num_channels: int) -> list[InputCase]:
    """The cases of the ``-i`` arguments: folders, single files, or several files.

    In a folder and among the given files, names ``{case}_{CCCC}{ending}`` are grouped into one
    case when the files of channels ``0 .. num_channels - 1`` are all there (nnU-Net's naming);
    any other image is a case of its own (an MSD 4D file carries all channels itself). A folder
    without images is searched for DICOM series: each folder in or below it that holds DICOM files
    is one case named after that folder (:func:`autoseg.inference.dicom.find_dicom_series`).

    Args:
        inputs: folders and/or image files.
        num_channels: the model's input channels.

    Returns:
        The cases, sorted by id.

    Raises:
        DatasetError: an input does not exist, has an unsupported ending, a folder holds no
            image and no DICOM series, a series folder holds other files, or two inputs would
            write the same output.
    """
    from autoseg.dataset.layout import discover_images

    cases: list[InputCase] = []
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = discover_images(path, num_channels)
            if found:
                _check_no_dicom_beside_images(path)
                cases.extend(InputCase(c.case_id, c.images, output_ending(c.images[0])) for c in found)
                continue
            series = _dicom_cases(path)
            if not series:
                raise DatasetError(f"{path}: no images in this folder (supported endings: "
                                   f"{', '.join(SUPPORTED_ENDINGS)}) and no DICOM series in it or below")
            cases.extend(series)
        elif path.is_file():
            if not strip_ending(path.name)[1]:
                if is_dicom_file(path):
                    raise DatasetError(f"{path}: a single DICOM file; give the folder of its series (-i "
                                       f"{path.parent})")
                raise DatasetError(f"{path}: unsupported file type; autoseg reads {', '.join(SUPPORTED_ENDINGS)} "
                                   "and folders of DICOM series")
            files.append(path)
        else:
            raise DatasetError(f"{path}: input not found")
    cases.extend(_group_files(files, num_channels))
    cases.sort(key=lambda c: c.case_id)
    for first, second in zip(cases, cases[1:]):
        if first.case_id == second.case_id:
            raise DatasetError(f"{first.images[0]} and {second.images[0]} would both be written as case "
                               f"{first.case_id!r}; rename one or predict them separately")
    return cases


def _dicom_cases(folder: Path) -> list[InputCase]:
    """One case per DICOM series folder in or below ``folder``; label maps as NIfTI (``.nii.gz``)."""
    from autoseg.inference.dicom import find_dicom_series

    return [InputCase(case_id, (series,), DICOM_OUTPUT_ENDING) for case_id, series in find_dicom_series(folder)]


def _check_no_dicom_beside_images(folder: Path) -> None:
    """Raise when a folder of images also holds DICOM files (which would be silently left out)."""
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not strip_ending(entry.name)[1] and not entry.name.startswith(".") \
                and is_dicom_file(entry):
            raise DatasetError(f"{folder}: holds both images and DICOM files ({entry.name}); put the DICOM series in "
                               "a folder of its own and give both with -i")


def is_dicom_case(case: InputCase) -> bool:
    """True when the case is a DICOM series (its one input is the series' folder)."""
    return len(case.images) == 1 and case.images[0].is_dir()


def _group_files(files: Sequence[Path], num_channels: int) -> list[InputCase]:
    """Explicit files into cases, grouping ``{case}_{CCCC}`` names of one folder like a folder's
    (:func:`autoseg.dataset.layout.group_channel_files`)."""
    from autoseg.dataset.layout import group_channel_files

    grouped, singles = group_channel_files(list(dict.fromkeys(Path(f).resolve() for f in files)), num_channels)
    return ([InputCase(c.case_id, c.images, output_ending(c.images[0])) for c in grouped]
            + [InputCase(strip_ending(p.name)[0], (p,), output_ending(p)) for p in singles])


def is_2d_plans(plans: Plans) -> bool:
    """True when the training images were 2D files (the reader gives their missing axis 999 mm)."""
    return float(plans.original_median_spacing[0]) == SPACING_2D_AXIS


def check_inputs(cases: Sequence[InputCase], plans: Plans, configurations: Sequence[str]) -> None:
    """Check every case's headers against the model before any prediction starts (cheap: no pixels).

    Raises:
        DatasetError: a file is unreadable, has the wrong channel count, differs in shape from the
            case's other channel files, or has the wrong dimensionality for the model (a 3D image
            for a model trained on 2D images, a 2D image for a 3D configuration); a super-resolution
            model's input has the fine spacing already.
    """
    expected = len(plans.channel_names)
    trained_2d = is_2d_plans(plans)
    needs_3d = [name for name in configurations if plans.configurations[name].dims == 3]
    for case in cases:
        channels = 0
        shape = None
        for path in case.images:
            info = read_info(path)
            channels += info.channels
            if shape is not None and info.shape != shape:
                raise DatasetError(f"{path}: shape {info.shape} differs from {case.images[0].name}'s {shape}; "
                                   "the channel files of a case must share one grid")
            shape = info.shape
            if trained_2d and info.shape[0] > 1:
                raise DatasetError(f"{path}: 3D image of shape {info.shape}; this model was trained on 2D images "
                                   "— give 2D images (PNG/TIF or single-slice files)")
            if needs_3d and info.geometry.ndim == 2:
                raise DatasetError(f"{path}: 2D image; {needs_3d[0]} is a 3D model — use a 2d or 2.5d "
                                   "configuration (-c 2d) for 2D images")
            if plans.upsample_factor is not None and plans.min_target_spacing is not None:
                # A super-resolution model takes coarse inputs only.
                check_coarse_input(info.geometry, plans.upsample_factor, plans.min_target_spacing, str(path))
        if channels != expected:
            files = case.images[0] if len(case.images) == 1 else f"case {case.case_id!r} ({len(case.images)} files)"
            raise DatasetError(f"{files}: {channels} channel(s); the model expects {expected} "
                               f"({', '.join(plans.channel_names)})"
                               + ("; give one file per channel named {case}_0000, {case}_0001, ..."
                                  if expected > 1 and channels == 1 else ""))


def read_input(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """Read a case's file(s) as ``(C, Z, Y, X)``, with the geometry of its first file (used for the output).

    Raises:
        DatasetError: a file is unreadable or the channel files differ in shape.
    """
    arrays: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in case.images:
        array, geom = read_image(path)
        if arrays and array.shape[1:] != arrays[0].shape[1:]:
            raise DatasetError(f"{path}: shape {array.shape[1:]} differs from {case.images[0].name}'s "
                               f"{arrays[0].shape[1:]}; the channel files of a case must share one grid")
        arrays.append(array)
        geometry = geometry or geom
    assert geometry is not None  # a case has at least one file
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return image, geometry
