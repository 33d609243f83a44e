"""Degradations that make restoration pairs from clean CT: low dose and thick slices.

* :mod:`autoseg.simulate.projector` — parallel-beam projection and filtered back-projection,
  batched over slices (torch on the CPU).
* :mod:`autoseg.simulate.low_dose` — the low-dose model (pure: arrays in, arrays out).
* :mod:`autoseg.simulate.thick_slices` — slab averaging and its geometry (pure).
* :mod:`autoseg.simulate.run` — ``autoseg simulate``: inputs found and checked, the restoration
  dataset written (``imagesTr`` degraded, ``targetsTr`` clean, ``dataset.json``).

See docs/restoration.md for the model, its defaults and the noise it produces on real CT.
"""

from __future__ import annotations
