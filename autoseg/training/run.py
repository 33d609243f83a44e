"""The ``train`` stage: resolve plans, splits and preprocessed data, then train the requested folds."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from autoseg import crossval
from autoseg import plans as plans_io
from autoseg.distributed import ChildContext, DistContext, Event, Launch
from autoseg.errors import ConfigError, DatasetError
from autoseg.planning.run import WorkPaths
from autoseg.training.config import TrainConfig
from autoseg.training.trainer import (
    Callbacks,
    FoldPaths,
    FoldSetup,
    TrainState,
    train_fold,
)

#: Configurations that train on another configuration's preprocessed data.
DATA_OF = {"3d_cascade_fullres": "3d_fullres"}


@dataclass(frozen=True)
class FoldResult:
    fold: int
    state: TrainState
    folder: Path


def fold_folder(work: Path, configuration: str, fold: int) -> Path:
    return Path(work) / "models" / configuration / f"fold_{fold}"


def parse_folds(text: str, num_folds: int) -> list[int]:
    """``"0"``, ``"0,2"`` or ``"all"`` -> fold indices.

    Raises:
        ConfigError: not a fold number, or out of range.
    """
    if text.strip().lower() == "all":
        return list(range(num_folds))
    folds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(f"-f {text!r}: expected a fold number (0..{num_folds - 1}), a comma list, or 'all'")
        folds.append(int(part))
    for fold in folds:
        if fold >= num_folds:
            raise ConfigError(f"-f {fold}: the splits have folds 0..{num_folds - 1}")
    return folds


def case_ids_of(work: Path) -> list[str]:
    """The experiment's case ids (WORK/dataset.json, written by ``autoseg plan``)."""
    path = WorkPaths(Path(work)).dataset_json
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run 'autoseg plan RAW -o {work}' first")
    return sorted(json.loads(path.read_text(encoding="utf-8"))["cases"])


#: The validation may take at most this share of a ``train --time-budget``; beyond it the fold
#: overruns the budget, and says so before training.
MAX_RESERVE_SHARE = 0.8


def validation_reserve(plans: plans_io.Plans, configuration: str, cases: int, device: str,
                       share: float = 1.0) -> float | None:
    """Seconds a fold's validation is estimated to take (:func:`autoseg.planning.budget.validation_seconds`):
    on the rates plans.yaml was planned for (``autoseg plan --time-budget``), else on this
    machine's cached rate times ``share`` (the share of the machine one process gets). None under
    torchrun without planned rates: each node would measure its own and the ranks' budgets differ."""
    from autoseg.distributed import from_torchrun_env
    from autoseg.planning.budget import validation_seconds
    from autoseg.planning.compute import Throughput, config_cost

    if plans.throughput_gflops is not None:
        rates = Throughput(*plans.throughput_gflops, "planned", "plans.yaml")
    elif from_torchrun_env() is not None:
        return None
    else:
        from autoseg.device import resolve_device
        from autoseg.networks.throughput import machine_rates

        train, infer, key, source = machine_rates("cuda" if resolve_device(device).type == "cuda" else "cpu")
        rates = Throughput(train * share, infer * share, key, source)
    config = plans.configurations[configuration]
    seconds = validation_seconds(config, config_cost(config, plans.num_classes, rates), cases)
    if config.previous_stage:
        # A cascade stage's validation predicts every case with the previous stage first.
        previous = plans.configurations[config.previous_stage]
        seconds += validation_seconds(previous, config_cost(previous, plans.num_classes, rates), cases)
    return seconds


def run(
    work: Path,
    configuration: str,
    folds: str,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    splits_file: Path | None = None,
    callbacks_for: Callable[[int], Callbacks] | None = None,
    on_preprocess: Callable[[str], None] | None = None,
    validate: bool = True,
    validate_only: bool = False,
    on_validated: Callable[[int, dict], None] | None = None,
    launch: Launch | None = None,
    on_budget: Callable[[str], None] | None = None,
    on_previous: Callable[[int, int], None] | None = None,
) -> list[FoldResult]:
    """Train ``folds`` of ``configuration`` in ``work``, then validate each fold in full.

    With a time budget (``cfg.time_budget_s``) and validation, the budget covers both: the
    validation's duration is estimated by the compute model (:func:`validation_reserve`) and the
    training gets the rest (``on_budget`` is told how the budget is split).

    Preprocesses the configuration first if that was not done (``on_preprocess`` is told). After
    training, the fold's validation cases are predicted from the raw images with the predictor
    and scored into ``fold_<k>/metrics.json`` (``validate=False`` skips it; ``validate_only``
    redoes only that, from ``checkpoint_final.pt``). A cascade stage first brings the previous
    stage's cross-validation segmentations onto its grid (``on_previous(done, total)`` over the cases).

    ``launch`` (see :func:`autoseg.distributed.resolve_launch`) trains each fold with DDP
    over several processes, or several folds at once, one per process. Started by ``torchrun``
    (``WORLD_SIZE`` > 1 in the environment), this process is one rank of a DDP run.

    Raises:
        PlanError / DatasetError / ConfigError: missing plans, unknown configuration, bad splits.
    """
    work = Path(work)
    plans = plans_io.load(WorkPaths(work).plans)
    plans.configuration(configuration)  # raises with a did-you-mean for an unknown name
    if not validate_only:  # --precision bf16 without bf16 units: said before any work
        from autoseg.device import resolve_device
        from autoseg.training.precision import step_dtype

        step_dtype(resolve_device(launch.devices[0] if launch is not None and launch.devices else cfg.device), cfg,
                   plans.task)
    data_config = DATA_OF.get(configuration, configuration)
    data_folder = work / "preprocessed" / data_config
    case_ids = case_ids_of(work)
    if not _preprocessed(data_folder, case_ids, plans, data_config):
        from autoseg.distributed import from_torchrun_env

        if from_torchrun_env() is not None:
            # Every rank would preprocess the same folder at once.
            raise ConfigError(f"{data_folder}: not preprocessed; under torchrun run "
                              f"'autoseg preprocess {work} -c {data_config}' once before starting the job")
        from autoseg.preprocessing import run as preprocessing

        if on_preprocess:
            on_preprocess(data_config)
        preprocessing.run(work, [data_config], cfg.workers, None)
    splits = crossval.load_or_create(work, case_ids, splits_file)
    if plans.configurations[configuration].previous_stage and not validate_only:
        from autoseg.training.cascade import prepare_previous

        fold_ids = parse_folds(folds, len(splits))
        used = sorted({c for f in fold_ids for part in crossval.fold_cases(splits, f).values() for c in part})
        prepare_previous(work, plans, configuration, splits, used, on_previous)
    if cfg.time_budget_s is not None and validate and not validate_only:
        cfg = _reserve_validation(plans, configuration, folds, splits, cfg, launch, on_budget or (lambda line: None))
    from autoseg import distributed

    torchrun = distributed.from_torchrun_env()
    if torchrun is not None and validate_only and not torchrun.is_main:
        return []  # under torchrun, rank 0 alone redoes the validation
    if torchrun is not None and not validate_only:
        return _run_torchrun(work, plans, configuration, parse_folds(folds, len(splits)), splits, cfg, torchrun,
                             resume=resume, callbacks_for=callbacks_for, validate=validate, on_validated=on_validated)
    if launch is not None and launch.mode != "single" and not validate_only:
        return _run_launched(work, configuration, parse_folds(folds, len(splits)), splits, cfg, launch,
                             resume=resume, callbacks_for=callbacks_for, validate=validate, on_validated=on_validated)
    if launch is not None:
        cfg = distributed.replace_device(cfg, launch.devices[0])
    results = []
    if validate_only:
        from autoseg.training.validation import validate_fold

        for fold in parse_folds(folds, len(splits)):
            callbacks = callbacks_for(fold) if callbacks_for else Callbacks()
            metrics = validate_fold(work, configuration, fold, "final", cfg.device, progress=callbacks.on_validation)
            if on_validated:
                on_validated(fold, metrics)
            results.append(FoldResult(fold, TrainState(), fold_folder(work, configuration, fold)))
        return results
    for fold in parse_folds(folds, len(splits)):
        setup = fold_setup(work, plans, configuration, fold, splits)
        callbacks = callbacks_for(fold) if callbacks_for else None
        state = train_fold(setup, cfg, resume=resume, callbacks=callbacks)
        if validate:
            from autoseg.training.validation import validate_fold

            metrics = validate_fold(work, configuration, fold, "final", cfg.device,
                                    progress=callbacks.on_validation if callbacks else None)
            if on_validated:
                on_validated(fold, metrics)
        results.append(FoldResult(fold, state, setup.paths.root))
    return results


def fold_setup(work: Path, plans: plans_io.Plans, configuration: str, fold: int, splits: list) -> FoldSetup:
    """One fold's training and validation cases (memory-mapped, as the plans' task reads them) and its folder."""
    from autoseg.tasks import task_of

    data_folder = Path(work) / "preprocessed" / DATA_OF.get(configuration, configuration)
    split = crossval.fold_cases(splits, fold)
    task = task_of(plans, configuration)
    train_cases = task.load_training_cases(data_folder, split["train"])
    val_cases = task.load_training_cases(data_folder, split["val"])
    if plans.configuration(configuration).previous_stage:
        # A cascade stage: each case with the previous stage's cross-validation segmentation
        # (prepared by run() before any fold starts, see autoseg.training.cascade).
        from autoseg.training.cascade import previous_folder, with_previous

        folder = previous_folder(work, configuration)
        train_cases, val_cases = with_previous(train_cases, folder, plans), with_previous(val_cases, folder, plans)
    return FoldSetup(
        plans=plans, configuration=configuration, fold=fold, train_cases=train_cases, val_cases=val_cases,
        paths=FoldPaths(fold_folder(work, configuration, fold)),
    )


# ----------------------------------------------------------------------------------------------
# Several processes


@dataclass(frozen=True)
class _Job:
    """What a child process needs to train folds (small and picklable; it reloads the plans)."""

    work: Path
    configuration: str
    folds: tuple[int, ...]
    splits: list
    cfg: TrainConfig
    resume: bool
    validate: bool


def _event_callbacks(child: ChildContext, fold: int) -> Callbacks:
    """Callbacks that post progress events to the launching process."""
    return Callbacks(
        on_epoch_start=lambda epoch, iters: child.post(Event(fold, "epoch_start", (epoch, iters))),
        on_iteration=lambda it, loss: child.post(Event(fold, "iteration", (it, loss))),
        on_epoch_end=lambda record: child.post(Event(fold, "epoch_end", (record,))),
        on_validation=lambda done, total: child.post(Event(fold, "validation", (done, total))),
    )


def _dispatcher(callbacks_for: Callable[[int], Callbacks] | None,
                on_validated: Callable[[int, dict], None] | None) -> Callable[[Event], None]:
    """Route children's events to this process's per-fold callbacks."""
    made: dict[int, Callbacks] = {}

    def on_event(event: Event) -> None:
        if event.name == "validated":
            if on_validated:
                on_validated(event.fold, event.args[0])
            return
        if callbacks_for is None:
            return
        if event.fold not in made:
            made[event.fold] = callbacks_for(event.fold)
        callbacks = made[event.fold]
        {"epoch_start": callbacks.on_epoch_start, "iteration": callbacks.on_iteration,
         "epoch_end": callbacks.on_epoch_end, "validation": callbacks.on_validation}[event.name](*event.args)

    return on_event


def _train_child(child: ChildContext, job: _Job) -> list[tuple[int, TrainState]]:
    """Runs in a spawned process: this rank's share of a DDP fold, or whole folds (``--folds-parallel``)."""
    from autoseg import distributed

    plans = plans_io.load(WorkPaths(job.work).plans)
    cfg = distributed.replace_device(job.cfg, child.device)
    states = []
    for fold in job.folds:
        setup = fold_setup(job.work, plans, job.configuration, fold, job.splits)
        callbacks = _event_callbacks(child, fold)
        state = train_fold(setup, cfg, resume=job.resume, callbacks=callbacks, dist=child.dist)
        if job.validate and not child.dist.enabled:
            from autoseg.training.validation import validate_fold

            metrics = validate_fold(job.work, job.configuration, fold, "final", child.device,
                                    progress=callbacks.on_validation)
            child.post(Event(fold, "validated", (metrics,)))
        states.append((fold, state))
    return states


def _run_launched(work: Path, configuration: str, folds: list[int], splits: list, cfg: TrainConfig,
                  launch: Launch, *, resume: bool, callbacks_for: Callable[[int], Callbacks] | None,
                  validate: bool, on_validated: Callable[[int, dict], None] | None) -> list[FoldResult]:
    """Folds in parallel (one per process), or each fold with DDP over every process."""
    from autoseg import distributed

    on_event = _dispatcher(callbacks_for, on_validated)
    results: list[FoldResult] = []
    if launch.mode == "folds":
        # Round robin: process p trains folds p, p + N, ...; never more processes than folds.
        count = min(launch.processes, len(folds))
        jobs = [_Job(work, configuration, tuple(folds[p::launch.processes]), splits, cfg, resume, validate)
                for p in range(count)]
        used = Launch(launch.mode, launch.devices[:count], launch.backend)
        for states in distributed.launch(_train_child, jobs, used, on_event=on_event, join_group=False):
            results += [FoldResult(fold, state, fold_folder(work, configuration, fold)) for fold, state in states]
        return sorted(results, key=lambda r: r.fold)
    for fold in folds:
        job = _Job(work, configuration, (fold,), splits, cfg, resume, validate)
        per_rank = distributed.launch(_train_child, [job] * launch.processes, launch, on_event=on_event)
        _, state = per_rank[0][0]
        if validate:
            from autoseg.training.validation import validate_fold

            def validating(done: int, total: int, fold: int = fold) -> None:
                on_event(Event(fold, "validation", (done, total)))  # to the fold's callbacks, like the ranks' events

            metrics = validate_fold(work, configuration, fold, "final", launch.devices[0], progress=validating)
            on_event(Event(fold, "validated", (metrics,)))
        results.append(FoldResult(fold, state, fold_folder(work, configuration, fold)))
    return results


def _run_torchrun(work: Path, plans: plans_io.Plans, configuration: str, folds: list[int], splits: list,
                  cfg: TrainConfig, ctx: DistContext, *, resume: bool,
                  callbacks_for: Callable[[int], Callbacks] | None, validate: bool,
                  on_validated: Callable[[int, dict], None] | None) -> list[FoldResult]:
    """This process is one rank of a ``torchrun`` job: join its group, train; rank 0 then validates."""
    import torch

    from autoseg import distributed

    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        cfg = distributed.replace_device(cfg, f"cuda:{ctx.local_rank}")
    distributed.init_process_group(ctx, "nccl" if use_cuda else "gloo")
    results = []
    callbacks_of: dict[int, Callbacks] = {}  # the fold's validation reports to its training's callbacks
    for fold in folds:
        setup = fold_setup(work, plans, configuration, fold, splits)
        callbacks = callbacks_of[fold] = callbacks_for(fold) if (callbacks_for and ctx.is_main) else Callbacks()
        state = train_fold(setup, cfg, resume=resume, callbacks=callbacks, dist=ctx)
        results.append(FoldResult(fold, state, setup.paths.root))
    # Only after success: on an error, destroying an NCCL group can wait forever for peers stuck in
    # a collective; the exception ends this process and torchrun stops the others.
    distributed.destroy_process_group()
    if validate and ctx.is_main:
        from autoseg.training.validation import validate_fold

        for result in results:
            metrics = validate_fold(work, configuration, result.fold, "final", cfg.device,
                                    progress=callbacks_of[result.fold].on_validation)
            if on_validated:
                on_validated(result.fold, metrics)
    return results


def _reserve_validation(plans: plans_io.Plans, configuration: str, folds: str, splits: list, cfg: TrainConfig,
                        launch: Launch | None, say: Callable[[str], None]) -> TrainConfig:
    """``cfg`` with the fold's estimated validation taken out of its time budget (said in a line)."""
    assert cfg.time_budget_s is not None
    budget = cfg.time_budget_s
    cases = max(len(splits[f]["val"]) for f in parse_folds(folds, len(splits)))
    # Folds trained side by side on the CPU share its cores, so each validates that much slower.
    share = 1.0 / launch.processes if launch is not None and launch.mode == "folds" and \
        all(d == "cpu" for d in launch.devices) else 1.0
    estimate = validation_reserve(plans, configuration, cases, cfg.device, share)
    if estimate is None:
        say(f"time budget {budget / 60:.1f} min per fold covers training only under torchrun (the plan records no "
            "throughput to estimate the validation on every rank alike: autoseg plan --time-budget)")
        return cfg
    reserve = min(estimate, MAX_RESERVE_SHARE * budget)
    say(f"time budget {budget / 60:.1f} min per fold: {(budget - reserve) / 60:.1f} min training, "
        f"~{reserve / 60:.1f} min reserved for validating {cases} case(s) with TTA")
    if estimate > reserve:
        say(f"warning: validating {cases} case(s) is estimated at {estimate / 60:.1f} min, more than the budget "
            f"allows: the fold will take about {(budget - reserve + estimate) / 60:.1f} min; train with --no-validate "
            "and validate later (--validate-only), or give a larger budget")
    return replace(cfg, time_budget_s=budget - reserve)


def _preprocessed(folder: Path, case_ids: list[str], plans: plans_io.Plans, data_config: str) -> bool:
    """Every case preprocessed with the current plan (a re-plan, e.g. with ``--time-budget``, that
    changed the spacing or patch makes the folder stale: it is preprocessed again)."""
    from autoseg.preprocessing.pipeline import plan_digest
    from autoseg.preprocessing.run import is_finished

    if not folder.is_dir():
        return False
    digest = plan_digest(plans, data_config)
    return all(is_finished(folder, case_id, digest) for case_id in case_ids)
