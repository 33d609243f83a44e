"""The ``predict`` stage run: files in, files out, checked before any work, optionally over several processes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg import plans as plans_io
from autoseg.errors import ConfigError
from autoseg.inference.api import Segmenter, postprocessor
from autoseg.inference.engines import check_engine_names
from autoseg.inference.inputs import (
    InputCase,
    check_inputs,
    find_input_cases,
)
from autoseg.inference.model_export import open_model
from autoseg.inference.models import ModelSelection
from autoseg.inference.outputs import (
    CaseOutputs,
    case_outputs,
    check_output_outside_dicom_inputs,
    check_outputs,
    output_formats,
)
from autoseg.inference.predictor import PredictorStats

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class PredictCallbacks:
    """Progress hooks (the CLI draws rich bars with them).

    Attributes:
        on_case: ``on_case(index, total, case_id)`` before each case is predicted.
        on_windows: ``on_windows(done, total)`` as the windows of the current case finish.
    """

    on_case: Callable[[int, int, str], None] = lambda index, total, case_id: None
    on_windows: Callable[[int, int], None] = lambda done, total: None


@dataclass(frozen=True)
class PredictSummary:
    """What ``autoseg predict`` did.

    Attributes:
        output: the output folder.
        selections: the configurations and folds used.
        written: label maps written in this run.
        skipped: label maps that existed already (``--continue``).
        seconds: wall time of the stage.
        device: where the networks ran ("" when nothing was predicted).
        postprocessing: whether best.yaml's postprocessing was applied.
        model_file: the model file predicted with, or None for a WORK folder.
        checkpoint: the checkpoint kind of the folds.
        warnings: what the writers said of the outputs (a DICOM series' clipped voxels, a new
            StudyInstanceUID for a blank one), one line each.
    """

    output: Path
    selections: tuple[ModelSelection, ...]
    written: tuple[Path, ...]
    skipped: tuple[Path, ...]
    seconds: float
    device: str
    postprocessing: bool = False
    stats: PredictorStats = field(default_factory=PredictorStats)
    model_file: Path | None = None
    checkpoint: str = "final"
    warnings: tuple[str, ...] = ()


def run(
    work: Path,
    inputs: Sequence[Path],
    output: Path,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str | None = None,
    *,
    tta: bool = True,
    save_probabilities: bool = False,
    device: str = "auto",
    resume: bool = False,
    step: float = 0.5,
    callbacks: PredictCallbacks | None = None,
    save_uncertainty: bool = False,
    output_format: str | Sequence[str] = "auto",
    devices: Sequence[str] | None = None,
    engine: str = "auto",
    precision: str = "auto",
) -> PredictSummary:
    """Predict every input case with the trained models of ``work``; write label maps to ``output``.

    Everything that can be checked without pixels is checked before the first prediction (and
    before torch is imported, for a WORK folder): the models, every input's header (channels,
    2D/3D), the output folder. Each output is written atomically; a failure leaves no partial file.
    Every case goes through :meth:`autoseg.inference.api.Segmenter.write_case`.

    Args:
        work: the experiment folder, or a model file (``autoseg export``; verified, then imported
            into a temporary folder for the run, :func:`autoseg.inference.model_export.open_model`).
        inputs: folders and/or image files (see :func:`find_input_cases`).
        output: the output folder (created).
        configurations: configuration names (default: see :func:`select_models`).
        folds: fold indices (default: every trained fold).
        checkpoint: ``final``, ``best`` or ``latest`` (None: ``final``; a model file: the kind it holds).
        tta: mirroring test-time augmentation.
        save_probabilities: also write ``<case>.npz`` with float16 probabilities ``(K, Z, Y, X)``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        resume: skip cases whose outputs exist (``--continue``).
        step: window stride as a fraction of the patch.
        callbacks: progress hooks.
        save_uncertainty: also write ``<case>_entropy`` and ``<case>_disagreement`` maps
            (:mod:`autoseg.inference.uncertainty`) in the input's geometry.
        output_format: ``auto`` (the input's format; NIfTI for a DICOM series), ``nifti``,
            ``dicom-seg`` (needs highdicom and DICOM series inputs), ``dicom`` (a restoration
            model's image as a DICOM series ``<case>/``: needs pydicom and DICOM series inputs,
            :mod:`autoseg.inference.dicom_series`), or several of them.
        devices: several devices (``--gpus N``: ``cuda:0``…; ``--procs N``: ``cpu`` N times): the
            cases are shared out over one process per device, each predicting whole cases exactly
            as a single device would (the outputs are identical). Overrides ``device``.
        engine: ``auto``, ``torch``, ``openvino`` or ``onnxruntime`` (:mod:`autoseg.inference.engines`).
        precision: ``auto``, ``fp32``, ``bf16`` or ``int8``.

    Returns:
        What was written and skipped.

    Raises:
        AutosegError: bad WORK, configuration, fold, input, device or option (one-line message).
    """
    started = time.perf_counter()
    callbacks = callbacks or PredictCallbacks()
    if not 0 < step <= 1:
        raise ConfigError(f"--step {step}: must be in (0, 1] (a fraction of the patch; 0.5 = half overlap)")
    if not inputs:
        raise ConfigError("no input: pass images or folders with -i")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"-o {output}: exists and is not a folder; give a folder for the label maps")
    formats = output_formats(output_format)
    check_engine_names(engine, precision)
    with open_model(Path(work), checkpoint) as source:
        selections, best = source.select(configurations, folds)
        plans = plans_io.load(source.work / "plans.yaml")
        _check_task_outputs(plans.task, save_probabilities, save_uncertainty, formats)
        cases = find_input_cases(inputs, len(plans.channel_names))
        check_inputs(cases, plans, [s.configuration for s in selections])
        outputs = {case.case_id: case_outputs(case, output, formats, save_probabilities=save_probabilities,
                                              save_uncertainty=save_uncertainty) for case in cases}
        check_outputs(cases, outputs, output, formats)
        check_output_outside_dicom_inputs(inputs, cases, output)

        todo, skipped = [], []
        for case in cases:
            targets = outputs[case.case_id]
            if resume and _is_done(case, targets):
                skipped.append(targets.primary)
            else:
                todo.append(case)
        done = dict(output=output, selections=tuple(selections), skipped=tuple(skipped), model_file=source.model_file,
                    checkpoint=source.checkpoint)
        if not todo:
            return PredictSummary(written=(), seconds=time.perf_counter() - started, device="", **done)

        job = _CasesJob(source.work, tuple(selections), tuple(todo), {c.case_id: outputs[c.case_id] for c in todo},
                        best, source.checkpoint, tta, step, save_uncertainty, engine, precision)
        if devices is not None and len(devices) > 1:
            written, used_device, stats, warnings = _predict_sharded(job, devices, callbacks)
        else:
            written, used_device, stats, warnings = _predict_cases(job, devices[0] if devices else device, callbacks)
    return PredictSummary(written=tuple(written), seconds=time.perf_counter() - started, device=used_device,
                          postprocessing=best is not None and postprocessor(best) is not None, stats=stats,
                          warnings=tuple(warnings), **done)


def _check_task_outputs(task: str, save_probabilities: bool, save_uncertainty: bool, formats: Sequence[str]) -> None:
    """Refuse the outputs a task does not make (restoration writes restored images only; a DICOM
    series only restoration keeping the source's slices).

    Raises:
        ConfigError: naming the option.
    """
    from autoseg.inference.outputs import DICOM_SERIES_TASKS
    from autoseg.tasks import TASKS

    if "dicom" in formats and task not in DICOM_SERIES_TASKS:
        if TASKS[task].extra_outputs:
            raise ConfigError(f"--output-format dicom: writes a restored image series (a {' or '.join(DICOM_SERIES_TASKS)} "
                              f"model); a {task} model writes a DICOM SEG: use --output-format dicom-seg")
        raise ConfigError(f"--output-format dicom: not available for a {task} model (its image does not keep the "
                          "source's slices); use --output-format nifti")
    if TASKS[task].extra_outputs:
        return
    asked = [flag for flag, on in (("--save-probabilities", save_probabilities),
                                   ("--save-uncertainty", save_uncertainty),
                                   ("--output-format dicom-seg", "dicom-seg" in formats)) if on]
    if asked:
        raise ConfigError(f"{asked[0]}: not available for a {task} model, which writes restored images only; "
                          "leave it out")


@dataclass(frozen=True)
class _CasesJob:
    """Cases to predict and how (picklable: a process per device gets its share)."""

    work: Path
    selections: tuple[ModelSelection, ...]
    cases: tuple[InputCase, ...]
    outputs: dict[str, CaseOutputs]
    best: dict[str, Any] | None
    checkpoint: str
    tta: bool
    step: float
    save_uncertainty: bool
    engine: str = "auto"
    precision: str = "auto"


def _is_done(case: InputCase, targets: CaseOutputs) -> bool:
    """Whether ``--continue`` may skip ``case``: every output is written atomically, so one that is
    there is complete; a file output must be a file, the DICOM series a folder (not a link) of one
    ``.dcm`` per source slice."""
    files = [p for p in targets.files if p != targets.series]
    if not all(p.is_file() for p in files):
        return False
    if targets.series is None:
        return True
    from autoseg.imageio import dicom_series_files

    series = targets.series
    if series.is_symlink() or not series.is_dir():
        return False
    written = sum(1 for p in series.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    return written == len(dicom_series_files(case.images[0]))


def _predict_cases(job: _CasesJob, device: str,
                   callbacks: PredictCallbacks) -> tuple[list[Path], str, PredictorStats, list[str]]:
    """Predict ``job.cases`` one after the other on ``device`` (through the Python API's
    :class:`~autoseg.inference.api.Segmenter`); returns what was written, and the writers' warnings."""
    segmenter = Segmenter.from_work(job.work, job.selections, job.best, device=device, tta=job.tta, step=job.step,
                                    checkpoint=job.checkpoint, engine=job.engine, precision=job.precision)
    written, warnings = [], []
    for index, case in enumerate(job.cases):
        callbacks.on_case(index, len(job.cases), case.case_id)
        written.append(segmenter.write_case(case, job.outputs[case.case_id], progress=callbacks.on_windows,
                                            uncertainty=job.save_uncertainty, warnings=warnings))
    return written, f"{segmenter.device}, {segmenter.engine}", segmenter.stats, warnings


def _predict_sharded(job: _CasesJob, devices: Sequence[str],
                     callbacks: PredictCallbacks) -> tuple[list[Path], str, PredictorStats, list[str]]:
    """Share the cases out round robin over one process per device."""
    import dataclasses

    from autoseg import distributed

    count = min(len(devices), len(job.cases))
    shares = [dataclasses.replace(job, cases=job.cases[p::len(devices)]) for p in range(count)]
    launch = distributed.Launch("folds", tuple(devices[:count]))
    done = [0]

    def on_event(event: distributed.Event) -> None:
        # One bar over all cases: a case counts when any process starts it.
        if event.name == "case":
            callbacks.on_case(done[0], len(job.cases), event.args[0])
            done[0] += 1

    results = distributed.launch(_predict_child, shares, launch, on_event=on_event, join_group=False)
    written = sorted((path for paths, _, _, _ in results for path in paths), key=str)
    stats = PredictorStats()
    for _, _, part, _ in results:
        for name in ("forward_s", "forward_calls", "samples", "windows", "predict_s", "preprocess_s", "export_s"):
            setattr(stats, name, getattr(stats, name) + getattr(part, name))
    used = ", ".join(sorted({device for _, device, _, _ in results}))
    warnings = sorted(line for _, _, _, lines in results for line in lines)
    return written, f"{used} × {count} processes" if len(set(devices)) == 1 else used, stats, warnings


def _predict_child(child: Any, job: _CasesJob) -> tuple[list[Path], str, PredictorStats, list[str]]:
    """Runs in a spawned process: this device's share of the cases."""
    from autoseg.distributed import Event

    callbacks = PredictCallbacks(on_case=lambda index, total, case_id: child.post(Event(index, "case", (case_id,))))
    return _predict_cases(job, child.device, callbacks)
