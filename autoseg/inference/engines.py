"""Inference engines: what runs a fold's network on the sliding window's batches.

Everything around the network — preprocessing, the sliding window, mirroring TTA, the folds' mean,
export — is the predictor's and the same for every engine; an engine only maps a batch
``(B, C, *patch)`` to logits ``(B, K, *patch)``.

* ``torch``: the network as trained, through :mod:`autoseg.inference.cpu` on the CPU (fp32) and
  autocast on CUDA. The only engine on a GPU.
* ``openvino`` (``pip install 'autoseg[openvino]'``): the network as an ONNX graph, compiled by
  OpenVINO's CPU plugin, one static-shape model per batch shape. On CPUs with bf16 units (Intel
  AMX or AVX-512 BF16) it runs bf16: on the 2-vCPU Sapphire Rapids 4.8x today's torch fp32 per
  case on the 5-fold Hippocampus default plan and 4.4x per 128^3 CT window, Dice -0.0004 over 60
  held-out cases (``benchmarks/README.md``). Without them it runs fp32 (1.05x torch); int8
  (graphs from ``export --int8``) only with ``--precision int8``.
* ``onnxruntime`` (``pip install 'autoseg[onnx]'``): the ONNX graph on ONNX Runtime's CPU provider.
  Measured slower than torch through the whole predictor (0.48x in fp32, 0.44x in int8 on the
  5-fold Hippocampus plan), so never chosen by ``auto``; there for deployments on ONNX Runtime.

``--engine auto`` takes OpenVINO on the CPU when it is installed, else torch, and says which.
The ONNX graph comes from the model file (``autoseg export --format onnx``: fp32, and int8 with
``--int8``) or is exported from the weights at load (~1 s per fold). Graphs are data: they are
checked before use (:func:`check_onnx_graph`: a flat graph of the operators autoseg writes, every
tensor inside it — external data would name files for the engine to read —, one float32 input and
output of the expected shapes), and the engines get the checked message re-serialised. Each graph
carries the sha256 of the weights it was made from (:func:`weights_digest`); one made from other
weights (the fold was trained again) is not used.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.device import cpu_flags, has_bf16_units
from autoseg.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    import torch

#: ``--engine`` values; ``auto`` resolves to one of the others (:func:`choose_engine`).
ENGINES = ("auto", "torch", "openvino", "onnxruntime")
#: ``--precision`` values; ``auto`` resolves per engine (:func:`choose_engine`).
PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: The ONNX graph's input and output names (input: preprocessed windows ``(B, C, *patch)``).
ONNX_INPUT, ONNX_OUTPUT = "x", "logits"
#: Operator domains a graph may use: the standard ones (QDQ int8 included).
ONNX_DOMAINS = ("", "ai.onnx")
#: What a user installs for each engine (named in errors).
EXTRAS = {"openvino": "autoseg[openvino]", "onnxruntime": "autoseg[onnx]"}
#: The Python modules each engine needs (onnx: to check graphs before use).
_MODULES = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx")}


@dataclass(frozen=True)
class EngineChoice:
    """The engine and precision a predictor runs, and why (one line for the log)."""

    engine: str
    precision: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.engine} {self.precision}" + (f" ({self.reason})" if self.reason else "")


def installed(name: str) -> bool:
    """Whether the packages of an engine (``openvino`` / ``onnxruntime``), or a module, can be imported."""
    return all(importlib.util.find_spec(module) is not None for module in _MODULES.get(name, (name,)))


def check_engine_names(engine: str, precision: str) -> None:
    """Refuse an unknown ``--engine`` or ``--precision`` before any work.

    Raises:
        UnknownNameError: with the known names.
    """
    if engine not in ENGINES:
        raise UnknownNameError("engine", engine, ENGINES, "--engine")
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS, "--precision")


def choose_engine(engine: str, precision: str, *, device_type: str, has_int8: bool,
                  available: Callable[[str], bool], bf16_units: bool) -> EngineChoice:
    """The engine and precision to run (pure: the machine comes in as arguments).

    Args:
        engine: an :data:`ENGINES` value.
        precision: a :data:`PRECISIONS` value.
        device_type: ``cpu``, ``cuda`` or ``mps``.
        has_int8: every selected fold has an int8 graph (``export --format onnx --int8``).
        available: whether an engine's packages are installed (:func:`installed`).
        bf16_units: whether the CPU computes bf16 natively (:func:`has_bf16_units`).

    Raises:
        ConfigError: an unknown name, an engine that is not installed or cannot run on the
            device, a precision the engine or the model cannot give.
    """
    check_engine_names(engine, precision)
    if device_type != "cpu":
        if engine not in ("auto", "torch"):
            raise ConfigError(f"--engine {engine}: runs on the CPU only; use --device cpu, or --engine torch on {device_type}")
        if precision in ("bf16", "int8"):
            raise ConfigError(f"--precision {precision}: on {device_type} the torch engine runs autocast "
                              "(--precision auto) or fp32 (--precision fp32)")
        return EngineChoice("torch", "amp" if precision == "auto" and device_type == "cuda" else "fp32")
    if engine == "auto":
        if available("openvino"):
            engine = "openvino"
        else:
            if precision in ("bf16", "int8"):
                raise ConfigError(f"--precision {precision} on the CPU needs OpenVINO: pip install '{EXTRAS['openvino']}'")
            return EngineChoice("torch", "fp32", f"pip install '{EXTRAS['openvino']}' for the faster OpenVINO engine")
    if engine == "torch":
        if precision in ("bf16", "int8"):
            raise ConfigError(f"--precision {precision}: the torch engine runs fp32 on the CPU; "
                              f"use --engine openvino (pip install '{EXTRAS['openvino']}')")
        return EngineChoice("torch", "fp32")
    if not available(engine):
        raise ConfigError(f"--engine {engine}: not installed; pip install '{EXTRAS[engine]}'")
    if precision == "int8" and not has_int8:
        raise ConfigError("--precision int8: the model has no int8 graphs; export it with "
                          "autoseg export WORK -o MODEL --format onnx --int8")
    if engine == "onnxruntime":
        if precision == "bf16":
            raise ConfigError("--precision bf16: ONNX Runtime's CPU provider has no bf16 kernels; "
                              "use --engine openvino or --precision fp32")
        chosen = "int8" if precision == "int8" or (precision == "auto" and has_int8) else "fp32"
        return EngineChoice("onnxruntime", chosen)
    if precision == "bf16" and not bf16_units:
        raise ConfigError("--precision bf16: this CPU has no bf16 units (AMX or AVX-512 BF16), where "
                          "bf16 is slower than fp32; use --precision fp32 or int8")
    if precision == "auto":
        # bf16 where the CPU has the units: the fastest and the closest to fp32 measured
        # (benchmarks/README.md). Elsewhere fp32: int8 moved the Dice by +0.008 on Hippocampus
        # (outside +-0.005) and was only measured on this AMX CPU, so it runs only when asked for.
        if bf16_units:
            return EngineChoice("openvino", "bf16", "the CPU has bf16 units")
        return EngineChoice("openvino", "fp32", "no bf16 units; --precision int8 for a model exported with --int8")
    return EngineChoice("openvino", precision)


# ----------------------------------------------------------------------------------------------
# ONNX graphs: checked before any engine reads them


@dataclass(frozen=True)
class CheckedGraph:
    """An ONNX graph that passed :func:`check_onnx_graph`: its bytes re-serialised from what was
    checked (so an engine parses exactly that), and its metadata (``autoseg_weights_sha256``: the
    weights it was exported from, :func:`weights_digest`)."""

    data: bytes
    metadata: dict[str, str]


#: Operators autoseg's export and int8 quantisation emit (the U-Net's plain and residual variants,
#: its instance norms written out, QDQ): graphs with any other operator are refused.
ONNX_OPERATORS = frozenset({
    "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "ConvTranspose", "DequantizeLinear", "Div", "Identity",
    "InstanceNormalization", "LeakyRelu", "Mul", "Pow", "QuantizeLinear", "ReduceMean", "Relu", "Reshape", "Sqrt",
    "Sub",
})
#: Metadata key of the weights digest a graph was exported from.
WEIGHTS_KEY = "autoseg_weights_sha256"


def check_onnx_graph(data: bytes, where: str, *, input_channels: int, num_classes: int, dims: int) -> CheckedGraph:
    """Refuse an ONNX graph that is not one of ours, before any engine parses it.

    Allowed: one flat graph of :data:`ONNX_OPERATORS` from the standard domain, every tensor
    stored inside it, float32 input ``x (B, C, *patch)`` and output ``logits (B, K, *patch)``.
    Refused: tensors stored outside the graph (external data: an engine would read the named
    file) anywhere in the model, subgraphs (``If``/``Loop`` bodies), sparse tensors, functions,
    training information, other operators or domains.

    Returns:
        The graph re-serialised from the checked message, and its metadata.

    Raises:
        ConfigError: one line naming ``where``, what is wrong and what to do.
    """
    import onnx

    fix = "export the model again with autoseg export --format onnx"

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"{where}: {problem}; autoseg reads only the graphs its own export writes; {fix}")

    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - protobuf raises several types for damaged bytes
        raise ConfigError(f"{where}: not a readable ONNX graph; {fix}") from None
    model.DiscardUnknownFields()
    if _has_external_data(model):
        raise refuse("a tensor is stored outside the graph (external data, which names a file to read)")
    if len(model.functions) or len(model.training_info) or len(model.graph.sparse_initializer):
        raise refuse("it holds functions, training information or sparse tensors")
    domains = {o.domain for o in model.opset_import} | {n.domain for n in model.graph.node}
    if not domains <= set(ONNX_DOMAINS):
        raise refuse(f"operators of domain(s) {sorted(domains - set(ONNX_DOMAINS))}")
    plain = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR,
             onnx.AttributeProto.SPARSE_TENSORS)
    for node in model.graph.node:
        if node.op_type not in ONNX_OPERATORS:
            raise refuse(f"operator {node.op_type!r}")
        if any(a.type in plain or a.HasField("g") or len(a.graphs) or a.HasField("sparse_tensor")
               or len(a.sparse_tensors) for a in node.attribute):
            raise refuse(f"node {node.name or node.op_type!r} has a subgraph or a sparse tensor")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    expected = ((ONNX_INPUT, input_channels), (ONNX_OUTPUT, num_classes))
    for values, (name, channels) in zip((inputs, list(model.graph.output)), expected):
        tensor = values[0].type.tensor_type if len(values) == 1 else None
        shape = [d.dim_value if d.HasField("dim_value") else None for d in (tensor.shape.dim if tensor else [])]
        if (len(values) != 1 or values[0].name != name or tensor.elem_type != onnx.TensorProto.FLOAT  # type: ignore[union-attr]
                or len(shape) != dims + 2 or shape[1] != channels):
            found = ", ".join(f"{v.name} {[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]}"
                              for v in values)
            raise ConfigError(f"{where}: expected float32 {name} (batch, {channels}, {dims} spatial sizes), "
                              f"found {found}; {fix}")
    return CheckedGraph(model.SerializeToString(), {p.key: p.value for p in model.metadata_props})


def _has_external_data(message: object) -> bool:
    """Whether any TensorProto anywhere in ``message`` (a protobuf message) points outside it."""
    import onnx

    stack = [message]
    while stack:
        current = stack.pop()
        if isinstance(current, onnx.TensorProto) and (
                current.data_location == onnx.TensorProto.EXTERNAL or len(current.external_data)):
            return True
        for field, value in current.ListFields():  # type: ignore[attr-defined]
            if field.type != field.TYPE_MESSAGE:
                continue
            # A message, or a repeated field of messages (protobuf's descriptors differ by version).
            stack.extend([value] if hasattr(value, "ListFields") else list(value))
    return False


def weights_digest(state: Mapping[str, np.ndarray]) -> str:
    """The sha256 of a state dict as a model file stores it (``.npz`` bytes, in order): what binds
    an ONNX graph to the weights it was exported from."""
    from autoseg.inference.model_file import npz_bytes

    return hashlib.sha256(npz_bytes(state)).hexdigest()


# ----------------------------------------------------------------------------------------------
# Engines: callables from a batch tensor to its logits tensor


class OpenVinoNetwork:
    """One fold's ONNX graph on OpenVINO's CPU plugin: compiled once per input shape (static
    shapes are faster than a dynamic batch), each with its own infer request; the
    :data:`MAX_SHAPES` most recently used are kept (the last batch of a sliding window varies)."""

    #: Compiled shapes kept per fold.
    MAX_SHAPES = 4

    def __init__(self, graph: bytes, precision: str, threads: int, first_shape: tuple[int, ...] | None = None) -> None:
        import openvino as ov

        self._core = ov.Core()
        # The ONNX frontend by name: the bytes are parsed as ONNX and nothing else.
        frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
        source = _BytesModel(graph)  # kept until converted: the frontend reads the file lazily
        self._model = frontend.convert(frontend.load(source.path))
        del source
        # int8 graphs keep their quantised convolutions; the hint sets the precision of the rest.
        hint = "bf16" if precision == "bf16" or (precision == "int8" and has_bf16_units(cpu_flags())) else "f32"
        self._config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_NUM_THREADS": int(threads)}
        self._requests: OrderedDict[tuple[int, ...], object] = OrderedDict()
        if first_shape is not None:
            self._request(first_shape)  # compile now: a graph OpenVINO cannot run fails at load, not mid-case

    def _request(self, shape: tuple[int, ...]) -> object:
        request = self._requests.get(shape)
        if request is None:
            model = self._model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            self._requests[shape] = request
            while len(self._requests) > self.MAX_SHAPES:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(shape)
        return request

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        request = self._request(tuple(int(s) for s in x.shape))
        out = request.infer({0: x.detach().float().contiguous().numpy()})[0]  # type: ignore[attr-defined]
        return torch.from_numpy(out.copy())  # the request reuses its output buffer


class OnnxRuntimeNetwork:
    """One fold's ONNX graph on ONNX Runtime's CPU provider (all graph optimisations)."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Parse the bytes as ONNX only (ONNX Runtime would take an ORT-format flatbuffer too).
        options.add_session_config_entry("session.load_model_format", "ONNX")
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self._session.run([ONNX_OUTPUT], {ONNX_INPUT: x.detach().float().contiguous().numpy()})[0])


class _BytesModel:
    """A graph's bytes as a file for OpenVINO's ONNX frontend (which loads by path), removed when
    the object goes away (after conversion nothing refers to it)."""

    def __init__(self, data: bytes) -> None:
        import tempfile

        handle, name = tempfile.mkstemp(prefix="autoseg-graph-", suffix=".onnx")
        with open(handle, "wb") as out:
            out.write(data)
        self.path = name

    def __del__(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def build_engine_network(choice: EngineChoice, graph: CheckedGraph, threads: int, first_shape: tuple[int, ...],
                         where: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """The callable of an ONNX engine (``choice.engine`` openvino or onnxruntime) for one checked
    graph, compiled for ``first_shape`` at once.

    Raises:
        ConfigError: the engine cannot load or compile the graph (one line naming ``where``).
    """
    try:
        if choice.engine == "openvino":
            return OpenVinoNetwork(graph.data, choice.precision, threads, first_shape)
        if choice.engine == "onnxruntime":
            return OnnxRuntimeNetwork(graph.data, threads)
    except Exception as exc:  # noqa: BLE001 - the engines raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{where}: {choice.engine} cannot run this graph ({first}); export the model again "
                          "with autoseg export --format onnx, or use --engine torch") from None
    raise ValueError(f"not an ONNX engine: {choice.engine}")


__all__ = [
    "ENGINES",
    "EXTRAS",
    "ONNX_INPUT",
    "ONNX_OPERATORS",
    "ONNX_OUTPUT",
    "PRECISIONS",
    "WEIGHTS_KEY",
    "CheckedGraph",
    "EngineChoice",
    "OnnxRuntimeNetwork",
    "OpenVinoNetwork",
    "build_engine_network",
    "check_engine_names",
    "check_onnx_graph",
    "choose_engine",
    "cpu_flags",
    "has_bf16_units",
    "installed",
    "weights_digest",
]
