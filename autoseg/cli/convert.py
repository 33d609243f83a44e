"""``convert``: a sub-app that brings benchmark data into the nnU-Net v2 raw layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoseg.cli._render import make_console, progress_bar, user_errors


ConvertName = Annotated[Optional[str], typer.Option("--name", help="Dataset name (default: the output folder's name).")]


def _print_conversion(summary: object, unit: str) -> None:
    """Warnings (at most 50 lines), then one summary line and the next step."""
    from rich.markup import escape

    console = make_console()
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
    with user_errors():
        from autoseg.convert import contours, dicom_rt

        mapping = contours.load_roi_map(roi_map) if roi_map is not None else None
        with progress_bar("converting patients") as progress:
            summary = dicom_rt.run(src, out, mapping, overlap, skip_invalid=skip_invalid,  # type: ignore[arg-type]
                                   allow_frame_mismatch=allow_frame_mismatch, name=name, progress=progress)
        _print_conversion(summary, "patient")


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
    with user_errors():
        from autoseg.convert import kaggle_uwmgi

        with progress_bar("converting case-days") as progress:
            summary = kaggle_uwmgi.run(src, out, slice_spacing, skip_invalid=skip_invalid, name=name,
                                       progress=progress)
        _print_conversion(summary, "case-day")


def convert_png_masks_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of 2D images (.png, .tif, .bmp, .jpg).")],
    masks: Annotated[Path, typer.Argument(help="Folder of 2D masks, paired with the images by name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Raw dataset folder to write (nnU-Net v2 layout).")],
    value_map: Annotated[Optional[list[str]], typer.Option(
        "--map", metavar="V=L", help="Mask value V is label L; repeat per value (0=0 is implied unless 0 is "
                                     "mapped). Required (e.g. --map 255=1) unless --threshold is given.")] = None,
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
    threshold: Annotated[Optional[int], typer.Option(
        "--threshold", metavar="T", help="Lossy binary masks (JPEG): value >= T is foreground 1, the rest 0, "
                                         "before --map (default then 1=1). 128 for 0/255 masks.")] = None,
) -> None:
    """Convert 2D image and mask folders (e.g. ISBI 2012 EM, Kvasir-SEG), masks mapped through --map V=L."""
    with user_errors():
        from autoseg.convert import png_masks

        mapping = png_masks.parse_value_map(value_map or [], threshold)
        names = png_masks.parse_label_names(label_name or [])
        with progress_bar("converting images") as progress:
            summary = png_masks.run(images, masks, out, mapping, name=name, channel_names=channel_name,
                                    label_names=names, pair_by=pair_by, mask_suffix=mask_suffix,  # type: ignore[arg-type]
                                    file_ending=file_ending, progress=progress, threshold=threshold)
        _print_conversion(summary, "image")


def register(app: typer.Typer) -> None:
    """Add the ``convert`` sub-app, with its commands, to ``app``.

    Args:
        app: The top-level Typer app.
    """
    convert_app = typer.Typer(
        help="Bring benchmark data into the nnU-Net v2 raw layout (RAW); the source is only read. Resumable.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    convert_app.command("dicom-rt")(convert_dicom_rt_cmd)
    convert_app.command("kaggle-uwmgi")(convert_kaggle_uwmgi_cmd)
    convert_app.command("png-masks")(convert_png_masks_cmd)
    app.add_typer(convert_app, name="convert")
