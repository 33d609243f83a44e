"""Fingerprint: per-case statistics, pooling, determinism across worker counts, reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoseg.planning import run as experiment
from autoseg.dataset.fingerprint import (
    bbox_of,
    case_fingerprint,
    nonzero_mask,
    orientation_code,
    pool_intensities,
)
from autoseg.imageio import Geometry, write_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPPOCAMPUS = SHARED / "Task04_Hippocampus"


def _write_dataset(root: Path, n: int = 6, seed: int = 0) -> Path:
    """A tiny nnU-Net-layout dataset: noisy blocks with a 2-class ellipsoid and a zero border."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        shape = (10 + i % 3, 16, 14)
        image = np.zeros(shape, np.float32)
        image[1:-1, 2:-2, 2:-2] = rng.normal(100 + 10 * i, 20, (shape[0] - 2, 12, 10))
        z, y, x = np.ogrid[: shape[0], :16, :14]
        r = ((z - shape[0] / 2) / 3) ** 2 + ((y - 8) / 5) ** 2 + ((x - 7) / 4) ** 2
        label = np.where(r < 0.4, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
        geometry = Geometry((2.0, 0.7, 0.7), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 3)
        write_image(root / "imagesTr" / f"case_{i:02d}_0000.nii.gz", image, geometry)
        write_image(root / "labelsTr" / f"case_{i:02d}.nii.gz", label, geometry)
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "core": 1, "inner": 2},
        "numTraining": n, "file_ending": ".nii.gz",
    }))
    return root


def test_nonzero_mask_fills_holes_and_bbox() -> None:
    image = np.zeros((1, 8, 9, 10), np.float32)
    image[0, 2:6, 3:7, 1:9] = 1
    image[0, 3:5, 4:6, 4:6] = 0  # an interior hole is part of the body
    mask = nonzero_mask(image)
    assert mask[0 + 3, 4, 4]
    assert bbox_of(mask) == ((2, 6), (3, 7), (1, 9))
    assert bbox_of(np.zeros((3, 4, 5), bool)) == ((0, 3), (0, 4), (0, 5))


def test_orientation_codes() -> None:
    assert orientation_code((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"
    assert orientation_code((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == "RAS"
    assert orientation_code((0, 0, 1, 1, 0, 0, 0, 1, 0)) == "PSL"


def test_case_fingerprint_counts_and_crop() -> None:
    image = np.zeros((1, 6, 8, 8), np.float32)
    image[0, 1:5, 2:6, 2:6] = 7.0
    label = np.zeros((6, 8, 8), np.uint8)
    label[2:4, 3:5, 3:5] = 1
    label[2, 3, 3] = 2
    record, samples = case_fingerprint("c", image, label, (3.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                       [0, 1, 2], quota=1000)
    assert record.shape == (6, 8, 8) and record.shape_after_crop == (4, 4, 4)
    assert record.relative_size_after_crop == pytest.approx(64 / 384)
    assert record.class_voxels == {"1": 7, "2": 1}
    assert record.intensity[0].mean == 7.0 and record.intensity[0].n == 8
    assert samples[0].size == 8


def test_pooling_weighs_every_case_equally() -> None:
    # Case A has 1000 foreground voxels at 0, case B 10 at 100: equal weights -> mean 50.
    pooled = pool_intensities([[np.zeros(1000, np.float32)], [np.full(10, 100, np.float32)]], 1)
    assert pooled[0].mean == pytest.approx(50.0)
    assert pooled[0].min == 0 and pooled[0].max == 100
    assert pooled[0].p50 in (0.0, 100.0)


def test_quota_subsamples_deterministically() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 10, 10, 10)).astype(np.float32)
    label = np.ones((10, 10, 10), np.uint8)
    a = case_fingerprint("x", image, label, (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1), [0, 1], quota=100)[1]
    b = case_fingerprint("x", image, label, (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1), [0, 1], quota=100)[1]
    c = case_fingerprint("y", image, label, (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1), [0, 1], quota=100)[1]
    assert a[0].size == 100 and np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_fingerprint_byte_identical_across_worker_counts(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path / "raw")
    experiment.fingerprint(raw, tmp_path / "w1", workers=1, reuse=False)
    experiment.fingerprint(raw, tmp_path / "w2", workers=2, reuse=False)
    one = (tmp_path / "w1" / "fingerprint.json").read_bytes()
    assert one == (tmp_path / "w2" / "fingerprint.json").read_bytes()
    data = json.loads(one)
    assert data["dims"] == 3 and len(data["cases"]) == 6
    assert data["cases"][0]["spacing"] == [2.0, 0.7, 0.7]
    assert data["summary"]["classes"]["core"]["cases_present"] == 6
    assert data["cases"][0]["shape_after_crop"] == [8, 12, 10]


def test_fingerprint_reused_until_the_dataset_changes(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path / "raw", n=3)
    work = tmp_path / "work"
    _, fp1, reused = experiment.fingerprint(raw, work, workers=1)
    assert not reused
    _, fp2, reused = experiment.fingerprint(raw, work, workers=1)
    assert reused and fp2 == fp1
    label = raw / "labelsTr" / "case_00.nii.gz"
    data = label.read_bytes()
    label.write_bytes(data)  # same content, new mtime: scan again (cheap and safe)
    import os

    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    _, _, reused = experiment.fingerprint(raw, work, workers=1)
    assert not reused


def test_cli_help_imports_neither_torch_nor_simpleitk() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from autoseg.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for name in ['plan', 'check', 'fingerprint']:\n"
        "    assert CliRunner().invoke(app, [name, '--help']).exit_code == 0\n"
        "bad = [m for m in ('torch', 'SimpleITK', 'numpy', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="../shared/data/Task04_Hippocampus not present")
def test_hippocampus_fingerprint_and_plan(tmp_path: Path) -> None:
    report, fp, plans, _ = experiment.plan_dataset(HIPPOCAMPUS, tmp_path / "work", "default", workers=2)
    assert not report.errors and fp.num_cases == 220
    assert fp.summary["median_spacing"] == [1.0, 1.0, 1.0]
    # Mixed dtypes and scales (uint8 and float32 up to 1.7e6): per-image z-score, no CT statistics.
    assert fp.intensity[0].max > 1e5
    full = plans.configurations["3d_fullres"]
    assert full.spacing == (1.0, 1.0, 1.0) and full.patch_size == (40, 56, 40) and full.batch_size == 8
    assert [n.scheme for n in full.normalization] == ["zscore"]
    assert plans.configurations["2d"].patch_size == (56, 40)
    assert plans.configurations["2.5d"].context_slices == 3
