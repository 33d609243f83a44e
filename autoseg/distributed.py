"""Several processes: DDP through ``torch.distributed``, folds in parallel, and the launcher behind both.

Three ways to use more than one device, all on PyTorch's own engine:

* ``autoseg train … --gpus N`` (or ``--device cpu --procs N``): autoseg starts N processes itself
  (``spawn``), one per device, joined into a process group over NCCL (CUDA) or gloo (CPU), and
  trains one fold with :class:`~torch.nn.parallel.DistributedDataParallel`. The global batch is
  split over the ranks, each rank's share keeps its part of the forced-foreground patches, and
  rank 0 alone writes logs, plots and checkpoints.
* ``torchrun … -m autoseg train …``: the same code path, ranks from torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); multi-node.
* ``--folds-parallel``: one whole fold per device at once, no process group.

The launcher watches every process: the first one to fail stops all the others (no rank is left
waiting in a collective) and its error reaches the user — a user error as the same one-line
message, anything else with the failing rank's real traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoseg import errors
from autoseg.errors import AutosegError, ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Seconds a collective may wait for a peer before the process group gives up (NCCL/gloo).
COLLECTIVE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its process group (``world_size == 1``: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


@dataclass(frozen=True)
class Launch:
    """How a training run uses devices.

    Attributes:
        mode: ``single`` (this process), ``ddp`` (one fold over ``devices``) or ``folds`` (one fold
            per device at once).
        devices: one device name per process (``cuda:0``, …, or ``cpu``).
        backend: process-group backend for ``ddp``: ``nccl`` on CUDA, ``gloo`` on CPU.
    """

    mode: str
    devices: tuple[str, ...]
    backend: str = "gloo"

    @property
    def processes(self) -> int:
        return len(self.devices)


def resolve_launch(device: str, gpus: int | None, procs: int | None, folds_parallel: bool,
                   cuda_count: Callable[[], int] | None = None) -> Launch:
    """Turn ``--device/--gpus/--procs/--folds-parallel`` into a :class:`Launch`.

    Raises:
        ConfigError: contradictory options, or more GPUs asked for than present.
    """
    if gpus is not None and procs is not None:
        raise ConfigError("--gpus and --procs cannot be combined: --gpus N uses N GPUs, "
                          "--device cpu --procs N uses N CPU processes")
    if gpus is not None:
        if gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, not {gpus}")
        if device not in ("auto", "cuda"):
            raise ConfigError(f"--gpus {gpus} with --device {device}: --gpus picks the devices cuda:0..cuda:{gpus - 1} "
                              "itself; drop --device (for CPU processes use --device cpu --procs N)")
        present = (cuda_count or _cuda_count)()
        if present == 0:
            raise ConfigError(f"--gpus {gpus}: no CUDA device on this machine; train on the CPU without --gpus "
                              "(or --device cpu --procs N)")
        if gpus > present:
            raise ConfigError(f"--gpus {gpus}: only {present} CUDA device(s) present; use --gpus {present} or fewer")
        devices = tuple(f"cuda:{i}" for i in range(gpus))
        backend = "nccl"
    elif procs is not None:
        if procs < 1:
            raise ConfigError(f"--procs must be >= 1, not {procs}")
        if device != "cpu":
            raise ConfigError(f"--procs {procs} runs CPU processes and needs --device cpu; for GPUs use --gpus N")
        devices = ("cpu",) * procs
        backend = "gloo"
    else:
        if folds_parallel:
            raise ConfigError("--folds-parallel needs --gpus N (one fold per GPU) or --device cpu --procs N")
        return Launch("single", (device,))
    if folds_parallel:
        return Launch("folds", devices, backend)
    if len(devices) == 1:
        return Launch("single", devices)
    return Launch("ddp", devices, backend)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def from_torchrun_env(environ: dict[str, str] | None = None) -> DistContext | None:
    """The rank of this process when started by ``torchrun`` (``WORLD_SIZE`` > 1), else ``None``."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return DistContext(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is missing or not a number: start autoseg with torchrun "
                          "(which sets RANK, WORLD_SIZE, LOCAL_RANK), or unset WORLD_SIZE") from None


def local_processes(ctx: DistContext) -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, autoseg's launcher's
    count (``AUTOSEG_LOCAL_PROCESSES``, set in its children), else the group's size."""
    for name in ("LOCAL_WORLD_SIZE", "AUTOSEG_LOCAL_PROCESSES"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return ctx.world_size


def init_process_group(ctx: DistContext, backend: str, init_method: str | None = None) -> None:
    """Join the process group (``init_method`` ``None``: torchrun's ``env://``)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend == "nccl":
        import torch

        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Small collectives (no-ops in a single process)


def broadcast_float(ctx: DistContext, value: float) -> float:
    """Rank 0's ``value`` on every rank (keeps time-based decisions identical across ranks)."""
    if not ctx.enabled:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def all_reduce_sum(ctx: DistContext, values: "np.ndarray") -> "np.ndarray":
    """Element-wise sum over the ranks of a float array."""
    if not ctx.enabled:
        return values
    import numpy as np
    import torch
    import torch.distributed as dist

    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def all_gather_strings(ctx: DistContext, value: str) -> list[str]:
    """Every rank's ``value`` (rank order)."""
    if not ctx.enabled:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return [str(v) for v in gathered]


def _collective_device() -> "torch.device":
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def weights_digest(module: "torch.nn.Module") -> str:
    """SHA-256 of a module's parameters and buffers, in ``state_dict`` order."""
    return state_digest(module.state_dict())


def state_digest(state: "dict[str, torch.Tensor]") -> str:
    """SHA-256 of a ``state_dict`` (names and exact tensor bytes, in order)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Splitting the global batch


def rank_batch(global_batch: int, ctx: DistContext) -> tuple[int, int]:
    """``(first index, size)`` of this rank's share of the global batch (lower ranks take the remainder).

    Raises:
        ConfigError: fewer samples than ranks.
    """
    if global_batch < ctx.world_size:
        raise ConfigError(f"batch size {global_batch} is smaller than the {ctx.world_size} processes; "
                          f"use --batch-size {ctx.world_size} or more, or fewer --gpus/--procs")
    base, extra = divmod(global_batch, ctx.world_size)
    size = base + (1 if ctx.rank < extra else 0)
    start = ctx.rank * base + min(ctx.rank, extra)
    return start, size


def rank_oversample(global_batch: int, oversample: float, ctx: DistContext) -> float:
    """This rank's forced-foreground fraction, so that the ranks together force exactly the patches a
    single process would (the last ``num_forced(global_batch)`` positions of the global batch)."""
    from autoseg.data.sampler import num_forced

    if not ctx.enabled:
        return oversample
    start, size = rank_batch(global_batch, ctx)
    first_forced = global_batch - num_forced(global_batch, oversample)
    forced_here = sum(1 for i in range(start, start + size) if i >= first_forced)
    return forced_here / size


# ----------------------------------------------------------------------------------------------
# The launcher


@dataclass(frozen=True)
class Event:
    """A progress message from a child process to the parent's display."""

    fold: int
    name: str  # epoch_start | iteration | epoch_end | fold_start | validated
    args: tuple


class ChildFailed(AutosegError):
    """A training process failed with an error that is not a user error (carries its traceback)."""

    exit_code = 1


@dataclass
class ChildContext:
    """Given to the function run in each child: its rank and a channel for progress events."""

    rank: int
    world_size: int
    device: str
    init_method: str | None
    backend: str
    #: Processes started by this launch on this machine (share the cores and loader workers).
    processes: int = 1
    _events: Any = None

    def post(self, event: Event) -> None:
        if self._events is not None:
            self._events.put(("event", self.rank, event))

    @property
    def dist(self) -> DistContext:
        """This process's place in its group (independent processes are each a group of one)."""
        if self.world_size == 1:
            return SINGLE
        return DistContext(self.rank, self.world_size, self.rank)


def free_port() -> int:
    """A TCP port free on this host right now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(target: Callable[[ChildContext, Any], Any], payloads: Sequence[Any], launch_: Launch,
           on_event: Callable[[Event], None] | None = None, join_group: bool = True,
           poll_s: float = 0.1) -> list[Any]:
    """Run ``target(ctx, payloads[rank])`` in one spawned process per device; return their results.

    ``target`` must be a module-level function (it is pickled by name). With ``join_group`` the
    children form one process group (DDP); otherwise they are independent (folds in parallel).
    Progress events posted by children are handed to ``on_event`` in this process.

    Raises:
        AutosegError: a child's user error, re-raised here with its message.
        ChildFailed: a child's other exception (its traceback in the message) or a child killed
            without a word (e.g. out of memory).
    """
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    channel = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}" if join_group else None
    processes: list[Any] = []
    results: dict[int, Any] = {}
    failures: list[tuple[float, int, str, str, str]] = []
    died: dict[int, int] = {}  # rank -> exit code, for ranks that ended badly before we stopped any
    try:
        with _sigterm_as_exit():
            for rank, (device, payload) in enumerate(zip(launch_.devices, payloads, strict=True)):
                child = ChildContext(rank, launch_.processes if join_group else 1, device, init_method,
                                     launch_.backend, launch_.processes)
                process = context.Process(target=_child_main, args=(target, child, payload, channel),
                                          name=f"autoseg-rank{rank}", daemon=False)
                process.start()
                processes.append(process)
            _watch(processes, channel, on_event, results, failures, died, poll_s)
    finally:
        alive = [p for p in processes if p.is_alive()]
        if failures or any(p.exitcode not in (None, 0) for p in processes) or alive:
            # Give a failed rank's peers a moment to report their own error, then stop them.
            deadline = time.monotonic() + (2.0 if failures else 0.0)
            while time.monotonic() < deadline and any(p.is_alive() for p in processes):
                time.sleep(0.05)
            for process in processes:
                if process.is_alive():
                    process.terminate()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        _drain(channel, on_event, results, failures, 0.0)
        channel.close()
    reported = {failure[1] for failure in failures}
    silent = {rank: code for rank, code in died.items() if rank not in reported}
    if silent:
        # Killed without a word (out of memory, a signal): the root cause; its peers' errors follow from it.
        rank, code = min(silent.items())
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise ChildFailed(f"process {rank} ({launch_.devices[rank]}) {how} without reporting an "
                          "error (out of memory?); the other processes were stopped")
    if failures:
        raise _error_from(failures)
    for rank, process in enumerate(processes):
        if process.exitcode != 0:
            raise ChildFailed(f"process {rank} ({launch_.devices[rank]}) ended with exit code "
                              f"{process.exitcode}; the other processes were stopped")
    return [results.get(rank) for rank in range(len(processes))]


def _watch(processes: list[Any], channel: Any, on_event: Callable[[Event], None] | None, results: dict[int, Any],
           failures: list, died: dict[int, int], poll_s: float) -> None:
    """Relay events until every process has finished, or one has failed (``failures``/``died`` filled)."""
    while True:
        _drain(channel, on_event, results, failures, poll_s)
        codes = [p.exitcode for p in processes]
        died.update({rank: code for rank, code in enumerate(codes) if code not in (None, 0)})
        if failures or died:
            return
        if all(code == 0 for code in codes):
            _drain(channel, on_event, results, failures, 0.0)
            return


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM to the launcher (a scheduler stopping the job) unwinds it, so its children are stopped too."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the launcher dies, even by SIGKILL (no orphans)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def available_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-pinned sets respected where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _drain(channel: Any, on_event: Callable[[Event], None] | None, results: dict[int, Any],
           failures: list, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            timeout = max(0.0, deadline - time.monotonic())
            message = channel.get(timeout=timeout) if timeout > 0 else channel.get_nowait()
        except queue_module.Empty:
            return
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "event":
            if on_event is not None:
                on_event(message[2])
        elif kind == "result":
            results[message[1]] = message[2]
        elif kind == "error":
            failures.append(message[1])


def _error_from(failures: list[tuple[float, int, str, str, str]]) -> AutosegError:
    """The error the user sees: a user error first, else the earliest failure (the root cause;
    its peers fail after it, in the collective it left)."""
    user = [f for f in failures if f[2] != "ChildFailed"]
    _, rank, kind, message, text = min(user or failures)
    if kind != "ChildFailed":
        cls = getattr(errors, kind, AutosegError)
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error
    return ChildFailed(f"process {rank} failed (the other processes were stopped):\n{text}")


def _child_main(target: Callable[[ChildContext, Any], Any], child: ChildContext, payload: Any, channel: Any) -> None:
    import torch

    _die_with_parent()
    os.environ["AUTOSEG_LOCAL_PROCESSES"] = str(child.processes)
    child._events = channel
    if child.device == "cpu":
        # Share the cores: N processes each with every core's worth of threads would thrash.
        torch.set_num_threads(max(1, available_cpus() // child.processes))
    elif child.device.startswith("cuda:"):
        # Else every process would also open a context (hundreds of MB) on GPU 0.
        torch.cuda.set_device(torch.device(child.device))
    try:
        if child.init_method is not None and child.world_size > 1:
            init_process_group(child.dist, child.backend, child.init_method)
        result = target(child, payload)
    except BaseException as exc:  # noqa: BLE001 — every failure must reach the parent
        kind = type(exc).__name__ if isinstance(exc, AutosegError) else "ChildFailed"
        channel.put(("error", (time.time(), child.rank, kind, str(exc), traceback.format_exc())))
        channel.close()
        channel.join_thread()
        # No destroy_process_group here: with NCCL it can wait forever for peers stuck in a
        # collective; the launcher stops them.
        raise SystemExit(1) from None
    destroy_process_group()
    channel.put(("result", child.rank, result))
    channel.close()
    channel.join_thread()


def replace_device(cfg: Any, device: str) -> Any:
    """A copy of a frozen config dataclass with another ``device``."""
    return dataclasses.replace(cfg, device=device)
