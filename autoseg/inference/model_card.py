"""MODEL.md, the human-readable page of a model file: what it segments, from what data, how well.

Written by ``autoseg export`` from the experiment folder (torch-free). Only counts and summaries
leave WORK: no case ids, file names or the dataset's path, since a model file is handed on and
case ids can identify patients. The text has no date, so exporting twice gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.inference.inputs import is_2d_plans
from autoseg.inference.model_file import BASE_SCHEMA_VERSION, MODEL_SCHEMA_VERSION
from autoseg.inference.models import ModelSelection, fold_folder
from autoseg.plans import Plans

#: MODEL.md's licence line when ``autoseg export`` gets no ``--licence``.
NO_LICENCE = "not stated — ask the model's author"
#: Keys of the raw dataset.json copied into the model's dataset.json when present (MSD's spelling).
_DESCRIPTIVE_KEYS = ("description", "reference", "licence", "release")


def read_work_dataset(work: Path, plans: Plans) -> dict[str, Any]:
    """The model's dataset.json: name, task, channels, labels, file ending, number of training cases,
    and the raw dataset's description, reference, licence and release when it still exists.

    Args:
        work: the experiment folder (its dataset.json, written by ``autoseg plan``).
        plans: its plans (labels and channels when WORK/dataset.json is absent).
    """
    record: dict[str, Any] = {}
    path = Path(work) / "dataset.json"
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            record = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            record = {}
    dataset: dict[str, Any] = {
        "name": record.get("name") or plans.dataset_name,
        "task": plans.task,
        "channel_names": record.get("channel_names") or {str(i): n for i, n in enumerate(plans.channel_names)},
        "labels": record.get("labels") or {k: (v[0] if len(v) == 1 else list(v)) for k, v in plans.labels.items()},
        "file_ending": record.get("file_ending"),
        "numTraining": record.get("numTraining"),
        "layout": record.get("layout"),
    }
    raw = _raw_dataset(record.get("source"))
    for key in _DESCRIPTIVE_KEYS:
        value = raw.get(key, raw.get("license") if key == "licence" else None)
        if isinstance(value, str) and value.strip():
            dataset["data_" + key if key == "licence" else key] = value.strip()
    return dataset


def _raw_dataset(source: object) -> dict[str, Any]:
    if not isinstance(source, str):
        return {}
    try:
        loaded = json.loads((Path(source) / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def training_summary(work: Path, selections: Sequence[ModelSelection]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per configuration and fold: training and validation case counts (``WORK/splits.json``) and
    the fold validation's summary (``models/<config>/fold_<k>/metrics.json``, None when absent).

    Returns:
        ``{configuration: {fold: {"train_cases", "val_cases", "validation"}}}``; ``validation`` is
        ``{"n_cases", "mean_foreground_dice", "dice": {label: mean}, "checkpoint", "tta"}``.
    """
    splits: list[Any] = []
    try:
        loaded = json.loads((Path(work) / "splits.json").read_text(encoding="utf-8"))
        splits = loaded if isinstance(loaded, list) else []
    except (OSError, ValueError):
        pass
    result: dict[str, dict[int, dict[str, Any]]] = {}
    for selection in selections:
        for fold in selection.folds:
            split = splits[fold] if fold < len(splits) and isinstance(splits[fold], dict) else {}
            entry: dict[str, Any] = {
                "train_cases": len(split["train"]) if isinstance(split.get("train"), list) else None,
                "val_cases": len(split["val"]) if isinstance(split.get("val"), list) else None,
                "validation": _validation(fold_folder(work, selection.configuration, fold) / "metrics.json"),
            }
            result.setdefault(selection.configuration, {})[fold] = entry
    return result


def _validation(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        summary = record["summary"]
        return {
            "n_cases": int(summary["n_cases"]),
            "mean_foreground_dice": summary.get("mean_foreground_dice"),
            "dice": {name: stats.get("dice", {}).get("mean") for name, stats in summary.get("labels", {}).items()},
            "checkpoint": record.get("checkpoint"),
            "tta": record.get("tta"),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _dice(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"


def _labels_table(labels: Mapping[str, Any]) -> list[str]:
    lines = ["| label | value(s) |", "|---|---|"]
    for name, value in labels.items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        lines.append(f"| {name} | {shown} |")
    return lines


def model_card(file_name: str, plans: Plans, dataset: Mapping[str, Any], selections: Sequence[ModelSelection],
               folds_meta: Mapping[str, Mapping[int, Mapping[str, Any]]],
               training: Mapping[str, Mapping[int, Mapping[str, Any]]], best: Mapping[str, Any] | None,
               checkpoint: str, licence: str | None, version: str, graphs: Sequence[str] = (),
               stages: Sequence[ModelSelection] = ()) -> str:
    """MODEL.md's text (Markdown).

    Args:
        file_name: the model file's name, for the commands shown.
        plans: the experiment's plans.
        dataset: the model's dataset.json (:func:`read_work_dataset`).
        selections: the exported configurations and folds.
        folds_meta: per configuration and fold, the checkpoint's metadata (epoch, ...).
        training: :func:`training_summary`.
        best: WORK/best.yaml when it chose the configurations, else None.
        checkpoint: the exported checkpoint kind.
        licence: the model's licence, or None.
        version: the autoseg version writing the file.
        graphs: the ONNX graph kinds in the file (``fp32``, ``int8``), if any.
        stages: the cascades' previous stages carried with them (weights, not ensemble members).
    """
    name = dataset.get("name") or plans.dataset_name
    channels = dataset.get("channel_names", {})
    two_d = is_2d_plans(plans)
    out = [f"# {name} — an autoseg model", ""]
    if dataset.get("description"):
        out += [str(dataset["description"]), ""]
    out += [f"Task: **{plans.task}** of {'2D' if two_d else '3D'} images with {len(channels)} input "
            f"channel(s) into {len(dataset.get('labels', {}))} labels (background included).", ""]
    out += ["## Labels", "", *_labels_table(dataset.get("labels", {})), ""]
    first = plans.configurations[selections[0].configuration]
    out += ["## Input channels", "", "| channel | name | normalisation |", "|---|---|---|"]
    for index, channel in channels.items():
        position = int(index)
        scheme = first.normalization[position].scheme if position < len(first.normalization) else "-"
        out.append(f"| {index} | {channel} | {scheme} |")
    out += ["", "Give one file per channel named `{case}_0000`, `{case}_0001`, ... (or one multi-channel file) "
            "in the layout the model was trained on; the prediction has each input's exact geometry.", ""]
    out += ["## Training data", ""]
    cases = dataset.get("numTraining")
    out.append(f"- {cases if cases is not None else 'an unknown number of'} labelled cases "
               f"(dataset {name!r}{', ' + str(dataset['reference']) if dataset.get('reference') else ''}), "
               f"median spacing {' × '.join(f'{s:g}' for s in plans.original_median_spacing)} mm (z, y, x).")
    if dataset.get("data_licence"):
        out.append(f"- Training data licence: {dataset['data_licence']}.")
    out += ["", "## Configurations and folds", "",
            "| configuration | fold | checkpoint | epoch | trained on | patch | spacing (mm) |", "|---|---|---|---|---|---|---|"]
    for selection in [*selections, *stages]:
        config = plans.configurations[selection.configuration]
        for fold in selection.folds:
            meta = folds_meta.get(selection.configuration, {}).get(fold, {})
            counts = training.get(selection.configuration, {}).get(fold, {})
            trained = f"{counts['train_cases']} cases" if counts.get("train_cases") is not None else "-"
            out.append(f"| {selection.configuration} | {fold} | {checkpoint} | {meta.get('epoch', '-')} | {trained} | "
                       f"{' × '.join(str(p) for p in config.patch_size)} | "
                       f"{' × '.join(f'{s:g}' for s in config.spacing)} |")
    for stage in stages:
        out += ["", f"`{stage.configuration}` is a cascade's first stage: its folds run first and their "
                "segmentation is an input of the next stage; it is not a member of the ensemble."]
    out += ["", "## Cross-validation", ""]
    label_names = [n for n in dataset.get("labels", {}) if n != "background"]
    rows, kinds = [], set()
    for selection in selections:
        for fold in selection.folds:
            validation = training.get(selection.configuration, {}).get(fold, {}).get("validation")
            if validation is not None:
                kinds.add(str(validation["checkpoint"]))
                dice = " | ".join(_dice(validation["dice"].get(n)) for n in label_names)
                rows.append(f"| {selection.configuration} | {fold} | {validation['n_cases']} | "
                            f"{_dice(validation['mean_foreground_dice'])} | {dice} |")
    if rows:
        out += [f"Dice on each fold's held-out cases (`autoseg train` validation with TTA, {', '.join(sorted(kinds))} "
                "checkpoint):", "",
                "| configuration | fold | cases | mean foreground Dice | " + " | ".join(label_names) + " |",
                "|---|---|---|---|" + "---|" * len(label_names), *rows, ""]
    else:
        out += ["Not validated: no exported fold has validation metrics (`autoseg train WORK -c CONFIG -f K "
                "--validate-only` writes them).", ""]
    if best is not None:
        scores = best.get("scores") or {}
        shown = ", ".join(f"{k} {_dice(v)}" for k, v in scores.items())
        out += [f"Chosen by `autoseg find-best` (pooled cross-validation mean foreground Dice: {shown or '-'}); "
                "its postprocessing is applied to every prediction.", ""]
    out += ["## Licence", "", licence.strip() if licence and licence.strip() else NO_LICENCE, ""]
    engines = ["pip install 'autoseg[openvino]'   # optional: the faster CPU engine, which runs the ONNX graphs"
               + (" (--precision int8: pip install 'autoseg[onnx]' for --engine onnxruntime)" if "int8" in graphs else "")
               ] if graphs else []
    out += ["## Use", "", "```bash", "pip install autoseg", *engines,
            f"autoseg predict --model {file_name} -i IMAGES -o OUT", f"autoseg import {file_name} -o WORK   "
            "# an experiment folder, if you want one", "```", "", "```python", "from autoseg import Segmenter", "",
            f'segmenter = Segmenter.load("{file_name}", device="cpu")',
            "labels = segmenter(image)   # a SimpleITK image or a path -> a label image, same geometry", "```", ""]
    schema = MODEL_SCHEMA_VERSION if graphs else BASE_SCHEMA_VERSION
    carried = (f" Each fold's network is also an ONNX graph ({' and '.join(graphs)}; `onnx/`), for the OpenVINO and "
               "ONNX Runtime engines." if graphs else "")
    out += ["## Provenance", "", f"Written by autoseg {version} (`autoseg export`, model schema {schema}). Weights are "
            "state dicts as `.npy` arrays, metadata JSON and YAML: nothing in the file is a pickle. "
            f"`manifest.json` holds the sha256 of every member and is checked on every load.{carried}", ""]
    return "\n".join(out)
