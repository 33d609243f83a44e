"""Inference engines (``--engine``, ``--precision``) and model files with ONNX graphs (``export --format onnx``).

The choice of engine is a pure function, tested on every branch. The ONNX engines run where their
packages are installed (the test extra installs them; elsewhere those tests skip): a tiny network's
ONNX graph matches torch within 1e-4 in fp32, its int8 graph runs, and a model file carrying graphs
predicts what its WORK folder predicts on the same engine. Accuracy and speed of bf16 and int8 are
measured in benchmarks/README.md, not asserted here.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import phantoms
import pytest
from test_model_file import _members, _rewritten, _same_outputs, images  # noqa: F401 - images: a fixture
from test_predict import (
    TRAIN_SHAPE,
    TRAIN_SPACING,
    _assert_clean_failure,
    _experiment,
)

from autoseg.errors import ConfigError
from autoseg.inference.engines import (
    EngineChoice,
    check_onnx_graph,
    choose_engine,
    installed,
)
from autoseg.inference.model_export import export_model, import_model
from autoseg.inference.model_file import (
    BASE_SCHEMA_VERSION,
    MODEL_SCHEMA_VERSION,
    read_model,
)
from autoseg.inference.run import run

needs_onnx = pytest.mark.skipif(not installed("onnx"), reason="onnx not installed (pip install 'autoseg[onnx]')")
needs_ort = pytest.mark.skipif(not installed("onnxruntime"), reason="pip install 'autoseg[onnx]'")
needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="pip install 'autoseg[openvino]'")


# ----------------------------------------------------------------------------------------------
# Choosing the engine (pure)


def _choose(engine: str = "auto", precision: str = "auto", *, device: str = "cpu", int8: bool = False,
            have: tuple[str, ...] = ("openvino", "onnxruntime"), bf16: bool = True) -> EngineChoice:
    return choose_engine(engine, precision, device_type=device, has_int8=int8, available=lambda e: e in have,
                         bf16_units=bf16)


@pytest.mark.parametrize("args, kwargs, expected", [
    (("auto", "auto"), {}, ("openvino", "bf16")),
    (("auto", "auto"), {"bf16": False}, ("openvino", "fp32")),
    (("auto", "auto"), {"bf16": False, "int8": True}, ("openvino", "fp32")),  # int8 only when asked for
    (("auto", "auto"), {"int8": True}, ("openvino", "bf16")),  # bf16 measured faster and closer to fp32
    (("auto", "int8"), {"int8": True}, ("openvino", "int8")),
    (("auto", "auto"), {"have": ()}, ("torch", "fp32")),
    (("auto", "fp32"), {"have": ()}, ("torch", "fp32")),
    (("torch", "auto"), {}, ("torch", "fp32")),
    (("onnxruntime", "auto"), {}, ("onnxruntime", "fp32")),
    (("onnxruntime", "auto"), {"int8": True}, ("onnxruntime", "int8")),
    (("onnxruntime", "fp32"), {"int8": True}, ("onnxruntime", "fp32")),
    (("openvino", "fp32"), {"int8": True}, ("openvino", "fp32")),
    (("auto", "auto"), {"device": "cuda"}, ("torch", "amp")),
    (("torch", "fp32"), {"device": "cuda"}, ("torch", "fp32")),
    (("auto", "auto"), {"device": "mps"}, ("torch", "fp32")),
])
def test_engine_choice(args, kwargs, expected) -> None:
    choice = _choose(*args, **kwargs)
    assert (choice.engine, choice.precision) == expected


def test_auto_without_openvino_says_how_to_get_it() -> None:
    assert "pip install 'autoseg[openvino]'" in _choose(have=()).describe()


@pytest.mark.parametrize("args, kwargs, needle", [
    (("tensorrt", "auto"), {}, "unknown engine 'tensorrt'"),
    (("auto", "fp8"), {}, "unknown precision 'fp8'"),
    (("openvino", "auto"), {"device": "cuda"}, "runs on the CPU only"),
    (("auto", "int8"), {"device": "cuda"}, "on cuda the torch engine runs autocast"),
    (("torch", "bf16"), {}, "the torch engine runs fp32 on the CPU"),
    (("auto", "bf16"), {"have": ()}, "needs OpenVINO: pip install 'autoseg[openvino]'"),
    (("openvino", "auto"), {"have": ()}, "not installed; pip install 'autoseg[openvino]'"),
    (("onnxruntime", "auto"), {"have": ("openvino",)}, "not installed; pip install 'autoseg[onnx]'"),
    (("openvino", "int8"), {}, "the model has no int8 graphs; export it with"),
    (("onnxruntime", "bf16"), {}, "no bf16 kernels"),
    (("openvino", "bf16"), {"bf16": False}, "this CPU has no bf16 units"),
])
def test_impossible_engine_choices_say_why(args, kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        _choose(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# ONNX graphs of a tiny network


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D experiment (3d_fullres folds 0 and 1, 2.5d fold 0), preprocessed for int8 calibration."""
    from autoseg.preprocessing import run as preprocessing

    work = _experiment(tmp_path_factory.mktemp("eng"), phantoms.write_nnunet_dataset,
                       {"3d_fullres": (0, 1), "2.5d": (0,)}, shape=TRAIN_SHAPE, spacing=TRAIN_SPACING)
    preprocessing.run(work, ["3d_fullres", "2.5d"], workers=1)
    return work


def _network(work: Path, configuration: str = "3d_fullres", fold: int = 0):  # noqa: ANN202
    from autoseg import plans as plans_io
    from autoseg.checkpoint import load_checkpoint
    from autoseg.inference.models import build_inference_network, checkpoint_path

    path = checkpoint_path(work, configuration, fold)
    data = load_checkpoint(path, ("model", "plans"))
    config = plans_io.load(work / "plans.yaml").configuration(configuration)
    return build_inference_network(config, int(data["plans"]["num_classes"]), data["model"], path), config


def _windows(config, batch: int = 2, seed: int = 0):  # noqa: ANN001, ANN202
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, config.input_channels, *config.patch_size), generator=generator)


@needs_ort
@pytest.mark.parametrize("configuration", ["3d_fullres", "2.5d"])
def test_onnx_fp32_matches_torch(work: Path, configuration: str) -> None:
    import torch

    from autoseg.inference.engines import OnnxRuntimeNetwork
    from autoseg.inference.onnx_export import network_to_onnx

    net, config = _network(work, configuration)
    graph = network_to_onnx(net, (1, config.input_channels, *config.patch_size), weights_sha256="ab" * 32)
    checked = check_onnx_graph(graph, "test", input_channels=config.input_channels, num_classes=3, dims=config.dims)
    assert checked.metadata == {"autoseg_weights_sha256": "ab" * 32}
    x = _windows(config)
    with torch.inference_mode():
        expected = net(x)
    got = OnnxRuntimeNetwork(checked.data, threads=1)(x)  # batch 2 through the dynamic batch axis
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert network_to_onnx(net, (1, config.input_channels, *config.patch_size), weights_sha256="ab" * 32) == graph


@needs_openvino
def test_openvino_runs_the_graph_at_every_batch_shape(work: Path) -> None:
    import torch

    from autoseg.inference.engines import OpenVinoNetwork
    from autoseg.inference.onnx_export import network_to_onnx

    net, config = _network(work)
    graph = network_to_onnx(net, (1, config.input_channels, *config.patch_size), weights_sha256="ab" * 32)
    engine = OpenVinoNetwork(graph, "fp32", threads=1)
    for batch in (2, 1, 2):
        x = _windows(config, batch, seed=batch)
        with torch.inference_mode():
            expected = net(x)
        got = engine(x)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-3, rtol=0)


@needs_ort
def test_int8_graph_runs_on_a_tiny_network(work: Path) -> None:
    import torch

    from autoseg.inference.engines import OnnxRuntimeNetwork
    from autoseg.inference.onnx_export import calibration_windows, quantize_int8

    net, config = _network(work)
    windows = calibration_windows(work, "3d_fullres", config, 3, fold=0, cases=3)
    assert len(windows) == 3 and all(w.shape == (1, config.input_channels, *config.patch_size) for w in windows)
    graph = quantize_int8(net, (1, config.input_channels, *config.patch_size), windows, weights_sha256="ab" * 32)
    checked = check_onnx_graph(graph, "test", input_channels=1, num_classes=3, dims=3)
    x = torch.from_numpy(np.concatenate(windows[:2]))
    got = OnnxRuntimeNetwork(checked.data, threads=1)(x)
    assert got.shape == (2, 3, *config.patch_size) and torch.isfinite(got).all()
    with torch.inference_mode():
        expected = net(x)
    # int8 stays close to fp32: the error is small against the logits' spread.
    assert float((got - expected).abs().mean()) < 0.1 * float(expected.std())


def test_calibration_crops_large_windows() -> None:
    from autoseg.inference.onnx_export import calibration_patch

    assert calibration_patch((128, 128, 128), (32, 32, 32)) == (64, 64, 64)
    assert calibration_patch((40, 56, 40), (8, 8, 8)) == (40, 56, 40)  # 89 600 voxels: kept
    assert calibration_patch((512, 512), (64, 64)) == (512, 512)  # 2**18 exactly


# ----------------------------------------------------------------------------------------------
# Graphs that are not ours


def _graph_with(make) -> bytes:  # noqa: ANN001
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 1, 1, 1, 1], [1.0, 1.0, 1.0])
    node = helper.make_node("Conv", ["x", "w"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 4, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3, 4, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    make(model)
    return model.SerializeToString()


@needs_onnx
def test_check_onnx_graph_accepts_a_plain_graph() -> None:
    check_onnx_graph(_graph_with(lambda m: None), "g.onnx", input_channels=1, num_classes=3, dims=3)


def _external(model) -> None:  # noqa: ANN001

    _point_outside(model.graph.initializer[0])


def _point_outside(tensor) -> None:  # noqa: ANN001
    import onnx

    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"


def _external_in_a_subgraph(model) -> None:  # noqa: ANN001
    """An If node whose branch holds an initializer stored outside (found by a review: OpenVINO
    read any file this way before the check walked every tensor)."""
    from onnx import TensorProto, helper

    hidden = helper.make_tensor("h", TensorProto.FLOAT, [1], [0.0])
    _point_outside(hidden)
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])], [hidden])
    model.graph.node.append(helper.make_node("If", ["c"], ["unused"], then_branch=branch, else_branch=branch))


def _external_in_a_constant(model) -> None:  # noqa: ANN001
    from onnx import TensorProto, helper

    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    _point_outside(value)
    model.graph.node.append(helper.make_node("Constant", [], ["k"], value=value))


def _sparse_initializer(model) -> None:  # noqa: ANN001
    from onnx import TensorProto, helper

    values = helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))


def _unknown_operator(model) -> None:  # noqa: ANN001
    model.graph.node[0].op_type = "NotAnOp"


def _double_input(model) -> None:  # noqa: ANN001
    from onnx import TensorProto

    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE


def _custom_domain(model) -> None:  # noqa: ANN001
    model.graph.node[0].domain = "com.evil"


def _wrong_channels(model) -> None:  # noqa: ANN001
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5


@needs_onnx
@pytest.mark.parametrize("make, needle", [
    (_external, "stored outside the graph (external data"),
    (_external_in_a_subgraph, "stored outside the graph (external data"),
    (_external_in_a_constant, "stored outside the graph (external data"),
    (_sparse_initializer, "sparse tensors"),
    (_custom_domain, "operators of domain(s) ['com.evil']"),
    (_unknown_operator, "operator 'NotAnOp'"),
    (_wrong_channels, "expected float32 logits (batch, 3, 3 spatial sizes)"),
    (_double_input, "expected float32 x (batch, 1, 3 spatial sizes)"),
])
def test_check_onnx_graph_refuses(make, needle: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as info:
        check_onnx_graph(_graph_with(make), "g.onnx", input_channels=1, num_classes=3, dims=3)
    assert str(info.value).startswith("g.onnx: ") and needle in str(info.value)


@needs_onnx
def test_check_onnx_graph_refuses_garbage() -> None:
    with pytest.raises(ConfigError, match="not a readable ONNX graph"):
        check_onnx_graph(b"\x08\x07garbage" * 50, "g.onnx", input_channels=1, num_classes=3, dims=3)


# ----------------------------------------------------------------------------------------------
# Model files with graphs


@pytest.fixture(scope="module")
def onnx_model(work: Path) -> Path:
    if not installed("onnxruntime"):
        pytest.skip("pip install 'autoseg[onnx]'")
    return export_model(work, work.parent / "model" / "exp.onnx.zip", ["3d_fullres"], onnx=True, int8=True,
                        calibration_cases=3).path


def test_export_without_graphs_stays_schema_1(work: Path, tmp_path: Path) -> None:
    path = export_model(work, tmp_path / "plain.autoseg.zip", ["3d_fullres"]).path
    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    assert manifest["schema_version"] == BASE_SCHEMA_VERSION == 1
    assert "onnx" not in manifest["configurations"]["3d_fullres"]
    assert not any(n.startswith("onnx/") for n in zipfile.ZipFile(path).namelist())


def test_model_file_carries_checked_graphs(onnx_model: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(onnx_model).namelist()
    assert {f"onnx/3d_fullres/fold_{f}.{k}.onnx" for f in (0, 1) for k in ("fp32", "int8")} <= set(names)
    manifest = json.loads(zipfile.ZipFile(onnx_model).read("manifest.json"))
    assert manifest["schema_version"] == MODEL_SCHEMA_VERSION == 2
    assert manifest["configurations"]["3d_fullres"]["onnx"] == ["fp32", "int8"]
    parsed = read_model(onnx_model)
    assert sorted(parsed.graphs) == [("3d_fullres", f, k) for f in (0, 1) for k in ("fp32", "int8")]
    summary = import_model(parsed, tmp_path / "W2")
    fold = summary.work / "models" / "3d_fullres" / "fold_0"
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_final.fp32.onnx", "checkpoint_final.int8.onnx",
                                                       "checkpoint_final.pt"]


@needs_openvino
def test_model_graphs_predict_as_work_on_openvino(work: Path, onnx_model: Path, images: Path, tmp_path: Path,
                                                  cli) -> None:
    """The file's fp32 graph and the one exported at load from WORK's weights are the same graph."""
    for name, source in (("work", [work]), ("model", ["--model", onnx_model])):
        result = cli("predict", *source, "-c", "3d_fullres", "-i", images, "-o", tmp_path / name, "--device", "cpu",
                     "--engine", "openvino", "--precision", "fp32", "--save-probabilities")
        assert result.exit_code == 0, result.output
        assert "openvino fp32" in result.output
    _same_outputs(tmp_path / "work", tmp_path / "model")


def test_torch_engine_ignores_the_graphs(work: Path, onnx_model: Path, images: Path, tmp_path: Path) -> None:
    run(work, [images], tmp_path / "work", ["3d_fullres"], device="cpu", engine="torch", save_probabilities=True)
    imported = import_model(onnx_model, tmp_path / "W2").work
    for graph in imported.glob("models/*/fold_*/*.onnx"):
        graph.write_bytes(b"not a graph")  # the torch engine never reads them
    summary = run(imported, [images], tmp_path / "model", device="cpu", engine="torch", save_probabilities=True)
    assert "torch fp32" in summary.device
    _same_outputs(tmp_path / "work", tmp_path / "model")


@needs_ort
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_int8_predicts_from_the_model_file(engine: str, onnx_model: Path, images: Path, tmp_path: Path, cli) -> None:
    if not installed(engine):
        pytest.skip(f"{engine} not installed")
    result = cli("predict", "--model", onnx_model, "-i", images, "-o", tmp_path / "out", "--device", "cpu",
                 "--engine", engine, "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert f"{engine} int8" in result.output and "2 case(s) predicted" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz"]


def _retrain(checkpoint: Path) -> None:
    """New weights in ``checkpoint`` (as if the fold were trained again after the import); its
    file times are left as they were, so only the content tells the graphs are stale."""
    import torch

    from autoseg.checkpoint import save_checkpoint

    times = checkpoint.stat()
    payload = torch.load(checkpoint, weights_only=True)
    for tensor in payload["model"].values():
        if tensor.is_floating_point():
            tensor.mul_(1.5).add_(0.1)
    save_checkpoint(checkpoint, payload)
    os.utime(checkpoint, (times.st_atime, times.st_mtime))


@needs_ort
def test_a_graph_made_from_other_weights_is_not_used(onnx_model: Path, images: Path, tmp_path: Path, cli) -> None:
    work = import_model(onnx_model, tmp_path / "W2").work
    _retrain(work / "models" / "3d_fullres" / "fold_1" / "checkpoint_final.pt")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work, "-i", images, "-o", out, "--device", "cpu", "--engine", "onnxruntime",
                              "--precision", "int8"), out, "no int8 graph made from these weights", 2)
    for name, engine in (("ort", "onnxruntime"), ("torch", "torch")):
        result = cli("predict", work, "-i", images, "-o", tmp_path / name, "--device", "cpu", "--engine", engine,
                     "--precision", "fp32", "--save-probabilities")
        assert result.exit_code == 0 and f"{engine} fp32" in result.output, result.output
    # fold 1's graph was exported again from its new weights: ONNX Runtime predicts what torch does.
    for case in ("a", "b"):
        with np.load(tmp_path / "ort" / f"{case}.npz") as one, np.load(tmp_path / "torch" / f"{case}.npz") as two:
            assert np.abs(one["probabilities"].astype(np.float32) - two["probabilities"].astype(np.float32)).max() < 2e-3


def test_wrong_engine_options_are_one_line(work: Path, images: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    for args, needle in ((["--engine", "tensorrt"], "unknown engine 'tensorrt'"),
                         (["--precision", "int8"], "--precision int8: the model has no int8 graphs"),
                         (["--engine", "torch", "--precision", "bf16"], "the torch engine runs fp32 on the CPU")):
        _assert_clean_failure(cli("predict", work, "-c", "3d_fullres", "-i", images, "-o", out, "--device", "cpu", *args),
                              out, needle, 2)
    _assert_clean_failure(cli("export", work, "-o", tmp_path / "m.zip", "--int8"), tmp_path / "nothing",
                          "--int8: int8 graphs are ONNX graphs; add --format onnx", 2)
    _assert_clean_failure(cli("export", work, "-o", tmp_path / "m.zip", "--format", "tflite"), tmp_path / "nothing",
                          "unknown format 'tflite'", 2)
    assert not (tmp_path / "m.zip").exists()


@needs_onnx
@pytest.mark.parametrize("case, needle", [
    ("extra graph", "'onnx/3d_fullres/fold_7.fp32.onnx' is in the zip but not in the manifest"),
    ("unlisted kind", "do not match the ONNX graphs in the zip"),
    ("bad kind name", "not a member of an autoseg model file"),
    ("schema 1 with graphs", "optionally onnx (fp32, or fp32 and int8; schema 2)"),
    ("unhashable kinds", "optionally onnx (fp32, or fp32 and int8; schema 2)"),
    ("external data", "stored outside the graph (external data"),
])
def test_a_bad_graph_member_is_one_line(case: str, needle: str, onnx_model: Path, images: Path, tmp_path: Path,
                                        cli) -> None:
    members, manifest = _members(onnx_model)
    entry = manifest["configurations"]["3d_fullres"]
    if case == "extra graph":
        with zipfile.ZipFile(onnx_model) as old, zipfile.ZipFile(tmp_path / "bad.zip", "w") as new:
            for item in old.infolist():
                new.writestr(item, old.read(item))
            new.writestr("onnx/3d_fullres/fold_7.fp32.onnx", b"x")
        bad = tmp_path / "bad.zip"
    else:
        if case == "unlisted kind":
            entry["onnx"] = ["fp32"]
        elif case == "bad kind name":
            members["onnx/3d_fullres/fold_0.fp16.onnx"] = members["onnx/3d_fullres/fold_0.fp32.onnx"]
        elif case == "schema 1 with graphs":
            manifest["schema_version"] = 1
        elif case == "unhashable kinds":
            entry["onnx"] = ["fp32", ["int8"]]
        elif case == "external data":
            import onnx

            model = onnx.load_model_from_string(members["onnx/3d_fullres/fold_0.fp32.onnx"])
            _external(model)
            members["onnx/3d_fullres/fold_0.fp32.onnx"] = model.SerializeToString()
        bad = _rewritten(onnx_model, tmp_path / "bad.zip", members, manifest)
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", "--model", bad, "-i", images, "-o", out), out, needle, 2)
