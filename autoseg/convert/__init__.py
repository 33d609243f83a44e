"""Converters from benchmark formats to the nnU-Net v2 raw layout (``autoseg convert ...``).

* :mod:`autoseg.convert.dicom_rt` — CT series + RTSTRUCT per patient (AAPM LCTSC 2017 layout).
* :mod:`autoseg.convert.kaggle_uwmgi` — Kaggle "UW-Madison GI Tract Image Segmentation"
  (16-bit PNG slices + run-length-encoded masks in train.csv), classes as overlapping regions.
* :mod:`autoseg.convert.png_masks` — 2D image/mask folders (e.g. ISBI 2012 EM membranes), mask
  values mapped through an explicit ``--map V=L``.

Every converter reads its input without modifying it, writes every file atomically, skips cases
that an earlier run completed, and produces a dataset that passes ``autoseg check``. Shared
conventions (the region bitmask encoding, dataset.json's ``autoseg_convert`` record) are in
:mod:`autoseg.convert.common`. The submodules import pydicom lazily and read pixels through
:mod:`autoseg.imageio` (the only SimpleITK user).
"""

from __future__ import annotations

from autoseg.convert.common import ConvertSummary, bitmask_labels, encode_bitmask

__all__ = ["ConvertSummary", "bitmask_labels", "encode_bitmask"]
