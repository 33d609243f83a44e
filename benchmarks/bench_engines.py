"""Benchmark: CPU inference engines for one fold's network (torch fp32 / bf16 / int8, ONNX Runtime, OpenVINO).

    python benchmarks/bench_engines.py [--work WORK] [-c 3d_fullres] [-f 0] [--engines ...] [--rounds 7]
                                       [--calls 2] [--batch N] [--calib 20] [--memory] [--dice RAW]
                                       [--output result.json]

One process, one fold's network (its checkpoint in ``WORK/models/<config>/fold_<f>/``; without
one: random weights, the same speed) at the plan's patch size and the predictor's CPU batch
(:func:`autoseg.inference.window.default_forward_batch`). Every engine gets the same input batch:
windows cut from the preprocessed training cases in ``WORK/preprocessed/<config>`` where there are
any, else N(0, 1) noise (the preprocessed intensities are z-scored). The engines:

* ``torch_fp32``: today's CPU predictor (:func:`autoseg.inference.cpu.prepare_for_cpu_inference`,
  channels-last 3D, glibc keeps freed memory). The baseline of every ratio and logit error.
* ``torch_fp32_plain``: the network as trained, channels-last, no :mod:`autoseg.inference.cpu`.
* ``torch_bf16_autocast``: the plain network under ``torch.autocast("cpu", torch.bfloat16)``.
* ``torch_bf16``: the plain network cast to bfloat16 (weights and activations).
* ``onnxruntime_fp32``: the plain network exported to ONNX by autoseg's own export
  (:mod:`autoseg.inference.onnx_export`, as ``autoseg export --format onnx``: no deep-supervision
  heads, dynamic batch), ONNX Runtime's CPU provider, all graph optimisations.
* ``onnxruntime_int8``: that model statically quantised by autoseg (``--int8``: QDQ, per-channel
  int8 weights, uint8 activations, MinMax calibration on ``--calib`` training windows).
* ``openvino_fp32`` / ``openvino_bf16`` / ``openvino_int8`` / ``openvino_int8_bf16``: the same
  ONNX files compiled by OpenVINO's CPU plugin, one static-shape model per batch size (inference
  precision f32 or bf16; the int8 ones read the QDQ model, their float ops in f32 or bf16).
* ``torch_int8_fx``: PyTorch's own x86 int8 (FX graph mode, ``get_default_qconfig_mapping("x86")``,
  the same calibration windows).

Engines whose package is missing (or that fail to build) are reported as skipped with the
reason. Timing: after every engine is built and warmed up, rounds run every engine ``--calls``
times each, the order rotated every round (A B C, B C A, ...), until ``--rounds`` rounds were
quiet (other processes used at most 5 % of the CPUs; ``--max-rounds`` rounds at most). The
statistics use the quiet rounds only (all rounds, flagged, when fewer than 2 were quiet): per
engine the median call, the ratio ``torch_fp32 median / engine median`` (> 1: faster than
today), the ratio of the fastest calls, and the median of the per-round ratios (paired: the same
minutes of machine load). The load average is recorded before and after, and every round's
foreign CPU share. Under load the torch engines slow down far more than OpenVINO (their OpenMP
barriers wait for a preempted thread), so only quiet rounds compare engines fairly. Minor page
faults per call are counted too: in a process that also holds the other engines, torch's
activations are not served from reused memory (glibc trims them away).

``--memory`` measures each engine's peak RSS in a fresh process of its own (build, warm-up, 2
calls). ``--dice RAW`` compares segmentations: every labelled case of the raw dataset RAW that is
not in the fold's training split is preprocessed with the plan, predicted by
:func:`autoseg.inference.window.sliding_window` (mirroring TTA as the predictor does) with each
engine as the network, and scored on the preprocessed grid against its preprocessed label
(:func:`autoseg.metrics.case_metrics`): mean Dice per engine and the voxel agreement with
``torch_fp32``. Only meaningful with a trained checkpoint.

Nothing here is a dependency of autoseg: onnx, onnxruntime, onnxscript and openvino are imported
inside the engines that need them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import (DEFAULT_RAW, QUIET, busy_seconds, foreign_fraction, load, own_seconds,  # noqa: E402
                           prepare)

ENGINES = ("torch_fp32", "torch_fp32_plain", "torch_bf16_autocast", "torch_bf16", "onnxruntime_fp32",
           "onnxruntime_int8", "openvino_fp32", "openvino_bf16", "openvino_int8", "openvino_int8_bf16", "torch_int8_fx")
BASELINE = "torch_fp32"


class Skipped(Exception):
    """The engine cannot run here (package missing, export or build failed)."""


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- the network and its inputs


class Context:
    """What the engines share: the plain network, the input batch, calibration windows, files."""

    def __init__(self, work: Path, config: str, fold: int, batch: int | None, calib: int, tmp: Path,
                 seed: int = 0, onnx_dir: Path | None = None) -> None:
        import torch

        from autoseg import plans as plans_io
        from autoseg.checkpoint import load_checkpoint
        from autoseg.inference.models import build_inference_network
        from autoseg.inference.window import default_forward_batch
        from autoseg.networks import build_network, input_multiple

        self.work, self.config, self.fold, self.tmp = work, config, fold, tmp
        self.plans = plans_io.load(work / "plans.yaml")
        self.cfg = self.plans.configuration(config)
        self.patch = tuple(int(p) for p in self.cfg.patch_size)
        self.batch = batch or default_forward_batch(self.patch)
        self.num_classes = self.plans.num_classes
        checkpoint = work / "models" / config / f"fold_{fold}" / "checkpoint_final.pt"
        if checkpoint.is_file():
            state = load_checkpoint(checkpoint, ("model",))["model"]
            self.net = build_inference_network(self.cfg, self.num_classes, state, checkpoint)
            self.weights = str(checkpoint)
        else:
            torch.manual_seed(fold)
            self.net = build_network(self.cfg.topology, self.cfg.input_channels, self.num_classes,
                                     deep_supervision=False).eval()
            self.weights = "random (no checkpoint)"
        self.net.requires_grad_(False)
        from autoseg.inference.engines import weights_digest

        self.digest = weights_digest({k: v.detach().numpy() for k, v in self.net.state_dict().items()})
        rng = np.random.default_rng(seed)
        windows, self.input_source = self._windows(rng, self.batch, self.patch)
        self.input = torch.from_numpy(np.ascontiguousarray(windows))
        from autoseg.inference.onnx_export import calibration_patch

        self.calib_patch = calibration_patch(self.patch, input_multiple(self.cfg.topology))
        windows, _ = self._windows(rng, calib, self.calib_patch)
        self.calibration = [windows[i:i + 1] for i in range(len(windows))]
        self._onnx: dict[str, Path] = {}
        if onnx_dir is not None:  # files exported by a parent run (memory probes: no export, no calibration)
            for kind, name in (("fp32", "net_fp32.onnx"), ("int8", "net_int8_qdq.onnx")):
                if (onnx_dir / name).is_file():
                    self._onnx[kind] = onnx_dir / name

    def _windows(self, rng: np.random.Generator, count: int, patch: tuple[int, ...]) -> tuple[np.ndarray, str]:
        """``count`` windows ``(count, C, *patch)``: random crops (zero-padded) of the fold's
        preprocessed training cases, else N(0, 1) noise."""
        folder = self.work / "preprocessed" / self.config
        cases = sorted(p for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy")) if folder.is_dir() else []
        splits = self.work / "splits.json"
        if cases and splits.is_file():
            train = set(json.loads(splits.read_text())[self.fold]["train"])
            cases = [p for p in cases if p.stem in train] or cases
        channels = self.cfg.input_channels
        if not cases:
            return rng.standard_normal((count, channels, *patch), dtype=np.float32), "noise N(0,1)"
        out = np.zeros((count, channels, *patch), dtype=np.float32)
        for i in range(count):
            data = np.load(cases[i % len(cases)], mmap_mode="r")
            starts = [int(rng.integers(0, max(1, s - p) + 1)) for s, p in zip(data.shape[1:], patch)]
            crop = data[(slice(None), *(slice(st, st + p) for st, p in zip(starts, patch)))]
            out[(i, slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
        return out, f"crops of the fold's preprocessed training cases ({min(count, len(cases))} of {len(cases)})"

    def plain_copy(self):  # noqa: ANN201
        return copy.deepcopy(self.net)

    def onnx(self, kind: str) -> Path:
        """The exported fp32 model (``"fp32"``) or the static int8 quantisation (``"int8"``)."""
        if kind not in self._onnx:
            if kind == "int8":
                self._onnx[kind] = quantize_onnx(self)
            else:
                self._onnx[kind] = export_onnx(self, self.patch, "net_fp32.onnx")
        return self._onnx[kind]


def export_onnx(ctx: Context, patch: tuple[int, ...], name: str) -> Path:
    """The plain network as ONNX at ``patch`` with a dynamic batch: autoseg's own export
    (:func:`autoseg.inference.onnx_export.network_to_onnx`, what ``export --format onnx`` writes)."""
    from autoseg.errors import ConfigError
    from autoseg.inference.onnx_export import network_to_onnx

    path = ctx.tmp / name
    started = time.perf_counter()
    try:
        path.write_bytes(network_to_onnx(ctx.plain_copy(), (ctx.batch, ctx.cfg.input_channels, *patch),
                                         weights_sha256=ctx.digest))
    except ConfigError as exc:
        raise Skipped(str(exc)) from None
    ctx.export_info = {"exporter": "torchscript (autoseg.inference.onnx_export)",
                       "export_s": round(time.perf_counter() - started, 2)}
    return path


def quantize_onnx(ctx: Context) -> Path:
    """autoseg's static int8 quantisation (:func:`autoseg.inference.onnx_export.quantize_int8`: QDQ,
    per-channel int8 weights, uint8 activations, MinMax) on the context's calibration windows."""
    from autoseg.errors import ConfigError
    from autoseg.inference.onnx_export import quantize_int8

    path = ctx.tmp / "net_int8_qdq.onnx"
    started = time.perf_counter()
    try:
        path.write_bytes(quantize_int8(ctx.plain_copy(), (ctx.batch, ctx.cfg.input_channels, *ctx.patch),
                                       ctx.calibration, weights_sha256=ctx.digest))
    except ConfigError as exc:
        raise Skipped(str(exc)) from None
    ctx.quantize_info = {"calibration_windows": len(ctx.calibration), "calibration_patch": list(ctx.calib_patch),
                         "quantize_s": round(time.perf_counter() - started, 2)}
    return path


# -- engines: each returns fn(x: NCDHW float32 tensor) -> logits float32 tensor


def engine_torch_fp32(ctx: Context) -> Callable:
    import torch

    from autoseg.inference.cpu import keep_freed_memory, prepare_for_cpu_inference

    keep_freed_memory()
    net = prepare_for_cpu_inference(ctx.plain_copy()).to(memory_format=torch.channels_last_3d)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.contiguous(memory_format=torch.channels_last_3d))

    return run


def engine_torch_fp32_plain(ctx: Context) -> Callable:
    import torch

    net = ctx.plain_copy().to(memory_format=torch.channels_last_3d)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.contiguous(memory_format=torch.channels_last_3d))

    return run


def engine_torch_bf16_autocast(ctx: Context) -> Callable:
    import torch

    net = ctx.plain_copy().to(memory_format=torch.channels_last_3d)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x.contiguous(memory_format=torch.channels_last_3d)).float()

    return run


def engine_torch_bf16(ctx: Context) -> Callable:
    import torch

    net = ctx.plain_copy().to(dtype=torch.bfloat16, memory_format=torch.channels_last_3d)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)).float()

    return run


def _ort_session(path: Path, threads: int, profile: Path | None = None):  # noqa: ANN202
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Skipped(f"onnxruntime not installed ({exc})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ONNX Runtime workers would otherwise spin while the other engines run.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_engine(ctx: Context, kind: str) -> Callable:
    import torch

    session = _ort_session(ctx.onnx(kind), torch.get_num_threads())

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    return run


def engine_onnxruntime_fp32(ctx: Context) -> Callable:
    return _ort_engine(ctx, "fp32")


def engine_onnxruntime_int8(ctx: Context) -> Callable:
    return _ort_engine(ctx, "int8")


def _ov_engine(ctx: Context, kind: str, precision: str) -> Callable:
    import torch

    try:
        import openvino as ov
    except ImportError as exc:
        raise Skipped(f"openvino not installed ({exc})") from None
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": precision,
              "PERFORMANCE_HINT": "LATENCY"}
    source = ctx.onnx(kind)
    requests: dict[int, object] = {}

    def request(batch: int):  # noqa: ANN202 - one static-shape model per batch size (faster than dynamic)
        if batch not in requests:
            model = core.read_model(str(source))
            model.reshape({model.inputs[0]: [batch, ctx.cfg.input_channels, *ctx.patch]})
            requests[batch] = core.compile_model(model, "CPU", config).create_infer_request()
        return requests[batch]

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request(x.shape[0]).infer({0: x.contiguous().numpy()})[0].copy())

    return run


def engine_openvino_fp32(ctx: Context) -> Callable:
    return _ov_engine(ctx, "fp32", "f32")


def engine_openvino_bf16(ctx: Context) -> Callable:
    return _ov_engine(ctx, "fp32", "bf16")


def engine_openvino_int8(ctx: Context) -> Callable:
    return _ov_engine(ctx, "int8", "f32")


def engine_openvino_int8_bf16(ctx: Context) -> Callable:
    return _ov_engine(ctx, "int8", "bf16")


class _Traceable:
    """Wrapper factory: the U-Net's forward without its input checks (FX cannot trace those)."""

    @staticmethod
    def build(net):  # noqa: ANN001, ANN205
        import torch

        class Body(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder, self.decoder = net.encoder, net.decoder

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.decoder(self.encoder(x), False)[0]

        return Body()


def _torch_norms(net):  # noqa: ANN001, ANN202
    """autoseg's instance norms -> torch's own (same parameters): quantisable, traceable."""
    import torch

    from autoseg.networks.norm import InstanceNorm2d, InstanceNorm3d

    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, (InstanceNorm2d, InstanceNorm3d)):
                cls = torch.nn.InstanceNorm3d if isinstance(child, InstanceNorm3d) else torch.nn.InstanceNorm2d
                plain = cls(child.num_features, eps=child.eps, affine=True)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return net


def engine_torch_int8_fx(ctx: Context) -> Callable:
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    body = _Traceable.build(_torch_norms(ctx.plain_copy())).eval()
    example = (ctx.input[:1].clone(),)
    mapping = get_default_qconfig_mapping("x86")
    # Quantised ConvTranspose3d wrecks the output (argmax agreement 0.65 with fp32 on the default
    # plan's network, torch 2.13): the decoder's upsampling stays float, dequantised around.
    mapping.set_object_type(torch.nn.ConvTranspose3d, None)
    with warnings.catch_warnings():  # FX quantisation's deprecation notices (moved to torchao)
        warnings.simplefilter("ignore")
        prepared = prepare_fx(body, mapping, example)
    with torch.inference_mode():
        for window in ctx.calibration:
            prepared(torch.from_numpy(window))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = convert_fx(prepared)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return quantized(x.contiguous())

    return run


# -- measurement


def build_engines(ctx: Context, names: list[str]) -> tuple[dict[str, Callable], dict[str, dict]]:
    engines: dict[str, Callable] = {}
    info: dict[str, dict] = {}
    for name in names:
        factory = globals()[f"engine_{name}"]
        started = time.perf_counter()
        try:
            fn = factory(ctx)
            fn(ctx.input)  # first call: kernel selection, weight packing, allocations
            first = time.perf_counter() - started
            fn(ctx.input)
        except Skipped as exc:
            info[name] = {"skipped": str(exc)}
            continue
        except Exception as exc:  # noqa: BLE001 - an engine that fails is reported, not fatal
            info[name] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:400]}"}
            continue
        engines[name] = fn
        info[name] = {"setup_and_first_call_s": round(first, 2), "rss_mb_after_setup": rss_mb()}
    return engines, info


def logit_errors(engines: dict[str, Callable], ctx: Context, info: dict[str, dict]) -> None:
    import torch

    reference = engines[BASELINE](ctx.input).float() if BASELINE in engines else None
    for name, fn in engines.items():
        out = fn(ctx.input).float()
        entry = info[name]
        entry["output_shape"] = list(out.shape)
        if reference is None:
            continue
        diff = (out - reference).abs()
        entry["max_abs_logit_error"] = float(f"{diff.max().item():.3g}")
        entry["mean_abs_logit_error"] = float(f"{diff.mean().item():.3g}")
        entry["max_abs_logit"] = float(f"{reference.abs().max().item():.4g}")
        entry["argmax_agreement"] = round(torch.eq(out.argmax(1), reference.argmax(1)).float().mean().item(), 5)


def time_engines(engines: dict[str, Callable], ctx: Context, rounds: int, calls: int,
                 max_rounds: int) -> list[dict]:
    """Rounds of ``calls`` calls of every engine (the order rotated each round) until ``rounds``
    quiet rounds (other processes used at most :data:`QUIET` of the CPUs) or ``max_rounds`` in all.
    Per round: its foreign CPU share and, per engine, every call's seconds and minor page faults
    (fresh memory touched: memory not reused between calls)."""
    names = list(engines)
    out: list[dict] = []
    while len(out) < max_rounds and sum(r["quiet"] for r in out) < rounds:
        shift = len(out) % len(names)
        busy, own, started = busy_seconds(), own_seconds(), time.perf_counter()
        record: dict = {"seconds": {}, "faults": {}}
        for name in names[shift:] + names[:shift]:
            fn = engines[name]
            record["seconds"][name], record["faults"][name] = [], []
            for _ in range(calls):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                fn(ctx.input)
                record["seconds"][name].append(time.perf_counter() - t0)
                record["faults"][name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        record["foreign_cpu"] = foreign_fraction(busy_seconds() - busy, own_seconds() - own,
                                                 time.perf_counter() - started)
        record["quiet"] = record["foreign_cpu"] <= QUIET
        out.append(record)
    return out


def summarize(records: list[dict], info: dict[str, dict], ctx: Context, flops: float) -> dict:
    """Per engine: median / min / max call, the ratios to :data:`BASELINE`, over the quiet rounds
    (over every round where fewer than 2 were quiet)."""
    quiet = [r for r in records if r["quiet"]]
    used = quiet if len(quiet) >= 2 else records
    calls = {n: [t for r in used for t in r["seconds"][n]] for n in used[0]["seconds"]}
    round_means = {n: [statistics.fmean(r["seconds"][n]) for r in used] for n in calls}
    base = calls.get(BASELINE)
    for name, samples in calls.items():
        median = statistics.median(samples)
        entry = {"median_s": round(median, 4), "min_s": round(min(samples), 4), "max_s": round(max(samples), 4),
                 "per_window_ms": round(1000 * median / ctx.batch, 1),
                 "conv_gflops_per_s": round(flops * ctx.batch / median / 1e9, 1),
                 "minor_page_faults_per_call": int(statistics.median(f for r in used for f in r["faults"][name]))}
        if base is not None:
            entry["speedup_vs_torch_fp32"] = round(statistics.median(base) / median, 3)
            entry["speedup_min_vs_min"] = round(min(base) / min(samples), 3)
            # Paired: the ratio within each round (the same minutes of machine load), then the median.
            entry["speedup_paired_median"] = round(statistics.median(
                b / e for b, e in zip(round_means[BASELINE], round_means[name])), 3)
        info[name].update(entry)
    return {"rounds": len(records), "quiet_rounds": len(quiet), "rounds_used": "quiet" if used is quiet else "all",
            "foreign_cpu_per_round": [r["foreign_cpu"] for r in records]}


def memory_probe(args: argparse.Namespace, name: str, onnx_dir: Path) -> dict:
    """Peak RSS of a fresh process that builds ``name`` (from the ONNX files in ``onnx_dir``: no
    export or calibration) and runs it 3 times."""
    cmd = [sys.executable, __file__, "--work", str(args.work), "-c", args.config, "-f", str(args.fold),
           "--engines", name, "--rounds", "1", "--max-rounds", "1", "--calls", "1", "--calib", str(args.calib),
           "--probe", "--onnx-dir", str(onnx_dir)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.returncode:
        return {"peak_rss_mb": None, "error": f"exit {proc.returncode}"}
    # The child's own high-water mark (VmHWM): wait4's ru_maxrss would include this process's RSS,
    # which Linux carries into a child across fork and exec.
    return {"peak_rss_mb": json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]}


def high_water_mb() -> float | None:
    """Peak resident memory of this process's own address space (VmHWM, MB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- segmentation agreement


def dice_study(ctx: Context, engines: dict[str, Callable], raw: Path, max_cases: int, tta: bool) -> dict:
    """Mean Dice of every engine on the raw dataset's labelled cases outside the fold's training
    split, on the preprocessed grid, with autoseg's sliding window (mirroring TTA as the predictor)."""
    import torch

    from autoseg.imageio import read_image
    from autoseg.inference.window import sliding_window
    from autoseg.metrics import case_metrics
    from autoseg.preprocessing.pipeline import preprocess_case

    splits = ctx.work / "splits.json"
    train = set(json.loads(splits.read_text())[ctx.fold]["train"]) if splits.is_file() else set()
    dataset = json.loads((raw / "dataset.json").read_text())
    pairs = []
    for item in dataset.get("training", []):
        image, label = raw / item["image"], raw / item["label"]
        case = image.name.split(".")[0]
        if case not in train and image.is_file() and label.is_file():
            pairs.append((case, image, label))
    pairs = pairs[:max_cases]
    labels = {k: list(v) for k, v in ctx.plans.labels.items()}
    mirror = tuple(range(ctx.cfg.dims)) if tta else ()
    per_engine: dict[str, list[float]] = {n: [] for n in engines}
    per_label: dict[str, dict[str, list[float]]] = {n: {} for n in engines}
    agreement: dict[str, list[float]] = {n: [] for n in engines}
    forward_s: dict[str, float] = {n: 0.0 for n in engines}
    for case, image_path, label_path in pairs:
        image, geometry = read_image(image_path)
        label, _ = read_image(label_path)
        data, seg, _ = preprocess_case(image, label[0].astype(np.int16), geometry, ctx.plans, ctx.config,
                                       case_id=case)
        spacing = tuple(float(s) for s in ctx.cfg.spacing)
        reference_labels = None
        for name, fn in engines.items():
            def net_fn(x: torch.Tensor, fn: Callable = fn, name: str = name) -> torch.Tensor:
                started = time.perf_counter()
                out = fn(x)
                forward_s[name] += time.perf_counter() - started
                return out

            with torch.inference_mode():
                logits = sliding_window(net_fn, torch.from_numpy(data), ctx.patch, mirror_axes=mirror,
                                        forward_batch=ctx.batch)
            pred = logits.argmax(0).numpy().astype(np.int16)
            if reference_labels is None:
                reference_labels = pred
            agreement[name].append(float((pred == reference_labels).mean()))
            metrics = case_metrics(pred, seg, spacing, labels)
            dices = [m["dice"] for m in metrics.values() if m["dice"] is not None]
            per_engine[name].append(float(np.mean(dices)))
            for label_name, m in metrics.items():
                if m["dice"] is not None:
                    per_label[name].setdefault(label_name, []).append(float(m["dice"]))
    out: dict = {"cases": len(pairs), "tta": tta, "grid": "preprocessed", "engines": {}}
    base = per_engine.get(BASELINE)
    for name in engines:
        scores = per_engine[name]
        entry = {"mean_dice": round(float(np.mean(scores)), 5),
                 "per_label": {k: round(float(np.mean(v)), 5) for k, v in per_label[name].items()},
                 "voxel_agreement_with_first": round(float(np.mean(agreement[name])), 6),
                 "forward_s_total": round(forward_s[name], 2)}
        if base is not None:
            delta = np.array(scores) - np.array(base)
            entry["dice_minus_baseline"] = round(float(delta.mean()), 5)
            entry["worst_case_dice_minus_baseline"] = round(float(delta.min()), 5)
        out["engines"][name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "autoseg_bench_predict",
                        help="experiment folder (default: bench_predict.py's, prepared with random weights)")
    parser.add_argument("-c", "--config", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--rounds", type=int, default=7, help="quiet timing rounds wanted")
    parser.add_argument("--max-rounds", type=int, default=None, help="rounds at most (default: 3 x --rounds)")
    parser.add_argument("--calls", type=int, default=2, help="calls per engine per round")
    parser.add_argument("--batch", type=int, default=None, help="windows per call (default: the predictor's)")
    parser.add_argument("--calib", type=int, default=20, help="calibration windows of the int8 engines")
    parser.add_argument("--threads", type=int, default=None, help="torch / engine threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of each engine in a process of its own")
    parser.add_argument("--dice", type=Path, default=None, metavar="RAW",
                        help="compare segmentations on RAW's labelled cases outside the fold's training split")
    parser.add_argument("--dice-cases", type=int, default=40)
    parser.add_argument("--no-tta", action="store_true", help="--dice without mirroring")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="dataset to plan when WORK is missing")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from autoseg.networks import conv_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.work / "plans.yaml").is_file():
        prepare(args.work, args.raw, args.config, [args.fold])
    names = list(dict.fromkeys(args.engines))
    if BASELINE not in names and not args.probe:
        names.insert(0, BASELINE)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.work, args.config, args.fold, args.batch, args.calib, Path(tmp), onnx_dir=args.onnx_dir)
        result: dict = {
            "work": str(args.work), "configuration": args.config, "fold": args.fold, "weights": ctx.weights,
            "patch": list(ctx.patch), "batch": ctx.batch, "input": ctx.input_source,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "versions": versions(), "load_before": load(),
        }
        engines, info = build_engines(ctx, names)
        if args.probe:
            print(json.dumps({"peak_rss_mb": high_water_mb(), **info}))
            return
        for key in ("export_info", "quantize_info"):
            if hasattr(ctx, key):
                result[key.replace("_info", "")] = getattr(ctx, key)
        logit_errors(engines, ctx, info)
        result["load_before_timing"] = load()
        records = time_engines(engines, ctx, args.rounds, args.calls, args.max_rounds or 3 * args.rounds)
        result["load_after"] = load()
        flops = conv_flops(ctx.cfg.topology, ctx.patch, ctx.cfg.input_channels, ctx.num_classes,
                           deep_supervision=False)
        result["timing"] = summarize(records, info, ctx, flops)
        result["conv_gflop_per_window"] = round(flops / 1e9, 2)
        result["engines"] = info
        result["peak_rss_mb_process"] = high_water_mb() or peak_rss_mb()
        if args.memory:
            for name in engines:
                info[name]["own_process"] = memory_probe(args, name, ctx.tmp)
        if args.dice is not None:
            result["dice"] = dice_study(ctx, engines, args.dice, args.dice_cases, not args.no_tta)
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for package in ("onnx", "onnxruntime", "onnxscript", "openvino"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    main()
