"""``autoseg predict --save-uncertainty``: normalised entropy and fold disagreement maps.

The maps' values are checked on contrived networks whose logits are constants (so the entropy
and the folds' labels are known), their placement on a rotated, anisotropic input that the
preprocessing transposes and resamples (the experiment of :mod:`test_predict`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import phantoms
from autoseg.imageio import read_image
from autoseg.tasks.base import ConfigPrediction
from autoseg.inference.predictor import Predictor
from autoseg.inference.run import run
from autoseg.inference.models import select_models
from autoseg.inference.uncertainty import (
    export_uncertainty,
    fold_disagreement,
    normalized_entropy,
    to_original,
    uncertainty_maps,
    uncertainty_paths,
)
from test_predict import TRAIN_SHAPE, TRAIN_SPACING, _experiment, _image


@pytest.fixture(scope="module")
def work2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D experiment with two 3d_fullres folds of random weights (3 classes)."""
    return _experiment(tmp_path_factory.mktemp("unc"), phantoms.write_nnunet_dataset, {"3d_fullres": (0, 1)},
                       shape=TRAIN_SHAPE, spacing=TRAIN_SPACING)


class _ConstantNet(torch.nn.Module):
    """Logits that are the same constants at every voxel, whatever the input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self.logits.view(1, -1, *([1] * (x.dim() - 2)))
        return view.expand(x.shape[0], -1, *x.shape[2:]).contiguous()


def _contrived(work: Path, fold_logits: list[list[float]], image_path: Path):
    selections, _ = select_models(work, ["3d_fullres"], [0, 1])
    predictor = Predictor(work, selections, device="cpu", tta=True)
    predictor.models[0].nets = [_ConstantNet(logits) for logits in fold_logits]
    image, geometry = read_image(image_path)
    return predictor.predict(image, geometry, uncertainty=True), geometry


def _inside(prediction: ConfigPrediction) -> np.ndarray:
    """1 inside the crop box in the original grid, 0 outside."""
    props = prediction.props
    crop = tuple(hi - lo for lo, hi in props["bbox"])
    return to_original(np.ones(crop, dtype=np.float32), props)


# ----------------------------------------------------------------------------------------------
# Pure functions


def test_normalized_entropy_of_uniform_and_one_hot() -> None:
    uniform = np.full((4, 3, 5), 0.25, dtype=np.float32)
    np.testing.assert_allclose(normalized_entropy(uniform), 1.0, rtol=1e-6)
    one_hot = np.zeros((4, 3, 5), dtype=np.float32)
    one_hot[2] = 1
    np.testing.assert_array_equal(normalized_entropy(one_hot), 0.0)
    half = np.array([[0.5], [0.5], [0.0]], dtype=np.float32)
    np.testing.assert_allclose(normalized_entropy(half), math.log(2) / math.log(3), rtol=1e-6)
    with pytest.raises(ValueError):
        normalized_entropy(np.ones((1, 3)))


def test_fold_disagreement_counts_pairs_of_folds() -> None:
    a = np.array([0, 1, 2, 2], dtype=np.uint8)
    b = np.array([0, 2, 2, 1], dtype=np.uint8)
    np.testing.assert_array_equal(fold_disagreement([a, b]), [0, 1, 0, 1])  # 1 where two folds differ
    np.testing.assert_array_equal(fold_disagreement([a]), 0)  # one fold never disagrees
    five = [np.array([1])] * 4 + [np.array([2])]
    np.testing.assert_allclose(fold_disagreement(five), [0.4])  # 4 of 10 pairs differ
    three = [np.array([0]), np.array([1]), np.array([2])]
    np.testing.assert_allclose(fold_disagreement(three), [1.0])
    with pytest.raises(ValueError):
        fold_disagreement([a, a[:2]])


def test_uncertainty_paths_keep_float_formats() -> None:
    out = Path("out")
    assert uncertainty_paths(out, "a", ".nrrd") == (out / "a_entropy.nrrd", out / "a_disagreement.nrrd")
    assert uncertainty_paths(out, "b", ".png") == (out / "b_entropy.nii.gz", out / "b_disagreement.nii.gz")


# ----------------------------------------------------------------------------------------------
# Contrived networks through the predictor and the inverse preprocessing


def test_uniform_probabilities_give_entropy_one_and_agreeing_folds_zero(work2: Path, tmp_path: Path) -> None:
    source = _image(tmp_path / "u.nii.gz")
    predictions, geometry = _contrived(work2, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], source)
    paths = uncertainty_paths(tmp_path / "out", "u", ".nii.gz")
    entropy, disagreement = export_uncertainty(predictions, geometry, paths)
    inside = _inside(predictions[0])
    assert inside.mean() > 0.5  # the crop box is most of the image
    np.testing.assert_allclose(entropy, inside, atol=1e-6)
    np.testing.assert_array_equal(disagreement, 0.0)
    for path, expected in zip(paths, (entropy, disagreement)):
        written, written_geometry = read_image(path)
        assert written_geometry == geometry  # size, spacing, origin, direction: exactly
        assert written.dtype == np.float32 and written.shape == (1, *entropy.shape)
        np.testing.assert_array_equal(written[0], expected)


def test_one_hot_probabilities_give_entropy_zero(work2: Path, tmp_path: Path) -> None:
    predictions, geometry = _contrived(work2, [[0.0, 60.0, 0.0], [0.0, 60.0, 0.0]], _image(tmp_path / "h.nii.gz"))
    entropy, disagreement = export_uncertainty(predictions, geometry)
    assert float(entropy.max()) < 1e-6
    np.testing.assert_array_equal(disagreement, 0.0)


def test_two_folds_that_disagree(work2: Path, tmp_path: Path) -> None:
    source = _image(tmp_path / "d.nii.gz")
    predictions, geometry = _contrived(work2, [[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]], source)
    entropy, disagreement = export_uncertainty(predictions, geometry)
    inside = _inside(predictions[0])
    np.testing.assert_allclose(disagreement, inside, atol=1e-6)  # 1 wherever the two folds' labels differ
    # The ensemble averages the logits: softmax(0, 2.5, 2.5).
    p = np.exp([0.0, 2.5, 2.5]) / np.exp([0.0, 2.5, 2.5]).sum()
    expected = float(-(p * np.log(p)).sum() / math.log(3))
    np.testing.assert_allclose(entropy, inside * expected, rtol=1e-5, atol=1e-6)


def test_region_outputs_use_the_mean_binary_entropy(work2: Path, tmp_path: Path) -> None:
    [prediction], _ = _contrived(work2, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], _image(tmp_path / "r.nii.gz"))
    regions = ConfigPrediction("x", np.full_like(prediction.probabilities, 0.5), prediction.props,
                               prediction.disagreement, 2)
    entropy, _, props = uncertainty_maps([regions], regions=True)
    np.testing.assert_allclose(entropy, 1.0, atol=1e-6)  # every sigmoid at 0.5
    certain = ConfigPrediction("x", np.zeros_like(prediction.probabilities), props, prediction.disagreement, 2)
    assert float(uncertainty_maps([certain], regions=True)[0].max()) == 0.0


def test_fold_by_fold_prediction_equals_the_averaged_one(work2: Path, tmp_path: Path) -> None:
    image, geometry = read_image(_image(tmp_path / "f.nii.gz"))
    selections, _ = select_models(work2, ["3d_fullres"])
    predictor = Predictor(work2, selections, device="cpu", tta=False)
    [plain] = predictor.predict(image, geometry)
    [fold_by_fold] = predictor.predict(image, geometry, uncertainty=True)
    assert plain.disagreement is None and fold_by_fold.folds == 2
    np.testing.assert_allclose(fold_by_fold.probabilities, plain.probabilities, rtol=1e-4, atol=1e-6)
    assert fold_by_fold.disagreement.shape == plain.probabilities.shape[1:]
    assert set(np.unique(fold_by_fold.disagreement)) <= {0.0, 1.0}
    single = Predictor(work2, select_models(work2, ["3d_fullres"], [1])[0], device="cpu", tta=False)
    [one] = single.predict(image, geometry, uncertainty=True)
    np.testing.assert_array_equal(one.disagreement, 0.0)


# ----------------------------------------------------------------------------------------------
# The command


def test_cli_writes_the_maps_in_the_input_geometry(work2: Path, tmp_path: Path, cli) -> None:
    source = _image(tmp_path / "in" / "case.nii.gz")
    image, geometry = read_image(source)
    out = tmp_path / "out"
    result = cli("predict", work2, "-i", source.parent, "-o", out, "--save-uncertainty", "--no-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["case.nii.gz", "case_disagreement.nii.gz", "case_entropy.nii.gz"]
    for name in ("case_entropy.nii.gz", "case_disagreement.nii.gz"):
        values, written_geometry = read_image(out / name)
        assert written_geometry == geometry and values.shape == image.shape and values.dtype == np.float32
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    # --continue redoes a case whose uncertainty map is missing.
    (out / "case_entropy.nii.gz").unlink()
    again = run(work2, [source], out, resume=True, save_uncertainty=True, tta=False, device="cpu")
    assert len(again.written) == 1 and (out / "case_entropy.nii.gz").is_file()
    assert run(work2, [source], out, resume=True, save_uncertainty=True).skipped == (out / "case.nii.gz",)


def test_without_the_option_no_map_is_written(work2: Path, tmp_path: Path) -> None:
    source = _image(tmp_path / "in" / "case.nii.gz")
    out = tmp_path / "out"
    run(work2, [source], out, tta=False, device="cpu")
    assert [p.name for p in out.iterdir()] == ["case.nii.gz"]


def test_a_map_name_that_is_another_case_is_refused(work2: Path, tmp_path: Path, cli) -> None:
    _image(tmp_path / "in" / "a.nii.gz")
    _image(tmp_path / "in" / "a_entropy.nii.gz")
    out = tmp_path / "out"
    result = cli("predict", work2, "-i", tmp_path / "in", "-o", out, "--save-uncertainty")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "a_entropy.nii.gz: written for case 'a' and for case 'a_entropy'" in result.output
    assert not out.exists()
