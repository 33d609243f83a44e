"""Prediction: the sliding window, TTA, fold averaging, export geometry, the CLI, and fold validation.

Networks are tiny (the ``tiny`` preset on 16×14×12 phantoms) with random weights saved in the
trainer's checkpoint format: what is tested is where predictions go, not how good they are.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import phantoms
from autoseg import plans as plans_io
from autoseg.checkpoint import CHECKPOINT_FORMAT
from autoseg.errors import ConfigError, DatasetError, UnknownNameError
from autoseg.imageio import Geometry, read_image, read_info, write_image
from autoseg.plans import Configuration
from autoseg.tasks.base import ConfigPrediction
from autoseg.inference.predictor import Predictor
from autoseg.tasks.segmentation_export import export_prediction
from autoseg.inference.inputs import find_input_cases
from autoseg.inference.run import run
from autoseg.inference.models import select_models
from autoseg.inference.window import (
    count_windows,
    gaussian_importance,
    mirror_combinations,
    sliding_window,
    window_starts,
)

#: Training phantoms: the coarse axis last, so the plan transposes (2, 0, 1) and the inverse is exercised.
TRAIN_SHAPE = (16, 14, 12)
TRAIN_SPACING = (0.8, 0.8, 3.0)
#: A rotation about z by 30° (ITK row-major direction cosines), and an origin that is not 0.
ROTATION = (math.cos(math.pi / 6), -math.sin(math.pi / 6), 0.0,
            math.sin(math.pi / 6), math.cos(math.pi / 6), 0.0,
            0.0, 0.0, 1.0)
ORIGIN = (12.5, -40.25, 7.125)


# ----------------------------------------------------------------------------------------------
# Fixtures: experiment folders with checkpoints of random weights


def _save_fold(work: Path, plans: plans_io.Plans, name: str, fold: int, seed: int) -> None:
    from autoseg.checkpoint import save_checkpoint
    from autoseg.networks import build_network
    from autoseg.training.trainer import plans_meta

    config = plans.configurations[name]
    torch.manual_seed(seed)
    net = build_network(config.topology, config.input_channels, plans.num_classes, deep_supervision=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": net.state_dict(),
        "epoch": 1,
        "configuration_name": name,
        "configuration": plans_io.to_dict(plans)["configurations"][name],
        "plans": plans_meta(plans),
        "fold": fold,
    }
    save_checkpoint(work / "models" / name / f"fold_{fold}" / "checkpoint_final.pt", payload)


def _experiment(root: Path, writer, folds: dict[str, tuple[int, ...]], **kwargs) -> Path:
    from autoseg import crossval
    from autoseg.planning import run as experiment

    raw, work = root / "raw", root / "work"
    ids = writer(raw, n_cases=5, **kwargs)
    _, _, plans, _ = experiment.plan_dataset(raw, work, "tiny", None, 1, None)
    crossval.load_or_create(work, ids)
    for name, fold_list in folds.items():
        for fold in fold_list:
            _save_fold(work, plans, name, fold, seed=100 * fold + len(name))
    return work


@pytest.fixture(scope="module")
def work3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D experiment: 3d_fullres folds 0 and 1, 2d and 2.5d fold 0."""
    return _experiment(tmp_path_factory.mktemp("exp3d"), phantoms.write_nnunet_dataset,
                       {"3d_fullres": (0, 1), "2d": (0,), "2.5d": (0,)}, shape=TRAIN_SHAPE, spacing=TRAIN_SPACING)


@pytest.fixture(scope="module")
def work_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D experiment trained on PNG images: 2d fold 0."""
    return _experiment(tmp_path_factory.mktemp("exppng"), phantoms.write_png_dataset, {"2d": (0,)})


def _image(path: Path, shape=(10, 23, 19), spacing=(0.9, 0.7, 2.5), seed: int = 3) -> Path:
    """An anisotropic phantom with a rotated direction and an offset origin (spacing (z, y, x))."""
    image, _ = phantoms.ellipsoid(shape, seed=seed)
    write_image(path, image[None].astype(np.float32)[0], Geometry(spacing, ORIGIN, ROTATION, 3))
    return path


# ----------------------------------------------------------------------------------------------
# The sliding window


def test_window_starts_follow_nnunet() -> None:
    assert window_starts(100, 40, 0.5) == [0, 20, 40, 60]
    assert window_starts(40, 40, 0.5) == [0]
    assert window_starts(41, 40, 0.5) == [0, 1]
    # ceil((57 - 16) / 8) + 1 = 7 windows spread evenly over 0 .. 41: no stride exceeds step * patch.
    assert window_starts(57, 16, 0.5) == [0, 7, 14, 20, 27, 34, 41]
    with pytest.raises(ValueError):
        window_starts(10, 16, 0.5)


def test_gaussian_importance_is_centred_and_positive() -> None:
    g = gaussian_importance((12, 16, 9))
    assert g.shape == (12, 16, 9) and g.dtype == torch.float32
    assert float(g.max()) == 1.0 and float(g[6, 8, 4]) == 1.0
    assert float(g.min()) > 0
    # Separable and symmetric about the centre voxel.
    torch.testing.assert_close(g[6 - 3, 8, 4], g[6 + 3, 8, 4])


def test_mirror_combinations_are_every_subset() -> None:
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations(()) == [()]


def _constant_net(values: list[float]):
    def net_fn(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((x.shape[0], len(values), *x.shape[2:]))
        for k, v in enumerate(values):
            out[:, k] = v
        return out
    return net_fn


@pytest.mark.parametrize("shape", [(5, 7, 6), (12, 16, 14), (31, 45, 29)])
@pytest.mark.parametrize("patch,mirror", [((12, 16, 14), (0, 1, 2)), ((12, 16, 14), ()), ((16, 14), (0, 1))])
def test_constant_network_gives_the_constant_everywhere(shape, patch, mirror) -> None:
    data = torch.randn(1, *shape)
    logits = sliding_window(_constant_net([1.5, -2.0]), data, patch, mirror_axes=mirror)
    assert logits.shape == (2, *shape) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], torch.full(shape, 1.5))
    torch.testing.assert_close(logits[1], torch.full(shape, -2.0))


@pytest.mark.parametrize("patch", [(12, 16, 14), (16, 14)])
@pytest.mark.parametrize("shape", [(5, 7, 6), (31, 45, 29)])
def test_identity_network_reproduces_the_input(patch, shape) -> None:
    """Every window lands where it was cut (also when padded, mirrored and batched)."""
    data = torch.randn(2, *shape)
    logits = sliding_window(lambda x: torch.cat([x, 2 * x], 1), data, patch, mirror_axes=(0, 1),
                            forward_batch=3)
    torch.testing.assert_close(logits, torch.cat([data, 2 * data]), rtol=1e-5, atol=1e-5)


def test_context_slices_are_stacked_as_the_training_sampler_does() -> None:
    from autoseg.data.sampler import stack_context

    data = torch.randn(2, 6, 16, 14)
    seen: list[torch.Tensor] = []

    def net_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x[:, 4:6]  # the centre slice's two channels (k = 2: channels 2k*C .. (2k+1)*C)

    logits = sliding_window(net_fn, data, (16, 14), context_slices=2, forward_batch=64)
    torch.testing.assert_close(logits, data)
    inputs = torch.cat(seen)
    assert inputs.shape == (6, 10, 16, 14)
    for z in range(6):
        expected = stack_context(data.numpy(), z, 2)
        np.testing.assert_array_equal(inputs[z].numpy(), expected)


def _equivariant_net(dims: int, channels: int, classes: int) -> torch.nn.Module:
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(channels, classes, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric under every flip: the network commutes with mirroring
        w = conv.weight
        for axis in range(2, 2 + dims):
            w.copy_((w + w.flip(axis)) / 2)
    return conv.eval()


@pytest.mark.parametrize("patch", [(12, 16, 14), (16, 14)])
def test_tta_of_a_flip_equivariant_network_equals_no_tta(patch) -> None:
    net = _equivariant_net(len(patch), 1, 3)
    data = torch.randn(1, 20, 27, 23)
    axes = tuple(range(len(patch)))
    with torch.inference_mode():
        plain = sliding_window(net, data, patch)
        mirrored = sliding_window(net, data, patch, mirror_axes=axes)
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-5)


def test_tta_averages_the_flipped_back_predictions() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    data = torch.randn(1, 12, 16, 14)  # exactly one window: the weights cancel
    with torch.inference_mode():
        logits = sliding_window(net, data, (12, 16, 14), mirror_axes=(0, 1, 2))
        expected = sum(net(data[None].flip([a + 2 for a in c])).flip([a + 2 for a in c])
                       for c in mirror_combinations((0, 1, 2)))[0] / 8
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_default_forward_batch_fills_a_call_and_batches_large_slices_on_the_cpu() -> None:
    from autoseg.inference.window import CPU_MIN_SLICES, default_forward_batch

    assert default_forward_batch((40, 56, 40)) == 2  # the default 3D patch: two per call
    assert default_forward_batch((128, 128, 128)) == 1  # a large 3D patch: one (its activations are large)
    assert default_forward_batch((512, 512)) == CPU_MIN_SLICES == 2  # a large slice: still two on the CPU
    assert default_forward_batch((64, 64)) == 2 * 40 * 56 * 40 // (64 * 64)
    assert default_forward_batch((512, 512), "meta") == 8 * 40 * 56 * 40 // (512 * 512)  # not the CPU: the budget


def test_count_windows() -> None:
    assert count_windows((31, 45, 29), (12, 16, 14)) == len(window_starts(31, 12, .5)) * \
        len(window_starts(45, 16, .5)) * len(window_starts(29, 14, .5))
    assert count_windows((7, 16, 14), (16, 14)) == 7
    assert count_windows((3, 5, 5), (12, 16, 14)) == 1


def test_cpu_inference_network_gives_the_training_network_output(work3d: Path) -> None:
    from autoseg.networks import build_network
    from autoseg.inference.cpu import (
        InferenceInstanceNorm,
        MkldnnConvolution,
        MkldnnTransposedConvolution,
        keep_freed_memory,
        prepare_for_cpu_inference,
    )

    assert isinstance(keep_freed_memory(), bool)
    plans = plans_io.load(work3d / "plans.yaml")
    config = plans.configurations["3d_fullres"]
    torch.manual_seed(0)
    trained = build_network(config.topology, 1, 3, deep_supervision=False).eval()
    fast = build_network(config.topology, 1, 3, deep_supervision=False).eval()
    fast.load_state_dict(trained.state_dict())
    fast = prepare_for_cpu_inference(fast).to(memory_format=torch.channels_last_3d)
    assert any(isinstance(m, InferenceInstanceNorm) for m in fast.modules())
    assert any(isinstance(m, MkldnnConvolution) for m in fast.modules())
    assert any(isinstance(m, MkldnnTransposedConvolution) for m in fast.modules())
    x = torch.randn(2, 1, 12, 16, 14) * 3 + 5
    with torch.inference_mode():
        expected = trained(x)
        got = fast(x.contiguous(memory_format=torch.channels_last_3d))
        single = fast(x[:1].contiguous(memory_format=torch.channels_last_3d))  # batch 1: oneDNN forced
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, expected[:1], rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    # With gradients on, the wrapped training norm runs (the in-place path is inference only).
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_cpu_inference_decoder_reads_the_concatenation_in_place(
        work3d: Path, configuration: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every concatenation deferred (threshold 0), each decoder stage's first convolution
    runs as two half convolutions summed by oneDNN, and the logits are the training network's;
    the norms' sums are taken in many small pieces with a remainder."""
    from autoseg.inference import cpu as predict_cpu

    if not predict_cpu._fused_sum_available():
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    monkeypatch.setattr(predict_cpu, "DEFER_CONCAT_MIN", 0)
    monkeypatch.setattr(predict_cpu, "STATS_CHUNK", 1000)
    calls = []
    pair_forward = predict_cpu.MkldnnConvolution._pair_forward
    monkeypatch.setattr(predict_cpu.MkldnnConvolution, "_pair_forward",
                        lambda self, x: calls.append(x.first.shape[1]) or pair_forward(self, x))
    config = plans_io.load(work3d / "plans.yaml").configurations[configuration]
    layout = torch.channels_last_3d if config.dims == 3 else torch.channels_last
    trained, fast = _prepared_pair(config)
    # No weight copy is in the state dict: its keys are the trained ones (wrapped: ".inner").
    assert {k.replace(".inner", "") for k in fast.state_dict()} == set(trained.state_dict())
    x = torch.randn(2, config.input_channels, *config.patch_size) * 3 + 5
    with torch.inference_mode():
        expected = trained(x)
        got = fast(x.contiguous(memory_format=layout))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls == [f for f in reversed(config.topology.features_per_stage[:-1])]  # one per decoder stage
    # With gradients on (training), the concatenation is a real one and nothing is split.
    calls.clear()
    torch.testing.assert_close(fast(x.contiguous(memory_format=layout)), expected, rtol=1e-4, atol=1e-4)
    assert calls == []


def _prepared_pair(config: Configuration, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A training network and its CPU-inference twin with the same weights."""
    from autoseg.networks import build_network
    from autoseg.inference.cpu import prepare_for_cpu_inference

    torch.manual_seed(seed)
    trained = build_network(config.topology, config.input_channels, 3, deep_supervision=False).eval()
    fast = build_network(config.topology, config.input_channels, 3, deep_supervision=False).eval()
    fast.load_state_dict(trained.state_dict())
    layout = torch.channels_last_3d if config.dims == 3 else torch.channels_last
    return trained, prepare_for_cpu_inference(fast).to(memory_format=layout)


@pytest.mark.parametrize("packing", ["packed", "old-signature", "unavailable", "mkldnn-disabled"])
def test_cpu_inference_packed_weights(work3d: Path, packing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights packed for oneDNN per input shape (at most PACKED_SHAPES kept per weight), also
    through an older PyTorch's reorder without the input shape, give the training network's
    output, split decoder convolutions included; where packing is unavailable the plain weights
    are used, and with oneDNN switched off PyTorch's own kernels."""
    from autoseg.inference import cpu as predict_cpu

    monkeypatch.setattr(predict_cpu, "DEFER_CONCAT_MIN", 0)
    reorder = torch._C._nn.mkldnn_reorder_conv3d_weight
    if packing == "old-signature":
        monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv3d_weight",
                            lambda w, padding, stride, dilation, groups: reorder(w, padding, stride, dilation, groups))
    elif packing == "unavailable":
        monkeypatch.delattr(torch._C._nn, "mkldnn_reorder_conv3d_weight")
    elif packing == "mkldnn-disabled":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    config = plans_io.load(work3d / "plans.yaml").configurations["3d_fullres"]
    trained, fast = _prepared_pair(config)
    x = torch.randn(3, 1, *config.patch_size)
    with torch.inference_mode():
        expected = trained(x)
        for batch in (2, 1, 3, 2):
            got = fast(x[:batch].contiguous(memory_format=torch.channels_last_3d))
            torch.testing.assert_close(got, expected[:batch], rtol=1e-4, atol=1e-4)
    convs = [m for m in fast.modules() if isinstance(m, predict_cpu.MkldnnConvolution)]
    # Every convolution but the deep-supervision heads (not run at inference) ran.
    ran = [conv for conv in convs if conv.packed_shapes() or not conv.packing]
    if packing == "mkldnn-disabled":
        assert ran == []
        return
    assert len(ran) == len(convs) - (len(fast.decoder.heads) - 1)
    for conv in ran:
        shapes = conv.packed_shapes()
        if packing == "unavailable":
            assert not conv.packing and shapes == {}
            continue
        assert set(shapes) == ({"first", "second"} if conv.split else {"weight"})
        assert all(0 < len(kept) <= predict_cpu.PACKED_SHAPES for kept in shapes.values())
        assert (3, 2) in {(shape[0], len(kept)) for kept in shapes.values() for shape in kept}  # the last two


def test_cpu_inference_follows_weight_changes_and_copies(work3d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights loaded into a prepared network after it ran replace the packed and split copies;
    a prepared network that ran can be deep-copied (the opaque oneDNN copies are left behind)."""
    import copy

    from autoseg.inference import cpu as predict_cpu

    monkeypatch.setattr(predict_cpu, "DEFER_CONCAT_MIN", 0)
    config = plans_io.load(work3d / "plans.yaml").configurations["3d_fullres"]
    _, fast = _prepared_pair(config, seed=0)
    other_trained, other_fast = _prepared_pair(config, seed=1)
    x = torch.randn(2, 1, *config.patch_size)
    with torch.inference_mode():
        fast(x.contiguous(memory_format=torch.channels_last_3d))
    with torch.no_grad():
        fast.load_state_dict(other_fast.state_dict())  # copies in place: the weights' versions change
    with torch.inference_mode():
        expected = other_trained(x)
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), expected,
                                   rtol=1e-4, atol=1e-4)
        clone = copy.deepcopy(fast)
        assert not any(m.packed_shapes() for m in clone.modules() if isinstance(m, predict_cpu.MkldnnConvolution))
        torch.testing.assert_close(clone(x.contiguous(memory_format=torch.channels_last_3d)), expected,
                                   rtol=1e-4, atol=1e-4)


def test_cpu_inference_concatenates_without_the_fused_sum(work3d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch without oneDNN's fused sum: the decoder concatenates as in training."""
    from autoseg.inference import cpu as predict_cpu

    monkeypatch.setattr(predict_cpu, "DEFER_CONCAT_MIN", 0)
    monkeypatch.setattr(predict_cpu, "_fused_sum_available", lambda: False)
    calls = []
    monkeypatch.setattr(predict_cpu.MkldnnConvolution, "_pair_forward", lambda self, x: calls.append(x))
    config = plans_io.load(work3d / "plans.yaml").configurations["3d_fullres"]
    trained, fast = _prepared_pair(config)
    x = torch.randn(2, 1, *config.patch_size)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), trained(x),
                                   rtol=1e-4, atol=1e-4)
    assert calls == []


@pytest.mark.parametrize("chunk", [1000, 2**18])
@pytest.mark.parametrize("channels", [8, 64])
@pytest.mark.parametrize(("offset", "spread"), [(0.0, 1.0), (5.0, 3.0), (1e4, 1e-2), (-300.0, 1.0)])
def test_inference_norm_matches_the_training_norm(channels: int, offset: float, spread: float, chunk: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One read for the statistics in the common case (in pieces: ``chunk`` values; 1000 gives
    several pieces and a remainder); centred first where E[x²] - mean² would cancel (large
    offsets): either way the training norm's output to float32 rounding."""
    from autoseg.inference import cpu as predict_cpu
    from autoseg.networks.norm import InstanceNorm3d
    from autoseg.inference.cpu import InferenceInstanceNorm

    monkeypatch.setattr(predict_cpu, "STATS_CHUNK", chunk)
    torch.manual_seed(1)
    norm = InstanceNorm3d(channels, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, channels, 6, 9, 7) * spread + offset).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected = norm(x.clone())
        got = InferenceInstanceNorm(norm)(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Model selection and inputs


def test_select_models(work3d: Path, tmp_path: Path) -> None:
    selections, best = select_models(work3d, ["3d_fullres"])
    assert best is None and selections[0].folds == (0, 1)
    assert select_models(work3d, ["3d_fullres"], [1])[0][0].folds == (1,)
    with pytest.raises(ConfigError, match="several configurations are trained"):
        select_models(work3d)
    with pytest.raises(UnknownNameError, match="did you mean '3d_fullres'"):
        select_models(work3d, ["3d_fulres"])
    with pytest.raises(ConfigError, match=r"fold\(s\) \[3\] not trained.*\[0, 1\]"):
        select_models(work3d, ["3d_fullres"], [3])
    with pytest.raises(UnknownNameError, match="checkpoint"):
        select_models(work3d, ["3d_fullres"], checkpoint="last")


def test_best_yaml_chooses_the_default(work3d: Path) -> None:
    best = work3d / "best.yaml"
    best.write_text("configurations: [2d, 3d_fullres]\nfolds: [0]\npostprocessing: {}\n", encoding="utf-8")
    try:
        selections, data = select_models(work3d)
        assert [(s.configuration, s.folds) for s in selections] == [("2d", (0,)), ("3d_fullres", (0,))]
        assert data is not None
    finally:
        best.unlink()


def test_best_yaml_postprocessing_is_applied(work3d: Path, tmp_path: Path) -> None:
    from scipy import ndimage

    source = _image(tmp_path / "x.nii.gz", shape=(14, 40, 36))
    best = work3d / "best.yaml"
    best.write_text("configurations: [3d_fullres]\nfolds: [0]\npostprocessing:\n  all_foreground: true\n"
                    "  per_label: []\n  labels: {shell: [1], core: [2]}\n", encoding="utf-8")
    try:
        summary = run(work3d, [source], tmp_path / "out", device="cpu", tta=False)
    finally:
        best.unlink()
    assert summary.postprocessing and [s.folds for s in summary.selections] == [(0,)]
    labels = read_image(summary.written[0])[0][0]
    _, components = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    assert components <= 1


def test_input_discovery_groups_channels(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = find_input_cases([tmp_path], num_channels=2)
    assert [(c.case_id, len(c.images)) for c in cases] == [("a", 2), ("b", 1)]
    files = find_input_cases([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"], num_channels=2)
    assert [(c.case_id, c.ending) for c in files] == [("a", ".nii.gz")]
    # Given one by one, channel files of a case are grouped the same way, and refused the same way.
    with pytest.raises(DatasetError, match="a_0001.nii.gz looks like channel 1 of case 'a', but the model takes 1"):
        find_input_cases([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"], num_channels=1)
    with pytest.raises(DatasetError, match="case 'a' lacks a_0001.nii.gz"):
        find_input_cases([tmp_path / "a_0000.nii.gz"], num_channels=2)
    with pytest.raises(DatasetError, match="both be written"):
        find_input_cases([tmp_path / "b.nii.gz", tmp_path / "b.nii.gz", tmp_path], num_channels=2)
    with pytest.raises(DatasetError, match="input not found"):
        find_input_cases([tmp_path / "missing.nii.gz"], num_channels=1)


def test_input_discovery_takes_one_rgb_file_for_a_multichannel_2d_model(tmp_path: Path) -> None:
    """nnU-Net's natural-image convention (imagesTs/{case}_0000.png in RGB) is one case, as in training;
    its channel count is checked from the header, so a grey file is refused there."""
    import SimpleITK as sitk

    grey = np.arange(9 * 13, dtype=np.uint8).reshape(9, 13)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, -1), isVector=True), str(tmp_path / "x_0000.png"))
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "g_0000.png"))
    for given in ([tmp_path], [tmp_path / "x_0000.png", tmp_path / "g_0000.png"]):
        cases = find_input_cases(given, num_channels=3)
        assert [(c.case_id, [p.name for p in c.images], c.ending) for c in cases] == \
            [("g", ["g_0000.png"], ".png"), ("x", ["x_0000.png"], ".png")]
    assert [read_info(c.images[0]).channels for c in cases] == [1, 3]
    (tmp_path / "z_0000.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="case 'z' lacks z_0001.nii.gz"):  # 3D files: one per channel
        find_input_cases([tmp_path / "z_0000.nii.gz"], num_channels=3)


# ----------------------------------------------------------------------------------------------
# Predictor and export


def test_fold_average_is_the_softmax_of_the_mean_logits(work3d: Path) -> None:
    image, geometry = read_image(_image(work3d.parent / "fold_avg.nii.gz"))
    probabilities = {}
    for folds in ((0,), (1,), (0, 1)):
        selections, _ = select_models(work3d, ["3d_fullres"], folds)
        [prediction] = Predictor(work3d, selections, device="cpu", tta=False).predict(image, geometry)
        probabilities[folds] = prediction.probabilities
    import torch.nn.init

    assert torch.nn.init.kaiming_normal_.__name__ == "kaiming_normal_"  # restored after loading
    mean_log = (np.log(probabilities[(0,)]) + np.log(probabilities[(1,)])) / 2  # softmax ignores the offset
    expected = torch.softmax(torch.from_numpy(mean_log), 0).numpy()
    np.testing.assert_allclose(probabilities[(0, 1)], expected, rtol=1e-4, atol=1e-5)


def test_export_matches_the_pipeline_inverse(work3d: Path) -> None:
    from autoseg.preprocessing.pipeline import export_segmentation, revert_to_original

    image, geometry = read_image(_image(work3d.parent / "export.nii.gz"))
    selections, _ = select_models(work3d, ["3d_fullres"])
    [prediction] = Predictor(work3d, selections, device="cpu", tta=False).predict(image, geometry)
    probs_path = work3d.parent / "export_probs.npz"
    labels = export_prediction([prediction], geometry, probabilities_path=probs_path)
    np.testing.assert_array_equal(labels, export_segmentation(prediction.probabilities, prediction.props))
    saved = np.load(probs_path)["probabilities"]
    assert saved.dtype == np.float16 and saved.shape == (3, *image.shape[1:])
    np.testing.assert_allclose(saved, revert_to_original(prediction.probabilities, prediction.props), atol=1e-3)
    # Two configurations average in the original grid: the same prediction twice changes nothing.
    twice = export_prediction([prediction, ConfigPrediction("copy", prediction.probabilities, prediction.props)],
                              geometry)
    np.testing.assert_array_equal(twice, labels)


@pytest.mark.parametrize("configs", [["3d_fullres"], ["2d"], ["2.5d"], ["3d_fullres", "2d", "2.5d"]])
def test_output_has_the_input_geometry_exactly(work3d: Path, tmp_path: Path, configs: list[str]) -> None:
    source = _image(tmp_path / "in" / "case.nii.gz")
    image, geometry = read_image(source)
    summary = run(work3d, [source], tmp_path / "out", configs, save_probabilities=True, device="cpu")
    [written] = summary.written
    assert written == tmp_path / "out" / "case.nii.gz"
    labels, out_geometry = read_image(written)
    assert out_geometry == geometry  # spacing, origin, direction: exactly, no float drift
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    probabilities = np.load(tmp_path / "out" / "case.npz")["probabilities"]
    assert probabilities.shape == (3, *image.shape[1:]) and probabilities.dtype == np.float16
    # The label map is the argmax of the saved probabilities (float16 ties aside).
    agree = np.mean(np.argmax(probabilities, 0) == labels[0])
    assert agree > 0.99, agree


def test_single_file_folder_and_several_files(work3d: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _image(folder / "a_0000.nii.gz", seed=1)
    _image(folder / "b.nii.gz", seed=2, shape=(6, 30, 17))
    _image(tmp_path / "c.nrrd", seed=3)
    out = tmp_path / "out"
    assert run(work3d, [folder], out, ["2d"]).written == (out / "a.nii.gz", out / "b.nii.gz")
    assert run(work3d, [tmp_path / "c.nrrd"], out, ["2d"]).written == (out / "c.nrrd",)
    several = run(work3d, [folder / "a_0000.nii.gz", tmp_path / "c.nrrd"], tmp_path / "out2", ["2d"])
    assert several.written == (tmp_path / "out2" / "a.nii.gz", tmp_path / "out2" / "c.nrrd")
    for name, source in (("a.nii.gz", folder / "a_0000.nii.gz"), ("b.nii.gz", folder / "b.nii.gz")):
        assert read_image(out / name)[1] == read_image(source)[1]
        assert read_image(out / name)[0].shape == read_image(source)[0].shape
    # NRRD stores spacing x direction as one vector per axis; ITK's split of it on reading is not
    # idempotent for a rotated direction (2.5 -> 2.5000000000000004): equal to float64 precision.
    labels, geometry = read_image(out / "c.nrrd")
    image, expected = read_image(tmp_path / "c.nrrd")
    assert labels.shape == image.shape
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(geometry, field), getattr(expected, field), rtol=1e-12, atol=1e-12)


def test_continue_skips_finished_cases(work3d: Path, tmp_path: Path, cli) -> None:
    folder = tmp_path / "in"
    _image(folder / "a.nii.gz", seed=1)
    _image(folder / "b.nii.gz", seed=2)
    out = tmp_path / "out"
    first = cli("predict", work3d, "-i", folder, "-o", out, "-c", "2d", "--device", "cpu")
    assert first.exit_code == 0, first.output
    (out / "b.nii.gz").unlink()
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    again = cli("predict", work3d, "-i", folder, "-o", out, "-c", "2d", "--continue")
    assert again.exit_code == 0, again.output
    assert "1 case(s) predicted, 1 already done" in again.output
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp and (out / "b.nii.gz").is_file()
    # --save-probabilities redoes cases that lack their probabilities.
    with_probs = run(work3d, [folder], out, ["2d"], resume=True, save_probabilities=True)
    assert len(with_probs.written) == 2 and (out / "a.npz").is_file()


def test_cli_folds_spellings(work3d: Path, tmp_path: Path, cli) -> None:
    source = _image(tmp_path / "x.nii.gz")
    for folds in (["-f", "0", "1"], ["-f", "0,1"], ["-f", "all"], ["-f", "0", "-f", "1"]):
        result = cli("predict", work3d, "-i", source, "-o", tmp_path / "o", "-c", "3d_fullres", *folds, "--no-tta")
        assert result.exit_code == 0, result.output
        assert "3d_fullres (folds 0 1)" in result.output


# ----------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written


def _assert_clean_failure(result, out: Path, needle: str, code: int | None = None) -> None:
    assert result.exit_code != 0, result.output
    assert code is None or result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_unreadable_input(work3d: Path, tmp_path: Path, cli) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", bad, "-o", out, "-c", "2d"), out, "cannot read image", 1)


def test_extra_channel_file_is_refused_not_predicted_as_a_second_case(work3d: Path, tmp_path: Path, cli) -> None:
    """``x_0000`` + ``x_0001`` for a one-channel model: one line naming the extra file, nothing written."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x_0000.nii.gz", "x_0001.nii.gz"):
        _image(folder / name)
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", folder, "-o", out, "-c", "2d"), out,
                          "x_0001.nii.gz looks like channel 1 of case 'x', but the model takes 1 channel", 1)


def test_wrong_channel_count(work3d: Path, tmp_path: Path, cli) -> None:
    image, _ = phantoms.ellipsoid((8, 10, 9))
    two = phantoms.write_4d(tmp_path / "two.nii.gz", [image, image])
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", two, "-o", out, "-c", "3d_fullres"), out,
                          "2 channel(s); the model expects 1", 1)


def test_2d_model_on_a_3d_image(work_png: Path, tmp_path: Path, cli) -> None:
    source = _image(tmp_path / "vol.nii.gz")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work_png, "-i", source, "-o", out), out, "trained on 2D images", 1)


def test_3d_model_on_a_2d_image(work3d: Path, tmp_path: Path, cli) -> None:
    image, _ = phantoms.ellipsoid((20, 18))
    source = phantoms.write_case_image(tmp_path / "slice.nii.gz", image)
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", out, "-c", "3d_fullres"), out, "2D image", 1)


def test_png_model_predicts_pngs(work_png: Path, tmp_path: Path) -> None:
    image, _ = phantoms.ellipsoid((21, 25))
    source = phantoms.write_case_image(tmp_path / "img.png", np.clip(image, 0, 255).astype(np.uint8))
    [written] = run(work_png, [source], tmp_path / "out").written
    labels, geometry = read_image(written)
    assert written.suffix == ".png" and labels.shape == (1, 1, 21, 25) and labels.dtype == np.uint8
    assert geometry == read_image(source)[1]


def test_work_without_trained_folds(tmp_path: Path, cli) -> None:
    from autoseg.planning import run as experiment

    phantoms.write_nnunet_dataset(tmp_path / "raw", n_cases=3)
    experiment.plan_dataset(tmp_path / "raw", tmp_path / "work", "tiny", None, 1, None)
    source = _image(tmp_path / "x.nii.gz")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", tmp_path / "work", "-i", source, "-o", out), out, "no trained model", 2)
    _assert_clean_failure(cli("predict", tmp_path / "raw", "-i", source, "-o", out), out, "not an experiment folder")


def test_unknown_configuration_and_bad_options(work3d: Path, tmp_path: Path, cli) -> None:
    source = _image(tmp_path / "x.nii.gz")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", out, "-c", "3d_fulres"), out,
                          "did you mean '3d_fullres'?", 2)
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", out, "-c", "2d", "-f", "7"), out,
                          "not trained", 2)
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", out, "-c", "2d", "-f", "zero"), out,
                          "expected fold numbers", 2)
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", out, "-c", "2d", "--checkpoint", "bset"), out,
                          "did you mean 'best'?", 2)
    _assert_clean_failure(cli("predict", work3d, "-i", tmp_path / "nope.nii.gz", "-o", out, "-c", "2d"), out,
                          "input not found", 1)
    _assert_clean_failure(cli("predict", work3d, "-i", source, "-o", tmp_path, "-c", "2d"), out,
                          "would overwrite the input", 2)


def test_corrupt_checkpoint(work3d: Path, tmp_path: Path, cli) -> None:
    import shutil

    work = tmp_path / "work"
    shutil.copytree(work3d, work, ignore=shutil.ignore_patterns("3d_fullres", "2.5d"))
    (work / "models" / "2d" / "fold_0" / "checkpoint_final.pt").write_bytes(b"\x00" * 100)
    source = _image(tmp_path / "x.nii.gz")
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work, "-i", source, "-o", out), out, "cannot load checkpoint", 2)


def test_truncated_image_leaves_no_output(work3d: Path, tmp_path: Path, cli) -> None:
    good = _image(tmp_path / "in" / "good.nii")
    data = good.read_bytes()
    (tmp_path / "in" / "cut.nii").write_bytes(data[: len(data) // 2])
    good.unlink()
    out = tmp_path / "out"
    _assert_clean_failure(cli("predict", work3d, "-i", tmp_path / "in", "-o", out, "-c", "2d"), out, "truncated", 1)


# ----------------------------------------------------------------------------------------------
# Fold validation


def test_validation_of_a_png_dataset_writes_png_like_predict(work_png: Path, tmp_path: Path) -> None:
    """Fold validation writes label maps in the images' format, as ``autoseg predict`` does."""
    from autoseg.training.validation import validate_fold

    val_cases = json.loads((work_png / "splits.json").read_text())[0]["val"]
    folder = work_png / "models" / "2d" / "fold_0" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f"{val_cases[0]}.nii.gz"  # what an earlier autoseg wrote for PNG datasets
    stale.write_bytes(b"old")
    validate_fold(work_png, "2d", 0, device="cpu")
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{case}.png" for case in val_cases)
    assert not stale.exists() and not list(folder.glob("*.nii.gz"))
    image = next((work_png.parent / "raw" / "imagesTr").glob(f"{val_cases[0]}_0000.png"))
    run(work_png, [image], tmp_path / "pred", ["2d"], device="cpu")
    predicted = read_image(tmp_path / "pred" / f"{val_cases[0]}.png")[0]
    assert np.array_equal(read_image(folder / f"{val_cases[0]}.png")[0], predicted)


def test_find_best_postprocessing_and_ensemble_read_png_fold_validations(tmp_path: Path, cli) -> None:
    """What reads fold validations finds the PNG label maps: find-best scores and postprocesses them,
    ensemble writes PNG again (the label map's format, as predict would)."""
    import shutil

    from autoseg.evaluation import find_best
    from autoseg.training.validation import validate_fold, validation_folder

    work = _experiment(tmp_path / "exp", phantoms.write_png_dataset, {"2d": (0, 1, 2, 3, 4)})
    splits = json.loads((work / "splits.json").read_text())
    for fold in range(len(splits)):
        validate_fold(work, "2d", fold, device="cpu")
    assert not list((work / "models").rglob("*.nii.gz"))
    result = find_best.run(work, workers=1)
    assert result.best.configurations == ("2d",) and set(result.best.scores) == {"2d"}
    assert result.best.postprocessing.dice_before == pytest.approx(result.best.scores["2d"])
    first = validation_folder(work, "2d", 0)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    out = tmp_path / "ensembled"
    ensembled = cli("ensemble", first, copy, "-o", out, "-j", "1")
    assert ensembled.exit_code == 0, ensembled.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.glob("*.png"))
    assert all(np.array_equal(read_image(p)[0], read_image(out / p.name)[0]) for p in first.glob("*.png"))


def test_validate_fold_writes_predictions_and_metrics(work3d: Path) -> None:
    from autoseg.training.validation import validate_fold

    record = validate_fold(work3d, "3d_fullres", 1, device="cpu")
    fold_dir = work3d / "models" / "3d_fullres" / "fold_1"
    val_cases = json.loads((work3d / "splits.json").read_text())[1]["val"]
    for case in val_cases:
        labels, geometry = read_image(fold_dir / "validation" / f"{case}.nii.gz")
        reference, ref_geometry = read_image(work3d.parent / "raw" / "labelsTr" / f"{case}.nii.gz")
        assert labels.shape == reference.shape and geometry == ref_geometry
        assert np.load(fold_dir / "validation" / f"{case}.npz")["probabilities"].shape == (3, *labels.shape[1:])
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(record))
    assert sorted(metrics["per_case"]) == sorted(val_cases)
    assert set(metrics["per_case"][val_cases[0]]) == {"shell", "core"}
    assert metrics["summary"]["n_cases"] == len(val_cases)
    assert metrics["configuration"] == "3d_fullres" and metrics["fold"] == 1 and metrics["tta"] is True


def test_validate_fold_of_an_untrained_fold(work3d: Path) -> None:
    from autoseg.training.validation import validate_fold

    with pytest.raises(ConfigError, match="not trained"):
        validate_fold(work3d, "2d", 4, device="cpu")


# ----------------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
def test_real_unlabelled_case(hippocampus: Path, tmp_path: Path) -> None:
    """Hippocampus case 118 (no label) through a freshly planned tiny model: single file and folder."""
    from autoseg.planning import run as experiment

    work = tmp_path / "work"
    _, _, plans, _ = experiment.plan_dataset(hippocampus, work, "tiny", None, 2, None)
    _save_fold(work, plans, "3d_fullres", 0, seed=0)
    source = hippocampus / "unlabelled" / "hippocampus_118.nii.gz"
    image, geometry = read_image(source)
    single = run(work, [source], tmp_path / "single", ["3d_fullres"], device="cpu")
    folder = run(work, [source.parent], tmp_path / "folder", ["3d_fullres"], device="cpu", tta=False)
    for written in (*single.written, *folder.written):
        assert written.name == "hippocampus_118.nii.gz"
        labels, out_geometry = read_image(written)
        assert out_geometry == geometry and labels.shape == image.shape and labels.dtype == np.uint8
    assert os.path.getsize(single.written[0]) > 0


def test_cases_shared_over_processes_give_identical_outputs(work3d: Path, tmp_path: Path, cli) -> None:
    """``--procs 2`` (the CPU stand-in for ``--gpus 2``): same files, same voxels, same probabilities."""
    folder = tmp_path / "in"
    for seed in (1, 2, 3):
        _image(folder / f"case{seed}.nii.gz", seed=seed)
    single = run(work3d, [folder], tmp_path / "one", ["3d_fullres"], device="cpu", save_probabilities=True)
    shared = cli("predict", work3d, "-i", folder, "-o", tmp_path / "two", "-c", "3d_fullres", "--device", "cpu",
                 "--procs", "2", "--save-probabilities")
    assert shared.exit_code == 0, shared.output
    assert "3 case(s) predicted" in shared.output and "× 2 processes" in shared.output
    expected = [p.name for p in single.written] + [p.name.replace(".nii.gz", ".npz") for p in single.written]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(expected)
    for path in single.written:
        one, geometry_one = read_image(path)
        two, geometry_two = read_image(tmp_path / "two" / path.name)
        assert np.array_equal(one, two) and geometry_one == geometry_two
        probs = path.name.replace(".nii.gz", ".npz")
        with np.load(tmp_path / "one" / probs) as a, np.load(tmp_path / "two" / probs) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_predict_gpus_without_cuda_is_a_clear_error(work3d: Path, tmp_path: Path, cli) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("predict", work3d, "-i", tmp_path, "-o", tmp_path / "out", "--gpus", "2")
    assert result.exit_code == 2 and "--gpus 2: no CUDA device on this machine" in result.output


def test_readme_python_api_example_runs_and_matches_the_cli(work3d: Path, tmp_path: Path) -> None:
    """README's Python API block, run as written (paths swapped in), gives predict's label map."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- python-api -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = _image(tmp_path / "in" / "case_0000.nii.gz")
    out = tmp_path / "api" / "case.nii.gz"
    out.parent.mkdir()
    code = (block.replace('"WORK"', repr(str(work3d))).replace('"case_0000.nii.gz"', repr(str(image)))
            .replace('"case.nii.gz"', repr(str(out))))
    namespace: dict = {}
    exec(compile(code, "README.md python-api", "exec"), namespace)  # noqa: S102 - our own README
    run(work3d, [image], tmp_path / "cli", ["3d_fullres"], device="cpu")
    expected, geometry = read_image(tmp_path / "cli" / "case.nii.gz")
    written, written_geometry = read_image(out)
    assert np.array_equal(namespace["labels"], expected[0]) and np.array_equal(written, expected)
    assert written_geometry == geometry == read_image(image)[1]


def test_jpeg_input_gets_a_lossless_png_label_map(tmp_path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.full((12, 10, 3), 90, np.uint8), isVector=True), str(tmp_path / "s.jpg"))
    [case] = find_input_cases([tmp_path], num_channels=3)
    assert (case.case_id, case.ending) == ("s", ".png")
    with pytest.raises(ValueError, match="does not write lossy JPEG"):
        write_image(tmp_path / "x.jpg", np.zeros((1, 4, 4), np.uint8), read_image(tmp_path / "s.jpg")[1])


def test_progress_lines_when_output_is_not_a_terminal(work3d: Path, tmp_path: Path, cli, monkeypatch) -> None:
    """Redirected to a file, predict says where it is (case k/n, windows, ETA) instead of staying silent."""
    from autoseg.cli import _render

    monkeypatch.setattr(_render, "LINE_EVERY_S", 0.0)
    folder = tmp_path / "in"
    for name in ("a.nii.gz", "b.nii.gz"):
        _image(folder / name)
    result = cli("predict", work3d, "-i", folder, "-o", tmp_path / "out", "-c", "3d_fullres", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("predicting ")]
    assert any(line.startswith("predicting b (2/2): windows ") and "ETA" in line for line in lines), result.output
