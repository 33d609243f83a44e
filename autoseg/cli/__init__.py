"""Command-line interface: one command per verb. Thin: parse, call the stage, render with rich.

The app is built here; each verb group lives in its own module (``dataset``, ``train``,
``evaluate``, ``predict``, ``model`` (export, import), ``demo``, ``convert``, ``simulate``) and adds its commands through ``register(app)``,
and the pieces they share live in ``_render``. Heavy modules (numpy, SimpleITK, torch) are imported
inside the commands so that ``autoseg --help`` starts instantly. An
:class:`~autoseg.errors.AutosegError` becomes one line on stderr and a non-zero exit code; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from autoseg.cli import (
    convert,
    dataset,
    demo,
    evaluate,
    model,
    predict,
    simulate,
    train,
)

app = typer.Typer(
    name="autoseg",
    help="Self-configuring medical image segmentation: check, plan, preprocess, train, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    """Print ``autoseg <version>`` and stop, when ``--version`` was given.

    Args:
        value: Whether ``--version`` was on the command line.

    Raises:
        typer.Exit: With code 0 after printing, so no command runs.
    """
    if value:
        from autoseg._version import __version__

        typer.echo(f"autoseg {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", is_eager=True, callback=_print_version)] = False,
) -> None:
    """Options of ``autoseg`` itself, before the command; the app's help text comes from ``Typer(help=...)``."""


# Registration order is the order ``autoseg --help`` lists the commands in: the pipeline's order.
for _verbs in (dataset, train, evaluate, predict, model, demo, convert, simulate):
    _verbs.register(app)


def main() -> None:
    """Console-script entry point (``autoseg``, and ``python -m autoseg``)."""
    app()
