"""``example`` and ``demo``: the bundled example dataset, and the whole pipeline run on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from autoseg.cli._render import (make_console, escape_markup, fmt_metric, predict_progress, progress_bar, training_progress,
                                 user_errors)

if TYPE_CHECKING:
    from autoseg.demo import DemoResult
    from autoseg.demo_denoise import DenoiseDemoResult


def example_cmd(
    name: Annotated[str, typer.Argument(help="Example to copy: hippocampus (a labelled dataset) or ct_chest (CT "
                                             "slices to simulate restoration pairs from).")] = "hippocampus",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create.")] = Path("example_raw"),
) -> None:
    """Copy a small real example shipped with autoseg: hippocampus (24 MSD Hippocampus cases, CC BY-SA 4.0) or
    ct_chest (12 chest CT slices of LIDC-IDRI-0314, CC BY 3.0)."""
    with user_errors():
        from autoseg.examples import copy_example

        path = copy_example(name, out)
        step = f"autoseg simulate low-dose {path} -o RAW" if name == "ct_chest" else f"autoseg plan {path} -o WORK"
        make_console().print(f"[green]✓[/] {name} example copied to {path}; next: {step}")


def demo_cmd(
    name: Annotated[str, typer.Argument(
        metavar="[hippocampus|denoise]",
        help="hippocampus: segmentation of the bundled MSD Hippocampus MRI (Dice); denoise: low-dose CT denoising "
             "of the bundled chest CT (PSNR, SSIM).")] = "hippocampus",
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for everything the demo writes (default: autoseg_demo, or autoseg_demo_denoise "
                            "for denoise).")] = None,
    time_budget: Annotated[Optional[str], typer.Option(
        "--time-budget", help="Training wall-clock budget, e.g. 7m, 90s (default 7m for hippocampus, 6m for denoise; "
                              "the whole demo takes about 1 min more).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the network init and the training batches (and the "
                                                     "simulated noise of denoise).")] = 12345,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Delete the earlier outputs of either demo in OUT (only the names "
                                                        "a demo writes) and start over.")] = False,
    cases: Annotated[Optional[int], typer.Option("--cases", hidden=True,
                                                 help="Bundled cases (hippocampus) or slabs (denoise) to use (tests).")] = None,
) -> None:
    """The whole pipeline on a bundled example, in about 8 minutes on a 2-core CPU.

    hippocampus (default): holds 6 of the 24 MSD Hippocampus cases out, then checks, plans (cpu preset),
    preprocesses and trains 3d_fullres on the rest within --time-budget, predicts the held-out cases, and
    prints their Dice against the references; overlay PNGs and the training curves go to OUT.

    denoise: cuts 12 real chest CT slices into six 2-slice slabs, simulates a quarter-dose scan of each
    (autoseg simulate low-dose), plans (sized for the budget), preprocesses and trains 2d denoising on
    four slabs (the sixth scores each epoch), denoises the held-out fourth, and prints its PSNR and
    SSIM before and after; panels (low dose | denoised | full dose | difference) and the training
    curves go to OUT.

    Rerunning into the same OUT with the same options reuses every finished stage (fingerprint,
    preprocessed data, trained model, predictions) and redoes only what is missing. An OUT made with
    other options is refused unless --force, which deletes the demo's outputs there first. A
    non-empty folder that is not a demo folder is never touched.
    """
    with user_errors():
        from autoseg import demo
        from autoseg.errors import UnknownNameError
        from autoseg.training.config import parse_duration

        if name not in ("hippocampus", "denoise"):
            raise UnknownNameError("demo", name, ["denoise", "hippocampus"])
        console = make_console()
        hooks = demo.DemoHooks(note=lambda text: console.print(text, markup=False, highlight=False),
                               progress=progress_bar, training=lambda: training_progress(console),
                               predicting=predict_progress)
        if name == "denoise":
            from autoseg import demo_denoise

            settings_d = demo_denoise.DenoiseDemoSettings(
                time_budget_s=parse_duration(time_budget) if time_budget is not None else demo_denoise.DEFAULT_TIME_BUDGET_S,
                seed=seed, slabs=cases if cases is not None else demo_denoise.MAX_SLABS)
            result_d = demo_denoise.run(out or Path("autoseg_demo_denoise"), settings_d, device, hooks, force=force)
            console.print(_denoise_table(result_d))
            _print_outputs(console, result_d.seconds["total"], result_d.outputs)
            return
        settings = demo.DemoSettings(time_budget_s=parse_duration(time_budget) if time_budget is not None else
                                     demo.DEFAULT_TIME_BUDGET_S, seed=seed, cases=cases if cases is not None else 24)
        result = demo.run(out or Path("autoseg_demo"), settings, device, hooks, force=force)
        console.print(_demo_table(result))
        _print_outputs(console, result.seconds["total"], result.outputs)


def _print_outputs(console: object, total: float, outputs: list[tuple[str, Path]]) -> None:
    took = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
    console.print(f"[green]✓[/] demo finished in {took}; outputs:")  # type: ignore[attr-defined]
    for what, path in outputs:
        console.print(f"  {escape_markup(what)}: {escape_markup(str(path))}")  # type: ignore[attr-defined]


def _fixed(value: float | None, decimals: int) -> str:
    """A score with a fixed number of decimals (26.00 dB, not 26), or "-"."""
    return "-" if value is None else f"{value:.{decimals}f}"


def _denoise_table(result: DenoiseDemoResult) -> object:
    """PSNR, SSIM and RMSE of the held-out slab: the low-dose input, the denoised image, the gain."""
    from rich.table import Table

    table = Table(title=f"held-out slab (not used for training), window {escape_markup(result.window)}",
                  title_justify="left")
    for column in ("case", "image", "PSNR (dB)", "SSIM (2D)", "RMSE (HU)"):
        table.add_column(column, justify="left" if column in ("case", "image") else "right")
    for case, scores in sorted(result.cases.items()):
        for label, key in (("low dose (input)", "input"), ("denoised", "restored")):
            metrics = scores.get(key) or {}
            table.add_row(escape_markup(case), label, _fixed(metrics.get("psnr_db"), 2),
                          _fixed(metrics.get("ssim_2d"), 3), _fixed(metrics.get("rmse_hu"), 1))
        before, after = (scores.get("input") or {}).get("psnr_db"), scores["restored"].get("psnr_db")
        if before is not None and after is not None:
            table.add_row(escape_markup(case), "[bold]gain[/]", f"[bold]{after - before:+.2f}[/]", "", "")
    return table


def _demo_table(result: DemoResult) -> object:
    """Dice per held-out case and label, the case mean, and the mean foreground Dice."""
    from rich.table import Table

    table = Table(title=f"Dice on {len(result.dice)} held-out case(s) (not used for training)", title_justify="left")
    table.add_column("case")
    for name in result.labels:
        table.add_column(f"Dice {escape_markup(name)}", justify="right")
    table.add_column("mean", justify="right")
    for case, values in sorted(result.dice.items()):
        table.add_row(escape_markup(case), *[fmt_metric(values[n]) for n in result.labels],
                      fmt_metric(result.case_mean[case]))
    table.add_row("[bold]mean foreground Dice[/]", *[""] * len(result.labels),
                  f"[bold]{fmt_metric(result.mean_dice)}[/]")
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``autoseg --help`` lists them.

    Args:
        app: The top-level Typer app.
    """
    app.command("example")(example_cmd)
    app.command("demo")(demo_cmd)
