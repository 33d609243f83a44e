"""Inference engines: what runs a fold's network on the sliding window's batches.

Everything around the network — preprocessing, the sliding window, mirroring TTA, the folds' mean,
export — is the predictor's and the same for every engine; an engine only maps a batch
``(B, C, *patch)`` to logits ``(B, K, *patch)``.

* ``torch``: the network as trained, through :mod:`autoseg.inference.cpu` on the CPU (fp32) and
  autocast on CUDA. The only engine on a GPU.
* ``openvino`` (``pip install 'autoseg[openvino]'``): the network as an ONNX graph, compiled by
  OpenVINO's CPU plugin, one static-shape model per batch shape. On CPUs with bf16 units (Intel
  AMX or AVX-512 BF16) it runs bf16: on the 2-vCPU Sapphire Rapids 5.2x today's torch fp32 per
  network call on the Hippocampus default plan and 4.4x on a 128^3 CT window, Dice -0.0004 over 60
  held-out cases (``benchmarks/README.md``). Without them it runs fp32 (1.05x torch) or, when the
  model file carries int8 graphs, int8.
* ``onnxruntime`` (``pip install 'autoseg[onnx]'``): the ONNX graph on ONNX Runtime's CPU provider.
  Measured slower than torch in fp32 (0.48x: its 3D convolutions) and about even in int8 (1.08x),
  so never chosen by ``auto``; there for users whose deployment is ONNX Runtime.

``--engine auto`` takes OpenVINO on the CPU when it is installed, else torch, and says which.
The ONNX graph comes from the model file (``autoseg export --format onnx``: fp32, and int8 with
``--int8``) or is exported from the weights at load (~1 s per fold). Graphs are data: they are
checked before use (:func:`check_onnx_graph`: no external data, which could name files to read; only
the standard operator domain; one input and one output of the expected shapes).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_bf16_units(flags: frozenset[str]) -> bool:
    """Whether the CPU computes bf16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16 is
    emulated and slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)


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
        return EngineChoice("torch", "amp" if precision == "auto" else "fp32")
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
        # (benchmarks/README.md); else the model's int8 graphs (VNNI), else fp32.
        if bf16_units:
            return EngineChoice("openvino", "bf16", "the CPU has bf16 units")
        return EngineChoice("openvino", "int8" if has_int8 else "fp32")
    return EngineChoice("openvino", precision)


# ----------------------------------------------------------------------------------------------
# ONNX graphs: checked before any engine reads them


def check_onnx_graph(data: bytes, where: str, *, input_channels: int, num_classes: int, dims: int) -> None:
    """Refuse an ONNX graph that is not one of ours, before an engine parses it.

    Raises:
        ConfigError: unreadable; tensors stored outside the graph (external data); operators from
            another domain than the standard one; inputs or outputs not ``x (B, C, *patch)`` and
            ``logits (B, K, *patch)``.
    """
    import onnx

    fix = "export the model again with autoseg export --format onnx"
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - protobuf raises several types for damaged bytes
        raise ConfigError(f"{where}: not a readable ONNX graph; {fix}") from None
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ConfigError(f"{where}: tensor {tensor.name!r} is stored outside the graph (external data); "
                              f"autoseg reads self-contained graphs only; {fix}")
    domains = {o.domain for o in model.opset_import} | {n.domain for n in _graph_nodes(model.graph)}
    if not domains <= set(ONNX_DOMAINS):
        raise ConfigError(f"{where}: uses operators of domain(s) {sorted(domains - set(ONNX_DOMAINS))}; "
                          f"autoseg reads graphs of the standard ONNX operators only; {fix}")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    expected = ((ONNX_INPUT, input_channels), (ONNX_OUTPUT, num_classes))
    for values, (name, channels) in zip((inputs, list(model.graph.output)), expected):
        shape = [d.dim_value if d.HasField("dim_value") else None for d in
                 (values[0].type.tensor_type.shape.dim if len(values) == 1 else [])]
        if len(values) != 1 or values[0].name != name or len(shape) != dims + 2 or shape[1] != channels:
            found = ", ".join(f"{v.name} {[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]}"
                              for v in values)
            raise ConfigError(f"{where}: expected {name} (batch, {channels}, {dims} spatial sizes), found {found}; {fix}")


def _graph_nodes(graph: "onnx.GraphProto"):  # type: ignore[name-defined]  # noqa: ANN202, F821
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _graph_nodes(sub)


def _graph_tensors(graph: "onnx.GraphProto"):  # type: ignore[name-defined]  # noqa: ANN202, F821
    yield from graph.initializer
    for node in _graph_nodes(graph):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors


# ----------------------------------------------------------------------------------------------
# Engines: callables from a batch tensor to its logits tensor


class OpenVinoNetwork:
    """One fold's ONNX graph on OpenVINO's CPU plugin: compiled once per input shape (static
    shapes are faster than a dynamic batch), each with its own infer request."""

    def __init__(self, graph: bytes, precision: str, threads: int) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(graph, b"")
        # int8 graphs keep their quantised convolutions; the hint sets the precision of the rest.
        hint = "bf16" if precision == "bf16" or (precision == "int8" and has_bf16_units(cpu_flags())) else "f32"
        self._config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_NUM_THREADS": int(threads)}
        self._requests: dict[tuple[int, ...], object] = {}

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        shape = tuple(int(s) for s in x.shape)
        request = self._requests.get(shape)
        if request is None:
            model = self._model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            self._requests[shape] = request
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
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self._session.run([ONNX_OUTPUT], {ONNX_INPUT: x.detach().float().contiguous().numpy()})[0])


def build_engine_network(choice: EngineChoice, graph: bytes, threads: int) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """The callable of an ONNX engine (``choice.engine`` openvino or onnxruntime) for one graph."""
    if choice.engine == "openvino":
        return OpenVinoNetwork(graph, choice.precision, threads)
    if choice.engine == "onnxruntime":
        return OnnxRuntimeNetwork(graph, threads)
    raise ValueError(f"not an ONNX engine: {choice.engine}")


__all__ = ["ENGINES", "EXTRAS", "ONNX_INPUT", "ONNX_OUTPUT", "PRECISIONS", "EngineChoice", "OnnxRuntimeNetwork",
           "OpenVinoNetwork", "build_engine_network", "check_engine_names", "check_onnx_graph", "choose_engine",
           "cpu_flags", "has_bf16_units", "installed"]
