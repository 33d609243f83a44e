"""The segmentation task: label maps, softmax classes or sigmoid regions (:mod:`autoseg.regions`).

Everything here is what autoseg did before the task seam existed, gathered behind
:class:`~autoseg.tasks.base.Task`: Dice + CE (Dice + BCE for regions) as the loss, pseudo-Dice as
the online metric, softmax (sigmoid) activation, class-by-class export to a label map, and Dice,
IoU, HD95 and NSD per label as the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from autoseg.errors import ConfigError
from autoseg.metrics import DEFAULT_NSD_TOLERANCE_MM, case_metrics
from autoseg.regions import membership, num_outputs, output_regions, regions_of
from autoseg.tasks.base import ConfigPrediction, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autoseg.imageio import Geometry


#: Voxels per slab of the in-place softmax (2^22: 16 MB for the slab's maximum and sum).
ACTIVATION_SLAB_VOXELS = 2**22


class Segmentation(Task):
    """Label maps: one softmax output per label, or one sigmoid output per region.

    Args:
        labels: the dataset's labels, ``{name: [values]}`` (a label with several values is a region).
        channel_names, normalization: the plans' channels and a configuration's normalisation
            (:func:`autoseg.tasks.get_task` gives every task these; segmentation needs neither).
    """

    name: ClassVar[str] = "segmentation"
    validation_metric: ClassVar[str] = "pseudo-Dice"

    def __init__(self, labels: Mapping[str, Sequence[int]], channel_names: Sequence[str] = (),
                 normalization: Sequence[Any] = ()) -> None:
        self.labels: dict[str, list[int]] = {str(k): [int(v) for v in vals] for k, vals in labels.items()}
        self._regions = regions_of(self.labels)
        #: ``(R, V)`` region membership for region-based labels, None for softmax classes.
        self.membership: np.ndarray | None = None if self._regions is None else membership(self._regions)

    @property
    def region_based(self) -> bool:
        """True when the outputs are independent sigmoid regions."""
        return self._regions is not None

    # -- the network head

    @property
    def num_outputs(self) -> int:
        return num_outputs(self.labels)

    def check_outputs(self, num_outputs: int, where: str) -> None:
        if num_outputs != self.num_outputs:
            raise ConfigError(f"{where}: the checkpoint has {num_outputs} outputs but its labels {self.labels} need "
                              f"{self.num_outputs}; it was trained by an autoseg without region training, re-train it")

    # -- training

    def make_loss(self, *, batch_dice: bool = True, sync: bool = False, loss: str | None = None) -> "nn.Module":
        if loss is not None:
            raise ConfigError(f"--loss {loss}: segmentation trains with Dice + CE (Dice + BCE for region-based "
                              "labels); --loss chooses a restoration task's loss")
        from autoseg.tasks.segmentation_loss import make_loss

        return make_loss(self.labels, batch_dice=batch_dice, sync=sync)

    @property
    def validation_size(self) -> int:
        return len(output_regions(self.labels))  # foreground classes, or regions

    def validation_counts(self, logits: "torch.Tensor", target: "torch.Tensor") -> np.ndarray:
        from autoseg.tasks.segmentation_loss import confusion_counts

        # Softmax: argmax per class; regions: sigmoid > 0.5 per region (nnU-Net's pseudo-Dice).
        tp, fp, fn = confusion_counts(logits, target, self._regions)
        return np.concatenate([tp, fp, fn]).astype(np.float64)

    def validation_scores(self, counts: np.ndarray) -> list[float]:
        k = self.validation_size
        tp, fp, fn = counts[:k], counts[k:2 * k], counts[2 * k:3 * k]
        denominator = 2 * tp + fp + fn
        return [float(2 * t / d) if d > 0 else float("nan") for t, d in zip(tp, denominator)]

    # -- prediction

    def activate_(self, logits: "torch.Tensor") -> "torch.Tensor":
        if self._regions is not None:
            return logits.sigmoid_()  # region outputs: sigmoid of the folds' and mirrors' mean logits
        # Softmax over classes in place, slab by slab along the first spatial axis: no second
        # (K, z, y, x) volume, and the maximum and the sum take a slab each instead of two whole
        # volumes (2 x 157 MB for a 150x512x512 grid, at the moment the logits peak).
        step = max(1, ACTIVATION_SLAB_VOXELS // max(1, math.prod(logits.shape[2:])))
        for start in range(0, logits.shape[1], step):
            part = logits[:, start:start + step]
            part -= part.amax(dim=0, keepdim=True)
            part.exp_()
            part /= part.sum(dim=0, keepdim=True)
        return logits

    def fold_output(self, logits: "torch.Tensor") -> np.ndarray:
        import torch

        if self.membership is not None:  # the fold's own label map, by the export rule of its sigmoids
            from autoseg.regions import regions_to_labels

            return regions_to_labels(torch.sigmoid(logits).cpu().numpy(), self.membership)
        index = logits.argmax(dim=0)
        return index.to(torch.uint8 if logits.shape[0] <= 256 else torch.int16).cpu().numpy()

    def export(self, predictions: Sequence[ConfigPrediction], geometry: "Geometry", path: Path | None = None,
               probabilities_path: Path | None = None,
               postprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        from autoseg.tasks.segmentation_export import export_prediction

        return export_prediction(predictions, geometry, path, probabilities_path, postprocess,
                                 regions=self.membership)

    def probabilities(self, predictions: Sequence[ConfigPrediction]) -> np.ndarray:
        from autoseg.tasks.segmentation_export import input_grid_probabilities

        return input_grid_probabilities(predictions, regions=self.membership is not None)

    def segment_names(self) -> dict[int, str]:
        """``{value: name}`` of every foreground value of the label map (for DICOM SEG segments).

        Softmax labels name their one value. With region-based labels the label map's values are
        the single values; a value that no single-valued label names is called ``label <value>``.
        """
        named = {int(values[0]): name for name, values in self.labels.items()
                 if len(values) == 1 and int(values[0]) > 0}
        count = self.membership.shape[1] if self.membership is not None else 1 + max(named, default=0)
        return {value: named.get(value, f"label {value}") for value in range(1, count)}

    # -- evaluation

    def score_case(self, prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   **options: Any) -> dict[str, dict[str, Any]]:
        """Dice, IoU, HD95, NSD and counts per foreground label (:func:`autoseg.metrics.case_metrics`).

        Options: ``nsd_tolerance_mm`` (default :data:`autoseg.metrics.DEFAULT_NSD_TOLERANCE_MM`).
        """
        tolerance = float(options.get("nsd_tolerance_mm", DEFAULT_NSD_TOLERANCE_MM))
        return case_metrics(prediction, reference, tuple(spacing), self.labels, tolerance)
