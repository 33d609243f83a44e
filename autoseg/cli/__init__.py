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

    from autoseg.dataset.layout import Issue
    from autoseg.demo import DemoResult
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
        from rich.markup import escape

        # Escaped: a message may hold brackets that are not markup ("pip install 'autoseg[dicom]'").
        _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
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
        from autoseg.planning import run as experiment

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
        from autoseg.planning import run as experiment

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
        from autoseg.planning import run as experiment

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
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = True,
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
) -> None:
    """Train a configuration's folds with 5-fold cross-validation; logs, curves and checkpoints per fold."""
    with _user_errors():
        from autoseg.training import run as training
        from autoseg.training.config import TrainConfig, parse_duration
        from autoseg.distributed import resolve_launch

        launch = resolve_launch(device, gpus, procs, folds_parallel)

        budget = parse_duration(time_budget) if time_budget else None
        cfg = TrainConfig(
            epochs=epochs if (budget is None or epochs != 1000) else 10**6,
            iters_per_epoch=iters_per_epoch if (iters_per_epoch or budget) else 250,
            val_iters=val_iters, time_budget_s=budget, optimizer=optimizer,
            lr=lr, batch_size=batch_size, device=device,
            amp=amp, compile=compile_, seed=seed, workers=workers, save_every=save_every,
        )
        console = _console()
        with _training_progress(console) as callbacks_for:
            results = training.run(
                work, configuration, fold, cfg, resume=resume, splits_file=splits, callbacks_for=callbacks_for,
                on_preprocess=lambda name: console.print(f"{name} is not preprocessed yet: preprocessing it first"),
                validate=validate, validate_only=validate_only, launch=launch,
                on_validated=lambda fold, m: console.print(
                    f"fold {fold} validation ({len(m['per_case'])} cases, TTA): mean foreground Dice "
                    f"{m['summary'].get('mean_foreground_dice') or float('nan'):.4f} → metrics.json"),
            )
        import os

        rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
        for result in [] if (validate_only or not rank0) else results:
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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt_metric(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) >= 10 else f"{value:.{digits - 1}f}"


def _summary_table(summary: dict, title: str) -> object:
    """Mean and median of Dice, IoU, HD95 and NSD per label (HD95: how many were undefined)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("label", overflow="fold")
    for column in ("Dice mean", "Dice median", "IoU mean", "HD95 mean (mm)", "HD95 median", "NSD mean",
                   "NSD median"):
        table.add_column(column, justify="right")
    for name, stats in summary["labels"].items():
        undefined = stats.get("hd95", {}).get("n_undefined", 0)
        table.add_row(
            _escape(name),
            _fmt_metric(stats["dice"]["mean"]), _fmt_metric(stats["dice"]["median"]), _fmt_metric(stats["iou"]["mean"]),
            _fmt_metric(stats["hd95"]["mean"]) + (f" ({undefined} undefined)" if undefined else ""),
            _fmt_metric(stats["hd95"]["median"]), _fmt_metric(stats["nsd"]["mean"]),
            _fmt_metric(stats["nsd"]["median"]),
        )
    table.add_row("[bold]mean foreground Dice[/]", _fmt_metric(summary["mean_foreground_dice"]), *[""] * 6)
    return table


@app.command("evaluate")
def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted label maps (case id = file name without "
                                              "its ending).")],
    ref: Annotated[Path, typer.Argument(help="Folder of reference label maps, or a raw dataset (its labelsTr).")],
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", "-l", help="dataset.json, or a folder holding one (raw dataset or WORK), that declares the "
                               "labels (default: REF's dataset.json, else every value found).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="JSON report (default: PRED/evaluation.json); a CSV is written beside it.")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.", min=0.0)] = 2.0,
    workers: Workers = None,
) -> None:
    """Score predictions against references: Dice, IoU, HD95, NSD per case and label -> JSON, CSV, table."""
    with _user_errors():
        from autoseg.evaluation import evaluate

        with _progress("evaluating") as progress:
            report = evaluate.run(pred, ref, labels, output, tolerance, workers, progress)
        console = _console()
        for warning in report.warnings[:20]:
            console.print(f"[yellow]warning:[/] {_escape(warning)}")
        if len(report.warnings) > 20:
            console.print(f"... and {len(report.warnings) - 20} more warning(s) in {report.json_path}")
        console.print(_summary_table(report.summary, f"{len(report.cases)} case(s), labels from "
                                                     f"{_escape(report.labels_source)}"))
        console.print(f"[green]✓[/] {_escape(str(report.json_path))}, {_escape(str(report.csv_path))}")


@app.command("find-best")
def find_best_cmd(
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) with trained folds.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm (reported; the choice "
                                                                 "is by mean foreground Dice).", min=0.0)] = 2.0,
    workers: Workers = None,
) -> None:
    """Choose the best configuration or pair ensemble from cross-validation, and postprocessing -> best.yaml."""
    with _user_errors():
        from rich.table import Table

        from autoseg.evaluation import find_best

        with _progress("scoring cross-validation") as progress:
            result = find_best.run(work, tolerance, workers, progress)
        console = _console()
        for note in result.notes:
            console.print(f"• {_escape(note)}")
        first = next(iter(result.summaries.values()))
        label_names = list(first["labels"])
        table = Table(title="cross-validation (all folds pooled)", title_justify="left")
        table.add_column("candidate", overflow="fold")
        table.add_column("mean fg Dice", justify="right")
        for name in label_names:
            table.add_column(f"Dice {_escape(name)}", justify="right")
        table.add_column("mean HD95 (mm)", justify="right")
        table.add_column("mean NSD", justify="right")
        chosen = result.best.name
        for name, summary in sorted(result.summaries.items(), key=lambda kv: -(kv[1]["mean_foreground_dice"] or 0)):
            per_label = summary["labels"]
            hd95 = [s["hd95"]["mean"] for s in per_label.values() if s["hd95"]["mean"] is not None]
            nsd = [s["nsd"]["mean"] for s in per_label.values() if s["nsd"]["mean"] is not None]
            mark = "[bold green]★ [/]" if name == chosen else "  "
            table.add_row(mark + _escape(name), _fmt_metric(summary["mean_foreground_dice"]),
                          *[_fmt_metric(per_label.get(n, {}).get("dice", {}).get("mean")) for n in label_names],
                          _fmt_metric(sum(hd95) / len(hd95) if hd95 else None),
                          _fmt_metric(sum(nsd) / len(nsd) if nsd else None))
        console.print(table)
        pp = result.best.postprocessing
        steps = (["largest component of all foreground"] if pp.all_foreground else []) + \
            [f"largest component of {n}" for n in pp.per_label]
        console.print(f"postprocessing: {_escape(', '.join(steps)) if steps else 'none'} "
                      f"(mean fg Dice {_fmt_metric(pp.dice_before)} → {_fmt_metric(pp.dice_after)})")
        console.print(f"[green]✓[/] best: {_escape(chosen)} → {_escape(str(result.path))}")


@app.command("ensemble")
def ensemble_cmd(
    folders: Annotated[list[Path], typer.Argument(metavar="DIR", help="Prediction folders with <case>.npz "
                                                  "probabilities (the first also holds the label maps).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the ensembled label maps.")],
    save_probabilities: Annotated[bool, typer.Option(
        "--save-probabilities", help="Also write the averaged probabilities (<case>.npz).")] = False,
    workers: Workers = None,
) -> None:
    """Average saved probabilities of the same cases across folders, argmax -> label maps."""
    with _user_errors():
        from autoseg.evaluation import ensemble

        with _progress("ensembling") as progress:
            result = ensemble.run(folders, out, save_probabilities, workers, progress)
        console = _console()
        for folder, cases in result.ignored.items():
            console.print(f"[yellow]warning:[/] {_escape(folder)}: {len(cases)} case(s) not in "
                          f"{_escape(str(folders[0]))} were ignored: {_escape(', '.join(cases[:5]))}"
                          f"{' ...' if len(cases) > 5 else ''}")
        console.print(f"[green]✓[/] {len(result.cases)} case(s) → {_escape(str(result.out))}")


@app.command("predict", context_settings={"allow_extra_args": True})
def predict_cmd(
    ctx: typer.Context,
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) with trained folds.")],
    inputs: Annotated[list[Path], typer.Option(
        "--input", "-i", metavar="PATH", help="Image file or folder of images (nnU-Net {case}_0000 naming, plain files, or MSD "
                              "4D), or a folder of DICOM series (one case per folder holding a series, named after "
                              "it); repeat for several.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the label maps.")],
    configs: Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", metavar="CONFIG", help="Configuration; repeat or separate with commas to average several "
                                                 "(default: WORK/best.yaml's, with its postprocessing; else the "
                                                 "single trained one).")] = None,
    folds: Annotated[Optional[list[str]], typer.Option(
        "--folds", "-f", metavar="FOLD", help="Folds to average: -f 0 1 2, -f 0,1 or -f all (default: every trained fold).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", metavar="final|best", help="Checkpoint of each fold: final or best.")] = "final",
    no_tta: Annotated[bool, typer.Option("--no-tta", help="No mirroring test-time augmentation (about 8x faster "
                                                          "in 3D, 4x in 2D; slightly less accurate).")] = False,
    save_probabilities: Annotated[bool, typer.Option(
        "--save-probabilities", help="Also write <case>.npz: float16 class probabilities in the input's grid.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases whose output already exists.")] = False,
    step: Annotated[float, typer.Option("--step", help="Window stride as a fraction of the patch (smaller: more "
                                                       "overlap, slower).", min=0.05, max=1.0)] = 0.5,
    save_uncertainty: Annotated[bool, typer.Option(
        "--save-uncertainty", help="Also write <case>_entropy and <case>_disagreement (float32, input's geometry): "
                                   "normalised entropy of the averaged probabilities (0 certain .. 1 uniform) and the "
                                   "fraction of pairs of folds whose labels differ (always 0 with a single fold).")] = False,
    output_format: Annotated[Optional[list[str]], typer.Option(
        "--output-format", metavar="auto|nifti|dicom-seg", help="Label map format: auto (the input's; NIfTI for "
                                                                 "DICOM series), nifti, or dicom-seg (a DICOM SEG "
                                                                 "referencing the input series; needs pip install "
                                                                 "'autoseg[dicom]'); repeat for several.")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", help="Share the cases out over N GPUs (one process each); outputs identical to one GPU.",
        min=1)] = None,
    procs: Annotated[Optional[int], typer.Option(
        "--procs", help="With --device cpu: share the cases out over N CPU processes.", min=1)] = None,
) -> None:
    """Segment new images with the trained folds: sliding window, mirroring TTA, fold averaging -> label maps."""
    with _user_errors():
        from rich.markup import escape

        from autoseg.inference import run as predict
        from autoseg.errors import ConfigError
        from autoseg.distributed import resolve_launch

        several = gpus is not None or procs is not None
        devices = list(resolve_launch(device, gpus, procs, folds_parallel=several).devices) if several else None

        names = [n.strip() for c in (configs or []) for n in c.split(",") if n.strip()] or None
        # "-f 0 1 2" (nnU-Net's spelling): the numbers after the first reach us as extra arguments.
        fold_words = [w.strip() for f in (folds or []) for w in f.split(",") if w.strip()]
        for extra in ctx.args:
            if not (folds and extra.isdigit()):
                raise ConfigError(f"unexpected argument {extra!r}; folds go after -f (-f 0 1 2), inputs after -i")
            fold_words.append(extra)
        fold_list: list[int] | None = None
        if fold_words and [w.lower() for w in fold_words] != ["all"]:
            bad = [w for w in fold_words if not w.isdigit()]
            if bad:
                raise ConfigError(f"-f {bad[0]}: expected fold numbers (-f 0 1 2), a comma list, or 'all'")
            fold_list = [int(w) for w in fold_words]

        console = _console()
        with _predict_progress() as callbacks:
            summary = predict.run(work, inputs, output, names, fold_list, checkpoint, tta=not no_tta,
                                  save_probabilities=save_probabilities, device=device, resume=resume, step=step,
                                  callbacks=callbacks, save_uncertainty=save_uncertainty,
                                  output_format=output_format or "auto", devices=devices)
        used = ", ".join(f"{s.configuration} (fold{'s' if len(s.folds) > 1 else ''} "
                         f"{' '.join(str(f) for f in s.folds)})" for s in summary.selections)
        skipped = f", {len(summary.skipped)} already done" if summary.skipped else ""
        how = f"{'TTA' if not no_tta else 'no TTA'}, {summary.device}, {summary.seconds:.1f} s" if summary.written else ""
        console.print(f"[green]✓[/] {len(summary.written)} case(s) predicted{skipped} with {escape(used)}"
                      + (f" ({how})" if how else "") + f" → {escape(str(summary.output))}")
        if summary.postprocessing:
            console.print("postprocessing from best.yaml applied")


@contextlib.contextmanager
def _predict_progress() -> Iterator[object]:
    """A bar per case over its sliding windows, with ETA; yields ``autoseg.inference.run.PredictCallbacks``."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from autoseg.inference.run import PredictCallbacks

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=_console(stderr=True), transient=True)
    task: dict[str, object] = {}

    def on_case(index: int, total: int, case_id: str) -> None:
        if not progress.live.is_started:
            progress.start()
        if "id" in task:
            progress.remove_task(task["id"])
        task["id"] = progress.add_task(f"{escape(case_id)} ({index + 1}/{total})", total=None)

    def on_windows(done: int, total: int) -> None:
        progress.update(task["id"], completed=done, total=total)

    try:
        yield PredictCallbacks(on_case, on_windows)
    finally:
        if progress.live.is_started:
            progress.stop()


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


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")] = Path("autoseg_demo"),
    time_budget: Annotated[str, typer.Option("--time-budget", help="Training wall-clock budget, e.g. 7m, 90s "
                                                                   "(the whole demo takes about 1 min more).")] = "7m",
    seed: Annotated[int, typer.Option("--seed", help="Seeds the network init and the training batches.")] = 12345,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Delete the demo's earlier outputs in OUT and start over.")] = False,
    cases: Annotated[int, typer.Option("--cases", hidden=True, help="Bundled cases to use (tests).")] = 24,
) -> None:
    """The whole pipeline on the bundled example, in about 8 minutes on a 2-core CPU.

    Holds 6 of the 24 MSD Hippocampus cases out, then checks, plans (cpu preset), preprocesses and
    trains 3d_fullres on the rest within --time-budget, predicts the held-out cases, and prints
    their Dice against the references; overlay PNGs and the training curves go to OUT.

    Rerunning into the same OUT with the same options reuses every finished stage (fingerprint,
    preprocessed data, trained model, predictions) and redoes only what is missing. An OUT made with
    other options is refused unless --force, which deletes the demo's outputs there first. A
    non-empty folder that is not a demo folder is never touched.
    """
    with _user_errors():
        from autoseg import demo
        from autoseg.training.config import parse_duration

        console = _console()
        hooks = demo.DemoHooks(note=lambda text: console.print(text, markup=False, highlight=False),
                               progress=_progress, training=lambda: _training_progress(console),
                               predicting=_predict_progress)
        settings = demo.DemoSettings(time_budget_s=parse_duration(time_budget), seed=seed, cases=cases)
        result = demo.run(out, settings, device, hooks, force=force)
        console.print(_demo_table(result))
        total = result.seconds["total"]
        took = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
        console.print(f"[green]✓[/] demo finished in {took}; outputs:")
        for what, path in result.outputs:
            console.print(f"  {_escape(what)}: {_escape(str(path))}")


def _demo_table(result: DemoResult) -> object:
    """Dice per held-out case and label, the case mean, and the mean foreground Dice."""
    from rich.table import Table

    table = Table(title=f"Dice on {len(result.dice)} held-out case(s) (not used for training)", title_justify="left")
    table.add_column("case")
    for name in result.labels:
        table.add_column(f"Dice {_escape(name)}", justify="right")
    table.add_column("mean", justify="right")
    for case, values in sorted(result.dice.items()):
        table.add_row(_escape(case), *[_fmt_metric(values[n]) for n in result.labels],
                      _fmt_metric(result.case_mean[case]))
    table.add_row("[bold]mean foreground Dice[/]", *[""] * len(result.labels),
                  f"[bold]{_fmt_metric(result.mean_dice)}[/]")
    return table


ConvertName = Annotated[Optional[str], typer.Option("--name", help="Dataset name (default: the output folder's name).")]

convert_app = typer.Typer(
    help="Bring benchmark data into the nnU-Net v2 raw layout (RAW); the source is only read. Resumable.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _print_conversion(summary: object, unit: str) -> None:
    """Warnings (at most 50 lines), then one summary line and the next step."""
    from rich.markup import escape

    console = _console()
    warnings = list(getattr(summary, "warnings", ()))
    for line in warnings[:50]:  # one line each (soft wrap), so they stay greppable
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)
    if len(warnings) > 50:
        console.print(f"... and {len(warnings) - 50} more warning(s)")
    root = getattr(summary, "root")
    written, skipped, failed = (len(getattr(summary, k)) for k in ("written", "skipped", "failed"))
    left_out = f", {failed} left out" if failed else ""
    console.print(f"[green]✓[/] {escape(str(root))}: {written} {unit}(s) converted, {skipped} already done{left_out}; "
                  f"next: autoseg check {escape(str(root))}")


@convert_app.command("dicom-rt")
def convert_dicom_rt_cmd(
    src: Annotated[Path, typer.Argument(help="Folder with one folder per patient (CT series + RTSTRUCT, nested "
                                             "folders allowed), e.g. the AAPM LCTSC 2017 download.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Raw dataset folder to write (nnU-Net v2 layout).")],
    roi_map: Annotated[Optional[Path], typer.Option(
        "--roi-map", help="YAML/JSON {label_name: [ROI names...]}, in label order; replaces the default map "
                          "(Esophagus, Heart, Lung_L, Lung_R, SpinalCord with common spellings).")] = None,
    overlap: Annotated[str, typer.Option(
        "--overlap", help="priority: one label per voxel, the label later in the map wins; regions: bitmask "
                          "values, every structure declared as an nnU-Net region (no voxel lost).")] = "priority",
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Warn about and skip a patient that cannot "
                                                                       "be converted, instead of stopping.")] = False,
    allow_frame_mismatch: Annotated[bool, typer.Option(
        "--allow-frame-mismatch", help="Convert ROIs whose frame of reference differs from the CT's (only when "
                                       "you know they share coordinates).")] = False,
    name: ConvertName = None,
) -> None:
    """Convert CT + RTSTRUCT patient folders (AAPM LCTSC layout); contours rasterised on the CT grid.

    Writes imagesTr/{patient}_0000.nii.gz, labelsTr/{patient}.nii.gz and dataset.json.
    """
    with _user_errors():
        from autoseg.convert import dicom_rt

        mapping = dicom_rt.load_roi_map(roi_map) if roi_map is not None else None
        with _progress("converting patients") as progress:
            summary = dicom_rt.run(src, out, mapping, overlap, skip_invalid=skip_invalid,  # type: ignore[arg-type]
                                   allow_frame_mismatch=allow_frame_mismatch, name=name, progress=progress)
        _print_conversion(summary, "patient")


@convert_app.command("kaggle-uwmgi")
def convert_kaggle_uwmgi_cmd(
    src: Annotated[Path, typer.Argument(help="Competition folder holding train.csv and train/case*/case*_day*/scans/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Raw dataset folder to write (nnU-Net v2 layout).")],
    slice_spacing: Annotated[float, typer.Option(
        "--slice-spacing", help="Distance between slices in mm; the competition files do not store it.")] = 3.0,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Leave out a case-day with malformed rows "
                                                                       "(warning) instead of stopping.")] = False,
    name: ConvertName = None,
) -> None:
    """Convert Kaggle UW-Madison GI Tract (PNG slices + RLE train.csv) to one volume per case-day.

    The three organs overlap and are written as regions: bitmask values large_bowel 1, small_bowel 2,
    stomach 4 (a pixel holds the sum of its organs).
    """
    with _user_errors():
        from autoseg.convert import kaggle_uwmgi

        with _progress("converting case-days") as progress:
            summary = kaggle_uwmgi.run(src, out, slice_spacing, skip_invalid=skip_invalid, name=name,
                                       progress=progress)
        _print_conversion(summary, "case-day")


@convert_app.command("png-masks")
def convert_png_masks_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of 2D images (.png, .tif, .bmp).")],
    masks: Annotated[Path, typer.Argument(help="Folder of 2D masks, paired with the images by name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Raw dataset folder to write (nnU-Net v2 layout).")],
    value_map: Annotated[list[str], typer.Option(
        "--map", metavar="V=L", help="Mask value V is label L; repeat per value (0=0 is implied unless 0 is "
                                     "mapped). Required, e.g. --map 255=1.")],
    name: ConvertName = None,
    channel_name: Annotated[Optional[list[str]], typer.Option(
        "--channel-name", metavar="NAME", help="Channel name (selects the normalisation, e.g. EM, MRI, CT); "
                                               "repeat per channel (default: image, or R G B for colour).")] = None,
    label_name: Annotated[Optional[list[str]], typer.Option(
        "--label-name", metavar="L=NAME", help="Name of label L in dataset.json; repeat per label.")] = None,
    pair_by: Annotated[str, typer.Option("--pair-by", help="name: equal file names; order: natural sort order "
                                                           "of both folders.")] = "name",
    mask_suffix: Annotated[str, typer.Option("--mask-suffix", help="Suffix of mask names before the ending "
                                                                   "(e.g. _mask), removed before pairing.")] = "",
    file_ending: Annotated[str, typer.Option("--file-ending", help=".png or .nii.gz.")] = ".png",
) -> None:
    """Convert 2D image and mask folders (e.g. ISBI 2012 EM), masks mapped through --map V=L."""
    with _user_errors():
        from autoseg.convert import png_masks

        mapping = png_masks.parse_value_map(value_map)
        names = png_masks.parse_label_names(label_name or [])
        with _progress("converting images") as progress:
            summary = png_masks.run(images, masks, out, mapping, name=name, channel_names=channel_name,
                                    label_names=names, pair_by=pair_by, mask_suffix=mask_suffix,  # type: ignore[arg-type]
                                    file_ending=file_ending, progress=progress)
        _print_conversion(summary, "image")


app.add_typer(convert_app, name="convert")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
