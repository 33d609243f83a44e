"""The task seam: what a task (segmentation, and next denoising and super-resolution) decides.

The pipeline is the same for every task — fingerprint, plan, preprocess, sample patches, train a
U-Net, sliding window with TTA and fold averaging — and asks the task, through :class:`Task`,
for the few things that differ:

============================  =========================================================
what                          asked by
============================  =========================================================
``load_training_cases``       the trainer (preprocessed cases for the sampler)
``batch_producer``            the trainer's loader (sampling + augmentation)
``num_outputs``               the trainer and the predictor (network head)
``residual_channels``         the network builder (output = these input channels + head)
``deep_supervision``          the trainer (heads on the lower decoder levels)
``check_outputs``             the predictor (a checkpoint's head against its labels)
``make_loss``                 the trainer (wrapped in deep supervision)
``validation_*``              the trainer's per-epoch online metric (pseudo-Dice, PSNR, ...)
``activate_``                 the predictor (fold-averaged logits -> probabilities)
``to_output_grid``            the predictor (the input on the grid its output is written on)
``output_geometry``           the predictor, fold validation (that grid; ``output_shape``: its shape)
``on_grid``                   the predictor (the output kept on the network grid)
``fold_output``               the predictor's fold disagreement map
``export``                    the predictor (network grid -> the input's geometry, written)
``probabilities``             the Python API (the same average, in memory; optional)
``score_case``, ``summarize`` fold validation and ``autoseg evaluate``
============================  =========================================================

A task is built from the plans' ``task`` name, labels and channels (:func:`autoseg.tasks.get_task`).
Task classes keep torch imports inside their methods, so that torch-free stages (evaluation of
files) can hold a task without importing torch. The defaults of the non-abstract hooks are the
label-map behaviour (segmentation's).

The stages below this seam (check, fingerprint, plan, preprocess: layers under ``tasks`` in
``tests/test_layout.py``) cannot ask a task object; what a task's raw data is and how it is planned
and preprocessed is read there from :mod:`autoseg.dataset.kinds` by the ``task`` name, with each
layer's restoration module (``autoseg.{dataset,planning,preprocessing,data}.restoration``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autoseg.imageio import Geometry
    from autoseg.plans import Configuration
    from autoseg.preprocessing.pipeline import Props


@dataclass(frozen=True)
class ConfigPrediction:
    """One configuration's prediction of a case, on its preprocessed grid.

    Attributes:
        configuration: the configuration's name.
        probabilities: float32 ``(K, z, y, x)``: the task's activation of the fold-averaged
            logits (segmentation: softmax; region-based labels: ``(R, z, y, x)`` sigmoids).
        props: the case's preprocessing record (what the inverse needs).
        disagreement: float32 ``(z, y, x)`` fraction of pairs of folds whose outputs differ
            (:func:`autoseg.inference.uncertainty.fold_disagreement`), when predicted with
            ``uncertainty=True``.
        folds: how many folds were averaged.
        image: the input image ``(C, Z, Y, X)`` as read, for tasks whose export starts from it
            (restoration adds its correction to it); None where nobody kept it.
    """

    configuration: str
    probabilities: np.ndarray
    props: "Props"
    disagreement: np.ndarray | None = None
    folds: int = 1
    image: np.ndarray | None = None


class Task(ABC):
    """What differs between tasks. One instance per experiment (it may hold the labels).

    Attributes:
        name: the registry name, written as ``task`` in plans.yaml and in checkpoints.
        validation_metric: the name of the per-epoch online metric (shown and plotted).
        validation_range: the online metric's range for the plot (None: unbounded, e.g. dB).
        deep_supervision: train with a head on every decoder level (nnU-Net's deep supervision).
        extra_outputs: the predictor may also write probabilities, uncertainty maps and DICOM SEG,
            and ``autoseg export`` / ``find-best`` take the task's models.
        onnx_engines: the networks may run as ONNX graphs (OpenVINO, ONNX Runtime); otherwise
            the predictor runs them with torch.
    """

    name: ClassVar[str]
    validation_metric: ClassVar[str]
    validation_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    deep_supervision: ClassVar[bool] = True
    extra_outputs: ClassVar[bool] = True
    onnx_engines: ClassVar[bool] = True

    # -- training data

    def load_training_cases(self, folder: Path, case_ids: Sequence[str]) -> list[Any]:
        """The preprocessed cases of ``folder`` the sampler draws from (default: image + label map)."""
        from autoseg.data import load_cases

        return load_cases(folder, case_ids)

    def batch_producer(self) -> type:
        """The class that samples and augments the task's batches (default:
        :class:`autoseg.data.loader.BatchProducer`, foreground oversampling and nnU-Net's augmentation)."""
        from autoseg.data.loader import BatchProducer

        return BatchProducer

    def residual_channels(self, config: "Configuration") -> tuple[int, int] | None:
        """Input channels ``[start, stop)`` the network adds to its head's output (residual learning),
        or None for a plain head."""
        return None

    # -- the network head

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Output channels of the network."""

    @abstractmethod
    def check_outputs(self, num_outputs: int, where: str) -> None:
        """Raise :class:`~autoseg.errors.ConfigError` naming ``where`` when a checkpoint's head
        (``num_outputs`` channels) does not fit this task."""

    # -- training

    @abstractmethod
    def make_loss(self, *, batch_dice: bool = True, sync: bool = False, loss: str | None = None) -> "nn.Module":
        """The loss of one network output against its target (deep supervision wraps it).

        Args:
            batch_dice: pool statistics over the batch where the loss has such statistics.
            sync: under DDP, pool them over every rank's share of the global batch.
            loss: one of the task's named losses (``autoseg train --loss``); None: its default.

        Raises:
            ConfigError: the task has no loss of that name.
        """

    @property
    @abstractmethod
    def validation_size(self) -> int:
        """How many scores the online metric gives (one per foreground class, region, ...)."""

    @abstractmethod
    def validation_counts(self, logits: "torch.Tensor", target: "torch.Tensor") -> np.ndarray:
        """Additive statistics of one validation batch, float64: summed over batches and DDP ranks
        before :meth:`validation_scores` turns them into scores."""

    @abstractmethod
    def validation_scores(self, counts: np.ndarray) -> list[float]:
        """The online metric per output from the summed statistics (NaN where undefined)."""

    # -- the output grid

    def output_geometry(self, geometry: Geometry) -> Geometry:
        """The geometry the output of an input of ``geometry`` is written with: the input's own
        (super-resolution: its fine grid)."""
        return geometry

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial shape of the output of an input of spatial ``shape``: the input's own."""
        return tuple(int(s) for s in shape)

    def to_output_grid(self, image: np.ndarray, geometry: Geometry,
                       where: str = "image") -> tuple[np.ndarray, Geometry]:
        """The input on the output grid, as the networks see it (the input itself; super-resolution
        refines it). ``where`` names the input in errors."""
        return image, geometry

    # -- prediction

    @abstractmethod
    def activate_(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Turn fold-averaged logits ``(K, *spatial)`` into the task's output, in place."""

    def on_grid(self, logits: "torch.Tensor", inputs: "torch.Tensor") -> "torch.Tensor":
        """What the predictor keeps of the fold-averaged output on the network grid, given the
        preprocessed input ``(C, z, y, x)`` (default: :meth:`activate_`)."""
        return self.activate_(logits)

    @abstractmethod
    def fold_output(self, logits: "torch.Tensor") -> np.ndarray:
        """One fold's discrete output from its logits (for the folds' disagreement map)."""

    @abstractmethod
    def export(self, predictions: Sequence[ConfigPrediction], geometry: "Geometry", path: Path | None = None,
               probabilities_path: Path | None = None,
               postprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The configurations' outputs, averaged, in the input's geometry; written to ``path`` if given."""

    def probabilities(self, predictions: Sequence[ConfigPrediction]) -> np.ndarray:
        """The configurations' averaged activations, float32 ``(K, Z, Y, X)`` in the input's grid (as
        :meth:`export` averages them), for callers that want them in memory (:class:`autoseg.Segmenter`).

        Raises:
            NotImplementedError: the task has no such output.
        """
        raise NotImplementedError(f"task {self.name!r} gives no probabilities")

    # -- evaluation

    @abstractmethod
    def score_case(self, prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   **options: Any) -> dict[str, dict[str, Any]]:
        """Metrics of one case: ``{output name: {metric: value}}``.

        ``options`` are the callers' (fold validation passes ``nsd_tolerance_mm`` and the images'
        ``geometry``); a task ignores those it does not use.
        """

    def summarize(self, per_case: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """The summary of fold validation's ``per_case`` scores (default: :func:`autoseg.metrics.summarize`)."""
        from autoseg.metrics import summarize

        return summarize(per_case)

