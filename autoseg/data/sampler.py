"""Patch sampling with foreground oversampling, as nnU-Net does it — pure numpy, no torch.

A batch is ``batch_size`` patches from cases drawn uniformly with replacement. The last
``batch_size - round(batch_size * (1 - oversample))`` patches of every batch are *forced*: centred on
a random voxel of a class drawn uniformly among the classes present in that case (nnU-Net v2's
``get_do_oversample``; with the default 0.33 a batch of 2 has 1 forced patch, a batch of 8 has 3).
The others are placed uniformly at random such that the *final* patch (after the spatial
augmentation crops its centre) can reach every border of the image.

Layouts, array order (z, y, x) after the plan's transpose:

* 3D: patches ``(C, pz, py, px)``.
* 2D: a slice along axis 0 (a forced patch takes the slice of its chosen voxel), patch ``(C, py, px)``.
* 2.5D (``context_slices = k > 0``): the slice and ``k`` neighbours on each side, stacked
  **offset-major** as channels — channel ``(o + k) * C + c`` holds channel ``c`` of slice ``z + o``
  — so the centre slice's channels sit in the middle. Neighbours beyond the volume repeat the edge
  slice. The label is the centre slice only. :func:`stack_context` is the one implementation;
  the predictor must build its input with it too.

Images smaller than the patch are padded with 0 (the mean after normalisation) and label 0.
"""

from __future__ import annotations

import copy

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from autoseg.errors import ConfigError, DatasetError


#: Parsed foreground locations kept per process, in bytes (see :class:`_LocationCache`).
LOCATION_CACHE_BYTES = 256 * 2**20


class Case:
    """One preprocessed training case: image, label map and foreground locations.

    Build one in memory with ``Case(case_id, image, seg, class_locations)`` or read one from a
    preprocessed folder with :meth:`from_folder`. A case from disk holds only its folder, id and
    shape: every access of :attr:`image` / :attr:`seg` opens a fresh read-only memory map (as
    nnU-Net does; ~0.1 ms), because a memory map keeps a file descriptor open and a dataset of
    600+ cases would otherwise exhaust the usual limit of 1024. Its locations are parsed on first
    use and kept in a per-process cache bounded by :data:`LOCATION_CACHE_BYTES`. It pickles as
    its folder and id, so worker processes never receive copies of the arrays.

    Args:
        case_id: the case identifier.
        image: ``(C, Z, Y, X)`` float32 normalised image (a memory map is fine).
        seg: ``(Z, Y, X)`` integer label map, 0 = background.
        class_locations: label -> ``(n, 3)`` voxel coordinates ``(z, y, x)`` of that label (a
            label absent from the case is absent or has no rows); default: computed from ``seg``.
        previous: a cascade stage's input: the previous stage's ``(Z, Y, X)`` label map on this
            case's grid (see :meth:`with_previous`); None otherwise.
        previous_values: the label values one-hot encoded from ``previous`` as extra input channels.

    Raises:
        DatasetError: the arrays' shapes do not fit together.
    """

    def __init__(
        self,
        case_id: str,
        image: np.ndarray,
        seg: np.ndarray,
        class_locations: Mapping[int, np.ndarray] | None = None,
        *,
        previous: np.ndarray | None = None,
        previous_values: Sequence[int] = (),
    ) -> None:
        _check_shapes(case_id, image, seg)
        self.case_id = case_id
        self._folder: Path | None = None
        self._image: np.ndarray | None = image
        self._seg: np.ndarray | None = seg
        self._previous: np.ndarray | None = previous
        self._previous_path: Path | None = None
        self.previous_values: tuple[int, ...] = tuple(int(v) for v in previous_values)
        if previous is not None:
            _check_shapes(case_id, image, previous)
        self._shape = tuple(int(v) for v in seg.shape)
        self._channels = int(image.shape[0])
        self._locations: dict[int, np.ndarray] | None = (
            locations_from_seg(seg) if class_locations is None
            else _locations_from_mapping(class_locations, f"case {case_id!r}")
        )

    @classmethod
    def from_folder(cls, folder: Path, case_id: str) -> Case:
        """A case in ``folder``: ``<case_id>.npy``, ``<case_id>_seg.npy`` and ``<case_id>.json``.

        Only the array headers are read here (shapes and dtypes are checked).

        Args:
            folder: ``WORK/preprocessed/<config>``.
            case_id: the case to open.

        Returns:
            A case whose arrays are opened as read-only memory maps on access.

        Raises:
            DatasetError: a file is missing or unreadable, or the shapes do not match.
        """
        case = cls.__new__(cls)
        case.case_id = case_id
        case._folder = Path(folder)
        case._image = case._seg = case._previous = None
        case._previous_path = None
        case.previous_values = ()
        case._locations = None
        image, seg = case.image, case.seg  # opened for the check only, closed on return
        _check_shapes(case_id, image, seg)
        case._shape = tuple(int(v) for v in seg.shape)
        case._channels = int(image.shape[0])
        if not case._path(".json").is_file():
            raise DatasetError(f"{case._path('.json')}: missing; re-run 'autoseg preprocess'")
        return case

    @property
    def image(self) -> np.ndarray:
        """``(C, Z, Y, X)`` float32 image."""
        return self._image if self._image is not None else _open_npy(self._path(".npy"))

    @property
    def seg(self) -> np.ndarray:
        """``(Z, Y, X)`` integer label map."""
        return self._seg if self._seg is not None else _open_npy(self._path("_seg.npy"))

    def with_previous(self, path: Path, values: Sequence[int]) -> Case:
        """This case as a cascade stage's input: ``path`` holds the previous stage's ``(Z, Y, X)``
        label map on this case's grid (an ``.npy``, memory-mapped on access like the image).

        Raises:
            DatasetError: the file is unreadable or its shape differs from the case's.
        """
        case = copy.copy(self)
        case._previous, case._previous_path = None, Path(path)
        case.previous_values = tuple(int(v) for v in values)
        _check_shapes(self.case_id, self.image, case.previous)  # type: ignore[arg-type]
        return case

    @property
    def previous(self) -> np.ndarray | None:
        """The previous stage's ``(Z, Y, X)`` label map (a cascade stage's input), or None."""
        if self._previous is not None:
            return self._previous
        return _open_npy(self._previous_path) if self._previous_path is not None else None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(Z, Y, X)``."""
        return self._shape  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Number of image channels ``C``."""
        return self._channels

    @property
    def class_locations(self) -> dict[int, np.ndarray]:
        """Label -> ``(n, 3)`` integer ``(z, y, x)`` voxels; only labels with at least one voxel."""
        if self._locations is not None:
            return self._locations
        return _LOCATIONS.get(self._path(".json"), self._shape)

    def _path(self, suffix: str) -> Path:
        if self._folder is None:
            raise RuntimeError("an in-memory case has no folder")  # unreachable: it has its arrays
        return self._folder / f"{self.case_id}{suffix}"

    def __repr__(self) -> str:
        where = f", folder={str(self._folder)!r}" if self._folder is not None else ""
        return f"Case({self.case_id!r}{where})"


class _LocationCache:
    """Parsed ``class_locations`` of cases on disk, least recently used dropped beyond a byte budget.

    Parsing a case's JSON costs ~1 ms per 10 000 voxels. Small datasets stay fully cached; a
    dataset with many classes and cases (TotalSegmentator: 117 classes × 10 000 voxels × 1 200
    cases would take 8 GB per process as int16) re-parses instead of exhausting memory.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[Path, tuple[dict[int, np.ndarray], int]] = OrderedDict()
        self._bytes = 0

    def get(self, path: Path, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
        hit = self._entries.get(path)
        if hit is not None:
            self._entries.move_to_end(path)
            return hit[0]
        locations = _read_locations(path, shape)
        size = sum(a.nbytes for a in locations.values())
        self._entries[path] = (locations, size)
        self._bytes += size
        while self._bytes > LOCATION_CACHE_BYTES and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
        return locations


_LOCATIONS = _LocationCache()


def _read_locations(path: Path, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); re-run 'autoseg preprocess'") from None
    raw = meta.get("class_locations") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: no 'class_locations' mapping; re-run 'autoseg preprocess'")
    locations = _locations_from_mapping(raw, str(path))
    bounds = np.asarray(shape)
    for label, coords in locations.items():
        if (coords < 0).any() or (coords >= bounds).any():
            raise DatasetError(f"{path}: class {label} has locations outside the image shape "
                               f"{tuple(shape)}; re-run 'autoseg preprocess'")
    # int16 holds any index below 32 768 voxels per axis: a quarter of int64's memory.
    dtype = np.int16 if max(shape) < 2**15 else np.int32
    return {label: coords.astype(dtype) for label, coords in locations.items()}


def load_cases(folder: Path, case_ids: Sequence[str] | None = None) -> list[Case]:
    """Open the preprocessed cases of one configuration.

    Args:
        folder: ``WORK/preprocessed/<config>``.
        case_ids: which cases (e.g. one fold's training split); default every ``<case>.json``
            there that has a ``<case>.npy`` beside it.

    Returns:
        The cases, in the order given (sorted ids by default).

    Raises:
        DatasetError: the folder or a case's files are missing or inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: preprocessed folder not found; run 'autoseg preprocess' first")
    if case_ids is None:
        case_ids = sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".npy").is_file())
    if not case_ids:
        raise DatasetError(f"{folder}: no preprocessed cases; run 'autoseg preprocess' first")
    return [Case.from_folder(folder, case_id) for case_id in case_ids]


def locations_from_seg(seg: np.ndarray, max_per_class: int = 10_000, seed: int = 1234) -> dict[int, np.ndarray]:
    """Foreground locations of a label map (for in-memory cases and tests).

    Args:
        seg: ``(Z, Y, X)`` label map.
        max_per_class: keep at most this many voxels per label (10 000, as the preprocessor).
        seed: seed of the subsampling, so the result is deterministic.

    Returns:
        Label -> ``(n, 3)`` int64 coordinates, for every label > 0 present.
    """
    rng = np.random.default_rng(seed)
    seg = np.asarray(seg)
    out: dict[int, np.ndarray] = {}
    for label in np.unique(seg):
        if label <= 0:
            continue
        coords = np.argwhere(seg == label)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[int(label)] = coords.astype(np.int64)
    return out


class PatchBatch(NamedTuple):
    """One sampled batch, before augmentation.

    Attributes:
        image: ``(B, C', *patch)`` float32; ``C' = C * (2k + 1)`` for 2.5D.
        seg: ``(B, 1, *patch)`` int16.
        case_ids: the case of every patch.
        forced_class: the label a forced patch is centred on; ``None`` for a random patch or a
            forced one whose case has no foreground.
        previous: ``(B, 1, *patch)`` int16 previous stage's labels (cascade cases), else None.
    """

    image: np.ndarray
    seg: np.ndarray
    case_ids: tuple[str, ...]
    forced_class: tuple[int | None, ...]
    previous: np.ndarray | None = None


def num_forced(batch_size: int, oversample: float) -> int:
    """How many patches of a batch are forced to foreground (nnU-Net v2's rule).

    Sample ``i`` is forced when ``i >= round(batch_size * (1 - oversample))`` (Python's round, as
    nnU-Net): 0.33 gives 1 of 2, 1 of 3, 2 of 4, 3 of 8, 4 of 12.
    """
    return batch_size - round(batch_size * (1 - oversample))


def sample_batch(
    cases: Sequence[Case],
    patch_size: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    oversample: float = 0.33,
    *,
    final_patch_size: Sequence[int] | None = None,
    context_slices: int = 0,
) -> PatchBatch:
    """Sample a batch of patches.

    Args:
        cases: the cases to draw from (uniformly, with replacement).
        patch_size: size to crop, 3 values (3D) or 2 (2D/2.5D). With spatial augmentation this is
            the enlarged *initial* patch from which the transform takes the final patch's centre.
        batch_size: patches per batch.
        rng: the only source of randomness (reproducible given its seed).
        oversample: fraction of forced-foreground patches (0.33 = nnU-Net's default).
        final_patch_size: the network's patch; random positions are bounded so that *it* can
            reach every image border (default: ``patch_size``).
        context_slices: 2.5D: neighbours on each side stacked as channels (2D patches only).

    Returns:
        The batch; see :class:`PatchBatch`.

    Raises:
        ConfigError: an option is out of range.
        DatasetError: the cases' channel counts differ, or a case's files cannot be read.
    """
    patch = tuple(int(p) for p in patch_size)
    final = patch if final_patch_size is None else tuple(int(p) for p in final_patch_size)
    check_sampling_options(cases, patch, final, batch_size, oversample, context_slices)
    dims = len(patch)
    channels = cases[0].channels * (2 * context_slices + 1)
    image = np.zeros((batch_size, channels, *patch), dtype=np.float32)
    seg = np.zeros((batch_size, 1, *patch), dtype=np.int16)
    previous = np.zeros((batch_size, 1, *patch), dtype=np.int16) if cases[0].previous is not None else None
    first_forced = batch_size - num_forced(batch_size, oversample)
    case_ids: list[str] = []
    forced: list[int | None] = []
    for i, case_index in enumerate(rng.integers(len(cases), size=batch_size)):
        case = cases[int(case_index)]
        label, voxel = _pick_foreground(case, rng) if i >= first_forced else (None, None)
        shape, case_image, case_seg = case.shape, case.image, case.seg  # one memory map each
        if case_image.shape[0] * (2 * context_slices + 1) != channels:
            raise DatasetError(f"case {case.case_id!r} has {case_image.shape[0]} channel(s), "
                               f"case {cases[0].case_id!r} {cases[0].channels}; re-run 'autoseg preprocess'")
        case_previous = case.previous if previous is not None else None
        if previous is not None and case_previous is None:
            raise DatasetError(f"case {case.case_id!r} has no previous stage's segmentation, case "
                               f"{cases[0].case_id!r} has; re-run the cascade's training")
        if dims == 3:
            start = _patch_start(shape, patch, final, voxel, rng)
            image[i] = crop_padded(case_image, start, patch)
            seg[i, 0] = crop_padded(case_seg, start, patch)
            if previous is not None:
                previous[i, 0] = crop_padded(case_previous, start, patch)
        else:
            z = int(voxel[0]) if voxel is not None else int(rng.integers(shape[0]))
            start = _patch_start(shape[1:], patch, final, None if voxel is None else voxel[1:], rng)
            image[i] = stack_context(case_image, z, context_slices, start, patch)
            seg[i, 0] = crop_padded(case_seg[z], start, patch)
            if previous is not None:
                previous[i, 0] = crop_padded(case_previous[z], start, patch)
        case_ids.append(case.case_id)
        forced.append(label)
    return PatchBatch(image, seg, tuple(case_ids), tuple(forced), previous)


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop the last ``len(size)`` axes at ``start`` (may be negative or run past the end), padding with 0.

    Only the part inside the array is read, so a memory map stays cheap.

    Args:
        array: ``(..., *spatial)``.
        start: first index of the crop per spatial axis.
        size: crop size per spatial axis.

    Returns:
        A new ``(..., *size)`` array of ``array``'s dtype.
    """
    lead = array.shape[: array.ndim - len(size)]
    out = np.zeros((*lead, *size), dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape[len(lead):]):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    ellipsis = (Ellipsis,)
    out[ellipsis + tuple(dst)] = array[ellipsis + tuple(src)]
    return out


def context_indices(z: int, depth: int, context_slices: int) -> np.ndarray:
    """Slice indices ``z - k .. z + k``, clipped to ``[0, depth - 1]`` (edge replication)."""
    return np.clip(np.arange(z - context_slices, z + context_slices + 1), 0, depth - 1)


def stack_context(
    image: np.ndarray,
    z: int,
    context_slices: int,
    start: Sequence[int] | None = None,
    size: Sequence[int] | None = None,
) -> np.ndarray:
    """The 2.5D input of slice ``z``: slices ``z - k .. z + k`` stacked offset-major as channels.

    Channel ``(o + k) * C + c`` is channel ``c`` of slice ``z + o`` (the centre slice's channels in
    the middle); slices beyond the volume repeat the edge slice. ``k = 0`` gives the plain 2D slice.

    Args:
        image: ``(C, Z, Y, X)``.
        z: centre slice.
        context_slices: ``k``.
        start, size: optional in-plane crop (as :func:`crop_padded`); default the whole slice.

    Returns:
        ``(C * (2k + 1), Y', X')`` array of ``image``'s dtype.
    """
    channels, depth = image.shape[0], image.shape[1]
    # Crop in-plane before gathering slices, so only the patch is read from a memory map.
    if start is None or size is None:
        start, size = (0, 0), image.shape[2:]
    # Unique slices only (edge replication repeats some), then expand: one fancy read per patch.
    indices = context_indices(z, depth, context_slices)
    unique, inverse = np.unique(indices, return_inverse=True)
    planes = crop_padded(image[:, unique], start, size)  # (C, U, y, x)
    stacked = planes[:, inverse]  # (C, 2k+1, y, x)
    return np.ascontiguousarray(stacked.transpose(1, 0, 2, 3)).reshape(channels * len(indices), *size)


# ----------------------------------------------------------------------------------------------


def _pick_foreground(case: Case, rng: np.random.Generator) -> tuple[int | None, np.ndarray | None]:
    # A class uniformly among those present, then a voxel uniformly among its stored locations
    # (nnU-Net v2). Picking the voxel directly also gives a 2D patch's slice the right weight.
    present = sorted(label for label, coords in case.class_locations.items() if len(coords))
    if not present:
        return None, None  # no foreground in this case: nnU-Net falls back to a random patch
    label = present[int(rng.integers(len(present)))]
    coords = case.class_locations[label]
    return label, coords[int(rng.integers(len(coords)))]


def _patch_start(
    shape: Sequence[int],
    patch: Sequence[int],
    final: Sequence[int],
    voxel: np.ndarray | None,
    rng: np.random.Generator,
) -> list[int]:
    """First index of the (initial) patch per axis, nnU-Net v2's bounds.

    ``need`` is the margin the enlarged patch adds around the final one, grown if the image is
    smaller than the patch; the patch may start ``need // 2`` before the image and end
    ``need - need // 2`` after it, so the final patch's centre ranges over the whole image.
    """
    starts = []
    for axis, (dim, p, f) in enumerate(zip(shape, patch, final)):
        need = max(p - f, p - dim, 0)
        low, high = -(need // 2), dim + need // 2 + need % 2 - p
        if voxel is None:
            starts.append(int(rng.integers(low, high + 1)))
        else:
            # Centred on the voxel, clamped to the same bounds (nnU-Net clamps only the lower
            # side). Clamping keeps the final patch inside the image where it fits, and the voxel
            # still lies inside the final patch: at the upper bound the final patch ends at the
            # image's last voxel, at the lower bound it starts at voxel 0.
            starts.append(int(min(max(int(voxel[axis]) - p // 2, low), high)))
    return starts


def check_sampling_options(
    cases: Sequence[Case],
    patch: tuple[int, ...],
    final: tuple[int, ...],
    batch_size: int,
    oversample: float,
    context_slices: int,
) -> None:
    """Validate :func:`sample_batch`'s options (also called up front by the loader).

    Raises:
        ConfigError: naming the option, its value and the valid range.
    """
    if not cases:
        raise ConfigError("no cases to sample from; check the split and the preprocessed folder")
    if len(patch) not in (2, 3) or len(final) != len(patch):
        raise ConfigError(f"patch_size must have 2 or 3 values (and final_patch_size as many), "
                          f"got {list(patch)} and {list(final)}")
    if any(p < 1 for p in patch) or any(f < 1 or f > p for f, p in zip(final, patch)):
        raise ConfigError(f"patch sizes must be positive with final_patch_size {list(final)} "
                          f"<= patch_size {list(patch)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    if not 0.0 <= oversample <= 1.0:
        raise ConfigError(f"oversample must be a fraction in [0, 1], not {oversample}")
    if context_slices < 0 or (context_slices and len(patch) != 2):
        raise ConfigError(f"context_slices must be >= 0 and only used with 2D patches, got {context_slices} "
                          f"with a {len(patch)}D patch")


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); re-run 'autoseg preprocess'") from None


def _check_shapes(case_id: str, image: np.ndarray, seg: np.ndarray) -> None:
    if image.ndim != 4 or seg.ndim != 3 or tuple(image.shape[1:]) != tuple(seg.shape):
        raise DatasetError(f"case {case_id!r}: image {tuple(image.shape)} must be (C, Z, Y, X) and seg "
                           f"{tuple(seg.shape)} (Z, Y, X) with the same spatial shape")
    if not np.issubdtype(seg.dtype, np.integer):
        raise DatasetError(f"case {case_id!r}: seg must be an integer label map, got {seg.dtype}")


def _locations_from_mapping(raw: Mapping[Any, Any], where: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for key, coords in raw.items():
        try:
            label = int(key)
            array = np.asarray(coords if coords is not None else [], dtype=np.int64).reshape(-1, 3)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: class_locations[{key!r}] must be a list of [z, y, x] voxels") from None
        if label <= 0:
            continue  # background locations are never used for oversampling
        if len(array):
            out[label] = array
    return out


__all__ = [
    "LOCATION_CACHE_BYTES", "Case", "PatchBatch", "check_sampling_options", "context_indices", "crop_padded",
    "load_cases", "locations_from_seg", "num_forced", "sample_batch", "stack_context",
]
