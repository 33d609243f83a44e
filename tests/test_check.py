"""``autoseg check``: one test per catalogue entry, each on a broken synthetic dataset, through the CLI.

Every test asserts the exit code (1 with errors, 0 with warnings only), that no traceback escaped,
and that the issue's row names the offending file (or dataset.json) and the value found.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import phantoms
import pytest

# ----------------------------------------------------------------------------------------------
# Helpers


def run_check(cli, root: Path, *more: str):
    result = cli("check", root, "-j", "1", *more)
    assert_no_traceback(result)
    return result


def assert_no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output


def assert_row(result, *needles: str) -> None:
    """One output line (an issue's table row) holds every needle."""
    lines = result.output.splitlines()
    assert any(all(n in line for n in needles) for line in lines), (
        f"no output line holds all of {needles!r}:\n{result.output}")


def assert_errors(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert_row(result, "error", *needles)


def assert_warning_only(result, *needles: str) -> None:
    assert result.exit_code == 0, result.output
    assert_row(result, "warning", *needles)
    assert " 0 error(s)" in result.output


def summary(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def nn(tmp_path: Path) -> Path:
    """A clean 3-case nnU-Net dataset."""
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, n_cases=3)
    return root


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    """A clean 3-case MSD dataset."""
    root = tmp_path / "raw"
    phantoms.write_msd_dataset(root, n_cases=3)
    return root


def image_path(root: Path, case: str = "case_000", channel: int = 0) -> Path:
    return root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def label_path(root: Path, case: str = "case_000") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


# ----------------------------------------------------------------------------------------------
# Clean datasets


@pytest.mark.parametrize("kind", ["nnunet", "nnunet-2ch", "msd", "msd-4d", "png"])
def test_clean_dataset_exits_zero(cli, tmp_path: Path, kind: str) -> None:
    root = tmp_path / kind
    if kind == "nnunet":
        phantoms.write_nnunet_dataset(root)
    elif kind == "nnunet-2ch":
        phantoms.write_nnunet_dataset(root, channels=("CT", "PET"))
    elif kind == "msd":
        phantoms.write_msd_dataset(root)
    elif kind == "msd-4d":
        phantoms.write_msd_dataset(root, channels=2)
    else:
        phantoms.write_png_dataset(root)
    result = run_check(cli, root)
    assert result.exit_code == 0, result.output
    assert "3 case(s), 0 error(s), 0 warning(s)" in summary(result)
    assert "issue(s)" not in result.output  # no table at all


# ----------------------------------------------------------------------------------------------
# dataset.json


def test_no_dataset_json(cli, nn: Path) -> None:
    (nn / "dataset.json").unlink()
    assert_errors(run_check(cli, nn), "dataset.json", "dataset.json is missing")


def test_invalid_json(cli, nn: Path) -> None:
    (nn / "dataset.json").write_text('{"labels": {"background": 0,}, ', encoding="utf-8")
    assert_errors(run_check(cli, nn), "dataset.json", "not valid JSON", "line 1 column 29")


@pytest.mark.parametrize("layout, key, expected", [
    ("nnunet", "labels", "has no 'labels'"),
    ("nnunet", "channel_names", "neither 'channel_names' nor 'modality'"),
    ("nnunet", "file_ending", "has no 'file_ending'"),
    ("msd", "modality", "neither 'channel_names' nor 'modality'"),
    ("msd", "labels", "has no 'labels'"),
])
def test_missing_required_key(cli, tmp_path: Path, layout: str, key: str, expected: str) -> None:
    root = tmp_path / "raw"
    (phantoms.write_nnunet_dataset if layout == "nnunet" else phantoms.write_msd_dataset)(root)
    phantoms.edit_dataset_json(root, drop=[key])
    result = run_check(cli, root)
    assert_errors(result, "dataset.json", expected)
    # One dataset.json error, not one more per case (e.g. every label value "undeclared").
    assert "labelsTr/" not in result.output


def test_unknown_channel_name_suggests_closest(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, n_cases=1, channels=("CTT",))
    assert_errors(run_check(cli, root), "dataset.json", "'CTT'", "did you mean 'ct'?")


@pytest.mark.parametrize(("name", "suggestion"), [("zscor", "did you mean 'zscore'?"), ("noNrm", "did you mean"),
                                                ("Ct-scan", "'CT'")])
def test_misspelt_scheme_or_ct_channel_is_an_error(cli, tmp_path: Path, name: str, suggestion: str) -> None:
    """A typo of a scheme, or a CT under another name, would be z-scored in silence: refused."""
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, n_cases=1, channels=(name,))
    assert_errors(run_check(cli, root), "dataset.json", repr(name), suggestion)


def test_mri_sequence_names_are_known(cli, tmp_path: Path) -> None:
    """FLAIR + IR (a brain MRI set's channels) pass clean; IR used to get "did you mean 'r'?"."""
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, n_cases=2, channels=("FLAIR", "IR"))
    result = run_check(cli, root)
    assert result.exit_code == 0 and " 0 warning(s)" in result.output, result.output


def test_unknown_channel_name_falls_back_to_zscore_and_says_so(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, n_cases=3, channels=("Sequence7",))
    assert_warning_only(run_check(cli, root), "dataset.json", "'Sequence7'", "zscore")
    work = tmp_path / "work"
    result = cli("plan", root, "-o", work, "-j", "1", "--planner", "tiny")
    assert result.exit_code == 0, result.output
    from autoseg import plans as plans_io

    plans = plans_io.load(work / "plans.yaml")
    assert all(c.normalization[0].scheme == "zscore" for c in plans.configurations.values())
    assert any("'Sequence7'" in note and "zscore" in note for note in plans.notes), plans.notes
    assert "'Sequence7'" in result.output  # the plan table prints the notes


def test_num_training_mismatch_is_a_warning(cli, nn: Path) -> None:
    phantoms.edit_dataset_json(nn, numTraining=7)
    result = run_check(cli, nn)
    assert_warning_only(result, "dataset.json", "numTraining is 7 but 3 training cases", "set numTraining to 3")


# ----------------------------------------------------------------------------------------------
# Files: missing, unlisted, duplicated, outside the dataset


def test_missing_image_channel_file(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, channels=("T1", "T2"))
    image_path(root, "case_001", 1).unlink()
    assert_errors(run_check(cli, root), "case_001", "imagesTr/case_001_0001.nii.gz", "channel 1 image is missing")


def test_missing_label_file(cli, nn: Path) -> None:
    label_path(nn, "case_002").unlink()
    assert_errors(run_check(cli, nn), "case_002", "labelsTr/case_002.nii.gz", "label file is missing")


def test_msd_file_present_but_not_listed(cli, msd: Path) -> None:
    image, label = phantoms.ellipsoid()
    phantoms.write_case_image(msd / "imagesTr" / "stray.nii.gz", image)
    phantoms.write_case_image(msd / "labelsTr" / "stray.nii.gz", label)
    result = run_check(cli, msd)
    assert_warning_only(result, "imagesTr/stray.nii.gz", "not listed in dataset.json 'training'")
    assert_row(result, "warning", "labelsTr/stray.nii.gz", "not listed")


def test_msd_file_listed_but_absent(cli, msd: Path) -> None:
    (msd / "imagesTr" / "case_001.nii.gz").unlink()
    label_path(msd, "case_002").unlink()
    result = run_check(cli, msd)
    assert_errors(result, "imagesTr/case_001.nii.gz", "listed in dataset.json does not exist")
    assert_row(result, "error", "labelsTr/case_002.nii.gz", "does not exist")


def test_duplicate_case_ids(cli, msd: Path) -> None:
    meta = phantoms.read_dataset_json(msd)
    meta["training"].append(dict(meta["training"][0]))
    phantoms.write_json(msd / "dataset.json", meta)
    assert_errors(run_check(cli, msd), "dataset.json", "case id 'case_000' is listed twice",
                  "training[0] and training[3]")


def test_path_escaping_the_dataset_is_refused_and_never_read(cli, tmp_path: Path, monkeypatch) -> None:
    import autoseg.imageio
    import autoseg.dataset.scan

    root = tmp_path / "raw"
    phantoms.write_msd_dataset(root, n_cases=3)
    image, label = phantoms.ellipsoid()
    outside_rel = phantoms.write_case_image(tmp_path / "outside.nii.gz", image)  # a valid image: a read succeeds
    outside_abs = phantoms.write_case_image(tmp_path / "secret" / "label.nii.gz", label)
    meta = phantoms.read_dataset_json(root)
    meta["training"][0]["image"] = "../outside.nii.gz"
    meta["training"][1]["label"] = os.fspath(outside_abs)
    phantoms.write_json(root / "dataset.json", meta)

    reads: list[Path] = []
    real_read = autoseg.imageio.read_image

    def recording_read(path, *args, **kwargs):
        reads.append(Path(path).resolve())
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(autoseg.dataset.scan, "read_image", recording_read)
    monkeypatch.setattr(autoseg.imageio, "read_image", recording_read)

    result = run_check(cli, root)

    assert_errors(result, "dataset.json", "training[0] image path '../outside.nii.gz'", "outside the dataset folder")
    assert_row(result, "error", "dataset.json", f"training[1] label path '{outside_abs}'", "refused")
    assert reads, "the case inside the dataset should still be read"
    assert all(path.is_relative_to(root.resolve()) for path in reads), reads
    assert outside_rel.resolve() not in reads and outside_abs.resolve() not in reads


# ----------------------------------------------------------------------------------------------
# Label values


def test_undeclared_label_values(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid(seed=1)
    label[0, 0, :3] = [3, 7, 7]
    phantoms.write_case_image(label_path(nn, "case_001"), label)
    assert_errors(run_check(cli, nn), "case_001", "labelsTr/case_001.nii.gz", "label values [3, 7] are not declared",
                  "values found: [0, 1, 2, 3, 7]")


def test_binary_mask_saved_as_255_gets_the_mapping_hint(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), (label > 0).astype(np.uint8) * 255)
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "values found: [0, 255]", "map 255 → 1")


def test_lossy_binary_mask_gets_the_threshold_hint_not_a_class_per_grey_level(cli, nn: Path) -> None:
    """A 0/255 mask that went through JPEG (saved again losslessly) holds grey levels around 0 and
    255: declaring them would make a class of each; the fix is a threshold."""
    _, label = phantoms.ellipsoid()
    mask = (label > 0).astype(np.uint8) * 255
    mask[0, 0, :4] = [3, 8, 250, 247]
    phantoms.write_case_image(label_path(nn), mask)
    result = run_check(cli, nn)
    assert_errors(result, "labelsTr/case_000.nii.gz", "values found: [0, 3, 8, 247, 250, 255]")
    text = " ".join(result.output.split())
    assert "look like a 0/255 mask saved lossily (JPEG)" in text and "--threshold 128" in text, result.output


def test_ct_abbreviations_are_ct_and_dicom_modality_codes_are_never_refused() -> None:
    """NCCT used to get "did you mean 'cbct'?"; two-letter DICOM modality codes (PT for PET) must not
    be near misses of a CT spelling."""
    from autoseg.channels import scheme_for_channel

    assert {scheme_for_channel(n) for n in ("NCCT", "CECT", "LDCT", "HRCT", "MDCT")} == {"ct"}
    for code in ("CR", "DX", "ES", "IO", "MG", "MR", "NM", "OCT", "OP", "OT", "PT", "PX", "RF", "SC", "SM", "US",
                 "XA", "XC"):
        assert scheme_for_channel(code) == "zscore", code
    assert scheme_for_channel("IR") == "zscore"


def test_non_integer_label_values(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    label = label.astype(np.float32)
    label[3, 4, 5] = 0.5
    phantoms.write_case_image(label_path(nn), label)
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "non-integer values (0.5)", "nearest-neighbour")


def test_float_label_with_whole_values_is_fine(cli, nn: Path) -> None:
    # Many exports store labels as float32 0.0/1.0/2.0: harmless, not an error.
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label.astype(np.float32))
    assert run_check(cli, nn).exit_code == 0


# ----------------------------------------------------------------------------------------------
# Geometry


def test_image_label_shape_mismatch(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid(shape=(12, 16, 15))
    phantoms.write_case_image(label_path(nn), label)
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "label vs image: shape 14×16×12 vs 15×16×12")


def test_spacing_mismatch_beyond_tolerance(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(spacing=(3.3, 0.8, 0.8)))
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "spacing (0.8, 0.8, 3) vs (0.8, 0.8, 3.3)")


def test_spacing_within_tolerance_is_fine(cli, nn: Path) -> None:
    # float32 header rounding (~1e-7 relative) must not be reported.
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(spacing=(3.0 * (1 + 1e-5), 0.8, 0.8)))
    result = run_check(cli, nn)
    assert result.exit_code == 0 and "issue(s)" not in result.output, result.output


def test_origin_mismatch_within_half_a_voxel_is_a_warning(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(origin=(0.1, 0.0, 0.0)))
    assert_warning_only(run_check(cli, nn), "labelsTr/case_000.nii.gz", "origin (0, 0, 0) vs (0.1, 0, 0)",
                        "off by 0.1 mm")


def test_origin_mismatch_beyond_half_a_voxel_is_an_error(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(origin=(0.0, 5.0, 0.0)))
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "origin (0, 0, 0) vs (0, 5, 0)", "off by 5 mm")


def _rotation_z(angle: float) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def test_small_direction_mismatch_is_a_warning(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(direction=_rotation_z(1e-3)))
    assert_warning_only(run_check(cli, nn), "labelsTr/case_000.nii.gz", "direction cosines differ by up to 0.001")


def test_large_direction_mismatch_is_an_error(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    phantoms.write_case_image(label_path(nn), label, phantoms.geometry(direction=flipped))
    assert_errors(run_check(cli, nn), "labelsTr/case_000.nii.gz", "direction cosines differ by up to 2",
                  "oriented differently")


def test_channels_of_one_case_with_different_geometry(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, channels=("T1", "T2"))
    image, _ = phantoms.ellipsoid()
    phantoms.write_case_image(image_path(root, "case_002", 1), image, phantoms.geometry(spacing=(3.0, 1.0, 1.0)))
    assert_errors(run_check(cli, root), "case_002", "imagesTr/case_002_0001.nii.gz",
                  "channel file vs imagesTr/case_002_0000.nii.gz: spacing (0.8, 0.8, 3) vs (1, 1, 3)")


def test_mixed_2d_and_3d_cases(cli, nn: Path) -> None:
    image, label = phantoms.ellipsoid(shape=(16, 14))
    phantoms.write_case_image(image_path(nn, "case_001"), image)
    phantoms.write_case_image(label_path(nn, "case_001"), label)
    assert_errors(run_check(cli, nn), "1 2D and 2 3D cases are mixed; 2D cases: case_001")


# ----------------------------------------------------------------------------------------------
# Channels


def test_extra_channel_file_in_nnunet_layout(cli, nn: Path) -> None:
    image, _ = phantoms.ellipsoid()
    phantoms.write_case_image(image_path(nn, "case_001", 1), image)
    assert_errors(run_check(cli, nn), "case_001", "imagesTr/case_001_0001.nii.gz",
                  "channel file 0001 found but dataset.json declares 1 channel(s)")


def test_4d_msd_file_with_more_channels_than_declared(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_msd_dataset(root, channels=2)
    phantoms.edit_dataset_json(root, modality={"0": "MRI"})
    result = run_check(cli, root)
    assert_errors(result, "imagesTr/case_000.nii.gz", "file holds 2 channel(s), expected 1")
    assert "3 error(s)" in summary(result)


# ----------------------------------------------------------------------------------------------
# Voxel values


def test_nan_or_inf_voxels(cli, nn: Path) -> None:
    image, _ = phantoms.ellipsoid(seed=2)
    image[1, 1, 1], image[2, 2, 2], image[3, 3, 3] = np.nan, np.inf, -np.inf
    phantoms.write_case_image(image_path(nn, "case_002"), image)
    assert_errors(run_check(cli, nn), "case_002", "imagesTr/case_002_0000.nii.gz", "3 voxel(s) are NaN or Inf")


def test_constant_intensity_image_is_a_warning(cli, nn: Path) -> None:
    phantoms.write_case_image(image_path(nn), np.full(phantoms.SHAPE_3D, 7, dtype=np.int16))
    assert_warning_only(run_check(cli, nn), "imagesTr/case_000_0000.nii.gz", "every voxel has the value 7")


# ----------------------------------------------------------------------------------------------
# Unreadable files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "truncated"),
    ("garbage", "cannot read image"),
])
def test_unreadable_file(cli, nn: Path, damage: str, expected: str) -> None:
    path = image_path(nn, "case_001")
    if damage == "truncate":
        _truncate(path)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(600))
    result = run_check(cli, nn)
    assert_errors(result, "case_001", "imagesTr/case_001_0000.nii.gz", expected, "re-")
    assert "2 error(s)" not in summary(result)  # the other cases are clean


def test_truncated_uncompressed_nifti(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, file_ending=".nii")
    _truncate(root / "labelsTr" / "case_000.nii")
    assert_errors(run_check(cli, root), "labelsTr/case_000.nii", "file is truncated", "bytes its header declares")


def test_zero_size_file(cli, nn: Path) -> None:
    label_path(nn, "case_001").write_bytes(b"")
    assert_errors(run_check(cli, nn), "case_001", "labelsTr/case_001.nii.gz", "file is empty (0 bytes)")


# ----------------------------------------------------------------------------------------------
# The report as a whole


def test_every_problem_is_reported_at_once(cli, nn: Path) -> None:
    label_path(nn, "case_002").unlink()                                   # structural
    image, _ = phantoms.ellipsoid()
    image[0, 0, 0] = np.nan
    phantoms.write_case_image(image_path(nn, "case_000"), image)          # voxel values
    _, label = phantoms.ellipsoid(seed=1)
    label[0, 0, 0] = 4
    phantoms.write_case_image(label_path(nn, "case_001"), label)          # label values
    result = run_check(cli, nn)
    assert result.exit_code == 1
    assert_row(result, "error", "labelsTr/case_002.nii.gz", "label file is missing")
    assert_row(result, "error", "imagesTr/case_000_0000.nii.gz", "1 voxel(s) are NaN or Inf")
    assert_row(result, "error", "labelsTr/case_001.nii.gz", "label values [4] are not declared")
    assert "3 error(s), 0 warning(s)" in summary(result)


def test_issues_can_be_saved_as_json(cli, nn: Path, tmp_path: Path) -> None:
    label_path(nn, "case_002").unlink()
    phantoms.edit_dataset_json(nn, numTraining=9)
    out = tmp_path / "issues.json"
    result = run_check(cli, nn, "--output", str(out))
    assert result.exit_code == 1
    saved = json.loads(out.read_text())
    assert {(i["severity"], i["code"], i["file"]) for i in saved} == {
        ("error", "missing-label", "labelsTr/case_002.nii.gz"),
        ("warning", "num-training-mismatch", "dataset.json"),
    }


def test_worker_pool_gives_the_same_report(cli, nn: Path) -> None:
    _, label = phantoms.ellipsoid()
    label[0, 0, 0] = 5
    phantoms.write_case_image(label_path(nn, "case_001"), label)
    single = run_check(cli, nn)
    pooled = cli("check", nn, "-j", "2")
    assert_no_traceback(pooled)
    assert (pooled.exit_code, pooled.output) == (single.exit_code, single.output) == (1, single.output)


def test_check_never_writes_into_the_dataset(cli, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    phantoms.write_nnunet_dataset(root, channels=("T1", "T2"))
    image, label = phantoms.ellipsoid()
    image[0, 0, 0] = np.inf
    phantoms.write_case_image(image_path(root, "case_001", 1), image)
    phantoms.write_case_image(label_path(root, "case_002"), label, phantoms.geometry(origin=(0.1, 0, 0)))
    (root / "imagesTr" / "._case_000_0000.nii.gz").write_bytes(b"\x00\x05")
    phantoms.edit_dataset_json(root, numTraining=4)
    before = phantoms.tree_digest(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    result = run_check(cli, root)

    assert result.exit_code == 1  # the checks did run: inf voxel
    assert phantoms.tree_digest(root) == before
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_real_hippocampus_check_exits_zero(cli, hippocampus: Path) -> None:
    result = cli("check", hippocampus)
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "220 case(s), 0 error(s)" in summary(result)


# ----------------------------------------------------------------------------------------------
# Later stages refuse a dataset with errors


def test_plan_refuses_a_dataset_with_errors(cli, nn: Path, tmp_path: Path) -> None:
    _, label = phantoms.ellipsoid()
    label[0, 0, 0] = 9
    phantoms.write_case_image(label_path(nn, "case_001"), label)
    work = tmp_path / "work"

    result = cli("plan", nn, "-o", work, "-j", "1")

    assert_no_traceback(result)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "autoseg check" in lines[0] and "labelsTr/case_001.nii.gz" in lines[0]
    assert not (work / "plans.yaml").exists()
    assert not (work / "fingerprint.json").exists()
