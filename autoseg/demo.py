"""``autoseg demo``: the whole pipeline on the bundled MSD Hippocampus example, in minutes on a CPU.

Every step calls the real stage (``experiment.plan_dataset``, ``preprocessing.run``,
``training.run``, ``predict.run``, ``evaluate.run``); this module only chooses their inputs and
holds some cases out of training, so that the Dice it reports is measured on unseen images::

    OUT/demo.json          the demo's options and results (marks OUT as a demo folder)
    OUT/raw/               training dataset (MSD layout): the bundled cases minus the held-out ones
    OUT/test/images/       held-out images ({case}_0000.nii.gz), never seen by planning or training
    OUT/test/labels/       their reference labels
    OUT/work               the experiment folder (plans, preprocessed data, models/3d_fullres/fold_0)
    OUT/predictions/       label maps of the held-out cases
    OUT/evaluation.json    Dice, IoU, HD95, NSD per held-out case and label (+ evaluation.csv)
    OUT/overlays/<case>.png  axial slices with the reference and predicted contours
    OUT/progress.png       the training curves

Rerunning into the same OUT with the same options reuses finished work: the stages detect it
themselves (fingerprint cache, finished preprocessed cases, ``--continue`` for predictions), and a
fold with ``checkpoint_final.pt`` is not trained again (one with only ``checkpoint_latest.pt`` is
resumed). Other options are refused unless ``force``, which first deletes the demo's own outputs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.atomic import atomic_path, write_json
from autoseg.errors import ConfigError, PlanError

if TYPE_CHECKING:
    from autoseg.evaluation.evaluate import EvaluationReport
    from autoseg.inference.run import PredictCallbacks
    from autoseg.plans import Configuration, Plans
    from autoseg.training.config import TrainConfig
    from autoseg.training.trainer import Callbacks

ProgressFn = Callable[[int, int], None]

EXAMPLE = "hippocampus"
PLANNER = "cpu"
CONFIGURATION = "3d_fullres"
FOLD = 0
#: Every 4th case (from the third) is held out: 6 of the 24 bundled cases.
TEST_START, TEST_STEP = 2, 4
#: Every 9th remaining case gives the trainer's per-epoch pseudo-Dice (2 of 18); the rest train.
VAL_STEP = 9
#: Training budget: 7 of the ≤ 10 min demo on 2 CPU cores (the other stages take ~1 min). Measured
#: on a 2-core machine shared with other jobs (load 3-4): 5 min gave 202 iterations and mean Dice
#: 0.755 on the held-out cases, too close to the 0.75 the demo promises.
DEFAULT_TIME_BUDGET_S = 420.0
RECORD_SCHEMA_VERSION = 1
#: What ``force`` deletes: only the names a demo writes (this one or ``autoseg demo denoise``), never
#: anything else in OUT.
_OWNED = ("raw", "test", "work", "predictions", "overlays", "evaluation.json", "evaluation.csv", "progress.png",
          "demo.json", "full_dose", "panels")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's options (recorded in ``OUT/demo.json``; a rerun must match them or use force).

    Attributes:
        time_budget_s: training wall-clock budget in seconds.
        seed: seeds the network initialisation and the training batches.
        cases: how many of the bundled cases to use (tests use fewer), in sorted order.
    """

    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    seed: int = 12345
    cases: int = 24

    def __post_init__(self) -> None:
        if not 4 <= self.cases <= 24:
            raise ConfigError(f"--cases {self.cases}: choose between 4 and 24 bundled cases")

    def describe(self) -> str:
        return f"--time-budget {self.time_budget_s:g}s --seed {self.seed}" + \
            (f" --cases {self.cases}" if self.cases != 24 else "")


@dataclass(frozen=True)
class DemoPaths:
    """Everything the demo writes under ``OUT``."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / "demo.json"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def test_images(self) -> Path:
        return self.root / "test" / "images"

    @property
    def test_labels(self) -> Path:
        return self.root / "test" / "labels"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def report(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def progress_png(self) -> Path:
        return self.root / "progress.png"


def _no_progress(description: str) -> AbstractContextManager[ProgressFn | None]:
    return contextlib.nullcontext(None)


@dataclass
class DemoHooks:
    """How the caller (the CLI) shows progress; the defaults show nothing.

    Attributes:
        note: one line of plain text after each stage.
        progress: ``progress(description)`` -> context yielding a ``progress(done, total)`` callback.
        training: context yielding ``callbacks_for(fold)`` for :func:`autoseg.training.run.run`.
        predicting: context yielding :class:`autoseg.inference.run.PredictCallbacks`.
    """

    note: Callable[[str], None] = lambda text: None
    progress: Callable[[str], AbstractContextManager[ProgressFn | None]] = _no_progress
    training: Callable[[], AbstractContextManager[Callable[[int], Callbacks] | None]] = \
        lambda: contextlib.nullcontext(None)
    predicting: Callable[[], AbstractContextManager[PredictCallbacks | None]] = lambda: contextlib.nullcontext(None)


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it wrote it.

    Attributes:
        paths: the output folders.
        labels: the foreground label names, in order.
        dice: case -> label -> Dice on the held-out cases (None: the label is absent from both
            prediction and reference, left out as in ``autoseg evaluate``'s means).
        case_mean: case -> mean Dice over the labels scored in that case (None: none is).
        mean_dice: mean foreground Dice over the held-out cases (nnU-Net's foreground mean).
        overlays: the PNG files written.
        seconds: wall time per stage.
        outputs: (what, where) pairs, in the order a reader wants them.
    """

    paths: DemoPaths
    labels: list[str]
    dice: dict[str, dict[str, float | None]]
    case_mean: dict[str, float | None]
    mean_dice: float | None
    overlays: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: list[tuple[str, Path]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The bundled example and the held-out split (torch-free)


@contextlib.contextmanager
def example_root() -> Iterator[Path]:
    """The bundled example's folder on disk (extracted if autoseg is installed zipped)."""
    from importlib import resources

    with resources.as_file(resources.files("autoseg.examples").joinpath(EXAMPLE)) as root:
        yield Path(root)


def case_id_of(entry: dict[str, str]) -> str:
    """``./imagesTr/hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    from autoseg.imageio import strip_ending

    return strip_ending(Path(entry["image"]).name)[0]


def split_cases(case_ids: list[str], count: int) -> tuple[list[str], list[str], list[str]]:
    """The first ``count`` sorted case ids as (train, validation, test).

    Test: every :data:`TEST_STEP`-th case from :data:`TEST_START`; validation (the trainer's
    pseudo-Dice): every :data:`VAL_STEP`-th of the rest; train: the others.

    Raises:
        ConfigError: ``count`` leaves no case to train, validate or test.
    """
    ids = sorted(case_ids)[:count]
    if count < 4 or len(ids) < count:
        raise ConfigError(f"--cases {count}: choose between 4 and {len(case_ids)} bundled cases")
    test = ids[TEST_START::TEST_STEP]
    rest = [i for i in ids if i not in test]
    val = rest[::VAL_STEP]
    train = [i for i in rest if i not in val]
    return train, val, test


def _copy(source: Path, target: Path) -> bool:
    """Copy a file atomically unless an identical-size copy exists (keeps its mtime, so the
    fingerprint cache stays valid). Returns whether it copied."""
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return False
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return True


def write_json_if_changed(path: Path, data: Any) -> None:
    try:
        if json.loads(path.read_text(encoding="utf-8")) == data:
            return
    except (OSError, ValueError):
        pass
    write_json(path, data)


def materialise(paths: DemoPaths, settings: DemoSettings) -> tuple[list[str], list[str], list[str]]:
    """Write the training dataset (``OUT/raw``, MSD layout) and the held-out cases (``OUT/test``).

    Returns:
        The (train, validation, test) case ids.
    """
    with example_root() as source:
        meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
        entries = {case_id_of(e): e for e in meta["training"]}
        train, val, test = split_cases(list(entries), settings.cases)
        kept = sorted(train + val)
        for case_id in kept:
            for key in ("image", "label"):
                relative = Path(entries[case_id][key])
                _copy(source / relative, paths.raw / relative)
        for case_id in test:
            _copy(source / entries[case_id]["image"], paths.test_images / f"{case_id}_0000.nii.gz")
            _copy(source / entries[case_id]["label"], paths.test_labels / f"{case_id}.nii.gz")
    raw_meta = {**meta, "training": [entries[c] for c in kept], "numTraining": len(kept),
                "description": f"{meta.get('description', '')} (autoseg demo: {len(test)} case(s) held out)"}
    write_json_if_changed(paths.raw / "dataset.json", raw_meta)
    return train, val, test


# ----------------------------------------------------------------------------------------------
# The record: OUT/demo.json


def _read_record(paths: DemoPaths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Only a record the demo wrote marks OUT as a demo folder (--force deletes in it).
    if not isinstance(data, dict) or data.get("schema_version") != RECORD_SCHEMA_VERSION \
            or not isinstance(data.get("settings"), dict):
        return None
    return data


def prepare(out: Path, settings: Any, force: bool = False, *, name: str = EXAMPLE) -> DemoPaths:
    """Make ``OUT`` ready: new, or an earlier run of demo ``name`` with the same options (reused),
    or forced clean.

    Args:
        out: the demo's folder.
        settings: the demo's options, a dataclass with ``describe()`` (recorded in ``demo.json``).
        force: delete the demo outputs found in ``out`` first.
        name: which demo (``hippocampus`` or ``denoise``); recorded, so one never reuses the other's folder.

    Raises:
        ConfigError: OUT is a file or a non-empty folder that is not a demo folder, or an earlier
            demo there was another one or used other options, and ``force`` is not set.
    """
    paths = DemoPaths(Path(out))
    root = paths.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root}: exists and is not a folder; choose a new folder")
    if root.is_dir() and any(root.iterdir()):
        record = _read_record(paths)
        if record is None:
            raise ConfigError(f"--out {root}: folder is not empty and holds no demo.json from an earlier demo; "
                              "choose a new or empty folder")
        earlier = record.get("demo", EXAMPLE)
        if force:
            _remove_owned(paths)
        elif earlier != name:
            raise ConfigError(f"--out {root}: 'autoseg demo {earlier}' ran there; choose another --out for "
                              f"'autoseg demo {name}', or add --force to delete the earlier demo's outputs")
        elif record.get("settings") != asdict(settings):
            try:
                was = f" with {type(settings)(**record['settings']).describe()}"
            except (TypeError, ConfigError):
                was = ""
            raise ConfigError(f"--out {root}: an earlier demo ran there{was}; rerun with the same options to "
                              "reuse its finished stages, add --force to delete its outputs and start over, "
                              "or choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    if _read_record(paths) is None:
        write_json(paths.record, {"schema_version": RECORD_SCHEMA_VERSION, "demo": name,
                                  "settings": asdict(settings), "status": "started"})
    return paths


def _remove_owned(paths: DemoPaths) -> None:
    from autoseg.atomic import TMP_PREFIX

    # An interrupted atomic write (a killed run) leaves its temporary folder or file beside the output.
    for stale in paths.root.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    for name in _OWNED:
        target = paths.root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


# ----------------------------------------------------------------------------------------------
# The stages (each one the real stage function)


def plan(paths: DemoPaths, progress: ProgressFn | None) -> tuple[str, bool]:
    """Check, fingerprint and plan ``OUT/raw`` into ``OUT/work`` with the cpu preset.

    Returns:
        A one-line summary, and whether the fingerprint was reused.

    Raises:
        DatasetError: the dataset has errors; PlanError: no 3d_fullres configuration was planned.
    """
    from autoseg.planning import run as experiment

    report, _, plans, reused = experiment.plan_dataset(paths.raw, paths.work, PLANNER, None, None, progress)
    config = planned_configuration(paths, plans, PLANNER, CONFIGURATION)
    n_cases = len(report.spec.cases) if report.spec else 0
    return (f"check: {n_cases} training case(s), {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            f"{' (fingerprint reused)' if reused else ''}; plan ({PLANNER} preset): {CONFIGURATION} patch "
            f"{patch_text(config)}, batch {config.batch_size}, {config.topology.num_stages} stages"), reused


def planned_configuration(paths: DemoPaths, plans: Plans, planner: str, configuration: str) -> Configuration:
    """The demo's configuration in the plans just made.

    Raises:
        PlanError: the preset planned no such configuration (the fix: start the demo afresh).
    """
    if configuration not in plans.configurations:
        raise PlanError(f"{paths.work / 'plans.yaml'}: the {planner} preset planned no {configuration}; "
                        "delete OUT and run the demo again")
    return plans.configurations[configuration]


def patch_text(config: Configuration) -> str:
    """``40 × 56 × 40``."""
    return " × ".join(str(p) for p in config.patch_size)


def preprocess(paths: DemoPaths, progress: ProgressFn | None) -> str:
    """Preprocess the training cases for 3d_fullres; returns a one-line summary."""
    from autoseg.preprocessing import run as preprocessing

    summary = preprocessing.run(paths.work, [CONFIGURATION], None, progress).configs[CONFIGURATION]
    return (f"preprocess: {summary.cases} case(s), {summary.processed} processed, {summary.reused} already done "
            f"→ {summary.folder}")


def train_config(settings: Any, device: str) -> TrainConfig:
    """The training options: those of ``autoseg train --time-budget`` (epochs bounded by the budget
    and sized from the measured step time; AdamW, see ``TrainConfig.optimizer``).

    Raises:
        ConfigError: a non-positive budget or an unknown device name.
    """
    from autoseg.training.config import TrainConfig

    return TrainConfig(epochs=10**6, iters_per_epoch=None, time_budget_s=settings.time_budget_s, device=device,
                       seed=settings.seed)


def train(paths: DemoPaths, cfg: TrainConfig, train_ids: list[str], val_ids: list[str],
          callbacks_for: Callable[[int], Callbacks] | None) -> str:
    """Train fold 0 of 3d_fullres on the training cases within the budget; returns a summary line.

    A fold that has ``checkpoint_final.pt`` is reused; one with only ``checkpoint_latest.pt``
    (an interrupted run) is resumed. The full fold validation is skipped: the held-out test
    cases are the demo's evaluation.
    """
    done = train_fold(paths, cfg, CONFIGURATION, train_ids, val_ids, callbacks_for)
    if done.reused:
        return f"train: {done.root / 'checkpoint_final.pt'} exists (trained by an earlier run): reused"
    return (f"train: {len(train_ids)} case(s), {done.epochs} epoch(s), {done.iterations} iteration(s)"
            f"{' (resumed)' if done.resumed else ''}, pseudo-Dice on {len(val_ids)} validation case(s) "
            f"{done.last_metric:.3f} → {done.root}")


@dataclass(frozen=True)
class TrainedFold:
    """What :func:`train_fold` did: its folder, and unless a final checkpoint was reused, the run's figures.

    Attributes:
        root: the fold's folder.
        reused: a final checkpoint was there already; nothing was trained.
        resumed: training continued from ``checkpoint_latest.pt``.
        epochs, iterations: of the whole training (0 when reused).
        last_metric: the last epoch's validation metric (pseudo-Dice, or PSNR for restoration; NaN if none).
    """

    root: Path
    reused: bool
    resumed: bool = False
    epochs: int = 0
    iterations: int = 0
    last_metric: float = float("nan")


def train_fold(paths: DemoPaths, cfg: TrainConfig, configuration: str, train_ids: list[str], val_ids: list[str],
               callbacks_for: Callable[[int], Callbacks] | None) -> TrainedFold:
    """Fold :data:`FOLD` of ``configuration`` on the given split, without the full fold validation:
    reused when ``checkpoint_final.pt`` exists, resumed when only ``checkpoint_latest.pt`` does."""
    from autoseg.training import run as training
    from autoseg.training.trainer import FoldPaths

    write_json_if_changed(paths.work / "splits.json", [{"train": sorted(train_ids), "val": sorted(val_ids)}])
    fold = FoldPaths(training.fold_folder(paths.work, configuration, FOLD))
    if fold.final.is_file():
        return TrainedFold(fold.root, reused=True)
    resume = fold.latest.is_file()
    results = training.run(paths.work, configuration, str(FOLD), cfg, resume=resume, callbacks_for=callbacks_for,
                           validate=False)
    state = results[0].state
    last = state.history[-1] if state.history else {}
    return TrainedFold(fold.root, False, resume, state.epoch, sum(int(r.get("iters", 0)) for r in state.history),
                       float(last.get("mean_fg_dice", float("nan"))))


def predict(paths: DemoPaths, device: str, callbacks: PredictCallbacks | None) -> str:
    """Predict the held-out images (mirroring TTA); label maps already written are kept."""
    from autoseg.inference import run as predictor

    summary = predictor.run(paths.work, [paths.test_images], paths.predictions, [CONFIGURATION], [FOLD], "final",
                            device=device, resume=True, callbacks=callbacks)
    done = f", {len(summary.skipped)} already done" if summary.skipped else ""
    where = f" on {summary.device} in {summary.seconds:.1f} s" if summary.written else ""
    return f"predict: {len(summary.written)} held-out case(s) predicted{where}{done} → {paths.predictions}"


def evaluate(paths: DemoPaths, progress: ProgressFn | None) -> EvaluationReport:
    """Score the predictions against the held-out references -> ``OUT/evaluation.json`` and ``.csv``."""
    from autoseg.evaluation import evaluate as evaluation

    return evaluation.run(paths.predictions, paths.test_labels, paths.raw / "dataset.json", paths.report,
                          progress=progress)


def draw_overlays(paths: DemoPaths, case_mean: dict[str, float | None],
                  progress: ProgressFn | None) -> list[Path]:
    """One PNG per held-out case: axial slices with reference and predicted contours."""
    from autoseg.overlay import write_case_overlay

    written = []
    for index, case_id in enumerate(sorted(case_mean)):
        dice = case_mean[case_id]
        title = f"{case_id}: mean Dice {'-' if dice is None else f'{dice:.3f}'}"
        target = paths.overlays / f"{case_id}.png"
        write_case_overlay(target, paths.test_images / f"{case_id}_0000.nii.gz",
                           paths.test_labels / f"{case_id}.nii.gz", paths.predictions / f"{case_id}.nii.gz", title)
        written.append(target)
        if progress:
            progress(index + 1, len(case_mean))
    return written


def copy_progress_png(paths: DemoPaths, configuration: str = CONFIGURATION) -> Path | None:
    source = paths.work / "models" / configuration / f"fold_{FOLD}" / "progress.png"
    if not source.is_file():
        return None
    with atomic_path(paths.progress_png) as tmp:
        shutil.copyfile(source, tmp)
    return paths.progress_png


def _dice_of(report: EvaluationReport) -> tuple[list[str], dict[str, dict[str, float | None]], dict[str, float | None]]:
    from autoseg.metrics import is_both_empty

    labels = [name for name in report.labels if name in next(iter(report.cases.values()), {})]
    # A label absent from both prediction and reference is not scored (None), as the summary's
    # mean leaves it out: a case mean of 1.0 from absences alone would contradict the table's total.
    dice = {case: {name: None if is_both_empty(metrics[name]) else metrics[name].get("dice") for name in labels}
            for case, metrics in report.cases.items()}
    means: dict[str, float | None] = {}
    for case, values in dice.items():
        defined = [v for v in values.values() if v is not None]
        means[case] = sum(defined) / len(defined) if defined else None
    return labels, dice, means


# ----------------------------------------------------------------------------------------------
# The whole demo


class StageClock:
    """Wall seconds per stage, in the order the stages ran, and the total (:meth:`finish`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._started = self._mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Record the seconds since the previous lap (or the start) as ``stage``."""
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._mark, 2)
        self._mark = now

    def finish(self) -> None:
        self.seconds["total"] = round(time.perf_counter() - self._started, 2)


def run(out: Path, settings: DemoSettings, device: str = "auto", hooks: DemoHooks | None = None,
        force: bool = False) -> DemoResult:
    """Materialise, check, plan, preprocess, train, predict, evaluate and draw, in ``out``.

    Args:
        out: the output folder (see the module docstring for its layout).
        settings: the recorded options.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (training and prediction).
        hooks: progress display.
        force: delete the demo's earlier outputs in ``out`` first.

    Raises:
        AutosegError: a bad option or OUT, or any stage's error (one-line message).
    """
    hooks = hooks or DemoHooks()
    clock = StageClock()

    cfg = train_config(settings, device)  # bad options fail here, before any work
    paths = prepare(out, settings, force)
    train_ids, val_ids, test_ids = materialise(paths, settings)
    hooks.note(f"example: {len(train_ids) + len(val_ids)} case(s) for training → {paths.raw}, "
               f"{len(test_ids)} held out → {paths.test_images.parent}")
    clock.lap("materialise")
    with hooks.progress("checking and fingerprinting") as progress:
        line, _ = plan(paths, progress)
    hooks.note(line)
    clock.lap("check_plan")
    with hooks.progress("preprocessing") as progress:
        hooks.note(preprocess(paths, progress))
    clock.lap("preprocess")
    hooks.note(f"train: {CONFIGURATION} fold {FOLD}, budget {settings.time_budget_s:g} s")
    with hooks.training() as callbacks_for:
        hooks.note(train(paths, cfg, train_ids, val_ids, callbacks_for))
    clock.lap("train")
    with hooks.predicting() as callbacks:
        hooks.note(predict(paths, device, callbacks))
    clock.lap("predict")
    with hooks.progress("evaluating") as progress:
        report = evaluate(paths, progress)
    labels, dice, case_mean = _dice_of(report)
    clock.lap("evaluate")
    with hooks.progress("drawing overlays") as progress:
        overlays = draw_overlays(paths, case_mean, progress)
    progress_png = copy_progress_png(paths)
    clock.lap("overlays")
    clock.finish()

    mean = report.summary.get("mean_foreground_dice")
    outputs = [("Dice, HD95, NSD per case and label", paths.report),
               ("the same as CSV", paths.report.with_suffix(".csv")),
               ("overlays (one PNG per held-out case)", paths.overlays)]
    if progress_png is not None:
        outputs.append(("training curves", progress_png))
    outputs += [("predicted label maps", paths.predictions), ("experiment (plans, model)", paths.work),
                ("demo record", paths.record)]
    write_json(paths.record, {
        "schema_version": RECORD_SCHEMA_VERSION, "demo": EXAMPLE, "settings": asdict(settings), "status": "finished",
        "device": device, "test_cases": test_ids, "train_cases": train_ids, "validation_cases": val_ids,
        "labels": labels, "dice": dice, "case_mean_dice": case_mean, "mean_foreground_dice": mean,
        "seconds": clock.seconds, "outputs": {str(p.relative_to(paths.root)): what for what, p in outputs},
    })
    return DemoResult(paths, labels, dice, case_mean, mean, overlays, clock.seconds, outputs)
