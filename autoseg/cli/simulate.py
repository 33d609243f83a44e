"""``simulate``: a sub-app that makes restoration datasets (degraded input, clean target) from clean CT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autoseg.cli._render import make_console, progress_bar, user_errors

if TYPE_CHECKING:
    from autoseg.simulate.run import SimulateSummary

SimulateInput = Annotated[Path, typer.Argument(
    help="Folder of CT volumes (NIfTI, NRRD, MHA) and/or DICOM series folders, a segmentation dataset (its "
         "imagesTr/*_0000 images are reused), or one volume. Only read.")]
SimulateOut = Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write; must be new or empty.")]
FileEnding = Annotated[str, typer.Option("--file-ending", help="Ending of the written images: .nii.gz, .nii, .nrrd "
                                                               "or .mha.")]
SimulateName = Annotated[str | None, typer.Option("--name", help="Dataset name (default: the output folder's "
                                                                 "name).")]


def _print_summary(summary: SimulateSummary, what: str) -> None:
    """One line: where the dataset is, how many cases, what imagesTr holds, the task."""
    from rich.markup import escape

    root = escape(str(summary.root))
    cases = len(summary.cases)
    make_console().print(f"[green]✓[/] {root}: {cases} case(s), imagesTr {what}, targetsTr the originals; "
                         f"dataset.json task {summary.task!r}")


def simulate_low_dose_cmd(
    src: SimulateInput,
    out: SimulateOut,
    dose: Annotated[float, typer.Option("--dose", help="Fraction of the full dose, in (0, 1]: 0.25 is the AAPM "
                                                       "challenge's quarter dose.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise; each case draws from a seed derived from "
                                                     "it and the case id (same seed, same files).")] = 0,
    photons: Annotated[float | None, typer.Option(
        "--photons", help="Incident photons per ray at full dose, for a 1 mm x 1 mm ray and 1000 views (scaled to "
                          "each image's pixel size, slice spacing and views). Default 1e5.")] = None,
    electronic_noise: Annotated[float | None, typer.Option(
        "--electronic-noise", help="Standard deviation of the detector's electronic noise, in counts. Default "
                                   "sqrt(10) = 3.16 (a variance of 10).")] = None,
    views: Annotated[int | None, typer.Option(
        "--views", help="Views per half rotation (default: pi/2 x the image width, 805 for 512 pixels; fewer "
                        "is faster, with streakier noise towards the edge).")] = None,
    filter_name: Annotated[str, typer.Option(
        "--filter", help="Reconstruction filter of the added noise: hann (a standard-kernel-like roll-off), hamming, "
                         "cosine, shepp-logan or ramp (sharpest, noisiest).")] = "hann",
    file_ending: FileEnding = ".nii.gz",
    name: SimulateName = None,
) -> None:
    """Low-dose CT from full-dose CT: projection-domain noise (Poisson + electronic), reconstructed and added.

    Writes imagesTr/{case}_0000 (low dose), targetsTr/{case} (the original) and dataset.json (task
    denoise). A parallel-beam approximation; see docs/restoration.md.
    """
    with user_errors():
        from autoseg.simulate.low_dose import LowDose
        from autoseg.simulate.run import run_low_dose

        given = {"photons": photons, "electronic_noise": electronic_noise}
        settings = LowDose(dose=dose, views=views, filter=filter_name,
                           **{key: value for key, value in given.items() if value is not None})
        with progress_bar("simulating slices") as progress:
            summary = run_low_dose(src, out, settings, seed, file_ending=file_ending, name=name,
                                   progress=progress)  # type: ignore[arg-type]
        _print_summary(summary, f"at dose {dose:g}")


def simulate_thick_slices_cmd(
    src: SimulateInput,
    out: SimulateOut,
    factor: Annotated[int, typer.Option("--factor", help="Thin slices averaged into one thick slice (slice spacing "
                                                         "x factor).")] = 3,
    file_ending: FileEnding = ".nii.gz",
    name: SimulateName = None,
) -> None:
    """Thick slices from thin ones (mean of --factor adjacent slices), for super-resolution.

    Writes imagesTr/{case}_0000 (thick), targetsTr/{case} (the thin original) and dataset.json
    (task super-resolution). Trailing slices that fill no whole thick slice are dropped from both.
    """
    with user_errors():
        from autoseg.simulate.run import run_thick_slices

        with progress_bar("averaging slices") as progress:
            summary = run_thick_slices(src, out, factor, file_ending=file_ending, name=name,
                                       progress=progress)  # type: ignore[arg-type]
        _print_summary(summary, f"{factor}x thicker slices")


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` sub-app, with its commands, to ``app``.

    Args:
        app: The top-level Typer app.
    """
    simulate_app = typer.Typer(
        help="Make restoration datasets (degraded input, clean target) from clean CT; the source is only read.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    simulate_app.command("low-dose")(simulate_low_dose_cmd)
    simulate_app.command("thick-slices")(simulate_thick_slices_cmd)
    app.add_typer(simulate_app, name="simulate")
