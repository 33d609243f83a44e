"""``autoseg convert kaggle-uwmgi``: Kaggle "UW-Madison GI Tract Image Segmentation" -> raw layout.

Source layout (the competition's download, read as it is)::

    SRC/train.csv                 id, class, segmentation  (three rows per slice, one per class)
    SRC/train/case123/case123_day20/scans/slice_0001_266_266_1.50_1.50.png

* A slice file is ``slice_{number}_{W}_{H}_{pw}_{ph}.png``: a 16-bit grey PNG of ``W`` columns and
  ``H`` rows with pixel spacing ``pw`` (along a row, x) and ``ph`` (along a column, y) in mm.
* A row's ``id`` is ``case{N}_day{D}_slice_{number}``, ``class`` one of :data:`CLASSES`, and
  ``segmentation`` the mask as run-length encoding: space-separated ``start length`` pairs,
  1-indexed, row-major over the ``H x W`` slice (empty: no mask). See :func:`rle_decode`.

Output: one case per case-day (``case123_day20``), the slices stacked in slice-number order::

    RAW/imagesTr/case123_day20_0000.nii.gz   uint16 MR intensities, channel "MRI"
    RAW/labelsTr/case123_day20.nii.gz        uint8 bitmask of the classes

Conventions:

* **Slice spacing** is not in the files. It defaults to :data:`DEFAULT_SLICE_SPACING` (3 mm, the
  slice thickness reported for the competition's MR-Linac scans); ``--slice-spacing`` sets it. In-plane
  spacing comes from the file names; origin (0, 0, 0), identity direction.
* **Regions**: the organs overlap (large and small bowel touch and share pixels in the annotations),
  so they are written as overlapping regions with the bitmask encoding of
  :mod:`autoseg.convert.common`: large_bowel = 1, small_bowel = 2, stomach = 4, a pixel's value is
  the sum over its classes (0..7); dataset.json declares
  ``{"background": 0, "large_bowel": [1, 3, 5, 7], "small_bowel": [2, 3, 6, 7], "stomach": [4, 5, 6, 7]}``
  and ``regions_class_order: [1, 2, 4]`` for nnU-Net.
* **Problems**: a row whose image is missing (no such case-day folder or slice file) is skipped with
  a warning (one per case-day, naming the first rows). A malformed row (unknown class, RLE that is
  not start/length pairs, runs outside the slice, overlapping runs) is an error naming the CSV line
  and id; with ``skip_invalid`` its whole case-day is left out with a warning instead, since a
  half-annotated volume would teach background where there is an organ. A case-day folder without
  any row is unannotated and left out with a warning; slices without rows in an annotated case-day
  are background (warned).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.convert.common import (
    ConvertSummary,
    ProgressFn,
    bitmask_labels,
    convert_each,
    prepare_output,
    region_extra,
    short_list,
    write_dataset_json,
)
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import Geometry, read_image, write_image

#: The competition's classes, in bit order (class i -> value 2**i).
CLASSES: tuple[str, ...] = ("large_bowel", "small_bowel", "stomach")
#: Slice spacing (mm) used when ``--slice-spacing`` is not given (module docstring).
DEFAULT_SLICE_SPACING = 3.0
ENDING = ".nii.gz"

_SLICE_FILE = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d*)?)_(\d+(?:\.\d*)?)\.png$", re.IGNORECASE)
_ROW_ID = re.compile(r"^(case\d+_day\d+)_slice_(\d+)$")
_CASE_DAY = re.compile(r"^case\d+_day\d+$")


@dataclass(frozen=True)
class SliceFile:
    """One slice image and what its name says.

    Attributes:
        path: the PNG file.
        number: the slice number.
        width: pixels per row (columns).
        height: rows.
        pixel_width: spacing along a row (x), mm.
        pixel_height: spacing along a column (y), mm.
    """

    path: Path
    number: int
    width: int
    height: int
    pixel_width: float
    pixel_height: float


@dataclass(frozen=True)
class Row:
    """One row of train.csv (``line`` is the 1-based line number in the file, header = 1)."""

    line: int
    id: str
    cls: str
    rle: str


def parse_slice_name(path: Path) -> SliceFile | None:
    """Parse ``slice_{number}_{W}_{H}_{pw}_{ph}.png``; None for a name of another form."""
    match = _SLICE_FILE.match(Path(path).name)
    if not match:
        return None
    number, width, height, pw, ph = match.groups()
    return SliceFile(Path(path), int(number), int(width), int(height), float(pw), float(ph))


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a competition RLE string into a boolean ``(height, width)`` mask.

    Args:
        rle: space-separated ``start length`` pairs; starts are 1-indexed positions in the row-major
            (C order) flattening of the slice; empty or whitespace for no mask.
        height: rows of the slice.
        width: columns of the slice.

    Returns:
        The mask.

    Raises:
        ValueError: a token is not an integer, the values are not pairs, a start is < 1 or a length
            < 1, a run ends beyond the slice, or runs overlap / are not in increasing order (the
            message says which).
    """
    tokens = rle.split()
    size = height * width
    flat = np.zeros(size + 1, dtype=np.int32)
    if not tokens:
        return np.zeros((height, width), dtype=bool)
    if not all(t.isascii() and t.isdigit() for t in tokens):
        bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
        raise ValueError(f"RLE value {bad!r} is not a non-negative integer")
    if len(tokens) % 2:
        raise ValueError(f"RLE holds {len(tokens)} values, not start/length pairs")
    values = np.asarray([int(t) for t in tokens], dtype=np.int64)
    starts, lengths = values[0::2] - 1, values[1::2]
    if starts.min() < 0:
        raise ValueError("RLE run starts at 0; starts are 1-indexed")
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"RLE run at {starts[i] + 1} has length {lengths[i]}")
    ends = starts + lengths
    if ends.max() > size:
        i = int(np.argmax(ends))
        raise ValueError(f"RLE run {starts[i] + 1} {lengths[i]} ends at pixel {ends[i]}, beyond the "
                         f"{height}x{width} = {size} pixels of the slice")
    if starts.size > 1 and np.any(starts[1:] < ends[:-1]):
        i = int(np.flatnonzero(starts[1:] < ends[:-1])[0])
        raise ValueError(f"RLE runs overlap or are out of order (run at {starts[i + 1] + 1} begins before the run "
                         f"at {starts[i] + 1} ends at {ends[i]})")
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return (np.cumsum(flat[:size]) > 0).reshape(height, width)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2D boolean mask in the competition's RLE (inverse of :func:`rle_decode`)."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=bool).ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, stops = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, stops))


def read_rows(csv_path: Path) -> tuple[dict[str, list[Row]], list[Row]]:
    """Read train.csv, grouping the rows by case-day.

    Returns:
        ``{case_day: rows}`` and the rows whose id is not ``case{N}_day{D}_slice_{number}``.

    Raises:
        DatasetError: the file is missing or lacks the ``id``, ``class``, ``segmentation`` columns.
    """
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: not found; pass the competition folder that holds train.csv and train/")
    grouped: dict[str, list[Row]] = {}
    bad_ids: list[Row] = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("id", "class", "segmentation") if c not in columns]
        if missing:
            raise DatasetError(f"{csv_path}: columns are {columns}, {', '.join(missing)} missing; expected the "
                               "competition's train.csv with id, class, segmentation")
        reader.fieldnames = columns
        for line, record in enumerate(reader, start=2):
            row = Row(line, (record.get("id") or "").strip(), (record.get("class") or "").strip(),
                      (record.get("segmentation") or "").strip())
            match = _ROW_ID.match(row.id)
            if match:
                grouped.setdefault(match.group(1), []).append(row)
            else:
                bad_ids.append(row)
    return grouped, bad_ids


def discover_scans(train_dir: Path) -> tuple[dict[str, list[SliceFile]], list[Path]]:
    """Slice files per case-day under ``train/case*/case*_day*/scans/``, sorted by slice number.

    Returns:
        ``{case_day: slices}`` and the PNG files whose names do not parse (ignored).
    """
    found: dict[str, list[SliceFile]] = {}
    odd: list[Path] = []
    if not train_dir.is_dir():
        return found, odd
    for case_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        for day_dir in sorted(p for p in case_dir.iterdir() if p.is_dir() and _CASE_DAY.match(p.name)):
            scans = day_dir / "scans"
            folder = scans if scans.is_dir() else day_dir
            slices = []
            for path in sorted(folder.glob("*.png")):
                parsed = parse_slice_name(path)
                if parsed is None:
                    odd.append(path)
                else:
                    slices.append(parsed)
            if slices:
                found[day_dir.name] = sorted(slices, key=lambda s: s.number)
    return found, odd


def _row_error(csv_path: Path, row: Row, problem: str, fix: str) -> DatasetError:
    return DatasetError(f"{csv_path}: line {row.line} (id {row.id}, class {row.cls or '?'}): {problem}; {fix}")


def build_label(rows: Sequence[Row], slices: Sequence[SliceFile], csv_path: Path) -> tuple[np.ndarray, list[Row]]:
    """The bitmask label volume of one case-day from its rows.

    Args:
        rows: the case-day's rows.
        slices: its slice files, sorted by number.
        csv_path: names the file in messages.

    Returns:
        ``(Z, H, W)`` uint8 bitmask (class ``i`` -> ``2**i``) and the rows whose slice has no image.

    Raises:
        DatasetError: a row with an unknown class or malformed RLE (naming line and id).
    """
    index = {s.number: z for z, s in enumerate(slices)}
    height, width = slices[0].height, slices[0].width
    label = np.zeros((len(slices), height, width), dtype=np.uint8)
    orphans: list[Row] = []
    for row in rows:
        if row.cls not in CLASSES:
            raise _row_error(csv_path, row, f"class {row.cls!r} is not one of {', '.join(CLASSES)}",
                             "fix or delete the row")
        number = int(_ROW_ID.match(row.id).group(2))  # type: ignore[union-attr]
        if number not in index:
            orphans.append(row)
            continue
        try:
            mask = rle_decode(row.rle, height, width)
        except ValueError as exc:
            raise _row_error(csv_path, row, str(exc), "fix or delete the row (or pass --skip-invalid to leave "
                             "the case-day out)") from None
        label[index[number]] |= mask.astype(np.uint8) << np.uint8(CLASSES.index(row.cls))
    return label, orphans


def read_volume(slices: Sequence[SliceFile], case_day: str) -> np.ndarray:
    """Stack a case-day's slice PNGs into a ``(Z, H, W)`` array (dtype as stored, uint16).

    Raises:
        DatasetError: a slice is unreadable, its size differs from its name, or sizes differ.
    """
    first = slices[0]
    planes = []
    for s in slices:
        if (s.width, s.height) != (first.width, first.height):
            raise DatasetError(f"{s.path}: slice is {s.width}x{s.height} but {first.path.name} is "
                               f"{first.width}x{first.height}; all slices of {case_day} must share one size")
        array, _ = read_image(s.path)
        if array.shape[0] != 1:
            raise DatasetError(f"{s.path}: {array.shape[0]} channels; expected a grey 16-bit PNG")
        if array.shape[2:] != (s.height, s.width):
            raise DatasetError(f"{s.path}: the file name says {s.width}x{s.height} (width x height) but the image is "
                               f"{array.shape[3]}x{array.shape[2]}; restore the original file")
        planes.append(array[0, 0])
    return np.stack(planes)


def convert_case_day(case_day: str, slices: Sequence[SliceFile], rows: Sequence[Row], out: Path, csv_path: Path,
                     slice_spacing: float) -> list[str]:
    """Convert one case-day; writes the image, then the label (both atomically).

    Returns:
        Warnings (one line each).

    Raises:
        DatasetError: malformed rows or unreadable slices.
    """
    warnings: list[str] = []
    label, orphans = build_label(rows, slices, csv_path)
    if orphans:
        warnings.append(_orphan_warning(csv_path, case_day, orphans, "the case-day has no slice file with that number"))
    numbers = [s.number for s in slices]
    with_rows = {int(_ROW_ID.match(r.id).group(2)) for r in rows}  # type: ignore[union-attr]
    unrowed = [n for n in numbers if n not in with_rows]
    if unrowed:
        warnings.append(f"{case_day}: {len(unrowed)} slice(s) have no row in {csv_path.name} (e.g. slice "
                        f"{unrowed[0]:04d}); written as background")
    jumps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
    if jumps:
        warnings.append(f"{case_day}: slice numbers jump from {jumps[0][0]} to {jumps[0][1]} ({len(jumps)} gap(s)); "
                        "the slices are stacked without the gap")
    spacings = {(s.pixel_height, s.pixel_width) for s in slices}
    if len(spacings) > 1:
        warnings.append(f"{case_day}: slices have different pixel spacings {sorted(spacings)}; "
                        "the first slice's is used")
    image = read_volume(slices, case_day)
    geometry = Geometry(spacing=(float(slice_spacing), slices[0].pixel_height, slices[0].pixel_width),
                        origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), ndim=3)
    write_image(out / "imagesTr" / f"{case_day}_0000{ENDING}", image, geometry)
    write_image(out / "labelsTr" / f"{case_day}{ENDING}", label, geometry)
    return warnings


def _orphan_warning(csv_path: Path, case_day: str, rows: Sequence[Row], why: str) -> str:
    named = short_list([f"line {r.line} id {r.id}" for r in rows], 2)
    return f"{csv_path.name}: {len(rows)} row(s) of {case_day} name a slice without image ({why}): {named}; skipped"


def run(src: Path, out: Path, slice_spacing: float = DEFAULT_SLICE_SPACING, *, skip_invalid: bool = False,
        name: str | None = None, progress: ProgressFn | None = None) -> ConvertSummary:
    """Convert the competition's training data at ``src`` into the raw layout at ``out`` (resumable).

    Args:
        src: the folder holding ``train.csv`` and ``train/``.
        out: the raw dataset folder to write (created; never inside ``src``).
        slice_spacing: distance between slices in mm (not stored by the competition).
        skip_invalid: leave out a case-day with malformed rows (warning) instead of stopping.
        name: dataset name in dataset.json (default: the output folder's name).
        progress: ``progress(done, total)`` after every case-day.

    Returns:
        What was written, skipped and left out, and every warning.

    Raises:
        ConfigError: ``slice_spacing`` is not positive, or ``out`` holds another conversion.
        DatasetError: the layout is not the competition's, or a row is malformed (unless ``skip_invalid``).
    """
    if not slice_spacing > 0:
        raise ConfigError(f"--slice-spacing must be a positive distance in mm, got {slice_spacing}")
    src, out = Path(src), Path(out)
    csv_path = src / "train.csv"
    rows, bad_ids = read_rows(csv_path)
    scans, odd = discover_scans(src / "train")
    if not scans:
        raise DatasetError(f"{src / 'train'}: no slice images found (expected train/case*/case*_day*/scans/"
                           "slice_XXXX_W_H_pw_ph.png); pass the competition folder")
    warnings: list[str] = []
    if bad_ids:
        first = bad_ids[0]
        problem = (f"{len(bad_ids)} row(s) with an id not of the form case<N>_day<D>_slice_<NNNN>, e.g. line "
                   f"{first.line} id {first.id!r}")
        if not skip_invalid:
            raise DatasetError(f"{csv_path}: {problem}; fix or delete them (or pass --skip-invalid to skip them)")
        warnings.append(f"{csv_path.name}: {problem}; skipped (--skip-invalid)")
    if odd:
        warnings.append(f"{len(odd)} PNG file(s) not named slice_<number>_<W>_<H>_<pw>_<ph>.png ignored, e.g. {odd[0]}")
    for case_day in sorted(set(rows) - set(scans)):
        warnings.append(_orphan_warning(csv_path, case_day, rows[case_day], "no scans folder for this case-day"))
    unannotated = sorted(set(scans) - set(rows))
    if unannotated:
        warnings.append(f"{len(unannotated)} case-day(s) have no row in {csv_path.name} (unannotated), left out: "
                        f"{short_list(unannotated)}")
    todo = sorted(set(scans) & set(rows))
    if not todo:
        raise DatasetError(f"{csv_path}: no row belongs to a case-day under {src / 'train'}; check that train.csv "
                           "and train/ come from the same download")

    labels = bitmask_labels(CLASSES)
    record = {"converter": "kaggle-uwmgi", "slice_spacing": float(slice_spacing), "classes": list(CLASSES)}
    record = prepare_output(out, [src], record, "autoseg convert kaggle-uwmgi")

    def write_meta() -> None:
        write_dataset_json(out, name=name or out.name, description=f"Kaggle UW-Madison GI Tract Image Segmentation, "
                           f"converted from {src} by autoseg convert kaggle-uwmgi (slice spacing "
                           f"{slice_spacing:g} mm assumed; classes as bitmask regions)", channel_names=["MRI"],
                           labels=labels, file_ending=ENDING, record=record, extra=region_extra(labels))

    out.mkdir(parents=True, exist_ok=True)
    write_meta()
    written, skipped, failed, converted = convert_each(
        todo, lambda case_day: convert_case_day(case_day, scans[case_day], rows[case_day], out, csv_path,
                                                slice_spacing),
        out, ENDING, skip_invalid=skip_invalid, left_out=lambda case_day: f"case-day {case_day} left out: --skip-invalid",
        progress=progress)
    warnings.extend(converted)
    write_meta()
    if not written and not skipped:
        raise DatasetError(f"{src}: no case-day could be converted; {len(failed)} failed, the last: {warnings[-1]}")
    return ConvertSummary(out, tuple(written), tuple(skipped), tuple(failed), tuple(warnings), labels)


def class_masks(label: np.ndarray, classes: Sequence[str] = CLASSES) -> Mapping[str, np.ndarray]:
    """Decode a bitmask label map back into one boolean mask per class (the exact inverse)."""
    return {name: (label & (1 << bit)) > 0 for bit, name in enumerate(classes)}
