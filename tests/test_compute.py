"""The planner's compute model and time-budget plans (``autoseg plan --time-budget``).

The compute model is checked against FLOPs counted on built networks and against its own
definition; the budget planner's choices on fingerprints built in code. Throughputs are given,
never measured, so the choices do not depend on the machine running the tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_planning import anisotropic_ct, isotropic_mri, make_fingerprint

from autoseg import plans as plans_io
from autoseg.planning import load_preset, plan
from autoseg.planning.budget import TARGET_ITERATIONS, TimeBudget
from autoseg.planning.compute import (
    Throughput,
    config_cost,
    given_throughput,
    iteration_seconds,
    window_count,
)

#: The development CPU's measured rate (forward + backward GFLOP/s), given rather than measured.
CPU = given_throughput(280.0)
#: A GPU-class rate.
GPU = Throughput(60000.0, 120000.0, "cuda: test", "given")


def _budget(minutes: float, throughput: Throughput = CPU, validation_cases: int = 10) -> TimeBudget:
    return TimeBudget(60.0 * minutes, throughput, validation_cases)


# ----------------------------------------------------------------------------------------------
# The compute model


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_training_flops_are_three_forward_passes_of_the_built_network(configuration: str) -> None:
    import torch
    from test_networks import counted_forward

    from autoseg.networks import build_network

    plans = plan(isotropic_mri(), load_preset("cpu"))
    config = plans.configuration(configuration)
    net = build_network(config.topology, config.input_channels, plans.num_classes, deep_supervision=True)
    _, forward = counted_forward(net, torch.zeros((1, config.input_channels, *config.patch_size)))
    _, tflop = iteration_seconds(config, plans.num_classes, CPU)
    assert tflop * 1e12 == pytest.approx(3 * forward * config.batch_size, rel=1e-9)


def test_iteration_time_is_floor_plus_memory_work_and_scales_with_the_machine() -> None:
    config = plan(isotropic_mri(), load_preset("cpu")).configuration("3d_fullres")
    slow, tflop = iteration_seconds(config, 3, CPU)
    fast, _ = iteration_seconds(config, 3, given_throughput(2 * CPU.train_gflops))
    floor = tflop * 1e12 / (CPU.train_gflops * 1e9)
    assert slow > floor  # the memory-bound work comes on top of the convolutions
    assert fast == pytest.approx(slow / 2, rel=1e-9)  # both terms scale with the machine's rate
    assert iteration_seconds(config, 3, CPU, batch_size=2 * config.batch_size)[0] == pytest.approx(2 * slow)


def test_prediction_cost_counts_windows_and_mirrors() -> None:
    assert window_count((36, 50, 35), (40, 56, 40)) == 1
    assert window_count((100, 100, 100), (40, 40, 40)) == 4 ** 3  # starts 0, 20, 40, 60 along each axis
    assert window_count((20, 300, 300), (128, 128)) == 20 * 4 * 4  # 2D: every slice
    config = plan(isotropic_mri(), load_preset("cpu")).configuration("3d_fullres")
    cost = config_cost(config, 3, CPU)
    assert cost.predict_s_tta == pytest.approx(8 * cost.predict_s)  # 8 mirrorings in 3D
    assert cost.iterations(10 * cost.s_per_iteration + 1e-9) == 10


# ----------------------------------------------------------------------------------------------
# Budget plans


def test_no_budget_leaves_the_plans_unchanged(tmp_path: Path) -> None:
    fp = isotropic_mri()
    plans = plan(fp, load_preset("cpu"))
    assert plans.time_budget_s is None
    assert "time_budget_s" not in plans_io.dumps(plans)
    plans_io.save(plans, tmp_path / "plans.yaml")
    assert plans_io.load(tmp_path / "plans.yaml") == plans


def test_a_tiny_image_keeps_its_3d_plan_under_a_budget(tmp_path: Path) -> None:
    fp = isotropic_mri()
    free = plan(fp, load_preset("cpu"))
    budgeted = plan(fp, load_preset("cpu"), budget=_budget(15))
    assert budgeted.configuration("3d_fullres") == free.configuration("3d_fullres")
    assert budgeted.recommended[0] == "3d_fullres" and budgeted.time_budget_s == 900.0
    assert any(n.startswith("3d_fullres: ~") and "iterations in" in n for n in budgeted.notes), budgeted.notes
    plans_io.save(budgeted, tmp_path / "plans.yaml")  # the budget is recorded and round-trips
    assert plans_io.load(tmp_path / "plans.yaml") == budgeted


def _large_ct():
    # Head-and-neck CT as OpenKBP stores it: 128^3 voxels at ~3.9 x 2.5 x 3.9 mm.
    return make_fingerprint([(2.5, 3.9, 3.9)] * 60, [(128, 128, 128)] * 60, channels=("CT",),
                            stats=anisotropic_ct().intensity[0],
                            labels={"background": [0], **{f"organ{i}": [i] for i in range(1, 8)}})


def test_a_large_image_under_a_tight_budget_gets_a_coarser_spacing_before_a_tiny_patch() -> None:
    fp = _large_ct()
    free = plan(fp, load_preset("cpu"))
    fit = plan(fp, load_preset("cpu"), budget=_budget(15))
    before, after = free.configuration("3d_fullres"), fit.configuration("3d_fullres")
    assert config_cost(before, fit.num_classes, CPU).s_per_iteration > 5 * config_cost(after, fit.num_classes,
                                                                                      CPU).s_per_iteration
    assert all(a >= b for a, b in zip(after.spacing, before.spacing)) and after.spacing != before.spacing
    # The patch still sees at least half the (coarser) median image along each axis, on average.
    assert math.prod(after.patch_size) >= 0.125 * math.prod(after.median_shape)
    assert after.batch_size == load_preset("cpu").min_batch_size
    assert "3d_lowres" not in fit.configurations and "3d_cascade_fullres" not in fit.configurations
    # Why there is no cascade was measured on the patch of the memory plan, and says so.
    why = [n for n in fit.notes if n.startswith("3d_lowres / 3d_cascade_fullres: not planned: the 3d_fullres patch")]
    assert why and all(n.endswith("(the patch planned without a time budget)") for n in why), fit.notes


def test_an_impossible_3d_budget_recommends_2d_first() -> None:
    fit = plan(_large_ct(), load_preset("cpu"), budget=_budget(0.5, validation_cases=2))
    assert fit.recommended[0] in ("2d", "2.5d"), fit.recommended
    assert any("3d_fullres cannot train" in n for n in fit.notes), fit.notes
    assert any(n.startswith("3d_fullres") and f"fewer than the {TARGET_ITERATIONS}" in n for n in fit.notes)


def test_a_gpu_budget_keeps_the_memory_plan() -> None:
    fp = _large_ct()
    free = plan(fp, load_preset("default"))
    fit = plan(fp, load_preset("default"), budget=_budget(120, GPU))
    assert fit.configuration("3d_fullres") == free.configuration("3d_fullres")


def test_budget_plans_are_deterministic() -> None:
    fp = _large_ct()
    one = plans_io.dumps(plan(fp, load_preset("cpu"), budget=_budget(15)))
    assert one == plans_io.dumps(plan(fp, load_preset("cpu"), budget=_budget(15)))


# ----------------------------------------------------------------------------------------------
# The commands


def test_plan_with_a_time_budget_and_train_reuse_it(tmp_path: Path, cli, monkeypatch) -> None:
    import phantoms

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    result = cli("plan", raw, "-o", tmp_path / "W", "-p", "tiny", "--time-budget", "2m", "--throughput", "280")
    assert result.exit_code == 0, result.output
    assert "est. training" in result.output and "est. prediction" in result.output
    assert "time budget 2 min per fold" in result.output and "--throughput" in result.output
    assert plans_io.load(tmp_path / "W" / "plans.yaml").time_budget_s == 120.0
    assert not (tmp_path / "cache").exists()  # a given throughput measures nothing
    result = cli("train", tmp_path / "W", "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iters-per-epoch", "2",
                 "--val-iters", "1", "--no-validate", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "time budget 2 min per fold, from plans.yaml" in result.output


def test_plan_without_a_budget_measures_once_and_caches(tmp_path: Path, cli, monkeypatch) -> None:
    import json

    import phantoms

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    result = cli("plan", raw, "-o", tmp_path / "W", "-p", "tiny")
    assert result.exit_code == 0, result.output
    cached = json.loads((tmp_path / "cache" / "autoseg" / "throughput.json").read_text())
    (entry,) = cached.values()
    assert entry["train_gflops"] > 0 and entry["infer_gflops"] > 0
    assert f"{entry['train_gflops']:.0f} GFLOP/s training" in result.output
    assert "time_budget_s" not in (tmp_path / "W" / "plans.yaml").read_text()


def test_bad_budget_options_are_one_line(tmp_path: Path, cli) -> None:
    import phantoms

    raw = tmp_path / "raw"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    result = cli("plan", raw, "-o", tmp_path / "W", "--time-budget", "soon", "--throughput", "280")
    assert result.exit_code != 0 and "--time-budget 'soon'" in result.output
    assert not (tmp_path / "W").exists()


def test_validation_estimate_and_the_reserve_of_train() -> None:
    from autoseg.planning.budget import validation_seconds
    from autoseg.training.run import validation_reserve

    plans = plan(_large_ct(), load_preset("cpu"), budget=_budget(15))
    assert plans.throughput_gflops == (CPU.train_gflops, CPU.infer_gflops)
    config = plans.configuration("3d_fullres")
    cost = config_cost(config, plans.num_classes, CPU)
    one = validation_seconds(config, cost, 1)
    assert validation_seconds(config, cost, 12) == pytest.approx(12 * one)
    assert one > cost.predict_s_tta  # reading and export (and a margin) come on top of the network calls
    # train estimates on the rates the plan was made for, not on a new measurement
    assert validation_reserve(plans, "3d_fullres", 12, "cpu") == pytest.approx(12 * one)


def test_budget_fits_keep_memory_estimates_true() -> None:
    from autoseg.planning.planner import memory_gb

    fit = plan(_large_ct(), load_preset("default"), budget=_budget(15))
    for name, config in fit.configurations.items():
        expected = memory_gb(config.patch_size, config.topology, config.batch_size, load_preset("default"),
                             fit.num_classes)
        assert config.estimated_memory_gb == pytest.approx(expected, abs=1e-3), name


def test_budget_drops_the_cascade_and_its_note() -> None:
    body_ct = make_fingerprint([(1.0, 0.8, 0.8)] * 40, [(300, 512, 512)] * 40, channels=("CT",),
                               stats=anisotropic_ct().intensity[0])
    free = plan(body_ct, load_preset("default"))
    assert "3d_lowres" in free.configurations and any(n.startswith("3d_lowres:") for n in free.notes)
    fit = plan(body_ct, load_preset("default"), budget=_budget(15))
    assert "3d_lowres" not in fit.configurations
    assert not any(n.startswith("3d_lowres:") for n in fit.notes)
    assert any("not planned under a time budget" in n for n in fit.notes)


def test_the_coarse_axis_of_anisotropic_data_keeps_its_spacing() -> None:
    fp = anisotropic_ct()
    free = plan(fp, load_preset("cpu")).configuration("3d_fullres")
    fit = plan(fp, load_preset("cpu"), budget=_budget(5)).configuration("3d_fullres")
    assert fit.spacing[0] == free.spacing[0]  # the 5 mm axis (first after the transpose)
    assert fit.spacing[1:] >= free.spacing[1:]


@pytest.mark.parametrize("value", ["0", "-60", "nan", "inf", "0m"])
def test_bad_budget_values_are_refused(value: str) -> None:
    from autoseg.errors import ConfigError
    from autoseg.training.config import parse_duration

    with pytest.raises(ConfigError, match="--time-budget"):
        parse_duration(value)


def test_a_hand_edited_bad_budget_is_refused(tmp_path: Path) -> None:
    plans = plan(isotropic_mri(), load_preset("cpu"), budget=_budget(15))
    text = plans_io.dumps(plans).replace("time_budget_s: 900.0", "time_budget_s: -5.0")
    (tmp_path / "plans.yaml").write_text(text)
    with pytest.raises(Exception, match="time_budget_s: must be a positive number of seconds"):
        plans_io.load(tmp_path / "plans.yaml")


def test_train_budget_reserves_the_validation(tmp_path: Path, cli, monkeypatch) -> None:
    import phantoms

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    assert cli("plan", raw, "-o", tmp_path / "W", "-p", "tiny", "--throughput", "280").exit_code == 0
    result = cli("train", tmp_path / "W", "-c", "3d_fullres", "-f", "0", "--time-budget", "1m", "--epochs", "1",
                 "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "time budget 1.0 min per fold: " in result.output and "reserved for validating 1 case(s)" in result.output
    # A budget the validation alone would overrun is said before training, with what to do.
    result = cli("train", tmp_path / "W", "-c", "3d_fullres", "-f", "1", "--time-budget", "0.001", "--epochs", "1",
                 "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu", "--no-validate")
    assert result.exit_code == 0 and "reserved" not in result.output, result.output


def test_a_large_2d_image_under_a_budget_trains_on_a_cheaper_patch() -> None:
    # An endoscopy-like RGB set: 530 x 621 frames, where the cpu plan's 640^2 patch at batch 4 is
    # far too slow for a 15-minute CPU budget.
    fp = make_fingerprint([(999.0, 1.0, 1.0)] * 200, [(1, 530, 621)] * 200, channels=("R", "G", "B"),
                          labels={"background": [0], "tool": [1]}, dims=2)
    free = plan(fp, load_preset("cpu")).configuration("2d")
    budget = _budget(15)
    fitted = plan(fp, load_preset("cpu"), budget=budget)
    fit = fitted.configuration("2d")
    assert math.prod(fit.patch_size) < math.prod(free.patch_size) and fit.batch_size == 2
    cost = config_cost(fit, fitted.num_classes, CPU)
    assert cost.s_per_iteration * TARGET_ITERATIONS < budget.seconds
    assert math.prod(fit.patch_size) >= 0.25 * math.prod(fit.median_shape[1:])  # at least half of each side
    assert fitted.recommended[0] == "2d"


def test_train_says_when_the_validation_alone_overruns_the_budget() -> None:
    from autoseg.training.config import TrainConfig
    from autoseg.training.run import MAX_RESERVE_SHARE, _reserve_validation

    # Planned for a machine this slow, validating 10 cases takes far longer than the minute asked for.
    plans = plan(isotropic_mri(), load_preset("cpu"), budget=_budget(1, given_throughput(0.01)))
    assert plans_io.from_dict(plans_io.to_dict(plans)) == plans  # a small rate survives the round trip
    splits = [{"train": ["t"], "val": [f"v{i}" for i in range(10)]}]
    lines: list[str] = []
    cfg = _reserve_validation(plans, "3d_fullres", "0", splits, TrainConfig(time_budget_s=60.0), None, lines.append)
    assert cfg.time_budget_s == pytest.approx(60.0 * (1 - MAX_RESERVE_SHARE))
    assert lines[0].startswith("time budget 1.0 min per fold: 0.2 min training")
    assert lines[1].startswith("warning: validating 10 case(s) is estimated at") and "--no-validate" in lines[1]
