"""autoseg: self-configuring medical image segmentation.

``import autoseg`` stays light (no torch, numpy or SimpleITK): :class:`Segmenter`, the Python API
for trained models (:mod:`autoseg.inference.api`), is imported on first use::

    from autoseg import Segmenter

    segmenter = Segmenter.load("hippo.autoseg.zip", device="cpu")
"""

from __future__ import annotations

from typing import Any

from autoseg._version import __version__

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from autoseg.inference.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
