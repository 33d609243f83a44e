"""``autoseg convert dicom-rt``: CT series + RTSTRUCT per patient -> nnU-Net v2 raw layout.

The source layout is the AAPM Lung CT Segmentation Challenge 2017 (LCTSC, TCIA): one folder per
patient, nested subfolders allowed, holding a CT series and one RT Structure Set. Each patient
becomes one case named after its folder::

    RAW/imagesTr/{patient}_0000.nii.gz    the CT (Hounsfield units), geometry from ImagePositionPatient
    RAW/labelsTr/{patient}.nii.gz         the rasterised structures
    RAW/dataset.json                      channel_names {"0": "CT"}, the labels

How contours become voxels:

* Each CLOSED_PLANAR contour (patient coordinates, mm) is mapped to continuous voxel indices
  through the CT's origin, spacing and direction, assigned to the nearest slice, and filled
  in-plane: a voxel is inside when its centre is (even-odd rule, half-open edges, so two contours
  sharing an edge never fill it twice). All contours of one ROI on one slice are filled together by
  the even-odd rule, which is their XOR: an inner contour is a hole, as DICOM PS3.3 C.8.8.6 implies.
* A contour whose plane is not within half a slice of a CT slice is skipped with a warning naming
  the ROI and z; a patient none of whose matched contours lies on the CT is an error (the
  RTSTRUCT does not belong to this CT).
* ROI names are matched to target labels through an alias table, insensitive to case, spaces,
  underscores, hyphens and dots (:data:`DEFAULT_ROI_MAP`; ``--roi-map`` replaces it). ROIs that
  match no label are listed in a warning.

Overlapping structures (``overlap``):

* ``"priority"`` (default): one label map, label ``i`` (1-based, in the ROI map's order) per
  structure; where structures overlap, the one **later** in the map wins. Overlaps are reported as
  warnings with their voxel counts.
* ``"regions"``: no voxel is lost. The bitmask encoding of :mod:`autoseg.convert.common`:
  structure ``i`` owns bit ``2**i``, each structure is declared as a region listing every value with
  its bit set (nnU-Net v2 region format; train with region losses).

A RTSTRUCT whose frame of reference differs from the CT's is an error naming the patient and the
ROI (``allow_frame_mismatch`` turns it into a warning, for exports known to share coordinates).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoseg.convert.common import (
    ConvertSummary,
    ProgressFn,
    bitmask_labels,
    convert_each,
    encode_bitmask,
    prepare_output,
    region_extra,
    safe_case_id,
    short_list,
    write_dataset_json,
)
from autoseg.convert.contours import (
    build_alias_index,
    match_roi,
    overlap_counts,
    parse_roi_map,
    priority_label_map,
    rasterize_contours,
    series_geometry,
)
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry, read_dicom_files, write_image

if TYPE_CHECKING:
    import pydicom

Overlap = Literal["priority", "regions"]
OVERLAP_MODES: tuple[str, ...] = ("priority", "regions")
ENDING = ".nii.gz"

#: Target labels of the LCTSC challenge and the ROI names seen for them in clinical exports. A
#: label's own name is always an alias. Matching ignores case, spaces, ``_``, ``-`` and ``.``.
DEFAULT_ROI_MAP: dict[str, tuple[str, ...]] = {
    "Esophagus": ("Esophagus", "Oesophagus", "Esophagus_NOS", "Eso"),
    "Heart": ("Heart", "Heart_NOS"),
    "Lung_L": ("Lung_L", "Lung L", "LungLeft", "Lung Left", "L Lung", "Left Lung", "Lt Lung", "Lung Lt",
               "Lung_Lt", "L_Lung"),
    "Lung_R": ("Lung_R", "Lung R", "LungRight", "Lung Right", "R Lung", "Right Lung", "Rt Lung", "Lung Rt",
               "Lung_Rt", "R_Lung"),
    "SpinalCord": ("SpinalCord", "Spinal Cord", "Spinal_Cord", "Cord", "Spinal-Cord"),
}

# --------------------------------------------------------------------------------------------
# DICOM reading (pydicom for headers and RTSTRUCT, autoseg.imageio (SimpleITK) for the CT pixels).
# --------------------------------------------------------------------------------------------

_CT_TAGS = ("Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns")


@dataclass(frozen=True)
class CtSlice:
    """Header values of one CT slice file."""

    path: Path
    series_uid: str
    frame_of_reference: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    thickness: float | None


@dataclass(frozen=True)
class Roi:
    """One structure of an RTSTRUCT.

    Attributes:
        number: ROINumber.
        name: ROIName.
        frame_of_reference: the ROI's ReferencedFrameOfReferenceUID (None if not given).
        contours: ``(N, 3)`` points (mm) of each CLOSED_PLANAR contour.
        skipped: contours of other types (POINT, OPEN_PLANAR, ...) or with fewer than 3 points.
    """

    number: int
    name: str
    frame_of_reference: str | None
    contours: tuple[np.ndarray, ...]
    skipped: int


@dataclass(frozen=True)
class StructureSet:
    """The parts of an RTSTRUCT the converter uses."""

    path: Path
    frames: tuple[str, ...]
    series: tuple[str, ...]
    rois: tuple[Roi, ...]


@dataclass(frozen=True)
class PatientFiles:
    """The DICOM files found under one patient folder."""

    patient: str
    folder: Path
    ct_series: dict[str, list[CtSlice]]
    rtstructs: tuple[Path, ...]
    other_modalities: tuple[str, ...]


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ConfigError("autoseg convert dicom-rt needs pydicom: pip install pydicom") from None
    return pydicom


def _read_dicom(path: Path, **kwargs: Any) -> pydicom.Dataset | None:
    """A DICOM dataset, or None for a file that is not DICOM."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(os.fspath(path), **kwargs)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types (EOFError, struct.error, ValueError) for broken files
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise DatasetError(f"{path}: cannot read DICOM file ({type(exc).__name__}: {reason}); "
                           "re-copy or remove it") from None


def _floats(value: Any, count: int, what: str, path: Path) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != count:
        raise DatasetError(f"{path}: {what} is missing or malformed ({value!r}); the CT slice cannot be placed: "
                           "re-export the series")
    return values


def scan_patient(folder: Path, patient: str) -> PatientFiles:
    """Find the CT slices and RTSTRUCTs under a patient folder (headers only).

    Raises:
        DatasetError: a DICOM file is unreadable or a CT slice lacks its position/orientation.
    """
    series: dict[str, list[CtSlice]] = {}
    rtstructs: list[Path] = []
    others: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.lower().endswith((".txt", ".md", ".json", ".csv", ".xml", ".yaml")):
                continue
            path = Path(dirpath) / name
            ds = _read_dicom(path, stop_before_pixels=True, specific_tags=list(_CT_TAGS))
            if ds is None:
                continue
            modality = str(ds.get("Modality", "")).upper()
            if modality == "RTSTRUCT":
                rtstructs.append(path)
            elif modality == "CT":
                thickness = ds.get("SliceThickness")
                series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(CtSlice(
                    path=path,
                    series_uid=str(ds.get("SeriesInstanceUID", "")),
                    frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
                    position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path),  # type: ignore[arg-type]
                    orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path),
                    pixel_spacing=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", path),  # type: ignore[arg-type]
                    rows=int(ds.get("Rows", 0)),
                    columns=int(ds.get("Columns", 0)),
                    thickness=float(thickness) if thickness not in (None, "") else None,
                ))
            elif modality:
                others.add(modality)
    return PatientFiles(patient, folder, series, tuple(rtstructs), tuple(sorted(others)))


def read_structure_set(path: Path) -> StructureSet:
    """Read the ROIs and their contours from an RTSTRUCT file.

    Raises:
        DatasetError: the file is unreadable, or a contour's ContourData is malformed.
    """
    ds = _read_dicom(path)
    if ds is None:
        raise DatasetError(f"{path}: not a DICOM file; re-export the RT Structure Set")
    frames, series = [], []
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        if "FrameOfReferenceUID" in ref:
            frames.append(str(ref.FrameOfReferenceUID))
        for study in ref.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in item:
                    series.append(str(item.SeriesInstanceUID))
    names = {int(item.ROINumber): (str(item.get("ROIName", f"ROI {item.ROINumber}")),
                                   str(item.ReferencedFrameOfReferenceUID)
                                   if "ReferencedFrameOfReferenceUID" in item else None)
             for item in ds.get("StructureSetROISequence", []) if "ROINumber" in item}
    rois: list[Roi] = []
    for item in ds.get("ROIContourSequence", []):
        number = int(item.get("ReferencedROINumber", -1))
        name, frame = names.get(number, (f"ROI {number}", None))
        contours: list[np.ndarray] = []
        skipped = 0
        for contour in item.get("ContourSequence", []):
            data = contour.get("ContourData")
            kind = str(contour.get("ContourGeometricType", "")).upper()
            try:
                points = np.asarray([float(v) for v in (data or [])], dtype=float)
            except (TypeError, ValueError):
                points = np.zeros(1)
            if points.size % 3:
                raise DatasetError(f"{path}: ROI {name!r}: a contour's ContourData holds {points.size} values, not "
                                   "x, y, z triples; re-export the RT Structure Set")
            points = points.reshape(-1, 3)
            if kind != "CLOSED_PLANAR" or len(points) < 3:
                skipped += 1
                continue
            contours.append(points)
        rois.append(Roi(number, name, frame, tuple(contours), skipped))
    return StructureSet(Path(path), tuple(frames), tuple(series), tuple(rois))


def _select_ct(files: PatientFiles, structures: StructureSet) -> list[CtSlice]:
    where = f"{files.folder}: patient {files.patient}"
    if not files.ct_series:
        found = f" (found {', '.join(files.other_modalities)})" if files.other_modalities else ""
        raise DatasetError(f"{where}: no CT series{found}; the converter needs one CT series per patient folder")
    if len(files.ct_series) == 1:
        return next(iter(files.ct_series.values()))
    referenced = [uid for uid in files.ct_series if uid in structures.series]
    if len(referenced) != 1:
        referenced = [uid for uid, slices in files.ct_series.items()
                      if slices[0].frame_of_reference in structures.frames]
    if len(referenced) == 1:
        return files.ct_series[referenced[0]]
    listing = short_list([f"{uid} ({len(s)} slices)" for uid, s in files.ct_series.items()], 3)
    raise DatasetError(f"{where}: {len(files.ct_series)} CT series ({listing}) and the RTSTRUCT does not single one "
                       "out; keep only the planning CT in the patient folder")


def _read_ct_pixels(slices: Sequence[CtSlice]) -> np.ndarray:
    """The CT voxels (HU, rescale applied) in the given slice order, through :mod:`autoseg.imageio`."""
    array = read_dicom_files([s.path for s in slices], "CT")
    if array.dtype.kind in "iu" and array.size and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)  # HU fit int16; the series reader may widen to int32
    return array


# --------------------------------------------------------------------------------------------
# Per patient and per dataset.
# --------------------------------------------------------------------------------------------

def _z_list(values: Sequence[float]) -> str:
    unique = sorted({round(v, 2) for v in values})
    return short_list([f"{v:g}" for v in unique], 6)


def match_rois(rois: Sequence[Roi], alias_index: Mapping[str, str]) -> tuple[dict[str, list[Roi]], list[str]]:
    """Group ROIs by the label their name matches.

    Returns:
        ``{label: [ROIs]}`` and the names of the ROIs that match no label.
    """
    matched: dict[str, list[Roi]] = {}
    unknown: list[str] = []
    for roi in rois:
        label = match_roi(roi.name, alias_index)
        if label is None:
            unknown.append(roi.name)
        else:
            matched.setdefault(label, []).append(roi)
    return matched, unknown


def frame_mismatches(matched: Mapping[str, Sequence[Roi]], frames: Sequence[str],
                     ct_frame: str) -> list[tuple[Roi, str]]:
    """Matched ROIs whose frame of reference is not the CT's, with their frame.

    An ROI without its own ReferencedFrameOfReferenceUID takes the structure set's, when it
    references exactly one; unknown frames are not reported.
    """
    found = []
    for rois in matched.values():
        for roi in rois:
            frame = roi.frame_of_reference or (frames[0] if len(frames) == 1 else None)
            if frame is not None and ct_frame and frame != ct_frame:
                found.append((roi, frame))
    return found


def label_masks(labels: Sequence[str], matched: Mapping[str, Sequence[Roi]], geometry: Geometry,
                shape: tuple[int, int, int]) -> tuple[list[np.ndarray | None], int, list[str]]:
    """Rasterise every label's ROIs (several ROIs of one label are united).

    Returns:
        One mask per label (None for a label without ROI), the number of contours rasterised,
        and notes for the warnings (missed contours naming ROI and z, skipped contour types,
        empty labels, merged ROIs).
    """
    masks: list[np.ndarray | None] = []
    used = 0
    notes: list[str] = []
    for label in labels:
        rois = matched.get(label, [])
        if not rois:
            notes.append(f"no ROI for label {label!r}; it is empty in this case")
            masks.append(None)
            continue
        if len(rois) > 1:
            names = ", ".join(repr(r.name) for r in rois)
            notes.append(f"ROIs {names} all map to label {label!r}; their union is used")
        mask = np.zeros(shape, dtype=bool)
        for roi in rois:
            raster = rasterize_contours(roi.contours, geometry, shape)
            mask |= raster.mask
            used += raster.used
            if raster.missed_z:
                notes.append(f"ROI {roi.name!r}: {len(raster.missed_z)} contour(s) at z = "
                             f"{_z_list(raster.missed_z)} mm lie on no CT slice "
                             f"({_ct_z_range(geometry, shape)}); skipped")
            if roi.skipped:
                notes.append(f"ROI {roi.name!r}: {roi.skipped} contour(s) that are not CLOSED_PLANAR polygons "
                             "(points, open lines) skipped")
        masks.append(mask)
    return masks, used, notes


def convert_patient(folder: Path, patient: str, out: Path, roi_map: Mapping[str, Sequence[str]],
                    overlap: Overlap, allow_frame_mismatch: bool = False) -> list[str]:
    """Convert one patient folder; writes the image, then the label (both atomically).

    Args:
        folder: the patient folder (searched recursively).
        patient: the case id to write.
        out: the raw dataset folder.
        roi_map: ``{label: [aliases]}`` in label order.
        overlap: ``"priority"`` or ``"regions"`` (module docstring).
        allow_frame_mismatch: a frame-of-reference mismatch is a warning, not an error.

    Returns:
        Warnings (one line each).

    Raises:
        DatasetError: no CT/RTSTRUCT, several RTSTRUCTs, a frame-of-reference mismatch, an uneven
            series, no matched ROI, or no matched contour on the CT.
    """
    where = f"{folder}: patient {patient}"
    files = scan_patient(folder, patient)
    if not files.rtstructs:
        raise DatasetError(f"{where}: no RTSTRUCT file found; put the patient's RT Structure Set in its folder")
    if len(files.rtstructs) > 1:
        names = short_list([os.fspath(p.relative_to(folder)) for p in files.rtstructs], 4)
        raise DatasetError(f"{where}: {len(files.rtstructs)} RTSTRUCT files ({names}); keep one per patient folder")
    structures = read_structure_set(files.rtstructs[0])
    if not structures.rois:
        raise DatasetError(f"{where}: {structures.path.name} holds no ROI (an empty or truncated structure set); "
                           "re-export the RT Structure Set")
    slices = _select_ct(files, structures)
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns) or not np.allclose(s.pixel_spacing, first.pixel_spacing) \
                or not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise DatasetError(f"{where}: CT slice {s.path.name} differs from {first.path.name} in size, pixel spacing "
                               "or orientation; the series must share one grid: re-export it")
    order, geometry = series_geometry([s.position for s in slices], first.orientation, first.pixel_spacing,
                                      first.thickness, where)
    slices = [slices[i] for i in order]
    shape = (len(slices), first.rows, first.columns)

    warnings: list[str] = []
    labels = list(roi_map)
    matched, unknown = match_rois(structures.rois, build_alias_index(roi_map))
    if unknown:
        warnings.append(f"patient {patient}: ROI(s) not in the ROI map, ignored: {short_list(sorted(unknown), 12)} "
                        "(add them to --roi-map to keep them)")
    if not matched:
        raise DatasetError(f"{where}: no ROI of {structures.path.name} matches a label ({', '.join(labels)}); its ROIs "
                           f"are {short_list([r.name for r in structures.rois], 12)}: map them with --roi-map")
    for roi, frame in frame_mismatches(matched, structures.frames, first.frame_of_reference):
        message = (f"{where}: ROI {roi.name!r} of {structures.path.name} is in frame of reference {frame}, "
                   f"the CT series in {first.frame_of_reference}")
        if not allow_frame_mismatch:
            raise DatasetError(f"{message}; the contours are not in the CT's coordinates: export the RTSTRUCT "
                               "against this CT (or pass --allow-frame-mismatch if they share coordinates)")
        warnings.append(f"{message}; converted anyway (--allow-frame-mismatch)")

    masks, used, notes = label_masks(labels, matched, geometry, shape)
    warnings.extend(f"patient {patient}: {note}" for note in notes)
    if used == 0:
        raise DatasetError(f"{where}: none of the contours of the matched ROIs lies on a slice of the CT series "
                           f"({_ct_z_range(geometry, shape)}); the RTSTRUCT belongs to another scan: pair it "
                           "with its own CT")

    for (a, b), n in overlap_counts(masks, labels).items():
        how = f"{b!r} wins (--overlap priority)" if overlap == "priority" else "both kept (--overlap regions)"
        warnings.append(f"patient {patient}: {n} voxel(s) belong to both {a!r} and {b!r}; {how}")
    if overlap == "regions":
        label_map = encode_bitmask([m if m is not None else np.zeros(shape, dtype=bool) for m in masks])
    else:
        label_map = priority_label_map(masks, shape)

    image = _read_ct_pixels(slices)
    if image.shape != shape:
        raise DatasetError(f"{where}: the CT series reads as {image.shape[::-1]} voxels, the headers say "
                           f"{shape[::-1]}; re-export the series")
    write_image(out / "imagesTr" / f"{patient}_0000{ENDING}", image, geometry)
    write_image(out / "labelsTr" / f"{patient}{ENDING}", label_map, geometry)
    return warnings


def _ct_z_range(geometry: Geometry, shape: tuple[int, int, int]) -> str:
    direction = np.asarray(geometry.direction).reshape(3, 3)
    origin = np.asarray(geometry.origin)
    ends = [float((origin + direction[:, 2] * geometry.spacing[0] * k)[2]) for k in (0, shape[0] - 1)]
    if shape[0] == 1:
        return f"the CT has one slice, at z = {ends[0]:g} mm"
    return f"the CT's slices span z = {min(ends):g} to {max(ends):g} mm"


def discover_patients(src: Path) -> list[tuple[str, Path]]:
    """Patient folders under ``src`` as ``(case id, folder)``, sorted.

    Every non-hidden subfolder is a patient; a folder without subfolders is itself one patient.

    Raises:
        DatasetError: ``src`` is missing, holds nothing, or two folder names give one case id.
    """
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder not found; pass the folder holding one folder per patient")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if any(p.is_file() for p in src.iterdir()):
            folders = [src]
        else:
            raise DatasetError(f"{src}: the source folder is empty; pass the folder holding one folder per patient")
    patients: dict[str, Path] = {}
    for folder in folders:
        case_id = safe_case_id(folder.name)
        if case_id in patients:
            raise DatasetError(f"{folder}: its name gives the case id {case_id!r}, as {patients[case_id].name} does; "
                               "rename one of the folders")
        patients[case_id] = folder
    return list(patients.items())


def run(src: Path, out: Path, roi_map: Mapping[str, Sequence[str]] | None = None, overlap: Overlap = "priority", *,
        skip_invalid: bool = False, allow_frame_mismatch: bool = False, name: str | None = None,
        progress: ProgressFn | None = None) -> ConvertSummary:
    """Convert every patient under ``src`` into the nnU-Net v2 raw layout at ``out`` (resumable).

    Args:
        src: the folder holding one folder per patient.
        out: the raw dataset folder to write (created; never inside ``src``).
        roi_map: ``{label: [ROI name aliases]}`` in label order (default :data:`DEFAULT_ROI_MAP`).
        overlap: ``"priority"`` or ``"regions"`` (module docstring).
        skip_invalid: a patient that cannot be converted becomes a warning instead of an error.
        allow_frame_mismatch: convert ROIs whose frame of reference differs from the CT's.
        name: dataset name in dataset.json (default: the output folder's name).
        progress: ``progress(done, total)`` after every patient.

    Returns:
        What was written, skipped and left out, and every warning.

    Raises:
        DatasetError: a patient cannot be converted (unless ``skip_invalid``) or none could.
        ConfigError: bad options, or ``out`` holds another conversion.
    """
    if overlap not in OVERLAP_MODES:
        raise ConfigError(f"unknown overlap mode {overlap!r}; use one of {', '.join(OVERLAP_MODES)}")
    roi_map = {k: tuple(v) for k, v in (roi_map or DEFAULT_ROI_MAP).items()}
    parse_roi_map({k: list(v) for k, v in roi_map.items()})
    _pydicom()
    src, out = Path(src), Path(out)
    patients = discover_patients(src)
    label_names = list(roi_map)
    if overlap == "regions":
        labels = bitmask_labels(label_names)
    else:
        labels = {"background": 0, **{label: i for i, label in enumerate(label_names, start=1)}}
    record = {"converter": "dicom-rt", "overlap": overlap, "roi_map": {k: list(v) for k, v in roi_map.items()},
              "allow_frame_mismatch": allow_frame_mismatch}
    record = prepare_output(out, [src], record, "autoseg convert dicom-rt")

    def write_meta() -> None:
        write_dataset_json(out, name=name or out.name, description=f"CT + RTSTRUCT converted from {src} by autoseg "
                           f"convert dicom-rt (overlap: {overlap})", channel_names=["CT"], labels=labels,
                           file_ending=ENDING, record=record, extra=region_extra(labels))

    out.mkdir(parents=True, exist_ok=True)
    write_meta()
    folders = dict(patients)
    written, skipped, failed, warnings = convert_each(
        [patient for patient, _ in patients],
        lambda patient: convert_patient(folders[patient], patient, out, roi_map, overlap, allow_frame_mismatch),
        out, ENDING, skip_invalid=skip_invalid, left_out=lambda patient: "patient skipped: --skip-invalid",
        progress=progress)
    write_meta()
    if not written and not skipped:
        first = warnings[-1] if failed else ""
        raise DatasetError(f"{src}: no patient could be converted; {len(failed)} failed, the last: {first}")
    return ConvertSummary(out, tuple(written), tuple(skipped), tuple(failed), tuple(warnings), labels)
