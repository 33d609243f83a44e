"""``autoseg ensemble``: average saved class probabilities of several predictions, then argmax.

Each input folder holds, per case, ``<case>.npz`` (key ``"probabilities"``: ``(K, Z, Y, X)``
softmax probabilities in the original geometry, K classes including background, as the predictor
writes them with ``--save-probabilities``) next to ``<case>.<ending>`` (the label map). The cases are
those of the first folder; every other folder must hold them too (extra cases in other folders are
reported and ignored). The output label map of class index ``k`` is label value ``k`` (labels are
consecutive 0..K-1 in both nnU-Net and autoseg) and is written with the geometry of the first
folder's label map of the case.

Region-based predictions (sigmoid outputs, :mod:`autoseg.regions`) carry a second array,
``"regions"`` (``(R, V)`` membership); their averaged probabilities are exported by
:func:`autoseg.regions.regions_to_labels` (0.5 thresholds on consistent predictions) instead of argmax.

Memory is one case at a time: a float32 running sum plus one loaded array.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.errors import ConfigError, DatasetError
from autoseg.evaluation.evaluate import ProgressFn, choose_workers, label_files, map_pool, process_pool
from autoseg.imageio import read_info, write_image

#: Key of the probabilities in a ``.npz`` file (the predictor's convention).
PROBABILITIES_KEY = "probabilities"
#: Key of the region membership ``(R, V)`` in the ``.npz`` of region-based predictions.
REGIONS_KEY = "regions"


@dataclass(frozen=True)
class EnsembleResult:
    """What ``autoseg ensemble`` wrote.

    Attributes:
        cases: the case ids written, sorted.
        out: the output folder.
        ignored: folder -> cases it holds that the first folder does not (not ensembled).
    """

    cases: tuple[str, ...]
    out: Path
    ignored: dict[str, tuple[str, ...]]


def probability_files(folder: Path) -> dict[str, Path]:
    """Case id -> ``.npz`` file in ``folder`` (hidden and temporary files skipped).

    Raises:
        DatasetError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found; pass folders written with --save-probabilities")
    return {name[:-4]: folder / name for name in sorted(os.listdir(folder))
            if name.endswith(".npz") and not name.startswith(".")}


def npz_shape(path: Path) -> tuple[int, ...]:
    """The shape of the probabilities in a ``.npz`` file, from its header only (nothing decompressed
    beyond the header).

    Raises:
        DatasetError: not a readable npz, or no ``probabilities`` array in it.
    """
    try:
        with zipfile.ZipFile(path) as archive, archive.open(PROBABILITIES_KEY + ".npy") as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(handle)
    except KeyError:
        raise DatasetError(f"{path}: no {PROBABILITIES_KEY!r} array in the file; write it with the predictor's "
                           "--save-probabilities") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: cannot read probabilities ({exc}); the file is corrupt or truncated") from None
    return tuple(int(s) for s in shape)


def load_probabilities(path: Path) -> np.ndarray:
    """The ``(K, Z, Y, X)`` probabilities stored in ``path``, dtype as stored.

    Raises:
        DatasetError: unreadable file, missing key, or not a 4D array.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if PROBABILITIES_KEY not in data.files:
                raise DatasetError(f"{path}: no {PROBABILITIES_KEY!r} array in the file (found {data.files}); "
                                   "write it with the predictor's --save-probabilities")
            probabilities = data[PROBABILITIES_KEY]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read probabilities ({exc}); the file is corrupt or truncated") from None
    if probabilities.ndim != 4:
        raise DatasetError(f"{path}: probabilities have shape {probabilities.shape}; expected (classes, z, y, x)")
    return probabilities


def average_probabilities(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The mean of equally shaped probability arrays, as float32 (accumulated one at a time).

    Raises:
        ValueError: no arrays, or shapes differ.
    """
    total: np.ndarray | None = None
    count = 0
    for array in arrays:
        if total is None:
            total = array.astype(np.float32, copy=True)
        elif array.shape != total.shape:
            raise ValueError(f"probability shapes differ: {array.shape} vs {total.shape}")
        else:
            total += array
        count += 1
    if total is None:
        raise ValueError("average_probabilities needs at least one array")
    total /= count
    return total


def load_regions(path: Path) -> np.ndarray | None:
    """The ``(R, V)`` bool region membership stored beside region probabilities; None for classes.

    Raises:
        DatasetError: unreadable file.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[REGIONS_KEY].astype(bool) if REGIONS_KEY in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read probabilities ({exc}); the file is corrupt or truncated") from None


def probabilities_to_labels(probabilities: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
    """Argmax over the class axis: class index = label value; uint8 (uint16 beyond 256 classes).

    With ``regions`` (the ``(R, V)`` membership) the probabilities are sigmoid region outputs and
    the label map follows :func:`autoseg.regions.regions_to_labels`.
    """
    if regions is not None:
        from autoseg.regions import regions_to_labels

        return regions_to_labels(probabilities, regions)
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    return np.argmax(probabilities, axis=0).astype(dtype)


def write_probabilities(path: Path, probabilities: np.ndarray, regions: np.ndarray | None = None) -> None:
    """Atomically write ``probabilities`` as float16 under the key ``probabilities`` (compressed npz),
    with the region membership under ``regions`` when given."""
    arrays = {PROBABILITIES_KEY: probabilities.astype(np.float16)}
    if regions is not None:
        arrays[REGIONS_KEY] = regions.astype(np.uint8)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def case_regions(case_id: str, sources: Sequence[Path]) -> np.ndarray | None:
    """The region membership shared by a case's ``.npz`` files (None: softmax classes in all).

    Raises:
        DatasetError: the files disagree (region and class probabilities, or other regions).
    """
    first = load_regions(sources[0])
    for path in sources[1:]:
        other = load_regions(path)
        if (first is None) != (other is None) or (first is not None and not np.array_equal(first, other)):
            raise DatasetError(f"case {case_id!r}: {path} and {sources[0]} hold probabilities of different labels "
                               "(regions vs classes, or other regions); ensemble predictions of one label set")
    return first


def ensemble_case(case_id: str, sources: Sequence[Path]) -> np.ndarray:
    """The averaged probabilities of one case over ``sources`` (its ``.npz`` in each folder).

    Raises:
        DatasetError: a file is unreadable, or shapes differ (naming the case and both files).
    """
    def arrays() -> Iterable[np.ndarray]:
        first_shape: tuple[int, ...] | None = None
        for path in sources:
            array = load_probabilities(path)
            if first_shape is not None and array.shape != first_shape:
                raise DatasetError(f"case {case_id!r}: {path} has probabilities of shape {array.shape} but "
                                   f"{sources[0]} has {first_shape}; ensemble predictions of the same images")
            first_shape = array.shape
            yield array

    return average_probabilities(arrays())


def _ensemble_task(args: tuple[str, tuple[Path, ...], Path, Path, bool]) -> str:
    case_id, sources, label_map, out, save_probabilities = args
    regions = case_regions(case_id, sources)
    probabilities = ensemble_case(case_id, sources)
    info = read_info(label_map)
    if info.shape != probabilities.shape[1:]:
        raise DatasetError(f"case {case_id!r}: {label_map} has shape {info.shape} but the probabilities have "
                           f"{probabilities.shape[1:]}; the label map and the .npz must come from one prediction")
    ending = label_map.name[len(case_id):]
    write_image(out / f"{case_id}{ending}", probabilities_to_labels(probabilities, regions), info.geometry)
    if save_probabilities:
        write_probabilities(out / f"{case_id}.npz", probabilities, regions)
    return case_id


def run(folders: Sequence[Path], out: Path, save_probabilities: bool = False, workers: int | None = None,
        progress: ProgressFn | None = None) -> EnsembleResult:
    """Ensemble the predictions in ``folders`` into ``out``.

    Args:
        folders: prediction folders (at least two), each with ``<case>.npz``; the first also holds
            the label maps whose geometry the output copies.
        out: output folder (created).
        save_probabilities: also write the averaged probabilities (``<case>.npz``, float16).
        workers: processes (default: CPU count, bounded by free memory).
        progress: called as ``progress(done, total)`` after each case.

    Raises:
        ConfigError: fewer than two folders, or ``out`` is one of them.
        DatasetError: no probabilities in the first folder, a case missing from a folder or its
            label map missing from the first, shapes that differ.
    """
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ConfigError(f"ensemble needs at least two prediction folders, got {len(folders)}; "
                          "pass DIR_A DIR_B [...]")
    out = Path(out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise ConfigError(f"{out}: the output folder is one of the inputs; choose a new folder")
    per_folder = [probability_files(f) for f in folders]
    cases = sorted(per_folder[0])
    if not cases:
        raise DatasetError(f"{folders[0]}: no .npz probabilities; predict with --save-probabilities")
    label_maps = label_files(folders[0])
    tasks = []
    for case in cases:
        for folder, files in zip(folders[1:], per_folder[1:]):
            if case not in files:
                raise DatasetError(f"{folder}: case {case!r} has no {case}.npz (it is in {folders[0]}); "
                                   "predict the same cases in every folder with --save-probabilities")
        if case not in label_maps:
            raise DatasetError(f"{folders[0]}: case {case!r} has {case}.npz but no label map beside it; "
                               "the ensemble copies that file's geometry")
        sources = tuple(files[case] for files in per_folder)
        tasks.append((case, sources, label_maps[case], out, save_probabilities))
    ignored = {os.fspath(folder): tuple(sorted(set(files) - set(cases)))
               for folder, files in zip(folders[1:], per_folder[1:]) if set(files) - set(cases)}
    shape = npz_shape(per_folder[0][cases[0]])
    # A float32 sum, one loaded (float16 or float32) array and the uint8 result per case.
    bytes_per_case = int(np.prod(shape)) * 10
    out.mkdir(parents=True, exist_ok=True)
    with process_pool(choose_workers(workers, len(tasks), bytes_per_case)) as pool:
        done = sorted(map_pool(_ensemble_task, tasks, pool, progress))
    return EnsembleResult(tuple(done), out, ignored)
