"""The dynamic U-Net: shapes, the planner's memory estimate and the FLOP count against the real
modules, channels-last equivalence, error messages, gradients and a tiny overfit."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from autoseg.networks import build_network, conv_flops, input_multiple
from autoseg.networks.norm import InstanceNorm3d, _InstanceNormChannelsLast
from autoseg.planning import load_preset
from autoseg.planning.planner import fit_patch
from autoseg.planning.topology import estimate_feature_map_units
from autoseg.plans import Topology

NUM_CLASSES = 3
_CONVS = (nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)


def tiny_topology(dims: int, residual: bool = False) -> Topology:
    """Four stages, 4..16 features; the 3D one pools z only twice (anisotropic kernels first)."""
    if dims == 3:
        strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
        kernels = ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    else:
        strides = ((1, 1), (2, 2), (2, 2), (2, 2))
        kernels = ((3, 3),) * 4
    return Topology(
        features_per_stage=(4, 8, 16, 16),
        strides=strides,
        kernel_sizes=kernels,
        blocks_per_stage=(1, 2, 2, 2) if residual else (2, 2, 2, 2),
        decoder_blocks_per_stage=(1, 2, 1),
        residual_encoder=residual,
    )


PATCH = {3: (16, 24, 16), 2: (32, 48)}


def counted_forward(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Per-sample (sum of conv output sizes, conv FLOPs) from forward hooks on the real modules."""
    units, flops = [0], [0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        batch = output.shape[0]
        units[0] += output.numel() // batch
        taps = math.prod(module.kernel_size)
        if isinstance(module, _TRANSPOSED):
            macs = inputs[0].numel() // batch * (module.out_channels // module.groups) * taps
        else:
            macs = output.numel() // batch * (module.in_channels // module.groups) * taps
        flops[0] += 2 * macs

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, _CONVS + _TRANSPOSED)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return units[0], flops[0]


def expected_shapes(topology: Topology, patch: tuple[int, ...], batch: int) -> list[tuple[int, ...]]:
    shapes, size = [], list(patch)
    for stride in topology.strides[:-1]:
        size = [s // st for s, st in zip(size, stride)]
        shapes.append((batch, NUM_CLASSES, *size))
    return shapes


# ----------------------------------------------------------------------------------------------
# shapes and deep supervision


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_forward_shapes(dims: int, residual: bool, deep_supervision: bool) -> None:
    torch.manual_seed(0)
    topology = tiny_topology(dims, residual)
    net = build_network(topology, 2, NUM_CLASSES, deep_supervision=deep_supervision)
    out = net(torch.randn(2, 2, *PATCH[dims]))
    shapes = expected_shapes(topology, PATCH[dims], 2)
    if deep_supervision:
        assert isinstance(out, list)
        assert [tuple(o.shape) for o in out] == shapes  # highest resolution first
    else:
        assert isinstance(out, torch.Tensor)
        assert tuple(out.shape) == shapes[0]


def test_deep_supervision_can_be_switched_off_without_rebuilding() -> None:
    torch.manual_seed(0)
    net = build_network(tiny_topology(3), 1, NUM_CLASSES).eval()
    x = torch.randn(1, 1, *PATCH[3])
    with torch.no_grad():
        all_levels = net(x)
        net.deep_supervision = False
        final = net(x)
    assert isinstance(final, torch.Tensor)
    torch.testing.assert_close(final, all_levels[0])


def test_initialisation_is_he_with_zero_bias() -> None:
    torch.manual_seed(0)
    net = build_network(tiny_topology(3, residual=True), 1, NUM_CLASSES)
    for m in net.modules():
        if isinstance(m, _CONVS + _TRANSPOSED):
            assert torch.count_nonzero(m.bias) == 0
    conv = net.decoder.stages[0][0].conv  # 32 -> 16 channels, 3x3x3: 13824 weights, fan_in 864
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    assert conv.weight.std().item() == pytest.approx(gain / math.sqrt(32 * 27), rel=0.05)
    # Residual blocks start as their shortcut (nnU-Net's init_last_bn_before_add_to_0).
    block = net.encoder.stages[1][0]
    assert torch.count_nonzero(block.conv2.norm.weight) == 0


# ----------------------------------------------------------------------------------------------
# the planner's estimate and the FLOP count agree with the real modules


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_estimate_and_flops_match_the_real_network(dims: int, residual: bool, deep_supervision: bool) -> None:
    topology = tiny_topology(dims, residual)
    patch = PATCH[dims]
    net = build_network(topology, 2, NUM_CLASSES, deep_supervision=deep_supervision)
    units, flops = counted_forward(net, torch.randn(2, 2, *patch))
    assert units == estimate_feature_map_units(patch, topology, NUM_CLASSES, deep_supervision=deep_supervision)
    assert flops == conv_flops(topology, patch, 2, NUM_CLASSES, deep_supervision=deep_supervision)


# (preset, spacing, median shape, run on): Hippocampus (the real plan: 40x56x40, 32..256 features),
# a 5x1x1 mm and a 3x0.8x0.8 mm anisotropic case (1x3x3 kernels first), and 2D. Networks of more
# than a few GFLOP per sample run on the meta device: the same modules, shapes without arithmetic.
PLANNER_CASES = [
    ("default", (1.0, 1.0, 1.0), (36, 50, 35), "cpu"),
    ("resenc-m", (1.0, 1.0, 1.0), (36, 50, 35), "cpu"),
    ("tiny", (1.0, 1.0, 1.0), (36, 50, 35), "cpu"),
    ("tiny", (5.0, 1.0, 1.0), (24, 128, 128), "cpu"),
    ("default", (5.0, 1.0, 1.0), (24, 128, 128), "meta"),
    ("resenc-m", (5.0, 1.0, 1.0), (24, 128, 128), "meta"),
    ("resenc-m", (3.0, 0.8, 0.8), (40, 300, 300), "meta"),
    ("default", (1.0, 1.0), (50, 35), "cpu"),
    ("resenc-m", (1.0, 1.0), (256, 256), "meta"),
]


@pytest.mark.parametrize("preset_name, spacing, median_shape, device", PLANNER_CASES)
def test_planner_estimate_matches_planned_networks(
    preset_name: str, spacing: tuple[float, ...], median_shape: tuple[int, ...], device: str
) -> None:
    patch_list, _, topology, _ = fit_patch(spacing, median_shape, load_preset(preset_name), NUM_CLASSES, 1e7)
    patch = tuple(patch_list)
    if spacing == (1.0, 1.0, 1.0) and preset_name == "default":
        assert patch == (40, 56, 40) and topology.features_per_stage == (32, 64, 128, 256)
    if spacing[0] >= 3 * spacing[1]:
        assert topology.kernel_sizes[0] == (1, 3, 3)  # the anisotropic case is really anisotropic
    with torch.device(device):
        net = build_network(topology, 1, NUM_CLASSES)
        x = torch.randn(1, 1, *patch) if device == "cpu" else torch.empty(1, 1, *patch)
    for deep_supervision in (True, False):
        net.deep_supervision = deep_supervision
        units, flops = counted_forward(net, x)
        assert units == estimate_feature_map_units(patch, topology, NUM_CLASSES, deep_supervision=deep_supervision)
        assert flops == conv_flops(topology, patch, 1, NUM_CLASSES, deep_supervision=deep_supervision)


# ----------------------------------------------------------------------------------------------
# channels-last memory format


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("convert_weights", [False, True])
def test_channels_last_matches_default_layout(dims: int, residual: bool, convert_weights: bool) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    topology = tiny_topology(dims, residual)
    net = build_network(topology, 2, NUM_CLASSES)
    for m in net.modules():  # non-trivial affine parameters, so that they matter in the comparison
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    x = torch.randn(2, 2, *PATCH[dims]) * 5 + 3  # an offset mean exercises the variance's precision

    reference = net(x)
    sum(o.square().mean() for o in reference).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()

    if convert_weights:
        net = net.to(memory_format=fmt)
    out = net(x.contiguous(memory_format=fmt))
    sum(o.square().mean() for o in out).backward()
    assert out[0].is_contiguous(memory_format=fmt)
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_channels_last_instance_norm_gradients() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 3 + 5).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, w, b: _InstanceNormChannelsLast.apply(a, w, b, 1e-5), inputs)
    # Same parameter names as torch's, so checkpoints load into either.
    assert InstanceNorm3d(3, affine=True).state_dict().keys() == nn.InstanceNorm3d(3, affine=True).state_dict().keys()


def test_channels_last_instance_norm_under_cpu_bf16_autocast() -> None:
    """Under ``train --precision bf16`` the kernel takes the convolution's bfloat16 output, keeps
    channels-last (PyTorch's own norm there copied to NCDHW and back), normalises in float32 and
    matches a float64 reference to bfloat16's resolution, gradients included."""
    torch.manual_seed(0)
    norm = InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = (torch.randn(2, 4, 6, 7, 5) * 3 + 50).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    grad = torch.randn(2, 4, 6, 7, 5).bfloat16()
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    reference = nn.functional.instance_norm(x64, weight=w64, bias=b64)
    reference.backward(grad.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert x.grad.is_contiguous(memory_format=torch.channels_last_3d)
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
    # The reference sees the same bf16 input: what differs is the output's rounding to bf16 (8 bits,
    # |out| <= ~4: ~0.016) and the gradient's.
    torch.testing.assert_close(out.double(), reference, atol=0.03, rtol=0.01)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=0.02, rtol=0.02)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(norm.bias.grad.double(), b64.grad, atol=1e-3, rtol=1e-3)
    # bf16 outside autocast is not this kernel's business (PyTorch's norm, whatever it does).
    assert InstanceNorm3d(4, affine=True)._forward_channels_last(x.detach()) is None


# ----------------------------------------------------------------------------------------------
# errors


def test_indivisible_input_size_names_size_and_multiple() -> None:
    topology = tiny_topology(3)
    assert input_multiple(topology) == (4, 8, 8)
    net = build_network(topology, 1, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"\(18, 24, 16\).*\(4, 8, 8\).*axis 0 size 18.*multiple of 4.*\(20, 24, 16\)"):
        net(torch.zeros(1, 1, 18, 24, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        conv_flops(topology, (18, 24, 16), 1, NUM_CLASSES)


def test_wrong_channels_or_dims_are_clear_errors() -> None:
    net = build_network(tiny_topology(2), 2, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 2, y, x\).*got \(1, 3, 32, 48\)"):
        net(torch.zeros(1, 3, 32, 48))
    with pytest.raises(ValueError, match="2D network"):
        net(torch.zeros(1, 2, 8, 32, 48))


def test_inconsistent_topology_is_rejected() -> None:
    good = tiny_topology(3)
    bad = Topology(good.features_per_stage, good.strides, good.kernel_sizes, good.blocks_per_stage, (1, 1))
    with pytest.raises(ValueError, match="decoder_blocks_per_stage has 2 entries"):
        build_network(bad, 1, NUM_CLASSES)
    even = Topology(good.features_per_stage, good.strides, ((2, 2, 2),) * 4, good.blocks_per_stage,
                    good.decoder_blocks_per_stage)
    with pytest.raises(ValueError, match="kernels must be odd"):
        build_network(even, 1, NUM_CLASSES)


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("residual", [False, True])
def test_gradients_reach_the_first_convolution(residual: bool) -> None:
    torch.manual_seed(0)
    net = build_network(tiny_topology(3, residual), 1, NUM_CLASSES)
    out = net(torch.randn(2, 1, *PATCH[3]))
    sum(o.mean() * (i + 1) for i, o in enumerate(out)).backward()
    first = net.encoder.stem.conv if residual else net.encoder.stages[0][0].conv
    assert first.weight.grad is not None
    assert torch.isfinite(first.weight.grad).all() and first.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("residual", [False, True])
def test_overfits_a_single_batch(residual: bool) -> None:
    torch.manual_seed(0)
    net = build_network(tiny_topology(2, residual), 1, NUM_CLASSES, deep_supervision=False)
    x = torch.randn(2, 1, *PATCH[2])
    target = torch.zeros(2, *PATCH[2], dtype=torch.long)
    target[:, 8:24, 8:20] = 1
    target[:, 12:20, 28:44] = 2
    x = x + target.unsqueeze(1).float()  # learnable, but not trivially: noise of the same size
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(net(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # measured: 2.06 -> 0.49 (plain), 1.22 -> 0.27 (residual)


def test_package_import_does_not_import_torch() -> None:
    code = ("import sys, autoseg.networks as n; "
            "assert 'torch' not in sys.modules; n.conv_flops; assert 'torch' not in sys.modules; "
            "n.build_network; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
