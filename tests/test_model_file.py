"""Model files (``autoseg export`` / ``import`` / ``predict --model``) and the Python API (``autoseg.Segmenter``).

The experiments are test_predict's: tiny networks with random weights in the trainer's checkpoint
format. What is tested is that a model file predicts exactly what its WORK folder predicts, that
a damaged or hostile file is refused with one line, and that the API keeps the input's geometry.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import phantoms
from autoseg.imageio import Geometry, read_image, write_image
from autoseg.inference.model_export import export_model, import_model
from autoseg.inference.model_file import BASE_SCHEMA_VERSION, MODEL_SCHEMA_VERSION, ModelFileError, read_model, write_model_zip
from autoseg.inference.run import run
from test_predict import ORIGIN, ROTATION, TRAIN_SHAPE, TRAIN_SPACING, _assert_clean_failure, _experiment, _image

CONFIGS = ["3d_fullres", "2d"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D experiment: 3d_fullres folds 0 and 1, 2d fold 0."""
    return _experiment(tmp_path_factory.mktemp("mf3d"), phantoms.write_nnunet_dataset,
                       {"3d_fullres": (0, 1), "2d": (0,)}, shape=TRAIN_SHAPE, spacing=TRAIN_SPACING)


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    """Both configurations of ``work`` (3d_fullres folds 0 1, 2d fold 0) as a model file."""
    return export_model(work, work.parent / "model" / "exp.autoseg.zip", CONFIGS).path


@pytest.fixture(scope="module")
def work_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _experiment(tmp_path_factory.mktemp("mfpng"), phantoms.write_png_dataset, {"2d": (0,)})


@pytest.fixture(scope="module")
def model_png(work_png: Path) -> Path:
    return export_model(work_png, work_png.parent / "png.autoseg.zip").path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two anisotropic, rotated, offset cases to predict."""
    folder = tmp_path_factory.mktemp("mfin")
    _image(folder / "a.nii.gz", seed=1)
    _image(folder / "b.nii.gz", seed=2, shape=(9, 26, 17))
    return folder


def _same_outputs(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and names
    for name in names:
        if name.endswith(".npz"):
            with np.load(one / name) as a, np.load(two / name) as b:
                assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name
        else:
            (a, geometry_a), (b, geometry_b) = read_image(one / name), read_image(two / name)
            assert np.array_equal(a, b) and geometry_a == geometry_b, name


# ----------------------------------------------------------------------------------------------
# The same predictions as WORK


def test_export_import_predict_gives_the_work_predictions(work: Path, model: Path, images: Path,
                                                          tmp_path: Path) -> None:
    imported = import_model(model, tmp_path / "W2")
    assert imported.configurations == {"3d_fullres": [0, 1], "2d": [0]} and imported.checkpoint == "final"
    assert sorted(p.name for p in (tmp_path / "W2").iterdir()) == ["MODEL.md", "best.yaml", "dataset.json", "models",
                                                                    "plans.yaml"]
    run(work, [images], tmp_path / "work", CONFIGS, save_probabilities=True, device="cpu")
    from_import = run(tmp_path / "W2", [images], tmp_path / "import", save_probabilities=True, device="cpu")
    assert [(s.configuration, s.folds) for s in from_import.selections] == [("3d_fullres", (0, 1)), ("2d", (0,))]
    _same_outputs(tmp_path / "work", tmp_path / "import")


def test_predict_model_is_predict_work(work: Path, model: Path, images: Path, tmp_path: Path, cli) -> None:
    """--model with --save-uncertainty and a fold subset, and nnU-Net's "-f 0 1" spelling without WORK."""
    runs = {
        "work": ["predict", work, "-c", "3d_fullres,2d", "-f", "0", "--save-uncertainty"],
        "model": ["predict", "--model", model, "-f", "0", "--save-uncertainty"],
        "work01": ["predict", work, "-c", "3d_fullres", "-f", "0", "1"],
        "model01": ["predict", "--model", model, "-c", "3d_fullres", "-f", "0", "1"],
    }
    for name, args in runs.items():
        result = cli(*args, "-i", images, "-o", tmp_path / name, "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "2 case(s) predicted" in result.output
        assert ("of exp.autoseg.zip" in result.output) == name.startswith("model"), result.output
    assert any(p.name == "a_disagreement.nii.gz" for p in (tmp_path / "model").iterdir())
    _same_outputs(tmp_path / "work", tmp_path / "model")
    _same_outputs(tmp_path / "work01", tmp_path / "model01")


def test_predict_model_dicom_series_in_dicom_seg_out(work: Path, model: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("highdicom")
    import SimpleITK as sitk

    from autoseg import Segmenter
    from test_predict_dicom import _check_seg, _volume, write_series

    uids = write_series(tmp_path / "in" / "s1", _volume(seed=4))
    for name, source in (("work", ["-c", "3d_fullres", work]), ("model", ["-c", "3d_fullres", "--model", model])):
        result = cli("predict", *source, "-i", tmp_path / "in", "-o", tmp_path / name, "--output-format", "nifti",
                     "--output-format", "dicom-seg", "--no-tta", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["s1.dcm", "s1.nii.gz"]
    assert np.array_equal(read_image(tmp_path / "work" / "s1.nii.gz")[0], read_image(tmp_path / "model" / "s1.nii.gz")[0])
    _check_seg(tmp_path / "model" / "s1.dcm", tmp_path / "model" / "s1.nii.gz", uids, ["shell", "core"])
    segmenter = Segmenter.load(model, device="cpu", configurations=["3d_fullres"], tta=False)
    labels = segmenter(tmp_path / "in" / "s1")  # a series folder
    assert np.array_equal(sitk.GetArrayFromImage(labels), read_image(tmp_path / "model" / "s1.nii.gz")[0][0])


def test_predict_model_over_processes(model: Path, images: Path, tmp_path: Path, cli) -> None:
    one = cli("predict", "--model", model, "-i", images, "-o", tmp_path / "one", "-c", "2d", "--device", "cpu")
    two = cli("predict", "--model", model, "-i", images, "-o", tmp_path / "two", "-c", "2d", "--device", "cpu",
              "--procs", "2")
    assert one.exit_code == 0 and two.exit_code == 0, (one.output, two.output)
    assert "× 2 processes" in two.output
    _same_outputs(tmp_path / "one", tmp_path / "two")


def test_best_yaml_choice_and_postprocessing_travel(work: Path, images: Path, tmp_path: Path) -> None:
    best = work / "best.yaml"
    best.write_text("configurations: [3d_fullres]\nfolds: [1]\npostprocessing:\n  all_foreground: true\n"
                    "  per_label: []\n  labels: {shell: [1], core: [2]}\nscores: {3d_fullres: 0.5}\n", encoding="utf-8")
    try:
        summary = export_model(work, tmp_path / "best.autoseg.zip")
        from_work = run(work, [images], tmp_path / "work", device="cpu", tta=False)
    finally:
        best.unlink()
    assert [(s.configuration, s.folds) for s in summary.selections] == [("3d_fullres", (1,))] and summary.postprocessing
    from_model = run(summary.path, [images], tmp_path / "model", device="cpu", tta=False)
    assert from_model.postprocessing and from_work.postprocessing
    assert [(s.configuration, s.folds) for s in from_model.selections] == [("3d_fullres", (1,))]
    _same_outputs(tmp_path / "work", tmp_path / "model")
    card = read_model(summary.path, check_networks=False).members["MODEL.md"].decode()
    assert "Chosen by `autoseg find-best`" in card and "3d_fullres 0.500" in card


def test_imported_work_is_an_experiment_folder(model: Path, images: Path, tmp_path: Path, cli) -> None:
    result = cli("import", model, "-o", tmp_path / "W2")
    assert result.exit_code == 0, result.output
    assert "3d_fullres (folds 0 1), 2d (fold 0)" in result.output
    predicted = cli("predict", tmp_path / "W2", "-i", images, "-o", tmp_path / "out", "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    again = cli("export", tmp_path / "W2", "-o", tmp_path / "again.autoseg.zip")  # best.yaml: both configurations
    assert again.exit_code == 0, again.output
    assert read_model(tmp_path / "again.autoseg.zip").configurations == {"3d_fullres": [0, 1], "2d": [0]}
    evaluated = cli("evaluate", tmp_path / "out", tmp_path / "out", "--labels", tmp_path / "W2")
    assert evaluated.exit_code == 0 and "labels from" in evaluated.output, evaluated.output
    _assert_clean_failure(cli("find-best", tmp_path / "W2"), tmp_path / "none", "holds a model, not its experiment")
    _assert_clean_failure(cli("import", model, "-o", tmp_path / "W2"), tmp_path / "none", "not an empty folder")


# ----------------------------------------------------------------------------------------------
# The file


def test_export_twice_gives_identical_bytes(work: Path, tmp_path: Path, cli) -> None:
    first = cli("export", work, "-o", tmp_path / "a" / "m.autoseg.zip", "-c", "2d")
    second = cli("export", work, "-o", tmp_path / "b" / "m.autoseg.zip", "-c", "2d")
    assert first.exit_code == 0 and second.exit_code == 0, (first.output, second.output)
    assert (tmp_path / "a" / "m.autoseg.zip").read_bytes() == (tmp_path / "b" / "m.autoseg.zip").read_bytes()
    digest = [line for line in first.output.splitlines() if line.startswith("sha256 ")]
    assert digest and digest == [line for line in second.output.splitlines() if line.startswith("sha256 ")]


def test_export_refuses_to_overwrite_without_force(work: Path, tmp_path: Path, cli) -> None:
    target = tmp_path / "m.autoseg.zip"
    target.write_bytes(b"keep me")
    result = cli("export", work, "-o", target, "-c", "2d")
    assert result.exit_code == 2 and result.output.startswith("error:") and "--force" in result.output
    assert target.read_bytes() == b"keep me"
    assert cli("export", work, "-o", target, "-c", "2d", "--force").exit_code == 0
    assert read_model(target).configurations == {"2d": [0]}
    _assert_clean_failure(cli("export", work, "-o", tmp_path / "x.zip", "--checkpoint", "latest"), tmp_path / "none",
                          "unknown checkpoint 'latest'")
    _assert_clean_failure(cli("export", work, "-o", tmp_path / "x.zip"), tmp_path / "none",
                          "several configurations are trained")
    assert not (tmp_path / "x.zip").exists()


def test_members_card_and_manifest(work: Path, model: Path) -> None:
    parsed = read_model(model)
    with zipfile.ZipFile(model) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
        contents = b"".join(archive.read(n) for n in names)
    assert names == ["MODEL.md", "best.yaml", "dataset.json", "manifest.json", "plans.yaml",
                     "weights/2d/fold_0.json", "weights/2d/fold_0.npz", "weights/3d_fullres/fold_0.json",
                     "weights/3d_fullres/fold_0.npz", "weights/3d_fullres/fold_1.json", "weights/3d_fullres/fold_1.npz"]
    manifest = parsed.manifest
    assert manifest["schema_version"] == BASE_SCHEMA_VERSION == 1 and manifest["task"] == "segmentation"
    assert manifest["configurations"] == {"3d_fullres": {"folds": [0, 1], "checkpoint": "final"},
                                          "2d": {"folds": [0], "checkpoint": "final"}}
    # No case ids or paths of the experiment leave it.
    record = json.loads((work / "dataset.json").read_text())
    for leak in (*record["cases"], record["source"], str(work)):
        assert leak.encode() not in contents, leak
    card = parsed.members["MODEL.md"].decode()
    for needle in ("| shell | 1 |", "Not validated", "not stated — ask the model's author", "5 labelled cases",
                   "autoseg predict --model exp.autoseg.zip -i IMAGES -o OUT", "| 3d_fullres | 1 | final | 1 |"):
        assert needle in card, needle


# ----------------------------------------------------------------------------------------------
# Damaged and hostile files: one line each, nothing written


def _members(path: Path) -> tuple[dict[str, bytes], dict]:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    return members, json.loads(members.pop("manifest.json"))


def _rewritten(source: Path, target: Path, members: dict[str, bytes], manifest: dict) -> Path:
    """``members`` with a manifest whose hashes fit them (what a forger would write)."""
    write_model_zip(target, members, {k: v for k, v in manifest.items() if k != "members"})
    return target


def _with_entry(source: Path, target: Path, info: zipfile.ZipInfo, data: bytes, replace: bool = False) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            if not (replace and item.filename == info.filename):
                new.writestr(item, old.read(item))
        new.writestr(info, data)
    return target


def _tampered(model: Path, tmp: Path) -> Path:
    members, manifest = _members(model)
    data = bytearray(members["weights/2d/fold_0.npz"])
    data[-100] ^= 0xFF
    members["weights/2d/fold_0.npz"] = bytes(data)
    members["manifest.json"] = json.dumps(manifest).encode()
    target = tmp / "tampered.autoseg.zip"
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in sorted(members.items()):
            archive.writestr(name, content)
    return target


def _pickle_npz(model: Path, tmp: Path) -> Path:
    members, manifest = _members(model)
    members["weights/2d/fold_0.npz"] = pickle.dumps({"weights": [1, 2, 3]}, protocol=4)
    return _rewritten(model, tmp / "pickle.autoseg.zip", members, manifest)


def _torch_npz(model: Path, tmp: Path) -> Path:
    import torch

    members, manifest = _members(model)
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buffer)
    members["weights/2d/fold_0.npz"] = buffer.getvalue()
    return _rewritten(model, tmp / "torch.autoseg.zip", members, manifest)


def _object_array_npz(model: Path, tmp: Path) -> Path:
    members, manifest = _members(model)
    buffer = io.BytesIO()
    np.savez(buffer, weight=np.array([{"x": 1}], dtype=object))
    members["weights/2d/fold_0.npz"] = buffer.getvalue()
    return _rewritten(model, tmp / "object.autoseg.zip", members, manifest)


def _newer_schema(model: Path, tmp: Path) -> Path:
    members, manifest = _members(model)
    manifest.update(schema_version=MODEL_SCHEMA_VERSION + 1, autoseg_version="9.0.0", shiny_new_key=True)
    return _rewritten(model, tmp / "newer.autoseg.zip", members, manifest)


def _entry(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system, info.external_attr = 3, mode << 16
    return info


def _truncated(model: Path, tmp: Path) -> Path:
    target = tmp / "truncated.autoseg.zip"
    target.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return target


def _not_a_zip(model: Path, tmp: Path) -> Path:
    target = tmp / "notes.autoseg.zip"
    target.write_text("a model, trust me\n")
    return target


HOSTILE = {
    "tampered member": (_tampered, "weights/2d/fold_0.npz: does not match the sha256 in manifest.json"),
    "zip-slip": (lambda m, t: _with_entry(m, t / "slip.zip", _entry("../../evil.sh"), b"rm -rf ~"), "zip-slip"),
    "zip-slip inside": (lambda m, t: _with_entry(m, t / "slip2.zip", _entry("weights/../../x.json"), b"{}"), "zip-slip"),
    "absolute path": (lambda m, t: _with_entry(m, t / "abs.zip", _entry("/etc/cron.d/evil"), b"* * * * *"),
                      "an absolute path"),
    "symbolic link": (lambda m, t: _with_entry(m, t / "link.zip", _entry("MODEL.md", stat.S_IFLNK | 0o777),
                                               b"/etc/passwd", replace=True), "a symbolic link"),
    "unknown member": (lambda m, t: _with_entry(m, t / "extra.zip", _entry("notes.txt"), b"hello"),
                       "'notes.txt': not a member of an autoseg model file"),
    "pickle file": (lambda m, t: _with_entry(m, t / "pkl.zip", _entry("weights/2d/data.pkl"), b"\x80\x04N."),
                    "holds pickled data"),
    "duplicate": (lambda m, t: _with_entry(m, t / "dup.zip", _entry("MODEL.md"), b"# another card"), "appears twice"),
    "pickle under .npz": (_pickle_npz, "weights/2d/fold_0.npz: holds pickled data, which autoseg never loads"),
    "torch.save under .npz": (_torch_npz, "weights/2d/fold_0.npz: holds pickled data"),
    "object array": (_object_array_npz, "weights/2d/fold_0.npz: holds pickled data"),
    "truncated": (_truncated, "truncated or damaged zip"),
    "not a zip": (_not_a_zip, "not a zip file, so not an autoseg model file"),
    "newer schema": (_newer_schema, f"written by autoseg 9.0.0 with model schema {MODEL_SCHEMA_VERSION + 1}; this "
                                    f"autoseg (0.1.0) reads up to schema {MODEL_SCHEMA_VERSION}: upgrade autoseg"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # zipfile warns about the duplicate name it is asked to write
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_model_file_is_one_line_and_writes_nothing(case: str, model: Path, images: Path, tmp_path: Path,
                                                         cli) -> None:
    make, needle = HOSTILE[case]
    bad = make(model, tmp_path)
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", "--model", bad, "-i", images, "-o", out), out, needle, 2)
    _assert_clean_failure(cli("import", bad, "-o", tmp_path / "W2"), tmp_path / "W2", needle, 2)
    assert not (tmp_path / "W2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    with pytest.raises(ModelFileError, match="^" + re.escape(str(bad))):
        from autoseg import Segmenter

        Segmenter.load(bad, device="cpu")


def test_wrong_model_arguments_are_one_line(work: Path, model: Path, images: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    cases = [
        (("predict", work, "--model", model), "not both"),
        (("predict",), "give the model either as WORK"),
        (("predict", model), "a file, not an experiment folder; for a model file use --model"),
        (("predict", "--model", work), "a folder; give an experiment folder as WORK"),
        (("predict", "--model", tmp_path / "nope.autoseg.zip"), "not found"),
        (("predict", "--model", model, "--checkpoint", "best"), "holds the final checkpoint of each fold"),
        (("predict", "--model", model, "-c", "3d_fulres"), "unknown configuration '3d_fulres'; did you mean"),
        (("predict", "--model", model, "-c", "2.5d"), "configuration '2.5d' has no trained fold"),
        (("predict", "--model", model, "-c", "2d", "-f", "1"), "2d fold(s) [1] not trained"),
    ]
    for args, needle in cases:
        _assert_clean_failure(cli(*args, "-i", images, "-o", out), out, needle, 2)


# ----------------------------------------------------------------------------------------------
# The Python API


def test_segmenter_keeps_the_input_geometry_and_matches_the_cli(model: Path, images: Path, tmp_path: Path,
                                                                cli) -> None:
    import SimpleITK as sitk

    from autoseg import Segmenter

    result = cli("predict", "--model", model, "-i", images, "-o", tmp_path / "cli", "--device", "cpu",
                 "--save-probabilities")
    assert result.exit_code == 0, result.output
    segmenter = Segmenter.load(model, device="cpu")
    assert segmenter.configurations == {"3d_fullres": (0, 1), "2d": (0,)} and segmenter.channel_names == ("MRI",)
    assert "Segmenter(3d_fullres folds 0 1, 2d folds 0" in repr(segmenter)
    source = images / "a.nii.gz"
    image = sitk.ReadImage(str(source))
    expected, geometry = read_image(tmp_path / "cli" / "a.nii.gz")
    for given in (image, source, str(source), [source]):
        labels = segmenter(given)
        assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
        assert labels.GetOrigin() == image.GetOrigin() and labels.GetDirection() == image.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(labels), expected[0])
    array = sitk.GetArrayFromImage(image)
    spacing = image.GetSpacing()[::-1]
    label_array, probabilities = segmenter.predict_array(array, spacing)
    assert np.array_equal(label_array, expected[0])
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, *array.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(probabilities, 0), label_array)
    with np.load(tmp_path / "cli" / "a.npz") as saved:
        np.testing.assert_allclose(saved["probabilities"], probabilities, atol=1e-3)  # the CLI's are float16
    # With a channel axis, and origin/direction (which do not change the prediction).
    again, _ = segmenter.predict_array(array[None], spacing, ORIGIN, ROTATION)
    assert np.array_equal(again, label_array)


def test_segmenter_from_work_equals_from_model(work: Path, model: Path, images: Path) -> None:
    from autoseg import Segmenter

    image, geometry = read_image(images / "b.nii.gz")
    spacing = geometry.spacing
    from_model = Segmenter.load(model, device="cpu", configurations=["2d"])
    from_work = Segmenter.load(work, device="cpu", configurations=["2d"])
    assert np.array_equal(from_model.predict_array(image[0], spacing)[0], from_work.predict_array(image[0], spacing)[0])


def test_segmenter_on_a_2d_png_model(work_png: Path, model_png: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from autoseg import Segmenter

    image, _ = phantoms.ellipsoid((21, 25))
    source = phantoms.write_case_image(tmp_path / "img.png", np.clip(image, 0, 255).astype(np.uint8))
    [written] = run(work_png, [source], tmp_path / "out").written
    expected = read_image(written)[0][0, 0]
    segmenter = Segmenter.load(model_png, device="cpu")
    assert segmenter.is_2d
    picture = sitk.ReadImage(str(source))
    labels = segmenter(picture)
    assert labels.GetDimension() == 2 and labels.GetSize() == picture.GetSize()
    assert labels.GetSpacing() == picture.GetSpacing() and labels.GetOrigin() == picture.GetOrigin()
    assert np.array_equal(sitk.GetArrayFromImage(labels), expected)
    label_array, probabilities = segmenter.predict_array(sitk.GetArrayFromImage(picture), picture.GetSpacing()[::-1])
    assert label_array.shape == (21, 25) and probabilities.shape[1:] == (21, 25)
    assert np.array_equal(label_array, expected)
    from autoseg.errors import DatasetError

    with pytest.raises(DatasetError, match=r"expected \(Y, X\) or \(C, Y, X\)"):
        segmenter.predict_array(np.zeros((2, 3, 21, 25)), (1.0, 1.0))
    with pytest.raises(DatasetError, match="expected 2 positive sizes"):
        segmenter.predict_array(np.zeros((21, 25)), (1.0, 1.0, 1.0))


def test_segmenter_is_safe_to_share_between_threads(model: Path, images: Path) -> None:
    from autoseg import Segmenter

    segmenter = Segmenter.load(model, device="cpu", configurations=["2d"], tta=False)
    cases = [read_image(images / name) for name in ("a.nii.gz", "b.nii.gz")] * 2
    sequential = [segmenter.predict_array(image[0], geometry.spacing)[0] for image, geometry in cases]
    calls_before = segmenter.stats.forward_calls
    results: list[np.ndarray | None] = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def work(index: int) -> None:
        image, geometry = cases[index]
        barrier.wait()
        results[index] = segmenter.predict_array(image[0], geometry.spacing)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None and np.array_equal(r, s) for r, s in zip(results, sequential))
    assert segmenter.stats.forward_calls == 2 * calls_before  # every call counted once


def test_readme_segmenter_example_runs_and_matches_the_cli(model: Path, images: Path, tmp_path: Path) -> None:
    """README's Segmenter block, run as written (paths swapped in), gives predict --model's label map."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- python-api-segmenter -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    out = tmp_path / "api.nii.gz"
    code = (block.replace('"hippo.autoseg.zip"', repr(str(model))).replace('"case_0000.nii.gz"',
                                                                             repr(str(images / "a.nii.gz")))
            .replace('"case.nii.gz"', repr(str(out))))
    namespace: dict = {}
    exec(compile(code, "README.md python-api-segmenter", "exec"), namespace)  # noqa: S102 - our own README
    run(model, [images / "a.nii.gz"], tmp_path / "cli", device="cpu")
    expected, geometry = read_image(tmp_path / "cli" / "a.nii.gz")
    written, written_geometry = read_image(out)
    assert np.array_equal(written, expected) and written_geometry == geometry
    assert np.array_equal(namespace["label_array"], expected[0])


def test_import_autoseg_stays_light() -> None:
    code = ("import sys, autoseg\n"
            "assert autoseg.__version__\n"
            "bad = [m for m in ('torch', 'numpy', 'SimpleITK') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "assert autoseg.Segmenter.__name__ == 'Segmenter'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_geometry_of_a_2d_sitk_image_round_trips() -> None:
    from autoseg.imageio import from_sitk, to_sitk

    geometry = Geometry((999.0, 0.5, 0.25), (3.0, -2.0), (math.cos(0.3), -math.sin(0.3), math.sin(0.3), math.cos(0.3)), 2)
    image = to_sitk(np.arange(12, dtype=np.uint8).reshape(1, 3, 4), geometry)
    array, read = from_sitk(image)
    assert array.shape == (1, 1, 3, 4) and read == geometry


def test_write_image_of_api_output(model: Path, images: Path, tmp_path: Path) -> None:
    """The label map of predict_array written with the input's geometry equals the CLI's file."""
    from autoseg import Segmenter

    image, geometry = read_image(images / "a.nii.gz")
    labels, _ = Segmenter.load(model, device="cpu", configurations=["2d"]).predict_array(image, geometry.spacing)
    write_image(tmp_path / "a.nii.gz", labels, geometry)
    run(model, [images / "a.nii.gz"], tmp_path / "cli", ["2d"], device="cpu")
    assert np.array_equal(read_image(tmp_path / "a.nii.gz")[0], read_image(tmp_path / "cli" / "a.nii.gz")[0])
