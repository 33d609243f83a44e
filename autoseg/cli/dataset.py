"""``check``, ``fingerprint``, ``plan`` and ``preprocess``: from a raw dataset to preprocessed arrays."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from autoseg.cli._render import Workers, make_console, progress_bar, user_errors

if TYPE_CHECKING:
    from rich.console import Console

    from autoseg.dataset.layout import Issue
    from autoseg.planning.compute import Throughput
    from autoseg.plans import Plans


def check_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder (nnU-Net v2 or MSD layout).")],
    workers: Workers = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write every issue as JSON.")] = None,
) -> None:
    """Validate a dataset and list every problem at once. Reads every file; writes nothing to RAW."""
    with user_errors():
        from autoseg.planning import run as experiment

        console = make_console()
        with progress_bar("checking cases") as progress:
            report = experiment.check(raw, workers=workers, progress=progress)
        _print_issues(console, report.issues)
        if output is not None:
            from dataclasses import asdict

            from autoseg.atomic import write_json

            write_json(output, [asdict(i) for i in report.issues])
        n_cases = len(report.spec.cases) if report.spec else 0
        # A restoration dataset says so: its targets were checked as images, not as label maps.
        task = f" ({report.spec.task} pairs)" if report.spec and report.spec.task != "segmentation" else ""
        summary = (f"{raw}: {n_cases} case(s){task}, {len(report.errors)} error(s), "
                   f"{len(report.warnings)} warning(s)")
        if report.errors:
            console.print(f"[red]✗[/] {summary}")
            raise typer.Exit(code=1)
        console.print(f"[green]✓[/] {summary}")


def fingerprint_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder (WORK) to write fingerprint.json to.")],
    workers: Workers = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if the dataset has not changed.")] = False,
) -> None:
    """Check and fingerprint a dataset: spacing, shapes, intensities, classes -> WORK/fingerprint.json."""
    with user_errors():
        from autoseg.planning import run as experiment

        with progress_bar("fingerprinting") as progress:
            report, fp, reused = experiment.fingerprint(raw, out, workers=workers, progress=progress, reuse=not force)
        console = make_console()
        _print_issues(console, report.warnings)
        _print_fingerprint(console, fp.summary or {}, fp)
        path = experiment.WorkPaths(out).fingerprint
        console.print(f"[green]✓[/] {path}" + (" (dataset unchanged: reused)" if reused else ""))


def _print_fingerprint(console: Console, summary: dict, fp: object) -> None:
    """Spacing, shapes, classes and per-channel foreground intensities of a fingerprint, as one table."""
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


def plan_cmd(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder (WORK) to create or update.")],
    planner: Annotated[str, typer.Option("--planner", "-p", help="Preset name (default, resenc-m, resenc-l, cpu, "
                                                                  "tiny) or a preset YAML file.")] = "default",
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="GPU memory in GB to plan for (default: the preset's budget; the detected GPU "
                             "decides the recommendation).", min=0.01)] = None,
    workers: Workers = None,
    time_budget: Annotated[Optional[str], typer.Option(
        "--time-budget", help="Size every configuration for this wall-clock time per fold (training and "
        "validation), e.g. 15m, 2h, on this machine's measured convolution rate; autoseg train then uses it.")] = None,
    throughput: Annotated[Optional[float], typer.Option(
        "--throughput", metavar="GFLOPS", help="The training convolution rate to plan for (GFLOP/s, forward + "
        "backward) instead of measuring this machine (measured once, cached).", min=0.001)] = None,
) -> None:
    """Check, fingerprint and plan a dataset: writes WORK/dataset.json, fingerprint.json, plans.yaml."""
    with user_errors():
        from autoseg.planning import run as experiment
        from autoseg.training.config import parse_duration

        budget = parse_duration(time_budget) if time_budget else None
        # A budget needs the rate before planning; otherwise it is measured after the dataset check.
        rates = machine_throughput(throughput, required=True) if budget is not None else None
        with progress_bar("checking and fingerprinting") as progress:
            report, fp, plans, reused = experiment.plan_dataset(raw, out, planner, gpu_memory, workers, progress,
                                                                time_budget_s=budget, throughput=rates)
        if rates is None:
            rates = machine_throughput(throughput, required=False)
        console = make_console()
        _print_issues(console, report.warnings)
        if reused:
            console.print("dataset unchanged since the last run: fingerprint reused")
        print_plans(console, plans, rates)
        console.print(f"[green]✓[/] {experiment.WorkPaths(out).plans}")


def preprocess_cmd(
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) written by 'autoseg plan'.")],
    configs: Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", metavar="CONFIG", help="Configuration to preprocess; repeat or separate with commas "
                               "(default: the plan's recommended ones).")] = None,
    workers: Workers = None,
) -> None:
    """Crop, normalise and resample every case -> WORK/preprocessed/<config>/. Resumes where it stopped."""
    with user_errors():
        from autoseg.preprocessing import run as preprocessing

        names = [n.strip() for c in (configs or []) for n in c.split(",") if n.strip()] or None
        with progress_bar("preprocessing") as progress:
            summary = preprocessing.run(work, names, workers, progress)
        console = make_console()
        for name, s in summary.configs.items():
            how = f"linked from {s.linked_from}" if s.linked_from else f"{s.processed} processed"
            stale = f", {s.stale_removed} stale temp file(s) removed" if s.stale_removed else ""
            console.print(f"[green]✓[/] {name}: {s.cases} case(s) — {how}, {s.reused} already done{stale} "
                          f"→ {s.folder}")
        console.print(f"{summary.seconds:.1f} s with {summary.workers} worker(s)")


def _issue_table(issues: list[Issue], title: str) -> object:
    """One row per issue: severity, case, file, problem and how to fix it."""
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
    """The first ``limit`` issues as a table (markup escaped), and how many more there are."""
    from rich.markup import escape

    if not issues:
        return
    shown = issues[:limit]
    escaped = [type(i)(i.severity, i.code, escape(i.problem), escape(i.fix), i.case and escape(i.case),
                       i.file and escape(i.file)) for i in shown]
    console.print(_issue_table(escaped, f"{len(issues)} issue(s)"))
    if len(issues) > limit:
        console.print(f"... and {len(issues) - limit} more (use --output to save all as JSON)")


def machine_throughput(gflops: float | None, required: bool) -> Throughput | None:
    """``--throughput`` as given, else this machine's convolution rate (measured once, cached).

    Raises:
        ConfigError: the measurement failed and a time budget needs it (``required``); without a
            budget the plan table simply leaves the estimates out (None).
    """
    from autoseg.errors import ConfigError
    from autoseg.planning.compute import given_throughput

    if gflops is not None:
        return given_throughput(gflops)
    try:
        from autoseg.device import resolve_device
        from autoseg.networks.throughput import machine_throughput as measured_throughput

        return measured_throughput("cuda" if resolve_device("auto").type == "cuda" else "cpu")
    except Exception as exc:  # noqa: BLE001 - a busy or broken device: planning does not need it
        if required:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(f"--time-budget: cannot measure this machine's convolution rate ({first}); "
                              "give it with --throughput GFLOPS") from None
        return None


def print_plans(console: Console, plans: Plans, throughput: Throughput | None = None) -> None:
    """One table per configuration; with the machine's throughput, what each costs on it."""
    from rich.table import Table

    from autoseg.planning.compute import config_cost

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
        if config.mirror_axes is not None:
            kept = ", ".join(str(a) for a in config.mirror_axes) or "none"
            table.add_row("mirrored axes", f"{kept} (of {', '.join(str(a) for a in range(config.dims))}; see the notes)")
        table.add_row("est. memory", f"{config.estimated_memory_gb:.2f} GB")
        if throughput is not None:
            cost = config_cost(config, plans.num_classes, throughput)
            table.add_row("est. training", f"{cost.s_per_iteration:.2f} s/iteration ({250 * cost.s_per_iteration / 60:.1f} "
                          "min per 250-iteration epoch)")
            table.add_row("est. prediction", f"{cost.predict_s_tta:.1f} s per median case and fold with TTA, "
                          f"{cost.predict_s:.1f} s without")
        if config.previous_stage or config.next_stage:
            table.add_row("cascade", f"after {config.previous_stage}" if config.previous_stage
                          else f"before {config.next_stage}")
        console.print(table)
    for note in plans.notes:
        console.print(f"• {note}")
    if throughput is not None:
        console.print(f"estimates on {throughput.describe()}")
        if throughput.device.startswith("cpu"):
            from autoseg.device import auto_cpu_bf16, cpu_flags

            if auto_cpu_bf16(plans.task, cpu_flags()):
                console.print("the training estimates are float32; 'autoseg train' runs this plan in bf16 on this "
                              "CPU (AMX), where a step of nnU-Net's OpenKBP plan took 0.53x the float32 time: a "
                              "time budget buys more iterations than the table says (--precision fp32 runs the "
                              "table's)")
    console.print(f"recommended: {', '.join(plans.recommended)}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``autoseg --help`` lists them.

    Args:
        app: The top-level Typer app.
    """
    app.command("check")(check_cmd)
    app.command("fingerprint")(fingerprint_cmd)
    app.command("plan")(plan_cmd)
    app.command("preprocess")(preprocess_cmd)
