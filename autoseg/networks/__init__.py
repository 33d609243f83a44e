"""Networks: the dynamic U-Net (:mod:`autoseg.networks.unet`) and torch-free facts about it.

``build_network`` and ``UNet`` import torch on first access, so that the torch-free helpers
(``conv_flops``, ``input_multiple``, ...) can be used without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoseg.networks.analysis import check_spatial_size, conv_flops, input_multiple, validate_topology

if TYPE_CHECKING:
    from autoseg.networks.unet import UNet, build_network

_TORCH_NAMES = ("UNet", "build_network")


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: the first use of build_network/UNet imports torch, not the package import.
    if name in _TORCH_NAMES:
        from autoseg.networks import unet

        return getattr(unet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["UNet", "build_network", "check_spatial_size", "conv_flops", "input_multiple", "validate_topology"]
