"""Restoration (denoising): layout and check, plan, preprocessing, sampling, training, prediction and HU fidelity.

A synthetic low-dose CT dataset: 6 int16 phantoms of 12×32×32 voxels — air -1000 HU, a body of
soft tissue (40 HU) around a bone disc (1000 HU), scanner padding -2048 outside a circular field of
view — whose degraded input adds signal-dependent Gaussian noise (a Poisson-like σ growing with
density: 40 HU in air, 100 HU in soft tissue, 125 HU in bone). Networks are the ``tiny`` preset's;
one 2d fold is trained for a few iterations and shared by the prediction tests.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.errors import ConfigError, DatasetError, PlanError
from autoseg.imageio import Geometry, read_image, write_image

SHAPE = (12, 32, 32)
SPACING = (2.5, 0.8, 0.8)
AIR, SOFT, BONE, PADDING = -1000, 40, 1000, -2048
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: A rotation about z by 30° (ITK row-major direction cosines), and an origin that is not 0.
ROTATION = (math.cos(math.pi / 6), -math.sin(math.pi / 6), 0.0,
            math.sin(math.pi / 6), math.cos(math.pi / 6), 0.0, 0.0, 0.0, 1.0)


def phantom(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """``(clean, noisy)`` int16 HU volumes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    _, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    cy, cx = (shape[1] - 1) / 2 + rng.uniform(-1, 1), (shape[2] - 1) / 2 + rng.uniform(-1, 1)
    clean = np.full(shape, float(AIR))
    clean[((y - cy) / (shape[1] * 0.4)) ** 2 + ((x - cx) / (shape[2] * 0.35)) ** 2 <= 1] = SOFT
    clean[((y - cy - 3) / 3.5) ** 2 + ((x - cx + 2) / 3.5) ** 2 <= 1] = BONE
    outside = ((y - (shape[1] - 1) / 2) / (shape[1] / 2)) ** 2 + ((x - (shape[2] - 1) / 2) / (shape[2] / 2)) ** 2 > 1
    clean[outside] = PADDING
    sigma = 40.0 + 60.0 * np.sqrt(np.clip(clean + 1000.0, 0, None) / 1000.0)
    noisy = np.where(outside, clean, clean + rng.normal(0.0, 1.0, shape) * sigma)
    return clean.astype(np.int16), np.round(noisy).astype(np.int16)


def write_denoise_dataset(root: Path, n_cases: int = 6, spacing: tuple[float, float, float] = SPACING,
                          extra_json: dict | None = None) -> list[str]:
    """A raw denoising dataset: imagesTr/{case}_0000 (noisy), targetsTr/{case} (clean), dataset.json."""
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), IDENTITY, 3)
    ids = [f"ldct_{i:03d}" for i in range(n_cases)]
    for i, case in enumerate(ids):
        clean, noisy = phantom(i)
        write_image(root / "imagesTr" / f"{case}_0000.nii.gz", noisy, geometry)
        write_image(root / "targetsTr" / f"{case}.nii.gz", clean, geometry)
    meta = {"name": "synthetic_ldct", "task": "denoise", "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
            "numTraining": n_cases, **(extra_json or {})}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return ids


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("restoration") / "raw"
    write_denoise_dataset(root)
    return root


@pytest.fixture(scope="module")
def work(raw: Path) -> Path:
    """The dataset planned with the tiny preset, and 2d fold 0 trained for a few iterations (and validated)."""
    from autoseg.planning.run import plan_dataset
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig

    folder = raw.parent / "work"
    plan_dataset(raw, folder, "tiny", workers=1)
    # AdamW 2e-2: 36 iterations lower the validation loss by ~12 % (SGD's momentum 0.99 needs hundreds).
    cfg = TrainConfig(epochs=3, iters_per_epoch=12, val_iters=2, device="cpu", workers=0, seed=3, optimizer="adamw",
                      lr=2e-2)
    training.run(folder, "2d", "0", cfg)
    from autoseg.preprocessing import run as preprocessing

    preprocessing.run(folder, ["2.5d", "3d_fullres"], workers=1)  # 2.5d links 2d's arrays
    return folder


def _copy(raw: Path, tmp_path: Path) -> Path:
    out = tmp_path / "raw"
    shutil.copytree(raw, out)
    return out


def _codes(report) -> set[str]:
    return {(i.severity, i.code) for i in report.issues}


# ----------------------------------------------------------------------------------------------
# Layout and check


def test_check_passes_on_pairs(raw: Path) -> None:
    from autoseg.planning.run import check

    report = check(raw, workers=1)
    assert report.spec is not None and report.spec.task == "denoise"
    assert not report.errors and not report.warnings, [i.line() for i in report.issues]
    assert [c.label.parent.name for c in report.spec.cases] == ["targetsTr"] * 6
    assert report.spec.labels == ()


def test_check_finds_a_mismatched_pair_and_implausible_hu(raw: Path, tmp_path: Path) -> None:
    from autoseg.planning.run import check

    root = _copy(raw, tmp_path)
    clean, noisy = phantom(0)
    # A target one voxel shorter and on another spacing: not the same grid.
    write_image(root / "targetsTr" / "ldct_001.nii.gz", clean[:, :-1],
                Geometry((2.5, 0.8, 0.9), (0.0, 0.0, 0.0), IDENTITY, 3))
    # A target whose origin is shifted by 3 mm: the pair does not overlap voxel for voxel.
    write_image(root / "targetsTr" / "ldct_002.nii.gz", clean, Geometry(SPACING, (3.0, 0.0, 0.0), IDENTITY, 3))
    # An input with its rescale intercept applied twice (air at -2024 HU), and a NaN in a target.
    write_image(root / "imagesTr" / "ldct_003_0000.nii.gz", (noisy.astype(np.int32) - 1024).astype(np.int16),
                Geometry(SPACING, (0.0, 0.0, 0.0), IDENTITY, 3))
    target = clean.astype(np.float32)
    target[0, 0, 0] = np.nan
    write_image(root / "targetsTr" / "ldct_004.nii.gz", target, Geometry(SPACING, (0.0, 0.0, 0.0), IDENTITY, 3))
    report = check(root, workers=1)
    by_case = {(i.case, i.code): i for i in report.errors}
    assert ("ldct_001", "shape-mismatch") in by_case and ("ldct_001", "spacing-mismatch") in by_case
    assert by_case[("ldct_001", "shape-mismatch")].file == "targetsTr/ldct_001.nii.gz"
    assert "target on the image grid" in by_case[("ldct_002", "origin-mismatch")].fix
    assert "not at about -1000" in by_case[("ldct_003", "implausible-hu")].problem
    assert by_case[("ldct_003", "implausible-hu")].file == "imagesTr/ldct_003_0000.nii.gz"
    assert ("ldct_004", "non-finite") in by_case
    assert ("warning", "pixel-type-mismatch") in _codes(report)  # float32 target beside an int16 input
    for issue in report.issues:
        assert "\n" not in issue.line() and issue.fix


def test_noise_below_air_is_fine_in_the_input_but_said_in_a_clean_target() -> None:
    from autoseg.dataset.restoration import check_ct_values

    _, noisy = phantom(0)
    air = (noisy < -900) & (noisy > -1500)
    noisy[air] += np.random.default_rng(0).normal(0, 150, int(air.sum())).astype(np.int16)  # ultra-low dose
    assert check_ct_values(noisy, case="c", file="f", degraded=True) == []
    issues = check_ct_values(noisy, case="c", file="f")
    assert [(i.severity, i.code) for i in issues] == [("warning", "implausible-hu")]
    padded = np.full(SHAPE, AIR, dtype=np.int16)
    padded[:, :4] = -3024  # GE padding is no implausible HU
    padded[0, 5, 5] = 5000
    issues = check_ct_values(padded, case="c", file="f")
    assert [(i.severity, i.code) for i in issues] == [("warning", "implausible-hu")]


def test_layout_problems_are_said_in_one_line(raw: Path, tmp_path: Path, cli) -> None:
    from autoseg.dataset.layout import load_dataset, load_dataset_strict

    root = _copy(raw, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "task": "denosie"}))
    spec, issues = load_dataset(root)
    unknown = [i for i in issues if i.code == "unknown-task"]
    assert unknown and "did you mean 'denoise'" in unknown[0].problem
    # Labels declared and a labelsTr folder beside the targets: both said out loud, neither fatal.
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "bone": 1}}))
    (root / "labelsTr").mkdir()
    spec, issues = load_dataset(root)
    assert spec is not None and spec.labels == ()
    assert sorted((i.severity, i.file) for i in issues if i.code == "labels-ignored") == [
        ("warning", "dataset.json"), ("warning", "labelsTr")]
    # Two channels, and a case without its target.
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "CT", "1": "PET"}}))
    (root / "targetsTr" / "ldct_005.nii.gz").unlink()
    _, issues = load_dataset(root)
    codes = {i.code for i in issues if i.severity == "error"}
    assert {"wrong-channel-count", "missing-target"} <= codes
    assert any(i.file == "targetsTr/ldct_005.nii.gz" and "add targetsTr/ldct_005.nii.gz" in i.fix for i in issues)
    with pytest.raises(DatasetError) as caught:
        load_dataset_strict(root)
    assert "\n" not in str(caught.value) and "more; run 'autoseg check" in str(caught.value)
    # A restoration dataset whose dataset.json forgot "task": a hint towards it.
    segmentation = {k: v for k, v in meta.items() if k != "task"} | {"labels": {"a": 0}}
    (root / "dataset.json").write_text(json.dumps(segmentation))
    shutil.rmtree(root / "labelsTr")
    _, issues = load_dataset(root)
    missing = [i for i in issues if i.code == "missing-folder"]
    assert missing and '"task": "denoise"' in missing[0].fix
    result = cli("check", root, "-j", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_super_resolution_pairs_are_checked(raw: Path, tmp_path: Path) -> None:
    """In-plane super-resolution pairs (the whole chain is tests/test_super_resolution.py)."""
    from autoseg.planning.run import check

    root = _copy(raw, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "task": "super-resolution"}))
    for i in range(6):  # targets on a grid twice as fine in-plane, same extent: the first fine voxel
        clean, _ = phantom(i, (12, 64, 64))  # half a fine voxel before the coarse one
        write_image(root / "targetsTr" / f"ldct_{i:03d}.nii.gz", clean,
                    Geometry((2.5, 0.4, 0.4), (-0.2, -0.2, 0.0), IDENTITY, 3))
    report = check(root, workers=1)
    assert report.spec is not None and report.spec.task == "super-resolution" and not report.errors
    coarse, _ = phantom(0)
    write_image(root / "targetsTr" / "ldct_000.nii.gz", coarse, Geometry((2.5, 1.6, 1.6), (0.0,) * 3, IDENTITY, 3))
    assert {"target-coarser", "extent-mismatch"} <= {i.code for i in check(root, workers=1).errors}
    clean, _ = phantom(0, (12, 64, 64))  # the old corner convention: a quarter of a coarse voxel off
    write_image(root / "targetsTr" / "ldct_000.nii.gz", clean, Geometry((2.5, 0.4, 0.4), (0.0,) * 3, IDENTITY, 3))
    assert [i.code for i in check(root, workers=1).errors] == ["target-grid"]


# ----------------------------------------------------------------------------------------------
# Plan and preprocessing


def test_plan_has_2d_25d_3d_with_an_invertible_normalisation(work: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.preprocessing.normalization import normalize_channel
    from autoseg.preprocessing.restoration import denormalize

    plans = plans_io.load(work / "plans.yaml")
    assert plans.task == "denoise" and plans.labels == {} and plans.num_classes == 1
    assert set(plans.configurations) == {"2d", "2.5d", "3d_fullres"}  # no cascade
    assert plans.configurations["2.5d"].context_slices >= 1
    fingerprint = json.loads((work / "fingerprint.json").read_text())
    assert fingerprint["task"] == "denoise"
    body = fingerprint["intensity"][0]
    for config in plans.configurations.values():
        (norm,) = config.normalization
        assert norm.scheme == "linear" and norm.clip is None
        assert norm.mean == pytest.approx(body["mean"]) and norm.std == pytest.approx(body["std"])
        assert AIR < norm.mean < BONE  # the body's: soft tissue and bone, not the air around it
    values = np.array([PADDING, AIR, -500, SOFT, BONE, 3000], dtype=np.int16)
    back = denormalize(normalize_channel(values, "linear", mean=norm.mean, std=norm.std), norm)
    np.testing.assert_allclose(back, values, atol=1e-3)  # no clipping: every value comes back
    assert any("without clipping" in note for note in plans.notes)
    assert any("not planned for denoise" in note for note in plans.notes)
    assert "task: denoise" in (work / "plans.yaml").read_text()


def test_preprocessing_keeps_input_and_target_aligned(work: Path, raw: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.imageio import read_image
    from autoseg.preprocessing import run as preprocessing
    from autoseg.preprocessing.restoration import denormalize, preprocess_pair
    from autoseg.preprocessing.run import load_case

    plans = plans_io.load(work / "plans.yaml")
    summary = preprocessing.run(work, ["3d_fullres"], workers=1)
    assert summary.configs["3d_fullres"].reused == 6  # finished cases (their targets included) are skipped
    folder = work / "preprocessed" / "3d_fullres"
    data, seg, props = load_case(folder, "ldct_003")
    target = np.load(folder / "ldct_003_target.npy")
    assert seg is None and target.dtype == np.float32 and target.shape == data.shape
    norm = plans.configurations["3d_fullres"].normalization[0]
    noisy = read_image(raw / "imagesTr" / "ldct_003_0000.nii.gz")[0]
    clean = read_image(raw / "targetsTr" / "ldct_003.nii.gz")[0]
    box = (slice(None), *(slice(lo, hi) for lo, hi in props["bbox"]))
    np.testing.assert_allclose(denormalize(data, norm), noisy[box], atol=0.05)
    np.testing.assert_allclose(denormalize(target, norm), clean[box], atol=0.05)
    assert len(props["class_locations"]["1"]) > 100  # body voxels for the sampler
    # Resampled to another spacing, a target equal to its input stays equal to it: one transform.
    config = replace(plans.configurations["3d_fullres"], spacing=(2.0, 0.6, 1.0))
    shifted = replace(plans, configurations={**plans.configurations, "3d_fullres": config})
    geometry = Geometry(SPACING, (0.0, 0.0, 0.0), IDENTITY, 3)
    same_data, same_target, _ = preprocess_pair(noisy, noisy.copy(), geometry, shifted, "3d_fullres")
    assert same_data.shape[1:] != noisy.shape[1:]
    np.testing.assert_array_equal(same_data, same_target)


def test_sampling_and_augmentation_keep_pairs_aligned(work: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.data.restoration import PairCase, PairProducer, augment_pairs, load_pairs, sample_pairs

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    body = np.argwhere(np.ones(SHAPE, dtype=bool))[::7]
    case = PairCase("c", image, 2 * image, body)  # target = 2 × input everywhere (padding: 0 = 2 × 0)
    for patch, k in (((8, 16, 16), 0), ((16, 16), 0), ((16, 24), 2)):
        x, y, _ = sample_pairs([case], patch, 4, rng, context_slices=k)
        x, y = augment_pairs(x, y, rng, rotate_90=patch[-1] == patch[-2])
        centre = x[:, k:k + 1]
        np.testing.assert_array_equal(y, 2 * centre)
        assert x.shape == (4, 2 * k + 1, *patch) and y.shape == (4, 1, *patch)
    plans = plans_io.load(work / "plans.yaml")
    cases = load_pairs(work / "preprocessed" / "2d")
    assert len(cases) == 6 and len(cases[0].body) > 0
    batch = PairProducer(cases, plans.configurations["2.5d"], np.random.SeedSequence(1)).next()
    assert batch["image"].shape[1] == 3 and batch["target"][0].shape[1] == 1


def test_augmentation_never_changes_values() -> None:
    from autoseg.data.restoration import augment_pairs

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 1, 6, 10, 10)).astype(np.float32)
    out, _ = augment_pairs(x, x.copy(), rng, rotate_90=True)
    for a, b in zip(x, out):  # a permutation of voxels: same multiset, same noise statistics
        np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))


# ----------------------------------------------------------------------------------------------
# Training


def test_fold_trains_lowers_its_loss_and_validates(work: Path, cli) -> None:
    fold = work / "models" / "2d" / "fold_0"
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["metric"] == "PSNR" for r in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["val_loss"] < 0.95 * log[0]["val_loss"]  # the same validation patches every epoch
    assert 10 < log[0]["mean_fg_dice"] < log[-1]["mean_fg_dice"] < 60  # a PSNR in dB (not a Dice) that rises
    assert (fold / "progress.png").is_file() and (fold / "checkpoint_final.pt").is_file()
    config = json.loads(json.dumps(__import__("yaml").safe_load((fold / "train_config.yaml").read_text())))
    assert "loss" not in config["train"]  # the default (L1) is the task's
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["task"] == "denoise" and metrics["summary"]["window"] == [-160.0, 240.0]
    case_id, scores = next(iter(metrics["per_case"].items()))
    assert set(scores["CT"]) == {"psnr_db", "ssim_2d", "ssim_3d", "rmse_hu", "ssim_2d_slices", "data_range", "window"}
    assert scores["CT"]["psnr_db"] > 10 and scores["CT"]["ssim_2d_slices"] == SHAPE[0]
    restored, _ = read_image(fold / "validation" / f"{case_id}.nii.gz")
    assert restored.dtype == np.int16 and not list(fold.glob("validation/*.npz"))
    from autoseg.cli.train import validation_line

    line = validation_line(0, metrics)
    assert "PSNR" in line and "SSIM 2D" in line and "SSIM 3D" in line and "[-160, 240]" in line


def test_fold_validation_metrics_equal_autoseg_evaluate(work: Path, raw: Path, tmp_path: Path) -> None:
    """metrics.json of a fold and `autoseg evaluate` of its validation images: one definition, one number."""
    from autoseg.evaluation import restoration as evaluation

    fold = work / "models" / "2d" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    report = evaluation.run(fold / "validation", raw, tmp_path / "evaluation.json", workers=1, panels=False)
    assert sorted(report.cases) == sorted(metrics["per_case"])
    for case, record in report.cases.items():
        scores = dict(metrics["per_case"][case]["CT"])
        assert scores.pop("window") == [-160.0, 240.0] and scores.pop("data_range") == record["data_range"]
        assert scores == record["restored"], case
    for key in ("psnr_db", "ssim_2d", "ssim_3d", "rmse_hu"):
        assert metrics["summary"][f"mean_{key}"] == pytest.approx(report.summary["restored"][key]["mean"], rel=1e-12)


def test_resume_continues_exactly_and_mse_is_an_option(work: Path, tmp_path: Path) -> None:
    from autoseg import crossval
    from autoseg import plans as plans_io
    from autoseg.training.config import TrainConfig
    from autoseg.training.run import case_ids_of, fold_setup
    from autoseg.training.trainer import FoldPaths, load_checkpoint, train_fold

    plans = plans_io.load(work / "plans.yaml")
    splits = crossval.load(work / "splits.json", case_ids_of(work))
    setup = fold_setup(work, plans, "2.5d", 1, splits)
    cfg = TrainConfig(epochs=2, iters_per_epoch=2, val_iters=1, device="cpu", workers=0, seed=5, loss="mse")
    straight = replace(setup, paths=FoldPaths(tmp_path / "straight"))
    train_fold(straight, cfg)
    split = replace(setup, paths=FoldPaths(tmp_path / "split"))
    train_fold(split, replace(cfg, epochs=1))
    train_fold(split, cfg, resume=True)
    a, b = load_checkpoint(straight.paths.final)["model"], load_checkpoint(split.paths.final)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(straight.paths.final)["train_config"]["loss"] == "mse"
    with pytest.raises(ConfigError, match="unknown restoration loss 'l2'"):
        train_fold(replace(setup, paths=FoldPaths(tmp_path / "bad")), replace(cfg, loss="l2"))
    budget = train_fold(replace(setup, paths=FoldPaths(tmp_path / "budget")),
                        replace(cfg, epochs=100, iters_per_epoch=2, time_budget_s=1.0, loss=None))
    assert budget.epoch < 100
    # A resumed fold keeps its objective: resuming an MSE fold with the default loss is refused.
    train_fold(replace(setup, paths=FoldPaths(tmp_path / "switch")), replace(cfg, epochs=1))
    with pytest.raises(ConfigError, match="started with --loss mse, not default; resume with the same --loss"):
        train_fold(replace(setup, paths=FoldPaths(tmp_path / "switch")), replace(cfg, loss=None), resume=True)


def test_unused_heads_are_frozen_for_ddp(work: Path) -> None:
    """Without deep supervision only the last head is trained (DDP refuses parameters without gradient)."""
    from autoseg import plans as plans_io
    from autoseg.networks import build_network

    config = plans_io.load(work / "plans.yaml").configurations["2d"]
    net = build_network(config.topology, config.input_channels, 1, deep_supervision=False)
    net.freeze_unused_heads()
    heads = list(net.decoder.heads)
    assert all(not p.requires_grad for h in heads[:-1] for p in h.parameters())
    assert all(p.requires_grad for p in heads[-1].parameters())
    net(torch.zeros(1, config.input_channels, *config.patch_size)).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_scanner_padding_keeps_its_exact_value() -> None:
    from autoseg.plans import Normalization
    from autoseg.tasks.base import ConfigPrediction
    from autoseg.tasks.restoration_export import restored_image

    image = np.full((1, 3, 6, 6), 40, dtype=np.int16)
    image[0, :, :, :2] = -3024  # outside the scan circle
    props = {"transpose": [0, 1, 2], "bbox": [[0, 3], [0, 6], [0, 6]], "shape_after_crop": [3, 6, 6],
             "separate_axis": None, "order_z": 0}
    correction = np.full((1, 3, 6, 6), 0.05, dtype=np.float32)  # 0.05 std = 5 HU everywhere
    restored = restored_image([ConfigPrediction("2d", correction, props, image=image)],
                              [Normalization("linear", mean=0.0, std=100.0)])
    assert restored.dtype == np.int16
    assert (restored[0, :, :, :2] == -3024).all() and (restored[0, :, :, 2:] == 45).all()


# ----------------------------------------------------------------------------------------------
# Prediction


def _zero_correction_fold(work: Path, configuration: str, fold: int) -> None:
    """A checkpoint of ``configuration`` whose head is zero: its correction is 0 everywhere."""
    from autoseg import plans as plans_io
    from autoseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from autoseg.networks import build_network
    from autoseg.tasks import task_of
    from autoseg.training.trainer import plans_meta

    plans = plans_io.load(work / "plans.yaml")
    config = plans.configurations[configuration]
    task = task_of(plans, configuration)
    net = build_network(config.topology, config.input_channels, task.num_outputs, deep_supervision=False,
                        residual=task.residual_channels(config))
    with torch.no_grad():
        head = net.decoder.heads[-1]
        head.weight.zero_()
        head.bias.zero_()
    save_checkpoint(work / "models" / configuration / f"fold_{fold}" / "checkpoint_final.pt", {
        "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "epoch": 1, "configuration_name": configuration,
        "configuration": plans_io.to_dict(plans)["configurations"][configuration], "plans": plans_meta(plans),
        "fold": fold})


def test_zero_correction_gives_the_input_back_exactly(work: Path, tmp_path: Path) -> None:
    """HU fidelity: air, soft tissue, bone and padding come back as they went in (no clipping, no
    resampling blur), for 3d, 2d and 2.5d (whose residual is the centre slice), with TTA, on an
    image whose spacing differs from the plan's (so the network grid is resampled)."""
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor

    for configuration in ("3d_fullres", "2.5d"):
        _zero_correction_fold(work, configuration, 4)
    _, noisy = phantom(9, (10, 40, 28))
    noisy[0, :3, :3] = 3000  # beyond the body's range: no clipping anywhere
    geometry = Geometry((2.0, 0.7, 0.9), (12.5, -40.25, 7.125), ROTATION, 3)
    selections, _ = select_models(work, ["3d_fullres", "2.5d"], [4])
    predictor = Predictor(work, selections, device="cpu", tta=True)
    predictions = predictor.predict(noisy[None], geometry)
    restored = predictor.export(predictions, geometry, tmp_path / "restored.nii.gz")
    assert restored.dtype == np.int16 and restored.shape == noisy.shape
    assert np.abs(restored.astype(np.int32) - noisy).max() <= 1
    for value in (AIR, SOFT, BONE, PADDING, 3000):
        assert np.all(restored[noisy == value] == value) or not np.any(noisy == value)
    written, written_geometry = read_image(tmp_path / "restored.nii.gz")
    assert written.dtype == np.int16 and np.array_equal(written[0], restored)
    _same_geometry(written_geometry, geometry)


def _same_geometry(a: Geometry, b: Geometry) -> None:
    """Equal to NIfTI's float32 header precision."""
    assert a.ndim == b.ndim
    for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_predict_cli_writes_hu_images_with_the_input_geometry(work: Path, tmp_path: Path, cli) -> None:
    inputs = tmp_path / "low_dose"
    _, noisy = phantom(7, (9, 30, 26))
    geometry = Geometry((2.5, 0.75, 0.85), (1.5, -3.0, 20.0), ROTATION, 3)
    write_image(inputs / "patient_a_0000.nii.gz", noisy, geometry)
    write_image(inputs / "patient_b_0000.nii.gz", noisy.astype(np.float32) + 0.25, geometry)
    result = cli("predict", work, "-i", inputs, "-o", tmp_path / "out", "-c", "2d", "--device", "cpu")
    assert result.exit_code == 0, result.output
    a, geometry_a = read_image(tmp_path / "out" / "patient_a.nii.gz")
    b, geometry_b = read_image(tmp_path / "out" / "patient_b.nii.gz")
    assert a.dtype == np.int16 and b.dtype == np.float32  # the input's pixel type
    assert a.shape == b.shape == (1, *noisy.shape)
    _same_geometry(geometry_a, geometry)
    _same_geometry(geometry_b, geometry)
    assert np.all(a[noisy[None] == PADDING] < -1500)  # the padding stays far outside the body
    for flag in ("--save-probabilities", "--save-uncertainty"):
        refused = cli("predict", work, "-i", inputs, "-o", tmp_path / "other", "-c", "2d", flag)
        assert refused.exit_code != 0 and "not available for a denoise model" in refused.output
        assert "Traceback" not in refused.output


def test_find_best_and_export_refuse_restoration_in_one_line(work: Path, tmp_path: Path) -> None:
    from autoseg.evaluation.find_best import run as find_best
    from autoseg.inference.model_export import export_model

    with pytest.raises(ConfigError, match="find-best chooses among segmentation models") as caught:
        find_best(work)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="model files hold segmentation models only"):
        export_model(work, tmp_path / "model.zip", ["2d"], [0])


def test_several_trained_restoration_configurations_ask_for_c_not_find_best(work: Path, tmp_path: Path) -> None:
    from autoseg.inference.models import select_models

    copy = tmp_path / "work"
    (copy / "models").mkdir(parents=True)
    shutil.copy(work / "plans.yaml", copy / "plans.yaml")
    for name in ("2d", "3d_fullres"):  # two trained configurations (only the files' presence counts here)
        shutil.copytree(work / "models" / "2d", copy / "models" / name)
    with pytest.raises(ConfigError, match="several configurations are trained") as caught:
        select_models(copy, None, None, "final")
    assert "repeat -c" in str(caught.value) and "find-best" not in str(caught.value)


def test_metrics_in_the_window() -> None:
    from autoseg.image_metrics import DEFAULT_WINDOW
    from autoseg.tasks.restoration import Denoise

    rng = np.random.default_rng(2)
    reference = rng.uniform(-300, 400, size=(4, 24, 24))
    same = Denoise().score_case(reference, reference, SPACING)["CT"]
    assert same["psnr_db"] is None and same["rmse_hu"] == 0.0 and same["ssim_2d"] == pytest.approx(1.0)
    # Outside the window a difference does not count: both are clipped to [-160, 240] first.
    brighter = np.where(reference > 300, reference + 500, reference)
    assert Denoise().score_case(brighter, reference, SPACING)["CT"]["rmse_hu"] == 0.0
    noisy = reference + rng.normal(0, 20, reference.shape)
    expected = np.sqrt(np.mean((np.clip(noisy, *DEFAULT_WINDOW) - np.clip(reference, *DEFAULT_WINDOW)) ** 2))
    scores = Denoise().score_case(noisy, reference, SPACING)["CT"]
    assert scores["rmse_hu"] == pytest.approx(expected)
    assert scores["psnr_db"] == pytest.approx(20 * np.log10(400 / expected))
    assert 0 < scores["ssim_2d"] < 1 and scores["ssim_3d"] is None  # 4 slices: below the 7-voxel window
    assert scores["window"] == [-160.0, 240.0]
    summary = Denoise().summarize({"a": {"CT": scores}, "b": {"CT": same}})
    assert summary["mean_psnr_db"] == pytest.approx(scores["psnr_db"])  # the null PSNR left out
    assert summary["per_channel"]["CT"]["psnr_db"]["n"] == 1 and summary["mean_ssim_3d"] is None
    assert summary["mean_rmse_hu"] == pytest.approx(expected / 2) and summary["n_cases"] == 2
    with pytest.raises(ValueError):
        Denoise().score_case(reference, reference[:2], SPACING)


def test_hand_edited_plan_with_a_clipping_scheme_is_refused(work: Path) -> None:
    from autoseg import plans as plans_io
    from autoseg.plans import Normalization
    from autoseg.tasks import task_of

    plans = plans_io.load(work / "plans.yaml")
    config = replace(plans.configurations["2d"], normalization=(Normalization("ct", False, (-1000.0, 1000.0), 0.0,
                                                                              300.0),))
    edited = replace(plans, configurations={**plans.configurations, "2d": config})
    with pytest.raises(ConfigError, match="invertible 'linear'"):
        task_of(edited, "2d")
    with pytest.raises(PlanError, match="scheme 'linear' needs mean and a positive std"):
        data = plans_io.to_dict(plans)
        data["configurations"]["2d"]["normalization"][0]["std"] = 0.0
        plans_io.from_dict(data)
