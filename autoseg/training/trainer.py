"""The training loop of one fold, readable in one sitting, and its hooks.

    for epoch in epochs:                    (or until the time budget is spent)
        for it in iterations:  batch -> forward -> Dice+CE (deep supervision) -> SGD step
        validation batches -> loss and pseudo-Dice per class
        log.jsonl, progress.png, checkpoint_latest.pt (+ checkpoint_best.pt on a new best EMA Dice)
    checkpoint_final.pt

Every epoch's batches come from a loader seeded with ``(seed, fold, epoch)``, and checkpoints are
taken at epoch boundaries, so ``--resume`` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg.atomic import atomic_path, folder_lock, remove_stale_temp, write_text
from autoseg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from autoseg.device import resolve_device
from autoseg.data import BatchLoader, Case
from autoseg.errors import ConfigError
from autoseg.networks import build_network
from autoseg.plans import Configuration, Plans, configuration_changes
from autoseg.training.config import TrainConfig
from autoseg.training.precision import precision_name, resume_check, step_dtype
from autoseg.distributed import (SINGLE, DistContext, all_gather_strings, all_reduce_sum, broadcast_float,
                                 local_processes, rank_batch, rank_oversample, weights_digest)
from autoseg.tasks import Task, task_of
from autoseg.training.losses import DeepSupervisionLoss

#: Smoothing of the validation pseudo-Dice that selects the best checkpoint (nnU-Net: 0.9).
EMA_DECAY = 0.9
#: With a time budget and no --iters-per-epoch, aim for this many epochs (validation points).
BUDGET_EPOCHS = 20


@dataclass
class TrainState:
    """What changes during training (all of it goes into checkpoint_latest.pt)."""

    epoch: int = 0
    elapsed_s: float = 0.0
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    ema_dice: float | None = None
    best_ema_dice: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Under DDP: every rank's weights digest at the end (all equal; checked every epoch).
    replica_digests: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FoldPaths:
    """Files of one fold: ``WORK/models/<config>/fold_<k>/``."""

    root: Path

    @property
    def latest(self) -> Path:
        return self.root / "checkpoint_latest.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoint_best.pt"

    @property
    def final(self) -> Path:
        return self.root / "checkpoint_final.pt"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "train_config.yaml"

    @property
    def plot(self) -> Path:
        return self.root / "progress.png"


@dataclass
class Callbacks:
    """Progress reporting hooks (the CLI draws rich bars with them; tests leave them empty).

    Attributes:
        on_epoch_start: ``(epoch, iterations or None)`` as an epoch starts (again once a time
            budget has sized it).
        on_iteration: ``(iteration, loss)`` after each training step.
        on_epoch_end: the epoch's record (losses, pseudo-Dice, timings) once it is logged.
        on_validation: ``(cases done, cases)`` during the fold's full validation after training
            (:func:`autoseg.training.validation.validate_fold`), from ``(0, cases)`` on.
    """

    on_epoch_start: Callable[[int, int | None], None] = lambda epoch, iters: None
    on_iteration: Callable[[int, float], None] = lambda it, loss: None
    on_epoch_end: Callable[[dict[str, Any]], None] = lambda record: None
    on_validation: Callable[[int, int], None] = lambda done, total: None


# ----------------------------------------------------------------------------------------------
# Set-up


def default_workers(device: torch.device, processes: int = 1) -> int:
    """Background augmentation processes of one training process: none on small CPUs, where they
    steal the step's cores; with several training processes on a machine, its cores are shared out."""
    import os

    cpus = (os.cpu_count() or 1) // max(processes, 1)
    if device.type == "cpu":
        return 0 if cpus <= 4 else max(1, cpus // 4)
    return max(1, min(12, cpus - 2))


def epoch_seed(seed: int, fold: int, epoch: int, stream: int, rank: int = 0) -> int:
    """The seed of one epoch's loader (stream 0: training, 1: validation; ``rank`` under DDP)."""
    entropy = [seed, fold, epoch, stream] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def poly_lr(base_lr: float, progress: float, exponent: float) -> float:
    """nnU-Net's poly schedule: ``base * (1 - progress) ** exponent``, progress in [0, 1]."""
    return base_lr * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net's default) or AdamW (faster start for short budgets)."""
    if cfg.resolved_optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=cfg.resolved_lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay)


def _memory_format(device: torch.device, config: Configuration, cfg: TrainConfig) -> torch.memory_format:
    if cfg.channels_last and device.type == "cpu" and config.dims == 3:
        return torch.channels_last_3d
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Checkpoints and records


def plans_meta(plans: Plans) -> dict[str, Any]:
    """What a checkpoint needs to be used without the experiment folder's plans."""
    meta = {
        "labels": {k: list(v) for k, v in plans.labels.items()},
        "channel_names": list(plans.channel_names),
        "transpose": list(plans.transpose),
        "num_classes": plans.num_classes,
        "task": plans.task,
    }
    for key in ("upsample_factor", "min_target_spacing"):  # super-resolution: its output grid, thinnest targets
        if getattr(plans, key) is not None:
            meta[key] = list(getattr(plans, key))
    return meta


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite log.jsonl from the history (atomic; after a resume it matches the checkpoint)."""
    write_text(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in history))


def write_train_config(path: Path, cfg: TrainConfig, plans: Plans, configuration: str, fold: int,
                       device: torch.device, workers: int, batch_size: int, world_size: int = 1) -> None:
    """The resolved configuration of the run, with its hash and the environment."""
    import yaml

    from autoseg._version import __version__

    record = {
        "autoseg_version": __version__,
        "configuration": configuration,
        "fold": fold,
        "train": cfg.to_dict(),
        "train_digest": cfg.digest(),
        "resolved": {"device": str(device), "workers": workers, "batch_size": batch_size,
                     "optimizer": cfg.resolved_optimizer, "lr": cfg.resolved_lr, "processes": world_size,
                     "precision": precision_name(step_dtype(device, cfg, plans.task))},
        "plans_fingerprint_sha256": plans.fingerprint_sha256,
        "environment": {"torch": str(torch.__version__), "python": platform.python_version(),
                        "cuda": torch.version.cuda, "threads": torch.get_num_threads()},
    }
    write_text(path, yaml.safe_dump(record, sort_keys=False))


def plot_progress(path: Path, history: list[dict[str, Any]], metric: str = "pseudo-Dice",
                  metric_range: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """progress.png: losses, the online metric (pseudo-Dice, or the task's: ``metric`` over
    ``metric_range``, None for an unbounded one such as PSNR) and its EMA, learning rate and epoch
    time per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train loss")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="validation loss")
    twin = axes[0].twinx()
    twin.plot(epochs, [r["mean_fg_dice"] for r in history], "g.", label=metric)
    twin.plot(epochs, [r["ema_fg_dice"] for r in history], "g-", label=f"{metric} (EMA)")
    if metric_range is not None:
        twin.set_ylim(*metric_range)
    axes[0].legend(loc="upper left")
    twin.legend(loc="upper right")
    axes[1].plot(epochs, [r["epoch_time_s"] for r in history])
    axes[1].set_ylabel("epoch time (s)")
    axes[2].plot(epochs, [r["lr"] for r in history])
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class FoldSetup:
    """Everything one fold's training needs, resolved by the stage."""

    plans: Plans
    configuration: str
    fold: int
    train_cases: list[Case]
    val_cases: list[Case]
    paths: FoldPaths

    @property
    def task(self) -> Task:
        """The plans' task (with this configuration's normalisation): the network head, the loss,
        the online metric and the batches."""
        return task_of(self.plans, self.configuration)


def train_fold(setup: FoldSetup, cfg: TrainConfig, resume: bool = False,
               callbacks: Callbacks | None = None, dist: DistContext = SINGLE) -> TrainState:
    """Train one fold; returns the final state (history included). See :func:`_train_fold`.

    Rank 0 holds the fold folder's lock (:func:`autoseg.atomic.folder_lock`) throughout: a second
    run of the same fold stops with a one-line error instead of deleting this one's files.
    """
    if not dist.is_main:
        return _train_fold(setup, cfg, resume, callbacks, dist)
    with folder_lock(setup.paths.root, "train"):
        return _train_fold(setup, cfg, resume, callbacks, dist)


def _train_fold(setup: FoldSetup, cfg: TrainConfig, resume: bool, callbacks: Callbacks | None,
                dist: DistContext) -> TrainState:
    """Train one fold; returns the final state (history included).

    Under DDP (``dist.enabled``, process group already joined) every rank calls this with its own
    ``cfg.device``: the global batch (``cfg.batch_size`` or the plan's) is split over the ranks,
    each rank draws its own patches, gradients are averaged by DDP, and rank 0 alone reports
    progress and writes logs, plots and checkpoints. Decisions that depend on the clock (time
    budget, epoch sizing, the LR on elapsed time) use rank 0's clock, so the ranks never diverge.

    Raises:
        ConfigError: bad device, no checkpoint to resume from, a checkpoint of another run, or
            another run training this fold.
    """
    callbacks = (callbacks or Callbacks()) if dist.is_main else Callbacks()
    config = setup.plans.configuration(setup.configuration)
    device = resolve_device(cfg.device)
    workers = default_workers(device, local_processes(dist)) if cfg.workers is None else cfg.workers
    global_batch = cfg.batch_size or config.batch_size
    batch_size = rank_batch(global_batch, dist)[1]
    oversample = rank_oversample(global_batch, cfg.oversample, dist)
    paths = setup.paths
    paths.root.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed + setup.fold)
    task = setup.task
    net = build_network(config.topology, config.input_channels, task.num_outputs,
                        deep_supervision=task.deep_supervision, residual=task.residual_channels(config))
    memory_format = _memory_format(device, config, cfg)
    net = net.to(device=device, memory_format=memory_format)
    optimizer = make_optimizer(net, cfg)
    autocast_dtype = step_dtype(device, cfg, setup.plans.task)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    n_outputs = config.topology.num_stages - 1
    # The task's loss (segmentation: Dice + CE, or Dice + BCE over sigmoid region outputs) at every
    # deep-supervision output (restoration: L1 on its one output).
    loss_fn = DeepSupervisionLoss(task.make_loss(batch_dice=True, sync=dist.enabled, loss=cfg.loss), n_outputs)
    state = TrainState(iters_per_epoch=cfg.iters_per_epoch if cfg.time_budget_s is None else cfg.iters_per_epoch,
                       val_iters=cfg.val_iters)

    if resume:
        state = _restore(paths.latest, net, optimizer, scaler, cfg, setup, precision_name(autocast_dtype), device)
    elif paths.latest.exists() or paths.final.exists():
        raise ConfigError(f"{paths.root}: this fold already has checkpoints; use --resume to continue it "
                          "or delete the folder to start over")
    if dist.is_main:
        remove_stale_temp(paths.root)  # a run killed while writing a checkpoint or plot left it
        write_train_config(paths.config, cfg, setup.plans, setup.configuration, setup.fold, device, workers,
                           global_batch, dist.world_size)
    step = _make_step(net, optimizer, scaler, loss_fn, cfg, autocast_dtype, memory_format, device)
    model = _wrap(net, cfg, device, dist)
    # Validation runs a different number of batches per rank: never through DDP's forward.
    eval_model = net if dist.enabled else model
    sampling = _Sampling(batch_size, oversample, workers, dist)

    while state.epoch < cfg.epochs and not _budget_spent(state, cfg):
        record = _run_epoch(model, eval_model, net, step, loss_fn, optimizer, state, setup, cfg, config, device,
                            sampling, memory_format, autocast_dtype, callbacks)
        state.history.append(record)
        state.epoch += 1
        state.replica_digests = _check_replicas(net, dist, paths.root)
        if dist.is_main:
            write_log(paths.log, state.history)
            plot_progress(paths.plot, state.history, task.validation_metric, task.validation_range)
        if record["ema_fg_dice"] > state.best_ema_dice:
            state.best_ema_dice = record["ema_fg_dice"]
            if dist.is_main:
                save_checkpoint(paths.best, _weights_payload(net, state, cfg, setup))
        last = state.epoch >= cfg.epochs or _budget_spent(state, cfg)
        if (state.epoch % cfg.save_every == 0 or last) and dist.is_main:
            save_checkpoint(paths.latest, _full_payload(net, optimizer, scaler, state, cfg, setup,
                                                          precision_name(autocast_dtype)))
        callbacks.on_epoch_end(record)
    if dist.is_main:
        save_checkpoint(paths.final, _weights_payload(net, state, cfg, setup))
    return state


@dataclass(frozen=True)
class _Sampling:
    """This process's share of the batch sampling."""

    batch_size: int
    oversample: float
    workers: int
    dist: DistContext


def _wrap(net: nn.Module, cfg: TrainConfig, device: torch.device, dist: DistContext) -> nn.Module:
    """DDP around the network under a process group; ``torch.compile`` on CUDA when asked."""
    model: nn.Module = net
    if dist.enabled and not getattr(net, "deep_supervision", True):
        net.freeze_unused_heads()  # DDP refuses parameters that get no gradient
    if dist.enabled:
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # Channels-last 1x1x1 kernels: the gradient's strides differ from the bucket's only in size-1
        # dimensions (same memory order); DDP copies them and warns on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

        # InstanceNorm keeps no running statistics: there are no buffers to broadcast.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    if cfg.compile and device.type == "cuda":
        model = torch.compile(model)
    return model


def _check_replicas(net: nn.Module, dist: DistContext, where: Path) -> list[str]:
    """Under DDP, every rank's weights digest; all must be equal (a divergence is a bug, not noise)."""
    if not dist.enabled:
        return []
    digests = all_gather_strings(dist, weights_digest(net))
    if len(set(digests)) != 1:
        raise RuntimeError(f"{where}: the DDP replicas' weights diverged (digests {digests}); "
                           "please report this with train_config.yaml")
    return digests


def _budget_spent(state: TrainState, cfg: TrainConfig) -> bool:
    return cfg.time_budget_s is not None and state.elapsed_s >= cfg.time_budget_s


def _make_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_fn: nn.Module,
               cfg: TrainConfig, autocast_dtype: torch.dtype | None, memory_format: torch.memory_format,
               device: torch.device) -> Callable[[nn.Module, torch.Tensor, list[torch.Tensor]], float]:
    def step(model: nn.Module, image: torch.Tensor, targets: list[torch.Tensor]) -> float:
        image = image.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = [t.to(device, non_blocking=True) for t in targets]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            outputs = model(image)
            loss = loss_fn(outputs, targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    return step


def _run_epoch(model: nn.Module, eval_model: nn.Module, net: nn.Module, step: Callable, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, state: TrainState, setup: FoldSetup, cfg: TrainConfig,
               config: Configuration, device: torch.device, sampling: _Sampling,
               memory_format: torch.memory_format, autocast_dtype: torch.dtype | None,
               callbacks: Callbacks) -> dict[str, Any]:
    dist = sampling.dist
    batch_size = sampling.batch_size
    epoch_start = time.perf_counter()
    elapsed_at_start = state.elapsed_s
    net.train()
    losses: list[float] = []
    wait = 0.0
    lr = cfg.resolved_lr
    loader = BatchLoader(setup.train_cases, config, augment=True, workers=sampling.workers,
                         oversample=sampling.oversample, batch_size=batch_size,
                         seed=epoch_seed(cfg.seed, setup.fold, state.epoch, 0, dist.rank),
                         producer=setup.task.batch_producer())
    callbacks.on_epoch_start(state.epoch, state.iters_per_epoch)
    clock_synced = cfg.time_budget_s is not None  # rank 0's clock decides for every rank
    try:
        it = 0
        while True:
            if state.iters_per_epoch is not None and it >= state.iters_per_epoch:
                break
            in_epoch = time.perf_counter() - epoch_start
            if clock_synced:
                in_epoch = broadcast_float(dist, in_epoch)
            elapsed = elapsed_at_start + in_epoch
            if cfg.time_budget_s is not None:
                if elapsed >= cfg.time_budget_s:
                    break
                lr = poly_lr(cfg.resolved_lr, elapsed / cfg.time_budget_s, cfg.poly_exponent)
            else:
                lr = poly_lr(cfg.resolved_lr, state.epoch / cfg.epochs, cfg.poly_exponent)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(loader)
            wait += batch.wait_s
            losses.append(step(model, batch.image, batch.target))
            callbacks.on_iteration(it, losses[-1])
            it += 1
            if state.iters_per_epoch is None and it == 3:
                # Time budget without --iters-per-epoch: size epochs from the measured step time.
                per_it = broadcast_float(dist, time.perf_counter() - epoch_start) / it
                state.iters_per_epoch = int(min(250, max(10, cfg.time_budget_s / BUDGET_EPOCHS / per_it)))
                state.val_iters = cfg.val_iters if cfg.val_iters is not None else max(5, state.iters_per_epoch // 5)
                callbacks.on_epoch_start(state.epoch, state.iters_per_epoch)
    finally:
        loader.close()
    train_time = time.perf_counter() - epoch_start
    loss_sum, loss_count = all_reduce_sum(dist, np.array([float(np.sum(losses)), float(len(losses))]))
    val_iters = state.val_iters if state.val_iters is not None else 50
    val_loss, dice = _validate(eval_model, net, loss_fn, setup, cfg, config, device, sampling, memory_format,
                               autocast_dtype, val_iters)
    epoch_time = broadcast_float(dist, time.perf_counter() - epoch_start)
    state.elapsed_s = elapsed_at_start + epoch_time
    foreground = [d for d in dice if not math.isnan(d)]
    mean_dice = float(np.mean(foreground)) if foreground else 0.0
    state.ema_dice = mean_dice if state.ema_dice is None else EMA_DECAY * state.ema_dice + (1 - EMA_DECAY) * mean_dice
    n_iters = max(len(losses), 1)
    # Another task's online metric (restoration: PSNR in dB) is named in the record; its values are
    # kept under the segmentation keys (pseudo_dice, mean_fg_dice, ema_fg_dice) that the best
    # checkpoint, resume, the plot and the CLI read.
    metric = {} if setup.task.validation_metric == "pseudo-Dice" else {"metric": setup.task.validation_metric}
    return {
        **metric,
        "epoch": state.epoch,
        "train_loss": float(loss_sum / loss_count) if loss_count else float("nan"),
        "val_loss": val_loss,
        "pseudo_dice": [None if math.isnan(d) else round(d, 6) for d in dice],
        "mean_fg_dice": mean_dice,
        "ema_fg_dice": float(state.ema_dice),
        "lr": lr,
        "iters": len(losses),
        "epoch_time_s": round(epoch_time, 3),
        "s_per_it": round(train_time / n_iters, 4),
        "samples_per_s": round(len(losses) * batch_size * dist.world_size / max(train_time, 1e-9), 3),
        "data_wait_fraction": round(wait / max(train_time, 1e-9), 4),
        "elapsed_s": round(state.elapsed_s, 3),
    }


@torch.no_grad()
def _validate(model: nn.Module, net: nn.Module, loss_fn: nn.Module, setup: FoldSetup, cfg: TrainConfig,
              config: Configuration, device: torch.device, sampling: _Sampling, memory_format: torch.memory_format,
              autocast_dtype: torch.dtype | None, iters: int) -> tuple[float, list[float]]:
    """Loss and the task's online metric per output on validation patches (segmentation:
    pseudo-Dice per foreground class or region, nnU-Net's online metric).

    Under DDP every rank scores ``iters`` batches of its share of the global batch, and the task's
    counts are summed: the same number of patches as one process scoring ``iters`` global batches.
    """
    dist = sampling.dist
    task = setup.task
    k = task.validation_size
    counts = None
    if iters == 0 or not setup.val_cases:
        return float("nan"), [float("nan")] * k
    net.eval()
    losses = []
    # Validation patches are the same every epoch (fixed seed), so the curve compares like with like.
    loader = BatchLoader(setup.val_cases, config, augment=False, workers=0, oversample=sampling.oversample,
                         batch_size=sampling.batch_size, seed=epoch_seed(cfg.seed, setup.fold, 0, 1, dist.rank),
                         producer=task.batch_producer())
    try:
        for _ in range(iters):
            batch = next(loader)
            image = batch.image.to(device).contiguous(memory_format=memory_format)
            targets = [t.to(device) for t in batch.target]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                outputs = model(image)
                losses.append(float(loss_fn(outputs, targets)))
            logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            batch_counts = task.validation_counts(logits, targets[0])
            counts = batch_counts if counts is None else counts + batch_counts
    finally:
        loader.close()
        net.train()
    assert counts is not None  # iters > 0
    summed = all_reduce_sum(dist, np.concatenate([counts, [float(np.sum(losses)), float(len(losses))]]))
    scores = task.validation_scores(summed[:-2])
    return float(summed[-2] / summed[-1]) if summed[-1] else float("nan"), scores


def _weights_payload(net: nn.Module, state: TrainState, cfg: TrainConfig, setup: FoldSetup) -> dict[str, Any]:
    from autoseg import plans as plans_io

    config_dict = plans_io.to_dict(setup.plans)["configurations"][setup.configuration]
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "epoch": state.epoch,
        "ema_fg_dice": state.ema_dice,
        "configuration_name": setup.configuration,
        "configuration": config_dict,
        "plans": plans_meta(setup.plans),
        "train_config": cfg.to_dict(),
        "fold": setup.fold,
    }


def _full_payload(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  state: TrainState, cfg: TrainConfig, setup: FoldSetup, resolved_precision: str) -> dict[str, Any]:
    payload = _weights_payload(net, state, cfg, setup)
    payload.update({
        "optimizer": optimizer.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "state": {"epoch": state.epoch, "elapsed_s": state.elapsed_s, "iters_per_epoch": state.iters_per_epoch,
                  "val_iters": state.val_iters, "ema_dice": state.ema_dice, "best_ema_dice": state.best_ema_dice,
                  "history": state.history},
        "torch_rng": torch.get_rng_state(),
        "loss": cfg.loss,
        "precision": cfg.precision,
        "precision_resolved": resolved_precision,
    })
    return payload


def _restore(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             cfg: TrainConfig, setup: FoldSetup, resolved_precision: str, device: torch.device) -> TrainState:
    if not path.exists():
        raise ConfigError(f"{path}: no checkpoint to resume from; start without --resume")
    data = load_checkpoint(path)
    if data.get("configuration_name") != setup.configuration or data.get("fold") != setup.fold:
        raise ConfigError(f"{path}: checkpoint is for {data.get('configuration_name')} fold {data.get('fold')}, "
                          f"not {setup.configuration} fold {setup.fold}")
    if "loss" in data and data["loss"] != cfg.loss:  # a resumed run continues the same objective
        raise ConfigError(f"{path}: this fold was started with --loss {data['loss'] or 'default'}, not "
                          f"{cfg.loss or 'default'}; resume with the same --loss")
    if refused := resume_check(data, resolved_precision, device):  # --resume continues exactly
        raise ConfigError(f"{path}: {refused}")
    if changed := configuration_changes(data.get("configuration"), setup.plans, setup.configuration):
        raise ConfigError(f"{path}: plans.yaml's {setup.configuration} changed since this fold started ({changed}); "
                          "restore it, or train the fold again without --resume")
    net.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    if data["grad_scaler"]:  # empty when the run had no fp16 loss scaling
        scaler.load_state_dict(data["grad_scaler"])
    torch.set_rng_state(data["torch_rng"])
    saved = data["state"]
    return TrainState(
        epoch=int(saved["epoch"]), elapsed_s=float(saved["elapsed_s"]),
        iters_per_epoch=saved["iters_per_epoch"], val_iters=saved["val_iters"],
        ema_dice=saved["ema_dice"], best_ema_dice=float(saved["best_ema_dice"]),
        history=list(saved["history"]),
    )
