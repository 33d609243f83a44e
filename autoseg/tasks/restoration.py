"""The denoising task: a degraded image in, the clean image out (AAPM/Mayo LDCT: quarter -> full dose).

What it decides, against segmentation's choices (:mod:`autoseg.tasks.base`); the stages below the
seam do their part by the ``task`` name (:mod:`autoseg.dataset.kinds`):

* **Normalisation** (planned by :mod:`autoseg.planning.restoration`): ``linear``, ``(x - mean) / std``
  per channel with the mean and std of the inputs' body voxels, no clipping, so air and bone come
  back with their HU; the target is normalised with the input channel's numbers
  (:mod:`autoseg.preprocessing.restoration`).
* **Network**: the same U-Net with one output per input channel and *residual learning*: the output
  is the input's centre slice (its own channels for 2.5D) plus the head's correction
  (:meth:`residual_channels`), so an untrained head already returns the input. No softmax, no deep
  supervision: a coarse decoder level would be asked for a downsampled clean image, and the noise this
  task removes lives at the finest scale, where one full-resolution loss puts all the weight.
* **Loss**: L1 (``autoseg train --loss mse`` for MSE), see :mod:`autoseg.tasks.restoration_loss`.
* **Online metric**: PSNR per channel in HU after un-normalising, CT in the AAPM window [-160, 240]
  HU (other channels: mean ± 3 std), from the pooled squared error of the validation patches
  (:func:`autoseg.image_metrics.psnr_from_mse`, capped at :data:`ONLINE_PSNR_CAP_DB`).
* **Training data**: patches centred on body voxels drawn uniformly (no labels to oversample), and
  only the augmentation that keeps noise statistics honest (:mod:`autoseg.data.restoration`).
* **Prediction**: the predictor keeps the correction (output minus input, :meth:`on_grid`); the
  export adds it, in HU, to the input as read (:mod:`autoseg.tasks.restoration_export`).
* **Scores**: PSNR, SSIM 2D/3D and RMSE in the window, the definitions and keys of ``autoseg evaluate``
  (:func:`autoseg.image_metrics.restoration_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from autoseg.errors import ConfigError
from autoseg.image_metrics import (
    DEFAULT_WINDOW,
    METRIC_KEYS,
    Window,
    psnr_from_mse,
    restoration_metrics,
)
from autoseg.tasks.base import ConfigPrediction, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autoseg.imageio import Geometry
    from autoseg.plans import Configuration, Normalization

#: A channel without a HU window is scored in mean ± this many std of its body voxels.
NON_CT_WINDOW_STD = 3.0
#: The online (per-epoch) PSNR of validation patches equal to their targets is infinite; the trainer's
#: log, its EMA and the plot need a number, so it is reported as this many dB (no real restoration
#: reaches it: an RMSE of 4e-3 HU in a 400 HU window). Fold validation and ``autoseg evaluate`` are
#: not capped: they record such a PSNR as null.
ONLINE_PSNR_CAP_DB = 100.0


def _is_ct(name: str) -> bool:
    from autoseg.dataset.restoration import is_ct_channel

    return is_ct_channel(name)


class Denoise(Task):
    """Denoising: one output channel per input channel, restored in the input's units.

    Args:
        labels: unused (a restoration dataset has none); accepted as every task is built alike.
        channel_names: the input channels (default one ``CT`` channel).
        normalization: a configuration's normalisation, ``linear`` per channel; needed for the
            online metric and the export (not for scoring files, which are in HU already).

    Raises:
        ConfigError: a channel's normalisation is not the invertible ``linear`` scheme.
    """

    name: ClassVar[str] = "denoise"
    validation_metric: ClassVar[str] = "PSNR"
    validation_range: ClassVar[tuple[float, float] | None] = None
    deep_supervision: ClassVar[bool] = False
    extra_outputs: ClassVar[bool] = False
    # The residual's channel slice is no operator of autoseg's checked ONNX graphs, and a bf16
    # engine would round the input it adds back (8 significant bits: 4 HU steps at 1000 HU): torch only.
    onnx_engines: ClassVar[bool] = False

    def __init__(self, labels: Mapping[str, Sequence[int]] | None = None, channel_names: Sequence[str] = (),
                 normalization: "Sequence[Normalization]" = ()) -> None:
        self.channel_names: tuple[str, ...] = tuple(channel_names) or ("CT",)
        self.normalization = tuple(normalization)
        for index, norm in enumerate(self.normalization):
            if norm.scheme != "linear" or norm.mean is None or norm.std is None:
                raise ConfigError(f"channel {index}: denoising needs the invertible 'linear' normalisation, the plan "
                                  f"has {norm.scheme!r}; re-run 'autoseg plan'")
        if self.normalization and len(self.normalization) != len(self.channel_names):
            raise ConfigError(f"{len(self.normalization)} normalisation(s) for {len(self.channel_names)} channel(s)")

    # -- windows

    def windows(self) -> list[tuple[float, float]]:
        """Each channel's scoring window in its own units: the AAPM window for CT, else mean ± 3 std
        (from the plan's normalisation; without one, the CT window)."""
        result = []
        for index, name in enumerate(self.channel_names):
            norm = self.normalization[index] if index < len(self.normalization) else None
            if _is_ct(name) or norm is None or norm.mean is None or norm.std is None:
                result.append(DEFAULT_WINDOW)
            else:
                half = NON_CT_WINDOW_STD * float(norm.std)
                result.append((float(norm.mean) - half, float(norm.mean) + half))
        return result

    def _require_normalization(self, what: str) -> "tuple[Normalization, ...]":
        if len(self.normalization) != len(self.channel_names):
            raise ConfigError(f"denoise {what} needs the plan's normalisation; build the task with get_task(..., "
                              "normalization=config.normalization)")
        return self.normalization

    # -- training data

    def load_training_cases(self, folder: Path, case_ids: Sequence[str]) -> list[Any]:
        from autoseg.data.restoration import load_pairs

        return load_pairs(folder, case_ids)

    def batch_producer(self) -> type:
        from autoseg.data.restoration import PairProducer

        return PairProducer

    def residual_channels(self, config: "Configuration") -> tuple[int, int] | None:
        # 2.5D inputs stack slices offset-major (autoseg.data.sampler.stack_context): the centre
        # slice's channels are the middle block.
        channels = len(config.normalization)
        start = config.context_slices * channels
        return start, start + channels

    # -- the network head

    @property
    def num_outputs(self) -> int:
        return len(self.channel_names)

    def check_outputs(self, num_outputs: int, where: str) -> None:
        if num_outputs != self.num_outputs:
            raise ConfigError(f"{where}: the checkpoint has {num_outputs} outputs but denoising "
                              f"{len(self.channel_names)} channel(s) needs {self.num_outputs}; re-train it")

    # -- training

    def make_loss(self, *, batch_dice: bool = True, sync: bool = False, loss: str | None = None) -> "nn.Module":
        from autoseg.tasks.restoration_loss import make_loss

        return make_loss(loss)

    @property
    def validation_size(self) -> int:
        return len(self.channel_names)

    def validation_counts(self, logits: "torch.Tensor", target: "torch.Tensor") -> np.ndarray:
        from autoseg.tasks.restoration_loss import windowed_squared_errors

        norms = self._require_normalization("validation")
        return windowed_squared_errors(logits, target, [float(n.mean) for n in norms],  # type: ignore[arg-type]
                                       [float(n.std) for n in norms], self.windows())  # type: ignore[arg-type]

    def validation_scores(self, counts: np.ndarray) -> list[float]:
        k = self.validation_size
        return [_capped_psnr(sse / n, high - low) if n > 0 else float("nan")
                for sse, n, (low, high) in zip(counts[:k], counts[k:2 * k], self.windows())]

    # -- prediction

    def activate_(self, logits: "torch.Tensor") -> "torch.Tensor":
        return logits  # a regression output: no activation

    def on_grid(self, logits: "torch.Tensor", inputs: "torch.Tensor") -> "torch.Tensor":
        """The correction: the fold-, mirror- and window-averaged output minus the input (in place).

        The export adds it back to the input as read, so resampling only ever touches the correction.
        """
        logits -= inputs[: self.num_outputs].to(logits.dtype)
        return logits

    def fold_output(self, logits: "torch.Tensor") -> np.ndarray:
        raise ConfigError("denoising has no fold disagreement map; predict without --save-uncertainty")

    def export(self, predictions: Sequence[ConfigPrediction], geometry: "Geometry", path: Path | None = None,
               probabilities_path: Path | None = None,
               postprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The restored image in the input's geometry and pixel type (written to ``path`` if given).
        Restoration has no probabilities (``probabilities_path`` is ignored) and no postprocessing."""
        from autoseg.tasks.restoration_export import export_restored

        return export_restored(predictions, geometry, self._require_normalization("export"), path)

    # -- evaluation

    def score_case(self, prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   **options: Any) -> dict[str, dict[str, Any]]:
        """PSNR, SSIM 2D/3D and RMSE per channel in its window, as ``autoseg evaluate`` scores a case.

        Each channel's entry is :func:`autoseg.image_metrics.restoration_metrics` (``psnr_db``,
        ``ssim_2d``, ``ssim_3d``, ``rmse_hu``, ``ssim_2d_slices``, ``data_range``: the keys and values
        of ``autoseg evaluate``'s ``cases.<case>.restored`` in the same window) plus its ``window``.

        Args:
            prediction, reference: ``(Z, Y, X)`` for one channel, else ``(C, Z, Y, X)``, in the
                images' own units (HU for CT).
            spacing: unused (the metrics are per voxel).
            options: ``window`` (low, high) overrides every channel's window; ``geometry`` (the
                images' :class:`~autoseg.imageio.Geometry`) picks the axial axis for SSIM 2D as
                ``autoseg evaluate`` does (:func:`autoseg.overlay.axial_axis`; default axis 0);
                others are ignored.
        """
        prediction, reference = np.asarray(prediction), np.asarray(reference)
        if prediction.ndim == 3:
            prediction, reference = prediction[None], reference[None]
        windows = [tuple(options["window"])] * len(self.channel_names) if options.get("window") else self.windows()
        axis = 0
        if options.get("geometry") is not None:
            from autoseg.overlay import axial_axis

            axis = axial_axis(options["geometry"])
        return {name: {**restoration_metrics(p, r, Window(float(window[0]), float(window[1])), axis=axis),
                       "window": [float(window[0]), float(window[1])]}
                for name, p, r, window in zip(self.channel_names, prediction, reference, windows)}

    def summarize(self, per_case: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """Mean, population std, median and count of each score per channel over the cases (null
        values left out, as ``autoseg evaluate``'s summary), and the first channel's means as
        ``mean_psnr_db``, ``mean_ssim_2d``, ``mean_ssim_3d``, ``mean_rmse_hu``; the windows are stated."""
        summary: dict[str, Any] = {"task": self.name, "n_cases": len(per_case), "per_channel": {}}
        for index, name in enumerate(self.channel_names):
            scores = [case[name] for case in per_case.values() if name in case]
            channel: dict[str, Any] = {"window": list(self.windows()[index]), "cases": len(scores)}
            for metric in METRIC_KEYS:
                values = np.array([s[metric] for s in scores if s.get(metric) is not None], dtype=np.float64)
                channel[metric] = {"mean": float(values.mean()), "std": float(values.std()),
                                   "median": float(np.median(values)), "n": int(values.size)} if values.size else None
            summary["per_channel"][name] = channel
            if index == 0:
                for metric in METRIC_KEYS:
                    summary[f"mean_{metric}"] = channel[metric]["mean"] if channel[metric] else None
                summary["window"] = channel["window"]
        return summary


def _capped_psnr(mse: float, data_range: float) -> float:
    """The online PSNR: :func:`~autoseg.image_metrics.psnr_from_mse`, at most :data:`ONLINE_PSNR_CAP_DB`."""
    value = psnr_from_mse(mse, data_range)
    return ONLINE_PSNR_CAP_DB if value is None else min(value, ONLINE_PSNR_CAP_DB)


class SuperResolution(Denoise):
    """Super-resolution: a coarse image in (thick slices), the fine one out, in the input's units.

    Everything but the grid is denoising's: the input is refined onto its fine grid by cubic
    interpolation (:func:`autoseg.preprocessing.super_resolution.refine_input`), in training as in
    prediction, and the same residual network learns what the interpolation misses. The output is
    written on that fine grid (:mod:`autoseg.dataset.super_resolution`), in the input's pixel type.

    Args:
        labels, channel_names, normalization: as :class:`Denoise`.
        upsample_factor: the plans' refinement per array axis (z, y, x); needed to predict.
        fine_spacing: the smallest target spacing of the training set (plans' ``min_target_spacing``,
            array order), to refuse inputs that are fine already.
    """

    name: ClassVar[str] = "super-resolution"

    def __init__(self, labels: Mapping[str, Sequence[int]] | None = None, channel_names: Sequence[str] = (),
                 normalization: Sequence[Normalization] = (), upsample_factor: Sequence[int] | None = None,
                 fine_spacing: Sequence[float] | None = None) -> None:
        super().__init__(labels, channel_names, normalization)
        self.upsample_factor = tuple(int(k) for k in upsample_factor) if upsample_factor else None
        self.fine_spacing = tuple(float(s) for s in fine_spacing) if fine_spacing else None

    def _factors(self) -> tuple[int, ...]:
        if self.upsample_factor is None:
            raise ConfigError("super-resolution needs the plans' upsample_factor; build the task with "
                              "task_of(plans) (or re-run 'autoseg plan')")
        return self.upsample_factor

    def output_geometry(self, geometry: Geometry) -> Geometry:
        from autoseg.dataset.super_resolution import fine_geometry

        return fine_geometry(geometry, self._factors())

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        from autoseg.dataset.super_resolution import fine_shape

        return fine_shape(shape, self._factors())

    def to_output_grid(self, image: np.ndarray, geometry: Geometry,
                       where: str = "image") -> tuple[np.ndarray, Geometry]:
        """The input refined onto its fine grid (the input's pixel type).

        Raises:
            DatasetError: the input already has about the fine spacing the model produces.
        """
        from autoseg.dataset.super_resolution import check_coarse_input
        from autoseg.preprocessing.super_resolution import refine_input

        factors = self._factors()
        if self.fine_spacing is not None:
            check_coarse_input(geometry, factors, self.fine_spacing, where)
        return refine_input(image, geometry, factors)
