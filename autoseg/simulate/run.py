"""``autoseg simulate``: clean CT volumes in, a restoration dataset out (the I/O edge of the stage).

Inputs (:func:`find_ct_sources`), one case each:

* a folder of CT volumes (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and/or DICOM
  series folders below it (one series per folder; the case id is the folder's name);
* a segmentation dataset (a folder with ``imagesTr/``): its ``imagesTr/{case}_0000`` images, the
  CT channel, are reused;
* a single volume file.

Every input is read and checked (3D, one channel, HU) before anything is written, and every
problem is reported at once. The output folder must be new or empty: a simulation is never merged
into other data. The layout (nnU-Net-like, a restoration dataset)::

    OUT/imagesTr/{case}_0000{ending}   the degraded input (low dose, or thick slices)
    OUT/targetsTr/{case}{ending}       the clean target: the original, same geometry and dtype
    OUT/dataset.json                   task, channel_names {"0": "CT"}, file_ending, numTraining, and
                                       the record of the simulation (settings, seeds, sources); no labels

Every file is written atomically, dataset.json last: a folder without it is an interrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg._version import __version__
from autoseg.atomic import folder_lock, write_json
from autoseg.convert.common import is_inside, safe_case_id
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import ENDINGS_2D, Geometry, read_image, strip_ending, write_image
from autoseg.inference.dicom import find_dicom_series
from autoseg.simulate.low_dose import (
    MAX_LOG_BIAS,
    MIN_COUNTS,
    MU_WATER_PER_MM,
    PADDING_BELOW_HU,
    REFERENCE_VIEWS,
    LowDose,
    case_seed,
    check_ct,
    check_pixels,
    default_views,
    photons_per_ray,
    simulate_low_dose,
)
from autoseg.simulate.thick_slices import (
    average_slices,
    check_factor,
    kept_slices,
    thick_geometry,
)

#: dataset.json ``task`` of each simulation (issue 12's names).
TASK_DENOISE = "denoise"
TASK_SUPER_RESOLUTION = "super-resolution"
#: Key of the simulation record in dataset.json.
RECORD_KEY = "autoseg_simulate"
#: Endings of the CT volumes read from a folder, and written (3D formats only).
VOLUME_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Problems listed in the one-line error before "and N more".
MAX_LISTED = 3

#: ``progress(done, total)`` in slices (low dose) or cases (thick slices).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class CtSource:
    """One input case: its id and the file or DICOM series folder it is read from."""

    case_id: str
    path: Path


@dataclass(frozen=True)
class SimulateSummary:
    """What a simulation wrote.

    Attributes:
        root: the dataset folder written.
        cases: the case ids, in order.
        task: dataset.json's ``task``.
    """

    root: Path
    cases: tuple[str, ...]
    task: str


def find_ct_sources(root: Path) -> list[CtSource]:
    """The CT inputs under ``root`` (module docstring), sorted by case id.

    Raises:
        DatasetError: ``root`` is missing, holds no CT input, holds 2D images, a segmentation
            dataset whose channel 0 is not CT, or two inputs with the same case id.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: not found; give a folder of CT volumes or DICOM series")
    if root.is_file():
        return [_file_source(root)]
    if (root / "imagesTr").is_dir():
        return _dataset_sources(root)
    sources: list[CtSource] = []
    flat_images = []
    for name in sorted(os.listdir(root)):
        path = root / name
        if name.startswith(".") or not path.is_file():
            continue
        ending = strip_ending(name)[1].lower()
        if ending in ENDINGS_2D:
            flat_images.append(name)
        elif ending in VOLUME_ENDINGS:
            sources.append(_file_source(path))
    if flat_images:
        raise DatasetError(f"{root / flat_images[0]}: a 2D image ({len(flat_images)} in the folder); simulate needs "
                           "3D CT volumes (NIfTI, NRRD, MHA) or DICOM series folders: move the 2D images out")
    sources += [CtSource(safe_case_id(case_id), folder) for case_id, folder in find_dicom_series(root)]
    if not sources:
        raise DatasetError(f"{root}: no CT volumes ({', '.join(VOLUME_ENDINGS)}) or DICOM series folders found")
    return _unique(sorted(sources, key=lambda s: s.case_id))


def _file_source(path: Path) -> CtSource:
    stem, ending = strip_ending(path.name)
    if ending.lower() in ENDINGS_2D:
        raise DatasetError(f"{path}: a 2D image; simulate needs a 3D CT volume (NIfTI, NRRD, MHA) or a DICOM series")
    if ending.lower() not in VOLUME_ENDINGS:
        raise DatasetError(f"{path}: not a CT volume ({', '.join(VOLUME_ENDINGS)}) or a folder of them")
    return CtSource(safe_case_id(stem), path)


def _dataset_sources(root: Path) -> list[CtSource]:
    """Channel 0 of every case of a segmentation dataset (``imagesTr/{case}_0000``, or MSD's single files)."""
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        import json

        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{meta_path}: not valid JSON ({exc}); fix the file") from None
        channels = meta.get("channel_names") or meta.get("modality") or {}
        first = str(channels.get("0", "CT")) if isinstance(channels, dict) else "CT"
        if first.upper() != "CT":
            raise DatasetError(f"{meta_path}: channel 0 is {first!r}, not CT; simulate makes low-dose and thick-slice "
                               "CT: give a CT dataset")
    files = sorted(p for p in (root / "imagesTr").iterdir() if p.is_file() and not p.name.startswith(".")
                   and strip_ending(p.name)[1].lower() in VOLUME_ENDINGS)
    channel0 = [p for p in files if strip_ending(p.name)[0].endswith("_0000")]
    chosen = channel0 or files  # MSD: one (possibly 4D) file per case, no channel suffix
    if not chosen:
        raise DatasetError(f"{root / 'imagesTr'}: no CT volumes ({', '.join(VOLUME_ENDINGS)}) found")
    sources = [CtSource(safe_case_id(strip_ending(p.name)[0].removesuffix("_0000") if channel0
                                     else strip_ending(p.name)[0]), p) for p in chosen]
    return _unique(sources)


def _unique(sources: list[CtSource]) -> list[CtSource]:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.case_id in seen:
            raise DatasetError(f"{source.path}: case id {source.case_id!r} also names {seen[source.case_id]}; "
                               "rename one of them")
        seen[source.case_id] = source.path
    return sources


def check_output(out: Path, sources: Sequence[CtSource], root: Path, file_ending: str) -> None:
    """Raise unless ``out`` may receive a new dataset: new or empty, and outside the input.

    Raises:
        ConfigError: ``out`` is a file, not empty, or inside ``root``; an unknown ``file_ending``.
    """
    if file_ending not in OUTPUT_ENDINGS:
        raise ConfigError(f"--file-ending {file_ending}: expected one of {', '.join(OUTPUT_ENDINGS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose a new output folder")
    inputs = [Path(root)] if Path(root).is_dir() else [s.path for s in sources]
    for source in inputs:
        if is_inside(out, source):
            raise ConfigError(f"{out}: lies inside the input {source}; inputs are never modified: choose an output "
                              "folder outside it")
    if out.is_dir():
        entries = sorted(os.listdir(out))
        if entries:
            raise ConfigError(f"{out}: the output folder is not empty ({len(entries)} entries, e.g. {entries[0]}); "
                              "choose a new folder, or delete this one (an interrupted run leaves one without "
                              "dataset.json)")


def read_ct(source: CtSource) -> tuple[np.ndarray, Geometry]:
    """Read one input as a ``(Z, Y, X)`` CT in HU and its geometry.

    Raises:
        DatasetError: unreadable, 2D, several channels, or not in HU (:func:`check_ct`).
    """
    image, geometry = read_image(source.path)
    if geometry.ndim != 3:
        raise DatasetError(f"{source.path}: a 2D image; simulate needs a 3D CT volume")
    if image.shape[0] != 1:
        raise DatasetError(f"{source.path}: {image.shape[0]} channels; simulate needs a single-channel CT volume")
    check_ct(image[0], str(source.path))
    return image[0], geometry


def check_sources(sources: Sequence[CtSource], check: Callable[[np.ndarray, Geometry, CtSource], None]) -> None:
    """Read every input and apply ``check``; raise one error listing every problem.

    Raises:
        DatasetError: one line, the first :data:`MAX_LISTED` problems and how many more.
    """
    problems = []
    for source in sources:
        try:
            check(*read_ct(source), source)
        except (DatasetError, ConfigError) as exc:
            problems.append(str(exc))
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError("; ".join(problems[:MAX_LISTED]) + more)


def run_low_dose(root: Path, out: Path, settings: LowDose, seed: int = 0, *, file_ending: str = ".nii.gz",
                 name: str | None = None, progress: ProgressFn | None = None) -> SimulateSummary:
    """Simulate a low-dose scan of every full-dose CT under ``root`` into a denoising dataset ``out``.

    Args:
        root: CT inputs (:func:`find_ct_sources`).
        out: the dataset folder to write (new or empty).
        settings: dose, photons, electronic noise, views, filter.
        seed: the run's seed; each case draws from :func:`~autoseg.simulate.low_dose.case_seed`.
        file_ending: of the written images.
        name: dataset name (default: ``out``'s name).
        progress: ``progress(slices done, slices in all)``.

    Raises:
        DatasetError: an input is missing, unreadable, 2D, not HU, or has non-square pixels.
        ConfigError: ``out`` cannot be written (:func:`check_output`).
    """
    sources = find_ct_sources(root)
    check_output(out, sources, root, file_ending)
    depths: dict[str, int] = {}

    def check(volume: np.ndarray, geometry: Geometry, source: CtSource) -> None:
        check_pixels(geometry.spacing, str(source.path))
        depths[source.case_id] = volume.shape[0]

    check_sources(sources, check)
    total, done = sum(depths.values()), 0
    cases: dict[str, Any] = {}
    with folder_lock(out, "simulate"):
        for source in sources:
            volume, geometry = read_ct(source)
            seed_case = case_seed(seed, source.case_id)
            depth, height, width = volume.shape
            views = settings.views or default_views(max(height, width))

            def step(slices: int, before: int = done) -> None:
                if progress is not None:
                    progress(before + slices, total)

            low = simulate_low_dose(volume, geometry.spacing, settings, np.random.default_rng(seed_case), step)
            write_image(out / "imagesTr" / f"{source.case_id}_0000{file_ending}", low, geometry)
            write_image(out / "targetsTr" / f"{source.case_id}{file_ending}", volume, geometry)
            done += depth
            cases[source.case_id] = {
                "source": os.fspath(source.path.resolve()), "seed": seed_case, "views": views,
                "photons_per_ray": photons_per_ray(settings.photons, geometry.spacing[2], geometry.spacing[0], views),
                "dtype": str(volume.dtype),
            }
        record = {
            "simulation": "low-dose", "autoseg_version": __version__, **asdict(settings), "seed": seed,
            "model": "Zeng et al. 2015: Gaussian count noise of variance a(1-a)N + (1-a^2)se^2 added per ray of a "
                     "parallel-beam projection, reconstructed by FBP and added to the original",
            "photons_reference": f"per 1 mm x 1 mm ray, {REFERENCE_VIEWS} views; scaled per case to pixel x slice "
                                 "spacing and the views simulated",
            "mu_water_per_mm": MU_WATER_PER_MM, "padding_below_hu": PADDING_BELOW_HU, "min_counts": MIN_COUNTS,
            "max_log_bias_correction": MAX_LOG_BIAS,
            "cases": cases,
        }
        description = (f"Simulated {settings.dose:g} dose CT (imagesTr) and the full-dose originals (targetsTr), "
                       "made by autoseg simulate low-dose")
        _write_dataset_json(out, name, TASK_DENOISE, description, file_ending, record)
    return SimulateSummary(Path(out), tuple(cases), TASK_DENOISE)


def run_thick_slices(root: Path, out: Path, factor: int, *, file_ending: str = ".nii.gz", name: str | None = None,
                     progress: ProgressFn | None = None) -> SimulateSummary:
    """Average every ``factor`` slices of every CT under ``root`` into a super-resolution dataset ``out``.

    The targets are the originals' first ``Z - Z mod factor`` slices (module
    :mod:`autoseg.simulate.thick_slices`); the record lists the slices dropped per case.

    Args:
        root: CT inputs (:func:`find_ct_sources`).
        out: the dataset folder to write (new or empty).
        factor: thin slices per thick slice, at least 2.
        file_ending: of the written images.
        name: dataset name (default: ``out``'s name).
        progress: ``progress(cases done, cases)``.

    Raises:
        ConfigError: ``factor`` < 2, or ``out`` cannot be written.
        DatasetError: an input is missing, unreadable, 2D, not HU, or has fewer than ``factor`` slices.
    """
    check_factor(factor)
    sources = find_ct_sources(root)
    check_output(out, sources, root, file_ending)

    def check(volume: np.ndarray, geometry: Geometry, source: CtSource) -> None:
        kept_slices(volume.shape[0], factor, str(source.path))

    check_sources(sources, check)
    cases: dict[str, Any] = {}
    with folder_lock(out, "simulate"):
        for index, source in enumerate(sources):
            volume, geometry = read_ct(source)
            kept = kept_slices(volume.shape[0], factor)
            write_image(out / "imagesTr" / f"{source.case_id}_0000{file_ending}", average_slices(volume, factor),
                        thick_geometry(geometry, factor))
            write_image(out / "targetsTr" / f"{source.case_id}{file_ending}", volume[:kept], geometry)
            cases[source.case_id] = {"source": os.fspath(source.path.resolve()), "slices": volume.shape[0],
                                     "thick_slices": kept // factor, "dropped_slices": volume.shape[0] - kept,
                                     "dtype": str(volume.dtype)}
            if progress is not None:
                progress(index + 1, len(sources))
        record = {"simulation": "thick-slices", "autoseg_version": __version__, "factor": factor,
                  "slice_profile": f"box of {factor} thin slices (their mean)",
                  "remainder": "trailing slices that fill no whole slab are dropped from input and target",
                  "cases": cases}
        description = (f"Thick slices (mean of {factor}, imagesTr) and the thin originals (targetsTr), made by "
                       "autoseg simulate thick-slices")
        _write_dataset_json(out, name, TASK_SUPER_RESOLUTION, description, file_ending, record)
    return SimulateSummary(Path(out), tuple(cases), TASK_SUPER_RESOLUTION)


def _write_dataset_json(out: Path, name: str | None, task: str, description: str, file_ending: str,
                        record: dict[str, Any]) -> None:
    """The restoration dataset.json (module docstring); written last, atomically."""
    write_json(Path(out) / "dataset.json", {
        "name": name or Path(out).resolve().name,
        "description": description,
        "task": task,
        "channel_names": {"0": "CT"},
        "file_ending": file_ending,
        "numTraining": len(record["cases"]),
        RECORD_KEY: record,
    })
