"""Command-line interface: one command per verb. Thin: parse, call the stage, render with rich.

Heavy modules (numpy, SimpleITK, torch) are imported inside the commands so that
``autoseg --help`` starts instantly. An :class:`~autoseg.errors.AutosegError` becomes one line on
stderr and a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from autoseg.dataset import Issue
    from autoseg.plans import Plans

app = typer.Typer(
    name="autoseg",
    help="Self-configuring medical image segmentation: check, plan, preprocess, train, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Workers = Annotated[
    Optional[int],
    typer.Option("-j", "--workers", help="Worker processes (default: CPU count, bounded by free memory).",
                 envvar="AUTOSEG_WORKERS", show_envvar=True, min=1),
]


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    # stderr carries one-line errors: never wrap them (soft wrap), so they stay greppable.
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn domain errors into one line on stderr and an exit code."""
    from autoseg.errors import AutosegError

    try:
        yield
    except AutosegError as exc:
        _console(stderr=True).print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted; finished outputs were kept, partial ones discarded")
        raise typer.Exit(code=130) from None


@contextlib.contextmanager
def _progress(description: str) -> Iterator[object]:
    """A rich progress bar with ETA; yields a ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=_console(stderr=True), transient=True)
    task = progress.add_task(description, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            # Started lazily, after any worker pool has forked, so no refresh thread is forked.
            progress.start()
            started = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            progress.stop()


def _issue_table(issues: list[Issue], title: str) -> object:
    from rich.table import Table

    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("case", overflow="fold")
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("how to fix", overflow="fold")
    for issue in issues:
        mark = "[red]error[/]" if issue.severity == "error" else "[yellow]warning[/]"
        table.add_row(mark, issue.case or "", issue.file or "", issue.problem, issue.fix)
    return table


def _print_issues(console: Console, issues: list[Issue], limit: int = 200) -> None:
    from rich.markup import escape

    if not issues:
        return
    shown = issues[:limit]
    escaped = [type(i)(i.severity, i.code, escape(i.problem), escape(i.fix), i.case and escape(i.case),
                       i.file and escape(i.file)) for i in shown]
    console.print(_issue_table(escaped, f"{len(issues)} issue(s)"))
    if len(issues) > limit:
        console.print(f"... and {len(issues) - limit} more (use --output to save all as JSON)")


@app.command("check")
def check_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder (nnU-Net v2 or MSD layout).")],
    workers: Workers = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write every issue as JSON.")] = None,
) -> None:
    """Validate a dataset and list every problem at once. Reads every file; writes nothing to RAW."""
    with _user_errors():
        from autoseg import experiment

        console = _console()
        with _progress("checking cases") as progress:
            report = experiment.check(raw, workers=workers, progress=progress)
        _print_issues(console, report.issues)
        if output is not None:
            from dataclasses import asdict

            from autoseg.atomic import write_json

            write_json(output, [asdict(i) for i in report.issues])
        n_cases = len(report.spec.cases) if report.spec else 0
        summary = f"{raw}: {n_cases} case(s), {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
        if report.errors:
            console.print(f"[red]✗[/] {summary}")
            raise typer.Exit(code=1)
        console.print(f"[green]✓[/] {summary}")


@app.command("fingerprint")
def fingerprint_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder (WORK) to write fingerprint.json to.")],
    workers: Workers = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if the dataset has not changed.")] = False,
) -> None:
    """Check and fingerprint a dataset: spacing, shapes, intensities, classes -> WORK/fingerprint.json."""
    with _user_errors():
        from autoseg import experiment

        with _progress("fingerprinting") as progress:
            report, fp, reused = experiment.fingerprint(raw, out, workers=workers, progress=progress, reuse=not force)
        console = _console()
        _print_issues(console, report.warnings)
        _print_fingerprint(console, fp.summary or {}, fp)
        path = experiment.WorkPaths(out).fingerprint
        console.print(f"[green]✓[/] {path}" + (" (dataset unchanged: reused)" if reused else ""))


def _print_fingerprint(console: Console, summary: dict, fp: object) -> None:
    from rich.table import Table

    table = Table(title=f"fingerprint: {getattr(fp, 'dataset_name', '')}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")

    def axes(values: list[float]) -> str:
        return " × ".join(f"{v:.4g}" for v in values)

    table.add_row("cases", str(summary.get("num_cases", "")))
    if summary:
        table.add_row("median spacing (z, y, x)", axes(summary["median_spacing"]) + " mm")
        table.add_row("spacing range", f"{axes(summary['min_spacing'])} … {axes(summary['max_spacing'])}")
        table.add_row("median shape after crop", axes(summary["median_shape_after_crop"]))
        table.add_row("relative size after crop", f"{summary['median_relative_size_after_crop']:.3f}")
        table.add_row("orientations", ", ".join(f"{k}: {v}" for k, v in summary["orientations"].items()))
        for name, cls in summary["classes"].items():
            table.add_row(f"class {cls['value']} {name}", f"present in {cls['cases_present']} case(s), "
                          f"median {cls['median_voxels']:.0f} voxels")
    for index, (name, stats) in enumerate(zip(getattr(fp, "channel_names", ()), getattr(fp, "intensity", ()))):
        if stats.n:
            table.add_row(f"channel {index} {name}", f"foreground mean {stats.mean:.4g}, std {stats.std:.4g}, "
                          f"p0.5–p99.5 {stats.p00_5:.4g}–{stats.p99_5:.4g}")
    console.print(table)


@app.command("plan")
def plan_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder (WORK) to create or update.")],
    planner: Annotated[str, typer.Option("--planner", "-p", help="Preset name (default, resenc-m, resenc-l, cpu, "
                                                                  "tiny) or a preset YAML file.")] = "default",
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="GPU memory in GB to plan for (default: the preset's budget; the detected GPU "
                             "decides the recommendation).", min=0.01)] = None,
    workers: Workers = None,
) -> None:
    """Check, fingerprint and plan a dataset: writes WORK/dataset.json, fingerprint.json, plans.yaml."""
    with _user_errors():
        from autoseg import experiment

        with _progress("checking and fingerprinting") as progress:
            report, fp, plans, reused = experiment.plan_dataset(raw, out, planner, gpu_memory, workers, progress)
        console = _console()
        _print_issues(console, report.warnings)
        if reused:
            console.print("dataset unchanged since the last run: fingerprint reused")
        print_plans(console, plans)
        console.print(f"[green]✓[/] {experiment.WorkPaths(out).plans}")


@app.command("preprocess")
def preprocess_cmd(
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) written by 'autoseg plan'.")],
    configs: Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", metavar="CONFIG", help="Configuration to preprocess; repeat or separate with commas "
                               "(default: the plan's recommended ones).")] = None,
    workers: Workers = None,
) -> None:
    """Crop, normalise and resample every case -> WORK/preprocessed/<config>/. Resumes where it stopped."""
    with _user_errors():
        from autoseg.preprocessing import run as preprocessing

        names = [n.strip() for c in (configs or []) for n in c.split(",") if n.strip()] or None
        with _progress("preprocessing") as progress:
            summary = preprocessing.run(work, names, workers, progress)
        console = _console()
        for name, s in summary.configs.items():
            how = f"linked from {s.linked_from}" if s.linked_from else f"{s.processed} processed"
            stale = f", {s.stale_removed} stale temp file(s) removed" if s.stale_removed else ""
            console.print(f"[green]✓[/] {name}: {s.cases} case(s) — {how}, {s.reused} already done{stale} "
                          f"→ {s.folder}")
        console.print(f"{summary.seconds:.1f} s with {summary.workers} worker(s)")


@app.command("train")
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
        "--time-budget", help="Wall-clock budget per fold, e.g. 15m, 2h; the LR schedule is fitted to it.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Initial learning rate (SGD, Nesterov).")] = 1e-2,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Override the plan's batch size.",
                                                      min=1)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seeds the network init and every epoch's batches.")] = 12345,
    workers: Annotated[Optional[int], typer.Option(
        "-j", "--workers", help="Background augmentation processes; 0 = in the training process (default: 0 "
                                "on a CPU with <= 4 cores, where workers steal the step's cores).", min=0)] = None,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = True,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the network (CUDA).")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Epochs between checkpoint_latest.pt writes.",
                                            min=1)] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoint_latest.pt exactly.")] = False,
    splits: Annotated[Optional[Path], typer.Option("--splits", help="Your own splits JSON "
                                                   "([{train: [...], val: [...]}, ...]).")] = None,
) -> None:
    """Train a configuration's folds with 5-fold cross-validation; logs, curves and checkpoints per fold."""
    with _user_errors():
        from autoseg.training import run as training
        from autoseg.training.config import TrainConfig, parse_duration

        budget = parse_duration(time_budget) if time_budget else None
        cfg = TrainConfig(
            epochs=epochs if (budget is None or epochs != 1000) else 10**6,
            iters_per_epoch=iters_per_epoch if (iters_per_epoch or budget) else 250,
            val_iters=val_iters, time_budget_s=budget, lr=lr, batch_size=batch_size, device=device,
            amp=amp, compile=compile_, seed=seed, workers=workers, save_every=save_every,
        )
        console = _console()
        with _training_progress(console) as callbacks_for:
            results = training.run(
                work, configuration, fold, cfg, resume=resume, splits_file=splits, callbacks_for=callbacks_for,
                on_preprocess=lambda name: console.print(f"{name} is not preprocessed yet: preprocessing it first"),
            )
        for result in results:
            last = result.state.history[-1] if result.state.history else {}
            console.print(f"[green]✓[/] fold {result.fold}: {result.state.epoch} epoch(s), "
                          f"pseudo-Dice {last.get('mean_fg_dice', float('nan')):.3f} "
                          f"(EMA {last.get('ema_fg_dice', float('nan')):.3f}) → {result.folder}")


@contextlib.contextmanager
def _training_progress(console: Console) -> Iterator[object]:
    """Per fold: a bar per epoch with ETA, and one summary line per finished epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from autoseg.training.trainer import Callbacks

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)

    def callbacks_for(fold: int) -> Callbacks:
        task: dict = {"id": None, "epoch": None}

        def start(epoch: int, iters: int | None) -> None:
            # Called again within an epoch when a time budget has just sized the epoch.
            if task["epoch"] != epoch:
                if task["id"] is not None:
                    progress.remove_task(task["id"])
                task["id"] = progress.add_task(f"fold {fold} epoch {epoch}", total=iters, loss="-")
                task["epoch"] = epoch
            else:
                progress.update(task["id"], total=iters)

        def step(it: int, loss: float) -> None:
            progress.update(task["id"], completed=it + 1, loss=f"{loss:.4f}")

        def end(record: dict) -> None:
            dice = ", ".join("-" if d is None else f"{d:.3f}" for d in record["pseudo_dice"])
            progress.console.print(
                f"fold {fold} epoch {record['epoch']}: train {record['train_loss']:.4f}, val {record['val_loss']:.4f}, "
                f"pseudo-Dice [{dice}] (EMA {record['ema_fg_dice']:.3f}), lr {record['lr']:.2e}, "
                f"{record['epoch_time_s']:.1f} s ({record['s_per_it']:.2f} s/it, data wait "
                f"{100 * record['data_wait_fraction']:.0f}%)")

        return Callbacks(on_epoch_start=start, on_iteration=step, on_epoch_end=end)

    with progress:
        yield callbacks_for


def print_plans(console: Console, plans: Plans) -> None:
    """One table per configuration."""
    from rich.table import Table

    def fmt(values: tuple) -> str:
        return " × ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)

    console.print(f"[bold]{plans.dataset_name}[/] — planner {plans.planner}, transpose {list(plans.transpose)}, "
                  f"budget {plans.memory_budget_gb:g} GB, GPU {plans.gpu_memory_gb:g} GB ({plans.gpu_memory_source})")
    for name, config in plans.configurations.items():
        topo = config.topology
        table = Table(title=f"{name}" + ("  (recommended)" if name in plans.recommended else ""),
                      show_header=False, title_justify="left")
        table.add_column("", style="bold")
        table.add_column("")
        table.add_row("spacing (mm)", fmt(config.spacing[-config.dims:]))
        table.add_row("median shape", fmt(config.median_shape[-config.dims:]))
        table.add_row("patch", fmt(config.patch_size))
        table.add_row("batch", str(config.batch_size))
        if config.context_slices:
            table.add_row("input slices", f"{2 * config.context_slices + 1} (±{config.context_slices})")
        pools = [sum(1 for s in topo.strides if s[a] > 1) for a in range(config.dims)]
        table.add_row("stages / pools per axis", f"{topo.num_stages} / {fmt(tuple(pools))}")
        table.add_row("kernels", " ".join("".join(str(k) for k in ks) for ks in topo.kernel_sizes))
        table.add_row("features", " ".join(str(f) for f in topo.features_per_stage))
        table.add_row("encoder", ("residual, blocks " if topo.residual_encoder else "plain, convs ")
                      + " ".join(str(b) for b in topo.blocks_per_stage))
        table.add_row("normalisation", ", ".join(n.scheme + (" (mask)" if n.use_mask else "")
                                                 for n in config.normalization))
        table.add_row("est. memory", f"{config.estimated_memory_gb:.2f} GB")
        if config.previous_stage or config.next_stage:
            table.add_row("cascade", f"after {config.previous_stage}" if config.previous_stage
                          else f"before {config.next_stage}")
        console.print(table)
    for note in plans.notes:
        console.print(f"• {note}")
    console.print(f"recommended: {', '.join(plans.recommended)}")


@app.command("example")
def example_cmd(
    name: Annotated[str, typer.Argument(help="Example dataset to copy (hippocampus).")] = "hippocampus",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create.")] = Path("example_raw"),
) -> None:
    """Copy a small real example dataset shipped with autoseg (24 MSD Hippocampus cases, CC BY-SA 4.0)."""
    with _user_errors():
        from autoseg.examples import copy_example

        path = copy_example(name, out)
        _console().print(f"[green]✓[/] {name} example copied to {path}; next: autoseg plan {path} -o WORK")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
