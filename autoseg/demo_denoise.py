"""``autoseg demo denoise``: low-dose CT denoising end to end on the bundled chest CT, in minutes on a CPU.

The bundled example (``autoseg/examples/ct_chest``: 12 real 1 mm axial slices of LIDC-IDRI-0314,
0.78 mm pixels, see its NOTICE.md) is cut into slabs of :data:`SLAB` consecutive slices, each one case.
One slab is held out; the rest go through the real stages (``simulate.run.run_low_dose``,
``planning.run.plan_dataset``, ``preprocessing.run``, ``training.run``, ``inference.run``,
``evaluation.restoration.run``) — this module only chooses their inputs::

    OUT/demo.json              the demo's options and results (marks OUT as a demo folder)
    OUT/full_dose/{train,test} the full-dose slabs (the simulation's input)
    OUT/raw/                   denoising dataset: simulated quarter dose (imagesTr), full dose (targetsTr)
    OUT/test/                  the held-out slab, simulated the same way (never seen by planning or training)
    OUT/work                   the experiment folder (plans, preprocessed data, models/2d/fold_0)
    OUT/predictions/           the denoised held-out slab, in its geometry and pixel type
    OUT/evaluation.json        PSNR, SSIM, RMSE of the low-dose input and the denoised slab (+ evaluation.csv)
    OUT/panels/<case>.png      low dose | denoised | full dose | difference, in the same window
    OUT/progress.png           the training curves (loss, validation PSNR)

The held-out slab comes from the same patient as the training slabs: the demo shows the pipeline
and what denoising looks like, not how a model generalises to new patients (that is the peers
benchmark's job, benchmarks/README.md). Rerunning into the same OUT with the same options reuses
every finished stage, as ``autoseg demo`` does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg.atomic import atomic_folder, write_json
from autoseg.demo import (FOLD, RECORD_SCHEMA_VERSION, DemoHooks, DemoPaths, ProgressFn, StageClock,
                          copy_progress_png, patch_text, planned_configuration, prepare)
from autoseg.errors import ConfigError

if TYPE_CHECKING:
    from autoseg.evaluation.restoration import RestorationReport
    from autoseg.inference.run import PredictCallbacks
    from autoseg.planning.compute import Throughput
    from autoseg.training.trainer import Callbacks

NAME = "denoise"
EXAMPLE = "ct_chest"
PLANNER = "cpu"
CONFIGURATION = "2d"
#: Consecutive axial slices per case (the bundled volume has 12: six slabs).
SLAB = 2
MAX_SLABS = 6
#: The AAPM Low-Dose CT Grand Challenge's quarter dose.
DOSE = 0.25
#: Training budget of the ≤ 8 min demo on 2 CPU cores (simulation, planning, prediction and
#: scoring take about a minute more).
DEFAULT_TIME_BUDGET_S = 360.0


@dataclass(frozen=True)
class DenoiseDemoSettings:
    """The denoising demo's options (recorded in ``OUT/demo.json``; a rerun must match them or use force).

    Attributes:
        time_budget_s: training wall-clock budget in seconds.
        seed: seeds the simulated noise, the network initialisation and the training batches.
        slabs: how many of the bundled 2-slice slabs to use (tests use fewer), from the first.
    """

    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    seed: int = 12345
    slabs: int = MAX_SLABS

    def __post_init__(self) -> None:
        if not 3 <= self.slabs <= MAX_SLABS:
            raise ConfigError(f"--cases {self.slabs}: choose between 3 and {MAX_SLABS} slabs (train, validation, test)")

    def describe(self) -> str:
        return f"--time-budget {self.time_budget_s:g}s --seed {self.seed}" + \
            (f" --cases {self.slabs}" if self.slabs != MAX_SLABS else "")


@dataclass(frozen=True)
class DenoiseDemoResult:
    """What the denoising demo measured and where it wrote it.

    Attributes:
        paths: the output folders.
        window: the HU window of the scores (``[low, high]``).
        cases: case -> {"input": metrics of the low-dose slab, "restored": of the denoised one}.
        panels: the PNG files written.
        seconds: wall time per stage.
        outputs: (what, where) pairs, in the order a reader wants them.
    """

    paths: DemoPaths
    window: str
    cases: dict[str, dict[str, dict[str, Any]]]
    panels: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: list[tuple[str, Path]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The bundled CT, cut into slabs (torch-free)


def split_slabs(count: int) -> tuple[list[int], int, int]:
    """Slab indices for (train, validation, test): the middle slab is held out, the last validates."""
    if not 3 <= count <= MAX_SLABS:
        raise ConfigError(f"--cases {count}: choose between 3 and {MAX_SLABS} slabs (train, validation, test)")
    test, val = count // 2, count - 1
    return [i for i in range(count) if i not in (test, val)], val, test


def slab_id(index: int) -> str:
    return f"chest_{index + 1}"


def _bundled_ct() -> tuple[np.ndarray, Any]:
    from importlib import resources

    from autoseg.imageio import read_image

    files = resources.files("autoseg.examples").joinpath(EXAMPLE)
    with resources.as_file(files.joinpath("lidc_idri_0314_chest.nii.gz")) as path:
        image, geometry = read_image(Path(path))
    return image[0], geometry


def write_slabs(paths: DemoPaths, settings: DenoiseDemoSettings) -> tuple[list[str], str, str]:
    """The full-dose slabs: ``OUT/full_dose/train`` (training and validation) and ``OUT/full_dose/test``.

    Returns:
        The (train, validation, test) case ids.
    """
    import dataclasses

    from autoseg.atomic import atomic_path
    from autoseg.imageio import write_image

    volume, geometry = _bundled_ct()
    train, val, test = split_slabs(settings.slabs)
    direction = np.array(geometry.direction, dtype=float).reshape(3, 3)
    for index in range(settings.slabs):
        part = "test" if index == test else "train"
        target = paths.root / "full_dose" / part / f"{slab_id(index)}.nii.gz"
        if target.is_file():
            continue
        # ITK order (x, y, z): the slab's first slice moves the origin along the third axis.
        shift = direction @ np.array([0.0, 0.0, index * SLAB * float(geometry.spacing[0])])
        origin = tuple(float(v) for v in np.array(geometry.origin, dtype=float) + shift)
        slab = np.ascontiguousarray(volume[index * SLAB:(index + 1) * SLAB])
        with atomic_path(target) as tmp:
            write_image(tmp, slab, dataclasses.replace(geometry, origin=origin))
    return [slab_id(i) for i in train], slab_id(val), slab_id(test)


def simulate(paths: DemoPaths, settings: DenoiseDemoSettings, progress: ProgressFn | None) -> str:
    """Quarter-dose scans of the full-dose slabs: ``OUT/raw`` (training) and ``OUT/test`` (held out).

    Each dataset is simulated into a temporary folder and moved into place when complete, so a
    dataset that exists is finished and is reused.
    """
    from autoseg.simulate.low_dose import LowDose
    from autoseg.simulate.run import run_low_dose

    from autoseg.atomic import TMP_PREFIX

    made = []
    for part, target in (("train", paths.raw), ("test", paths.root / "test")):
        if (target / "dataset.json").is_file():
            continue
        for stale in paths.root.glob(f"{TMP_PREFIX}*-{target.name}"):  # a killed run's half-written dataset
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_folder(target) as tmp:
            run_low_dose(paths.root / "full_dose" / part, tmp, LowDose(dose=DOSE), settings.seed,
                         name=f"demo_chest_{part}", progress=progress)
        made.append(part)
    what = f"simulated (dose {DOSE:g}, seed {settings.seed})" if made else "reused"
    return f"simulate: quarter-dose pairs {what} → {paths.raw}, {paths.root / 'test'}"


# ----------------------------------------------------------------------------------------------
# The stages


def plan(paths: DemoPaths, settings: DenoiseDemoSettings, device: str, progress: ProgressFn | None) -> str:
    """Check, fingerprint and plan ``OUT/raw`` with the cpu preset, the networks sized for the training
    budget on this machine (``autoseg plan --time-budget``); returns a one-line summary.

    Raises:
        DatasetError: the dataset has errors; PlanError: no 2d configuration was planned.
    """
    from autoseg import plans as plans_io
    from autoseg.planning import run as experiment

    if (paths.work / "plans.yaml").is_file():
        # Planned by an earlier run with the same options: planned again, the measured rate could
        # differ a little and change the network under a checkpoint that is to be resumed.
        plans = plans_io.load(paths.work / "plans.yaml")
        if CONFIGURATION in plans.configurations:
            config = plans.configurations[CONFIGURATION]
            return (f"plan: {paths.work / 'plans.yaml'} exists (planned by an earlier run): reused; {CONFIGURATION} "
                    f"patch {patch_text(config)}, batch {config.batch_size}")
    throughput = _throughput(device)
    report, _, plans, reused = experiment.plan_dataset(paths.raw, paths.work, PLANNER, None, None, progress,
                                                       time_budget_s=settings.time_budget_s, throughput=throughput)
    config = planned_configuration(paths, plans, PLANNER, CONFIGURATION)
    n_cases = len(report.spec.cases) if report.spec else 0
    return (f"check: {n_cases} pair(s), {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            f"{' (fingerprint reused)' if reused else ''}; plan ({PLANNER} preset sized for "
            f"{settings.time_budget_s:g} s, task {plans.task}): {CONFIGURATION} patch {patch_text(config)}, batch "
            f"{config.batch_size}, {config.topology.num_stages} stages")


def _throughput(device: str) -> Throughput:
    """This machine's convolution rate (measured once and cached, as ``autoseg plan --time-budget``).

    Raises:
        ConfigError: it cannot be measured.
    """
    from autoseg.device import resolve_device
    from autoseg.networks.throughput import machine_throughput

    kind = "cuda" if resolve_device(device).type == "cuda" else "cpu"
    try:
        return machine_throughput(kind)
    except Exception as exc:  # noqa: BLE001 - a busy or broken device: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"cannot measure this machine's convolution rate on {kind} ({first}); the demo sizes its "
                          "network from it: try --device cpu") from None


def preprocess(paths: DemoPaths, progress: ProgressFn | None) -> str:
    from autoseg.preprocessing import run as preprocessing

    summary = preprocessing.run(paths.work, [CONFIGURATION], None, progress).configs[CONFIGURATION]
    return (f"preprocess: {summary.cases} case(s), {summary.processed} processed, {summary.reused} already done "
            f"→ {summary.folder}")


def train(paths: DemoPaths, settings: DenoiseDemoSettings, device: str, train_ids: list[str], val_id: str,
          callbacks_for: Callable[[int], Callbacks] | None) -> str:
    """Train fold 0 of 2d within the budget (reused when final, resumed when interrupted)."""
    from autoseg.demo import train_config, train_fold

    done = train_fold(paths, train_config(settings, device), CONFIGURATION, train_ids, [val_id], callbacks_for)
    if done.reused:
        return f"train: {done.root / 'checkpoint_final.pt'} exists (trained by an earlier run): reused"
    return (f"train: {len(train_ids)} slab(s), {done.epochs} epoch(s), {done.iterations} iteration(s)"
            f"{' (resumed)' if done.resumed else ''}, validation PSNR on {val_id} {done.last_metric:.2f} dB → "
            f"{done.root}")


def predict(paths: DemoPaths, device: str, callbacks: PredictCallbacks | None) -> str:
    """Denoise the held-out slab (mirroring TTA); an image already written is kept."""
    from autoseg.inference import run as predictor

    summary = predictor.run(paths.work, [paths.root / "test" / "imagesTr"], paths.predictions, [CONFIGURATION],
                            [FOLD], "final", device=device, resume=True, callbacks=callbacks)
    done = f", {len(summary.skipped)} already done" if summary.skipped else ""
    where = f" on {summary.device} in {summary.seconds:.1f} s" if summary.written else ""
    return f"predict: {len(summary.written)} held-out slab(s) denoised{where}{done} → {paths.predictions}"


def evaluate(paths: DemoPaths, progress: ProgressFn | None) -> RestorationReport:
    """PSNR, SSIM, RMSE of the denoised and the low-dose slab against full dose, and the panels."""
    from autoseg.evaluation import restoration

    test = paths.root / "test"
    return restoration.run(paths.predictions, test, paths.report, None, test / "imagesTr", progress=progress)


# ----------------------------------------------------------------------------------------------
# The whole demo


def run(out: Path, settings: DenoiseDemoSettings, device: str = "auto", hooks: DemoHooks | None = None,
        force: bool = False) -> DenoiseDemoResult:
    """Slab, simulate, check, plan, preprocess, train, predict and score, in ``out``.

    Raises:
        AutosegError: a bad option or OUT, or any stage's error (one-line message).
    """
    from autoseg.demo import train_config

    hooks = hooks or DemoHooks()
    clock = StageClock()

    train_config(settings, device)  # bad options fail here, before any work
    paths = prepare(out, settings, force, name=NAME)
    train_ids, val_id, test_id = write_slabs(paths, settings)
    hooks.note(f"example: {settings.slabs} slabs of {SLAB} slices of a real chest CT (LIDC-IDRI-0314, 0.78 mm pixels): "
               f"{len(train_ids)} train, {val_id} validates, {test_id} held out")
    clock.lap("slabs")
    with hooks.progress("simulating quarter dose") as progress:
        hooks.note(simulate(paths, settings, progress))
    clock.lap("simulate")
    with hooks.progress("checking and fingerprinting") as progress:
        hooks.note(plan(paths, settings, device, progress))
    clock.lap("check_plan")
    with hooks.progress("preprocessing") as progress:
        hooks.note(preprocess(paths, progress))
    clock.lap("preprocess")
    hooks.note(f"train: {CONFIGURATION} fold {FOLD}, budget {settings.time_budget_s:g} s")
    with hooks.training() as callbacks_for:
        hooks.note(train(paths, settings, device, train_ids, val_id, callbacks_for))
    clock.lap("train")
    with hooks.predicting() as callbacks:
        hooks.note(predict(paths, device, callbacks))
    clock.lap("predict")
    with hooks.progress("scoring and drawing panels") as progress:
        report = evaluate(paths, progress)
    progress_png = copy_progress_png(paths, CONFIGURATION)
    clock.lap("evaluate")
    clock.finish()

    cases = {case: {"input": record.get("input", {}), "restored": record["restored"]}
             for case, record in report.cases.items()}
    panels = sorted(report.panels.glob("*.png")) if report.panels is not None and report.panels.is_dir() else []
    window = "full" if report.window.full else f"[{report.window.low:g}, {report.window.high:g}] HU"
    outputs = [("PSNR, SSIM, RMSE of the held-out slab", paths.report),
               ("the same as CSV", paths.report.with_suffix(".csv"))]
    if report.panels is not None:
        outputs.append(("panels: low dose | denoised | full dose | difference", report.panels))
    if progress_png is not None:
        outputs.append(("training curves", progress_png))
    outputs += [("denoised slab", paths.predictions), ("experiment (plans, model)", paths.work),
                ("demo record", paths.record)]
    write_json(paths.record, {
        "schema_version": RECORD_SCHEMA_VERSION, "demo": NAME, "settings": asdict(settings), "status": "finished",
        "device": device, "dose": DOSE, "test_cases": [test_id], "train_cases": train_ids,
        "validation_cases": [val_id], "window": window, "scores": cases, "seconds": clock.seconds,
        "outputs": {str(p.relative_to(paths.root)): what for what, p in outputs},
    })
    return DenoiseDemoResult(paths, window, cases, panels, clock.seconds, outputs)
