"""``autoseg convert png-masks``: folders of 2D images and masks -> nnU-Net v2 raw layout.

Example (ISBI 2012 EM membranes; masks are 0 = membrane, 255 = cell interior)::

    autoseg convert png-masks train/image train/label -o RAW --map 255=1 --label-name 1=cell --channel-name EM

Conventions:

* **Pairing**: by name (the image's and the mask's file names without ending are equal, after
  removing ``mask_suffix`` from the mask's), or with ``pair_by="order"`` by position in natural sort
  order ("2" before "10") of both folders. An image without a mask or a mask without an image is
  an error naming them.
* **Mask values** go through an explicit map ``V=L`` (mask value -> label). Value 0 maps to
  background 0 unless the map says otherwise (``--map 0=1 --map 255=0`` makes ISBI's membranes the
  foreground). A value that is not mapped is an error listing the values found and a suggested map;
  every mask is checked before anything is written. The labels must be 0..N without gaps.
* **Lossy masks** (JPEG, as Kvasir-SEG ships them: a 0/255 mask holds 0-8 and 247-255): with
  ``threshold=T`` (``--threshold 128``) a mask value ``>= T`` is foreground 1, anything else
  background 0, before the map (which then defaults to ``1=1``). Without it, values in that
  pattern are recognised (:func:`autoseg.dataset.check.looks_lossy_binary`, which ``autoseg check``
  uses for the same advice) and the error says to threshold instead of mapping every grey level.
* **Output**: ``imagesTr/{case}_{CCCC}{ending}``, ``labelsTr/{case}{ending}`` with the case id from
  the image's file name; ``.png`` (default; 8/16-bit images) or ``.nii.gz``. A colour image becomes
  one file per channel (``R``, ``G``, ``B``). Geometry (pixel spacing) is kept as read; the mask is
  written on the image's geometry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from autoseg.convert.common import (
    ConvertSummary,
    ProgressFn,
    case_done,
    prepare_output,
    safe_case_id,
    short_list,
    write_dataset_json,
)
from autoseg.dataset.check import looks_lossy_binary
from autoseg.errors import ConfigError, DatasetError
from autoseg.imageio import ENDINGS_2D, read_image, strip_ending, write_image

PairBy = Literal["name", "order"]
PAIR_MODES: tuple[str, ...] = ("name", "order")
OUTPUT_ENDINGS: tuple[str, ...] = (".png", ".nii.gz")
_MAP_ITEM = re.compile(r"^\s*(-?\d+)\s*[=:]\s*(\d+)\s*$")


def parse_value_map(items: Sequence[str], threshold: int | None = None) -> dict[int, int]:
    """Parse ``["255=1", "128=2"]`` (``V=L``, comma-separated lists allowed) into ``{mask value: label}``.

    With a ``threshold`` the masks become 0/1 before the map, and an empty map means ``1=1``.

    Raises:
        ConfigError: an item is not ``V=L`` with integers, a value is mapped twice, no map without
            a threshold, or a thresholded map names values other than 0 and 1.
    """
    mapping: dict[int, int] = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        match = _MAP_ITEM.match(item)
        if not match:
            raise ConfigError(f"--map {item!r}: expected MASK_VALUE=LABEL with integers, e.g. --map 255=1")
        value, label = int(match.group(1)), int(match.group(2))
        if mapping.get(value, label) != label:
            raise ConfigError(f"--map: mask value {value} is mapped to both {mapping[value]} and {label}; map it once")
        mapping[value] = label
    if threshold is not None:
        if set(mapping) - {0, 1}:
            raise ConfigError(f"--map {sorted(mapping)} with --threshold {threshold}: thresholded masks hold only 0 "
                              "and 1; map those (or drop --map: 1=1)")
        return mapping or {1: 1}
    if not mapping:
        raise ConfigError("--map is required: say which mask value is which label, e.g. --map 255=1 "
                          "(or --threshold 128 for lossy 0/255 masks)")
    return mapping


def parse_label_names(items: Sequence[str]) -> dict[int, str]:
    """Parse ``["1=cell"]`` into ``{label: name}``.

    Raises:
        ConfigError: an item is not ``L=NAME``.
    """
    names: dict[int, str] = {}
    for item in items:
        label, sep, name = item.partition("=")
        if not sep or not label.strip().isdigit() or not name.strip():
            raise ConfigError(f"--label-name {item!r}: expected LABEL=NAME, e.g. --label-name 1=cell")
        names[int(label)] = name.strip()
    return names


def effective_map(value_map: Mapping[int, int]) -> dict[int, int]:
    """The map with the implicit ``0 -> 0`` (background stays background unless 0 is mapped)."""
    return {0: 0, **value_map} if 0 not in value_map else dict(value_map)


def label_table(value_map: Mapping[int, int], names: Mapping[int, str] | None = None) -> dict[str, int]:
    """dataset.json ``labels`` for the labels a map produces.

    Raises:
        ConfigError: the labels are not 0..N without gaps, or a name is given twice or for no label.
    """
    labels = sorted(set(effective_map(value_map).values()) | {0})
    if labels != list(range(len(labels))):
        raise ConfigError(f"--map produces labels {labels}; labels must be 0, 1, 2, ... without gaps: renumber them")
    names = dict(names or {})
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise ConfigError(f"--label-name names label(s) {unknown} that --map does not produce (labels: {labels})")
    default = {0: "background"}
    if len(labels) == 2:
        default[1] = "foreground"
    table: dict[str, int] = {}
    for label in labels:
        name = names.get(label) or default.get(label) or f"label_{label}"
        if name in table:
            raise ConfigError(f"--label-name: the name {name!r} is given to labels {table[name]} and {label}")
        table[name] = label
    return table


def apply_value_map(mask: np.ndarray, value_map: Mapping[int, int]) -> np.ndarray:
    """Map mask values to labels (uint8, or uint16 above 255 labels).

    Raises:
        ValueError: the mask holds values the map does not cover (the message lists them).
    """
    full = effective_map(value_map)
    values = np.unique(mask)
    unmapped = [v.item() for v in values if not (float(v).is_integer() and int(v) in full)]
    if unmapped:
        raise ValueError(f"mask values {unmapped[:10]} are not mapped")
    out = np.zeros(mask.shape, dtype=np.uint8 if max(full.values()) < 256 else np.uint16)
    for value, label in full.items():
        if label:
            out[mask == value] = label
    return out


def suggest_map(values: Sequence[int]) -> str:
    """A ``--map`` suggestion for the values found (0 stays background, the others 1, 2, ... in order)."""
    others = [int(v) for v in sorted(values) if v != 0]
    return " ".join(f"--map {v}={i}" for i, v in enumerate(others, start=1)) or "--map 0=0"


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """The 2D image files of a folder (PNG, TIF, BMP, JPEG, and NIfTI), in natural name order.

    Raises:
        DatasetError: the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    endings = tuple(ENDINGS_2D) + (".nii.gz", ".nii")
    files = [folder / n for n in os.listdir(folder)
             if not n.startswith(".") and n.lower().endswith(endings) and (folder / n).is_file()]
    if not files:
        raise DatasetError(f"{folder}: no image files (.png, .tif, .bmp, .jpg, .nii.gz); pass the folder holding them")
    return sorted(files, key=lambda p: _natural_key(p.name))


def pair_files(images: Sequence[Path], masks: Sequence[Path], by: PairBy = "name",
               mask_suffix: str = "") -> list[tuple[str, Path, Path]]:
    """Pair images with masks.

    Args:
        images: image files (natural order).
        masks: mask files (natural order).
        by: ``"name"`` (equal names without ending, ``mask_suffix`` removed from the mask's) or
            ``"order"`` (position in natural order).
        mask_suffix: suffix of mask names before the ending (``"_mask"``).

    Returns:
        ``(case id, image, mask)`` per pair, in image order.

    Raises:
        DatasetError: unpaired files, different counts (order), or two names giving one case id.
    """
    if by == "order":
        if len(images) != len(masks):
            raise DatasetError(f"{len(images)} images but {len(masks)} masks; pairing by sorted order needs equal "
                               "counts: remove the extra files or pair by name")
        pairs = [(strip_ending(i.name)[0], i, m) for i, m in zip(images, masks)]
    else:
        by_stem: dict[str, Path] = {}
        for mask in masks:
            stem = strip_ending(mask.name)[0]
            if mask_suffix and stem.endswith(mask_suffix):
                stem = stem[: -len(mask_suffix)]
            by_stem[stem] = mask
        pairs, lonely = [], []
        for image in images:
            stem = strip_ending(image.name)[0]
            if stem in by_stem:
                pairs.append((stem, image, by_stem.pop(stem)))
            else:
                lonely.append(image.name)
        if lonely or by_stem:
            parts = []
            if lonely:
                parts.append(f"image(s) without mask: {short_list(lonely)}")
            if by_stem:
                parts.append(f"mask(s) without image: {short_list(sorted(p.name for p in by_stem.values()))}")
            raise DatasetError(f"{images[0].parent} / {masks[0].parent}: {'; '.join(parts)}; give each image a mask "
                               "of the same name (--mask-suffix for names like x_mask.png) or pair by sorted order "
                               "(--pair-by order)")
    seen: dict[str, Path] = {}
    result = []
    for stem, image, mask in pairs:
        case_id = safe_case_id(stem)
        if case_id in seen:
            raise DatasetError(f"{image}: its name gives the case id {case_id!r}, as {seen[case_id].name} does; "
                               "rename one of them")
        seen[case_id] = image
        result.append((case_id, image, mask))
    return result


def _read_mask(path: Path, threshold: int | None = None) -> np.ndarray:
    """A mask as a 2D array; with ``threshold``, 1 where the value is ``>= threshold``, else 0."""
    array, _ = read_image(path)
    if array.shape[1] != 1:
        raise DatasetError(f"{path}: mask is 3D ({array.shape[1]} slices); png-masks converts 2D masks")
    if array.shape[0] > 1:
        if not all(np.array_equal(array[0], c) for c in array[1:]):
            raise DatasetError(f"{path}: mask has {array.shape[0]} different colour channels; save masks as "
                               "single-channel (grey) images")
    if threshold is not None:
        return (array[0, 0] >= threshold).astype(np.uint8)
    return array[0, 0]


def mask_values(pairs: Sequence[tuple[str, Path, Path]], progress: ProgressFn | None = None,
                threshold: int | None = None) -> dict[int, Path]:
    """Every value found in the masks, with the first mask holding it.

    Raises:
        DatasetError: a mask is unreadable, 3D, non-integer, or colour.
    """
    found: dict[int, Path] = {}
    for done, (_, _, mask_path) in enumerate(pairs, start=1):
        mask = _read_mask(mask_path, threshold)
        values = np.unique(mask)
        if mask.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
            raise DatasetError(f"{mask_path}: mask holds non-integer values; save masks as integer images")
        for v in values:
            found.setdefault(int(v), mask_path)
        if progress is not None:
            progress(done, 2 * len(pairs))
    return found


def run(images_dir: Path, masks_dir: Path, out: Path, value_map: Mapping[int, int], *, name: str | None = None,
        channel_names: Sequence[str] | None = None, label_names: Mapping[int, str] | None = None,
        pair_by: PairBy = "name", mask_suffix: str = "", file_ending: str = ".png",
        progress: ProgressFn | None = None, threshold: int | None = None) -> ConvertSummary:
    """Convert paired 2D images and masks into the raw layout at ``out`` (resumable).

    Args:
        images_dir: folder of images.
        masks_dir: folder of masks.
        out: the raw dataset folder to write (never inside an input folder).
        value_map: ``{mask value: label}`` (0 -> 0 implied unless 0 is a key).
        name: dataset name (default: the output folder's name).
        channel_names: one name per image channel (default ``["image"]``, or R, G, B for colour).
        label_names: ``{label: name}`` (default background / foreground or ``label_<n>``).
        pair_by: ``"name"`` or ``"order"``.
        mask_suffix: mask name suffix removed before pairing by name.
        file_ending: ``".png"`` or ``".nii.gz"``.
        progress: ``progress(done, total)``.
        threshold: binarise lossy masks first: ``>= threshold`` is 1, the rest 0.

    Returns:
        What was written and skipped.

    Raises:
        ConfigError: bad options, or ``out`` holds another conversion.
        DatasetError: unpaired files, unmapped mask values, size mismatches, unreadable files.
    """
    if pair_by not in PAIR_MODES:
        raise ConfigError(f"unknown pairing {pair_by!r}; use one of {', '.join(PAIR_MODES)}")
    if file_ending not in OUTPUT_ENDINGS:
        raise ConfigError(f"--file-ending {file_ending!r} is not supported; use one of {', '.join(OUTPUT_ENDINGS)}")
    images_dir, masks_dir, out = Path(images_dir), Path(masks_dir), Path(out)
    labels = label_table(value_map, label_names)
    pairs = pair_files(list_images(images_dir), list_images(masks_dir), pair_by, mask_suffix)

    if threshold is not None and not 0 < threshold <= 65535:
        raise ConfigError(f"--threshold {threshold}: must be a mask value in 1..65535 (128 for 0/255 masks)")
    found = mask_values(pairs, progress, threshold)
    full = effective_map(value_map)
    unmapped = sorted(v for v in found if v not in full)
    if unmapped and looks_lossy_binary(list(found)):
        raise DatasetError(f"{masks_dir}: mask values {min(found)}-{max(v for v in found if v < 128)} and "
                           f"{min(v for v in found if v >= 128)}-{max(found)} look like a 0/255 mask saved lossily "
                           f"(e.g. JPEG; {found[unmapped[0]].name}); use --threshold 128 instead of --map")
    if unmapped:
        raise DatasetError(f"{masks_dir}: mask values {unmapped[:10]} are not mapped (values found: "
                           f"{sorted(found)[:20]}; e.g. {found[unmapped[0]].name} holds {unmapped[0]}); map every "
                           f"value, e.g. {suggest_map(list(found))}")

    record = {"converter": "png-masks", "map": {str(k): v for k, v in sorted(full.items())}, "pair_by": pair_by,
              "mask_suffix": mask_suffix, **({"threshold": threshold} if threshold is not None else {})}
    record = prepare_output(out, [images_dir, masks_dir], record, "autoseg convert png-masks")
    out.mkdir(parents=True, exist_ok=True)

    first, _ = read_image(pairs[0][1])
    num_channels = first.shape[0]
    if channel_names is None:
        channel_names = ["image"] if num_channels == 1 else ["R", "G", "B"] if num_channels == 3 else []
    if len(channel_names) != num_channels:
        raise ConfigError(f"{pairs[0][1]}: images have {num_channels} channels but {len(channel_names)} channel "
                          f"name(s) were given; pass --channel-name once per channel")

    def write_meta() -> None:
        write_dataset_json(out, name=name or out.name, description=f"2D images from {images_dir} with masks from "
                           f"{masks_dir}, converted by autoseg convert png-masks", channel_names=list(channel_names),
                           labels=dict(labels), file_ending=file_ending, record=record)

    write_meta()
    written, skipped = [], []
    for done, (case_id, image_path, mask_path) in enumerate(pairs, start=1):
        if case_done(out, case_id, file_ending, num_channels):
            skipped.append(case_id)
        else:
            _convert_pair(case_id, image_path, mask_path, out, value_map, num_channels, file_ending, threshold)
            written.append(case_id)
        if progress is not None:
            progress(len(pairs) + done, 2 * len(pairs))
    write_meta()
    return ConvertSummary(out, tuple(written), tuple(skipped), (), (), dict(labels))


def _convert_pair(case_id: str, image_path: Path, mask_path: Path, out: Path, value_map: Mapping[int, int],
                  num_channels: int, file_ending: str, threshold: int | None) -> None:
    image, geometry = read_image(image_path)
    if image.shape[1] != 1:
        raise DatasetError(f"{image_path}: image is 3D ({image.shape[1]} slices); png-masks converts 2D images")
    if image.shape[0] != num_channels:
        raise DatasetError(f"{image_path}: {image.shape[0]} channel(s), the first image has {num_channels}; "
                           "store every image with the same channels")
    if file_ending == ".png" and image.dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"{image_path}: pixel type {image.dtype} cannot be stored as PNG; pass --file-ending .nii.gz")
    mask = _read_mask(mask_path, threshold)
    if mask.shape != image.shape[2:]:
        raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                           f"{image.shape[3]}x{image.shape[2]} (width x height); re-export the mask at the image size")
    try:
        label = apply_value_map(mask, value_map)
    except ValueError as exc:  # mask_values() checked every mask; a file changed since
        raise DatasetError(f"{mask_path}: {exc}; map every value with --map") from None
    for c in range(num_channels):
        write_image(out / "imagesTr" / f"{case_id}_{c:04d}{file_ending}", image[c], geometry)
    write_image(out / "labelsTr" / f"{case_id}{file_ending}", label[None], geometry)
