"""The Python API: :class:`Segmenter`, a trained model loaded once and called on images.

::

    from autoseg import Segmenter

    segmenter = Segmenter.load("hippo.autoseg.zip", device="cpu")   # or a WORK folder
    labels = segmenter(sitk_image)                                   # same geometry as the input
    labels, probabilities = segmenter.predict_array(array, spacing=(1.0, 1.0, 1.0))

``autoseg predict`` runs every case through :meth:`Segmenter.write_case`, and the calls above go
through the same :meth:`Segmenter._segment`: the CLI and the API are one code path (prediction,
fold averaging, export, best.yaml's postprocessing).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import SPACING_2D_AXIS, Geometry, from_sitk, is_sitk_image, read_image, to_sitk, write_image
from autoseg.inference.inputs import InputCase, is_2d_plans, read_input
from autoseg.inference.models import ModelSelection
from autoseg.inference.predictor import Predictor, PredictorStats

if TYPE_CHECKING:
    import SimpleITK

    from autoseg.inference.dicom_series import SeriesWritten
    from autoseg.inference.outputs import CaseOutputs
    from autoseg.tasks import ConfigPrediction

log = logging.getLogger(__name__)

#: What :meth:`Segmenter.__call__` takes: a SimpleITK image, an image file or DICOM series folder,
#: or one of those per channel.
ImageLike = Union["SimpleITK.Image", str, os.PathLike, Sequence[Any]]


def postprocessor(best: dict[str, Any] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """best.yaml's postprocessing as a function of the label map; None when there is none to do.

    Raises:
        ConfigError: best.yaml's postprocessing record is invalid.
    """
    spec = best.get("postprocessing") if best else None
    if not spec:
        return None
    from autoseg.evaluation.postprocess import PostprocessingDecision, apply_postprocessing

    decision = PostprocessingDecision.from_dict(spec, "best.yaml: postprocessing")
    if decision.is_noop:
        return None
    return lambda labels: apply_postprocessing(labels, decision)


class Segmenter:
    """A trained model (its configurations and folds), loaded once, segmenting one image per call.

    Build it with :meth:`load`. The networks stay loaded between calls (no per-call start-up).
    Calls are thread-safe: a lock lets one prediction at a time through the networks (a server
    may share one Segmenter between request threads; to predict in parallel, load one per device).

    Attributes:
        predictor: the networks and the sliding window (:class:`~autoseg.inference.predictor.Predictor`).
        selections: the configurations and folds used.
        checkpoint: the checkpoint kind of the folds (``final``, ``best``).
        source: the WORK folder or model file it was loaded from (None when built from parts).
    """

    def __init__(self, predictor: Predictor, selections: Sequence[ModelSelection], *,
                 best: dict[str, Any] | None = None, checkpoint: str = "final", source: Path | None = None) -> None:
        self.predictor = predictor
        self.selections = tuple(selections)
        self.checkpoint = checkpoint
        self.source = source
        self._postprocess = postprocessor(best)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: str = "auto", configurations: Sequence[str] | None = None,
             folds: Sequence[int] | None = None, checkpoint: str | None = None, tta: bool = True,
             step: float = 0.5, engine: str = "auto", precision: str = "auto") -> Segmenter:
        """Load a model file (``autoseg export``) or the trained folds of a WORK folder.

        Args:
            source: a model file or an experiment folder.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
            configurations: configuration names (default: best.yaml's, else the single trained one).
            folds: folds to average (default: every fold of the file, or every trained fold).
            checkpoint: ``final``, ``best`` or ``latest`` for a WORK folder (None: ``final``); a
                model file holds one kind (None, or that kind).
            tta: mirroring test-time augmentation.
            step: window stride as a fraction of the patch.
            engine: ``auto``, ``torch``, ``openvino`` or ``onnxruntime`` (``auto``: OpenVINO on the CPU
                where ``autoseg[openvino]`` is installed, else torch; :mod:`autoseg.inference.engines`).
            precision: ``auto``, ``fp32``, ``bf16`` or ``int8``.

        Raises:
            AutosegError: a damaged or unsafe model file, a bad WORK, configuration, fold or device
                (one-line message).
        """
        from autoseg.inference.model_export import open_model

        with open_model(Path(source), checkpoint) as opened:
            selections, best = opened.select(configurations, folds)
            return cls.from_work(opened.work, selections, best, device=device, tta=tta, step=step,
                                 checkpoint=opened.checkpoint, source=Path(source), engine=engine,
                                 precision=precision)

    @classmethod
    def from_work(cls, work: Path, selections: Sequence[ModelSelection], best: dict[str, Any] | None = None, *,
                  device: str = "auto", tta: bool = True, step: float = 0.5, checkpoint: str = "final",
                  source: Path | None = None, engine: str = "auto", precision: str = "auto") -> Segmenter:
        """Load chosen folds of WORK (:func:`autoseg.inference.models.select_models` chose them)."""
        predictor = Predictor(work, selections, device=device, tta=tta, step=step, engine=engine, precision=precision)
        return cls(predictor, selections, best=best, checkpoint=checkpoint, source=source)

    # -- what it is

    @property
    def labels(self) -> dict[str, list[int]]:
        """Label name -> values, background included."""
        return dict(self.predictor.labels)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The input channels the model expects, in order."""
        return self.predictor.channel_names

    @property
    def configurations(self) -> dict[str, tuple[int, ...]]:
        """Configuration -> folds averaged."""
        return {s.configuration: s.folds for s in self.selections}

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    @property
    def engine(self) -> str:
        """What runs the networks, e.g. ``openvino bf16 (the CPU has bf16 units)`` (:mod:`autoseg.inference.engines`)."""
        return self.predictor.engine.describe()

    @property
    def is_2d(self) -> bool:
        """True for a model trained on 2D images (PNG, ...): arrays are ``(Y, X)`` / ``(C, Y, X)``."""
        return is_2d_plans(self.predictor.plans)

    @property
    def stats(self) -> PredictorStats:
        """Time spent so far (network calls, preprocessing, export)."""
        return self.predictor.stats

    @property
    def postprocessing(self) -> bool:
        """Whether best.yaml's postprocessing is applied to every label map."""
        return self._postprocess is not None

    def __repr__(self) -> str:
        used = ", ".join(f"{name} folds {' '.join(map(str, folds))}" for name, folds in self.configurations.items())
        choice = self.predictor.engine
        return f"Segmenter({used}; {self.device}, {choice.engine} {choice.precision}; source={str(self.source)!r})"

    # -- calls

    def __call__(self, image: ImageLike) -> "SimpleITK.Image":
        """Segment one image: a SimpleITK image, an image file, a DICOM series folder, or a list of
        those with one per input channel.

        Returns:
            The label map as a SimpleITK image with the input's size, spacing, origin and direction.

        Raises:
            DatasetError: unreadable input, wrong channel count or dimensionality for the model.
        """
        array, geometry = self._read(image)
        labels, _, _ = self._segment(array, geometry)
        return to_sitk(labels, self.predictor.task.output_geometry(geometry))

    def predict_array(self, array: np.ndarray, spacing: Sequence[float], origin: Sequence[float] | None = None,
                      direction: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment a numpy array.

        Args:
            array: ``(Z, Y, X)`` or ``(C, Z, Y, X)``; for a model trained on 2D images
                (:attr:`is_2d`) ``(Y, X)`` or ``(C, Y, X)``. Channels first, in :attr:`channel_names` order.
            spacing: voxel size in mm in the array's axis order (``(z, y, x)``, 2D ``(y, x)``).
            origin: ITK order ``(x, y[, z])`` (default 0); it does not change the prediction.
            direction: row-major direction cosines, ITK order (default identity).

        Returns:
            The label map in the array's spatial shape (uint8; uint16 above 256 classes) and the
            probabilities, float32 ``(K, *spatial)`` (segmentation: softmax per class, background
            first; region-based labels: one sigmoid per region).

        Raises:
            DatasetError: wrong shape, channel count or spacing.
            ConfigError: the model's task has no probabilities (restoration).
        """
        if not self.predictor.task.extra_outputs:
            raise ConfigError(f"predict_array: a {self.predictor.task.name} model has no probabilities; call the "
                              "Segmenter on an image (segmenter(image)) for the restored image")
        image, geometry = self._array_input(np.asarray(array), spacing, origin, direction)
        labels, probabilities, _ = self._segment(image, geometry, probabilities=True)
        assert probabilities is not None
        if geometry.ndim == 2:
            return labels[0], probabilities[:, 0]
        return labels, probabilities

    def write_case(self, case: InputCase, targets: "CaseOutputs", *, progress: Callable[[int, int], None] | None = None,
                   uncertainty: bool = False, warnings: list[str] | None = None) -> Path:
        """Predict one ``autoseg predict`` case and write every output of ``targets`` (label maps,
        probabilities, uncertainty maps, DICOM SEG, restored DICOM series); returns the primary output.

        What the writers have to say of the outputs (a DICOM series' clipped voxels, new UIDs for
        blank ones), one line each, is appended to ``warnings``, or logged as warnings without it."""
        image, geometry = read_input(case)
        self._warn_sides(geometry, case.images[0], warnings)
        labels, _, predictions = self._segment(image, geometry, targets=targets, progress=progress,
                                               uncertainty=uncertainty)
        for extra in targets.labels[1:]:
            write_image(extra, labels, self.predictor.task.output_geometry(geometry))
        if targets.uncertainty is not None:
            from autoseg.inference.uncertainty import export_uncertainty

            export_uncertainty(predictions, geometry, targets.uncertainty,
                               regions=self.predictor.task.membership is not None)
        if targets.seg is not None:
            from autoseg._version import __version__
            from autoseg.inference.dicom import write_dicom_seg

            used = "; ".join(f"{s.configuration} folds {' '.join(str(f) for f in s.folds)}" for s in self.selections)
            write_dicom_seg(targets.seg, labels, case.images[0], self.predictor.task.segment_names(),
                            version=__version__, parameters={"models": used, "checkpoint": self.checkpoint,
                                                             "tta": "on" if self.predictor.tta else "off"})
        if targets.series is not None:
            lines = self._write_series(targets.series, labels, geometry, case.images[0]).warnings
            if warnings is not None:
                warnings.extend(lines)
            else:
                for line in lines:
                    log.warning("%s", line)
        return targets.primary

    def _warn_sides(self, geometry: Geometry, source: Path, warnings: list[str] | None) -> None:
        """Say it (into ``warnings``, else the log) when ``source`` is oriented against a model that
        learned left/right labels (:func:`autoseg.planning.mirroring.side_warning`)."""
        from autoseg.planning.mirroring import side_warning

        said = {side_warning(geometry.direction, m.config.orientation, str(source)) for m in self.predictor.models}
        for line in sorted(s for s in said if s):
            if warnings is not None:
                warnings.append(line)
            else:
                log.warning("%s", line)

    def _write_series(self, folder: Path, restored: np.ndarray, geometry: Geometry, source: Path) -> "SeriesWritten":
        """The restored image as a DICOM series beside its ``source`` series (``--output-format dicom``)."""
        from autoseg._version import __version__
        from autoseg.inference.dicom_series import DONE_BY_TASK, write_dicom_series

        done = DONE_BY_TASK.get(self.predictor.task.name, "restored")
        configs = " + ".join(s.configuration for s in self.selections)
        used = "; ".join(f"{s.configuration} folds {' '.join(str(f) for f in s.folds)}" for s in self.selections)
        return write_dicom_series(folder, restored, geometry, source, what=f"{done} by autoseg {configs}",
                                  derivation=f"{done} by autoseg {__version__}: {used}, checkpoint {self.checkpoint}, "
                                             f"TTA {'on' if self.predictor.tta else 'off'}")

    # -- the one path every call takes

    def _segment(self, image: np.ndarray, geometry: Geometry, *, targets: "CaseOutputs | None" = None,
                 probabilities: bool = False, uncertainty: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None, list["ConfigPrediction"]]:
        """Predict, export (writing ``targets``' label map and probabilities when given) and
        postprocess one image, holding the lock."""
        with self._lock:
            predictions = self.predictor.predict(image, geometry, progress=progress, uncertainty=uncertainty)
            labels = self.predictor.export(predictions, geometry,
                                           targets.labels[0] if targets is not None and targets.labels else None,
                                           targets.probabilities if targets is not None else None, self._postprocess)
            grid = self.predictor.task.probabilities(predictions) if probabilities else None
        return labels, grid, predictions

    def _read(self, image: ImageLike) -> tuple[np.ndarray, Geometry]:
        if is_sitk_image(image):
            return from_sitk(image)
        if isinstance(image, (str, os.PathLike)):
            return read_image(Path(image))
        if isinstance(image, Sequence) and image and not isinstance(image, (bytes, bytearray)):
            parts = [self._read(part) for part in image]
            for array, _ in parts[1:]:
                if array.shape[1:] != parts[0][0].shape[1:]:
                    raise DatasetError(f"channel images of shapes {parts[0][0].shape[1:]} and {array.shape[1:]}; the "
                                       "channels of a case must share one grid")
            return np.concatenate([array for array, _ in parts], axis=0), parts[0][1]
        raise TypeError(f"expected a SimpleITK image, a path, or a list of them (one per channel), not "
                        f"{type(image).__name__}; for numpy arrays use predict_array(array, spacing)")

    def _array_input(self, array: np.ndarray, spacing: Sequence[float], origin: Sequence[float] | None,
                     direction: Sequence[float] | None) -> tuple[np.ndarray, Geometry]:
        dims = 2 if self.is_2d else 3
        axes = "(Y, X) or (C, Y, X)" if dims == 2 else "(Z, Y, X) or (C, Z, Y, X)"
        if array.ndim == dims:
            array = array[None]
        elif array.ndim != dims + 1:
            raise DatasetError(f"array of shape {array.shape}: expected {axes} for this "
                               f"{'2D' if dims == 2 else '3D'} model")
        values = tuple(float(s) for s in spacing)
        if len(values) != dims or not all(np.isfinite(values)) or min(values) <= 0:
            raise DatasetError(f"spacing {tuple(spacing)}: expected {dims} positive sizes in mm, in the array's "
                               f"axis order ({'y, x' if dims == 2 else 'z, y, x'})")
        origin = tuple(float(v) for v in origin) if origin is not None else (0.0,) * dims
        direction = tuple(float(v) for v in direction) if direction is not None else \
            tuple(float(r == c) for r in range(dims) for c in range(dims))
        if len(origin) != dims or len(direction) != dims * dims:
            raise ConfigError(f"origin {origin} / direction {direction}: expected {dims} and {dims * dims} values "
                              "(ITK order, as SimpleITK's GetOrigin() and GetDirection())")
        if dims == 2:
            return array[:, None], Geometry((SPACING_2D_AXIS, *values), origin, direction, 2)
        return array, Geometry(values, origin, direction, 3)  # type: ignore[arg-type]
