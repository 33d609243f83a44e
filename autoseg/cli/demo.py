"""``example`` and ``demo``: the bundled example dataset, and the whole pipeline run on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autoseg.cli._render import (make_console, escape_markup, fmt_metric, predict_progress, progress_bar, training_progress,
                                 user_errors)

if TYPE_CHECKING:
    from autoseg.demo import DemoResult


def example_cmd(
    name: Annotated[str, typer.Argument(help="Example dataset to copy (hippocampus).")] = "hippocampus",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create.")] = Path("example_raw"),
) -> None:
    """Copy a small real example dataset shipped with autoseg (24 MSD Hippocampus cases, CC BY-SA 4.0)."""
    with user_errors():
        from autoseg.examples import copy_example

        path = copy_example(name, out)
        make_console().print(f"[green]✓[/] {name} example copied to {path}; next: autoseg plan {path} -o WORK")


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
    with user_errors():
        from autoseg import demo
        from autoseg.training.config import parse_duration

        console = make_console()
        hooks = demo.DemoHooks(note=lambda text: console.print(text, markup=False, highlight=False),
                               progress=progress_bar, training=lambda: training_progress(console),
                               predicting=predict_progress)
        settings = demo.DemoSettings(time_budget_s=parse_duration(time_budget), seed=seed, cases=cases)
        result = demo.run(out, settings, device, hooks, force=force)
        console.print(_demo_table(result))
        total = result.seconds["total"]
        took = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
        console.print(f"[green]✓[/] demo finished in {took}; outputs:")
        for what, path in result.outputs:
            console.print(f"  {escape_markup(what)}: {escape_markup(str(path))}")


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
