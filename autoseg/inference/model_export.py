"""Model files, the verbs: ``autoseg export`` (WORK -> model file), ``autoseg import`` (model file
-> WORK), and :func:`open_model`, through which ``autoseg predict`` and :class:`autoseg.Segmenter`
take a WORK folder or a model file alike.

The format and its checks are :mod:`autoseg.inference.model_file`; MODEL.md is
:mod:`autoseg.inference.model_card`. A model file is predicted with by importing it into a
temporary WORK folder (verified first, removed afterwards): one code path for both sources, at
the cost of writing the weights to a temporary folder once per start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg import plans as plans_io
from autoseg._version import __version__
from autoseg.atomic import TMP_PREFIX, atomic_path
from autoseg.checkpoint import CHECKPOINT_FORMAT
from autoseg.errors import AutosegError, ConfigError, PlanError, UnknownNameError
from autoseg.inference.model_card import model_card, read_work_dataset, training_summary
from autoseg.inference.model_file import (
    BASE_SCHEMA_VERSION,
    EXPORT_CHECKPOINTS,
    META_KEYS,
    META_REQUIRED,
    MODEL_CARD,
    MODEL_ENDING,
    MODEL_FORMAT,
    MODEL_SCHEMA_VERSION,
    TENSOR_NAME,
    ModelFile,
    json_bytes,
    npz_bytes,
    onnx_member,
    plain_json,
    read_model,
    write_model_zip,
)
from autoseg.inference.models import (
    ModelSelection,
    checkpoint_path,
    graph_path,
    previous_stage_selection,
    select_models,
)
from autoseg.inference.onnx_export import CALIBRATION_CASES
from autoseg.plans import Configuration, Plans


@dataclass(frozen=True)
class ExportSummary:
    """What ``autoseg export`` wrote.

    Attributes:
        path: the model file.
        sha256: the whole file's sha256 (to publish beside it).
        size: its size in bytes.
        selections: the configurations and folds in it.
        checkpoint: the checkpoint kind of every fold.
        postprocessing: whether best.yaml's postprocessing is in it.
        graphs: the ONNX graph kinds in it (``()``, ``("fp32",)`` or ``("fp32", "int8")``).
    """

    path: Path
    sha256: str
    size: int
    selections: tuple[ModelSelection, ...]
    checkpoint: str
    postprocessing: bool = False
    graphs: tuple[str, ...] = ()


def export_model(
    work: Path,
    output: Path,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "final",
    *,
    licence: str | None = None,
    force: bool = False,
    onnx: bool = False,
    int8: bool = False,
    calibration_cases: int = CALIBRATION_CASES,
    report: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write the trained folds of ``work`` as a model file (see the module docstring).

    Default configurations and folds as ``autoseg predict`` chooses them
    (:func:`autoseg.inference.models.select_models`): best.yaml's, with its postprocessing, else
    the single trained configuration. The file is written atomically and read back with
    :func:`read_model` before it takes its name, so an exported file always loads.

    Args:
        work: the experiment folder.
        output: the model file to write.
        configurations: configuration names, or None for the default.
        folds: folds (the same for every configuration), or None for every trained one.
        checkpoint: ``final`` or ``best``.
        licence: the model's licence, for MODEL.md (None: "not stated").
        force: overwrite an existing ``output``.
        onnx: also write each fold's network as an ONNX graph (:mod:`autoseg.inference.onnx_export`).
        int8: also its int8 quantisation, calibrated on ``calibration_cases`` of the fold's
            preprocessed training cases (implies ``onnx``; needs ``autoseg[onnx]``).
        calibration_cases: training cases (one window each) to calibrate int8 on.
        report: called with a line per step that takes seconds (ONNX export, calibration).

    Returns:
        What was written.

    Raises:
        ConfigError: ``output`` exists (without ``force``) or is a folder, a bad checkpoint kind,
            nothing trained, a checkpoint that cannot be exported.
        PlanError: WORK is not an experiment folder.
    """
    from autoseg.checkpoint import load_checkpoint

    work, output = Path(work), Path(output)
    if checkpoint not in EXPORT_CHECKPOINTS:
        raise UnknownNameError("checkpoint", checkpoint, EXPORT_CHECKPOINTS, "--checkpoint")
    if output.is_dir():
        raise ConfigError(f"-o {output}: a folder; give the model file's name (e.g. {output / ('model' + MODEL_ENDING)})")
    if output.exists() and not force:
        raise ConfigError(f"-o {output}: exists; choose another name or pass --force to replace it")
    if calibration_cases < 1:
        raise ConfigError(f"--calibration-cases {calibration_cases}: must be at least 1 (20 is usual)")
    graph_kinds = ("fp32", "int8") if int8 else ("fp32",) if onnx else ()
    selections, best = select_models(work, configurations, folds, checkpoint)
    plans = plans_io.load(work / "plans.yaml")
    from autoseg.tasks import TASKS

    if not TASKS[plans.task].extra_outputs:
        # The model file's reader and its MODEL.md describe label maps; restoration models are not
        # packaged yet.
        raise ConfigError(f"{work}: a {plans.task} experiment; model files hold segmentation models only for now: "
                          "predict from the WORK folder")
    # A cascade stage travels with its previous stage (weights only: not a member of the ensemble).
    stages = [p for s in selections if (p := previous_stage_selection(
        s, plans.configurations[s.configuration].previous_stage if s.configuration in plans.configurations else None,
        selections)) is not None]
    for stage in stages:
        if any(s.configuration == stage.configuration for s in selections):
            raise ConfigError(f"{stage.configuration} is exported with other folds than the cascade's own "
                              f"({list(stage.folds)}); export both with the same folds (-f)")
    if graph_kinds:
        cascades = [s.configuration for s in selections if plans.configurations.get(s.configuration) is not None
                    and plans.configurations[s.configuration].previous_stage]
        if int8 and cascades:
            # Calibration windows come from the preprocessed images, which lack the previous
            # stage's channels; not built yet.
            raise ConfigError(f"--int8: not available for the cascade stage {cascades[0]} yet; export it without "
                              "--int8 (fp32 graphs, bf16 on CPUs with bf16 units)")
        _check_graph_prerequisites(work, [*selections, *stages], int8)
    members: dict[str, bytes] = {"plans.yaml": plans_io.dumps(plans).encode("utf-8")}
    dataset = read_work_dataset(work, plans)
    members["dataset.json"] = json_bytes(dataset)
    folds_meta: dict[str, dict[int, dict[str, Any]]] = {}
    for selection in [*selections, *stages]:
        for fold, path in zip(selection.folds, selection.checkpoints):
            data = load_checkpoint(path, ("model", *META_REQUIRED[1:]))
            if data["configuration_name"] != selection.configuration:
                raise ConfigError(f"{path}: checkpoint of configuration {data['configuration_name']!r}, found in the "
                                  f"folder of {selection.configuration!r}; move it back or re-train")
            state = {}
            for name, tensor in data["model"].items():
                if not TENSOR_NAME.match(name) or not hasattr(tensor, "numpy"):
                    raise ConfigError(f"{path}: weight {name!r} is not a named tensor; the checkpoint was not written "
                                      "by 'autoseg train'")
                try:
                    state[name] = tensor.detach().cpu().numpy()
                except TypeError as exc:  # bfloat16 and other dtypes numpy lacks
                    raise ConfigError(f"{path}: weight {name!r} ({exc}); convert the checkpoint to float32") from None
            meta = plain_json({k: data[k] for k in META_KEYS if k in data}, str(path))
            meta["fold"] = int(fold)
            prefix = f"weights/{selection.configuration}/fold_{fold}"
            members[f"{prefix}.npz"] = npz_bytes(state)
            members[f"{prefix}.json"] = json_bytes(meta)
            folds_meta.setdefault(selection.configuration, {})[fold] = meta
            if graph_kinds:
                digest = hashlib.sha256(members[f"{prefix}.npz"]).hexdigest()  # = weights_digest(state)
                members |= _fold_graphs(work, plans, selection.configuration, fold, data, graph_kinds,
                                        calibration_cases, path, report, digest)
            del data, state
    common = {s.folds for s in selections}
    default: dict[str, Any] = {"schema_version": 1, "configurations": [s.configuration for s in selections]}
    if len(common) == 1:
        default["folds"] = list(selections[0].folds)
    if best is not None:
        default["postprocessing"] = best.get("postprocessing") or {}
        if best.get("scores"):
            default["scores"] = best["scores"]
    members["best.yaml"] = _best_yaml(default, from_find_best=best is not None)
    training = training_summary(work, selections)
    members[MODEL_CARD] = model_card(output.name, plans, dataset, selections, folds_meta, training, best,
                                     checkpoint, licence, __version__, graph_kinds, stages).encode("utf-8")
    manifest = {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION if graph_kinds else BASE_SCHEMA_VERSION,
        "autoseg_version": __version__,
        "task": plans.task,
        "configurations": {s.configuration: {"folds": list(s.folds), "checkpoint": checkpoint}
                           | ({"onnx": list(graph_kinds)} if graph_kinds else {}) for s in [*selections, *stages]},
    }
    with atomic_path(output) as tmp:
        write_model_zip(tmp, members, manifest)
        read_model(tmp, shown_as=output)
        digest, size = _file_sha256(tmp), tmp.stat().st_size
    postprocessing = bool(best is not None and best.get("postprocessing"))
    return ExportSummary(output, digest, size, tuple(selections), checkpoint, postprocessing, graph_kinds)


def _fold_graphs(work: Path, plans: Plans, configuration: str, fold: int, data: dict[str, Any],
                 kinds: Sequence[str], calibration_cases: int, path: Path,
                 report: Callable[[str], None] | None, digest: str) -> dict[str, bytes]:
    """A fold's ONNX members: its network as an fp32 graph, and int8 when asked."""
    from autoseg.inference.models import build_inference_network
    from autoseg.inference.onnx_export import (
        calibration_windows,
        network_to_onnx,
        quantize_int8,
        training_cases,
    )

    config = checkpoint_configuration(plans, configuration, data["configuration"], path)
    num_classes = int(data["plans"]["num_classes"])
    net = build_inference_network(config, num_classes, data["model"], path)
    shape = (1, config.input_channels, *config.patch_size)
    say = report or (lambda line: None)
    say(f"{configuration} fold {fold}: ONNX graph (fp32)")
    members = {onnx_member(configuration, fold, "fp32"): network_to_onnx(net, shape, weights_sha256=digest)}
    if "int8" in kinds:
        windows = calibration_windows(work, configuration, config, num_classes, fold, calibration_cases)
        own = training_cases(work, configuration, fold)[1]
        say(f"{configuration} fold {fold}: int8 quantisation, calibrated on {len(windows)} "
            + ("of the fold's training cases" if own else "preprocessed cases (no usable splits.json: the fold's "
               "validation cases may be among them)"))
        members[onnx_member(configuration, fold, "int8")] = quantize_int8(net, shape, windows, weights_sha256=digest)
    return members


def _check_graph_prerequisites(work: Path, selections: Sequence[ModelSelection], int8: bool) -> None:
    """What ``--format onnx`` / ``--int8`` need, checked before any fold is exported."""
    from autoseg.inference.engines import installed
    from autoseg.inference.onnx_export import training_cases

    if not installed("onnx"):
        raise ConfigError("--format onnx needs the onnx package: pip install 'autoseg[onnx]'")
    if int8:
        if not installed("onnxruntime"):
            raise ConfigError("--int8 needs ONNX Runtime's quantisation tools: pip install 'autoseg[onnx]'")
        for selection in selections:
            training_cases(work, selection.configuration, selection.folds[0])  # raises without preprocessed data


def checkpoint_configuration(plans: Plans, name: str, config: dict[str, Any], path: Path) -> Configuration:
    """A checkpoint's own configuration (what its network was built from), parsed with WORK's plans."""
    try:
        return plans_io.from_dict(plans_io.with_configuration(plans_io.to_dict(plans), name, config)).configurations[name]
    except PlanError as exc:
        raise ConfigError(f"{path}: the checkpoint's configuration is invalid ({exc})") from None


def _best_yaml(default: dict[str, Any], from_find_best: bool) -> bytes:
    import yaml

    why = ("find-best's choice and postprocessing in the experiment, with the exported folds" if from_find_best
           else "the exported configurations and folds")
    header = f"# written by 'autoseg export': what this model predicts with by default ({why}).\n"
    return (header + yaml.safe_dump(default, sort_keys=False, default_flow_style=None)).encode("utf-8")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Importing: a model file as an experiment folder


@dataclass(frozen=True)
class ImportSummary:
    """What ``autoseg import`` wrote: the folder and the model's configurations and folds."""

    work: Path
    configurations: dict[str, list[int]]
    checkpoint: str
    manifest: dict[str, Any] = field(default_factory=dict)


def import_model(model: Path | ModelFile, work: Path) -> ImportSummary:
    """Write a model file as an experiment folder that ``predict``, ``export`` and ``evaluate --labels`` take.

    ``WORK/plans.yaml``, ``dataset.json``, ``best.yaml``, ``MODEL.md`` and, per fold,
    ``models/<configuration>/fold_<k>/checkpoint_final.pt`` in the trainer's format (whatever
    checkpoint kind was exported: the folder holds one per fold, as ``final``), and the fold's ONNX
    graphs beside it (``checkpoint_final.fp32.onnx``, ``.int8.onnx``; :func:`graph_path`). The folder is
    built beside its final name and renamed into place, so a failure leaves nothing behind.

    Raises:
        ModelFileError: the model file fails a check (:func:`read_model`).
        ConfigError: ``work`` exists and is not an empty folder.
    """
    import torch

    from autoseg.checkpoint import save_checkpoint

    work = Path(work)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise ConfigError(f"-o {work}: exists and is not an empty folder; choose a new folder")
    parsed = model if isinstance(model, ModelFile) else read_model(Path(model))
    work.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}import-", dir=work.parent))
    try:
        for name, data in parsed.members.items():
            (staging / name).write_bytes(data)
        for weights in parsed.weights:
            payload: dict[str, Any] = dict(weights.meta)
            payload["format"] = CHECKPOINT_FORMAT
            payload["model"] = {k: torch.from_numpy(v) for k, v in weights.state.items()}
            target = checkpoint_path(staging, weights.configuration, weights.fold, "final")
            save_checkpoint(target, payload)
            for (configuration, fold, kind), graph in parsed.graphs.items():
                if (configuration, fold) == (weights.configuration, weights.fold):
                    graph_path(target, kind).write_bytes(graph)
        if work.is_dir():
            work.rmdir()
        staging.rename(work)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportSummary(work, parsed.configurations, parsed.checkpoint, parsed.manifest)


# ----------------------------------------------------------------------------------------------
# A WORK folder or a model file, as one thing to predict with


@dataclass(frozen=True)
class ModelSource:
    """What :func:`open_model` yields: an experiment folder to select models from.

    Attributes:
        work: the WORK folder, or the temporary one a model file was imported into.
        model_file: the model file, or None for a WORK folder.
        checkpoint: the checkpoint kind predicted with (a model file's: the one it holds).
    """

    work: Path
    model_file: Path | None
    checkpoint: str

    def select(self, configurations: Sequence[str] | None = None,
               folds: Sequence[int] | None = None) -> tuple[list[ModelSelection], dict[str, Any] | None]:
        """:func:`autoseg.inference.models.select_models` of the source (messages name the model file)."""
        kind = "final" if self.model_file is not None else self.checkpoint
        try:
            return select_models(self.work, configurations, folds, kind)
        except AutosegError as exc:
            if self.model_file is None:
                raise
            # The temporary folder means nothing to the user: name the model file instead.
            text = str(exc).replace(str(self.work), str(self.model_file))
            raise (ConfigError(text) if isinstance(exc, UnknownNameError) else type(exc)(text)) from None


@contextlib.contextmanager
def open_model(source: Path, checkpoint: str | None = None) -> Iterator[ModelSource]:
    """A WORK folder as it is, or a model file verified and imported into a temporary folder that is
    removed when the block ends (everything that predicts then reads one kind of source).

    Args:
        source: a WORK folder or a model file.
        checkpoint: ``final``, ``best`` or ``latest`` for a WORK folder (None: ``final``); for a
            model file None or the kind it holds.

    Raises:
        ModelFileError: the model file fails a check.
        ConfigError: ``source`` does not exist, or a model file holds another checkpoint kind.
    """
    source = Path(source)
    if source.is_dir():
        yield ModelSource(source, None, checkpoint or "final")
        return
    if not source.exists():
        raise ConfigError(f"{source}: not found; give an experiment folder (WORK) or a model file")
    parsed = read_model(source)
    if checkpoint is not None and checkpoint != parsed.checkpoint:
        raise ConfigError(f"--checkpoint {checkpoint}: {source} holds the {parsed.checkpoint} checkpoint of each fold "
                          f"(chosen at export); leave out --checkpoint, or export again with --checkpoint {checkpoint}")
    folder = Path(tempfile.mkdtemp(prefix="autoseg-model-"))
    try:
        kind = parsed.checkpoint
        import_model(parsed, folder / "work")
        del parsed
        yield ModelSource(folder / "work", source, kind)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["ExportSummary", "ImportSummary", "ModelSource", "export_model", "import_model", "open_model"]
