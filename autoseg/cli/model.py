"""``export`` and ``import``: a trained model as one file to hand on, and back into a WORK folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoseg.cli._render import make_console, parse_models, user_errors


def export_cmd(
    ctx: typer.Context,
    work: Annotated[Path, typer.Argument(help="Experiment folder (WORK) with trained folds.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE",
                                         help="The model file to write (e.g. hippo.autoseg.zip).")],
    configs: Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", metavar="CONFIG", help="Configuration(s) to put in; repeat or separate with commas (default: "
                                                 "WORK/best.yaml's, with its postprocessing; else the single trained "
                                                 "one).")] = None,
    folds: Annotated[Optional[list[str]], typer.Option(
        "--folds", "-f", metavar="FOLD", help="Folds to put in: -f 0 1 2, -f 0,1 or -f all (default: best.yaml's, "
                                              "else every trained fold).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", metavar="final|best",
                                            help="Checkpoint of each fold: final or best.")] = "final",
    licence: Annotated[Optional[str], typer.Option(
        "--licence", "--license", metavar="TEXT", help="The model's licence, written into MODEL.md (default: not "
                                                       "stated).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model file.")] = False,
    file_format: Annotated[str, typer.Option(
        "--format", metavar="autoseg|onnx", help="onnx: also each fold's network as an ONNX graph, for the OpenVINO "
        "and ONNX Runtime engines and for use outside autoseg.")] = "autoseg",
    int8: Annotated[bool, typer.Option(
        "--int8", help="With --format onnx: also an int8 graph per fold, statically quantised on training cases "
        "(needs autoseg[onnx] and WORK's preprocessed data).")] = False,
    calibration_cases: Annotated[Optional[int], typer.Option(
        "--calibration-cases", metavar="N", help="With --int8: training cases (one window each) to calibrate on "
        "(default 20).")] = None,
) -> None:
    """Write the trained folds of WORK as one model file: plans, labels, weights (no pickles), MODEL.md, manifest."""
    with user_errors():
        from rich.markup import escape

        from autoseg.errors import ConfigError, UnknownNameError
        from autoseg.inference.model_export import export_model

        if file_format not in ("autoseg", "onnx"):
            raise UnknownNameError("format", file_format, ("autoseg", "onnx"), "--format")
        if int8 and file_format != "onnx":
            raise ConfigError("--int8: int8 graphs are ONNX graphs; add --format onnx")
        if calibration_cases is not None and not int8:
            raise ConfigError("--calibration-cases: only int8 graphs are calibrated; add --format onnx --int8")
        names, fold_list = parse_models(configs, folds, list(ctx.args))
        console = make_console()
        summary = export_model(work, output, names, fold_list, checkpoint, licence=licence, force=force,
                               onnx=file_format == "onnx", int8=int8,
                               calibration_cases=20 if calibration_cases is None else calibration_cases,
                               report=lambda line: console.print(escape(line), soft_wrap=True))
        used = ", ".join(f"{s.configuration} (fold{'s' if len(s.folds) > 1 else ''} "
                         f"{' '.join(str(f) for f in s.folds)})" for s in summary.selections)
        console.print(f"[green]✓[/] {escape(str(summary.path))}: {escape(used)}, {summary.checkpoint} checkpoint"
                      + (", best.yaml's postprocessing" if summary.postprocessing else "")
                      + (f", ONNX graphs ({' and '.join(summary.graphs)})" if summary.graphs else "")
                      + f"; {summary.size / 1e6:.1f} MB", soft_wrap=True)
        console.print(f"sha256 {summary.sha256}", soft_wrap=True)
        console.print(f"predict with: autoseg predict --model {escape(str(summary.path))} -i IMAGES -o OUT",
                      soft_wrap=True)


def import_cmd(
    model: Annotated[Path, typer.Argument(metavar="FILE", help="A model file (autoseg export).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="WORK",
                                         help="The experiment folder to create (new or empty).")],
) -> None:
    """Unpack a model file into an experiment folder (WORK) that predict and export accept, after checking it."""
    with user_errors():
        from rich.markup import escape

        from autoseg.inference.model_export import import_model

        summary = import_model(model, output)
        used = ", ".join(f"{name} (fold{'s' if len(folds) > 1 else ''} {' '.join(str(f) for f in folds)})"
                         for name, folds in summary.configurations.items())
        console = make_console()
        console.print(f"[green]✓[/] {escape(str(model))} → {escape(str(summary.work))}: {escape(used)}, "
                      f"{summary.checkpoint} checkpoint (as checkpoint_final.pt); see {escape(str(summary.work))}/MODEL.md",
                      soft_wrap=True)
        console.print(f"predict with: autoseg predict {escape(str(summary.work))} -i IMAGES -o OUT", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``import`` to ``app``.

    Args:
        app: The top-level Typer app.
    """
    # Extra arguments allowed: nnU-Net's "-f 0 1 2" hands us the folds after the first as extras.
    app.command("export", context_settings={"allow_extra_args": True})(export_cmd)
    app.command("import")(import_cmd)
