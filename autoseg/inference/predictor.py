"""The predictor: the networks of the chosen configurations and folds, loaded once, run on one image at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg import plans as plans_io
from autoseg.checkpoint import load_checkpoint
from autoseg.device import resolve_device
from autoseg.errors import ConfigError, DatasetError, PlanError
from autoseg.imageio import Geometry
from autoseg.inference.inputs import is_2d_plans
from autoseg.inference.models import ModelSelection, build_inference_network, previous_stage_selection
from autoseg.plans import Configuration, Plans
from autoseg.tasks import DEFAULT_TASK, ConfigPrediction, Task, get_task, task_options

if TYPE_CHECKING:
    import torch

    from autoseg.preprocessing.pipeline import Props

# ----------------------------------------------------------------------------------------------
# The predictor


def _engine_for_task(task: str, engine: str) -> str:
    """``engine``, or ``torch`` for a task whose networks must not run as ONNX graphs (``auto``).

    Raises:
        ConfigError: an ONNX engine named explicitly for such a task.
    """
    from autoseg.tasks import TASKS

    if task not in TASKS or TASKS[task].onnx_engines or engine == "torch":
        return engine
    if engine != "auto":
        raise ConfigError(f"--engine {engine}: a {task} model runs on the torch engine only (its residual output "
                          "is no operator of autoseg's ONNX graphs, and bf16 would round the values it adds back); "
                          "use --engine torch or leave --engine out")
    return "torch"


@dataclass
class _ConfigModels:
    """What one configuration needs at prediction time."""

    name: str
    plans: Plans
    config: Configuration
    #: Each fold's network: a torch module, or an ONNX engine's callable.
    nets: list[Callable[["torch.Tensor"], "torch.Tensor"]]
    folds: tuple[int, ...]
    memory_format: "torch.memory_format"


@dataclass
class PredictorStats:
    """Time spent, for benchmarks: network calls only, and everything of ``predict``."""

    forward_s: float = 0.0
    forward_calls: int = 0
    samples: int = 0
    windows: int = 0
    predict_s: float = 0.0
    preprocess_s: float = 0.0
    export_s: float = 0.0


class Predictor:
    """The networks of the requested configurations and folds, loaded once, and their use.

    Args:
        work: the experiment folder (its plans.yaml; the checkpoints' own configuration wins for
            the network and preprocessing, so an edited plans.yaml cannot silently change them).
        selections: configurations and folds (:func:`select_models`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        tta: mirroring test-time augmentation over the trained mirror axes (all spatial axes of
            the patch: 8 passes in 3D, 4 in 2D).
        step: window stride as a fraction of the patch (0.5: nnU-Net).
        amp: autocast (bf16 where supported, else fp16) on CUDA (the CPU's bf16 is the OpenVINO
            engine's: ``engine``, ``precision``).
        forward_batch: samples per network call (default from the patch size and the device).
        profile: synchronise CUDA around network calls so that ``stats.forward_s`` is exact.
        engine: what runs the networks: ``auto``, ``torch``, ``openvino``, ``onnxruntime``
            (:mod:`autoseg.inference.engines`; ``auto``: OpenVINO on the CPU where installed).
        precision: ``auto``, ``fp32``, ``bf16`` or ``int8`` (:func:`autoseg.inference.engines.choose_engine`).

    Raises:
        ConfigError: a checkpoint is missing, unreadable, or does not fit the others; bad device.
        PlanError: WORK's plans.yaml is missing or invalid.
    """

    def __init__(self, work: Path, selections: Sequence[ModelSelection], *, device: str = "auto",
                 tta: bool = True, step: float = 0.5, amp: bool = True, forward_batch: int | None = None,
                 profile: bool = False, engine: str = "auto", precision: str = "auto") -> None:
        import torch

        from autoseg.inference.engines import (
            choose_engine,
            cpu_flags,
            has_bf16_units,
            installed,
        )

        if not 0 < step <= 1:
            raise ConfigError(f"--step {step}: must be in (0, 1] (a fraction of the patch; 0.5 = half overlap)")
        if not selections:
            raise ConfigError("no configuration to predict with")
        self.work = Path(work)
        self.device = resolve_device(device)
        self.tta = tta
        self.step = float(step)
        self.forward_batch = forward_batch
        self.profile = profile
        self.stats = PredictorStats()
        work_plans = plans_io.load(self.work / "plans.yaml")
        engine = _engine_for_task(work_plans.task, engine)
        #: The engine and precision the networks run with, and why.
        self.engine = choose_engine(engine, precision, device_type=self.device.type,
                                    has_int8=all(self._graph_file(c, "int8") for s in selections for c in s.checkpoints),
                                    available=installed, bf16_units=has_bf16_units(cpu_flags()))
        self._autocast = None
        if amp and self.device.type == "cuda" and self.engine.precision == "amp":
            self._autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "cpu":
            from autoseg.inference.cpu import keep_freed_memory

            keep_freed_memory()  # 10-14 % faster forward passes (autoseg.inference.cpu)
        self.models: list[_ConfigModels] = []
        meta: dict[str, Any] | None = None
        #: Previous stages of cascade configurations that were not requested themselves: run for
        #: their segmentation, which the cascade stage takes as input, never averaged into the output.
        self.previous_stages: dict[str, _ConfigModels] = {}
        pending = list(selections)
        while pending:
            selection = pending.pop(0)
            models, ckpt_meta = self._load_configuration(work_plans, selection)
            previous = previous_stage_selection(selection, models.config.previous_stage, selections)
            if previous is not None and previous not in pending:
                pending.append(previous)
            if meta is not None and (ckpt_meta["labels"], ckpt_meta.get("task")) != (meta["labels"], meta.get("task")):
                raise ConfigError(f"{selection.configuration} predicts labels {ckpt_meta['labels']}, "
                                  f"{self.models[0].name} {meta['labels']}: configurations of one "
                                  "prediction must share their task and labels")
            meta = meta or ckpt_meta
            if selection in selections:
                self.models.append(models)
            else:
                self.previous_stages[models.name] = models
        assert meta is not None
        self.labels: dict[str, list[int]] = {str(k): [int(v) for v in vals] for k, vals in meta["labels"].items()}
        self.num_classes = int(meta["num_classes"])
        self.channel_names: tuple[str, ...] = tuple(meta["channel_names"])
        self.plans = self.models[0].plans
        #: What the outputs are (activation, export, scores): the checkpoints' task.
        self.task: Task = get_task(self.plans.task, self.labels, f"{selections[0].checkpoints[0]}",
                                   channel_names=self.channel_names,
                                   normalization=self.models[0].config.normalization, **task_options(self.plans))
        self.task.check_outputs(self.num_classes, self.models[0].name)

    # -- loading

    def _load_configuration(self, work_plans: Plans, selection: ModelSelection) -> tuple[_ConfigModels, dict[str, Any]]:
        import torch

        nets: list[torch.nn.Module] = []
        plans: Plans | None = None
        reference: dict[str, Any] | None = None
        meta: dict[str, Any] = {}
        for fold, path in zip(selection.folds, selection.checkpoints):
            data = load_checkpoint(path, ("model", "configuration_name", "configuration", "plans"))
            if data["configuration_name"] != selection.configuration:
                raise ConfigError(f"{path}: checkpoint of configuration {data['configuration_name']!r}, found in "
                                  f"the folder of {selection.configuration!r}; move it back or re-train")
            if reference is None:
                reference, meta = data["configuration"], data["plans"]
                plans = self._plans_with(work_plans, selection.configuration, reference, meta, path)
            elif data["configuration"] != reference or data["plans"] != meta:
                raise ConfigError(f"{path}: fold {fold} was trained with another plan than fold "
                                  f"{selection.folds[0]} of {selection.configuration}; re-train it")
            assert plans is not None
            config = plans.configurations[selection.configuration]
            # Residual learning (restoration): the output adds these input channels; None for segmentation.
            residual = get_task(meta.get("task"), meta["labels"], str(path), channel_names=meta["channel_names"],
                                normalization=config.normalization).residual_channels(config)
            net = build_inference_network(config, int(meta["num_classes"]), data["model"], path, residual)
            memory_format = torch.contiguous_format
            if self.engine.engine != "torch":
                from autoseg.inference.engines import weights_digest

                digest = weights_digest({k: v.detach().cpu().numpy() for k, v in data["model"].items()})
                del data
                nets.append(self._engine_network(net, config, int(meta["num_classes"]), path, digest))
                continue
            del data
            if self.device.type == "cpu":
                from autoseg.inference.cpu import prepare_for_cpu_inference

                # Channels-last and autoseg.inference.cpu's inference network (in-place norm, no
                # decoder concatenation copy, oneDNN with packed weights). Channels-last alone made
                # the default plan's 3D network 1.17x faster than NCDHW on the 2-core CPU (0.116
                # against 0.136 s per 40x56x40 sample, batch 2), its 2D network 1.17x.
                memory_format = torch.channels_last_3d if config.dims == 3 else torch.channels_last
                net = prepare_for_cpu_inference(net)
            nets.append(net.to(device=self.device, memory_format=memory_format))
        assert plans is not None
        config = plans.configurations[selection.configuration]
        return _ConfigModels(selection.configuration, plans, config, nets, selection.folds, memory_format), meta

    @staticmethod
    def _graph_file(checkpoint: Path, kind: str) -> Path | None:
        """The checkpoint's ONNX graph of ``kind`` if there is one
        (:func:`autoseg.inference.models.graph_path`; whether it belongs to the checkpoint's
        weights is checked when it is loaded)."""
        from autoseg.inference.models import graph_path

        graph = graph_path(checkpoint, kind)
        return graph if graph.is_file() else None

    def _engine_network(self, net: "torch.nn.Module", config: Configuration, num_classes: int, path: Path,
                        digest: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """A fold's network on the ONNX engine: the fold's graph when it was made from these
        weights (``digest``), else exported from them (fp32; int8 cannot be made here)."""
        import torch

        from autoseg.inference.engines import WEIGHTS_KEY, build_engine_network, check_onnx_graph
        from autoseg.inference.onnx_export import network_to_onnx
        from autoseg.inference.window import default_forward_batch

        kind = "int8" if self.engine.precision == "int8" else "fp32"
        checks = dict(input_channels=config.input_channels, num_classes=num_classes, dims=config.dims)
        checked = None
        source = self._graph_file(path, kind)
        if source is not None:
            checked = check_onnx_graph(source.read_bytes(), str(source), **checks)
            where = str(source)
            if checked.metadata.get(WEIGHTS_KEY) != digest:
                checked = None  # made from other weights: the fold was trained again after the import
        if checked is None:
            if kind == "int8":
                raise ConfigError(f"{path}: no int8 graph made from these weights (the fold was trained again, or the "
                                  "model was exported without --int8); export the model again with --format onnx "
                                  "--int8, or use --precision fp32")
            shape = (1, config.input_channels, *config.patch_size)
            where = f"{path} (exported)"
            checked = check_onnx_graph(network_to_onnx(net, shape, weights_sha256=digest), where, **checks)
        batch = self.forward_batch or default_forward_batch(config.patch_size)
        return build_engine_network(self.engine, checked, torch.get_num_threads(),
                                    (batch, config.input_channels, *config.patch_size), where)

    @staticmethod
    def _plans_with(work_plans: Plans, name: str, config: dict[str, Any], meta: dict[str, Any], path: Path) -> Plans:
        """WORK's plans with the checkpoint's configuration, labels, channels and transpose."""
        try:
            data = plans_io.with_configuration(plans_io.to_dict(work_plans), name, config)
        except PlanError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data["labels"] = {str(k): [int(v) for v in vals] for k, vals in meta["labels"].items()}
        data["channel_names"] = list(meta["channel_names"])
        data["transpose"] = list(meta["transpose"])
        data["task"] = meta.get("task", data.get("task", DEFAULT_TASK))
        if data["task"] != work_plans.task:
            # WORK was planned again for another task since this fold was trained (a denoise fold in a
            # WORK re-planned for super-resolution): its networks learnt something else.
            raise ConfigError(f"{path}: a {data['task']} checkpoint, but plans.yaml beside it is planned for "
                              f"{work_plans.task} (re-planned after this fold was trained); re-train it with "
                              f"'autoseg train', or predict from a WORK planned for {data['task']}")
        for key in ("upsample_factor", "min_target_spacing"):  # super-resolution: the checkpoint's grid wins
            if key in meta:
                data[key] = list(meta[key])
        try:
            return plans_io.from_dict(data)
        except PlanError as exc:
            raise ConfigError(f"{path}: the checkpoint's configuration is invalid ({exc})") from None

    # -- prediction

    @property
    def configurations(self) -> tuple[str, ...]:
        """The configurations' names, in the requested order."""
        return tuple(m.name for m in self.models)

    def mirror_axes(self, configuration: str) -> tuple[int, ...]:
        """The TTA mirror axes of a configuration: the axes mirrored in training
        (:func:`autoseg.data.augment.mirror_axes`); empty without TTA."""
        from autoseg.data.augment import mirror_axes

        config = next(m.config for m in [*self.models, *self.previous_stages.values()] if m.name == configuration)
        return mirror_axes(config) if self.tta else ()

    def _net_fn(self, models: _ConfigModels, nets: Sequence["torch.nn.Module"] | None = None,
                ) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """The folds' mean logits (of ``nets``, default every fold of ``models``) as one function."""
        import torch

        stats, sync = self.stats, self.profile and self.device.type == "cuda"
        autocast = self._autocast
        nets = list(models.nets if nets is None else nets)

        def net_fn(x: torch.Tensor) -> torch.Tensor:
            if sync:
                torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            with torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = nets[0](x).float()
                for net in nets[1:]:
                    out += net(x).float()
            if len(nets) > 1:
                out /= len(nets)  # the folds' mean logits (nnU-Net v2)
            if sync:
                torch.cuda.synchronize(self.device)
            stats.forward_s += time.perf_counter() - started
            stats.forward_calls += len(nets)
            stats.samples += x.shape[0] * len(nets)
            return out

        return net_fn

    def predict(self, image: np.ndarray, geometry: Geometry,
                progress: Callable[[int, int], None] | None = None, *,
                uncertainty: bool = False) -> list[ConfigPrediction]:
        """Probabilities of every configuration for one image, each on its preprocessed grid.

        Args:
            image: ``(C, Z, Y, X)`` as read by :func:`autoseg.imageio.read_image`.
            geometry: the image's geometry.
            progress: ``progress(done, total)`` over the windows of all configurations.
            uncertainty: also the folds' disagreement (``ConfigPrediction.disagreement``): the
                folds then run one sliding window each (the same network calls, one more logits
                volume in memory), see :meth:`_fold_logits`.

        Returns:
            One :class:`ConfigPrediction` per configuration.

        Raises:
            DatasetError: the image has the wrong channel count or dimensionality for the model.
        """
        import torch

        from autoseg.inference.window import count_windows, sliding_window
        from autoseg.preprocessing.pipeline import plan_digest, preprocess_case

        started = time.perf_counter()
        self._check_image(image, geometry)
        # Super-resolution: the networks work on the input refined onto its fine grid (else a no-op).
        image, geometry = self.task.to_output_grid(image, geometry)
        prepared: dict[str, tuple[np.ndarray, Props]] = {}
        jobs = []
        # Previous stages before the cascade stages that take their segmentation.
        ordered = sorted([*self.previous_stages.values(), *self.models], key=lambda m: bool(m.config.previous_stage))
        for models in ordered:
            # 2d and 2.5d (and 3d_cascade_fullres / 3d_fullres) share their preprocessing.
            digest = plan_digest(models.plans, models.name)
            if digest not in prepared:
                t0 = time.perf_counter()
                data, _, props = preprocess_case(image, None, geometry, models.plans, models.name)
                self.stats.preprocess_s += time.perf_counter() - t0
                prepared[digest] = (data, props)
            jobs.append((models, *prepared[digest]))
        totals = [count_windows(data.shape[1:], m.config.patch_size, self.step) for m, data, _ in jobs]
        self.stats.windows += sum(totals)
        predicted: dict[tuple[str, tuple[int, ...]], ConfigPrediction] = {}
        for index, (models, data, props) in enumerate(jobs):
            done_before = sum(totals[:index])

            def report(done: int, total: int, offset: int = done_before) -> None:
                if progress is not None:
                    progress(offset + done, sum(totals))

            if models.config.previous_stage:
                data = self._with_previous_stage(data, props, models,
                                                 predicted[(models.config.previous_stage, models.folds)], geometry)
            disagreement = None
            with torch.inference_mode():
                tensor = torch.from_numpy(data).to(self.device)
                if uncertainty and len(models.nets) > 1:
                    logits, disagreement = self._fold_logits(models, tensor, report)
                else:
                    logits = sliding_window(
                        self._net_fn(models), tensor, models.config.patch_size, self.step,
                        mirror_axes=self.mirror_axes(models.name), context_slices=models.config.context_slices,
                        forward_batch=self.forward_batch, memory_format=models.memory_format, progress=report,
                    )
                    if uncertainty:  # one fold cannot disagree with itself
                        disagreement = np.zeros(tuple(logits.shape[1:]), dtype=np.float32)
                # The task's output on the grid (segmentation: probabilities; restoration: the
                # correction of the input, which it needs here).
                probabilities = self.task.on_grid(logits, tensor).cpu().numpy()
                del tensor
            # Keyed by folds too: a requested 3d_lowres may have other folds than the cascade's own.
            predicted[(models.name, models.folds)] = ConfigPrediction(models.name, probabilities, props,
                                                                      disagreement, len(models.nets), image)
        results = [predicted[(models.name, models.folds)] for models in self.models]
        self.stats.predict_s += time.perf_counter() - started
        return results

    def _with_previous_stage(self, data: np.ndarray, props: "Props", models: _ConfigModels,
                             previous: ConfigPrediction, geometry: Geometry) -> np.ndarray:
        """A cascade stage's input: the image on its grid, then the previous stage's segmentation
        one-hot. That segmentation is exported to the image's geometry and brought to the cascade's
        grid like a label map (:func:`autoseg.preprocessing.pipeline.previous_stage_labels`), the
        path its training data took from the previous stage's cross-validation label maps."""
        from autoseg.data.cascade import one_hot_previous
        from autoseg.plans import foreground_label_values
        from autoseg.preprocessing.pipeline import previous_stage_labels

        labels = self.task.export([previous], geometry)
        on_grid = previous_stage_labels(labels, props, models.plans, models.name)
        del labels
        values = foreground_label_values(models.plans.labels)
        # One allocation for the network input (image channels, then the one-hot ones): no
        # concatenation copy of a (C + K)-channel volume.
        out = np.empty((data.shape[0] + len(values), *data.shape[1:]), dtype=np.float32)
        out[: data.shape[0]] = data
        one_hot_previous(on_grid, values, out=out[data.shape[0]:])
        return out

    def _fold_logits(self, models: _ConfigModels, tensor: "torch.Tensor",
                     progress: Callable[[int, int], None]) -> tuple["torch.Tensor", np.ndarray]:
        """The folds' mean logits, one sliding window per fold, and the folds' label disagreement.

        The sliding window is linear in the logits, so the mean of the folds' windows equals the
        window of their mean (what :meth:`_net_fn` computes), up to float rounding. Each fold's
        label map (argmax, or the region export rule) is kept as a uint8 volume (16-bit above 256
        classes), not its logits.
        """

        from autoseg.inference.uncertainty import fold_disagreement
        from autoseg.inference.window import sliding_window

        count = len(models.nets)
        total: torch.Tensor | None = None
        labels: list[np.ndarray] = []
        for fold, net in enumerate(models.nets):
            def report(done: int, windows: int, fold: int = fold) -> None:
                progress((fold * windows + done) // count, windows)

            logits = sliding_window(
                self._net_fn(models, [net]), tensor, models.config.patch_size, self.step,
                mirror_axes=self.mirror_axes(models.name), context_slices=models.config.context_slices,
                forward_batch=self.forward_batch, memory_format=models.memory_format, progress=report,
            )
            labels.append(self.task.fold_output(logits))
            if total is None:
                total = logits
            else:
                total += logits
                del logits
        assert total is not None
        total /= count
        return total, fold_disagreement(labels)

    def _check_image(self, image: np.ndarray, geometry: Geometry) -> None:
        if image.ndim != 4:
            raise DatasetError(f"expected an image (C, Z, Y, X), got shape {image.shape}")
        if image.shape[0] != len(self.channel_names):
            raise DatasetError(f"image has {image.shape[0]} channel(s); the model expects "
                               f"{len(self.channel_names)} ({', '.join(self.channel_names)})")
        if is_2d_plans(self.plans) and image.shape[1] > 1:
            raise DatasetError(f"3D image of shape {image.shape[1:]}; this model was trained on 2D images")
        for models in self.models:
            if models.config.dims == 3 and geometry.ndim == 2:
                raise DatasetError(f"2D image; {models.name} is a 3D model — use a 2d or 2.5d configuration")

    def export(self, predictions: Sequence[ConfigPrediction], geometry: Geometry, path: Path | None = None,
               probabilities_path: Path | None = None,
               postprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The task's output in the original geometry (segmentation: the label map); optionally
        written, with the probabilities (:meth:`autoseg.tasks.base.Task.export`).

        ``geometry`` is the input's, as given to :meth:`predict`; the output is written on the task's
        output grid (:meth:`autoseg.tasks.base.Task.output_geometry`: the input's own, a
        super-resolution model's fine grid).
        """
        started = time.perf_counter()
        geometry = self.task.output_geometry(geometry)
        labels = self.task.export(predictions, geometry, path, probabilities_path, postprocess)
        self.stats.export_s += time.perf_counter() - started
        return labels
