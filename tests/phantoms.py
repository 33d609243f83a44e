"""Tiny synthetic datasets for tests: ellipsoid phantoms written through :mod:`autoseg.imageio`.

Every image is an ellipsoid with two classes — a core (label 2) inside a shell (label 1) — plus
Gaussian noise, at 12×16×14 voxels (z, y, x) by default, so a whole dataset writes and reads in
milliseconds. Images are written with :func:`autoseg.imageio.write_image` (4D MSD files through
SimpleITK's ``JoinSeries``, the one case ``write_image`` does not cover), so tests exercise the real
reader. Import as ``import phantoms`` (pytest puts ``tests/`` on ``sys.path``).

Axis conventions are autoseg's: arrays and ``spacing`` in ``(z, y, x)``; ``origin`` and
``direction`` in ITK order ``(x, y, z)``, direction cosines row-major.

Typical use::

    cases = phantoms.write_nnunet_dataset(tmp_path / "raw", n_cases=3)
    phantoms.edit_dataset_json(tmp_path / "raw", numTraining=7)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.imageio import Geometry, write_image

#: Default phantom size, array order (z, y, x).
SHAPE_3D: tuple[int, int, int] = (12, 16, 14)
#: Default 2D phantom size, array order (y, x).
SHAPE_2D: tuple[int, int] = (16, 18)
#: Default voxel spacing in mm, (z, y, x): anisotropic, as most clinical data is.
SPACING_3D: tuple[float, float, float] = (3.0, 0.8, 0.8)
#: Labels of the phantom: background 0, shell 1, core 2.
LABELS: dict[str, int] = {"background": 0, "shell": 1, "core": 2}


def geometry(
    spacing: Sequence[float] = SPACING_3D,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
) -> Geometry:
    """A :class:`Geometry` from a spacing in (z, y, x) (2 values for a 2D image, (y, x)).

    Args:
        spacing: voxel size in mm, array order; 3 values → 3D, 2 values → 2D.
        origin: ITK order (x, y[, z]); default all zeros.
        direction: row-major direction cosines; default identity.
    """
    ndim = len(spacing)
    if ndim == 2:
        zyx = (999.0, float(spacing[0]), float(spacing[1]))
    elif ndim == 3:
        zyx = tuple(float(s) for s in spacing)
    else:
        raise ValueError(f"spacing needs 2 or 3 values, got {spacing!r}")
    origin = tuple(float(v) for v in (origin if origin is not None else (0.0,) * ndim))
    if direction is None:
        direction = tuple(float(r == c) for r in range(ndim) for c in range(ndim))
    return Geometry(zyx, origin, tuple(float(v) for v in direction), ndim)  # type: ignore[arg-type]


def ellipsoid(shape: Sequence[int] = SHAPE_3D, seed: int = 0, noise: float = 10.0,
              dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid phantom: ``(image, label)`` of ``shape`` (2 or 3 axes).

    The label is 1 in the outer shell and 2 in the core (half the radii); the image is 100 in the
    core, 60 in the shell, 10 outside, plus Gaussian noise of std ``noise``. ``seed`` shifts the
    centre by up to one voxel and seeds the noise, so cases differ.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    centre = np.array([(s - 1) / 2 for s in shape]) + rng.uniform(-1, 1, size=len(shape))
    radii = np.array([max(s * 0.35, 1.5) for s in shape])
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    label = np.zeros(shape, dtype=np.uint8)
    label[r2 <= 1.0] = 1
    label[r2 <= 0.25] = 2
    image = np.choose(label, [10.0, 60.0, 100.0]) + rng.normal(0.0, noise, size=shape)
    return image.astype(dtype), label


def write_case_image(path: Path, array: np.ndarray, geom: Geometry | None = None) -> Path:
    """Write a (Z, Y, X) or (Y, X) array through :func:`autoseg.imageio.write_image`."""
    path = Path(path)
    if array.ndim == 2:
        geom = geom or geometry(spacing=(1.0, 1.0))
        write_image(path, array[None], geom)
    else:
        geom = geom or geometry()
        write_image(path, array, geom)
    return path


def write_4d(path: Path, channels: Sequence[np.ndarray], geom: Geometry | None = None) -> Path:
    """Write several (Z, Y, X) arrays as one 4D file (channels last in ITK, as in MSD)."""
    import SimpleITK as sitk

    geom = geom or geometry()
    volumes = []
    for array in channels:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(reversed(geom.spacing)))
        image.SetOrigin(geom.origin)
        image.SetDirection(geom.direction)
        volumes.append(image)
    joined = sitk.JoinSeries(volumes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(joined, os.fspath(path), True)
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_dataset_json(root: Path) -> dict[str, Any]:
    return json.loads((Path(root) / "dataset.json").read_text(encoding="utf-8"))


def edit_dataset_json(root: Path, *, drop: Sequence[str] = (), **updates: Any) -> dict[str, Any]:
    """Update keys of ``root/dataset.json`` (and delete those in ``drop``); returns the new content."""
    meta = read_dataset_json(root)
    meta.update(updates)
    for key in drop:
        meta.pop(key, None)
    write_json(Path(root) / "dataset.json", meta)
    return meta


def _default_spacing(shape: Sequence[int]) -> tuple[float, ...]:
    return SPACING_3D if len(shape) == 3 else (1.0, 1.0)


def case_ids(n_cases: int, prefix: str = "case") -> list[str]:
    """``prefix_000``, ``prefix_001``, ...: the case ids the writers use."""
    return [f"{prefix}_{i:03d}" for i in range(n_cases)]


def write_nnunet_dataset(
    root: Path,
    n_cases: int = 3,
    channels: Sequence[str] = ("MRI",),
    *,
    shape: Sequence[int] = SHAPE_3D,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    labels: dict[str, Any] | None = None,
    file_ending: str = ".nii.gz",
    prefix: str = "case",
    seed: int = 0,
    extra_json: dict[str, Any] | None = None,
) -> list[str]:
    """Write an nnU-Net v2 raw dataset: ``dataset.json``, ``imagesTr/{case}_{CCCC}``, ``labelsTr/{case}``.

    Args:
        root: the dataset folder (created).
        n_cases: number of training cases.
        channels: channel names, one image file per channel (``channel_names`` in dataset.json).
        shape: array shape (z, y, x), or (y, x) for 2D NIfTI.
        spacing, origin, direction: geometry of every file (see :func:`geometry`); spacing defaults
            to :data:`SPACING_3D` (anisotropic) for 3D shapes and 1 mm for 2D ones.
        labels: ``labels`` of dataset.json; default :data:`LABELS`.
        file_ending: written to dataset.json and used for every file.
        extra_json: more keys for dataset.json (override the defaults).

    Returns:
        The case ids, sorted (``case_000``, ``case_001``, ...).
    """
    root = Path(root)
    geom = geometry(_default_spacing(shape) if spacing is None else spacing, origin, direction)
    ids = case_ids(n_cases, prefix)
    for i, case in enumerate(ids):
        image, label = ellipsoid(shape, seed=seed + i)
        for c in range(len(channels)):
            write_case_image(root / "imagesTr" / f"{case}_{c:04d}{file_ending}", image * (1 + c), geom)
        write_case_image(root / "labelsTr" / f"{case}{file_ending}", label, geom)
    meta = {
        "name": root.name,
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": dict(labels if labels is not None else LABELS),
        "numTraining": n_cases,
        "file_ending": file_ending,
        **(extra_json or {}),
    }
    write_json(root / "dataset.json", meta)
    return ids


def write_msd_dataset(
    root: Path,
    n_cases: int = 3,
    channels: int | Sequence[str] = 1,
    *,
    shape: Sequence[int] = SHAPE_3D,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    prefix: str = "case",
    seed: int = 0,
    extra_json: dict[str, Any] | None = None,
) -> list[str]:
    """Write a Medical Segmentation Decathlon dataset: ``modality`` + ``training`` list.

    Args:
        channels: a number of channels (named ``MRI``, ``T2``, ...) or the names. With more than
            one channel each image is a single 4D file (channels last in ITK), as in MSD.
        The others as in :func:`write_nnunet_dataset`; labels are MSD style
        ``{"0": "background", "1": "shell", "2": "core"}``.

    Returns:
        The case ids, sorted. Images are ``imagesTr/{case}.nii.gz``, labels ``labelsTr/{case}.nii.gz``.
    """
    root = Path(root)
    names = list(channels) if not isinstance(channels, int) else ["MRI", "T2", "FLAIR", "T1"][:channels]
    geom = geometry(_default_spacing(shape) if spacing is None else spacing, origin, direction)
    ids = case_ids(n_cases, prefix)
    training = []
    for i, case in enumerate(ids):
        image, label = ellipsoid(shape, seed=seed + i)
        image_path = root / "imagesTr" / f"{case}.nii.gz"
        if len(names) == 1:
            write_case_image(image_path, image, geom)
        else:
            write_4d(image_path, [image * (1 + c) for c in range(len(names))], geom)
        write_case_image(root / "labelsTr" / f"{case}.nii.gz", label, geom)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": root.name,
        "tensorImageSize": "4D" if len(names) > 1 else "3D",
        "modality": {str(c): name for c, name in enumerate(names)},
        "labels": {str(v): name for name, v in LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        **(extra_json or {}),
    }
    write_json(root / "dataset.json", meta)
    return ids


def write_png_dataset(root: Path, n_cases: int = 3, *, shape: Sequence[int] = SHAPE_2D,
                      seed: int = 0) -> list[str]:
    """Write a 2D nnU-Net-layout dataset of PNGs: uint8 images, labels 0/1 (one class, ``"fg"``).

    Returns:
        The case ids, sorted.
    """
    root = Path(root)
    ids = case_ids(n_cases)
    geom = geometry(spacing=(1.0, 1.0))
    for i, case in enumerate(ids):
        image, label = ellipsoid(shape, seed=seed + i)
        write_case_image(root / "imagesTr" / f"{case}_0000.png", np.clip(image, 0, 255).astype(np.uint8), geom)
        write_case_image(root / "labelsTr" / f"{case}.png", (label > 0).astype(np.uint8), geom)
    write_json(root / "dataset.json", {
        "name": root.name,
        "channel_names": {"0": "microscopy"},
        "labels": {"background": 0, "fg": 1},
        "numTraining": n_cases,
        "file_ending": ".png",
    })
    return ids


def tree_digest(root: Path) -> dict[str, str]:
    """Every path below ``root`` (hidden files and folders included) mapped to its SHA-256
    (``"<dir>"`` for folders): compare two digests to prove nothing was written or changed."""
    root = Path(root)
    digest: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            digest[os.path.relpath(os.path.join(dirpath, name), root)] = "<dir>"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digest
