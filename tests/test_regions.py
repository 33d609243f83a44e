"""Region-based labels (nnU-Net's regions): plan, targets, loss, export rule, and the whole pipeline.

The phantoms hold background 0, shell 1 and core 2; the dataset declares them as overlapping
regions ``{"background": 0, "whole": [1, 2], "core": 2}``, so the network has two sigmoid outputs:
``core`` (voxels == 2) and ``whole`` (voxels in {1, 2}), in that order (singles before regions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import phantoms
from autoseg import plans as plans_io
from autoseg.errors import ConfigError
from autoseg.regions import (
    indistinguishable_values,
    is_region_based,
    membership,
    num_outputs,
    output_names,
    region_masks,
    regions_of,
    regions_to_labels,
)
from autoseg.tasks.segmentation_loss import (
    DiceBCELoss,
    DiceCELoss,
    confusion_counts,
    make_loss,
    region_targets,
)
from autoseg.training.losses import DeepSupervisionLoss

#: As :func:`autoseg.dataset.layout.parse_labels` orders them: background, single labels, regions.
LABELS = {"background": [0], "core": [2], "whole": [1, 2]}
#: BraTS in nnU-Net v2: nested regions, "enhancing" is a single value.
BRATS = {"background": [0], "enhancing": [3], "tumor core": [2, 3], "whole tumor": [1, 2, 3]}


# ----------------------------------------------------------------------------------------------
# Which outputs


def test_outputs_of_region_and_class_labels() -> None:
    assert is_region_based(LABELS) and regions_of(LABELS) == ((2,), (1, 2))
    assert output_names(LABELS) == ("core", "whole") and num_outputs(LABELS) == 2
    assert num_outputs(BRATS) == 3 and regions_of(BRATS) == ((3,), (2, 3), (1, 2, 3))
    classes = {"background": [0], "shell": [1], "core": [2]}
    assert not is_region_based(classes) and regions_of(classes) is None and num_outputs(classes) == 3
    assert membership(((2,), (1, 2))).tolist() == [[False, False, True], [False, True, True]]


def test_values_in_the_same_regions_are_reported() -> None:
    assert indistinguishable_values(regions_of(LABELS)) == []
    assert indistinguishable_values(regions_of(BRATS)) == []
    assert indistinguishable_values(((1, 2),)) == [(1, 2)]  # only "whole": 1 and 2 look alike


def test_dataset_refuses_background_in_a_region(tmp_path: Path) -> None:
    from autoseg.dataset.layout import load_dataset

    phantoms.write_nnunet_dataset(tmp_path, n_cases=1, labels={"background": 0, "all": [0, 1, 2], "core": 2})
    _, issues = load_dataset(tmp_path)
    assert [i.code for i in issues if "contains background" in i.problem] == ["invalid-labels"]


# ----------------------------------------------------------------------------------------------
# Targets, loss, pseudo-Dice


def _seg() -> torch.Tensor:
    seg = torch.zeros(2, 1, 4, 6, 6, dtype=torch.long)
    seg[:, :, 1:3, 1:5, 1:5] = 1
    seg[:, :, 1:3, 2:4, 2:4] = 2
    seg[1, :, 0, 0, 0] = 2  # a core voxel outside the shell
    return seg


def test_region_targets_are_the_masks_of_each_region() -> None:
    seg = _seg()
    masks = region_targets(seg, ((2,), (1, 2)))
    assert masks.shape == (2, 2, 4, 6, 6) and masks.dtype == torch.float32
    assert torch.equal(masks[:, 0], (seg[:, 0] == 2).float())
    assert torch.equal(masks[:, 1], (seg[:, 0] > 0).float())
    assert masks[:, 0].sum() == 2 * 8 + 1 and masks[:, 1].sum() == 2 * 32 + 1
    assert np.array_equal(region_masks(seg.numpy()[:, 0], ((2,), (1, 2))), masks.numpy().transpose(1, 0, 2, 3, 4) > 0)


def test_dice_bce_is_minimal_on_a_perfect_prediction() -> None:
    seg = _seg()
    masks = region_targets(seg, ((2,), (1, 2)))
    loss = DiceBCELoss(((2,), (1, 2)))
    perfect = (masks * 2 - 1) * 30  # logits of confident, correct sigmoids
    # Minimum of BCE + (-Dice) is 0 - 1.
    assert loss(perfect, seg).item() == pytest.approx(-1.0, abs=1e-4)
    assert loss(-perfect, seg).item() > 20  # confidently wrong: BCE ~ 30 per voxel, Dice ~ 0
    assert loss(torch.zeros_like(perfect), seg).item() == pytest.approx(np.log(2) - float(
        (2 * 0.5 * masks.sum((0, 2, 3, 4)) / (0.5 * masks[0, 0].numel() * 2 + masks.sum((0, 2, 3, 4)))).mean()),
        abs=1e-4)
    # Deep supervision: a nearest-subsampled label map converts to the subsampled masks.
    ds = DeepSupervisionLoss(loss, 2)
    half = seg[:, :, ::2, ::2, ::2]
    assert ds([perfect, perfect[:, :, ::2, ::2, ::2]], [seg, half]).item() == pytest.approx(-1.0, abs=1e-4)


def test_make_loss_follows_the_labels() -> None:
    assert isinstance(make_loss(LABELS), DiceBCELoss) and make_loss(LABELS).regions == ((2,), (1, 2))
    assert isinstance(make_loss({"background": [0], "organ": [1]}), DiceCELoss)


def test_pseudo_dice_counts_threshold_each_region_at_half() -> None:
    seg = _seg()
    logits = torch.full((2, 2, 4, 6, 6), -5.0)
    logits[:, 1][seg[:, 0] > 0] = 5.0  # whole: perfect
    logits[:, 0][seg[:, 0] > 0] = 0.1  # core: every shell voxel too (sigmoid 0.52 > 0.5)
    tp, fp, fn = confusion_counts(logits, seg, ((2,), (1, 2)))
    assert tp == [17.0, 65.0] and fp == [48.0, 0.0] and fn == [0.0, 0.0]
    # Softmax classes keep the argmax per class.
    three = torch.stack([torch.zeros(2, 4, 6, 6), (seg[:, 0] == 1).float(), (seg[:, 0] == 2).float()], 1) * 9
    assert confusion_counts(three, seg, None) == ([48.0, 17.0], [0.0, 0.0], [0.0, 0.0])


# ----------------------------------------------------------------------------------------------
# Export rule


@pytest.mark.parametrize("labels", [LABELS, BRATS])
def test_exporting_the_references_own_regions_gives_it_back(labels: dict) -> None:
    rng = np.random.default_rng(0)
    n_values = 1 + max(v for values in labels.values() for v in values)
    reference = rng.integers(0, n_values, size=(5, 7, 6)).astype(np.uint8)
    regions = regions_of(labels)
    one_hot = region_masks(reference, regions).astype(np.float32)
    assert np.array_equal(regions_to_labels(one_hot, membership(regions)), reference)
    assert np.array_equal(regions_to_labels(one_hot.astype(np.float16), membership(regions)), reference)


def test_export_thresholds_consistent_predictions_and_resolves_the_rest() -> None:
    member = membership(regions_of(BRATS))  # enhancing (3), tumor core (2, 3), whole (1, 2, 3)
    p = np.array([
        [0.1, 0.2, 0.9],  # whole only -> 1
        [0.2, 0.7, 0.8],  # core and whole -> 2
        [0.6, 0.7, 0.8],  # all three -> 3
        [0.1, 0.2, 0.3],  # none -> 0
        [0.1, 0.9, 0.4],  # core without whole: core more confident -> 2 (nnU-Net's order also gives 2)
        [0.1, 0.6, 0.05],  # core without whole: whole more confident it is absent -> 0
    ], dtype=np.float32).T
    assert regions_to_labels(p, member).tolist() == [1, 2, 3, 0, 2, 0]
    # Our phantom's regions, listed core before whole: the order of the outputs does not matter.
    member = membership(regions_of(LABELS))
    p = np.array([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1], [0.9, 0.2], [0.8, 0.1], [0.9, 0.1]], dtype=np.float32).T
    # Core without whole: 2 when core is the more confident, 0 when whole is; a tie goes to the lower value.
    assert regions_to_labels(p, member).tolist() == [2, 1, 0, 2, 0, 0]


def test_checkpoint_without_region_outputs_is_refused() -> None:
    from autoseg.tasks import get_task

    task = get_task("segmentation", LABELS)
    task.check_outputs(2, "3d_fullres")
    assert task.membership.tolist() == membership(((2,), (1, 2))).tolist()
    assert get_task(None, {"background": [0], "organ": [1]}).membership is None
    with pytest.raises(ConfigError, match="3d_fullres: .*re-train"):
        task.check_outputs(3, "3d_fullres")


# ----------------------------------------------------------------------------------------------
# Plans


def test_plans_mark_region_outputs(tmp_path: Path) -> None:
    from autoseg.planning import run as experiment

    phantoms.write_nnunet_dataset(tmp_path / "raw", n_cases=3, labels={"background": 0, "whole": [1, 2], "core": 2})
    _, fp, plans, _ = experiment.plan_dataset(tmp_path / "raw", tmp_path / "work", "tiny", None, 1, None)
    assert plans.labels == LABELS and plans.region_based and plans.num_classes == 2 and fp.num_classes == 2
    assert any("2 sigmoid outputs (core, whole)" in note for note in plans.notes)
    text = (tmp_path / "work" / "plans.yaml").read_text()
    assert "# Region-based labels" in text
    again = plans_io.load(tmp_path / "work" / "plans.yaml")
    assert again == plans and again.num_classes == 2
    # The same images with the labels as classes: three softmax outputs, no region note.
    phantoms.write_nnunet_dataset(tmp_path / "raw2", n_cases=3)
    _, _, classes, _ = experiment.plan_dataset(tmp_path / "raw2", tmp_path / "work2", "tiny", None, 1, None)
    assert not classes.region_based and classes.num_classes == 3
    assert "Region-based" not in (tmp_path / "work2" / "plans.yaml").read_text()


# ----------------------------------------------------------------------------------------------
# The pipeline: plan -> preprocess -> train (2 folds, 2 configurations) -> validate -> find-best
# -> predict -> ensemble -> evaluate


@pytest.fixture(scope="module")
def region_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoseg.planning import run as experiment
    from autoseg.training import run as train_run
    from autoseg.training.config import TrainConfig

    root = tmp_path_factory.mktemp("regions")
    ids = phantoms.write_nnunet_dataset(root / "raw", n_cases=4,
                                        labels={"background": 0, "whole": [1, 2], "core": 2})
    work = root / "work"
    experiment.plan_dataset(root / "raw", work, "tiny", None, 1, None)
    phantoms.write_json(work / "splits.json", [{"train": ids[2:], "val": ids[:2]},
                                               {"train": ids[:2], "val": ids[2:]}])
    # AdamW at 1e-2 learns "whole" in 15 iterations; "core" (60 voxels) needs ~100, too slow for here.
    cfg = TrainConfig(epochs=3, iters_per_epoch=5, val_iters=1, device="cpu", workers=0, seed=7, optimizer="adamw",
                      lr=1e-2)
    train_run.run(work, "3d_fullres", "all", cfg)
    train_run.run(work, "2d", "all", TrainConfig(epochs=1, iters_per_epoch=2, val_iters=1, device="cpu", workers=0,
                                                 seed=7, optimizer="adamw", lr=1e-2))
    return work


def test_training_logs_a_pseudo_dice_per_region(region_work: Path) -> None:
    log = [json.loads(line) for line in (region_work / "models/3d_fullres/fold_0/log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(len(r["pseudo_dice"]) == 2 for r in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["pseudo_dice"][1] > 0.5  # whole: learnt in 15 iterations


def test_fold_validation_scores_each_region(region_work: Path) -> None:
    from autoseg.evaluation.ensemble import load_probabilities, load_regions
    from autoseg.imageio import read_image
    from autoseg.metrics import case_metrics

    fold = region_work / "models/3d_fullres/fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert sorted(metrics["per_case"]) == ["case_000", "case_001"]
    assert set(metrics["summary"]["labels"]) == {"core", "whole"}
    assert metrics["summary"]["labels"]["whole"]["dice"]["mean"] > 0.6
    for case in ("case_000", "case_001"):
        labels = read_image(fold / "validation" / f"{case}.nii.gz")[0][0]
        reference, geometry = read_image(region_work.parent / "raw/labelsTr" / f"{case}.nii.gz")
        assert set(np.unique(labels)) <= {0, 1, 2}
        expected = case_metrics(labels, reference[0], geometry.spacing, LABELS)
        assert metrics["per_case"][case] == json.loads(json.dumps(expected))
        probabilities = load_probabilities(fold / "validation" / f"{case}.npz")
        assert probabilities.shape == (2, *labels.shape) and 0 <= probabilities.min() and probabilities.max() <= 1
        assert load_regions(fold / "validation" / f"{case}.npz").tolist() == membership(((2,), (1, 2))).tolist()
        # The label map is the export rule of the saved (float16) sigmoids: equal but for voxels at ~0.5.
        agree = regions_to_labels(probabilities, membership(((2,), (1, 2)))) == labels
        assert agree.mean() > 0.999
        # Where the prediction is consistent, each region's mask is its sigmoid > 0.5.
        certain = (np.abs(probabilities.astype(np.float32) - 0.5) > 0.01).all(0)
        masks = region_masks(labels, ((2,), (1, 2)))
        assert np.array_equal(masks[1][certain], probabilities[1][certain] > 0.5)


def test_find_best_compares_region_ensembles(region_work: Path) -> None:
    from autoseg.evaluation import find_best

    result = find_best.run(region_work, workers=1)
    assert set(result.candidates) == {"2d", "3d_fullres", "2d+3d_fullres"}
    assert set(result.summaries["2d+3d_fullres"]["labels"]) == {"core", "whole"}
    assert result.best.scores["3d_fullres"] == pytest.approx(result.summaries["3d_fullres"]["mean_foreground_dice"])
    assert result.best.configurations in (("2d",), ("3d_fullres",), ("2d", "3d_fullres"))
    assert set(result.best.postprocessing.labels) == {"core", "whole"}


def test_predict_ensemble_and_evaluate_per_region(region_work: Path, tmp_path: Path) -> None:
    from autoseg.evaluation import ensemble
    from autoseg.evaluation import evaluate
    from autoseg.inference import run as predict
    from autoseg.imageio import read_image
    from autoseg.metrics import case_metrics

    raw = region_work.parent / "raw"
    images = [raw / "imagesTr" / "case_000_0000.nii.gz", raw / "imagesTr" / "case_003_0000.nii.gz"]
    with_tta, without = tmp_path / "tta", tmp_path / "no_tta"
    for out, tta in ((with_tta, True), (without, False)):
        predict.run(region_work, images, out, ["3d_fullres"], [0, 1], tta=tta, save_probabilities=True, device="cpu")
    report = evaluate.run(with_tta, raw, workers=1)
    assert report.labels == LABELS and sorted(report.cases) == ["case_000", "case_003"]
    for case, per_label in report.cases.items():
        pred = read_image(with_tta / f"{case}.nii.gz")[0][0]
        reference, geometry = read_image(raw / "labelsTr" / f"{case}.nii.gz")
        assert per_label == case_metrics(pred, reference[0], geometry.spacing, LABELS)
        assert per_label["whole"]["dice"] > 0.6
    merged = ensemble.run([with_tta, without], tmp_path / "ens", save_probabilities=True, workers=1)
    assert merged.cases == ("case_000", "case_003")
    for case in merged.cases:
        mean = (ensemble.load_probabilities(with_tta / f"{case}.npz").astype(np.float32)
                + ensemble.load_probabilities(without / f"{case}.npz").astype(np.float32)) / 2
        labels = read_image(tmp_path / "ens" / f"{case}.nii.gz")[0][0]
        assert np.array_equal(labels, regions_to_labels(mean, membership(((2,), (1, 2)))))
        assert ensemble.load_regions(tmp_path / "ens" / f"{case}.npz") is not None
