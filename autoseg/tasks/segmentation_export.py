"""The segmentation task's export: probabilities on the network grid -> a label map (and, on
request, probabilities) in the input's exact geometry.

Used through :meth:`autoseg.tasks.segmentation.Segmentation.export`; the predictor
(:mod:`autoseg.inference.predictor`) and ``autoseg ensemble`` call it that way.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.imageio import Geometry, write_image
from autoseg.tasks.base import ConfigPrediction

#: Voxels of the crop box exported at a time (2^22: 16 MB per float32 slab volume). The label map
#: is made slab by slab, each slab class by class, so the export holds the label map and a few
#: slab volumes whatever the image size and the number of classes: a 512x512x400 CT (105 M voxels)
#: needed five whole-volume float32 temporaries (2.1 GB) class by class, and 16-MB slabs cost no
#: time (the slab's arrays stay in the caches between a class's resampling and its comparison).
EXPORT_SLAB_VOXELS = 2**22
#: float32 slab volumes one export worker holds at once, besides one per configuration: the class
#: score, the running maximum, the comparison, the label and the resampling's two temporaries.
WORKER_SLAB_VOLUMES = 6
#: Fraction of the available memory the export workers may plan to use (preprocessing's margin).
MEMORY_FRACTION = 0.7


class _NpyStream:
    """Writes one ``.npy`` member of a ``.npz`` archive slice by slice along its first axis.

    ``np.savez`` needs the whole array in memory; this holds one class volume at a time, so saving
    ``(K, Z, Y, X)`` probabilities costs one float16 volume, however many classes there are.
    """

    def __init__(self, archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.handle = archive.open(name + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def write(self, part: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(part, dtype=self.dtype).data)

    def close(self) -> None:
        self.handle.close()


def export_prediction(
    predictions: Sequence[ConfigPrediction],
    geometry: Geometry,
    path: Path | None = None,
    probabilities_path: Path | None = None,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """Average the configurations' probabilities in the original geometry and take the argmax.

    Slab by slab, class by class: each class is resampled back to the crop box (linear, separate
    axis as in the forward pass), averaged over configurations and folded into a running argmax,
    one slab of :data:`EXPORT_SLAB_VOXELS` voxels at a time (:func:`autoseg.preprocessing.pipeline.to_crop_rows`,
    bitwise the rows of the whole-volume resampling). The working memory is the label map and a
    few slab volumes, whatever the number of classes — never a ``(K, Z, Y, X)`` float array nor a
    whole-volume float one. With ``probabilities_path`` the classes are written one after the other
    (the file's order), which needs one float32 volume of the crop box (the running maximum) and
    one float16 volume of the original grid besides. Outside the crop box the probability is 1
    for class 0, as in :func:`autoseg.preprocessing.pipeline.revert_to_original`; for one
    configuration the label map equals :func:`autoseg.preprocessing.pipeline.export_segmentation`'s.

    Args:
        predictions: one per configuration, all of the same image (same crop box).
        geometry: the geometry read from the input: written as it is (no float round trip).
        path: where to write the label map (atomically; format from the ending), or None.
        probabilities_path: where to write float16 probabilities ``(K, Z, Y, X)`` in the original
            geometry as ``.npz`` (key ``probabilities``), or None.
        postprocess: applied to the label map before it is written (best.yaml's postprocessing).
        regions: for sigmoid region probabilities, the ``(R, V)`` membership of
            :func:`autoseg.regions.membership`: the label map follows
            :func:`autoseg.regions.regions_to_labels` (see :func:`_export_regions`).

    Returns:
        The ``(Z, Y, X)`` label map, uint8 (uint16 for more than 256 classes).

    Raises:
        ValueError: the predictions disagree on the crop box or the number of classes (a bug).
    """
    if not predictions:
        raise ValueError("no prediction to export")
    first = predictions[0].props
    num_classes = predictions[0].probabilities.shape[0]
    for p in predictions[1:]:
        if p.props["bbox"] != first["bbox"] or p.probabilities.shape[0] != num_classes:
            raise ValueError("predictions of one image disagree on the crop box or the number of classes")
    shape = tuple(int(s) for s in first["shape_original"])
    transpose = tuple(int(a) for a in first["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in first["bbox"])
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    if regions is not None:
        if regions.shape[0] != num_classes:
            raise ValueError(f"{num_classes} probability channels for {regions.shape[0]} regions")
        dtype = np.uint8 if regions.shape[1] <= 256 else np.uint16
    slabs = export_slabs(predictions)

    if regions is not None:
        labels = _export_regions(predictions, regions, shape, transpose, box, slabs, probabilities_path)
    elif probabilities_path is not None:
        with atomic_path(Path(probabilities_path)) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                stream = _NpyStream(archive, "probabilities", (num_classes, *shape), np.dtype(np.float16))
                try:
                    labels = _argmax_streaming(predictions, num_classes, shape, transpose, box, slabs, dtype, stream)
                finally:
                    stream.close()
    else:
        labels = np.zeros(shape, dtype=dtype)
        target = labels.transpose(transpose)[box]

        def slab_labels(start: int, stop: int) -> None:
            target[start:stop] = _slab_argmax(predictions, num_classes, start, stop, dtype)

        _for_each_slab(slab_labels, slabs, len(predictions))
    if postprocess is not None:
        labels = np.asarray(postprocess(labels), dtype=dtype)
    if path is not None:
        write_image(Path(path), labels, geometry)
    return labels


def export_slabs(predictions: Sequence[ConfigPrediction], voxels: int | None = None) -> list[tuple[int, int]]:
    """The slabs ``[start, stop)`` of the crop box's axis 0 the export goes through, of about
    ``voxels`` voxels (default :data:`EXPORT_SLAB_VOXELS`): one slab of everything when some
    configuration's inverse cannot be cut (:func:`autoseg.preprocessing.pipeline.crop_slabs`)."""
    from autoseg.preprocessing.pipeline import crop_slabs

    size = EXPORT_SLAB_VOXELS if voxels is None else voxels
    return min((crop_slabs(p.props, size) for p in predictions), key=len)


def export_workers(slab_voxels: int, configurations: int, slabs: int) -> int:
    """Threads for the export's slabs: the CPUs this process may use, no more than the slabs, and
    no more than the free memory holds at :data:`WORKER_SLAB_VOLUMES` + one per configuration
    float32 slab volumes each (preprocessing's rule: :data:`MEMORY_FRACTION` of MemAvailable).

    The slabs are independent (each writes its own rows of the label map) and numpy releases the
    interpreter lock in its gathers and element-wise passes, so threads share the work; the
    result does not depend on their number.
    """
    from autoseg.dataset.scan import available_memory_bytes
    from autoseg.distributed import available_cpus

    per_worker = 4 * max(1, slab_voxels) * (WORKER_SLAB_VOLUMES + max(1, configurations))
    by_memory = int(available_memory_bytes() * MEMORY_FRACTION // per_worker)
    return max(1, min(available_cpus(), max(1, slabs), by_memory))


def _for_each_slab(work: Callable[[int, int], None], slabs: Sequence[tuple[int, int]], configurations: int) -> None:
    """``work(start, stop)`` for every slab, on :func:`export_workers` threads (in order on one)."""
    workers = export_workers(EXPORT_SLAB_VOXELS, configurations, len(slabs))
    if workers <= 1:
        for start, stop in slabs:
            work(start, stop)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="autoseg-export") as pool:
        for future in [pool.submit(work, start, stop) for start, stop in slabs]:
            future.result()  # a worker's exception is raised here, with its traceback


def _update_argmax(best_value: np.ndarray, best_label: np.ndarray, score: np.ndarray, k: int) -> None:
    """Fold class ``k``'s ``score`` into the running maximum and its label, in place."""
    better = np.greater(score, best_value)  # strict: ties go to the lower class, as argmax does
    # fmax keeps the maximum where score is NaN, as the comparison does; 1.7x faster than copying
    # the better scores over (a masked copy).
    np.fmax(best_value, score, out=best_value)
    np.copyto(best_label, np.asarray(k, dtype=best_label.dtype), where=better)


def _slab_argmax(predictions: Sequence[ConfigPrediction], num_classes: int, start: int, stop: int,
                 dtype: type[np.integer]) -> np.ndarray:
    """The label map of crop-box rows ``[start, stop)``: argmax of the configurations' mean class probabilities."""
    best_value = _mean_class_rows(predictions, 0, start, stop)
    best_label = np.zeros(best_value.shape, dtype=dtype)
    for k in range(1, num_classes):
        _update_argmax(best_value, best_label, _mean_class_rows(predictions, k, start, stop), k)
    return best_label


def _argmax_streaming(predictions: Sequence[ConfigPrediction], num_classes: int, shape: tuple[int, ...],
                      transpose: tuple[int, ...], box: tuple[slice, ...], slabs: Sequence[tuple[int, int]],
                      dtype: type[np.integer], stream: _NpyStream) -> np.ndarray:
    """The label map, class by class (each class slab by slab), writing each class's probabilities
    in the original grid to ``stream`` as float16 before the next."""
    crop_shape = tuple(s.stop - s.start for s in box)
    best_value = np.empty(crop_shape, dtype=np.float32)
    best_label = np.zeros(crop_shape, dtype=dtype)
    full = np.empty(shape, dtype=np.float16)
    full_box = full.transpose(transpose)[box]
    for k in range(num_classes):
        full.fill(1.0 if k == 0 else 0.0)

        def slab_class(start: int, stop: int, k: int = k) -> None:
            score = _mean_class_rows(predictions, k, start, stop)
            full_box[start:stop] = score
            if k == 0:
                best_value[start:stop] = score
            else:
                _update_argmax(best_value[start:stop], best_label[start:stop], score, k)

        _for_each_slab(slab_class, slabs, len(predictions))
        stream.write(full)
    labels = np.zeros(shape, dtype=dtype)
    labels.transpose(transpose)[box] = best_label
    return labels


def _mean_class_rows(predictions: Sequence[ConfigPrediction], k: int, start: int, stop: int) -> np.ndarray:
    """Crop-box rows ``[start, stop)`` of class (or region) ``k``'s probability, averaged over the
    configurations (a new array: the running argmax writes into it)."""
    from autoseg.preprocessing.pipeline import to_crop_rows

    total = None
    for p in predictions:
        part = to_crop_rows(p.probabilities[k], p.props, start, stop)
        if total is None:
            # A copy when resampling was a no-op, so the running argmax never writes into the input.
            total = np.array(part, dtype=np.float32, copy=np.shares_memory(part, p.probabilities))
        else:
            total += part
    assert total is not None
    if len(predictions) > 1:
        total /= len(predictions)
    return total


def _mean_class_probability(predictions: Sequence[ConfigPrediction], k: int) -> np.ndarray:
    """Class (or region) ``k``'s probability in the crop box, averaged over the configurations (a new array)."""
    return _mean_class_rows(predictions, k, 0, int(predictions[0].props["shape_after_crop"][0]))


def input_grid_probabilities(predictions: Sequence[ConfigPrediction], regions: bool = False) -> np.ndarray:
    """The configurations' mean probabilities in the original grid, float32 ``(K, Z, Y, X)``: the
    values :func:`export_prediction` takes its argmax of (and writes as float16 with
    ``probabilities_path``). Outside the crop box class 0 is certain; region probabilities are 0 there.

    Raises:
        ValueError: no prediction.
    """
    if not predictions:
        raise ValueError("no prediction to export")
    first = predictions[0].props
    shape = tuple(int(s) for s in first["shape_original"])
    transpose = tuple(int(a) for a in first["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in first["bbox"])
    count = predictions[0].probabilities.shape[0]
    result = np.zeros((count, *shape), dtype=np.float32)
    if not regions:
        result[0] = 1.0
    for k in range(count):
        result[k].transpose(transpose)[box] = _mean_class_probability(predictions, k)
    return result


def _export_regions(predictions: Sequence[ConfigPrediction], member: np.ndarray, shape: tuple[int, ...],
                    transpose: tuple[int, ...], box: tuple[slice, ...], slabs: Sequence[tuple[int, int]],
                    probabilities_path: Path | None) -> np.ndarray:
    """The region branch of :func:`export_prediction`.

    The export rule needs every region at once, so the ``R`` region volumes of a slab are held
    together (R is small: BraTS has 3); with ``probabilities_path`` those of the whole crop box
    (each region is written whole, in the file's order). Outside the crop box every region's
    probability is 0 (background). The ``.npz`` also holds ``regions``, the ``(R, V)`` membership
    as uint8, so that ``autoseg ensemble`` exports averaged region probabilities by the same rule.
    """
    from autoseg.regions import regions_to_labels

    count = member.shape[0]
    labels = np.zeros(shape, dtype=np.uint8 if member.shape[1] <= 256 else np.uint16)
    target = labels.transpose(transpose)[box]
    if probabilities_path is None:
        def slab_labels(start: int, stop: int) -> None:
            target[start:stop] = regions_to_labels(
                [_mean_class_rows(predictions, r, start, stop) for r in range(count)], member)

        _for_each_slab(slab_labels, slabs, len(predictions) + count)
        return labels
    crop = [_mean_class_probability(predictions, r) for r in range(count)]
    with atomic_path(Path(probabilities_path)) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            stream = _NpyStream(archive, "probabilities", (len(crop), *shape), np.dtype(np.float16))
            try:
                full = np.empty(shape, dtype=np.float16)
                for volume in crop:
                    full.fill(0.0)
                    full.transpose(transpose)[box] = volume
                    stream.write(full)
            finally:
                stream.close()
            with archive.open("regions.npy", "w") as handle:
                np.lib.format.write_array(handle, member.astype(np.uint8))
    target[...] = regions_to_labels(crop, member)
    return labels
