"""Planner rules on fingerprints built in code, against golden plans and nnU-Net's published plans.

Regenerate the golden files after an intended planner change with
``AUTOSEG_REGEN_GOLDEN=1 pytest tests/test_planning.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autoseg import plans as plans_io
from autoseg.errors import ConfigError, PlanError, UnknownNameError
from autoseg.dataset.fingerprint import CaseRecord, Fingerprint, IntensityStats
from autoseg.planning import GpuMemory, builtin_presets, load_preset, plan, preset_for_gpu
from autoseg.planning.planner import context_slices, target_spacing, transpose_for
from autoseg.planning.topology import pool_and_conv_props

GOLDEN = Path(__file__).parent / "golden"
MRI_STATS = IntensityStats(100.0, 50.0, 0.0, 400.0, 5.0, 100.0, 300.0, 1000)
CT_STATS = IntensityStats(60.0, 40.0, -1000.0, 2000.0, -50.0, 60.0, 200.0, 100000)


def make_fingerprint(
    spacings: list[tuple[float, float, float]],
    shapes: list[tuple[int, int, int]],
    channels: tuple[str, ...] = ("MRI",),
    labels: dict[str, list[int]] | None = None,
    dims: int = 3,
    stats: IntensityStats = MRI_STATS,
    relative_size: float = 1.0,
) -> Fingerprint:
    """A fingerprint with one record per (spacing, shape); shapes are the cropped shapes."""
    labels = labels or {"background": [0], "a": [1], "b": [2]}
    cases = tuple(
        CaseRecord(f"case_{i:03d}", tuple(float(v) for v in sp), tuple(sh), tuple(sh),
                   tuple((0, s) for s in sh), relative_size, "RAS", {}, (stats,) * len(channels))
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    )
    return Fingerprint("synthetic", dims, channels, labels, cases, (stats,) * len(channels))


def isotropic_mri(n: int = 260) -> Fingerprint:
    # MSD Hippocampus: 1 mm isotropic, median shape 36 x 50 x 35 (z, y, x) after cropping.
    return make_fingerprint([(1.0, 1.0, 1.0)] * n, [(36, 50, 35)] * n)


def anisotropic_ct() -> Fingerprint:
    # Abdominal CT with 5 mm slices: 0.8 mm in-plane, ~100 slices of 512 x 512.
    rng = np.random.default_rng(0)
    spacings = [(5.0, float(rng.choice([0.7, 0.8, 0.9])), 0.0) for _ in range(30)]
    spacings = [(z, y, y) for z, y, _ in spacings]
    shapes = [(int(rng.integers(80, 120)), 512, 512) for _ in range(30)]
    return make_fingerprint(spacings, shapes, channels=("CT",), stats=CT_STATS)


def png_2d() -> Fingerprint:
    return make_fingerprint([(999.0, 1.0, 1.0)] * 40, [(1, 512, 512)] * 40, channels=("gray",),
                            labels={"background": [0], "membrane": [1]}, dims=2)


def _golden(name: str, plans: plans_io.Plans) -> None:
    path = GOLDEN / f"{name}.yaml"
    text = plans_io.dumps(plans)
    if os.environ.get("AUTOSEG_REGEN_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"golden file {path} missing; run with AUTOSEG_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"plans differ from {path}"


def test_isotropic_mri_matches_nnunet_published_plan() -> None:
    # nnU-Net v2 on MSD Task04 (260 cases): 3d_fullres patch 40x56x40 batch 9, 2d patch 56x40 batch 366.
    plans = plan(isotropic_mri(260), load_preset("default"))
    full, two = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert full.patch_size == (40, 56, 40) and full.batch_size == 9
    assert two.patch_size == (56, 40) and two.batch_size == 366
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.topology.features_per_stage == (32, 64, 128, 256)
    assert full.topology.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert all(k == (3, 3, 3) for k in full.topology.kernel_sizes)
    assert [n.scheme for n in full.normalization] == ["zscore"]
    assert "3d_lowres" not in plans.configurations  # the patch covers the whole median image
    assert plans.transpose == (0, 1, 2)
    assert plans.recommended[0] == "3d_fullres"
    _golden("isotropic_mri", plans)


def test_isotropic_mri_220_cases_batch_capped_at_5_percent() -> None:
    # The shared Hippocampus copy has 220 cases: 220 * 63000 * 0.05 / 89600 = 7.7 -> batch 8.
    plans = plan(isotropic_mri(220), load_preset("default"))
    assert plans.configurations["3d_fullres"].batch_size == 8
    assert plans.configurations["2.5d"].context_slices == 3  # 1 mm slices: +-3 for ~8 mm context


def test_anisotropic_ct() -> None:
    fp = anisotropic_ct()
    plans = plan(fp, load_preset("default"))
    full = plans.configurations["3d_fullres"]
    assert plans.anisotropic
    assert full.spacing[0] == pytest.approx(5.0, abs=1e-4)
    # Early stages do not pool or convolve across the 5 mm axis: 1x3x3 kernels, (1,2,2) strides.
    assert full.topology.kernel_sizes[0] == (1, 3, 3)
    assert full.topology.strides[1] == (1, 2, 2)
    assert full.patch_size[0] < full.patch_size[1]
    # The fullres patch sees a small part of the image, so a lowres stage + cascade are planned.
    low = plans.configurations["3d_lowres"]
    assert low.next_stage == "3d_cascade_fullres"
    assert plans.configurations["3d_cascade_fullres"].previous_stage == "3d_lowres"
    assert low.spacing[1] > full.spacing[1]
    assert 2 * np.prod(low.median_shape) < np.prod(full.median_shape)
    # CT: clip to the foreground 0.5-99.5 percentiles, then global mean/std.
    norm = full.normalization[0]
    assert norm.scheme == "ct" and norm.clip == (-50.0, 200.0) and norm.mean == 60.0 and norm.std == 40.0
    assert plans.configurations["2.5d"].context_slices == 1  # thick slices: one neighbour each side
    _golden("anisotropic_ct", plans)


def test_coarse_axis_is_moved_first() -> None:
    fp = make_fingerprint([(0.8, 0.8, 5.0)] * 20, [(512, 512, 100)] * 20, channels=("CT",), stats=CT_STATS)
    plans = plan(fp, load_preset("default"))
    assert plans.transpose == (2, 0, 1)
    assert plans.transpose_backward == (1, 2, 0)
    assert plans.configurations["3d_fullres"].spacing[0] == pytest.approx(5.0, abs=1e-4)


def test_png_2d_dataset() -> None:
    plans = plan(png_2d(), load_preset("default"))
    assert list(plans.configurations) == ["2d"]
    two = plans.configurations["2d"]
    assert two.patch_size == (512, 512)
    assert two.spacing[1:] == (1.0, 1.0)
    assert plans.recommended == ("2d",)
    _golden("png_2d", plans)


def test_anisotropy_rule_uses_10th_percentile() -> None:
    spacings = np.array([[s, 1.0, 1.0] for s in (3.0, 4.0, 5.0, 5.0, 5.0, 6.0, 6.0, 7.0, 8.0, 9.0)])
    shapes = np.array([[40, 300, 300]] * 10, dtype=float)
    target, axis = target_spacing(spacings, shapes, 3.0)
    assert axis == 0
    assert target[0] == pytest.approx(np.percentile(spacings[:, 0], 10))
    # Not enough voxels-anisotropy (many slices): the median is kept.
    target, axis = target_spacing(spacings, np.array([[400, 300, 300]] * 10, dtype=float), 3.0)
    assert axis is None and target[0] == pytest.approx(5.5)


def test_transpose_and_topology_rules() -> None:
    assert transpose_for([1.0, 5.0, 1.0]) == (1, 0, 2)
    strides, kernels, patch, divisor = pool_and_conv_props([1.0, 1.0, 1.0], [36, 50, 35], 4)
    assert patch == [40, 56, 40] and divisor == [8, 8, 8] and len(strides) == 4
    # An axis alone must be >= 12 (3 x min edge) to be pooled.
    strides, _, patch, divisor = pool_and_conv_props([1.0, 1.0], [10, 64], 4)
    assert divisor[0] == 2 and divisor[1] >= 8


def test_context_slices_rule() -> None:
    preset = load_preset("default")
    assert context_slices(1.0, preset) == 3
    assert context_slices(2.5, preset) == 2
    assert context_slices(5.0, preset) == 1


def test_small_gpu_recommends_2d_over_starved_3d() -> None:
    fp = anisotropic_ct()
    # 0.5 GB: the 3D patch shrinks to 16x80x80 (< 48^3 voxels), too little context.
    plans = plan(fp, preset_for_gpu(load_preset("default"), 0.5), GpuMemory(0.5, "--gpu-memory"))
    assert "3d_fullres" not in plans.recommended
    assert plans.recommended[0] in ("2d", "2.5d")
    assert any("3d_fullres" in note for note in plans.notes)


def test_every_preset_plans_and_round_trips(tmp_path: Path) -> None:
    for name in builtin_presets():
        plans = plan(isotropic_mri(50), load_preset(name))
        path = tmp_path / f"{name}.yaml"
        plans_io.save(plans, path)
        assert plans_io.load(path) == plans
        assert plans_io.dumps(plans_io.load(path)) == path.read_text()
    assert {"default", "resenc-m", "resenc-l", "cpu", "tiny"} <= set(builtin_presets())


def test_residual_presets_use_residual_encoder() -> None:
    for name in ("resenc-m", "resenc-l"):
        topo = plan(isotropic_mri(50), load_preset(name)).configurations["3d_fullres"].topology
        assert topo.residual_encoder and topo.blocks_per_stage[:3] == (1, 3, 4)


def test_planning_is_deterministic() -> None:
    a = plans_io.dumps(plan(anisotropic_ct(), load_preset("default")))
    b = plans_io.dumps(plan(anisotropic_ct(), load_preset("default")))
    assert a == b


def test_gpu_too_small_for_the_plan_is_said() -> None:
    # Planned for 8 GB but only 2 GB available: nothing fits, and the note says how to re-plan.
    plans = plan(anisotropic_ct(), load_preset("default"), GpuMemory(2.0, "detected: small GPU"))
    assert any("--gpu-memory 2" in note for note in plans.notes)


def test_unknown_preset_suggests() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'resenc-m'"):
        load_preset("resenc_m")


def test_preset_file_with_unknown_key(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "planners" / "default.yaml").read_text()
    path = tmp_path / "mine.yaml"
    path.write_text(text.replace("memory_budget_gb:", "memory_budget_gib:"))
    with pytest.raises(ConfigError, match="did you mean 'memory_budget_gb'"):
        load_preset(str(path))
    path.write_text(text.replace("memory_budget_gb: 8", "memory_budget_gb: 4"))
    assert load_preset(str(path)).memory_budget_gb == 4


def test_unknown_channel_name_is_an_error() -> None:
    fp = make_fingerprint([(1.0, 1.0, 1.0)] * 5, [(20, 20, 20)] * 5, channels=("CTT",))
    with pytest.raises(UnknownNameError, match="did you mean"):
        plan(fp, load_preset("default"))


def test_empty_fingerprint_is_an_error() -> None:
    with pytest.raises(PlanError):
        plan(make_fingerprint([], []), load_preset("default"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("batch_size: 9", "batch_sise: 9"), "did you mean 'batch_size'"),
        (lambda t: t.replace("patch_size: [40, 56, 40]", "patch_size: [41, 56, 40]"), "not divisible by 8"),
        (lambda t: t.replace("scheme: zscore", "scheme: zscor", 1), "did you mean 'zscore'"),
        (lambda t: t.replace("schema_version: 1", "schema_version: 7"), "schema_version"),
        (lambda t: t.replace("batch_size: 9", "batch_size: nine"), "expected an integer"),
        (lambda t: t.replace("transpose: [0, 1, 2]", "transpose: [0, 1, 1]"), "permutation"),
        (lambda t: t + "\n  bad: [", "not valid YAML"),
    ],
)
def test_hand_edited_plans_are_validated(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "plans.yaml"
    plans_io.save(plan(isotropic_mri(260), load_preset("default")), path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(PlanError, match=message):
        plans_io.load(path)


def test_hand_edit_that_is_valid_loads(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    plans_io.save(plan(isotropic_mri(260), load_preset("default")), path)
    path.write_text(path.read_text().replace("batch_size: 9", "batch_size: 4"))
    assert plans_io.load(path).configurations["3d_fullres"].batch_size == 4
