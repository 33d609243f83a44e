"""Dataset fingerprint: per-case statistics (pure), pooled into a deterministic summary.

What is measured follows nnU-Net v2 (DESIGN §5): spacing; shape before and after cropping to the
nonzero region; relative size after the crop; per channel, foreground intensity statistics from
seeded sampling; plus per-class voxel counts and presence, and orientation.

Intensity pooling. nnU-Net draws the same number of foreground samples from every case *with
replacement* (≈1e8 in total) and pools them, so every case weighs the same. Shipping those
replicated samples between processes is most of its fingerprint time. Here each case contributes
at most its quota of *distinct* foreground voxels, and every case gets the same total weight in the
pooled statistics — the distribution nnU-Net's pool estimates, without the replication noise.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.regions import num_outputs

SCHEMA_VERSION = 1
#: Foreground intensity samples in total across cases (nnU-Net v2: 10e7).
TOTAL_INTENSITY_SAMPLES = 100_000_000
#: Base seed of the per-case sampling; each case adds a stable hash of its id.
SAMPLING_SEED = 1234
PERCENTILES = (0.5, 50.0, 99.5)


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel."""

    mean: float
    std: float
    min: float
    max: float
    p00_5: float
    p50: float
    p99_5: float
    n: int


@dataclass(frozen=True)
class CaseRecord:
    """The fingerprint of one case. Shapes and spacing are in array order (z, y, x)."""

    case_id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    shape_after_crop: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]
    relative_size_after_crop: float
    orientation: str
    class_voxels: dict[str, int]
    intensity: tuple[IntensityStats, ...]


@dataclass(frozen=True)
class Fingerprint:
    """A dataset's fingerprint; the planner's only input besides the preset.

    Attributes:
        dims: 2 for 2D datasets (arrays carry a singleton first axis), else 3.
        channel_names: as declared in dataset.json, by channel index.
        labels: declared labels as ``{name: [values]}``, background first.
        cases: per-case records, sorted by case id.
        intensity: pooled foreground statistics per channel.
        files_sha256: checksum of the dataset's file list (relative paths and sizes) and dataset.json.
        task: dataset.json's task (:mod:`autoseg.dataset.kinds`). A restoration dataset has no
            labels: its intensity statistics come from the input's body voxels
            (:func:`autoseg.dataset.restoration.body_mask`) and ``class_voxels`` are empty.
        upsample_factor: super-resolution only: the integer refinement from every input's grid to its
            target's, array order (z, y, x); the cases' spacing and shapes are then the targets'
            (:mod:`autoseg.dataset.super_resolution`). None (and not written) for other tasks.
    """

    dataset_name: str
    dims: int
    channel_names: tuple[str, ...]
    labels: dict[str, list[int]]
    cases: tuple[CaseRecord, ...]
    intensity: tuple[IntensityStats, ...]
    files_sha256: str = ""
    schema_version: int = SCHEMA_VERSION
    summary: dict[str, Any] = field(default_factory=dict, compare=False)
    task: str = "segmentation"
    upsample_factor: tuple[int, int, int] | None = None

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)

    @property
    def median_relative_size_after_crop(self) -> float:
        return float(np.median([c.relative_size_after_crop for c in self.cases]))

    @property
    def num_classes(self) -> int:
        """Output channels of the network: every declared label (background included), or,
        region-based, one sigmoid output per label except background (:mod:`autoseg.regions`)."""
        return num_outputs(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "dataset_name": self.dataset_name,
            "dims": self.dims,
            "channel_names": list(self.channel_names),
            "labels": {k: list(v) for k, v in self.labels.items()},
            "files_sha256": self.files_sha256,
            "summary": self.summary or summarize(self),
            "intensity": [asdict(s) for s in self.intensity],
            "cases": [_case_to_dict(c) for c in self.cases],
        }
        if self.task != "segmentation":
            # Only written for other tasks: a segmentation fingerprint (and the digest plans record
            # of it) stays byte-identical to before tasks existed.
            data = {"task": self.task, **data}
        if self.upsample_factor is not None:
            data = {"task": self.task, "upsample_factor": list(self.upsample_factor),
                    **{k: v for k, v in data.items() if k != "task"}}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        cases = tuple(
            CaseRecord(
                case_id=c["case_id"],
                spacing=tuple(c["spacing"]),
                shape=tuple(c["shape"]),
                shape_after_crop=tuple(c["shape_after_crop"]),
                bbox=tuple(tuple(b) for b in c["bbox"]),
                relative_size_after_crop=c["relative_size_after_crop"],
                orientation=c["orientation"],
                class_voxels=dict(c["class_voxels"]),
                intensity=tuple(IntensityStats(**s) for s in c["intensity"]),
            )
            for c in data["cases"]
        )
        return cls(
            dataset_name=data["dataset_name"],
            dims=int(data["dims"]),
            channel_names=tuple(data["channel_names"]),
            labels={k: list(v) for k, v in data["labels"].items()},
            cases=cases,
            intensity=tuple(IntensityStats(**s) for s in data["intensity"]),
            files_sha256=data.get("files_sha256", ""),
            schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            summary=data.get("summary", {}),
            task=str(data.get("task", "segmentation")),
            upsample_factor=tuple(int(k) for k in data["upsample_factor"]) if data.get("upsample_factor") else None,
        )


def _case_to_dict(case: CaseRecord) -> dict[str, Any]:
    data = asdict(case)
    data["spacing"] = list(case.spacing)
    data["shape"] = list(case.shape)
    data["shape_after_crop"] = list(case.shape_after_crop)
    data["bbox"] = [list(b) for b in case.bbox]
    return data


# ----------------------------------------------------------------------------------------------
# Per case (pure)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (nnU-Net's crop mask). ``image``: (C, Z, Y, X)."""
    mask = image[0] != 0
    for channel in image[1:]:
        mask |= channel != 0
    return ndimage.binary_fill_holes(mask)


#: Voxels of an image looked at a time by :func:`nonzero_box` (2^24: a 16 MB boolean slab).
NONZERO_SLAB_VOXELS = 2**24


def nonzero_box(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``bbox_of(nonzero_mask(image))`` without filling holes or holding a whole-volume mask.

    Filling holes cannot grow the box: a filled voxel lies in a background component that does not
    reach the array's border, and a voxel outside the box along some axis is joined to the border
    through the plane beyond the box, which is all background. So the box of the voxels where any
    channel is nonzero is the crop box; it is found slab by slab along axis 0 (a 512x512x400 CT:
    no 105 MB mask and no hole filling, which took 0.5 s of the prediction of a 512x512x150 CT).

    Args:
        image: ``(C, Z, Y, X)``.

    Returns:
        Half-open ``((z0, z1), (y0, y1), (x0, x1))``; the whole array when no voxel is nonzero.
    """
    spatial = image.shape[1:]
    hits = [np.zeros(size, dtype=bool) for size in spatial]
    plane = max(1, int(np.prod(spatial[1:], dtype=np.int64)) * image.shape[0])
    step = max(1, NONZERO_SLAB_VOXELS // plane)
    for start in range(0, spatial[0], step):
        slab = image[0, start:start + step] != 0
        for channel in image[1:]:
            slab |= channel[start:start + step] != 0
        for axis in range(slab.ndim):
            found = slab.any(axis=tuple(a for a in range(slab.ndim) if a != axis))
            if axis == 0:
                hits[0][start:start + step] = found
            else:
                hits[axis] |= found
    box = []
    for axis, found in enumerate(hits):
        index = np.flatnonzero(found)
        box.append((int(index[0]), int(index[-1]) + 1) if index.size else (0, spatial[axis]))
    return tuple(box)


def bbox_of(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open bounding box ``((z0, z1), (y0, y1), (x0, x1))`` of a mask; the whole array if empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)


def orientation_code(direction: tuple[float, ...]) -> str:
    """Axis codes (nibabel style, the way each ITK axis points) for a direction matrix, e.g. ``"RAS"``.

    ITK's physical space is LPS: +x = Left, +y = Posterior, +z = Superior.
    """
    dim = int(round(len(direction) ** 0.5))
    matrix = np.array(direction, dtype=np.float64).reshape(dim, dim)
    positive, negative = "LPS", "RAI"
    code = []
    for axis in range(dim):
        column = matrix[:, axis]
        dominant = int(np.argmax(np.abs(column)))
        code.append(positive[dominant] if column[dominant] > 0 else negative[dominant])
    return "".join(code)


def case_seed(case_id: str) -> int:
    """A seed that depends only on the case id (stable across runs, workers and platforms)."""
    return (SAMPLING_SEED + zlib.crc32(case_id.encode("utf-8"))) % (2**32)


def sample_foreground(
    image: np.ndarray, foreground: np.ndarray, quota: int, seed: int
) -> tuple[list[np.ndarray], list[IntensityStats]]:
    """Per channel: up to ``quota`` distinct foreground voxels (seeded) and full-foreground stats."""
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    stats: list[IntensityStats] = []
    n_fg = int(np.count_nonzero(foreground))
    pick = None
    if n_fg > quota:
        pick = np.sort(rng.choice(n_fg, size=quota, replace=False))
    for channel in image:
        values = channel[foreground].astype(np.float64)
        stats.append(_stats(values, np.ones(0)))
        chosen = values if pick is None else values[pick]
        samples.append(chosen.astype(np.float32))
    return samples, stats


def _stats(values: np.ndarray, weights: np.ndarray) -> IntensityStats:
    """Mean, std, min, max and percentiles, optionally weighted (``weights`` empty = unweighted)."""
    if values.size == 0:
        nan = float("nan")
        return IntensityStats(nan, nan, nan, nan, nan, nan, nan, 0)
    if weights.size == 0:
        p = np.percentile(values, PERCENTILES)
        return IntensityStats(float(values.mean()), float(values.std()), float(values.min()), float(values.max()),
                              float(p[0]), float(p[1]), float(p[2]), int(values.size))
    total = weights.sum()
    mean = float(np.dot(weights, values) / total)
    std = float(np.sqrt(max(np.dot(weights, (values - mean) ** 2) / total, 0.0)))
    order = np.argsort(values, kind="stable")
    sorted_values, cum = values[order], np.cumsum(weights[order])
    # Weighted percentile: the first value whose cumulative weight reaches the fraction (inverted CDF).
    ps = [float(sorted_values[min(np.searchsorted(cum, q / 100.0 * cum[-1]), values.size - 1)]) for q in PERCENTILES]
    return IntensityStats(mean, std, float(values.min()), float(values.max()), ps[0], ps[1], ps[2], int(values.size))


def case_fingerprint(
    case_id: str,
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, float, float],
    direction: tuple[float, ...],
    label_values: list[int],
    quota: int,
) -> tuple[CaseRecord, list[np.ndarray]]:
    """Fingerprint one case from its arrays.

    Args:
        image: ``(C, Z, Y, X)`` image.
        label: ``(Z, Y, X)`` integer label map on the image grid.
        label_values: the declared single label values (background included).
        quota: foreground voxels to keep per channel for the pooled statistics.

    Returns:
        The case record and, per channel, the sampled foreground intensities.
    """
    box = nonzero_box(image)  # bbox_of(nonzero_mask(image)), without the hole filling
    shape = tuple(int(s) for s in image.shape[1:])
    cropped = tuple(b1 - b0 for b0, b1 in box)
    counts = np.bincount(label.ravel().astype(np.int64, copy=False), minlength=max(label_values) + 1)
    class_voxels = {str(v): int(counts[v]) for v in label_values if v > 0}
    samples, stats = sample_foreground(image, label > 0, quota, case_seed(case_id))
    record = CaseRecord(
        case_id=case_id,
        # NIfTI stores spacing as float32 (0.7 reads as 0.699999988): 7 significant digits undo that.
        spacing=tuple(float(f"{s:.7g}") for s in spacing),
        shape=shape,
        shape_after_crop=cropped,
        bbox=box,
        relative_size_after_crop=float(np.prod(cropped, dtype=np.float64) / np.prod(shape, dtype=np.float64)),
        orientation=orientation_code(direction),
        class_voxels=class_voxels,
        intensity=tuple(stats),
    )
    return record, samples


# ----------------------------------------------------------------------------------------------
# Pooling (pure)


def pool_intensities(samples_per_case: list[list[np.ndarray]], num_channels: int) -> tuple[IntensityStats, ...]:
    """Pooled statistics per channel, every case weighing the same (cases in a fixed order)."""
    pooled = []
    for channel in range(num_channels):
        chunks = [s[channel] for s in samples_per_case if s[channel].size]
        if not chunks:
            pooled.append(_stats(np.zeros(0), np.zeros(0)))
            continue
        pooled.append(_pooled_stats(chunks))
    return tuple(pooled)


def _pooled_stats(chunks: list[np.ndarray]) -> IntensityStats:
    """``_stats(values, weights)`` of the concatenated samples, each sample weighing ``1 / its
    case's count``, with the same float64 arithmetic in about half the memory.

    ``_stats`` held the float64 values and weights, their sort order and both sorted copies at
    once: 48 bytes a sample; ``autoseg plan`` of 1000 512x512 2D images (37 000 foreground
    samples each, 37 M in all) peaked at 2.04 GB. Here the mean and spread are taken first
    (values, weights and the squared deviations: 24 bytes a sample), then those are dropped and
    the percentiles come from the samples' stable sort order (the float64 copies' order: the
    conversion is exact) and the weights looked up per case in that order (28 bytes a sample at
    most): the same plan peaked at 1.32 GB, with an identical fingerprint.
    """
    sizes = np.array([c.size for c in chunks], dtype=np.int64)
    values = np.concatenate(chunks).astype(np.float64)
    weights = np.repeat(1.0 / sizes, sizes)  # 1.0 / size per sample, as np.full(size, 1.0 / size)
    total = weights.sum()
    mean = float(np.dot(weights, values) / total)
    squares = values - mean
    squares *= squares  # (values - mean) ** 2, in place
    std = float(np.sqrt(max(np.dot(weights, squares) / total, 0.0)))
    lowest, highest, count = float(values.min()), float(values.max()), int(values.size)
    del values, weights, squares
    samples = np.concatenate(chunks)  # the scan keeps float32 samples
    order = np.argsort(samples, kind="stable")
    sorted_values = samples[order]
    del samples
    case_of = np.repeat(np.arange(len(chunks), dtype=np.int32 if len(chunks) < 2**31 else np.int64), sizes)
    cum = (1.0 / sizes)[case_of[order]]
    del case_of, order
    np.cumsum(cum, out=cum)
    # Weighted percentile: the first value whose cumulative weight reaches the fraction (inverted CDF).
    ps = [float(sorted_values[min(np.searchsorted(cum, q / 100.0 * cum[-1]), count - 1)]) for q in PERCENTILES]
    return IntensityStats(mean, std, lowest, highest, ps[0], ps[1], ps[2], count)


def summarize(fp: Fingerprint) -> dict[str, Any]:
    """Human-facing summary: medians and ranges, per-class presence. Deterministic."""
    if not fp.cases:
        return {}
    spacings, shapes = fp.spacings, fp.shapes_after_crop
    classes = {}
    for name, values in fp.labels.items():
        if len(values) != 1 or values[0] == 0:
            continue
        counts = [c.class_voxels.get(str(values[0]), 0) for c in fp.cases]
        classes[name] = {
            "value": values[0],
            "cases_present": int(sum(1 for n in counts if n > 0)),
            "median_voxels": float(np.median(counts)),
        }
    orientations: dict[str, int] = {}
    for c in fp.cases:
        orientations[c.orientation] = orientations.get(c.orientation, 0) + 1
    return {
        "num_cases": fp.num_cases,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "min_spacing": [float(v) for v in spacings.min(axis=0)],
        "max_spacing": [float(v) for v in spacings.max(axis=0)],
        "median_shape_after_crop": [float(v) for v in np.median(shapes, axis=0)],
        "min_shape_after_crop": [int(v) for v in shapes.min(axis=0)],
        "max_shape_after_crop": [int(v) for v in shapes.max(axis=0)],
        "median_relative_size_after_crop": fp.median_relative_size_after_crop,
        "classes": classes,
        "orientations": dict(sorted(orientations.items())),
    }


def samples_quota(num_cases: int) -> int:
    """Foreground samples kept per case and channel."""
    return max(1, TOTAL_INTENSITY_SAMPLES // max(num_cases, 1))
