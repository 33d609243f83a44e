"""The 3D cascade: 3d_lowres, then 3d_cascade_fullres on the image plus the lowres segmentation.

A ``tiny`` preset with a 2 MB memory budget plans a cascade for 32×48×48 phantoms (the
fullres patch sees 9 % of the image). Two folds, one or two iterations each: what is tested is
where the lowres segmentation goes (cross-validation label maps into training, the lowres
prediction into the cascade's input), not how good the networks are.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import phantoms
import pytest

from autoseg import plans as plans_io
from autoseg.data import BatchProducer, Case
from autoseg.data.cascade import one_hot_previous, perturb_previous
from autoseg.errors import ConfigError, PlanError
from autoseg.imageio import read_image, write_image
from autoseg.preprocessing.pipeline import preprocess_case, previous_stage_labels
from autoseg.training.config import TrainConfig

SHAPE = (32, 48, 48)
FAST = TrainConfig(epochs=1, iters_per_epoch=1, val_iters=1, device="cpu", workers=0, seed=7)


def _cascade_preset(folder: Path) -> Path:
    text = (Path(__file__).parents[1] / "planners" / "tiny.yaml").read_text()
    path = folder / "tinycascade.yaml"
    path.write_text(text.replace("memory_budget_gb: 0.05", "memory_budget_gb: 0.002").replace("name: tiny", "name: tinycascade"))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """Planned (with a cascade), two folds; nothing trained."""
    from autoseg.planning import run as planning

    root = tmp_path_factory.mktemp("cascade")
    raw, work = root / "raw", root / "work"
    ids = phantoms.write_nnunet_dataset(raw, n_cases=4, shape=SHAPE, spacing=(1.0, 1.0, 1.0))
    planning.plan_dataset(raw, work, str(_cascade_preset(root)), None, 1, None)
    (work / "splits.json").write_text(json.dumps([{"train": ids[2:], "val": ids[:2]},
                                                  {"train": ids[:2], "val": ids[2:]}]))
    return raw, work, ids


# ----------------------------------------------------------------------------------------------
# Planning


def test_the_plan_links_the_stages_and_sizes_the_cascade_input(experiment) -> None:
    _, work, _ = experiment
    plans = plans_io.load(work / "plans.yaml")
    lowres, cascade = plans.configurations["3d_lowres"], plans.configurations["3d_cascade_fullres"]
    assert lowres.next_stage == "3d_cascade_fullres" and cascade.previous_stage == "3d_lowres"
    # One one-hot channel per foreground label (the phantoms have two) after the image's one.
    assert cascade.previous_stage_channels == 2 and cascade.input_channels == 3
    assert plans.configurations["3d_fullres"].input_channels == 1
    assert "previous_stage_channels: 2" in (work / "plans.yaml").read_text()
    assert (work / "plans.yaml").read_text().count("previous_stage_channels") == 1  # not written when 0


def test_a_plan_without_a_cascade_says_why(tmp_path: Path) -> None:
    from autoseg.planning import run as planning

    phantoms.write_nnunet_dataset(tmp_path / "raw", n_cases=3, shape=(16, 20, 20))
    _, _, plans, _ = planning.plan_dataset(tmp_path / "raw", tmp_path / "work", "tiny", None, 1, None)
    assert "3d_lowres" not in plans.configurations
    assert any(n.startswith("3d_lowres / 3d_cascade_fullres: not planned: the 3d_fullres patch covers")
               for n in plans.notes)


def test_plans_from_before_previous_stage_channels_still_load(experiment) -> None:
    _, work, _ = experiment
    text = (work / "plans.yaml").read_text()
    older = "\n".join(line for line in text.splitlines() if "previous_stage_channels" not in line)
    plans = plans_io.from_dict(__import__("yaml").safe_load(older))
    assert plans.configurations["3d_cascade_fullres"].previous_stage_channels == 2


def test_plans_check_the_cascade_input_channels(experiment) -> None:
    _, work, _ = experiment
    data = plans_io.to_dict(plans_io.load(work / "plans.yaml"))
    wrong = json.loads(json.dumps(data))
    wrong["configurations"]["3d_cascade_fullres"]["previous_stage_channels"] = 3
    with pytest.raises(PlanError, match="previous_stage_channels: must be 2"):
        plans_io.from_dict(wrong)
    stray = json.loads(json.dumps(data))
    stray["configurations"]["3d_fullres"]["previous_stage_channels"] = 2
    with pytest.raises(PlanError, match="must be 0"):
        plans_io.from_dict(stray)


# ----------------------------------------------------------------------------------------------
# The previous stage's segmentation as input


def test_previous_stage_labels_line_up_with_the_preprocessed_reference(experiment) -> None:
    """A label map through previous_stage_labels = the same label map through preprocessing: the
    lowres segmentation lands on the cascade's grid exactly where a reference would."""
    raw, work, ids = experiment
    plans = plans_io.load(work / "plans.yaml")
    image, geometry = read_image(raw / "imagesTr" / f"{ids[0]}_0000.nii.gz")
    label = read_image(raw / "labelsTr" / f"{ids[0]}.nii.gz")[0][0].astype(np.int16)
    _, seg, props = preprocess_case(image, label, geometry, plans, "3d_cascade_fullres")
    np.testing.assert_array_equal(previous_stage_labels(label, props, plans, "3d_cascade_fullres"), seg)
    with pytest.raises(ValueError, match="shape"):
        previous_stage_labels(label[1:], props, plans, "3d_cascade_fullres")


def test_cascade_batches_carry_the_previous_segmentation_one_hot(experiment) -> None:
    _, work, _ = experiment
    plans = plans_io.load(work / "plans.yaml")
    config = replace(plans.configurations["3d_cascade_fullres"], batch_size=2)
    rng = np.random.default_rng(0)
    shape = (20, 24, 24)
    cases = []
    for i in range(2):
        seg = rng.integers(0, 3, size=shape).astype(np.int16)
        image = rng.normal(size=(1, *shape)).astype(np.float32)
        # The previous stage's labels differ from the target: the one-hot must follow them.
        cases.append(Case(f"c{i}", image, seg, previous=(2 - seg).astype(np.int16) % 3, previous_values=(1, 2)))
    batch = BatchProducer(cases, config, np.random.SeedSequence(1), augment=False).next()
    image, target = batch["image"], batch["target"][0]
    assert image.shape[1] == config.input_channels == 3
    previous = (2 - target[:, 0]) % 3
    np.testing.assert_array_equal(image[:, 1], previous == 1)
    np.testing.assert_array_equal(image[:, 2], previous == 2)
    augmented = BatchProducer(cases, config, np.random.SeedSequence(1), augment=True).next()["image"]
    onehot = augmented[:, 1:]
    assert augmented.shape[1] == 3 and set(np.unique(onehot)) <= {0.0, 1.0}
    assert onehot.sum(axis=1).max() <= 1  # still exclusive after the spatial transform and perturbation


def test_perturbation_changes_masks_and_keeps_them_exclusive() -> None:
    labels = np.zeros((2, 24, 24, 24), dtype=np.int16)
    labels[:, 4:12, 4:12, 4:12] = 1
    labels[:, 14:20, 14:20, 14:20] = 2
    onehot = np.stack([one_hot_previous(x, (1, 2)) for x in labels])
    before = onehot.copy()
    for seed in range(20):
        perturb_previous(onehot, np.random.default_rng(seed))
        assert set(np.unique(onehot)) <= {0.0, 1.0} and onehot.sum(axis=1).max() <= 1
    assert not np.array_equal(onehot, before)


# ----------------------------------------------------------------------------------------------
# Train, predict, export


def test_lowres_then_cascade_trains_predicts_and_exports(experiment, tmp_path: Path) -> None:
    from autoseg.inference.model_export import export_model, import_model
    from autoseg.inference.models import select_models
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.run import run as predict
    from autoseg.training.cascade import previous_folder
    from autoseg.training.run import run as train
    from autoseg.training.validation import validation_folder

    raw, work, ids = experiment
    with pytest.raises(ConfigError, match=r"fold\(s\) 0,1 of 3d_lowres .* -c 3d_lowres -f 0,1"):
        train(work, "3d_cascade_fullres", "0", FAST)
    train(work, "3d_lowres", "0", FAST)
    with pytest.raises(ConfigError, match=r"2 case\(s\) have none \(fold\(s\) 1 of 3d_lowres"):
        train(work, "3d_cascade_fullres", "0", FAST)
    train(work, "3d_lowres", "1", FAST, validate=False)
    with pytest.raises(ConfigError, match=r"fold\(s\) 1 of 3d_lowres are trained but .* -f 1 --validate-only"):
        train(work, "3d_cascade_fullres", "0", FAST)
    train(work, "3d_lowres", "1", FAST, validate_only=True)

    # Make the lowres cross-validation label maps recognisable: each case's map marks its fold.
    plans = plans_io.load(work / "plans.yaml")
    for fold, cases in ((0, ids[:2]), (1, ids[2:])):
        for case_id in cases:
            path = validation_folder(work, "3d_lowres", fold) / f"{case_id}.nii.gz"
            labels, geometry = read_image(path)
            marked = np.zeros_like(labels[0])
            marked[: SHAPE[0] // 2] = fold + 1
            write_image(path, marked, geometry)
    reported: list[tuple[int, int]] = []
    results = train(work, "3d_cascade_fullres", "0", FAST, on_previous=lambda done, total: reported.append((done, total)))
    assert results[0].state.epoch == 1
    assert reported == [(k, 4) for k in range(5)]  # every case of the fold's train + val, from 0
    assert (work / "models" / "3d_cascade_fullres" / "fold_0" / "metrics.json").is_file()
    folder = previous_folder(work, "3d_cascade_fullres")
    for fold, cases in ((0, ids[:2]), (1, ids[2:])):
        for case_id in cases:
            # Each case's training input is the label map of the lowres fold that validated it.
            props = json.loads((work / "preprocessed" / "3d_fullres" / f"{case_id}.json").read_text())
            source = read_image(validation_folder(work, "3d_lowres", fold) / f"{case_id}.nii.gz")[0][0]
            expected = previous_stage_labels(source, props, plans, "3d_cascade_fullres")
            on_disk = np.load(folder / f"{case_id}.npy")
            np.testing.assert_array_equal(on_disk, expected)
            assert set(np.unique(on_disk)) == {0, fold + 1}

    # Prediction runs the lowres fold first (not averaged into the output) and keeps the geometry.
    selections, _ = select_models(work, ["3d_cascade_fullres"], [0])
    predictor = Predictor(work, selections, device="cpu", tta=False, engine="torch")
    assert predictor.configurations == ("3d_cascade_fullres",) and list(predictor.previous_stages) == ["3d_lowres"]
    summary = predict(work, [raw / "imagesTr"], tmp_path / "out", ["3d_cascade_fullres"], [0], device="cpu",
                      tta=False, engine="torch")
    assert len(summary.written) == 4
    out, geometry = read_image(tmp_path / "out" / f"{ids[0]}.nii.gz")
    reference, ref_geometry = read_image(raw / "labelsTr" / f"{ids[0]}.nii.gz")
    assert out.shape == reference.shape and geometry.spacing == pytest.approx(ref_geometry.spacing)

    # A model file of the cascade carries the lowres weights and predicts the same labels.
    exported = export_model(work, tmp_path / "cascade.autoseg.zip", ["3d_cascade_fullres"], [0])
    imported = import_model(exported.path, tmp_path / "imported")
    assert (imported.work / "models" / "3d_lowres" / "fold_0" / "checkpoint_final.pt").is_file()
    with zipfile.ZipFile(exported.path) as archive:  # MODEL.md lists the lowres weights it carries
        card = archive.read("MODEL.md").decode("utf-8")
    assert "| 3d_lowres | 0 |" in card and "`3d_lowres` is a cascade's first stage" in card
    predict(imported.work, [raw / "imagesTr"], tmp_path / "out_model", ["3d_cascade_fullres"], [0], device="cpu",
            tta=False, engine="torch")
    for case_id in ids:
        np.testing.assert_array_equal(read_image(tmp_path / "out_model" / f"{case_id}.nii.gz")[0],
                                      read_image(tmp_path / "out" / f"{case_id}.nii.gz")[0])

    # Without the lowres fold, the cascade cannot predict: said, with the command.
    shutil.rmtree(imported.work / "models" / "3d_lowres" / "fold_0")
    with pytest.raises(ConfigError, match=r"3d_lowres fold\(s\) 0 are not trained .* -c 3d_lowres -f 0"):
        Predictor(imported.work, select_models(imported.work, ["3d_cascade_fullres"], [0])[0], device="cpu")
