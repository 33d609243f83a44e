"""``evaluate``, ``find-best`` and ``ensemble``: scoring predictions and choosing between models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoseg.cli._render import Workers, make_console, escape_markup, fmt_metric, progress_bar, user_errors


#: How the table header states each both-empty policy (autoseg.metrics.BOTH_EMPTY_POLICIES).
_BOTH_EMPTY_HEADER = {
    "exclude": "a label absent from both prediction and reference is left out of its means (--both-empty perfect "
               "counts it as Dice 1)",
    "perfect": "a label absent from both prediction and reference counts as Dice 1 (--both-empty perfect)",
}


def _cell(stats: dict, metric: str, key: str) -> str:
    """One statistic of one label; "n/a" for a label scored in no pair (absent from every pair and
    excluded), so that no number stands where there is no score."""
    if stats.get("dice", {}).get("n", 0) == 0:
        return "n/a"
    return fmt_metric(stats.get(metric, {}).get(key))


def _summary_table(summary: dict, title: str) -> object:
    """Mean and median of Dice, IoU, HD95 and NSD per label (HD95: how many were undefined), with the
    number of cases each mean is over and how pairs absent from both were treated."""
    from rich.table import Table

    policy = summary.get("both_empty", "perfect")
    table = Table(title=f"{title}\n{_BOTH_EMPTY_HEADER[policy]}", title_justify="left")
    table.add_column("label", overflow="fold")
    for column in ("cases", "Dice mean", "Dice median", "IoU mean", "HD95 mean (mm)", "HD95 median", "NSD mean",
                   "NSD median"):
        table.add_column(column, justify="right")
    for name, stats in summary["labels"].items():
        undefined = stats.get("hd95", {}).get("n_undefined", 0)
        empty = stats.get("n_both_empty", 0)
        scored = stats.get("dice", {}).get("n", 0)
        cases = f"{scored}" + (f" (+{empty} absent, excluded)" if empty and policy == "exclude" else
                               f" ({empty} absent, as 1)" if empty else "")
        table.add_row(
            escape_markup(name), cases,
            _cell(stats, "dice", "mean"), _cell(stats, "dice", "median"), _cell(stats, "iou", "mean"),
            _cell(stats, "hd95", "mean") + (f" ({undefined} undefined)" if undefined else ""),
            _cell(stats, "hd95", "median"), _cell(stats, "nsd", "mean"), _cell(stats, "nsd", "median"),
        )
    overall = summary["mean_foreground_dice"]
    table.add_row("[bold]mean foreground Dice[/]", "", "n/a" if overall is None else fmt_metric(overall), *[""] * 6)
    return table


def _restoration_table(report: object) -> object:
    """Per case and mean: PSNR, SSIM 2D, SSIM 3D, RMSE; with the input as baseline, its row and the PSNR gain."""
    from rich.table import Table

    from autoseg.image_metrics import METRIC_KEYS, SSIM_GAUSSIAN_WEIGHTS, SSIM_WIN_SIZE

    with_input = "input" in report.summary
    kind = "Gaussian" if SSIM_GAUSSIAN_WEIGHTS else "uniform"
    lines = [f"{len(report.cases)} case(s), restoration{f' ({report.dataset_task})' if report.dataset_task else ''}",
             f"window {report.window.describe()}",
             (f"SSIM: {kind} {SSIM_WIN_SIZE}×{SSIM_WIN_SIZE} window, 2D = mean of axial slices, 3D = "
              f"{SSIM_WIN_SIZE}×{SSIM_WIN_SIZE}×{SSIM_WIN_SIZE}")]
    # As wide as the header's longest line, so that the window is never folded (short column
    # headers keep the baseline's seven columns within 80 characters).
    table = Table(title=escape_markup("\n".join(lines)), title_justify="left", min_width=max(map(len, lines)))
    table.add_column("case", overflow="fold")
    if with_input:
        table.add_column("image", no_wrap=True)
    for column in ("PSNR dB", "SSIM 2D", "SSIM 3D", "RMSE HU"):
        table.add_column(column, justify="right", no_wrap=True)
    if with_input:
        table.add_column("gain dB", justify="right", no_wrap=True)

    def cells(scores: dict) -> list[str]:
        return ["n/a" if scores.get(k) is None else fmt_metric(scores[k]) for k in METRIC_KEYS]

    def gain(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    for case, record in report.cases.items():
        if with_input:
            table.add_row(escape_markup(case), "restored", *cells(record["restored"]), gain(record.get("psnr_gain_db")))
            table.add_row("", "input (baseline)", *cells(record["input"]), "")
        else:
            table.add_row(escape_markup(case), *cells(record["restored"]))
    means = {name: {k: stats["mean"] for k, stats in report.summary[name].items()}
             for name in ("restored", "input") if name in report.summary}
    table.add_section()
    if with_input:
        table.add_row("[bold]mean[/]", "restored", *cells(means["restored"]),
                      gain(report.summary["psnr_gain_db"]["mean"]))
        table.add_row("", "input (baseline)", *cells(means["input"]), "")
    elif "restored" in means:
        table.add_row("[bold]mean[/]", *cells(means["restored"]))
    return table


def _print_warnings(console: object, warnings: tuple[str, ...], json_path: object) -> None:
    for warning in warnings[:20]:
        console.print(f"[yellow]warning:[/] {escape_markup(warning)}")
    if len(warnings) > 20:
        console.print(f"... and {len(warnings) - 20} more warning(s) in {json_path}")


def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="Folder of predictions: label maps, or restored images (case id = "
                                              "file name without its ending).")],
    ref: Annotated[Path, typer.Argument(help="Folder of reference label maps, or a raw dataset (its labelsTr); for "
                                             "restoration the clean (full-dose) images, or a restoration dataset "
                                             "(its targetsTr).")],
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", "-l", help="dataset.json, or a folder holding one (raw dataset or WORK), that declares the "
                               "labels (default: REF's dataset.json, else every value found).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="JSON report (default: PRED/evaluation.json); a CSV is written beside it.")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.", min=0.0)] = 2.0,
    workers: Workers = None,
    both_empty: Annotated[str, typer.Option(
        "--both-empty", metavar="exclude|perfect",
        help="A label absent from both prediction and reference: left out of the means and counted (exclude, "
             "as nnU-Net), or averaged in as Dice 1 (perfect, which flatters models on often-absent "
             "structures).")] = "exclude",
    task: Annotated[str, typer.Option(
        "--task", metavar="auto|segmentation|restoration",
        help="What to score: auto = restoration when REF is (or is the targetsTr of) a dataset whose dataset.json "
             "says \"task\": \"denoise\" or \"super-resolution\", else segmentation.")] = "auto",
    window: Annotated[Optional[str], typer.Option(
        "--window", metavar="L,H|full",
        help="Restoration: the HU window both images are clipped to, data range H-L (default -160,240, the AAPM "
             "low-dose CT convention); 'full': no clipping, data range = the reference's max-min per case.")] = None,
    baseline_input: Annotated[Optional[Path], typer.Option(
        "--baseline-input", help="Restoration: folder of the degraded (low-dose) inputs (<case> or <case>_0000 "
                                 "files, e.g. RAW/imagesTr), scored against the same references as a baseline.")] = None,
    panels: Annotated[bool, typer.Option(
        "--panels/--no-panels", help="Restoration: write panels/<case>.png beside the report ([input |] restored | "
                                     "reference | difference).")] = True,
) -> None:
    """Score predictions against references -> JSON, CSV, table: segmentation (Dice, IoU, HD95, NSD per case and
    label) or restoration (PSNR, SSIM, RMSE in a HU window per case), chosen from REF's dataset.json or --task."""
    with user_errors():
        from autoseg.errors import ConfigError
        from autoseg.evaluation import restoration

        if restoration.detect_task(ref, task) == "restoration":
            if labels is not None:
                raise ConfigError("--labels: restoration is scored on images, not labels; leave it out (or pass "
                                  "--task segmentation to score label maps)")
            chosen = restoration.parse_window(window)
            with progress_bar("evaluating") as progress:
                result = restoration.run(pred, ref, output, chosen, baseline_input, workers, progress, panels)
            console = make_console()
            _print_warnings(console, result.warnings, result.json_path)
            console.print(_restoration_table(result))
            where = f", panels in {escape_markup(str(result.panels))}" if result.panels is not None else ""
            console.print(f"[green]✓[/] {escape_markup(str(result.json_path))}, "
                          f"{escape_markup(str(result.csv_path))}{where}")
            return
        given = [name for name, value in (("--window", window), ("--baseline-input", baseline_input))
                 if value is not None]
        if given:
            why = "--task segmentation" if task == "segmentation" else "its dataset.json names no restoration task"
            raise ConfigError(f"{', '.join(given)}: restoration options, but {ref} is scored as segmentation ({why}); "
                              "pass --task restoration to score images")

        from autoseg.evaluation import evaluate

        with progress_bar("evaluating") as progress:
            report = evaluate.run(pred, ref, labels, output, tolerance, workers, progress, both_empty)
        console = make_console()
        _print_warnings(console, report.warnings, report.json_path)
        console.print(_summary_table(report.summary, f"{len(report.cases)} case(s), labels from "
                                                     f"{escape_markup(report.labels_source)}"))
        console.print(f"[green]✓[/] {escape_markup(str(report.json_path))}, {escape_markup(str(report.csv_path))}")


def find_best_cmd(
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) with trained folds.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm (reported; the choice "
                                                                 "is by mean foreground Dice).", min=0.0)] = 2.0,
    workers: Workers = None,
) -> None:
    """Choose the best configuration or pair ensemble from cross-validation, and postprocessing -> best.yaml."""
    with user_errors():
        from rich.table import Table

        from autoseg.evaluation import find_best

        with progress_bar("scoring cross-validation") as progress:
            result = find_best.run(work, tolerance, workers, progress)
        console = make_console()
        for note in result.notes:
            console.print(f"• {escape_markup(note)}")
        first = next(iter(result.summaries.values()))
        label_names = list(first["labels"])
        table = Table(title="cross-validation (all folds pooled)", title_justify="left")
        table.add_column("candidate", overflow="fold")
        table.add_column("mean fg Dice", justify="right")
        for name in label_names:
            table.add_column(f"Dice {escape_markup(name)}", justify="right")
        table.add_column("mean HD95 (mm)", justify="right")
        table.add_column("mean NSD", justify="right")
        chosen = result.best.name
        for name, summary in sorted(result.summaries.items(), key=lambda kv: -(kv[1]["mean_foreground_dice"] or 0)):
            per_label = summary["labels"]
            hd95 = [s["hd95"]["mean"] for s in per_label.values() if s["hd95"]["mean"] is not None]
            nsd = [s["nsd"]["mean"] for s in per_label.values() if s["nsd"]["mean"] is not None]
            mark = "[bold green]★ [/]" if name == chosen else "  "
            table.add_row(mark + escape_markup(name), fmt_metric(summary["mean_foreground_dice"]),
                          *[_cell(per_label.get(n, {}), "dice", "mean") for n in label_names],
                          fmt_metric(sum(hd95) / len(hd95) if hd95 else None),
                          fmt_metric(sum(nsd) / len(nsd) if nsd else None))
        console.print(table)
        pp = result.best.postprocessing
        steps = (["largest component of all foreground"] if pp.all_foreground else []) + \
            [f"largest component of {n}" for n in pp.per_label]
        console.print(f"postprocessing: {escape_markup(', '.join(steps)) if steps else 'none'} "
                      f"(mean fg Dice {fmt_metric(pp.dice_before)} → {fmt_metric(pp.dice_after)})")
        console.print(f"[green]✓[/] best: {escape_markup(chosen)} → {escape_markup(str(result.path))}")


def ensemble_cmd(
    folders: Annotated[list[Path], typer.Argument(metavar="DIR", help="Prediction folders with <case>.npz "
                                                  "probabilities (the first also holds the label maps).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the ensembled label maps.")],
    save_probabilities: Annotated[bool, typer.Option(
        "--save-probabilities", help="Also write the averaged probabilities (<case>.npz).")] = False,
    workers: Workers = None,
) -> None:
    """Average saved probabilities of the same cases across folders, argmax -> label maps."""
    with user_errors():
        from autoseg.evaluation import ensemble

        with progress_bar("ensembling") as progress:
            result = ensemble.run(folders, out, save_probabilities, workers, progress)
        console = make_console()
        for folder, cases in result.ignored.items():
            console.print(f"[yellow]warning:[/] {escape_markup(folder)}: {len(cases)} case(s) not in "
                          f"{escape_markup(str(folders[0]))} were ignored: {escape_markup(', '.join(cases[:5]))}"
                          f"{' ...' if len(cases) > 5 else ''}")
        console.print(f"[green]✓[/] {len(result.cases)} case(s) → {escape_markup(str(result.out))}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``autoseg --help`` lists them.

    Args:
        app: The top-level Typer app.
    """
    app.command("evaluate")(evaluate_cmd)
    app.command("find-best")(find_best_cmd)
    app.command("ensemble")(ensemble_cmd)
