"""The task seam: what a task (segmentation, and next denoising and super-resolution) decides.

The pipeline is the same for every task — fingerprint, plan, preprocess, sample patches, train a
U-Net, sliding window with TTA and fold averaging — and asks the task, through :class:`Task`,
for the few things that differ:

============================  =========================================================
what                          asked by
============================  =========================================================
``num_outputs``               the trainer and the predictor (network head)
``check_outputs``             the predictor (a checkpoint's head against its labels)
``make_loss``                 the trainer (wrapped in deep supervision)
``validation_*``              the trainer's per-epoch online metric (pseudo-Dice, ...)
``activate_``                 the predictor (fold-averaged logits -> probabilities)
``fold_output``               the predictor's fold disagreement map
``export``                    the predictor (network grid -> the input's geometry, written)
``probabilities``             the Python API (the same average, in memory; optional)
``score_case``                fold validation and ``autoseg evaluate``
============================  =========================================================

A task is built from the plans' ``task`` name and labels (:func:`autoseg.tasks.get_task`). Task
classes keep torch imports inside their methods, so that torch-free stages (evaluation of files)
can hold a task without importing torch.
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
    """

    configuration: str
    probabilities: np.ndarray
    props: "Props"
    disagreement: np.ndarray | None = None
    folds: int = 1


class Task(ABC):
    """What differs between tasks. One instance per experiment (it may hold the labels).

    Attributes:
        name: the registry name, written as ``task`` in plans.yaml and in checkpoints.
        validation_metric: the name of the per-epoch online metric (shown and plotted).
    """

    name: ClassVar[str]
    validation_metric: ClassVar[str]

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
    def make_loss(self, *, batch_dice: bool = True, sync: bool = False) -> "nn.Module":
        """The loss of one network output against its target (deep supervision wraps it).

        Args:
            batch_dice: pool statistics over the batch where the loss has such statistics.
            sync: under DDP, pool them over every rank's share of the global batch.
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

    # -- prediction

    @abstractmethod
    def activate_(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Turn fold-averaged logits ``(K, *spatial)`` into the task's output, in place."""

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
        """Metrics of one case: ``{output name: {metric: value}}``."""

