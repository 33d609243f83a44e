"""GPU check: one command that proves autoseg's CUDA paths and measures them, in under 8 minutes.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu.json   # the same steps on the CPU, tiny sizes

GPU time is rare, so one call runs every check and says everything in its output: one JSON
document (stdout, and ``--out FILE``) with the device, the torch/CUDA versions, each step's status
and figures and every target met or missed, and a short table on stderr. Nothing is downloaded.
Data: MSD Hippocampus from ``../shared/data/Task04_Hippocampus`` (``--data``; the bundled
24-case example when absent) and a synthetic CT-sized dataset written here (6 volumes of
96x256x256 voxels, HU-like values, liver/kidneys/spleen as 3 labels).

The steps, in priority order (each has its own time cap; a failing step is reported with its
one-line error and the tail of its stderr, and the next step runs; what no longer fits the global
``--budget`` is reported as ``skipped: budget``):

1. ``environment`` — device, memory, torch/CUDA/cuDNN/NCCL versions.
2. ``data_hippocampus``, ``data_ct`` — the raw datasets (nnU-Net v2 / MSD layout).
3. ``plan_*`` — ``plan_dataset`` with ``--gpu-memory`` = the device's memory, then
   ``preprocess`` of 3d_fullres: Hippocampus with the ``default`` preset (nnU-Net's plan) and with
   ``resenc-m``, the CT dataset with ``default``.
4. ``train_*`` — training throughput through the training stage (``autoseg.training.run.run``, one
   fold, AMP on): s/it and samples/s after warm-up, data-wait fraction (target < 10 %; when above,
   the loader is taken apart: worker start-up, sampling, augmentation, host-to-device copy), peak
   GPU memory against the plan's ``estimated_memory_gb`` (target: within 25 %), and s/it against
   the planner's compute model on the device's measured rate (issue 15; target: within 25 %).
5. ``launcher_gpus_1`` — ``autoseg train --gpus 1`` as a subprocess: one epoch, then ``--resume``
   for a second; ``torchrun_1`` — the same under ``torchrun --nproc-per-node 1``.
6. ``nccl_ddp`` — a process group over NCCL and one DDP training step of the planned network.
   (With one device, ``--gpus 1`` and a one-process torchrun train in-process without a process
   group — see ``autoseg.distributed.resolve_launch`` — so NCCL is proven here.)
7. ``predict_hippocampus``, ``predict_ct`` — ``Predictor`` with TTA: seconds per case and the
   share of the case's wall time spent in the network (target: >= 80 %), with the rest split into
   reading, preprocessing, the window/activation bookkeeping and export.
8. ``dice_hippocampus`` — ``--time-budget 4m`` training of Hippocampus 3d_fullres; stops as soon
   as the per-epoch pseudo-Dice reaches 0.85 (target: within 4 minutes), else the best reached.
9. ``compile_hippocampus_default`` — step 4 again with ``torch.compile`` (never on CPU).

``--dry-run`` runs the same functions on the CPU with the ``tiny`` planner preset (and a
residual-encoder copy of it for the resenc-m step), tiny synthetic datasets, 1-3 iterations per
step, ``--device cpu --procs 1`` where a GPU run uses ``--gpus 1``, torchrun over gloo; the
compile step is reported as ``skipped: cpu``. It is part of the default test suite
(``tests/test_gpu_check.py``), so this script cannot rot between GPU runs.

Exit status: 0 when the script ran (missed targets and failed steps are reported, not exit codes);
2 without a CUDA device and without ``--dry-run``; 1 if the script itself is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:  # an installed autoseg (its presets are the package data autoseg.planners), else the checkout's
    import autoseg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))

#: MSD Hippocampus next to the repository (DESIGN §8); the bundled example when it is absent.
DEFAULT_DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
#: The issue's targets.
TARGETS: dict[str, float] = {
    "data_wait_fraction_max": 0.10,
    "memory_estimate_tolerance": 0.25,
    "compute_model_tolerance": 0.25,
    "pseudo_dice": 0.85,
    "pseudo_dice_within_s": 240.0,
    "gpu_busy_fraction_min": 0.80,
    "wall_s_max": 480.0,
}
#: nnU-Net's epoch length: the data-wait fraction is projected onto it (the loader starts anew every epoch).
EPOCH_ITERS = 250
#: torch.compile counts as helping when training is at least this much faster.
COMPILE_HELPS = 1.05
CONFIG = "3d_fullres"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and the CPU dry run (the code is the same)."""

    device: str
    planner_default: str
    planner_resenc: str  # a built-in name, or "tiny-resenc": a residual-encoder copy of tiny.yaml
    gpu_memory_gb: float | None  # None: the device's memory
    synthetic_hippocampus: tuple[int, int, int] | None  # None: the real data (or bundled example)
    synthetic_hippocampus_cases: int
    ct_shape: tuple[int, int, int]
    ct_cases: int
    warmup_iters: int
    timed_iters_hippocampus: int
    timed_iters_ct: int
    loader_batches: int
    always_break_down_loader: bool  # else only when the data-wait target is missed (GPU time is scarce)
    cli_iters: int
    cli_val_iters: int
    launch_options: tuple[str, ...]  # what "one GPU" means on the command line
    torchrun_options: tuple[str, ...]
    predict_cases_hippocampus: int
    predict_cases_ct: int
    dice_budget_s: float
    dice_epochs: int | None  # None: until the time budget is spent (as --time-budget does)
    dice_iters: int | None  # None: sized from the step time (as --time-budget does)
    dice_val_iters: int | None
    workers: int | None  # plan/preprocess worker processes (None: the stage's default)
    compile_warmup_iters: int


GPU = Sizes(
    device="cuda", planner_default="default", planner_resenc="resenc-m", gpu_memory_gb=None,
    synthetic_hippocampus=None, synthetic_hippocampus_cases=0, ct_shape=(96, 256, 256), ct_cases=6,
    warmup_iters=5, timed_iters_hippocampus=20, timed_iters_ct=8, loader_batches=4,
    always_break_down_loader=False, cli_iters=20,
    cli_val_iters=5, launch_options=("--gpus", "1"), torchrun_options=(), predict_cases_hippocampus=6,
    predict_cases_ct=3, dice_budget_s=240.0, dice_epochs=None, dice_iters=None, dice_val_iters=None,
    workers=None, compile_warmup_iters=8,
)
DRY_RUN = Sizes(
    device="cpu", planner_default="tiny", planner_resenc="tiny-resenc", gpu_memory_gb=0.05,
    synthetic_hippocampus=(16, 20, 16), synthetic_hippocampus_cases=6, ct_shape=(16, 32, 32), ct_cases=6,
    warmup_iters=1, timed_iters_hippocampus=2, timed_iters_ct=2, loader_batches=2,
    always_break_down_loader=True, cli_iters=2, cli_val_iters=1,
    launch_options=("--device", "cpu", "--procs", "1"), torchrun_options=("--device", "cpu"),
    predict_cases_hippocampus=2, predict_cases_ct=2, dice_budget_s=30.0, dice_epochs=1, dice_iters=2,
    dice_val_iters=1, workers=1, compile_warmup_iters=1,
)


# ----------------------------------------------------------------------------------------------
# Steps: status, time caps, failures


class StepFailed(Exception):
    """A step's check failed; ``tail`` is the end of the failing command's stderr, if any."""

    def __init__(self, message: str, tail: str | None = None) -> None:
        super().__init__(message)
        self.tail = tail


class StepSkipped(Exception):
    """A step that does not apply here; the message is its status (``skipped: cpu``)."""


class StepTimeout(Exception):
    """Raised by the alarm when a step runs past its cap."""


@dataclass
class StepResult:
    """One step's record in the JSON document."""

    status: str
    seconds: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    stderr_tail: str | None = None


@dataclass
class Check:
    """The run's state: options, sizes, where things are, and the results so far."""

    sizes: Sizes
    dry_run: bool
    scratch: Path
    data: Path
    started: float
    deadline: float
    gpu_memory_gb: float | None = None
    raw: dict[str, Path] = field(default_factory=dict)  # dataset -> raw folder
    works: dict[str, Path] = field(default_factory=dict)  # "dataset/preset" -> planned WORK
    trained: dict[str, list[Path]] = field(default_factory=dict)  # dataset -> WORKs with a trained fold 0
    rates: tuple[float, float] | None = None  # the device's measured training / forward GFLOP/s
    results: dict[str, StepResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds``."""

    def handler(signum: int, frame: object) -> None:
        raise StepTimeout(f"ran past its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def log(check: Check, text: str) -> None:
    """A progress line on stderr (the operator of a GPU run sees how far it got)."""
    print(f"[{check.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)


def run_step(check: Check, name: str, fn: Callable[[Check, float], dict[str, Any]], cap_s: float,
             min_s: float = 5.0, needs: Sequence[str] = ()) -> StepResult:
    """Run one step under its cap and the global budget; record and return its result."""
    missing = [n for n in needs if check.results.get(n) is None or check.results[n].status != "ok"]
    if missing:
        result = StepResult(status=f"skipped: needs {missing[0]}")
    elif check.remaining() < min_s:
        result = StepResult(status="skipped: budget")
    else:
        limit = min(cap_s, check.remaining())
        log(check, f"{name} (cap {limit:.0f} s)")
        start = time.perf_counter()
        try:
            with alarm(limit):
                figures = fn(check, limit)
            result = StepResult(status="ok", summary=str(figures.pop("summary", "")), figures=figures)
        except StepSkipped as exc:
            result = StepResult(status=str(exc))
        except StepTimeout as exc:
            result = StepResult(status="failed", error=f"timed out: {exc}", stderr_tail=_tail(traceback.format_exc()))
        except StepFailed as exc:
            result = StepResult(status="failed", error=str(exc), stderr_tail=exc.tail)
        except Exception as exc:  # noqa: BLE001 — a failing step is reported, the next one runs
            first = (str(exc).strip().splitlines() or [""])[0]
            result = StepResult(status="failed", error=f"{type(exc).__name__}: {first}",
                                stderr_tail=_tail(traceback.format_exc()))
        result.seconds = round(time.perf_counter() - start, 2)
        _release_memory()
    check.results[name] = result
    log(check, f"{name}: {result.status}" + (f" — {result.error}" if result.error else "")
        + (f" — {result.summary}" if result.summary else ""))
    return result


def _tail(text: str | None, lines: int = 25, chars: int = 3000) -> str | None:
    if not text:
        return None
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def _release_memory() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_command(cmd: Sequence[str], timeout_s: float, logs: Path) -> str:
    """Run ``cmd`` in its own process group from the repository root; its stdout.

    On a timeout (or this step's alarm) the whole group is stopped, torchrun's workers and the
    launcher's ranks included.

    Raises:
        StepFailed: non-zero exit or timeout, with the last line and the tail of its stderr.
    """
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise StepFailed(f"timed out after {timeout_s:.0f} s: {' '.join(cmd[2:8])} ...",
                             _tail(err_path.read_text(errors="replace"))) from None
        except BaseException:  # this step's alarm, Ctrl-C: never leave the command running
            _stop_group(proc)
            raise
    stderr = err_path.read_text(errors="replace")
    if code != 0:
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
        raise StepFailed(f"exit code {code}: {last.strip()[:300]}", _tail(stderr))
    return out_path.read_text(errors="replace")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------
# Synthetic data (written through autoseg.imageio, in the nnU-Net v2 raw layout)


def _geometry(spacing: tuple[float, float, float]) -> Any:
    from autoseg.imageio import Geometry

    return Geometry(spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 3)


def _ellipsoid(grid: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def ct_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume ``(image int16 HU, label uint8)``: air, a body with a fat rim and a spine, and
    three organs (1 liver, 2 kidneys, 3 spleen) at slightly different places per ``seed``."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    _, y, x = grid
    jitter = rng.uniform(-0.05, 0.05, size=(4, 3))
    body = (y / 0.75) ** 2 + (x / 0.92) ** 2 <= 1.0
    inner = (y / 0.68) ** 2 + (x / 0.84) ** 2 <= 1.0
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[np.broadcast_to(body, shape)] = -100.0  # fat
    image[np.broadcast_to(inner, shape)] = 35.0  # soft tissue
    image[np.broadcast_to((y - 0.5) ** 2 + x**2 <= 0.12**2, shape)] = 500.0  # spine (not labelled)
    label = np.zeros(shape, dtype=np.uint8)
    organs = [  # label, HU, centre (z, y, x), radii
        (1, 60.0, (0.1, -0.1, -0.4), (0.6, 0.35, 0.33)),
        (2, 160.0, (-0.2, 0.3, -0.33), (0.25, 0.13, 0.1)),
        (2, 160.0, (-0.2, 0.3, 0.33), (0.25, 0.13, 0.1)),
        (3, 50.0, (0.3, 0.05, 0.52), (0.3, 0.16, 0.13)),
    ]
    for (value, hu, centre, radii), shift in zip(organs, jitter):
        mask = _ellipsoid(grid, np.add(centre, shift), radii)
        image[mask] = hu
        label[mask] = value
    image += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return np.clip(image, -1024, 3071).astype(np.int16), label


def mri_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A tiny Hippocampus stand-in: two adjacent ellipsoids (1 anterior, 2 posterior) in noise."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij", sparse=True)
    shift = rng.uniform(-0.08, 0.08, size=3)
    label = np.zeros(shape, dtype=np.uint8)
    label[_ellipsoid(grid, shift + (0.0, -0.3, 0.0), (0.5, 0.35, 0.4))] = 1
    label[_ellipsoid(grid, shift + (0.0, 0.3, 0.0), (0.5, 0.35, 0.4))] = 2
    image = np.choose(label, [100.0, 300.0, 450.0]) + rng.normal(0.0, 40.0, size=shape)
    return image.astype(np.float32), label


def write_dataset(root: Path, name: str, channel: str, labels: dict[str, int], n_cases: int,
                  make_case: Callable[[int], tuple[np.ndarray, np.ndarray]],
                  spacing: tuple[float, float, float]) -> list[str]:
    """Write an nnU-Net v2 raw dataset with :func:`autoseg.imageio.write_image`; its case ids."""
    from autoseg.imageio import write_image

    geometry = _geometry(spacing)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"{name}_{i:03d}" for i in range(n_cases)]
    for i, case in enumerate(ids):
        image, label = make_case(i)
        write_image(root / "imagesTr" / f"{case}_0000.nii.gz", image, geometry)
        write_image(root / "labelsTr" / f"{case}.nii.gz", label, geometry)
    (root / "dataset.json").write_text(json.dumps({
        "name": name, "channel_names": {"0": channel}, "labels": labels, "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }, indent=2) + "\n", encoding="utf-8")
    return ids


def tiny_resenc_preset(folder: Path) -> Path:
    """The ``tiny`` preset with a residual encoder (presets are data: a copy with three keys changed),
    so the dry run's resenc-m step builds the residual-encoder network too."""
    import yaml

    from autoseg.planning.presets import load_preset

    data = dataclasses.asdict(load_preset("tiny"))
    data.update(name="tiny-resenc", description="tiny with a residual encoder (gpu_check dry run)",
                residual_encoder=True, blocks_per_stage=[1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    path = folder / "tiny-resenc.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# 1-2: environment and data


def step_environment(check: Check, limit: float) -> dict[str, Any]:
    """Device, memory and library versions; decides the memory the planner plans for."""
    import torch

    from autoseg import __version__

    figures: dict[str, Any] = {
        "autoseg": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if check.sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        total_gb = props.total_memory / 1024**3
        figures.update(device_name=props.name, gpu_count=torch.cuda.device_count(),
                       gpu_memory_gb=round(total_gb, 1), compute_capability=f"{props.major}.{props.minor}",
                       bf16=torch.cuda.is_bf16_supported(), nccl=_nccl_version())
        check.gpu_memory_gb = check.gpu_memory_gb or round(total_gb, 1)
    else:
        figures.update(device_name="cpu", threads=torch.get_num_threads())
        check.gpu_memory_gb = check.gpu_memory_gb or check.sizes.gpu_memory_gb
    figures["plan_gpu_memory_gb"] = check.gpu_memory_gb
    figures["summary"] = f"{figures['device_name']}, torch {figures['torch']}, CUDA {figures['cuda']}"
    return figures


def _nccl_version() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def step_data_hippocampus(check: Check, limit: float) -> dict[str, Any]:
    """The Hippocampus data: ``--data``, else the bundled example; a tiny synthetic stand-in in a dry run."""
    sizes = check.sizes
    if sizes.synthetic_hippocampus is not None:
        root = check.scratch / "raw" / "hippocampus_synthetic"
        shape = sizes.synthetic_hippocampus
        ids = write_dataset(root, "hippo", "MRI", {"background": 0, "Anterior": 1, "Posterior": 2},
                            sizes.synthetic_hippocampus_cases, lambda i: mri_case(shape, i), (1.0, 1.0, 1.0))
        source = f"synthetic {len(ids)} cases of {'x'.join(map(str, shape))} (dry run)"
    elif (check.data / "dataset.json").is_file():
        root, source = check.data, str(check.data)
    else:
        from autoseg.examples import copy_example

        root = copy_example("hippocampus", check.scratch / "raw" / "hippocampus_example")
        source = f"bundled example (autoseg/examples/hippocampus): {check.data} is absent"
        check.notes.append(f"Hippocampus: {source}. Figures are on 24 cases, not 260: the plans' batch sizes "
                           "(capped by the dataset's size) and the Dice curve differ from the full dataset's")
    check.raw["hippocampus"] = root
    cases = json.loads((root / "dataset.json").read_text(encoding="utf-8")).get("numTraining")
    return {"source": source, "root": str(root), "cases": cases, "summary": f"{cases} cases: {source}"}


def step_data_ct(check: Check, limit: float) -> dict[str, Any]:
    """The synthetic CT dataset (``ct_cases`` volumes of ``ct_shape``, 1 channel ``CT``, 3 organs)."""
    sizes = check.sizes
    root = check.scratch / "raw" / "ct_synthetic"
    start = time.perf_counter()
    ids = write_dataset(root, "ct", "CT", {"background": 0, "liver": 1, "kidney": 2, "spleen": 3},
                        sizes.ct_cases, lambda i: ct_case(sizes.ct_shape, 100 + i), (2.5, 0.8, 0.8))
    check.raw["ct"] = root
    shape = "x".join(map(str, sizes.ct_shape))
    return {"cases": len(ids), "shape_zyx": list(sizes.ct_shape), "spacing_zyx": [2.5, 0.8, 0.8],
            "write_s": round(time.perf_counter() - start, 2), "summary": f"{len(ids)} cases of {shape}"}


# ----------------------------------------------------------------------------------------------
# 3: plan + preprocess


def step_plan(dataset: str, preset: str) -> Callable[[Check, float], dict[str, Any]]:
    """Plan ``dataset`` with ``preset`` for the device's memory, then preprocess 3d_fullres."""

    def step(check: Check, limit: float) -> dict[str, Any]:
        from autoseg import crossval
        from autoseg.planning.run import plan_dataset
        from autoseg.preprocessing import run as preprocessing
        from autoseg.training.run import case_ids_of

        planner = preset
        if preset == "tiny-resenc":
            planner = str(tiny_resenc_preset(check.scratch))
        work = check.scratch / "work" / f"{dataset}_{preset}"
        start = time.perf_counter()
        _, _, plans, _ = plan_dataset(check.raw[dataset], work, planner, check.gpu_memory_gb, check.sizes.workers)
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        preprocessing.run(work, [CONFIG], check.sizes.workers)
        preprocess_s = time.perf_counter() - start
        crossval.load_or_create(work, case_ids_of(work))  # one splits.json, shared by every run below
        check.works[f"{dataset}/{preset}"] = work
        config = plans.configuration(CONFIG)
        patch = "x".join(map(str, config.patch_size))
        return {
            "planner": plans.planner, "gpu_memory_gb": check.gpu_memory_gb, "patch_size": list(config.patch_size),
            "batch_size": config.batch_size, "features": list(config.topology.features_per_stage),
            "residual_encoder": config.topology.residual_encoder, "spacing": list(config.spacing),
            "estimated_memory_gb": round(config.estimated_memory_gb, 3), "recommended": list(plans.recommended),
            "plan_s": round(plan_s, 2), "preprocess_s": round(preprocess_s, 2),
            "summary": f"{CONFIG} patch {patch}, batch {config.batch_size}, est. {config.estimated_memory_gb:.2f} GB",
        }

    return step


def clone_work(check: Check, key: str, name: str) -> Path:
    """A fresh experiment folder for one run, sharing the planned one's plans, splits and
    preprocessed data (linked), so every run has its own ``models/`` and nothing is recomputed."""
    source = check.works[key]
    work = check.scratch / "runs" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for item in ("dataset.json", "fingerprint.json", "plans.yaml", "splits.json"):
        shutil.copy2(source / item, work / item)
    (work / "preprocessed").symlink_to(source / "preprocessed", target_is_directory=True)
    return work


# ----------------------------------------------------------------------------------------------
# 4: training throughput, memory, data wait


@contextlib.contextmanager
def recording_waits(sink: list[float]) -> Iterator[None]:
    """Record every training batch's wait (``Batch.wait_s``) while the trainer runs unchanged.

    The trainer logs only the epoch's total wait; the first batch of an epoch also pays the
    loader's start-up, which a short measurement must separate from the steady state.
    """
    from autoseg.training import trainer

    original = trainer.BatchLoader

    class RecordingLoader(original):  # type: ignore[misc, valid-type]
        def __next__(self) -> Any:
            batch = super().__next__()
            sink.append(batch.wait_s)
            return batch

    trainer.BatchLoader = RecordingLoader
    try:
        yield
    finally:
        trainer.BatchLoader = original


def measure_training(check: Check, key: str, name: str, timed_iters: int, compile_: bool = False,
                     warmup_iters: int | None = None, register: bool = False) -> dict[str, Any]:
    """One epoch of ``warmup + timed`` iterations through the training stage, no validation
    (``warmup`` >= 1: the first iteration pays the loader's start-up and CUDA's set-up).

    Returns figures: steady s/it and samples/s (after warm-up), the trainer's own epoch record,
    the data-wait fraction (steady, and projected onto a 250-iteration epoch), peak GPU memory
    against the plan's estimate, and the loader taken apart.
    """
    import torch

    from autoseg import plans as plans_io
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig
    from autoseg.training.trainer import Callbacks, default_workers

    warmup = max(1, check.sizes.warmup_iters if warmup_iters is None else warmup_iters)
    work = clone_work(check, key, name)
    plans = plans_io.load(work / "plans.yaml")
    config = plans.configuration(CONFIG)
    device = torch.device(check.sizes.device)
    cfg = TrainConfig(epochs=1, iters_per_epoch=warmup + timed_iters, val_iters=0, device=check.sizes.device,
                      amp=True, compile=compile_)
    stamps: list[float] = []
    epoch_start: list[float] = []
    waits: list[float] = []
    callbacks = Callbacks(on_epoch_start=lambda epoch, iters: epoch_start.append(time.perf_counter()),
                          on_iteration=lambda it, loss: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with recording_waits(waits):
        results = training.run(work, CONFIG, "0", cfg, callbacks_for=lambda fold: callbacks, validate=False)
    record = results[0].state.history[-1]
    if register:  # its checkpoint_final.pt can serve the prediction step
        check.trained.setdefault(key.split("/")[0], []).append(work)
    figures: dict[str, Any] = {"batch_size": config.batch_size, "patch_size": list(config.patch_size),
                               "iterations": len(stamps), "warmup_iters": warmup, "compile": compile_}
    # What the trainer's autocast picks (AMP is on CUDA only).
    figures["amp"] = (("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda"
                      else "off (cpu)")
    timed = stamps[warmup - 1:]
    span = timed[-1] - timed[0]
    n = len(timed) - 1
    s_it = span / n
    steady_wait = sum(waits[warmup:warmup + n]) / span
    first_iter_s = stamps[0] - epoch_start[0]
    projected = (waits[0] + (EPOCH_ITERS - 1) * steady_wait * s_it) / (first_iter_s + (EPOCH_ITERS - 1) * s_it)
    figures.update({
        "s_per_it": round(s_it, 4), "samples_per_s": round(config.batch_size / s_it, 2),
        "first_iteration_s": round(first_iter_s, 3),
        "loader_first_batch_s": round(waits[0], 3),
        "data_wait_fraction_steady": round(steady_wait, 4),
        f"data_wait_fraction_{EPOCH_ITERS}_iters": round(projected, 4),
        "log_jsonl": {k: record[k] for k in ("iters", "s_per_it", "samples_per_s", "data_wait_fraction")},
        "workers": cfg.workers if cfg.workers is not None else default_workers(device),
    })
    figures["memory"] = memory_figures(device, config.estimated_memory_gb)
    figures["compute_model"] = compute_model_figures(check, config, plans.num_classes, s_it)
    if check.sizes.always_break_down_loader or projected > TARGETS["data_wait_fraction_max"]:
        figures["loader"] = loader_breakdown(check, work, config, figures["workers"], device, s_it, steady_wait,
                                             projected)
    memory = figures["memory"]
    figures["summary"] = (f"{s_it:.3f} s/it, {figures['samples_per_s']:.1f} samples/s, data wait "
                          f"{projected:.0%} (250-it epoch)"
                          + (f", peak {memory['peak_reserved_gb']:.2f} GB vs est. {memory['estimated_gb']:.2f} GB"
                             if memory.get("peak_reserved_gb") is not None else "")
                          + f", predicted {figures['compute_model']['predicted_s_per_it']:.3f} s/it")
    return figures


def memory_figures(device: Any, estimated_gb: float) -> dict[str, Any]:
    """Peak GPU memory of the run (allocated by tensors; reserved by the caching allocator, which
    is what the process takes from the GPU apart from its CUDA context) against the estimate."""
    import torch

    figures: dict[str, Any] = {"estimated_gb": round(estimated_gb, 3)}
    if device.type != "cuda":
        figures.update(peak_allocated_gb=None, peak_reserved_gb=None, note="no GPU memory on the CPU")
        return figures
    allocated = torch.cuda.max_memory_allocated() / 1024**3
    reserved = torch.cuda.max_memory_reserved() / 1024**3
    figures.update(peak_allocated_gb=round(allocated, 3), peak_reserved_gb=round(reserved, 3),
                   reserved_over_estimate=round(reserved / estimated_gb, 3) if estimated_gb else None,
                   allocated_over_estimate=round(allocated / estimated_gb, 3) if estimated_gb else None)
    return figures


def loader_breakdown(check: Check, work: Path, config: Any, workers: int, device: Any, s_it: float,
                     steady_wait: float, projected: float) -> dict[str, Any]:
    """Where the loader's time goes: worker start-up (paid every epoch), steady batches/s with the
    trainer's workers, one batch's sampling / augmentation / deep-supervision targets in one
    process, and the host-to-device copy; with a verdict naming the bottleneck."""
    import torch

    from autoseg import crossval
    from autoseg.data import BatchLoader, BatchProducer, downsample_seg, load_cases, sample_batch

    split = crossval.fold_cases(json.loads((work / "splits.json").read_text(encoding="utf-8")), 0)
    cases = load_cases(work / "preprocessed" / CONFIG, split["train"])
    start = time.perf_counter()
    with BatchLoader(cases, config, augment=True, seed=1, workers=workers) as loader:
        batch = next(loader)
        first_s = time.perf_counter() - start
        t0 = time.perf_counter()
        for _ in range(check.sizes.loader_batches):
            batch = next(loader)
        per_batch = (time.perf_counter() - t0) / check.sizes.loader_batches
    producer = BatchProducer(cases, config, np.random.SeedSequence([1, 0]))
    t0 = time.perf_counter()
    patches = sample_batch(cases, producer.sample_size, producer.batch_size, producer.rng, producer.oversample,
                           final_patch_size=producer.patch_size, context_slices=config.context_slices)
    t1 = time.perf_counter()
    image, seg = patches.image, patches.seg
    if producer.augmenter is not None:
        with producer.global_random:
            image, seg = producer.augmenter(image, seg)
    t2 = time.perf_counter()
    downsample_seg(seg, producer.strides)
    t3 = time.perf_counter()
    copy_s = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        batch.image.to(device)
        _ = [t.to(device) for t in batch.target]
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - t4
    stages = {"sample_s": t1 - t0, "augment_s": t2 - t1, "deep_supervision_s": t3 - t2}
    figures: dict[str, Any] = {
        "workers": workers, "first_batch_s": round(first_s, 3), "steady_s_per_batch": round(per_batch, 4),
        "one_process_s_per_batch": {k: round(v, 4) for k, v in stages.items()},
        "host_to_device_s_per_batch": round(copy_s, 4),
    }
    step_s = s_it * (1.0 - steady_wait)  # the iteration without its wait: network, loss, optimiser
    epoch_s = EPOCH_ITERS * s_it
    if projected <= TARGETS["data_wait_fraction_max"]:
        verdict = "the loader keeps up"
    elif first_s / epoch_s > steady_wait:
        verdict = (f"worker start-up: each epoch starts {workers} loader process(es) and waits {first_s:.2f} s "
                   f"for the first batch ({first_s / epoch_s:.0%} of a {EPOCH_ITERS}-iteration epoch)")
    else:
        slowest = max(stages, key=lambda k: stages[k]).removesuffix("_s").replace("_", "-")
        who = f"{workers} worker process(es) deliver" if workers else "the training process (no workers) makes"
        verdict = (f"batch production: {who} a batch every {per_batch:.3f} s, the training step takes "
                   f"{step_s:.3f} s; in one process a batch costs {sum(stages.values()):.3f} s, most of it "
                   f"{slowest}")
        if copy_s > 0.2 * step_s:
            verdict += f"; the host-to-device copy adds {copy_s:.3f} s (unpinned memory)"
    figures["verdict"] = verdict
    return figures


def compute_model_figures(check: Check, config: Any, num_classes: int, s_it: float) -> dict[str, Any]:
    """The planner's predicted s/iteration (issue 15's compute model, on this device's measured
    convolution rate, under the training's mixed precision) against the measured one (target:
    within 25 %). The rate is measured once per check and not written to the user's cache."""
    from autoseg.networks.throughput import device_key, measure
    from autoseg.planning.compute import Throughput, iteration_seconds

    if check.rates is None:
        check.rates = measure(check.sizes.device)
    train, infer = check.rates
    rates = Throughput(train, infer, device_key(check.sizes.device), "measured by gpu_check")
    predicted, tflop = iteration_seconds(config, num_classes, rates)
    error = predicted / s_it - 1
    return {"train_gflops": round(train, 1), "infer_gflops": round(infer, 1), "tflop_per_iteration": round(tflop, 4),
            "predicted_s_per_it": round(predicted, 4), "measured_s_per_it": round(s_it, 4),
            "error": round(error, 3), "within_target": abs(error) <= TARGETS["compute_model_tolerance"]}


def step_train(key: str, timed_attr: str) -> Callable[[Check, float], dict[str, Any]]:
    """Training throughput of the planned ``key`` (``dataset/preset``)."""

    def step(check: Check, limit: float) -> dict[str, Any]:
        name = "train_" + key.replace("/", "_").replace("-", "_")
        register = key.endswith(f"/{check.sizes.planner_default}")
        return measure_training(check, key, name, getattr(check.sizes, timed_attr), register=register)

    return step


# ----------------------------------------------------------------------------------------------
# 5-6: the launcher, torchrun, NCCL


def _cli_train(check: Check, prefix: list[str], extra: Sequence[str], name: str, limit: float) -> dict[str, Any]:
    """``autoseg train`` for one epoch, then ``--resume`` for a second; checks the log and device."""
    import yaml

    work = clone_work(check, f"hippocampus/{check.sizes.planner_default}", name)
    base = [*prefix, "train", str(work), "-c", CONFIG, "-f", "0", "--iters-per-epoch", str(check.sizes.cli_iters),
            "--val-iters", str(check.sizes.cli_val_iters), "--no-validate", *extra]
    fold = work / "models" / CONFIG / "fold_0"
    deadline = time.perf_counter() + limit
    start = time.perf_counter()
    run_command([*base, "--epochs", "1"], deadline - time.perf_counter(), check.scratch / "logs" / f"{name}_1")
    first_s = time.perf_counter() - start
    first = _read_log(fold / "log.jsonl")
    if len(first) != 1:
        raise StepFailed(f"after --epochs 1, log.jsonl has {len(first)} epoch records, not 1")
    start = time.perf_counter()
    run_command([*base, "--epochs", "2", "--resume"], deadline - time.perf_counter(),
                check.scratch / "logs" / f"{name}_2")
    resume_s = time.perf_counter() - start
    second = _read_log(fold / "log.jsonl")
    if len(second) != 2 or second[0] != first[0]:
        raise StepFailed(f"--resume did not continue the run: log.jsonl has {len(second)} records "
                         f"(expected 2, the first unchanged: {second[:1] == first})")
    train_config = yaml.safe_load((fold / "train_config.yaml").read_text(encoding="utf-8"))
    device = train_config["resolved"]["device"]
    if not device.startswith(check.sizes.device):
        raise StepFailed(f"trained on {device}, not on {check.sizes.device}")
    check.trained.setdefault("hippocampus", []).append(work)
    return {
        "command": " ".join(["python", *base[1:]]).replace(str(work), "WORK"),
        "device": device, "processes": train_config["resolved"]["processes"], "first_run_s": round(first_s, 2),
        "resume_run_s": round(resume_s, 2), "epochs": len(second), "resumed": True,
        "epoch_records": [{k: r[k] for k in ("epoch", "iters", "s_per_it", "samples_per_s", "data_wait_fraction")}
                          for r in second],
        "checkpoints": sorted(p.name for p in fold.glob("checkpoint_*.pt")),
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def step_launcher(check: Check, limit: float) -> dict[str, Any]:
    """``autoseg train --gpus 1`` (dry run: ``--device cpu --procs 1``): one epoch, then resume."""
    from autoseg.distributed import resolve_launch

    options = check.sizes.launch_options
    figures = _cli_train(check, [sys.executable, "-m", "autoseg"], options, "launcher_gpus_1", limit)
    gpus = int(options[options.index("--gpus") + 1]) if "--gpus" in options else None
    procs = int(options[options.index("--procs") + 1]) if "--procs" in options else None
    device = options[options.index("--device") + 1] if "--device" in options else "auto"
    launch = resolve_launch(device, gpus, procs, False)
    figures["launch_mode"] = launch.mode
    figures["process_group"] = launch.backend if launch.mode == "ddp" else None
    if launch.mode == "single":
        figures["note"] = ("one device: resolve_launch runs the fold in this process, without a process group; "
                           "NCCL is proven by nccl_ddp")
        check.notes.append(f"launcher_gpus_1: {figures['note']}")
    figures["summary"] = (f"{figures['device']}, mode {launch.mode}, 1 epoch {figures['first_run_s']:.1f} s, "
                          f"resume ok ({figures['resume_run_s']:.1f} s)")
    return figures


def step_torchrun(check: Check, limit: float) -> dict[str, Any]:
    """``torchrun --standalone --nproc-per-node 1 -m autoseg train`` (dry run: ``--device cpu``)."""
    from autoseg.distributed import from_torchrun_env

    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "autoseg"]
    figures = _cli_train(check, prefix, check.sizes.torchrun_options, "torchrun_1", limit)
    world_one = from_torchrun_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    figures["process_group"] = None if world_one else "nccl/gloo"
    if world_one:
        figures["note"] = "WORLD_SIZE 1: autoseg trains in-process without a process group (from_torchrun_env)"
        check.notes.append(f"torchrun_1: {figures['note']}")
    figures["summary"] = (f"{figures['device']}, 1 epoch {figures['first_run_s']:.1f} s, "
                          f"resume ok ({figures['resume_run_s']:.1f} s)")
    return figures


def step_nccl(check: Check, limit: float) -> dict[str, Any]:
    """A process group (NCCL on CUDA, gloo on the CPU) and one DDP step, in a separate process."""
    work = check.works[f"hippocampus/{check.sizes.planner_default}"]
    out = run_command([sys.executable, str(Path(__file__).resolve()), "--probe-ddp", str(work), "--device",
                       check.sizes.device], limit, check.scratch / "logs" / "nccl_ddp")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise StepFailed("the probe printed no result", _tail(out))
    figures = json.loads(lines[-1])
    figures["summary"] = (f"{figures['backend']} group of {figures['world_size']}, all-reduce ok, "
                          f"DDP step {figures['ddp_step_s']:.2f} s")
    return figures


def probe_ddp(work: Path, device_name: str) -> dict[str, Any]:
    """Join a one-process group through autoseg's helper and run one DDP training step (AMP on CUDA)
    of the planned 3d_fullres network. Run as ``gpu_check.py --probe-ddp WORK --device D``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autoseg import plans as plans_io
    from autoseg.distributed import DistContext, destroy_process_group, free_port, init_process_group
    from autoseg.networks import build_network

    device = torch.device(device_name if device_name != "cuda" else "cuda:0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    init_process_group(DistContext(0, 1, 0), backend, f"tcp://127.0.0.1:{free_port()}")
    init_s = time.perf_counter() - start
    tensor = torch.ones(4, device=device)
    dist.all_reduce(tensor)
    reduced = tensor.tolist() == [1.0] * 4
    plans = plans_io.load(work / "plans.yaml")
    config = plans.configuration(CONFIG)
    net = build_network(config.topology, config.input_channels, plans.num_classes, deep_supervision=True).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                    broadcast_buffers=False)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    x = torch.randn(2, config.input_channels, *config.patch_size, device=device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        outputs = model(x)
        loss = sum(o.float().mean() for o in outputs)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    world = dist.get_world_size()
    # The DDP reducer holds the process group and its threads: release it before the group, or
    # gloo's threads can be torn down at exit while joinable ("terminate called without an active
    # exception", SIGABRT — seen in CI runs of the dry run).
    del model, outputs, loss
    gc.collect()
    destroy_process_group()
    if not (reduced and finite):
        raise RuntimeError(f"all-reduce ok: {reduced}, gradients finite: {finite}")
    return {"backend": backend, "world_size": world, "init_s": round(init_s, 3), "all_reduce_ok": reduced,
            "ddp_step_s": round(step_s, 3), "gradients_finite": finite,
            "nccl": _nccl_version() if backend == "nccl" else None}


# ----------------------------------------------------------------------------------------------
# 7: prediction


def step_predict(dataset: str, cases_attr: str) -> Callable[[Check, float], dict[str, Any]]:
    """Seconds per case with TTA and the share of it inside the network, on the first trained WORK."""

    def step(check: Check, limit: float) -> dict[str, Any]:
        works = check.trained.get(dataset, [])
        if not works:
            raise StepFailed(f"no trained {dataset} model: the training steps before this one failed")
        return measure_prediction(check, works[0], getattr(check.sizes, cases_attr), dataset)

    return step


def measure_prediction(check: Check, work: Path, n_cases: int, dataset: str) -> dict[str, Any]:
    """Read, predict (TTA, the device's AMP) and export ``n_cases`` raw cases one at a time.

    ``gpu_busy_fraction`` = time inside the network calls (CUDA synchronised around each call, so
    exact) / the case's wall time from reading the file to the written label map. The first case
    pays one-time set-up (kernel selection) and is reported but not averaged.
    """
    from autoseg.imageio import read_image
    from autoseg.inference import Predictor, select_models

    record = json.loads((work / "dataset.json").read_text(encoding="utf-8"))
    source = Path(record["source"])
    ids = sorted(record["cases"])[:n_cases]
    selections, _ = select_models(work, [CONFIG], [0])
    predictor = Predictor(work, selections, device=check.sizes.device, tta=True, profile=True)
    stats = predictor.stats
    out = check.scratch / "predictions" / dataset
    out.mkdir(parents=True, exist_ok=True)
    per_case = []
    for case_id in ids:
        before = dataclasses.replace(stats)
        t0 = time.perf_counter()
        image, geometry = read_image(source / record["cases"][case_id]["images"][0])
        t1 = time.perf_counter()
        predictions = predictor.predict(image, geometry)
        predictor.export(predictions, geometry, out / f"{case_id}.nii.gz")
        wall = time.perf_counter() - t0
        forward = stats.forward_s - before.forward_s
        inside_predict = stats.predict_s - before.predict_s
        preprocess = stats.preprocess_s - before.preprocess_s
        per_case.append({
            "case": case_id, "shape": list(image.shape[1:]), "wall_s": round(wall, 4), "read_s": round(t1 - t0, 4),
            "preprocess_s": round(preprocess, 4), "forward_s": round(forward, 4),
            "window_and_activation_s": round(inside_predict - preprocess - forward, 4),
            "export_s": round(stats.export_s - before.export_s, 4), "windows": stats.windows - before.windows,
            "network_calls": stats.forward_calls - before.forward_calls,
            "gpu_busy_fraction": round(forward / wall, 4),
        })
    steady = per_case[1:] or per_case
    wall = statistics.mean(c["wall_s"] for c in steady)
    forward = statistics.mean(c["forward_s"] for c in steady)
    keys = ("read_s", "preprocess_s", "forward_s", "window_and_activation_s", "export_s")
    return {
        "work": work.name, "folds": 1, "tta": True, "device": str(predictor.device),
        "first_case_s": per_case[0]["wall_s"], "s_per_case": round(wall, 4),
        "gpu_busy_fraction": round(forward / wall, 4),
        "outside_network_fraction": round(1 - forward / wall, 4),
        "mean_split_s": {k: round(statistics.mean(c[k] for c in steady), 4) for k in keys},
        "cases": per_case,
        "summary": f"{wall:.3f} s/case (TTA, 1 fold), network {forward / wall:.0%} of it",
    }


# ----------------------------------------------------------------------------------------------
# 8: time to pseudo-Dice 0.85


class _Stop(Exception):
    """Ends the Dice run early: the target was reached, or the check's budget is spent."""


def step_dice(check: Check, limit: float) -> dict[str, Any]:
    """``--time-budget 4m`` training of Hippocampus 3d_fullres (AdamW, as the CLI chooses), stopped
    as soon as an epoch's pseudo-Dice reaches the target; the curve is reported either way."""
    from autoseg.training import run as training
    from autoseg.training.config import TrainConfig
    from autoseg.training.trainer import Callbacks

    sizes = check.sizes
    work = clone_work(check, f"hippocampus/{sizes.planner_default}", "dice_hippocampus")
    cfg = TrainConfig(epochs=sizes.dice_epochs or 10**6, iters_per_epoch=sizes.dice_iters,
                      val_iters=sizes.dice_val_iters, time_budget_s=sizes.dice_budget_s, device=sizes.device)
    hard_stop = time.perf_counter() + limit - 5.0
    curve: list[dict[str, Any]] = []
    why = ["the time budget was spent"]

    def on_epoch_end(record: dict[str, Any]) -> None:
        curve.append({k: round(record[k], 4) if isinstance(record[k], float) else record[k]
                      for k in ("epoch", "elapsed_s", "mean_fg_dice", "ema_fg_dice", "iters", "s_per_it",
                                "data_wait_fraction")})
        if record["mean_fg_dice"] >= TARGETS["pseudo_dice"]:
            why[0] = "target reached"
            raise _Stop()

    def on_iteration(it: int, loss: float) -> None:
        if time.perf_counter() > hard_stop:
            why[0] = "the check's budget was spent (the time budget was not)"
            raise _Stop()

    callbacks = Callbacks(on_epoch_end=on_epoch_end, on_iteration=on_iteration)
    start = time.perf_counter()
    try:
        training.run(work, CONFIG, "0", cfg, callbacks_for=lambda fold: callbacks, validate=False)
    except _Stop:
        pass
    except StepTimeout:  # e.g. a long validation at the end: the epochs finished so far still count
        why[0] = "the step's cap was reached"
    wall = time.perf_counter() - start
    if not curve:
        raise StepFailed(f"no epoch finished in {wall:.0f} s ({why[0]})")
    best = max(curve, key=lambda r: r["mean_fg_dice"])
    reached = next((r for r in curve if r["mean_fg_dice"] >= TARGETS["pseudo_dice"]), None)
    return {
        "time_budget_s": sizes.dice_budget_s, "optimizer": cfg.resolved_optimizer, "lr": cfg.resolved_lr,
        "stopped": why[0], "wall_s": round(wall, 2), "epochs": len(curve),
        "target_reached": reached is not None, "time_to_target_s": reached["elapsed_s"] if reached else None,
        "best_mean_fg_dice": best["mean_fg_dice"], "best_at_s": best["elapsed_s"], "curve": curve,
        "summary": (f"pseudo-Dice {reached['mean_fg_dice']:.3f} at {reached['elapsed_s']:.0f} s" if reached else
                    f"best pseudo-Dice {best['mean_fg_dice']:.3f} at {best['elapsed_s']:.0f} s ({why[0]})"),
    }


# ----------------------------------------------------------------------------------------------
# 9: torch.compile


def step_compile(check: Check, limit: float) -> dict[str, Any]:
    """Training throughput with ``--compile`` against ``train_hippocampus_default``'s (CUDA only)."""
    if check.sizes.device != "cuda":
        raise StepSkipped("skipped: cpu (torch.compile is never used on the CPU by default)")
    key = f"hippocampus/{check.sizes.planner_default}"
    figures = measure_training(check, key, "compile_hippocampus_default", check.sizes.timed_iters_hippocampus,
                               compile_=True, warmup_iters=check.sizes.compile_warmup_iters)
    eager = check.results.get("train_hippocampus_default")
    if eager is not None and eager.status == "ok":
        speedup = eager.figures["s_per_it"] / figures["s_per_it"]
        figures["eager_s_per_it"] = eager.figures["s_per_it"]
        figures["speedup"] = round(speedup, 3)
        figures["helps"] = speedup >= COMPILE_HELPS
        figures["summary"] = (f"{figures['s_per_it']:.3f} s/it compiled vs {eager.figures['s_per_it']:.3f} eager "
                              f"(x{speedup:.2f}); first iteration {figures['first_iteration_s']:.0f} s")
    return figures


# ----------------------------------------------------------------------------------------------
# The run, the targets, the report


def run_all(check: Check) -> None:
    """Every step in priority order (see the module docstring)."""
    sizes = check.sizes
    default, resenc = sizes.planner_default, sizes.planner_resenc
    run_step(check, "environment", step_environment, 60)
    run_step(check, "data_hippocampus", step_data_hippocampus, 120, needs=["environment"])
    run_step(check, "data_ct", step_data_ct, 120, needs=["environment"])
    run_step(check, "plan_hippocampus_default", step_plan("hippocampus", default), 150, needs=["data_hippocampus"])
    run_step(check, "plan_hippocampus_resenc_m", step_plan("hippocampus", resenc), 150, needs=["data_hippocampus"])
    run_step(check, "plan_ct_default", step_plan("ct", default), 150, needs=["data_ct"])
    run_step(check, "train_hippocampus_default", step_train(f"hippocampus/{default}", "timed_iters_hippocampus"),
             120, min_s=20, needs=["plan_hippocampus_default"])
    run_step(check, "train_hippocampus_resenc_m", step_train(f"hippocampus/{resenc}", "timed_iters_hippocampus"),
             120, min_s=20, needs=["plan_hippocampus_resenc_m"])
    run_step(check, "train_ct_default", step_train(f"ct/{default}", "timed_iters_ct"), 150, min_s=30,
             needs=["plan_ct_default"])
    run_step(check, "launcher_gpus_1", step_launcher, 150, min_s=30, needs=["plan_hippocampus_default"])
    run_step(check, "torchrun_1", step_torchrun, 150, min_s=30, needs=["plan_hippocampus_default"])
    run_step(check, "nccl_ddp", step_nccl, 90, min_s=10, needs=["plan_hippocampus_default"])
    run_step(check, "predict_hippocampus", step_predict("hippocampus", "predict_cases_hippocampus"), 90, min_s=15,
             needs=["plan_hippocampus_default"])
    run_step(check, "predict_ct", step_predict("ct", "predict_cases_ct"), 120, min_s=20, needs=["train_ct_default"])
    run_step(check, "dice_hippocampus", step_dice, sizes.dice_budget_s + 60, min_s=60 if sizes.device == "cuda" else 5,
             needs=["plan_hippocampus_default"])
    run_step(check, "compile_hippocampus_default", step_compile, 240, min_s=90 if sizes.device == "cuda" else 5,
             needs=["plan_hippocampus_default"])


def targets(check: Check) -> list[dict[str, Any]]:
    """Every target of the issue with its value and ``met`` (None: not measured)."""
    results = check.results
    rows: list[dict[str, Any]] = []

    def add(name: str, step: str, target: str, value: Any, met: bool | None) -> None:
        rows.append({"target": name, "step": step, "limit": target, "value": value, "met": met})

    def figures(step: str) -> dict[str, Any] | None:
        result = results.get(step)
        return result.figures if result is not None and result.status == "ok" else None

    wait_key = f"data_wait_fraction_{EPOCH_ITERS}_iters"
    tolerance = TARGETS["memory_estimate_tolerance"]
    for step in ("train_hippocampus_default", "train_hippocampus_resenc_m", "train_ct_default"):
        f = figures(step)
        wait = f[wait_key] if f else None
        add("data wait", step, f"< {TARGETS['data_wait_fraction_max']:.0%}", wait,
            None if wait is None else wait < TARGETS["data_wait_fraction_max"])
        ratio = f["memory"].get("reserved_over_estimate") if f else None
        add("peak GPU memory vs estimated_memory_gb", step, f"within {tolerance:.0%}", ratio,
            None if ratio is None else abs(ratio - 1) <= tolerance)
        model = f["compute_model"] if f else None
        add("planner's predicted s/iteration vs measured", step,
            f"within {TARGETS['compute_model_tolerance']:.0%}", model["error"] if model else None,
            None if model is None else bool(model["within_target"]))
    for step in ("launcher_gpus_1", "torchrun_1"):
        f = figures(step)
        add("one epoch + resume", step, "ok", results[step].status if step in results else None,
            None if step not in results or results[step].status.startswith("skipped") else f is not None)
    nccl = results.get("nccl_ddp")
    add("process group initialises, DDP step", "nccl_ddp", "ok", nccl.status if nccl else None,
        None if nccl is None or nccl.status.startswith("skipped") else nccl.status == "ok")
    dice = figures("dice_hippocampus")
    add("pseudo-Dice >= 0.85", "dice_hippocampus", f"within {TARGETS['pseudo_dice_within_s']:.0f} s",
        (dice["time_to_target_s"] if dice["target_reached"] else f"best {dice['best_mean_fg_dice']:.3f}")
        if dice else None,
        None if dice is None else bool(dice["target_reached"]
                                       and dice["time_to_target_s"] <= TARGETS["pseudo_dice_within_s"]))
    for step in ("predict_hippocampus", "predict_ct"):
        f = figures(step)
        busy = f["gpu_busy_fraction"] if f else None
        add("GPU busy share of predict wall time", step, f">= {TARGETS['gpu_busy_fraction_min']:.0%}", busy,
            None if busy is None else busy >= TARGETS["gpu_busy_fraction_min"])
    compiled = figures("compile_hippocampus_default")
    add("torch.compile helps training", "compile_hippocampus_default", f">= x{COMPILE_HELPS}",
        compiled.get("speedup") if compiled else None,
        compiled.get("helps") if compiled else None)
    add("whole check", "-", f"<= {TARGETS['wall_s_max']:.0f} s", round(check.elapsed(), 1),
        check.elapsed() <= TARGETS["wall_s_max"])
    if check.dry_run:
        for row in rows:  # sizes and device are not the GPU's: nothing here is a measurement
            row["met"] = None if row["target"] != "whole check" else row["met"]
    return rows


def report(check: Check, budget: float) -> dict[str, Any]:
    """The JSON document."""
    env = check.results.get("environment")
    env_figures = env.figures if env is not None else {}
    return {
        "check": "autoseg GPU check (benchmarks/gpu_check.py)",
        "dry_run": check.dry_run,
        "device": "cpu" if check.sizes.device == "cpu" else env_figures.get("device_name", "cuda"),
        "torch": env_figures.get("torch"), "cuda": env_figures.get("cuda"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": budget, "wall_s": round(check.elapsed(), 1),
        "environment": env_figures,
        "steps": {name: {k: v for k, v in dataclasses.asdict(r).items() if v not in (None, "", {})}
                  for name, r in check.results.items()},
        "targets": targets(check),
        "notes": check.notes,
    }


def table(document: dict[str, Any]) -> str:
    """The short human summary: one line per step, one per target."""
    lines = [f"autoseg GPU check — device {document['device']}, torch {document['torch']}, CUDA {document['cuda']}"
             f"{' (DRY RUN: CPU, tiny sizes; no figure here is a GPU measurement)' if document['dry_run'] else ''}",
             f"{'step':<30} {'status':<24} {'s':>7}  result"]
    for name, step in document["steps"].items():
        detail = step.get("summary") or step.get("error") or ""
        lines.append(f"{name:<30} {step['status'][:24]:<24} {step.get('seconds', 0):>7.1f}  {detail[:110]}")
    lines.append(f"{'target':<44} {'step':<30} {'limit':<12} {'value':<14} met")
    for row in document["targets"]:
        value = row["value"]
        value = f"{value:.3f}" if isinstance(value, float) else str(value)
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(f"{row['target'][:44]:<44} {row['step'][:30]:<30} {row['limit']:<12} {value[:14]:<14} {met}")
    lines.append(f"wall {document['wall_s']:.1f} s of a {document['budget_s']:.0f} s budget")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    parser.add_argument("--budget", type=float, default=TARGETS["wall_s_max"],
                        help="global deadline in seconds; steps that no longer fit are skipped (default 480)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="MSD Hippocampus (default ../shared/data/Task04_Hippocampus; the bundled example "
                             "when absent)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GB to plan for (default: the device's memory)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="keep the datasets, experiment folders and logs here (default: a temporary "
                             "folder, deleted at the end)")
    parser.add_argument("--probe-ddp", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    started = time.perf_counter()
    args = parser.parse_args(argv)

    if args.probe_ddp is not None:  # the nccl_ddp step's child process
        print(json.dumps(probe_ddp(args.probe_ddp, args.device)), flush=True)
        sys.stderr.flush()
        os._exit(0)  # the result is out: no interpreter teardown, where torch's threads could still abort it
    sizes = DRY_RUN if args.dry_run else GPU
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device on this machine (torch "
                  f"{torch.__version__}, CUDA build {torch.version.cuda}); nothing was measured. "
                  "Run it on a GPU machine, or with --dry-run to rehearse the script on the CPU.", file=sys.stderr)
            return 2
    with contextlib.ExitStack() as stack:
        if args.scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autoseg-gpu-check-")))
        else:
            scratch = args.scratch.resolve()
            scratch.mkdir(parents=True, exist_ok=True)
        check = Check(sizes=sizes, dry_run=args.dry_run, scratch=scratch, data=args.data.resolve(),
                      started=started, deadline=started + args.budget, gpu_memory_gb=args.gpu_memory)
        run_all(check)
        document = report(check, args.budget)
    text = json.dumps(document, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(table(document), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
