"""``autoseg demo denoise``: low-dose CT denoising end to end on the bundled chest CT, its outputs and reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg import demo, demo_denoise
from autoseg.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_slabs_hold_out_the_middle_one_and_validate_on_the_last() -> None:
    assert demo_denoise.split_slabs(6) == ([0, 1, 2, 4], 5, 3)
    assert demo_denoise.split_slabs(3) == ([0], 2, 1)
    for bad in (2, 7):
        with pytest.raises(ConfigError, match="--cases"):
            demo_denoise.split_slabs(bad)
    with pytest.raises(ConfigError, match="--cases"):
        demo_denoise.DenoiseDemoSettings(slabs=2)


def test_bundled_ct_is_real_hu_with_fine_pixels_and_axial_slices() -> None:
    volume, geometry = demo_denoise._bundled_ct()
    assert volume.dtype == np.int16 and volume.shape == (12, 348, 416)
    assert geometry.spacing == pytest.approx((1.0, 0.78125, 0.78125))
    assert volume.min() == -1000 and volume.max() > 1000  # air and bone, no clipping


def test_slabs_keep_every_voxel_where_it_was(tmp_path: Path) -> None:
    """Each slab is a run of consecutive slices whose origin moved with it: stacking the slabs by
    their origin gives the bundled volume back, voxel for voxel and millimetre for millimetre."""
    from autoseg.imageio import read_image

    paths = demo.DemoPaths(tmp_path)
    settings = demo_denoise.DenoiseDemoSettings()
    train, val, test = demo_denoise.write_slabs(paths, settings)
    assert (train, val, test) == (["chest_1", "chest_2", "chest_3", "chest_5"], "chest_6", "chest_4")
    volume, geometry = demo_denoise._bundled_ct()
    for index in range(settings.slabs):
        part = "test" if demo_denoise.slab_id(index) == test else "train"
        image, slab_geometry = read_image(tmp_path / "full_dose" / part / f"{demo_denoise.slab_id(index)}.nii.gz")
        rows = slice(index * demo_denoise.SLAB, (index + 1) * demo_denoise.SLAB)
        np.testing.assert_array_equal(image[0], volume[rows])
        expected_z = geometry.origin[2] + index * demo_denoise.SLAB * geometry.spacing[0]
        assert slab_geometry.origin == pytest.approx((geometry.origin[0], geometry.origin[1], expected_z))


def test_one_demo_never_reuses_the_other_demos_folder(tmp_path: Path) -> None:
    demo.prepare(tmp_path, demo.DemoSettings())
    with pytest.raises(ConfigError, match="'autoseg demo hippocampus' ran there"):
        demo.prepare(tmp_path, demo_denoise.DenoiseDemoSettings(), name="denoise")
    (tmp_path / "work").mkdir()
    demo.prepare(tmp_path, demo_denoise.DenoiseDemoSettings(), force=True, name="denoise")
    assert not (tmp_path / "work").exists()
    assert json.loads((tmp_path / "demo.json").read_text())["demo"] == "denoise"


def test_unknown_demo_name_is_one_line(cli) -> None:
    result = cli("demo", "denoize")
    assert result.exit_code == 2
    assert "unknown demo 'denoize'" in result.output and "denoise" in result.output


def test_denoise_demo_runs_end_to_end_and_reuses_finished_stages(cli, tmp_path: Path, monkeypatch) -> None:
    from autoseg.imageio import read_image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the plan's rate measurement: not the user's cache
    out = tmp_path / "dd"
    args = ("demo", "denoise", "--out", out, "--time-budget", "4s", "--cases", "3", "--device", "cpu")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    for stage in ("simulate:", "check:", "preprocess:", "train:", "predict:", "low dose (input)", "denoised", "gain"):
        assert stage in result.output
    record = json.loads((out / "demo.json").read_text())
    assert record["status"] == "finished" and record["demo"] == "denoise"
    assert record["test_cases"] == ["chest_2"] and record["validation_cases"] == ["chest_3"]
    assert record["train_cases"] == ["chest_1"] and record["window"] == "[-160, 240] HU"
    # The held-out slab is unseen: neither in the training dataset nor in the experiment.
    assert json.loads((out / "raw" / "dataset.json").read_text())["task"] == "denoise"
    assert sorted(p.name for p in (out / "raw" / "targetsTr").iterdir()) == ["chest_1.nii.gz", "chest_3.nii.gz"]
    assert "chest_2" not in json.loads((out / "work" / "dataset.json").read_text())["cases"]
    # The denoised slab: the low-dose input's geometry and pixel type.
    low, low_geometry = read_image(out / "test" / "imagesTr" / "chest_2_0000.nii.gz")
    restored, geometry = read_image(out / "predictions" / "chest_2.nii.gz")
    assert restored.dtype == low.dtype == np.int16 and restored.shape == low.shape and geometry == low_geometry
    # Scores of the input and of the denoised slab, in the AAPM window.
    scores = record["scores"]["chest_2"]
    for key in ("input", "restored"):
        assert 10 < scores[key]["psnr_db"] < 60 and 0 < scores[key]["ssim_2d"] <= 1
    report = json.loads((out / "evaluation.json").read_text())
    assert report["window"]["low"] == -160 and report["window"]["high"] == 240
    assert (out / "panels" / "chest_2.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "progress.png").read_bytes()[:8] == PNG_SIGNATURE

    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "pairs reused" in again.output and "planned by an earlier run" in again.output
    assert "trained by an earlier run" in again.output and "1 already done" in again.output

    other = cli("demo", "denoise", "--out", out, "--time-budget", "4s", "--cases", "3", "--seed", "7")
    assert other.exit_code == 2 and "--force" in other.output


@pytest.mark.slow
def test_default_denoise_demo_gains_psnr_on_the_held_out_slab(cli, tmp_path: Path) -> None:
    # The machine's cached convolution rate sizes the plan, as for a user.
    result = cli("demo", "denoise", "--out", tmp_path / "dd")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "dd" / "demo.json").read_text())["scores"]["chest_4"]
    assert scores["restored"]["psnr_db"] >= scores["input"]["psnr_db"] + 3.0, result.output
    assert scores["restored"]["ssim_2d"] > scores["input"]["ssim_2d"], result.output
