"""``train``: the folds of one configuration, with a live progress bar per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoseg.cli._render import make_console, training_progress, user_errors


def validation_line(fold: int, metrics: dict) -> str:
    """The line printed after a fold's validation (``metrics`` as metrics.json holds it).

    A mean foreground Dice of 0 is printed as 0 (a model that finds nothing), and a missing one
    (every label absent from every validation case) as "n/a" — never as each other or as "nan".
    """
    cases = len(metrics["per_case"])
    summary = metrics["summary"]
    if "mean_psnr_db" in summary:  # a restoration fold (autoseg.tasks.restoration.Denoise.summarize)
        low, high = summary.get("window", (float("nan"), float("nan")))
        shown = ", ".join(f"{name} {summary[f'mean_{key}']:{digits}}" for name, key, digits in
                          (("PSNR", "psnr_db", ".2f"), ("SSIM 2D", "ssim_2d", ".4f"), ("SSIM 3D", "ssim_3d", ".4f"),
                           ("RMSE", "rmse_hu", ".2f"))
                          if summary.get(f"mean_{key}") is not None)
        return f"fold {fold} validation ({cases} cases, TTA): {shown} in [{low:g}, {high:g}] → metrics.json"
    mean = summary.get("mean_foreground_dice")
    shown = "n/a" if mean is None else f"{mean:.4f}"
    return f"fold {fold} validation ({cases} cases, TTA): mean foreground Dice {shown} → metrics.json"


def train_cmd(
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) written by 'autoseg plan'.")],
    configuration: Annotated[str, typer.Option("--config", "-c", help="Configuration to train (2d, 2.5d, "
                                                                      "3d_fullres, 3d_lowres).")],
    fold: Annotated[str, typer.Option("--fold", "-f", help="Fold number, comma list, or 'all'.")] = "0",
    epochs: Annotated[int, typer.Option("--epochs", help="Upper bound on epochs.", min=1)] = 1000,
    iters_per_epoch: Annotated[Optional[int], typer.Option(
        "--iters-per-epoch", help="Training iterations per epoch (default 250; with --time-budget: sized so "
                                  "about 20 epochs fit).", min=1)] = None,
    val_iters: Annotated[Optional[int], typer.Option("--val-iters", help="Validation batches per epoch.",
                                                     min=0)] = None,
    time_budget: Annotated[Optional[str], typer.Option(
        "--time-budget", help="Wall-clock budget per fold, e.g. 15m, 2h, covering training and the fold's "
        "validation (estimated and reserved first); the LR schedule is fitted to the training part. Default: "
        "plans.yaml's, from autoseg plan --time-budget.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Initial learning rate (default: 1e-2 for sgd, "
                                                             "1e-3 for adamw).")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="auto (sgd; adamw with --time-budget, which "
                                                               "learns several times faster at first), sgd or adamw.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Override the plan's batch size.",
                                                      min=1)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seeds the network init and every epoch's batches.")] = 12345,
    workers: Annotated[Optional[int], typer.Option(
        "-j", "--workers", help="Background augmentation processes; 0 = in the training process (default: 0 "
                                "on a CPU with <= 4 cores, where workers steal the step's cores).", min=0)] = None,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision (CUDA; bf16 on AMX CPUs). "
                                                             "--no-amp: the same as --precision fp32.")] = True,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (mixed precision on CUDA; bf16 autocast for segmentation on a CPU with AMX, "
                            "about 1.6-1.9x faster steps; fp32 elsewhere), fp32, or bf16 (also on a CPU with "
                            "AVX-512 BF16).")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the network (CUDA).")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Epochs between checkpoint_latest.pt writes.",
                                            min=1)] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoint_latest.pt exactly.")] = False,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Predict the fold's validation cases "
                                           "in full after training -> validation/ and metrics.json.")] = True,
    validate_only: Annotated[bool, typer.Option("--validate-only", help="Only redo the full validation of "
                                                "trained folds from checkpoint_final.pt.")] = False,
    splits: Annotated[Optional[Path], typer.Option("--splits", help="Your own splits JSON "
                                                   "([{train: [...], val: [...]}, ...]).")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", help="Train on N GPUs of this machine: DDP over NCCL (the batch is split over the GPUs), or "
                       "one fold per GPU with --folds-parallel. Multi-node: see README (torchrun).", min=1)] = None,
    procs: Annotated[Optional[int], typer.Option(
        "--procs", help="With --device cpu: N CPU processes, DDP over gloo (or one fold each with "
                        "--folds-parallel); the cores are shared out between them.", min=1)] = None,
    folds_parallel: Annotated[bool, typer.Option(
        "--folds-parallel", help="Train several folds at once, one per GPU (--gpus) or process (--procs), "
                                 "instead of DDP; usually scales better for 5-fold CV.")] = False,
    loss: Annotated[Optional[str], typer.Option(
        "--loss", help="Restoration tasks: l1 (default) or mse. Segmentation always trains with Dice + CE.")] = None,
) -> None:
    """Train a configuration's folds with 5-fold cross-validation; logs, curves and checkpoints per fold."""
    with user_errors():
        from autoseg.training import run as training
        from autoseg.training.config import TrainConfig, parse_duration
        from autoseg.distributed import resolve_launch

        launch = resolve_launch(device, gpus, procs, folds_parallel)

        budget = parse_duration(time_budget) if time_budget else None
        console = make_console()
        if budget is None:
            from autoseg import plans as plans_io

            planned = plans_io.load(work / "plans.yaml").time_budget_s
            if planned is not None:
                budget = planned
                console.print(f"time budget {planned / 60:g} min per fold, from plans.yaml (autoseg plan --time-budget)")
        cfg = TrainConfig(
            epochs=epochs if (budget is None or epochs != 1000) else 10**6,
            iters_per_epoch=iters_per_epoch if (iters_per_epoch or budget) else 250,
            val_iters=val_iters, time_budget_s=budget, optimizer=optimizer,
            lr=lr, batch_size=batch_size, device=device,
            amp=amp, precision=precision, compile=compile_, seed=seed, workers=workers, save_every=save_every, loss=loss,
        )
        import os

        with training_progress(console) as callbacks_for:
            results = training.run(
                work, configuration, fold, cfg, resume=resume, splits_file=splits, callbacks_for=callbacks_for,
                # under torchrun, rank 0 alone reports (the others wait on the same lock)
                on_previous=callbacks_for.previous_stage if os.environ.get("RANK", "0") == "0" else None,  # type: ignore[attr-defined]
                on_preprocess=lambda name: console.print(f"{name} is not preprocessed yet: preprocessing it first"),
                validate=validate, validate_only=validate_only, launch=launch,
                on_budget=lambda line: console.print(line),
                on_validated=lambda fold, m: console.print(validation_line(fold, m)),
            )
        rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
        for result in [] if (validate_only or not rank0) else results:
            last = result.state.history[-1] if result.state.history else {}
            console.print(f"[green]✓[/] fold {result.fold}: {result.state.epoch} epoch(s), "
                          f"{last.get('metric', 'pseudo-Dice')} {last.get('mean_fg_dice', float('nan')):.3f} "
                          f"(EMA {last.get('ema_fg_dice', float('nan')):.3f}) → {result.folder}")


def register(app: typer.Typer) -> None:
    """Add ``train`` to ``app``.

    Args:
        app: The top-level Typer app.
    """
    app.command("train")(train_cmd)
