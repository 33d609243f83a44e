"""Fold validation: predict a fold's held-out cases in full and score them (nnU-Net's final validation).

For fold ``k`` of a configuration, every validation case of ``WORK/splits.json`` is read from the
RAW dataset (``WORK/dataset.json``: ``source`` + each case's ``images`` and ``label``) and
predicted exactly as ``autoseg predict`` would (same :class:`~autoseg.inference.predictor.Predictor`: sliding
window, mirroring TTA on), then written and scored::

    WORK/models/<config>/fold_<k>/validation/<case><ending>  label map, the image's geometry and format
                                                            (as ``autoseg predict`` writes it: .png for PNG)
    WORK/models/<config>/fold_<k>/validation/<case>.npz      "probabilities" (K, Z, Y, X) float16
                                                              (region-based: (R, Z, Y, X) sigmoids + "regions")
    WORK/models/<config>/fold_<k>/metrics.json                per case and summary (autoseg.metrics)

A restoration fold (``"task": "denoise"`` in its metrics.json) writes the restored image instead of
a label map, no ``.npz``, and scores PSNR, SSIM 2D/3D and RMSE in the stated window against the
clean target (:meth:`autoseg.tasks.restoration.Denoise.score_case`: per case the keys and values
that ``autoseg evaluate`` reports for the same files and window); ``autoseg find-best`` does not
take restoration experiments yet and says so.

``autoseg find-best`` reads these files to compare configurations and ensembles and to decide the
postprocessing. The trainer calls :func:`validate_fold` at the end of a fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoseg.atomic import write_json
from autoseg.errors import DatasetError
from autoseg.metrics import DEFAULT_NSD_TOLERANCE_MM

#: File name of a fold's validation scores.
METRICS_FILE = "metrics.json"


def validation_folder(work: Path, configuration: str, fold: int) -> Path:
    """``WORK/models/<configuration>/fold_<fold>/validation``."""
    return Path(work) / "models" / configuration / f"fold_{fold}" / "validation"


def _validation_case_ids(work: Path, fold: int, case_ids: list[str]) -> list[str]:
    from autoseg import crossval

    splits = crossval.load(Path(work) / "splits.json", case_ids)
    return sorted(crossval.fold_cases(splits, fold)["val"])


def validate_fold(
    work: Path,
    configuration: str,
    fold: int,
    checkpoint: str = "final",
    device: str = "auto",
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Predict the validation cases of one fold from the raw images, write them, and score them.

    Args:
        work: the experiment folder.
        configuration: the trained configuration.
        fold: the fold (its validation cases come from WORK/splits.json).
        checkpoint: ``final``, ``best`` or ``latest``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        nsd_tolerance_mm: NSD tolerance (2 mm: autoseg's default).
        progress: ``progress(done, total)`` over the validation cases: ``(0, total)`` first, then
            after each case.

    Returns:
        What ``metrics.json`` holds: ``configuration``, ``fold``, ``checkpoint``, ``tta``,
        ``nsd_tolerance_mm``, ``per_case`` (case -> label -> metrics, as
        :func:`autoseg.metrics.case_metrics` returns them), ``summary``
        (:func:`autoseg.metrics.summarize`) and ``seconds``.

    Raises:
        ConfigError: the fold is not trained, the splits are missing or invalid, a bad device.
        DatasetError: dataset.json is missing, the raw dataset moved, or a file is unreadable.
        PlanError: plans.yaml is missing or invalid.
    """
    from autoseg.imageio import read_image
    from autoseg.inference.inputs import InputCase, output_ending, read_input
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.models import select_models
    from autoseg.preprocessing.run import load_work_cases

    started = time.perf_counter()
    work = Path(work)
    selections, _ = select_models(work, [configuration], [fold], checkpoint)
    cases = {case.case_id: case for case in load_work_cases(work)}
    val_ids = _validation_case_ids(work, fold, sorted(cases))
    # The torch engine (fp32 on the CPU, autocast on CUDA): cross-validation scores must not
    # depend on which optional engines are installed (OpenVINO's bf16 moves mean Dice by ~4e-4,
    # benchmarks/README.md).
    predictor = Predictor(work, selections, device=device, tta=True, engine="torch")
    folder = validation_folder(work, configuration, fold)
    per_case: dict[str, dict[str, dict]] = {}
    if progress is not None:
        progress(0, len(val_ids))  # before the first case, which can take minutes on its own
    for index, case_id in enumerate(val_ids):
        case = cases[case_id]
        if case.label is None:
            raise DatasetError(f"{case_id}: validation case without a label file in {work / 'dataset.json'}; "
                               "re-run 'autoseg plan'")
        # The label map in the image's format, as 'autoseg predict' writes it (PNG for PNG images).
        ending = output_ending(case.images[0])
        image, geometry = read_input(InputCase(case_id, case.images, ending))
        reference = read_image(case.label)[0][0]
        if reference.shape != predictor.task.output_shape(image.shape[1:]):  # super-resolution: the fine grid
            raise DatasetError(f"{case.label}: label shape {reference.shape} differs from the output's "
                               f"{predictor.task.output_shape(image.shape[1:])}; run 'autoseg check' on the dataset")
        predictions = predictor.predict(image, geometry)
        _remove_other_label_maps(folder, case_id, ending)
        labels = predictor.export(predictions, geometry, folder / f"{case_id}{ending}", folder / f"{case_id}.npz")
        per_case[case_id] = predictor.task.score_case(labels, reference, geometry.spacing,
                                                      nsd_tolerance_mm=nsd_tolerance_mm, geometry=geometry)
        if progress is not None:
            progress(index + 1, len(val_ids))
    task = {} if predictor.task.name == "segmentation" else {"task": predictor.task.name}
    record = {
        **task,
        "configuration": configuration,
        "fold": int(fold),
        "checkpoint": checkpoint,
        "tta": True,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "per_case": per_case,
        "summary": predictor.task.summarize(per_case),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(folder.parent / METRICS_FILE, record)
    return record


def _remove_other_label_maps(folder: Path, case_id: str, ending: str) -> None:
    """Delete the case's label map of an earlier validation in another format (``.nii.gz`` before
    validation followed the image's format), so that one case never has two label maps there."""
    from autoseg.imageio import strip_ending

    if not folder.is_dir():
        return
    for path in folder.iterdir():
        stem, other = strip_ending(path.name)
        if stem == case_id and other and other != ending:
            path.unlink()
