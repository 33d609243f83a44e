"""Batch loader: sampler → augmentation → deep-supervision targets, in-process or in worker processes.

``workers=0`` produces every batch in the calling process (tests, debugging; deterministic given
the seed). ``workers=N`` starts N processes, each producing batches from its own seed
(``SeedSequence([seed, worker])``) into its own pipe, at most ``queue_size + 1`` batches ahead
(bounded memory); the consumer takes batch ``i`` from worker
``i mod N``, so a run is reproducible for a given ``(seed, workers)`` and ``workers=1`` yields the
same batches as ``workers=0``.

A worker's exception is re-raised in the consumer as the *same* exception type and message, with
the worker's formatted traceback attached as its ``__cause__`` (:class:`RemoteTraceback`, as
``concurrent.futures`` does) — never batchgenerators' "This is not the actual error message!".
A worker that dies without a word (killed, segfault) or goes silent longer than ``timeout_s``
raises :class:`DataLoaderWorkerError`; the loader then shuts down. :meth:`BatchLoader.close` (also
on ``with``-exit, garbage collection, interpreter exit and ``KeyboardInterrupt`` in ``next``)
stops, joins and if need be terminates every worker: no zombies, no hang.

Workers never import torch (fast start, ~300 MB less per worker); arrays cross the process
boundary pickled through a pipe (a few ms for a 3 MB batch) and become tensors in the consumer.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue as queue_module
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg.data.augment import (
    AugmentationSettings,
    Augmenter,
    GlobalRandomState,
    deep_supervision_strides,
    downsample_seg,
)
from autoseg.data.cascade import one_hot_previous, perturb_previous
from autoseg.data.sampler import Case, check_sampling_options, sample_batch
from autoseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from autoseg.plans import Configuration

# How often a waiting consumer checks that the worker it waits for is alive, and a worker that
# its consumer still is: short enough that a crash surfaces at once, long enough to cost nothing.
_POLL_S = 0.2


class DataLoaderWorkerError(RuntimeError):
    """A loader worker died without reporting an exception, went silent, or raised one that cannot be re-created."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process (set as ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


@dataclass
class Batch:
    """One training batch, ready for the network.

    Attributes:
        image: ``(B, C', *patch)`` float32.
        target: label maps ``(B, 1, *patch / stride)`` int64, one per deep-supervision output,
            highest resolution first (one entry without deep supervision). Squeeze axis 1 for
            ``CrossEntropyLoss``. Restoration: one float32 ``(B, C, *patch)`` clean target.
        case_ids: the case each patch came from.
        wait_s: seconds the consumer waited for this batch in ``next()`` (with ``workers=0``, the
            whole production time); the trainer logs ``wait_s / step time``.
    """

    image: torch.Tensor
    target: list[torch.Tensor]
    case_ids: tuple[str, ...]
    wait_s: float


class BatchProducer:
    """Produces numpy batches: sample, augment, deep-supervision targets. Torch-free; runs in workers.

    Args:
        cases: cases to sample from.
        config: the configuration (patch, batch size, dims, 2.5D context, topology).
        seed_sequence: the only source of randomness.
        augment: training augmentation (False for validation batches: final-size patches as sampled).
        oversample: forced-foreground fraction (nnU-Net: 0.33).
        batch_size: default ``config.batch_size``.
        deep_supervision: one target per decoder output, else only the full-resolution one.
        settings: augmentation settings.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        config: Configuration,
        seed_sequence: np.random.SeedSequence,
        *,
        augment: bool = True,
        oversample: float = 0.33,
        batch_size: int | None = None,
        deep_supervision: bool = True,
        settings: AugmentationSettings | None = None,
    ) -> None:
        self.cases = list(cases)
        self.config = config
        self.batch_size = config.batch_size if batch_size is None else batch_size
        self.oversample = oversample
        self.patch_size = tuple(int(p) for p in config.patch_size)
        check_sampling_options(self.cases, self.patch_size, self.patch_size, self.batch_size, oversample,
                               config.context_slices)
        self.augmenter = Augmenter(config, settings) if augment else None
        self.sample_size = self.augmenter.initial_patch_size if self.augmenter else self.patch_size
        strides = deep_supervision_strides(config.topology)
        self.strides = strides if deep_supervision else strides[:1]
        # A third stream for the cascade's perturbation (spawn keys 0 and 1 are unchanged by it),
        # so a cascade samples the same patches as its plain configuration with the same seed.
        sampler_seed, global_seed, cascade_seed = seed_sequence.spawn(3)
        self.rng = np.random.default_rng(sampler_seed)
        self.cascade_rng = np.random.default_rng(cascade_seed)
        self.global_random = GlobalRandomState(int(global_seed.generate_state(1)[0]))

    def next(self) -> dict[str, Any]:
        """One batch as numpy: ``{"image", "target": [...], "case_ids"}`` (targets int16)."""
        patches = sample_batch(
            self.cases, self.sample_size, self.batch_size, self.rng, self.oversample,
            final_patch_size=self.patch_size, context_slices=self.config.context_slices,
        )
        image, seg = patches.image, patches.seg
        if patches.previous is not None:
            # A cascade stage: the previous stage's labels move with the target through the spatial
            # transforms and mirroring (as a second label channel), untouched by the intensity ones.
            seg = np.concatenate([seg, patches.previous], axis=1)
        if self.augmenter is not None:
            with self.global_random:
                image, seg = self.augmenter(image, seg)
        if patches.previous is not None:
            seg, previous = seg[:, :1], seg[:, 1]
            onehot = np.stack([one_hot_previous(p, list(self.cases[0].previous_values)) for p in previous])
            if self.augmenter is not None:
                perturb_previous(onehot, self.cascade_rng)
            image = np.concatenate([image, onehot], axis=1)
        return {"image": image, "target": downsample_seg(seg, self.strides), "case_ids": patches.case_ids}


class BatchLoader:
    """An endless iterator of training (or validation) batches.

    Args:
        cases: cases to sample from (:func:`autoseg.data.load_cases`).
        config: the configuration.
        augment: training augmentation; False for validation batches.
        seed: base seed; worker ``w`` uses ``SeedSequence([seed, w])`` (in-process: ``w = 0``).
        workers: background processes; 0 = produce in the calling process.
        oversample: forced-foreground fraction (nnU-Net: 0.33).
        batch_size: default ``config.batch_size``.
        deep_supervision: targets for every decoder output (else only full resolution).
        settings: augmentation settings (default DESIGN §6).
        queue_size: batches each worker may hold ready beside the one it is sending (bounds
            memory to about ``workers × (queue_size + 1)`` batches).
        timeout_s: longest wait for one batch before :class:`DataLoaderWorkerError`.
        pin_memory: pin the tensors for faster, asynchronous copies to a CUDA device.
        producer: the class that makes the numpy batches, with :class:`BatchProducer`'s arguments
            (a task's, :meth:`autoseg.tasks.base.Task.batch_producer`; restoration:
            :class:`autoseg.data.restoration.PairProducer`). Integer targets become int64 tensors,
            float ones stay float32.
        start_method: ``forkserver`` (default where available) or ``spawn``. The fork server
            imports this module once; every later loader's workers then start in ~0.4–0.6 s
            instead of ~2.5 s with spawn (2 workers, 2 cores; numpy, scipy, batchgenerators
            imports), which matters when a loader is started every epoch. ``fork`` is refused: a
            forked worker inherits every pipe end (so a dead consumer or worker is never seen as
            EOF) and any lock a torch or BLAS thread held at fork time.

    Raises:
        ConfigError: an option is invalid (also raised by the sampler and augmentation settings).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        config: Configuration,
        *,
        augment: bool = True,
        seed: int = 0,
        workers: int = 0,
        oversample: float = 0.33,
        batch_size: int | None = None,
        deep_supervision: bool = True,
        settings: AugmentationSettings | None = None,
        queue_size: int = 2,
        timeout_s: float = 300.0,
        pin_memory: bool = False,
        start_method: str | None = None,
        producer: type | None = None,
    ) -> None:
        self._closed = True  # until the workers exist, so __del__ of a half-built loader is a no-op
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, not {workers}")
        if queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, not {queue_size}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, not {timeout_s}")
        methods = [m for m in ("forkserver", "spawn") if m in multiprocessing.get_all_start_methods()]
        start_method = start_method or methods[0]
        if start_method not in methods:
            raise ConfigError(f"start_method {start_method!r} is not supported; expected one of "
                              f"{', '.join(repr(m) for m in methods)}")
        if pin_memory:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("pin_memory needs a CUDA device and none is available; turn pin_memory off")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.pin_memory = pin_memory
        self._index = 0
        producer_kwargs: dict[str, Any] = dict(
            cases=list(cases), config=config, augment=augment, oversample=oversample, batch_size=batch_size,
            deep_supervision=deep_supervision, settings=settings,
        )
        producer_class = producer or BatchProducer
        # Built here in every case so that bad options fail in the caller, not in a worker.
        self._producer: BatchProducer | None = producer_class(
            seed_sequence=np.random.SeedSequence([seed, 0]), **producer_kwargs
        )
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._readers: list[Connection] = []
        self._stop: Any = None
        self._closed = False
        if workers:
            self._producer = None
            context = multiprocessing.get_context(start_method)
            if start_method == "forkserver":
                # Takes effect when the fork server starts (the first forkserver process here).
                context.set_forkserver_preload([__name__])
            self._stop = context.Event()
            self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._readers, self._stop)
            try:
                for worker in range(workers):
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(
                        target=_worker_main,
                        args=(worker, seed, producer_kwargs, writer, self._stop, queue_size, producer_class),
                        name=f"autoseg-loader-{worker}", daemon=True,
                    )
                    self._readers.append(reader)
                    self._processes.append(process)
                    process.start()
                    # The worker holds the only write end now: if it dies, even mid-batch, the
                    # consumer's read ends with EOFError instead of waiting forever.
                    writer.close()
            except BaseException:
                self.close()
                raise

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next batch.

        Raises:
            RuntimeError: the loader is closed.
            Exception: a worker's exception, re-raised with its traceback as ``__cause__``.
            DataLoaderWorkerError: a worker died silently or produced nothing for ``timeout_s``.
        """
        if self._closed:
            raise RuntimeError("this BatchLoader is closed")
        start = time.perf_counter()
        try:
            if self._producer is not None:
                arrays = self._producer.next()
            else:
                arrays = self._receive(self._index % self.workers)
        except BaseException:  # a worker's error, a timeout, KeyboardInterrupt: shut down, then raise
            self.close()
            raise
        self._index += 1
        batch = self._to_batch(arrays)
        batch.wait_s = time.perf_counter() - start  # conversion and pinning included
        return batch

    def _receive(self, worker: int) -> dict[str, Any]:
        reader, process = self._readers[worker], self._processes[worker]
        deadline = time.monotonic() + self.timeout_s
        try:
            while not reader.poll(_POLL_S):  # also True at EOF: a dead worker ends in recv()
                if not process.is_alive() and not reader.poll(0):
                    raise EOFError
                if time.monotonic() > deadline:
                    raise DataLoaderWorkerError(
                        f"data-loader worker {worker} (pid {process.pid}) produced no batch in "
                        f"{self.timeout_s:g} s; raise timeout_s if batches are legitimately this slow"
                    )
            kind, payload = reader.recv()
        except (EOFError, OSError):
            # The worker holds the only write end: EOF means it is gone, possibly mid-batch.
            process.join(timeout=1.0)
            raise DataLoaderWorkerError(
                f"data-loader worker {worker} (pid {process.pid}) exited unexpectedly with "
                f"{_describe_exit(process.exitcode)} and no error message"
            ) from None
        if kind == "batch":
            return payload
        raise _rebuild_exception(worker, process.pid, payload)

    def _to_batch(self, arrays: dict[str, Any]) -> Batch:
        import torch

        image = torch.from_numpy(arrays["image"])
        # int64 for CrossEntropyLoss / one-hot scatter; the worker ships int16 to keep pipes light.
        # Float targets (restoration's clean images) stay float32.
        target = [torch.from_numpy(t).long() if t.dtype.kind in "iub" else torch.from_numpy(t)
                  for t in arrays["target"]]
        if self.pin_memory:
            image = image.pin_memory()
            target = [t.pin_memory() for t in target]
        return Batch(image=image, target=target, case_ids=tuple(arrays["case_ids"]), wait_s=0.0)

    def close(self) -> None:
        """Stop and join the workers (terminating any that do not stop within a few seconds). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.workers:
            self._finalizer()

    @property
    def processes(self) -> tuple[multiprocessing.process.BaseProcess, ...]:
        """The worker processes (empty with ``workers=0``); for monitoring and tests."""
        return tuple(self._processes)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the finalizer's atexit hook covers the rest
            pass


# ----------------------------------------------------------------------------------------------
# Worker side


def _worker_main(
    worker: int, seed: int, producer_kwargs: dict[str, Any], writer: Connection, stop: Any, queue_size: int,
    producer_class: type = BatchProducer,
) -> None:
    """Produce batches until ``stop`` is set or the consumer is gone; report an exception once.

    The main thread produces into a bounded in-process queue; a sender thread writes to the pipe,
    so production continues while a batch is in transit. A closed pipe (consumer closed or died)
    ends the sender, which ends the worker.
    """
    # Ctrl-C reaches the whole process group; the consumer decides about shutdown, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox: queue_module.Queue[tuple[str, Any] | None] = queue_module.Queue(maxsize=queue_size)
    sender_done = threading.Event()

    def send() -> None:
        try:
            while True:
                item = outbox.get()
                if item is None:
                    return
                writer.send(item)
        except (OSError, ValueError):  # BrokenPipeError: the consumer closed its end
            return
        finally:
            sender_done.set()

    sender = threading.Thread(target=send, name="autoseg-loader-sender", daemon=True)
    sender.start()

    def put(item: tuple[str, Any] | None) -> bool:
        # Bounded wait: a worker whose consumer stopped or died must not block forever.
        while not sender_done.is_set():
            try:
                outbox.put(item, timeout=_POLL_S)
                return True
            except queue_module.Full:
                if stop.is_set():
                    return False
        return False

    try:
        producer = producer_class(seed_sequence=np.random.SeedSequence([seed, worker]), **producer_kwargs)
        while not stop.is_set() and put(("batch", producer.next())):
            pass
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the consumer
        if put(("error", _error_payload(exc))) and put(None):
            # Deliver the error before exiting; a consumer that is closing breaks the pipe instead.
            while not sender_done.wait(_POLL_S) and not stop.is_set():
                pass
    finally:
        writer.close()


def _error_payload(exc: BaseException) -> dict[str, Any]:
    text = traceback.format_exc()
    try:
        pickled: bytes | None = pickle.dumps(exc)
        pickle.loads(pickled)  # some exceptions pickle but cannot be re-created
    except Exception:  # noqa: BLE001
        pickled = None
    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
            "traceback": text, "pickled": pickled}


def _rebuild_exception(worker: int, pid: int | None, payload: dict[str, Any]) -> BaseException:
    cause = RemoteTraceback(payload["traceback"])
    exc: BaseException | None = None
    if payload["pickled"] is not None:
        try:
            exc = pickle.loads(payload["pickled"])
        except Exception:  # noqa: BLE001 - e.g. the class is not importable here
            exc = None
    if exc is None:
        exc = DataLoaderWorkerError(f"{payload['type']}: {payload['message']}")
    exc.__cause__ = cause
    exc.add_note(f"(raised in data-loader worker {worker}, pid {pid}; its traceback is shown above)")
    return exc


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"{name}{hint}"
    return f"exit code {code}"


def _shutdown(processes: list[Any], readers: list[Connection], stop: Any) -> None:
    """Stop workers: signal, close the pipes (unblocks a sending worker), join, terminate, kill."""
    if stop is not None:
        stop.set()
    for reader in readers:
        reader.close()
    # A worker checks ``stop`` between batches; one still busy after 1 s is terminated (it shares
    # nothing but its pipe, which is already closed, so killing it mid-batch loses nothing).
    deadline = time.monotonic() + 1.0
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(deadline - time.monotonic(), 0.01))
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.terminate()
            process.join(timeout=2.0)
        if process.pid is not None and process.is_alive():
            process.kill()
            process.join(timeout=2.0)


__all__ = ["Batch", "BatchLoader", "BatchProducer", "DataLoaderWorkerError", "RemoteTraceback"]
