"""``autoseg demo``: the whole pipeline on the bundled example, its outputs, reruns, and overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import phantoms
import pytest

from autoseg import demo
from autoseg.errors import ConfigError
from autoseg.overlay import axial_axis, pick_slices, render_overlay, write_case_overlay

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


# ----------------------------------------------------------------------------------------------
# The held-out split and the OUT folder (no training)


def test_case_mean_leaves_out_labels_absent_from_both() -> None:
    """As in evaluate's means, a label absent from both prediction and reference adds no 1.0 to a case's mean."""
    from types import SimpleNamespace

    absent = {"dice": 1.0, "n_ref": 0, "n_pred": 0}
    report = SimpleNamespace(labels={"background": [0], "organ": [1], "tumour": [2]}, cases={
        "a": {"organ": {"dice": 0.5, "n_ref": 9, "n_pred": 9}, "tumour": absent},
        "b": {"organ": absent, "tumour": absent},
    })
    labels, dice, means = demo._dice_of(report)  # type: ignore[arg-type]
    assert labels == ["organ", "tumour"]
    assert dice["a"] == {"organ": 0.5, "tumour": None} and means == {"a": 0.5, "b": None}


def test_split_holds_out_six_cases_and_trains_on_nearly_all_others() -> None:
    ids = [f"hippocampus_{i:03d}" for i in range(24)]
    train, val, test = demo.split_cases(ids, 24)
    assert (len(train), len(val), len(test)) == (16, 2, 6)
    assert sorted(train + val + test) == ids
    assert not set(test) & set(train + val)
    with pytest.raises(ConfigError, match="--cases 3"):
        demo.split_cases(ids, 3)


def test_prepare_refuses_a_folder_that_is_not_a_demo_folder_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "thesis.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(ConfigError, match="not empty and holds no demo.json"):
            demo.prepare(tmp_path, demo.DemoSettings(), force=force)
    assert (tmp_path / "thesis.txt").read_text() == "keep me"


def test_prepare_refuses_other_options_unless_force_which_deletes_only_the_demo_outputs(tmp_path: Path) -> None:
    earlier = demo.DemoSettings(time_budget_s=60, seed=1)
    paths = demo.prepare(tmp_path, earlier)
    (paths.root / "work").mkdir()
    (paths.root / "work" / "plans.yaml").write_text("x")
    (paths.root / "notes.txt").write_text("mine")
    assert demo.prepare(tmp_path, earlier) == paths  # same options: reused as it is
    assert (paths.root / "work" / "plans.yaml").is_file()
    with pytest.raises(ConfigError, match=r"--time-budget 60s --seed 1.*--force"):
        demo.prepare(tmp_path, demo.DemoSettings(time_budget_s=60, seed=2))
    demo.prepare(tmp_path, demo.DemoSettings(time_budget_s=60, seed=2), force=True)
    assert not (paths.root / "work").exists()
    assert (paths.root / "notes.txt").read_text() == "mine"
    assert json.loads(paths.record.read_text())["settings"]["seed"] == 2


def test_bad_options_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--device"):
        demo.run(tmp_path / "out", demo.DemoSettings(), device="gpu0")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Overlays


def test_pick_slices_go_through_the_bulk_of_the_structure() -> None:
    reference = np.zeros((20, 8, 8), dtype=np.uint8)
    reference[5:15, 2:6, 2:6] = 1
    slices = pick_slices(reference, np.zeros_like(reference), axis=0, count=3)
    assert len(slices) == 3 and all(5 <= s < 15 for s in slices) and slices == sorted(slices)
    only_prediction = pick_slices(np.zeros_like(reference), reference, axis=0)
    assert all(5 <= s < 15 for s in only_prediction)
    assert pick_slices(np.zeros_like(reference), np.zeros_like(reference), axis=0) == [10]


def test_axial_axis_follows_the_direction_matrix() -> None:
    assert axial_axis(phantoms.geometry()) == 0  # identity: array axis 0 is ITK z, the S axis
    # ITK x points head-feet (its column holds the S component): array axis 2.
    permuted = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    assert axial_axis(phantoms.geometry(direction=permuted)) == 2


def test_overlay_of_a_synthetic_volume_is_a_png_with_both_contours(tmp_path: Path) -> None:
    image, label = phantoms.ellipsoid((24, 32, 28), seed=1)
    prediction = np.roll(label, 2, axis=2)
    out = tmp_path / "case.png"
    slices = render_overlay(out, image, label, prediction, spacing=(2.0, 1.0, 1.0), title="case: Dice 0.9")
    _assert_png(out)
    assert 1 <= len(slices) <= 3 and all(label[s].any() for s in slices)
    import matplotlib.image

    pixels = matplotlib.image.imread(out)[..., :3]
    for colour in ("#00d0ff", "#ff9f00"):  # reference and prediction contours are both drawn
        rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=-1) < 0.08).sum() > 20, colour


def test_case_overlay_reads_the_files(tmp_path: Path) -> None:
    image, label = phantoms.ellipsoid(seed=2)
    files = [phantoms.write_case_image(tmp_path / name, array)
             for name, array in (("img.nii.gz", image), ("ref.nii.gz", label), ("pred.nii.gz", label))]
    write_case_overlay(tmp_path / "o.png", *files, title="same")
    _assert_png(tmp_path / "o.png")


# ----------------------------------------------------------------------------------------------
# The whole demo through the CLI


def test_demo_runs_the_whole_pipeline_and_reuses_finished_stages(cli, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--time-budget", "3s", "--cases", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "mean foreground Dice" in result.output
    for stage in ("check:", "preprocess:", "train:", "predict:"):
        assert stage in result.output
    record = json.loads((out / "demo.json").read_text())
    test_ids = record["test_cases"]
    assert record["status"] == "finished" and len(test_ids) == 2
    # Held-out cases are unseen: neither in the training dataset nor in the experiment.
    raw_ids = [demo.case_id_of(e) for e in json.loads((out / "raw" / "dataset.json").read_text())["training"]]
    assert len(raw_ids) == 6 and not set(test_ids) & set(raw_ids)
    assert not set(test_ids) & set(json.loads((out / "work" / "dataset.json").read_text())["cases"])
    report = json.loads((out / "evaluation.json").read_text())
    assert sorted(report["cases"]) == sorted(test_ids)
    for case in test_ids:
        for label in ("Anterior", "Posterior"):
            assert 0.0 <= report["cases"][case][label]["dice"] <= 1.0
        assert case in result.output
        _assert_png(out / "overlays" / f"{case}.png")
    _assert_png(out / "progress.png")
    assert str(out / "evaluation.json") in result.output and str(out / "overlays") in result.output

    again = cli("demo", "--out", out, "--time-budget", "3s", "--cases", "8", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "reused" in again.output and "2 already done" in again.output

    other = cli("demo", "--out", out, "--time-budget", "3s", "--cases", "8", "--seed", "7")
    assert other.exit_code == 2
    assert "--force" in other.output


@pytest.mark.slow
def test_default_demo_reaches_dice_075_on_unseen_cases(cli, tmp_path: Path) -> None:
    result = cli("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert len(record["test_cases"]) == 6
    assert record["mean_foreground_dice"] >= 0.75, result.output


def test_force_never_deletes_in_a_folder_whose_demo_json_the_demo_did_not_write(tmp_path: Path) -> None:
    from autoseg.demo import DemoSettings, prepare

    out = tmp_path / "mine"
    (out / "work").mkdir(parents=True)
    (out / "work" / "precious.txt").write_text("keep")
    (out / "demo.json").write_text('{"something": "else"}')
    with pytest.raises(ConfigError, match="holds no demo.json from an earlier demo"):
        prepare(out, DemoSettings(), force=True)
    assert (out / "work" / "precious.txt").read_text() == "keep"
