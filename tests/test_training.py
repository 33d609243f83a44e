"""Training: losses, splits, the loop (every configuration), checkpoints and exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg import crossval
from autoseg.data import Case
from autoseg.errors import ConfigError
from autoseg.dataset.fingerprint import CaseRecord, Fingerprint, IntensityStats
from autoseg.planning import load_preset, plan
from autoseg.training.config import TrainConfig, parse_duration
from autoseg.tasks.segmentation_loss import DiceCELoss, soft_dice_loss
from autoseg.training.losses import deep_supervision_weights
from autoseg.training.trainer import FoldPaths, FoldSetup, load_checkpoint, poly_lr, train_fold

SHAPE = (12, 20, 18)


def _tiny_plans(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)):
    stats = IntensityStats(0.0, 1.0, -3.0, 3.0, -2.5, 0.0, 2.5, 100)
    cases = tuple(CaseRecord(f"c{i}", spacing, SHAPE, SHAPE, tuple((0, s) for s in SHAPE), 1.0, "RAS", {}, (stats,))
                  for i in range(6))
    fp = Fingerprint("tiny", 3, ("MRI",), {"background": [0], "shell": [1], "core": [2]}, cases, (stats,))
    return plan(fp, load_preset("tiny"))


def _cases(n: int = 4, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    out = []
    for i in range(n):
        r = ((z - 6) / 4) ** 2 + ((y - 10 - i % 2) / 6) ** 2 + ((x - 9) / 5) ** 2
        seg = np.where(r < 0.35, 2, np.where(r < 1, 1, 0)).astype(np.int8)
        image = (seg.astype(np.float32) + rng.normal(0, 0.3, SHAPE).astype(np.float32))[None]
        out.append(Case(f"case_{i}", image, seg))
    return out


def _setup(tmp_path: Path, configuration: str = "3d_fullres", name: str = "run") -> FoldSetup:
    cases = _cases()
    return FoldSetup(_tiny_plans(), configuration, 0, cases[:3], cases[3:], FoldPaths(tmp_path / name))


FAST = TrainConfig(epochs=2, iters_per_epoch=3, val_iters=2, device="cpu", workers=0, seed=7)


def test_soft_dice_perfect_and_wrong() -> None:
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[:, :, :2] = 1
    perfect = torch.where(target[:, 0] == 1, 1, 0)
    logits = torch.stack([1 - perfect, perfect], 1).float() * 50
    assert soft_dice_loss(logits, target).item() == pytest.approx(-1.0, abs=1e-4)
    assert soft_dice_loss(-logits, target).item() == pytest.approx(0.0, abs=1e-3)
    assert DiceCELoss()(logits, target).item() < 1e-3 - 1.0 + 1e-2


def test_deep_supervision_weights() -> None:
    weights = deep_supervision_weights(4)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] == pytest.approx(2 * weights[1]) and weights[-1] < 1e-5


def test_poly_lr() -> None:
    assert poly_lr(0.01, 0.0, 0.9) == 0.01
    assert poly_lr(0.01, 1.0, 0.9) == 0.0
    assert poly_lr(0.01, 0.5, 0.9) == pytest.approx(0.01 * 0.5**0.9)


@pytest.mark.parametrize(("text", "seconds"), [("15m", 900), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("120", 120)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="15m"):
        parse_duration("fifteen minutes")


def test_splits_are_nnunet_kfold_and_validated(tmp_path: Path) -> None:
    ids = [f"case_{i:03d}" for i in range(10)]
    splits = crossval.load_or_create(tmp_path, list(reversed(ids)))
    assert len(splits) == 5 and (tmp_path / "splits.json").is_file()
    assert sorted(v for s in splits for v in s["val"]) == ids
    assert crossval.make_splits(ids) == splits  # sorted ids, seed 12345: independent of input order
    with pytest.raises(ConfigError, match="unknown case"):
        crossval.validate_splits([{"train": ["x"], "val": ids[:2]}], ids, "s.json")
    with pytest.raises(ConfigError, match="twice"):
        crossval.validate_splits([{"train": ids[2:] + ids[2:3], "val": ids[:2]}], ids, "s.json")
    with pytest.raises(ConfigError, match="both train and val"):
        crossval.validate_splits([{"train": ids, "val": ids[:2]}], ids, "s.json")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps([{"train": ids[2:], "val": ids[:2]}]))
    assert crossval.load_or_create(tmp_path, ids, custom) == [{"train": ids[2:], "val": ids[:2]}]
    with pytest.raises(ConfigError, match="fold 3 does not exist"):
        crossval.fold_cases(crossval.load_or_create(tmp_path, ids), 3)


@pytest.mark.parametrize("configuration", ["2d", "2.5d", "3d_fullres"])
def test_every_configuration_trains_a_few_iterations(tmp_path: Path, configuration: str) -> None:
    setup = _setup(tmp_path, configuration)
    state = train_fold(setup, FAST)
    assert state.epoch == 2 and len(state.history) == 2
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in state.history)
    paths = setup.paths
    for path in (paths.latest, paths.best, paths.final, paths.log, paths.config, paths.plot):
        assert path.is_file(), path
    assert len(paths.log.read_text().splitlines()) == 2
    data = load_checkpoint(paths.final)  # weights_only=True inside
    assert data["configuration_name"] == configuration and "model" in data


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    cfg = replace(FAST, epochs=6, iters_per_epoch=5, lr=0.02)
    state = train_fold(_setup(tmp_path), cfg)
    losses = [r["train_loss"] for r in state.history]
    assert losses[-1] < losses[0]


def test_resume_gives_the_same_weights(tmp_path: Path) -> None:
    full = train_fold(_setup(tmp_path, name="full"), replace(FAST, epochs=3))
    interrupted = _setup(tmp_path, name="resumed")
    train_fold(interrupted, replace(FAST, epochs=1))
    # The first run ended with checkpoint_final; pretend it was killed after epoch 1.
    interrupted.paths.final.unlink()
    resumed = train_fold(interrupted, replace(FAST, epochs=3), resume=True)
    assert resumed.epoch == full.epoch == 3
    a = load_checkpoint(tmp_path / "full" / "checkpoint_final.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_final.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_existing_fold_needs_resume(tmp_path: Path) -> None:
    setup = _setup(tmp_path)
    train_fold(setup, replace(FAST, epochs=1))
    with pytest.raises(ConfigError, match="--resume"):
        train_fold(setup, replace(FAST, epochs=1))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        train_fold(_setup(tmp_path), FAST, resume=True)


def test_time_budget_stops_training(tmp_path: Path) -> None:
    cfg = replace(FAST, epochs=1000, iters_per_epoch=None, val_iters=1, time_budget_s=3.0)
    state = train_fold(_setup(tmp_path), cfg)
    assert state.elapsed_s < 3.0 + 10  # stops soon after the budget (one validation pass at most)
    assert state.history[-1]["lr"] < cfg.resolved_lr == 1e-3  # AdamW; the schedule ran on elapsed time


def test_cpu_bf16_training_trains_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision bf16`` on a CPU with bf16 units trains under bfloat16 autocast (the step's
    convolutions see bfloat16) and says so in train_config.yaml; without the units it refuses."""
    import yaml

    from autoseg.training import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    seen: list[torch.dtype] = []
    original = torch.nn.Conv3d.forward

    def spy(self, x):  # noqa: ANN001, ANN202
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv3d, "forward", spy)
    setup = _setup(tmp_path)
    state = train_fold(setup, replace(FAST, precision="bf16"))
    assert all(np.isfinite(r["train_loss"]) for r in state.history)
    assert torch.bfloat16 in seen
    record = yaml.safe_load(setup.paths.config.read_text())
    assert record["resolved"]["precision"] == "bf16 autocast" and record["train"]["precision"] == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ConfigError, match="no bf16 units"):
        train_fold(_setup(tmp_path, name="no_units"), replace(FAST, precision="bf16"))


def test_resume_at_another_precision_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoseg.training import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    setup = _setup(tmp_path)
    train_fold(setup, replace(FAST, epochs=1, precision="bf16"))
    setup.paths.final.unlink()  # as if killed after epoch 1
    with pytest.raises(ConfigError, match="trained in bf16 autocast and would go on in fp32; resume with --precision bf16"):
        train_fold(setup, replace(FAST, epochs=2, precision="fp32"), resume=True)
    # auto resolves to bf16 on an AMX CPU: the same precision, so it resumes
    assert train_fold(setup, replace(FAST, epochs=2), resume=True).epoch == 2


def test_resume_with_an_edited_configuration_is_refused(tmp_path: Path) -> None:
    """A fold resumes only on the configuration it started with (e.g. not after mirror_axes was edited)."""
    setup = _setup(tmp_path)
    train_fold(setup, replace(FAST, epochs=1, precision="fp32"))
    setup.paths.final.unlink()  # as if killed after epoch 1
    config = setup.plans.configurations[setup.configuration]
    edited = replace(setup, plans=replace(setup.plans, configurations={
        **setup.plans.configurations, setup.configuration: replace(config, mirror_axes=(0, 1))}))
    with pytest.raises(ConfigError, match=r"changed since this fold started \(mirror_axes\); restore it"):
        train_fold(edited, replace(FAST, epochs=2, precision="fp32"), resume=True)
    assert train_fold(setup, replace(FAST, epochs=2, precision="fp32"), resume=True).epoch == 2


def test_auto_is_bf16_on_amx_cpus_for_segmentation_only() -> None:
    from autoseg.device import auto_cpu_bf16
    from autoseg.training.precision import resume_check, step_dtype

    cpu = torch.device("cpu")
    assert auto_cpu_bf16("segmentation", frozenset({"amx_bf16", "avx512_bf16"}))
    assert not auto_cpu_bf16("segmentation", frozenset({"avx512_bf16"}))  # no AMX: not measured, fp32
    assert not auto_cpu_bf16("restoration", frozenset({"amx_bf16"}))
    assert step_dtype(cpu, replace(FAST, precision="fp32")) is None
    assert step_dtype(cpu, replace(FAST, amp=False)) is None  # --no-amp is fp32 everywhere
    # checkpoints of earlier versions: on the CPU, auto meant fp32
    assert resume_check({"precision": "auto"}, "bf16 autocast", cpu) == (
        "this fold trained in fp32 and would go on in bf16 autocast; resume with --precision fp32")
    assert resume_check({}, "fp32", cpu) is None
    assert resume_check({"precision": "auto"}, "bf16 autocast", torch.device("cuda")) is None  # not known
    assert resume_check({"precision_resolved": "fp16 autocast"}, "fp32", torch.device("cuda")).endswith(
        "--precision auto")


def test_precision_option_is_checked_and_auto_is_not_recorded() -> None:
    assert "precision" not in FAST.to_dict()  # earlier records and digests unchanged
    assert replace(FAST, precision="fp32").to_dict()["precision"] == "fp32"
    with pytest.raises(ConfigError, match="expected auto, fp32 or bf16"):
        replace(FAST, precision="fp16")
    with pytest.raises(ConfigError, match="--no-amp"):
        replace(FAST, precision="bf16", amp=False)


def test_unavailable_device_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train_fold(_setup(tmp_path), replace(FAST, device="cuda"))


def test_train_cli_end_to_end(tmp_path: Path) -> None:
    import phantoms
    from typer.testing import CliRunner

    from autoseg.cli import app

    raw = tmp_path / "raw"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    runner = CliRunner()
    work = tmp_path / "work"
    assert runner.invoke(app, ["plan", str(raw), "-o", str(work), "--planner", "tiny", "-j", "1"]).exit_code == 0
    args = ["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "2", "--iters-per-epoch", "2",
            "--val-iters", "1", "-j", "0", "--device", "cpu"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "preprocessing it first" in result.output and "fold 0 epoch 1" in result.output
    assert (work / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file()
    assert (work / "splits.json").is_file()
    fold = work / "models" / "3d_fullres" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert "fold 0 validation" in result.output and metrics["per_case"]
    assert sorted(p.stem.split(".")[0] for p in (fold / "validation").glob("*.nii.gz")) == sorted(metrics["per_case"])
    (fold / "metrics.json").unlink()
    only = runner.invoke(app, ["train", str(work), "-c", "3d_fullres", "-f", "0", "--validate-only", "--device", "cpu"],
                         env={"COLUMNS": "200"})
    assert only.exit_code == 0, only.output
    assert json.loads((fold / "metrics.json").read_text())["per_case"] == metrics["per_case"]
    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code != 0 and "--resume" in again.output and "Traceback" not in again.output
    resumed = runner.invoke(app, args[:6] + ["--epochs", "3"] + args[8:] + ["--resume"], env={"COLUMNS": "200"})
    assert resumed.exit_code == 0, resumed.output
    assert "fold 0 epoch 2" in resumed.output
    budget = runner.invoke(app, ["train", str(work), "-c", "2d", "-f", "1", "--time-budget", "3s", "-j", "0",
                                 "--val-iters", "1", "--device", "cpu"], env={"COLUMNS": "200"})
    assert budget.exit_code == 0, budget.output
    bad = runner.invoke(app, ["train", str(work), "-c", "3d_fulres"])
    assert bad.exit_code != 0 and "did you mean '3d_fullres'" in bad.output


def test_leftover_temporary_files_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    """kill -9 while a checkpoint or the plot was being written leaves ``.tmp-*``; the next run of
    the fold (fresh or --resume) removes them (they never carry a final name, so nothing trusts them)."""
    setup = _setup(tmp_path)
    setup.paths.root.mkdir(parents=True)
    stale = setup.paths.root / ".tmp-abc123-checkpoint_latest.pt"
    stale.write_bytes(b"half a checkpoint")
    train_fold(setup, replace(FAST, epochs=1))
    assert not stale.exists()
    assert setup.paths.final.is_file()


def test_train_prints_progress_lines_when_output_is_not_a_terminal(tmp_path: Path, cli, monkeypatch) -> None:
    """Redirected to a log file, training says which iteration it is at, not only whole epochs, and
    the fold's validation after it which case (it was silent until its summary)."""
    import phantoms

    from autoseg.cli import _render
    from autoseg.planning.run import plan_dataset

    monkeypatch.setattr(_render, "LINE_EVERY_S", 0.0)
    raw, work = tmp_path / "raw", tmp_path / "work"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    plan_dataset(raw, work, planner="tiny", workers=1)
    result = cli("train", work, "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iters-per-epoch", "2",
                 "--val-iters", "1", "-j", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "fold 0 epoch 0: iteration 2/2, loss " in result.output, result.output
    assert "fold 0 validation: case 0/1, elapsed " in result.output, result.output
    assert "fold 0 validation: case 1/1, elapsed " in result.output, result.output
    assert result.output.index("fold 0 validation: case 1/1") < result.output.index("fold 0 validation (1 cases")
