"""A fold's network as an ONNX graph, fp32 or int8, for the OpenVINO and ONNX Runtime engines.

* :func:`network_to_onnx`: the inference network (no deep-supervision heads) at the plan's patch
  size, input ``x (batch, C, *patch)`` with a dynamic batch, output ``logits``. The inputs are the
  preprocessed windows the predictor cuts (normalised intensities; 2.5D: neighbour slices as
  channels), so a graph used outside autoseg needs autoseg's preprocessing in front of it.
* :func:`quantize_int8`: static post-training quantisation with ONNX Runtime's tools (QDQ,
  per-channel int8 weights, uint8 activations — U8S8, ONNX Runtime's advice for x86 with VNNI —
  MinMax ranges) calibrated on :func:`calibration_windows`: windows the sliding window cuts from the
  fold's own preprocessed training cases.

Calibration keeps every activation of a window in memory (~20 GB for a 128^3 window of the CT
plan's network), so windows larger than :data:`CALIBRATION_VOXELS` are cropped, halving their
largest axes; the network is fully convolutional and every window is instance-normalised, so the
ranges carry over, and the graph is the same at any size: only its declared input size changes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.inference.engines import ONNX_INPUT, ONNX_OUTPUT, WEIGHTS_KEY
from autoseg.plans import Configuration

if TYPE_CHECKING:
    import torch

#: ONNX opset of exported graphs (QuantizeLinear per channel needs >= 13; 17 has every op used).
ONNX_OPSET = 17
#: Calibration windows are cropped to at most this many voxels (see the module doc).
CALIBRATION_VOXELS = 2**18
#: Calibration cases by default (one window each).
CALIBRATION_CASES = 20


def network_to_onnx(net: "torch.nn.Module", input_shape: Sequence[int], *, weights_sha256: str,
                    spatial_dynamic: bool = False) -> bytes:
    """The network as a self-contained ONNX graph (no external data).

    Args:
        net: the inference network (eval mode, no deep supervision), on the CPU, NCDHW.
        input_shape: ``(batch, C, *patch)`` of the example input; the batch is dynamic.
        weights_sha256: the digest of the weights (:func:`autoseg.inference.engines.weights_digest`),
            recorded in the graph's metadata so that it is used only with those weights.
        spatial_dynamic: also leave the spatial sizes dynamic (for calibration on smaller windows).

    Changes process-wide settings while it runs (stdout goes to stderr, warnings are muted): export
    before serving requests from other threads, as ``Segmenter.load`` does.

    Raises:
        ConfigError: the exporter failed (with its message).
    """
    import torch

    input_shape = tuple(int(s) for s in input_shape)
    # Traced on the smallest input the network takes, with the spatial sizes left dynamic, then the
    # declared sizes are set (as quantize_int8 does): the graph holds no shape constants, so its
    # nodes and weights are those of a trace at the patch size, without running the network on a
    # whole patch first (4.9 s of an 8.5 s export of the default network at 48x128x128 on the CPU,
    # paid by every predict --engine openvino of a WORK folder, whose checkpoints have no graph).
    example_shape = input_shape
    if getattr(net, "topology", None) is not None:
        example_shape = (*input_shape[:2], *trace_size(input_multiple_of(net), input_shape[2:]))
    example = torch.zeros(example_shape)
    axes = {0: "batch"} | {i: f"size{i - 2}" for i in range(2, len(input_shape))}
    buffer = io.BytesIO()
    try:
        # TorchScript-based exporter: no onnxscript needed. Its deprecation warnings and step
        # reports are not for the user.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=[ONNX_INPUT],
                              output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET,
                              dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes})
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ConfigError(f"ONNX export of the network failed ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    return _with_weights_digest(buffer.getvalue(), weights_sha256, None if spatial_dynamic else input_shape[2:])


def input_multiple_of(net: "torch.nn.Module") -> tuple[int, ...]:
    """The product of a U-Net's strides per axis (:func:`autoseg.networks.input_multiple`)."""
    from autoseg.networks import input_multiple

    return input_multiple(net.topology)  # type: ignore[arg-type]


def trace_size(multiple: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """The spatial size an export traces the network on: each axis its stride multiple (the
    smallest size the network takes) and the last axis that the patch allows twice that (instance
    norm needs more than one voxel at the bottleneck); the patch itself when no axis allows it."""
    size = [int(m) for m in multiple]
    for axis in reversed(range(len(size))):
        if int(patch[axis]) >= 2 * size[axis]:
            size[axis] *= 2
            return tuple(size)
    return tuple(int(p) for p in patch)


def _with_weights_digest(graph: bytes, weights_sha256: str, spatial: Sequence[int] | None = None) -> bytes:
    """The graph with the weights' digest in its metadata and, when ``spatial`` is given, its input and
    output declared with those spatial sizes (the batch stays dynamic; intermediate shapes are left
    to the engines' shape inference)."""
    import onnx

    model = onnx.load_model_from_string(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHTS_KEY, weights_sha256
    if spatial is not None:
        for value in (*model.graph.input, *model.graph.output):
            for dim, size in zip(list(value.type.tensor_type.shape.dim)[2:], spatial):
                dim.dim_value = int(size)
        model.graph.ClearField("value_info")
    return model.SerializeToString()


def calibration_patch(patch: Sequence[int], multiple: Sequence[int], voxels: int = CALIBRATION_VOXELS) -> tuple[int, ...]:
    """The calibration window: ``patch``, its largest axis halved (keeping the network's input
    multiple) while it has more than ``voxels`` voxels."""
    size = [int(p) for p in patch]
    while math.prod(size) > voxels:
        axis = max(range(len(size)), key=lambda a: size[a])
        half = size[axis] // 2
        if half < multiple[axis] or half % multiple[axis]:
            break
        size[axis] = half
    return tuple(size)


def training_cases(work: Path, configuration: str, fold: int) -> tuple[list[str], bool]:
    """The fold's training cases that have preprocessed data (``splits.json``), and True; every
    preprocessed case and False when the fold's split is missing or none of its training cases is
    preprocessed.

    Raises:
        DatasetError: no preprocessed case.
    """
    from autoseg.preprocessing.run import preprocessed_dir

    folder = preprocessed_dir(work, configuration)
    cases = sorted(p.stem for p in folder.glob("*.npy") if not p.stem.endswith("_seg")) if folder.is_dir() else []
    if not cases:
        raise DatasetError(f"{folder}: no preprocessed cases to calibrate int8 on; run autoseg preprocess "
                           f"{work} -c {configuration} first (or export without --int8)")
    try:
        splits = json.loads((Path(work) / "splits.json").read_text(encoding="utf-8"))
        train = set(splits[fold]["train"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return cases, False
    chosen = [c for c in cases if c in train]
    return (chosen, True) if chosen else (cases, False)


def calibration_windows(work: Path, configuration: str, config: Configuration, num_classes: int, fold: int,
                        cases: int = CALIBRATION_CASES, seed: int = 0) -> list[np.ndarray]:
    """One window per training case (up to ``cases``), as the sliding window cuts them (2.5D
    context included), chosen and cropped to :func:`calibration_patch` reproducibly from ``seed``.

    Returns:
        ``(1, C, *calibration_patch)`` float32 arrays.
    """
    import torch

    from autoseg.inference.window import count_windows, sliding_window
    from autoseg.networks import input_multiple
    from autoseg.preprocessing.run import load_case, preprocessed_dir

    rng = np.random.default_rng(seed)
    names, _ = training_cases(work, configuration, fold)
    names = [names[int(i)] for i in np.sort(rng.choice(len(names), size=min(cases, len(names)), replace=False))]
    crop = calibration_patch(config.patch_size, input_multiple(config.topology))
    windows: list[np.ndarray] = []
    for name in names:
        data, _, _ = load_case(preprocessed_dir(work, configuration), name)
        tensor = torch.from_numpy(np.array(data, dtype=np.float32))
        wanted = int(rng.integers(count_windows(tensor.shape[1:], config.patch_size, 0.5)))
        seen = [0]

        def capture(x: torch.Tensor, wanted: int = wanted, seen: list[int] = seen) -> torch.Tensor:
            for sample in x:
                if seen[0] == wanted:
                    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(sample.shape[1:], crop)]
                    window = sample[(slice(None), *(slice(a, a + c) for a, c in zip(starts, crop)))]
                    windows.append(window.unsqueeze(0).numpy().copy())
                seen[0] += 1
            return torch.zeros((x.shape[0], num_classes, *x.shape[2:]))

        with torch.inference_mode():
            sliding_window(capture, tensor, config.patch_size, 0.5, context_slices=config.context_slices, forward_batch=1)
    return windows


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(net: "torch.nn.Module", input_shape: Sequence[int], windows: Sequence[np.ndarray], *,
                  weights_sha256: str) -> bytes:
    """The network as an int8 QDQ ONNX graph, statically quantised on ``windows`` (see the module doc).

    Args:
        net: the inference network.
        input_shape: ``(batch, C, *patch)``: the declared input of the result (batch dynamic).
        windows: calibration inputs ``(1, C, *size)`` (:func:`calibration_windows`).

    Raises:
        ConfigError: ONNX Runtime's quantisation tools are not installed, or quantisation failed.
    """
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        raise ConfigError("--int8 needs ONNX Runtime's quantisation tools: pip install 'autoseg[onnx]'") from None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{ONNX_INPUT: w} for w in windows])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    graph = network_to_onnx(net, input_shape, spatial_dynamic=True, weights_sha256=weights_sha256)
    with tempfile.TemporaryDirectory(prefix="autoseg-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        try:
            # The quantiser logs advice and per-tensor notes through the root logger: not for the user.
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), _quiet_logging():
                warnings.simplefilter("ignore")
                quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types
            raise ConfigError(f"int8 quantisation failed ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        model = onnx.load(str(target))
    # Back to the plan's patch: only the declared sizes change (no shape constants in the graph).
    for value in (*model.graph.input, *model.graph.output):
        for dim, size in zip(list(value.type.tensor_type.shape.dim)[2:], input_shape[2:]):
            dim.dim_value = int(size)
    model.graph.ClearField("value_info")
    return model.SerializeToString()


__all__ = ["CALIBRATION_CASES", "CALIBRATION_VOXELS", "ONNX_OPSET", "calibration_patch", "calibration_windows",
           "input_multiple_of", "network_to_onnx", "quantize_int8", "trace_size", "training_cases"]
