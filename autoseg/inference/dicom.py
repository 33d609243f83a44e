"""DICOM at the edges of ``autoseg predict``: series folders in, DICOM SEG out.

* :func:`find_dicom_series` — the folders under an ``-i`` folder that hold a DICOM series, one
  case each (torch-free, reads 132 bytes per file; the series themselves are checked by
  :func:`autoseg.imageio.read_info` before any prediction).
* :func:`write_dicom_seg` — a label map as a DICOM Segmentation object (binary, one segment per
  foreground label, empty frames omitted) that references the source series' instances, through
  highdicom, an optional dependency (``pip install 'autoseg[dicom]'``).

Pixels always go through :mod:`autoseg.imageio` (SimpleITK/GDCM); pydicom and highdicom only read
headers and write the SEG. A restoration model's image written back as a DICOM series
(``--output-format dicom``) is :mod:`autoseg.inference.dicom_series`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import dicom_series_files, is_dicom_file

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

#: What ``pip`` needs for ``--output-format dicom-seg``.
INSTALL_HINT = "pip install 'autoseg[dicom]'"
#: Coded concept of every segment's category and type: SNOMED CT 85756007 "Tissue", the generic
#: code dcmqi and highdicom's examples use when the plans know a label's name only (the name is
#: the segment's SegmentLabel). Projects with coded anatomy can edit the SEG afterwards.
_GENERIC_CODE = ("85756007", "SCT", "Tissue")
#: Series number of the SEG (a new series in the source's study; viewers sort by it).
SEG_SERIES_NUMBER = 100


def find_dicom_series(root: Path) -> list[tuple[str, Path]]:
    """Every folder under ``root`` (``root`` included) that holds DICOM files: one series each.

    A case is named after its folder; when two folders share a name, after their path below
    ``root`` with ``_`` between the parts. Hidden files and folders are ignored.

    Args:
        root: the folder given with ``-i``.

    Returns:
        ``(case_id, folder)`` pairs, sorted by folder.

    Raises:
        DatasetError: a folder mixes DICOM files with other files (a series folder holds only
            its slices).
    """
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        files = sorted(folder / name for name in filenames if not name.startswith("."))
        dicom = [f for f in files if is_dicom_file(f)]
        if not dicom:
            continue
        others = sorted(set(files) - set(dicom))
        if others:
            raise DatasetError(f"{others[0]}: not a DICOM file, in the DICOM series folder {folder} "
                               f"({len(dicom)} DICOM file(s), {len(others)} other); move it out: a series folder "
                               "holds only its slices")
        found.append(folder)
    names = [_folder_name(f) for f in found]
    if len(set(names)) < len(names):
        names = [_folder_name(f) if f == root else "_".join(f.relative_to(root).parts) for f in found]
    return sorted(zip(names, found), key=lambda pair: pair[1])


def _folder_name(folder: Path) -> str:
    return folder.resolve().name if folder.name in ("", ".", "..") else folder.name


def require_highdicom() -> None:
    """Raise when highdicom (needed for ``--output-format dicom-seg``) is not installed.

    Raises:
        ConfigError: highdicom is missing, with the install command.
    """
    if importlib.util.find_spec("highdicom") is None:
        raise ConfigError(f"--output-format dicom-seg needs highdicom, which is not installed: {INSTALL_HINT}")


def check_seg_source(series_folder: Path) -> None:
    """Raise unless a DICOM SEG can reference the series in ``series_folder`` (headers only).

    Raises:
        DatasetError: see :func:`_source_datasets`.
    """
    _source_datasets(dicom_series_files(series_folder))


def _source_datasets(files: tuple[Path, ...]) -> list["pydicom.Dataset"]:
    """The series' headers, in :func:`autoseg.imageio.dicom_series_files` order (no pixels).

    An empty SOP Class or SOP Instance UID in the dataset is read from the file meta information,
    which PS3.10 requires to hold the same values (some exports blank the dataset's copy).

    Raises:
        DatasetError: a header is unreadable, the series is multi-frame, or it has no study or
            series UID (a SEG must reference both).
    """
    import pydicom

    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(os.fspath(file), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for a damaged header
            raise DatasetError(f"{file}: cannot read the DICOM header ({exc}); re-copy the file") from None
        meta = getattr(ds, "file_meta", None)
        for name, meta_name in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(name, "") or "") and meta is not None and meta.get(meta_name):
                setattr(ds, name, meta.get(meta_name))
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DatasetError(f"{file}: multi-frame DICOM image; --output-format dicom-seg supports series of "
                               "single-frame slices only: use --output-format nifti")
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not str(ds.get(name, "") or ""):
                raise DatasetError(f"{file}: empty {name} (the files were de-identified by blanking UIDs); a DICOM "
                                   "SEG must reference the source study, series and instances: restore the UIDs "
                                   "or use --output-format nifti")
        datasets.append(ds)
    return datasets


def write_dicom_seg(
    path: Path,
    labels: np.ndarray,
    series_folder: Path,
    label_names: Mapping[int, str],
    *,
    version: str,
    parameters: Mapping[str, str] | None = None,
) -> None:
    """Write a label map as a DICOM SEG that references the series it was predicted from.

    A BINARY segmentation with one segment per foreground label (segment number = label value,
    SegmentLabel = the label's name, algorithm "autoseg" ``version``), frames of slices where a
    segment is empty omitted; a new series in the source's study and frame of reference. Written
    atomically.

    Args:
        path: the ``.dcm`` file to write.
        labels: ``(Z, Y, X)`` label map on the series' grid, as :func:`autoseg.imageio.read_image`
            of ``series_folder`` stacks it (slice ``z`` is file ``z`` of
            :func:`autoseg.imageio.dicom_series_files`).
        series_folder: the folder of the source series.
        label_names: ``{value: name}`` of every foreground label (values 1..N).
        version: the autoseg version, recorded as the algorithm's version.
        parameters: recorded as the algorithm's parameters (configurations, folds, ...).

    Raises:
        ConfigError: highdicom is not installed.
        DatasetError: the series' headers do not allow a SEG (multi-frame, blank UIDs) or do not
            match the label map's shape.
    """
    require_highdicom()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series_folder = Path(series_folder)
    files = dicom_series_files(series_folder)
    sources = _source_datasets(files)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape != (len(sources), rows, columns):
        raise DatasetError(f"{series_folder}: the series has {len(sources)} slices of {rows}x{columns}, the label map "
                           f"shape {labels.shape}; predict this series again")
    values = sorted(int(v) for v in label_names if int(v) > 0)
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"foreground labels must be 1..N, got {values}")
    present = int(labels.max()) if labels.size else 0
    if present > len(values):
        raise ValueError(f"label map holds value {present}, but only {len(values)} labels are named")
    concept = hd.sr.CodedConcept(*_GENERIC_CODE)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autoseg", family=codes.cid7162.ArtificialIntelligence, version=version,
        parameters=dict(parameters) if parameters else None,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=str(label_names[value])[:64], segmented_property_category=concept,
            segmented_property_type=concept, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value in values
    ]
    # highdicom logs a warning when every frame is empty and it keeps them all: expected here.
    quiet = logging.getLogger("highdicom")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=np.ascontiguousarray(labels),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="autoseg", manufacturer_model_name="autoseg", software_versions=version,
            device_serial_number="none", series_description="autoseg segmentation", omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom checks the source headers (plane position/orientation, spacing, frame of reference).
        raise DatasetError(f"{series_folder}: its DICOM headers do not allow a DICOM SEG ({exc}); "
                           "use --output-format nifti for this series") from None
    finally:
        quiet.setLevel(level)
    with atomic_path(Path(path)) as tmp:
        seg.save_as(os.fspath(tmp), enforce_file_format=True)
    log.info("%s: DICOM SEG with %d segment(s), %d frame(s)", path, len(segments), int(seg.NumberOfFrames))
