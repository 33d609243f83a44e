"""``predict``: segment new images with the trained folds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoseg.cli._render import make_console, parse_models, predict_progress, user_errors


def predict_cmd(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Option(
        "--input", "-i", metavar="PATH", help="Image file or folder of images (nnU-Net {case}_0000 naming, plain files, or MSD "
                              "4D), or a folder of DICOM series (one case per folder holding a series, named after "
                              "it); repeat for several.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the label maps.")],
    model: Annotated[Optional[Path], typer.Option(
        "--model", metavar="FILE", help="A model file (autoseg export) instead of WORK: no experiment folder "
                                             "needed.")] = None,
    work: Annotated[Optional[Path], typer.Argument(
        metavar="WORK", help="Experiment folder (WORK) with trained folds; or give --model instead.", show_default=False)] = None,
    configs: Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", metavar="CONFIG", help="Configuration; repeat or separate with commas to average several "
                                                 "(default: WORK/best.yaml's, with its postprocessing; else the "
                                                 "single trained one).")] = None,
    folds: Annotated[Optional[list[str]], typer.Option(
        "--folds", "-f", metavar="FOLD", help="Folds to average: -f 0 1 2, -f 0,1 or -f all (default: every trained fold).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", metavar="final|best", help="Checkpoint of each fold: final (default) or best; a model file "
                                                   "holds one, chosen at export.")] = None,
    no_tta: Annotated[bool, typer.Option("--no-tta", help="No mirroring test-time augmentation (up to 8x fewer network "
                                                          "passes in 3D, 4x in 2D; slightly less accurate).")] = False,
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
        "--output-format", metavar="auto|nifti|dicom-seg|dicom", help="Label map format: auto (the input's; NIfTI "
        "for DICOM series), nifti, or dicom-seg (a DICOM SEG referencing the input series; needs pip install "
        "'autoseg[dicom]'); for a denoise model and DICOM series inputs, dicom writes OUT/<case>/, a DICOM series "
        "copying the source's headers (new UIDs, DERIVED, one file per source slice); repeat for several.")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", help="Share the cases out over N GPUs (one process each); outputs identical to one GPU.",
        min=1)] = None,
    procs: Annotated[Optional[int], typer.Option(
        "--procs", help="With --device cpu: share the cases out over N CPU processes.", min=1)] = None,
    engine: Annotated[str, typer.Option(
        "--engine", help="What runs the networks: auto (OpenVINO on the CPU where autoseg[openvino] is installed, "
        "else torch), torch, openvino, onnxruntime.")] = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", help="auto, fp32, bf16 (OpenVINO on CPUs with AMX / AVX-512 BF16: the auto choice there), "
        "int8 (a model file exported with --int8).")] = "auto",
) -> None:
    """Segment new images with the trained folds of WORK or a model file (--model): sliding window, mirroring
    TTA, fold averaging -> label maps."""
    with user_errors():
        from rich.markup import escape

        from autoseg.inference import run as predict
        from autoseg.errors import ConfigError
        from autoseg.distributed import resolve_launch

        several = gpus is not None or procs is not None
        devices = list(resolve_launch(device, gpus, procs, folds_parallel=several).devices) if several else None

        extras = list(ctx.args)
        if model is not None and work is not None and folds and str(work).isdigit():
            # "--model F -f 0 1": with no WORK, click hands the second fold to the WORK argument.
            extras.insert(0, str(work))
            work = None
        if (work is None) == (model is None):
            raise ConfigError("give the model either as WORK (an experiment folder) or as --model FILE (a model file "
                              "from 'autoseg export'), " + ("not both" if work is not None else "one of them"))
        if work is not None and work.is_file():
            raise ConfigError(f"{work}: a file, not an experiment folder; for a model file use --model {work}")
        if model is not None and model.is_dir():
            raise ConfigError(f"--model {model}: a folder; give an experiment folder as WORK (without --model), or a "
                              "model file made by 'autoseg export'")
        names, fold_list = parse_models(configs, folds, extras)

        console = make_console()
        with predict_progress() as callbacks:
            summary = predict.run(model or work, inputs, output, names, fold_list, checkpoint, tta=not no_tta,
                                  save_probabilities=save_probabilities, device=device, resume=resume, step=step,
                                  callbacks=callbacks, save_uncertainty=save_uncertainty,
                                  output_format=output_format or "auto", devices=devices, engine=engine,
                                  precision=precision)
        used = ", ".join(f"{s.configuration} (fold{'s' if len(s.folds) > 1 else ''} "
                         f"{' '.join(str(f) for f in s.folds)})" for s in summary.selections)
        skipped = f", {len(summary.skipped)} already done" if summary.skipped else ""
        how = f"{'TTA' if not no_tta else 'no TTA'}, {summary.device}, {summary.seconds:.1f} s" if summary.written else ""
        if summary.model_file is not None:
            used += f" of {summary.model_file.name}"
        console.print(f"[green]✓[/] {len(summary.written)} case(s) predicted{skipped} with {escape(used)}"
                      + (f" ({how})" if how else "") + f" → {escape(str(summary.output))}")
        for line in summary.warnings:  # one line each (soft wrap), so they stay greppable
            console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)
        if summary.postprocessing:
            console.print(f"postprocessing from {'the model file' if summary.model_file else 'best.yaml'} applied")


def register(app: typer.Typer) -> None:
    """Add ``predict`` to ``app``.

    Args:
        app: The top-level Typer app.
    """
    # Extra arguments allowed: nnU-Net's "-f 0 1 2" hands us the folds after the first as extras.
    app.command("predict", context_settings={"allow_extra_args": True})(predict_cmd)
