"""Prediction: trained folds -> outputs in the input's exact geometry.

One module per responsibility:

* :mod:`~autoseg.inference.models` — which configurations and folds (WORK, ``best.yaml``); building
  their networks from checkpoints (torch-free until a network is built).
* :mod:`~autoseg.inference.inputs` — ``-i`` files, folders and DICOM series as cases; their headers
  checked against the model before any work.
* :mod:`~autoseg.inference.predictor` — :class:`~autoseg.inference.predictor.Predictor`: the
  networks loaded once; ``predict(image, geometry)`` and ``export(...)``.
* :mod:`~autoseg.inference.window` — the sliding window with Gaussian blending and mirroring TTA.
* :mod:`~autoseg.inference.cpu` — CPU kernels for the inference network (oneDNN, packed weights).
* :mod:`~autoseg.inference.outputs` — the files a prediction writes, checked before any work.
* :mod:`~autoseg.inference.dicom` — DICOM series in, DICOM SEG out.
* :mod:`~autoseg.inference.uncertainty` — entropy and fold-disagreement maps.
* :mod:`~autoseg.inference.api` — :class:`~autoseg.inference.api.Segmenter`, the Python API (also
  ``autoseg.Segmenter``): a model file or WORK loaded once, called on images; every case of
  ``autoseg predict`` goes through it.
* :mod:`~autoseg.inference.model_file` — the model file format (``.autoseg.zip``) and its checks;
  :mod:`~autoseg.inference.model_export` — ``autoseg export`` and ``import``, and opening a WORK
  folder or a model file alike; :mod:`~autoseg.inference.model_card` — its MODEL.md.
* :mod:`~autoseg.inference.run` — ``autoseg predict``: files in, files out, sharded over processes.

What a prediction *is* (softmax label maps, sigmoid regions, ...) is the task's
(:mod:`autoseg.tasks`): the predictor asks it for the activation and the export.

The names below are importable from this package directly (loaded on first use, so importing the
package stays cheap)::

    from autoseg.inference import Predictor, Segmenter, select_models
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "autoseg.inference.predictor",
    "PredictorStats": "autoseg.inference.predictor",
    "ModelSelection": "autoseg.inference.models",
    "select_models": "autoseg.inference.models",
    "trained_models": "autoseg.inference.models",
    "InputCase": "autoseg.inference.inputs",
    "find_input_cases": "autoseg.inference.inputs",
    "read_input": "autoseg.inference.inputs",
    "Segmenter": "autoseg.inference.api",
    "export_model": "autoseg.inference.model_export",
    "import_model": "autoseg.inference.model_export",
    "read_model": "autoseg.inference.model_file",
    "PredictCallbacks": "autoseg.inference.run",
    "PredictSummary": "autoseg.inference.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoseg.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
