"""Overlay pictures: image slices with the reference and the predicted contours, as PNG.

Layers (STYLE §2): :func:`axial_axis` and :func:`pick_slices` (pure, numpy), :func:`render_overlay`
(arrays -> PNG file), :func:`write_case_overlay` (image, reference and prediction files -> PNG).
matplotlib is imported inside the functions, with its non-interactive ``Agg`` backend, so that
importing this module costs nothing and no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.imageio import Geometry

#: Contour colours: reference and prediction (distinguishable with the common colour-vision deficiencies).
REFERENCE_COLOR = "#00d0ff"
PREDICTION_COLOR = "#ff9f00"
#: Slices per picture.
DEFAULT_SLICES = 3


def axial_axis(geometry: Geometry) -> int:
    """The array axis (of ``(Z, Y, X)``) closest to the patient's head-feet direction.

    Slicing across it gives axial slices. ITK's direction matrix is row-major with one column per
    index axis ``(x, y, z)``; the third row is the world (LPS) S component of each axis.
    """
    if geometry.ndim != 3 or len(geometry.direction) != 9:
        return 0
    s_component = [abs(geometry.direction[6 + itk_axis]) for itk_axis in range(3)]
    itk_axis = int(np.argmax(s_component))
    return 2 - itk_axis  # array order (z, y, x) is ITK's (x, y, z) reversed


def pick_slices(reference: np.ndarray, prediction: np.ndarray, axis: int, count: int = DEFAULT_SLICES) -> list[int]:
    """Slice indices along ``axis`` through the structure, in ascending order.

    The slices split the reference's foreground voxels into ``count + 1`` equal parts (so they
    go through the bulk of the structure, not its tips); with an empty reference the prediction's
    foreground decides, and with both empty the middle slice is shown.

    Args:
        reference, prediction: label maps ``(Z, Y, X)``.
        axis: the axis to slice across.
        count: how many slices (fewer when the structure spans fewer).
    """
    for labels in (reference, prediction):
        per_slice = np.moveaxis(labels > 0, axis, 0).reshape(labels.shape[axis], -1).sum(axis=1)
        total = int(per_slice.sum())
        if total:
            cumulative = np.cumsum(per_slice)
            targets = [total * (i + 1) / (count + 1) for i in range(count)]
            return sorted({int(np.searchsorted(cumulative, t)) for t in targets})
    return [reference.shape[axis] // 2]


def _in_plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    # 0.5-99.5 percentiles: robust to the few bright voxels MRI often has.
    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1.0)


def render_overlay(path: Path, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, *,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 0,
                   slices: Sequence[int] | None = None, title: str = "") -> list[int]:
    """Write a PNG: one panel per slice, the image in gray, reference and predicted contours.

    Args:
        path: the PNG file (written atomically).
        image: intensities ``(Z, Y, X)``.
        reference, prediction: label maps ``(Z, Y, X)`` on the image's grid; every nonzero label
            is outlined (the reference in :data:`REFERENCE_COLOR`, the prediction in
            :data:`PREDICTION_COLOR`).
        spacing: voxel size in mm ``(z, y, x)``, for the aspect ratio of each panel.
        axis: the axis to slice across (see :func:`axial_axis`).
        slices: slice indices (default: :func:`pick_slices`).
        title: the figure's title.

    Returns:
        The slice indices drawn.

    Raises:
        ValueError: the three volumes do not have the same shape (a bug in the caller).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not image.shape == reference.shape == prediction.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape}, reference {reference.shape} and prediction {prediction.shape} "
                         "must be 3D volumes of one shape")
    chosen = list(slices) if slices is not None else pick_slices(reference, prediction, axis)
    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    aspect = float(spacing[rows_axis]) / float(spacing[cols_axis])
    low, high = _display_range(image)
    values = sorted({int(v) for v in np.unique(reference) if v} | {int(v) for v in np.unique(prediction) if v})
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.8), squeeze=False)
    for ax, index in zip(axes[0], chosen):
        ax.imshow(_in_plane(image, axis, index), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                  interpolation="nearest")
        for labels, color in ((reference, REFERENCE_COLOR), (prediction, PREDICTION_COLOR)):
            plane = _in_plane(labels, axis, index)
            for value in values:
                mask = plane == value
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"slice {index}", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color=REFERENCE_COLOR, lw=2, label="reference"),
               Line2D([], [], color=PREDICTION_COLOR, lw=2, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return chosen


def write_case_overlay(path: Path, image_file: Path, reference_file: Path, prediction_file: Path,
                       title: str = "") -> list[int]:
    """Read one case's image (first channel), reference and prediction; write its axial overlay PNG.

    Raises:
        DatasetError: a file cannot be read, or the three are not on one grid.
    """
    from autoseg.errors import DatasetError
    from autoseg.imageio import read_image

    image, geometry = read_image(Path(image_file))
    reference, _ = read_image(Path(reference_file))
    prediction, _ = read_image(Path(prediction_file))
    if not image.shape[1:] == reference.shape[1:] == prediction.shape[1:]:
        raise DatasetError(f"{prediction_file}: shape {prediction.shape[1:]} differs from the image "
                           f"{image.shape[1:]} or the reference {reference.shape[1:]}; predict this image again")
    return render_overlay(path, image[0].astype(np.float32), reference[0], prediction[0], spacing=geometry.spacing,
                          axis=axial_axis(geometry), title=title)
