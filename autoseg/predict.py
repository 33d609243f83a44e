"""The ``predict`` stage: trained folds -> label maps (and probabilities) in the input's geometry.

Layers, each usable on its own:

* :func:`autoseg.predict_window.sliding_window` — the pure core on tensors (windows, Gaussian
  weights, mirroring TTA).
* :class:`Predictor` — the networks of the requested configurations and folds, loaded once;
  ``predict(image, geometry)`` runs the SAME preprocessing as training
  (:func:`autoseg.preprocessing.pipeline.preprocess_case`), averages the folds' logits (nnU-Net v2
  and DESIGN §7), takes the softmax, and ``export(...)`` puts the probabilities back into the
  original grid class by class, averages configurations there, and writes the argmax.
* :func:`run` — files in, files out: input discovery, checks before any work, ``--continue``.

Model selection (:func:`select_models`) and input discovery (:func:`find_input_cases`) are
torch-free, so bad input is reported before torch is imported (about 1 s of start-up).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg import plans as plans_io
from autoseg.atomic import atomic_path
from autoseg.checkpoint import load_checkpoint
from autoseg.device import resolve_device
from autoseg.errors import ConfigError, DatasetError, PlanError, UnknownNameError
from autoseg.imageio import (
    SPACING_2D_AXIS,
    SUPPORTED_ENDINGS,
    Geometry,
    is_dicom_file,
    read_image,
    read_info,
    strip_ending,
    write_image,
)
from autoseg.plans import Configuration, Plans

if TYPE_CHECKING:
    import torch

    from autoseg.preprocessing.pipeline import Props

log = logging.getLogger(__name__)

#: Which checkpoint of a fold to use.
CHECKPOINT_KINDS = ("final", "best", "latest")
#: Output endings for inputs whose format keeps the voxels in a second file (.mhd + .raw,
#: .nhdr + .raw): a single-file equivalent, so that the atomic rename moves everything.
_SINGLE_FILE_ENDING = {".mhd": ".mha", ".nhdr": ".nrrd"}
#: Label-map ending of a DICOM series input (``--output-format auto`` or ``nifti``).
DICOM_OUTPUT_ENDING = ".nii.gz"
#: ``--output-format`` values: ``auto`` (the input's format; NIfTI for a DICOM series), ``nifti``
#: (``.nii.gz``), ``dicom-seg`` (a DICOM SEG ``<case>.dcm`` referencing the input series).
OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_FOLD_FOLDER = re.compile(r"^fold_(\d+)$")


# ----------------------------------------------------------------------------------------------
# Which models (torch-free)


@dataclass(frozen=True)
class ModelSelection:
    """The folds of one configuration to predict with.

    Attributes:
        configuration: the configuration's name (``3d_fullres``, ``2d``, ...).
        folds: fold indices, ascending.
        checkpoints: one checkpoint file per fold, same order.
    """

    configuration: str
    folds: tuple[int, ...]
    checkpoints: tuple[Path, ...]


def fold_folder(work: Path, configuration: str, fold: int) -> Path:
    """``WORK/models/<configuration>/fold_<fold>``."""
    return Path(work) / "models" / configuration / f"fold_{fold}"


def checkpoint_path(work: Path, configuration: str, fold: int, checkpoint: str = "final") -> Path:
    """``WORK/models/<configuration>/fold_<fold>/checkpoint_<checkpoint>.pt``."""
    return fold_folder(work, configuration, fold) / f"checkpoint_{checkpoint}.pt"


def _check_kind(checkpoint: str) -> None:
    if checkpoint not in CHECKPOINT_KINDS:
        raise UnknownNameError("checkpoint", checkpoint, CHECKPOINT_KINDS, "--checkpoint")


def trained_models(work: Path, checkpoint: str = "final") -> dict[str, list[int]]:
    """Every configuration of ``work`` with at least one fold that has the given checkpoint.

    Args:
        work: the experiment folder.
        checkpoint: ``final``, ``best`` or ``latest``.

    Returns:
        ``{configuration: [folds, ascending]}``, configurations sorted by name.

    Raises:
        UnknownNameError: ``checkpoint`` is not a checkpoint kind.
    """
    _check_kind(checkpoint)
    models = Path(work) / "models"
    trained: dict[str, list[int]] = {}
    if not models.is_dir():
        return trained
    for config_dir in sorted(p for p in models.iterdir() if p.is_dir()):
        folds = []
        for fold_dir in config_dir.iterdir():
            match = _FOLD_FOLDER.match(fold_dir.name)
            if match and (fold_dir / f"checkpoint_{checkpoint}.pt").is_file():
                folds.append(int(match.group(1)))
        if folds:
            trained[config_dir.name] = sorted(folds)
    return trained


def _read_best(work: Path) -> dict[str, Any] | None:
    """WORK/best.yaml (written by ``autoseg find-best``), or None when absent."""
    path = Path(work) / "best.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix it or delete it "
                          "and pass -c") from None
    configs = data.get("configurations") if isinstance(data, dict) else None
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"{path}: 'configurations' must be a non-empty list of names; re-run "
                          "'autoseg find-best' or pass -c")
    folds = data.get("folds")
    if folds is not None and (not isinstance(folds, list) or not all(isinstance(f, int) for f in folds)):
        raise ConfigError(f"{path}: 'folds' must be a list of fold numbers; re-run 'autoseg find-best'")
    return data


def select_models(
    work: Path,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "final",
) -> tuple[list[ModelSelection], dict[str, Any] | None]:
    """Resolve which configurations and folds to predict with.

    Default configurations: WORK/best.yaml's ``configurations`` (and its ``folds`` unless
    ``folds`` is given) when it exists, else the single trained configuration. Default folds:
    every trained fold of each configuration.

    Args:
        work: the experiment folder.
        configurations: requested configuration names, or None for the default.
        folds: requested folds (the same for every configuration), or None for all trained ones.
        checkpoint: ``final``, ``best`` or ``latest``.

    Returns:
        The selections, in the requested order, and best.yaml's content when it was used (its
        ``postprocessing`` applies), else None.

    Raises:
        PlanError: WORK has no plans.yaml (not an experiment folder).
        UnknownNameError: a configuration is not planned (with a did-you-mean), or a bad checkpoint kind.
        ConfigError: nothing is trained, several configurations are trained and none is chosen,
            or a requested fold or configuration has no trained checkpoint.
    """
    work = Path(work)
    _check_kind(checkpoint)
    plans_path = work / "plans.yaml"
    if not plans_path.is_file():
        raise PlanError(f"{work}: not an experiment folder (no plans.yaml); pass the WORK folder of "
                        "'autoseg plan' and 'autoseg train'")
    trained = trained_models(work, checkpoint)
    if not trained:
        raise ConfigError(f"{work}: no trained model (no models/<config>/fold_<k>/checkpoint_{checkpoint}.pt); "
                          f"train one first with 'autoseg train {work} -c CONFIG -f 0'")
    best = None
    best_path = work / "best.yaml"

    def where(name: str) -> str:
        return f"{best_path}: {name}" if best is not None else f"-c {name}"

    if configurations:
        names = list(dict.fromkeys(configurations))
    else:
        best = _read_best(work)
        if best is not None:
            names = list(dict.fromkeys(best["configurations"]))
            if folds is None and best.get("folds"):
                folds = best["folds"]
        elif len(trained) == 1:
            names = list(trained)
        else:
            raise ConfigError(f"{work}: several configurations are trained ({_describe(trained)}) and there is "
                              "no best.yaml; choose with -c (or run 'autoseg find-best')")
    planned = _planned_configurations(plans_path)
    selections = []
    for name in names:
        if name not in trained:
            if name not in planned:
                raise UnknownNameError("configuration", name, set(planned) | set(trained), where(name))
            raise ConfigError(f"{where(name)}: configuration {name!r} has no trained fold "
                              f"(checkpoint_{checkpoint}.pt); trained: {_describe(trained)}")
        chosen = sorted(set(int(f) for f in folds)) if folds is not None else trained[name]
        missing = [f for f in chosen if f not in trained[name]]
        if missing:
            raise ConfigError(f"-f {' '.join(str(f) for f in missing)}: {name} fold(s) {missing} not trained "
                              f"(no checkpoint_{checkpoint}.pt); trained folds of {name}: {trained[name]}")
        selections.append(ModelSelection(name, tuple(chosen),
                                         tuple(checkpoint_path(work, name, f, checkpoint) for f in chosen)))
    return selections, best


def _planned_configurations(plans_path: Path) -> list[str]:
    # Only the names: a hand-edited plans file with an unrelated error still lets -c report typos.
    import yaml

    try:
        data = yaml.safe_load(plans_path.read_text(encoding="utf-8"))
        return [str(k) for k in data.get("configurations", {})]
    except (yaml.YAMLError, AttributeError, OSError):
        return []


def _describe(trained: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} (folds {' '.join(str(f) for f in folds)})" for name, folds in trained.items())


# ----------------------------------------------------------------------------------------------
# Which inputs (torch-free)


@dataclass(frozen=True)
class InputCase:
    """One image to predict: its file(s) and the name of its output.

    Attributes:
        case_id: the output's name without ending.
        images: one file per channel, or one file carrying every channel (MSD 4D, RGB).
        ending: the output file's ending (the input's; ``.mhd``/``.nhdr`` become ``.mha``/``.nrrd``).
    """

    case_id: str
    images: tuple[Path, ...]
    ending: str


def _output_ending(path: Path) -> str:
    ending = strip_ending(path.name)[1].lower()
    return _SINGLE_FILE_ENDING.get(ending, ending)


def find_input_cases(inputs: Sequence[Path], num_channels: int) -> list[InputCase]:
    """The cases of the ``-i`` arguments: folders, single files, or several files.

    In a folder and among the given files, names ``{case}_{CCCC}{ending}`` are grouped into one
    case when the files of channels ``0 .. num_channels - 1`` are all there (nnU-Net's naming);
    any other image is a case of its own (an MSD 4D file carries all channels itself). A folder
    without images is searched for DICOM series: each folder in or below it that holds DICOM files
    is one case named after that folder (:func:`autoseg.predict_dicom.find_dicom_series`).

    Args:
        inputs: folders and/or image files.
        num_channels: the model's input channels.

    Returns:
        The cases, sorted by id.

    Raises:
        DatasetError: an input does not exist, has an unsupported ending, a folder holds no
            image and no DICOM series, a series folder holds other files, or two inputs would
            write the same output.
    """
    from autoseg.dataset import discover_images

    cases: list[InputCase] = []
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = discover_images(path, num_channels)
            if found:
                _check_no_dicom_beside_images(path)
                cases.extend(InputCase(c.case_id, c.images, _output_ending(c.images[0])) for c in found)
                continue
            series = _dicom_cases(path)
            if not series:
                raise DatasetError(f"{path}: no images in this folder (supported endings: "
                                   f"{', '.join(SUPPORTED_ENDINGS)}) and no DICOM series in it or below")
            cases.extend(series)
        elif path.is_file():
            if not strip_ending(path.name)[1]:
                if is_dicom_file(path):
                    raise DatasetError(f"{path}: a single DICOM file; give the folder of its series (-i "
                                       f"{path.parent})")
                raise DatasetError(f"{path}: unsupported file type; autoseg reads {', '.join(SUPPORTED_ENDINGS)} "
                                   "and folders of DICOM series")
            files.append(path)
        else:
            raise DatasetError(f"{path}: input not found")
    cases.extend(_group_files(files, num_channels))
    cases.sort(key=lambda c: c.case_id)
    for first, second in zip(cases, cases[1:]):
        if first.case_id == second.case_id:
            raise DatasetError(f"{first.images[0]} and {second.images[0]} would both be written as case "
                               f"{first.case_id!r}; rename one or predict them separately")
    return cases


def _dicom_cases(folder: Path) -> list[InputCase]:
    """One case per DICOM series folder in or below ``folder``; label maps as NIfTI (``.nii.gz``)."""
    from autoseg.predict_dicom import find_dicom_series

    return [InputCase(case_id, (series,), DICOM_OUTPUT_ENDING) for case_id, series in find_dicom_series(folder)]


def _check_no_dicom_beside_images(folder: Path) -> None:
    """Raise when a folder of images also holds DICOM files (which would be silently left out)."""
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not strip_ending(entry.name)[1] and not entry.name.startswith(".") \
                and is_dicom_file(entry):
            raise DatasetError(f"{folder}: holds both images and DICOM files ({entry.name}); put the DICOM series in "
                               "a folder of its own and give both with -i")


def is_dicom_case(case: InputCase) -> bool:
    """True when the case is a DICOM series (its one input is the series' folder)."""
    return len(case.images) == 1 and case.images[0].is_dir()


def _group_files(files: Sequence[Path], num_channels: int) -> list[InputCase]:
    """Explicit files into cases, grouping ``{case}_{CCCC}`` names of one folder like a folder's."""
    groups: dict[tuple[Path, str, str], dict[int, Path]] = {}
    cases: list[InputCase] = []
    for path in dict.fromkeys(Path(f).resolve() for f in files):
        stem, ending = strip_ending(path.name)
        match = _CHANNEL_FILE.match(stem)
        if match:
            groups.setdefault((path.parent, match.group("case"), ending), {})[int(match.group("channel"))] = path
        else:
            cases.append(InputCase(stem, (path,), _output_ending(path)))
    for (_, case_id, _), channels in groups.items():
        if sorted(channels) == list(range(num_channels)):
            images = tuple(channels[c] for c in range(num_channels))
            cases.append(InputCase(case_id, images, _output_ending(images[0])))
        else:
            cases.extend(InputCase(strip_ending(p.name)[0], (p,), _output_ending(p)) for p in channels.values())
    return cases


def _is_2d_plans(plans: Plans) -> bool:
    """True when the training images were 2D files (the reader gives their missing axis 999 mm)."""
    return float(plans.original_median_spacing[0]) == SPACING_2D_AXIS


def check_inputs(cases: Sequence[InputCase], plans: Plans, configurations: Sequence[str]) -> None:
    """Check every case's headers against the model before any prediction starts (cheap: no pixels).

    Raises:
        DatasetError: a file is unreadable, has the wrong channel count, differs in shape from the
            case's other channel files, or has the wrong dimensionality for the model (a 3D image
            for a model trained on 2D images, a 2D image for a 3D configuration).
    """
    expected = len(plans.channel_names)
    trained_2d = _is_2d_plans(plans)
    needs_3d = [name for name in configurations if plans.configurations[name].dims == 3]
    for case in cases:
        channels = 0
        shape = None
        for path in case.images:
            info = read_info(path)
            channels += info.channels
            if shape is not None and info.shape != shape:
                raise DatasetError(f"{path}: shape {info.shape} differs from {case.images[0].name}'s {shape}; "
                                   "the channel files of a case must share one grid")
            shape = info.shape
            if trained_2d and info.shape[0] > 1:
                raise DatasetError(f"{path}: 3D image of shape {info.shape}; this model was trained on 2D images "
                                   "— give 2D images (PNG/TIF or single-slice files)")
            if needs_3d and info.geometry.ndim == 2:
                raise DatasetError(f"{path}: 2D image; {needs_3d[0]} is a 3D model — use a 2d or 2.5d "
                                   "configuration (-c 2d) for 2D images")
        if channels != expected:
            files = case.images[0] if len(case.images) == 1 else f"case {case.case_id!r} ({len(case.images)} files)"
            raise DatasetError(f"{files}: {channels} channel(s); the model expects {expected} "
                               f"({', '.join(plans.channel_names)})"
                               + ("; give one file per channel named {case}_0000, {case}_0001, ..."
                                  if expected > 1 and channels == 1 else ""))


def read_input(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """Read a case's file(s) as ``(C, Z, Y, X)``, with the geometry of its first file (used for the output).

    Raises:
        DatasetError: a file is unreadable or the channel files differ in shape.
    """
    arrays: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in case.images:
        array, geom = read_image(path)
        if arrays and array.shape[1:] != arrays[0].shape[1:]:
            raise DatasetError(f"{path}: shape {array.shape[1:]} differs from {case.images[0].name}'s "
                               f"{arrays[0].shape[1:]}; the channel files of a case must share one grid")
        arrays.append(array)
        geometry = geometry or geom
    assert geometry is not None  # a case has at least one file
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return image, geometry


# ----------------------------------------------------------------------------------------------
# The predictor


@contextlib.contextmanager
def _without_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s fill functions no-ops while a network whose weights are loaded
    right after is built (what Hugging Face's ``no_init_weights`` does).

    The He initialisation of every parameter (5.6 M in the default Hippocampus plan, 30 M+ in
    large plans) is wasted work before a checkpoint is loaded. Building on the meta device instead
    was slower: PyTorch runs meta ``normal_`` through its Python reference implementations, which
    import ``torch._dynamo`` (1.2 s of a 4 s single-case call).
    """
    from torch.nn import init

    names = [n for n in ("kaiming_normal_", "kaiming_uniform_", "xavier_normal_", "xavier_uniform_", "normal_",
                         "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_") if hasattr(init, n)]
    saved = {name: getattr(init, name) for name in names}

    def keep(tensor: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
        return tensor

    for name in names:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _build_network(config: Configuration, num_classes: int, state: dict[str, Any], path: Path) -> "torch.nn.Module":
    """The inference network of ``config`` with the weights ``state``, on the CPU, in eval mode."""
    from autoseg.networks import build_network

    with _without_weight_init():
        net = build_network(config.topology, config.input_channels, num_classes, deep_supervision=False)
    try:
        # assign: the module takes the checkpoint's tensors (no copy of the weights).
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: weights do not fit the network of its configuration "
                          f"({str(exc).splitlines()[0]}); the checkpoint is damaged or edited") from None
    net.deep_supervision = False
    return net.eval()


@dataclass
class _ConfigModels:
    """What one configuration needs at prediction time."""

    name: str
    plans: Plans
    config: Configuration
    nets: list["torch.nn.Module"]
    folds: tuple[int, ...]
    memory_format: "torch.memory_format"


@dataclass(frozen=True)
class ConfigPrediction:
    """One configuration's prediction of a case, on its preprocessed grid.

    Attributes:
        configuration: the configuration's name.
        probabilities: float32 ``(K, z, y, x)`` softmax of the fold-averaged logits (region-based
            labels: ``(R, z, y, x)``, the sigmoid of each region output).
        props: the case's preprocessing record (what the inverse needs).
        disagreement: float32 ``(z, y, x)`` fraction of pairs of folds whose labels differ
            (:func:`autoseg.uncertainty.fold_disagreement`), when predicted with ``uncertainty=True``.
        folds: how many folds were averaged.
    """

    configuration: str
    probabilities: np.ndarray
    props: "Props"
    disagreement: np.ndarray | None = None
    folds: int = 1


@dataclass
class PredictorStats:
    """Time spent, for benchmarks: network calls only, and everything of ``predict``."""

    forward_s: float = 0.0
    forward_calls: int = 0
    samples: int = 0
    windows: int = 0
    predict_s: float = 0.0
    preprocess_s: float = 0.0
    export_s: float = 0.0


class Predictor:
    """The networks of the requested configurations and folds, loaded once, and their use.

    Args:
        work: the experiment folder (its plans.yaml; the checkpoints' own configuration wins for
            the network and preprocessing, so an edited plans.yaml cannot silently change them).
        selections: configurations and folds (:func:`select_models`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        tta: mirroring test-time augmentation over the trained mirror axes (all spatial axes of
            the patch: 8 passes in 3D, 4 in 2D).
        step: window stride as a fraction of the patch (0.5: nnU-Net).
        amp: autocast (bf16 where supported, else fp16) on CUDA; never on the CPU, where this
            project's CPUs have no bf16 units (~100x slower).
        forward_batch: samples per network call (default from the patch size and the device).
        profile: synchronise CUDA around network calls so that ``stats.forward_s`` is exact.

    Raises:
        ConfigError: a checkpoint is missing, unreadable, or does not fit the others; bad device.
        PlanError: WORK's plans.yaml is missing or invalid.
    """

    def __init__(self, work: Path, selections: Sequence[ModelSelection], *, device: str = "auto",
                 tta: bool = True, step: float = 0.5, amp: bool = True, forward_batch: int | None = None,
                 profile: bool = False) -> None:
        import torch

        if not 0 < step <= 1:
            raise ConfigError(f"--step {step}: must be in (0, 1] (a fraction of the patch; 0.5 = half overlap)")
        if not selections:
            raise ConfigError("no configuration to predict with")
        self.work = Path(work)
        self.device = resolve_device(device)
        self.tta = tta
        self.step = float(step)
        self.forward_batch = forward_batch
        self.profile = profile
        self.stats = PredictorStats()
        self._autocast = None
        if amp and self.device.type == "cuda":
            self._autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "cpu":
            from autoseg.predict_cpu import keep_freed_memory

            keep_freed_memory()  # 10-14 % faster forward passes (autoseg.predict_cpu)
        work_plans = plans_io.load(self.work / "plans.yaml")
        self.models: list[_ConfigModels] = []
        meta: dict[str, Any] | None = None
        for selection in selections:
            models, ckpt_meta = self._load_configuration(work_plans, selection)
            if meta is not None and ckpt_meta["labels"] != meta["labels"]:
                raise ConfigError(f"{selection.configuration} predicts labels {ckpt_meta['labels']}, "
                                  f"{self.models[0].name} {meta['labels']}: configurations of one "
                                  "prediction must share their labels")
            meta = meta or ckpt_meta
            self.models.append(models)
        assert meta is not None
        self.labels: dict[str, list[int]] = {str(k): [int(v) for v in vals] for k, vals in meta["labels"].items()}
        self.num_classes = int(meta["num_classes"])
        self.channel_names: tuple[str, ...] = tuple(meta["channel_names"])
        self.regions: np.ndarray | None = _region_membership(self.labels, self.num_classes, self.models[0].name)
        # Label maps store the class index, which is the label value (labels are 0..N consecutive);
        # region outputs are sigmoids, exported by autoseg.regions.regions_to_labels.
        self.plans = self.models[0].plans

    # -- loading

    def _load_configuration(self, work_plans: Plans, selection: ModelSelection) -> tuple[_ConfigModels, dict[str, Any]]:
        import torch

        nets: list[torch.nn.Module] = []
        plans: Plans | None = None
        reference: dict[str, Any] | None = None
        meta: dict[str, Any] = {}
        for fold, path in zip(selection.folds, selection.checkpoints):
            data = load_checkpoint(path, ("model", "configuration_name", "configuration", "plans"))
            if data["configuration_name"] != selection.configuration:
                raise ConfigError(f"{path}: checkpoint of configuration {data['configuration_name']!r}, found in "
                                  f"the folder of {selection.configuration!r}; move it back or re-train")
            if reference is None:
                reference, meta = data["configuration"], data["plans"]
                plans = self._plans_with(work_plans, selection.configuration, reference, meta, path)
            elif data["configuration"] != reference or data["plans"] != meta:
                raise ConfigError(f"{path}: fold {fold} was trained with another plan than fold "
                                  f"{selection.folds[0]} of {selection.configuration}; re-train it")
            assert plans is not None
            config = plans.configurations[selection.configuration]
            net = _build_network(config, int(meta["num_classes"]), data["model"], path)
            del data
            memory_format = torch.contiguous_format
            if self.device.type == "cpu":
                from autoseg.predict_cpu import prepare_for_cpu_inference

                # Channels-last and autoseg.predict_cpu's inference network (in-place norm, no
                # decoder concatenation copy, oneDNN with packed weights). Channels-last alone made
                # the default plan's 3D network 1.17x faster than NCDHW on the 2-core CPU (0.116
                # against 0.136 s per 40x56x40 sample, batch 2), its 2D network 1.17x.
                memory_format = torch.channels_last_3d if config.dims == 3 else torch.channels_last
                net = prepare_for_cpu_inference(net)
            nets.append(net.to(device=self.device, memory_format=memory_format))
        assert plans is not None
        config = plans.configurations[selection.configuration]
        return _ConfigModels(selection.configuration, plans, config, nets, selection.folds, memory_format), meta

    @staticmethod
    def _plans_with(work_plans: Plans, name: str, config: dict[str, Any], meta: dict[str, Any], path: Path) -> Plans:
        """WORK's plans with the checkpoint's configuration, labels, channels and transpose."""
        data = plans_io.to_dict(work_plans)
        data["configurations"] = {name: config}
        data["recommended"] = [name]
        data["labels"] = {str(k): [int(v) for v in vals] for k, vals in meta["labels"].items()}
        data["channel_names"] = list(meta["channel_names"])
        data["transpose"] = list(meta["transpose"])
        try:
            return plans_io.from_dict(data)
        except PlanError as exc:
            raise ConfigError(f"{path}: the checkpoint's configuration is invalid ({exc})") from None

    # -- prediction

    @property
    def configurations(self) -> tuple[str, ...]:
        """The configurations' names, in the requested order."""
        return tuple(m.name for m in self.models)

    def mirror_axes(self, configuration: str) -> tuple[int, ...]:
        """The TTA mirror axes of a configuration: the axes mirrored in training (every spatial
        axis of the patch, :func:`autoseg.data.augment.mirror_axes`); empty without TTA."""
        config = next(m.config for m in self.models if m.name == configuration)
        return tuple(range(config.dims)) if self.tta else ()

    def _net_fn(self, models: _ConfigModels, nets: Sequence["torch.nn.Module"] | None = None,
                ) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """The folds' mean logits (of ``nets``, default every fold of ``models``) as one function."""
        import torch

        stats, sync = self.stats, self.profile and self.device.type == "cuda"
        autocast = self._autocast
        nets = list(models.nets if nets is None else nets)

        def net_fn(x: torch.Tensor) -> torch.Tensor:
            if sync:
                torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            with torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = nets[0](x).float()
                for net in nets[1:]:
                    out += net(x).float()
            if len(nets) > 1:
                out /= len(nets)  # the folds' mean logits (nnU-Net v2)
            if sync:
                torch.cuda.synchronize(self.device)
            stats.forward_s += time.perf_counter() - started
            stats.forward_calls += len(nets)
            stats.samples += x.shape[0] * len(nets)
            return out

        return net_fn

    def predict(self, image: np.ndarray, geometry: Geometry,
                progress: Callable[[int, int], None] | None = None, *,
                uncertainty: bool = False) -> list[ConfigPrediction]:
        """Probabilities of every configuration for one image, each on its preprocessed grid.

        Args:
            image: ``(C, Z, Y, X)`` as read by :func:`autoseg.imageio.read_image`.
            geometry: the image's geometry.
            progress: ``progress(done, total)`` over the windows of all configurations.
            uncertainty: also the folds' disagreement (``ConfigPrediction.disagreement``): the
                folds then run one sliding window each (the same network calls, one more logits
                volume in memory), see :meth:`_fold_logits`.

        Returns:
            One :class:`ConfigPrediction` per configuration.

        Raises:
            DatasetError: the image has the wrong channel count or dimensionality for the model.
        """
        import torch

        from autoseg.predict_window import count_windows, sliding_window
        from autoseg.preprocessing.pipeline import plan_digest, preprocess_case

        started = time.perf_counter()
        self._check_image(image, geometry)
        prepared: dict[str, tuple[np.ndarray, Props]] = {}
        jobs = []
        for models in self.models:
            # 2d and 2.5d (and 3d_cascade_fullres / 3d_fullres) share their preprocessing.
            digest = plan_digest(models.plans, models.name)
            if digest not in prepared:
                t0 = time.perf_counter()
                data, _, props = preprocess_case(image, None, geometry, models.plans, models.name)
                self.stats.preprocess_s += time.perf_counter() - t0
                prepared[digest] = (data, props)
            jobs.append((models, *prepared[digest]))
        totals = [count_windows(data.shape[1:], m.config.patch_size, self.step) for m, data, _ in jobs]
        self.stats.windows += sum(totals)
        results = []
        for index, (models, data, props) in enumerate(jobs):
            done_before = sum(totals[:index])

            def report(done: int, total: int, offset: int = done_before) -> None:
                if progress is not None:
                    progress(offset + done, sum(totals))

            disagreement = None
            with torch.inference_mode():
                tensor = torch.from_numpy(data).to(self.device)
                if uncertainty and len(models.nets) > 1:
                    logits, disagreement = self._fold_logits(models, tensor, report)
                else:
                    logits = sliding_window(
                        self._net_fn(models), tensor, models.config.patch_size, self.step,
                        mirror_axes=self.mirror_axes(models.name), context_slices=models.config.context_slices,
                        forward_batch=self.forward_batch, memory_format=models.memory_format, progress=report,
                    )
                    if uncertainty:  # one fold cannot disagree with itself
                        disagreement = np.zeros(tuple(logits.shape[1:]), dtype=np.float32)
                del tensor
                if self.regions is not None:
                    logits.sigmoid_()  # region outputs: sigmoid of the folds' and mirrors' mean logits
                else:
                    # Softmax over classes in place: no second (K, z, y, x) volume.
                    logits -= logits.amax(dim=0, keepdim=True)
                    logits.exp_()
                    logits /= logits.sum(dim=0, keepdim=True)
                probabilities = logits.cpu().numpy()
            results.append(ConfigPrediction(models.name, probabilities, props, disagreement, len(models.nets)))
        self.stats.predict_s += time.perf_counter() - started
        return results

    def _fold_logits(self, models: _ConfigModels, tensor: "torch.Tensor",
                     progress: Callable[[int, int], None]) -> tuple["torch.Tensor", np.ndarray]:
        """The folds' mean logits, one sliding window per fold, and the folds' label disagreement.

        The sliding window is linear in the logits, so the mean of the folds' windows equals the
        window of their mean (what :meth:`_net_fn` computes), up to float rounding. Each fold's
        label map (argmax, or the region export rule) is kept as a uint8 volume (16-bit above 256
        classes), not its logits.
        """
        import torch

        from autoseg.predict_window import sliding_window
        from autoseg.uncertainty import fold_disagreement

        count = len(models.nets)
        total: torch.Tensor | None = None
        labels: list[np.ndarray] = []
        for fold, net in enumerate(models.nets):
            def report(done: int, windows: int, fold: int = fold) -> None:
                progress((fold * windows + done) // count, windows)

            logits = sliding_window(
                self._net_fn(models, [net]), tensor, models.config.patch_size, self.step,
                mirror_axes=self.mirror_axes(models.name), context_slices=models.config.context_slices,
                forward_batch=self.forward_batch, memory_format=models.memory_format, progress=report,
            )
            if self.regions is not None:  # the fold's own label map, by the export rule of its sigmoids
                from autoseg.regions import regions_to_labels

                labels.append(regions_to_labels(torch.sigmoid(logits).cpu().numpy(), self.regions))
            else:
                index = logits.argmax(dim=0)
                labels.append(index.to(torch.uint8 if logits.shape[0] <= 256 else torch.int16).cpu().numpy())
                del index
            if total is None:
                total = logits
            else:
                total += logits
                del logits
        assert total is not None
        total /= count
        return total, fold_disagreement(labels)

    def _check_image(self, image: np.ndarray, geometry: Geometry) -> None:
        if image.ndim != 4:
            raise DatasetError(f"expected an image (C, Z, Y, X), got shape {image.shape}")
        if image.shape[0] != len(self.channel_names):
            raise DatasetError(f"image has {image.shape[0]} channel(s); the model expects "
                               f"{len(self.channel_names)} ({', '.join(self.channel_names)})")
        if _is_2d_plans(self.plans) and image.shape[1] > 1:
            raise DatasetError(f"3D image of shape {image.shape[1:]}; this model was trained on 2D images")
        for models in self.models:
            if models.config.dims == 3 and geometry.ndim == 2:
                raise DatasetError(f"2D image; {models.name} is a 3D model — use a 2d or 2.5d configuration")

    def export(self, predictions: Sequence[ConfigPrediction], geometry: Geometry, path: Path | None = None,
               probabilities_path: Path | None = None,
               postprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The label map in the original geometry; optionally written, with the probabilities.

        See :func:`export_prediction`.
        """
        started = time.perf_counter()
        labels = export_prediction(predictions, geometry, path, probabilities_path, postprocess, regions=self.regions)
        self.stats.export_s += time.perf_counter() - started
        return labels


# ----------------------------------------------------------------------------------------------
# Export


class _NpyStream:
    """Writes one ``.npy`` member of a ``.npz`` archive slice by slice along its first axis.

    ``np.savez`` needs the whole array in memory; this holds one class volume at a time, so saving
    ``(K, Z, Y, X)`` probabilities costs one float16 volume, however many classes there are.
    """

    def __init__(self, archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.handle = archive.open(name + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def write(self, part: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(part, dtype=self.dtype).data)

    def close(self) -> None:
        self.handle.close()


def export_prediction(
    predictions: Sequence[ConfigPrediction],
    geometry: Geometry,
    path: Path | None = None,
    probabilities_path: Path | None = None,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """Average the configurations' probabilities in the original geometry and take the argmax.

    Class by class: each class is resampled back to the crop box (linear, separate axis as in the
    forward pass), averaged over configurations and folded into a running argmax, so the working
    memory is a few float32 volumes of the crop box whatever the number of classes — never a
    ``(K, Z, Y, X)`` float array. Outside the crop box the probability is 1 for class 0, as in
    :func:`autoseg.preprocessing.pipeline.revert_to_original`; for one configuration the label map
    equals :func:`autoseg.preprocessing.pipeline.export_segmentation`'s.

    Args:
        predictions: one per configuration, all of the same image (same crop box).
        geometry: the geometry read from the input: written as it is (no float round trip).
        path: where to write the label map (atomically; format from the ending), or None.
        probabilities_path: where to write float16 probabilities ``(K, Z, Y, X)`` in the original
            geometry as ``.npz`` (key ``probabilities``), or None.
        postprocess: applied to the label map before it is written (best.yaml's postprocessing).
        regions: for sigmoid region probabilities, the ``(R, V)`` membership of
            :func:`autoseg.regions.membership`: the label map follows
            :func:`autoseg.regions.regions_to_labels` (see :func:`_export_regions`).

    Returns:
        The ``(Z, Y, X)`` label map, uint8 (uint16 for more than 256 classes).

    Raises:
        ValueError: the predictions disagree on the crop box or the number of classes (a bug).
    """
    from autoseg.preprocessing.pipeline import to_crop

    if not predictions:
        raise ValueError("no prediction to export")
    first = predictions[0].props
    num_classes = predictions[0].probabilities.shape[0]
    for p in predictions[1:]:
        if p.props["bbox"] != first["bbox"] or p.probabilities.shape[0] != num_classes:
            raise ValueError("predictions of one image disagree on the crop box or the number of classes")
    shape = tuple(int(s) for s in first["shape_original"])
    transpose = tuple(int(a) for a in first["transpose"])
    box = tuple(slice(lo, hi) for lo, hi in first["bbox"])
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    if regions is not None:
        if regions.shape[0] != num_classes:
            raise ValueError(f"{num_classes} probability channels for {regions.shape[0]} regions")
        dtype = np.uint8 if regions.shape[1] <= 256 else np.uint16

    def class_probability(k: int) -> np.ndarray:
        total = None
        for p in predictions:
            part = to_crop(p.probabilities[k], p.props)
            if total is None:
                # A copy when resampling was a no-op, so the running argmax never writes into the input.
                total = np.array(part, dtype=np.float32, copy=np.shares_memory(part, p.probabilities))
            else:
                total += part
        assert total is not None
        if len(predictions) > 1:
            total /= len(predictions)
        return total

    def argmax(stream: _NpyStream | None) -> np.ndarray:
        best_value = best_label = None
        full = np.empty(shape, dtype=np.float16) if stream is not None else None
        for k in range(num_classes):
            score = class_probability(k)
            if best_value is None:
                best_value, best_label = score, np.zeros(score.shape, dtype=dtype)
            else:
                better = score > best_value  # strict: ties go to the lower class, as argmax does
                best_value[better] = score[better]
                best_label[better] = k
            if stream is not None and full is not None:
                full.fill(1.0 if k == 0 else 0.0)
                # Written before the next class updates best_value (class 0's score is that array).
                full.transpose(transpose)[box] = score
                stream.write(full)
        labels = np.zeros(shape, dtype=dtype)
        labels.transpose(transpose)[box] = best_label
        return labels

    if regions is not None:
        labels = _export_regions([class_probability(r) for r in range(num_classes)], regions, shape, transpose,
                                 box, probabilities_path)
    elif probabilities_path is not None:
        with atomic_path(Path(probabilities_path)) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                stream = _NpyStream(archive, "probabilities", (num_classes, *shape), np.dtype(np.float16))
                try:
                    labels = argmax(stream)
                finally:
                    stream.close()
    else:
        labels = argmax(None)
    if postprocess is not None:
        labels = np.asarray(postprocess(labels), dtype=dtype)
    if path is not None:
        write_image(Path(path), labels, geometry)
    return labels


def _export_regions(crop: list[np.ndarray], member: np.ndarray, shape: tuple[int, ...], transpose: tuple[int, ...],
                    box: tuple[slice, ...], probabilities_path: Path | None) -> np.ndarray:
    """The region branch of :func:`export_prediction`.

    The export rule needs every region at once, so the ``R`` region volumes of the crop box are
    held together (R is small: BraTS has 3). Outside the crop box every region's probability is 0
    (background). The ``.npz`` also holds ``regions``, the ``(R, V)`` membership as uint8, so that
    ``autoseg ensemble`` exports averaged region probabilities by the same rule.
    """
    from autoseg.regions import regions_to_labels

    if probabilities_path is not None:
        with atomic_path(Path(probabilities_path)) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                stream = _NpyStream(archive, "probabilities", (len(crop), *shape), np.dtype(np.float16))
                try:
                    full = np.empty(shape, dtype=np.float16)
                    for volume in crop:
                        full.fill(0.0)
                        full.transpose(transpose)[box] = volume
                        stream.write(full)
                finally:
                    stream.close()
                with archive.open("regions.npy", "w") as handle:
                    np.lib.format.write_array(handle, member.astype(np.uint8))
    labels = np.zeros(shape, dtype=np.uint8 if member.shape[1] <= 256 else np.uint16)
    labels.transpose(transpose)[box] = regions_to_labels(crop, member)
    return labels


def _region_membership(labels: dict[str, list[int]], num_outputs: int, configuration: str) -> np.ndarray | None:
    """The ``(R, V)`` region membership of a region-based checkpoint, None for softmax classes.

    Raises:
        ConfigError: the checkpoint's output count does not fit its labels (a region dataset
            trained before autoseg trained sigmoid region outputs).
    """
    from autoseg.regions import membership, num_outputs as expected_outputs, regions_of

    expected = expected_outputs(labels)
    if num_outputs != expected:
        raise ConfigError(f"{configuration}: the checkpoint has {num_outputs} outputs but its labels {labels} need "
                          f"{expected}; it was trained by an autoseg without region training, re-train it")
    regions = regions_of(labels)
    return None if regions is None else membership(regions)


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
    """

    output: Path
    selections: tuple[ModelSelection, ...]
    written: tuple[Path, ...]
    skipped: tuple[Path, ...]
    seconds: float
    device: str
    postprocessing: bool = False
    stats: PredictorStats = field(default_factory=PredictorStats)


def output_paths(case: InputCase, output: Path) -> tuple[Path, Path]:
    """The label map and the probabilities file of a case in ``output``."""
    return Path(output) / f"{case.case_id}{case.ending}", Path(output) / f"{case.case_id}.npz"


@dataclass(frozen=True)
class CaseOutputs:
    """Every file :func:`run` writes for one case.

    Attributes:
        labels: label maps, one per image format asked for (``auto``, ``nifti``); may be empty.
        seg: the DICOM SEG (``--output-format dicom-seg``), or None.
        probabilities: ``<case>.npz`` (``--save-probabilities``), or None.
        uncertainty: the entropy and disagreement maps (``--save-uncertainty``), or None.
    """

    labels: tuple[Path, ...]
    seg: Path | None = None
    probabilities: Path | None = None
    uncertainty: tuple[Path, Path] | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """All of them."""
        extra = (self.seg, self.probabilities, *(self.uncertainty or ()))
        return (*self.labels, *(p for p in extra if p is not None))

    @property
    def primary(self) -> Path:
        """The label map reported as written: the first image format's, else the SEG."""
        if self.labels:
            return self.labels[0]
        assert self.seg is not None
        return self.seg


def output_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``--output-format`` values, validated and de-duplicated (repeated or comma-separated).

    Raises:
        UnknownNameError: a value is not one of :data:`OUTPUT_FORMATS`.
    """
    words = [formats] if isinstance(formats, str) else list(formats)
    names = [w.strip().lower() for word in words for w in word.split(",") if w.strip()] or ["auto"]
    for name in names:
        if name not in OUTPUT_FORMATS:
            raise UnknownNameError("output format", name, OUTPUT_FORMATS, "--output-format")
    return tuple(dict.fromkeys(names))


def case_outputs(case: InputCase, output: Path, formats: Sequence[str] = ("auto",), *,
                 save_probabilities: bool = False, save_uncertainty: bool = False) -> CaseOutputs:
    """The files a case's prediction writes into ``output`` (see :class:`CaseOutputs`)."""
    from autoseg.uncertainty import uncertainty_paths

    output = Path(output)
    labels = [output / f"{case.case_id}{case.ending}" if fmt == "auto" else output / f"{case.case_id}.nii.gz"
              for fmt in formats if fmt in ("auto", "nifti")]
    return CaseOutputs(
        tuple(dict.fromkeys(labels)),
        output / f"{case.case_id}.dcm" if "dicom-seg" in formats else None,
        output_paths(case, output)[1] if save_probabilities else None,
        uncertainty_paths(output, case.case_id, case.ending) if save_uncertainty else None,
    )


def _check_output_outside_dicom_inputs(inputs: Sequence[Path], cases: Sequence[InputCase], output: Path) -> None:
    """A folder of DICOM series is searched below its top level: outputs written inside it would be
    read as inputs by the next run.

    Raises:
        ConfigError: ``-o`` is an ``-i`` folder holding DICOM series, or lies inside one.
    """
    if not any(is_dicom_case(case) for case in cases):
        return
    resolved = Path(output).resolve()
    for folder in (Path(p) for p in inputs):
        if folder.is_dir() and (resolved == folder.resolve() or folder.resolve() in resolved.parents):
            raise ConfigError(f"-o {output}: inside the input folder {folder}, which holds DICOM series; choose an "
                              "output folder outside it")


def _check_outputs(cases: Sequence[InputCase], outputs: dict[str, CaseOutputs], output: Path,
                   formats: Sequence[str]) -> None:
    """Raise before any work when an output would overwrite an input or another output.

    Raises:
        ConfigError: an output is an input file, lies in an input DICOM series folder, two
            outputs share a name, or ``dicom-seg`` is asked for an input that is no DICOM series.
        DatasetError: a DICOM series' headers do not allow a SEG (blank UIDs, multi-frame).
    """
    input_files = {p.resolve() for case in cases for p in case.images}
    resolved = output.resolve()
    for case in cases:
        if is_dicom_case(case) and (resolved == case.images[0].resolve()
                                    or case.images[0].resolve() in resolved.parents):
            raise ConfigError(f"-o {output}: inside the input DICOM series folder {case.images[0]}; choose an "
                              "output folder outside it")
    owner: dict[Path, str] = {}
    for case in cases:
        for target in outputs[case.case_id].files:
            if target.resolve() in input_files:
                raise ConfigError(f"-o {output}: would overwrite the input {target}; choose another output folder")
            if target in owner:
                raise ConfigError(f"{target.name}: written for case {owner[target]!r} and for case {case.case_id!r}; "
                                  "rename one of them or predict them separately")
            owner[target] = case.case_id
    if "dicom-seg" in formats:
        from autoseg.predict_dicom import check_seg_source, require_highdicom

        require_highdicom()
        for case in cases:
            if not is_dicom_case(case):
                raise ConfigError(f"--output-format dicom-seg: {case.images[0]} is not a DICOM series (a DICOM SEG "
                                  "references its source series); use --output-format auto or nifti for it")
            check_seg_source(case.images[0])


def segment_names(labels: dict[str, list[int]], regions: np.ndarray | None) -> dict[int, str]:
    """``{value: name}`` of every foreground value of the label map (for DICOM SEG segments).

    Softmax labels name their one value. With region-based labels the label map's values are the
    single values; a value that no single-valued label names is called ``label <value>``.
    """
    named = {int(values[0]): name for name, values in labels.items() if len(values) == 1 and int(values[0]) > 0}
    count = regions.shape[1] if regions is not None else 1 + max(named, default=0)
    return {value: named.get(value, f"label {value}") for value in range(1, count)}


def _postprocessor(best: dict[str, Any] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """best.yaml's postprocessing as a function of the label map; None when there is none to do.

    Raises:
        ConfigError: best.yaml's postprocessing record is invalid.
    """
    spec = best.get("postprocessing") if best else None
    if not spec:
        return None
    if importlib.util.find_spec("autoseg.postprocess") is None:
        log.info("best.yaml names postprocessing, but autoseg.postprocess is not installed: skipped")
        return None
    from autoseg.postprocess import PostprocessingDecision, apply_postprocessing

    decision = PostprocessingDecision.from_dict(spec, "best.yaml: postprocessing")
    if decision.is_noop:
        return None
    return lambda labels: apply_postprocessing(labels, decision)


def run(
    work: Path,
    inputs: Sequence[Path],
    output: Path,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "final",
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
) -> PredictSummary:
    """Predict every input case with the trained models of ``work``; write label maps to ``output``.

    Everything that can be checked without pixels is checked before the first prediction (and
    before torch is imported): the models, every input's header (channels, 2D/3D), the output
    folder. Each output is written atomically; a failure leaves no partial file.

    Args:
        work: the experiment folder.
        inputs: folders and/or image files (see :func:`find_input_cases`).
        output: the output folder (created).
        configurations: configuration names (default: see :func:`select_models`).
        folds: fold indices (default: every trained fold).
        checkpoint: ``final``, ``best`` or ``latest``.
        tta: mirroring test-time augmentation.
        save_probabilities: also write ``<case>.npz`` with float16 probabilities ``(K, Z, Y, X)``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        resume: skip cases whose outputs exist (``--continue``).
        step: window stride as a fraction of the patch.
        callbacks: progress hooks.
        save_uncertainty: also write ``<case>_entropy`` and ``<case>_disagreement`` maps
            (:mod:`autoseg.uncertainty`) in the input's geometry.
        output_format: ``auto`` (the input's format; NIfTI for a DICOM series), ``nifti``,
            ``dicom-seg`` (needs highdicom and DICOM series inputs), or several of them.
        devices: several devices (``--gpus N``: ``cuda:0``…; ``--procs N``: ``cpu`` N times): the
            cases are shared out over one process per device, each predicting whole cases exactly
            as a single device would (the outputs are identical). Overrides ``device``.

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
    selections, best = select_models(work, configurations, folds, checkpoint)
    plans = plans_io.load(Path(work) / "plans.yaml")
    cases = find_input_cases(inputs, len(plans.channel_names))
    check_inputs(cases, plans, [s.configuration for s in selections])
    outputs = {case.case_id: case_outputs(case, output, formats, save_probabilities=save_probabilities,
                                          save_uncertainty=save_uncertainty) for case in cases}
    _check_outputs(cases, outputs, output, formats)
    _check_output_outside_dicom_inputs(inputs, cases, output)

    todo, skipped = [], []
    for case in cases:
        targets = outputs[case.case_id]
        if resume and all(p.is_file() for p in targets.files):
            skipped.append(targets.primary)
        else:
            todo.append(case)
    if not todo:
        return PredictSummary(output, tuple(selections), (), tuple(skipped), time.perf_counter() - started, "")

    job = _CasesJob(Path(work), tuple(selections), tuple(todo), {c.case_id: outputs[c.case_id] for c in todo},
                    best, checkpoint, tta, step, save_uncertainty)
    if devices is not None and len(devices) > 1:
        written, used_device, stats = _predict_sharded(job, devices, callbacks)
    else:
        written, used_device, stats = _predict_cases(job, devices[0] if devices else device, callbacks)
    return PredictSummary(output, tuple(selections), tuple(written), tuple(skipped), time.perf_counter() - started,
                          used_device, best is not None and _postprocessor(best) is not None, stats)


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


def _predict_cases(job: _CasesJob, device: str,
                   callbacks: PredictCallbacks) -> tuple[list[Path], str, PredictorStats]:
    """Predict ``job.cases`` one after the other on ``device``; returns what was written."""
    postprocess = _postprocessor(job.best)
    predictor = Predictor(job.work, job.selections, device=device, tta=job.tta, step=job.step)
    written = []
    for index, case in enumerate(job.cases):
        callbacks.on_case(index, len(job.cases), case.case_id)
        image, geometry = read_input(case)
        predictions = predictor.predict(image, geometry, progress=callbacks.on_windows,
                                        uncertainty=job.save_uncertainty)
        targets = job.outputs[case.case_id]
        labels = predictor.export(predictions, geometry, targets.labels[0] if targets.labels else None,
                                  targets.probabilities, postprocess)
        for extra in targets.labels[1:]:
            write_image(extra, labels, geometry)
        if targets.uncertainty is not None:
            from autoseg.uncertainty import export_uncertainty

            export_uncertainty(predictions, geometry, targets.uncertainty, regions=predictor.regions is not None)
        if targets.seg is not None:
            from autoseg import __version__
            from autoseg.predict_dicom import write_dicom_seg

            used = "; ".join(f"{s.configuration} folds {' '.join(str(f) for f in s.folds)}" for s in job.selections)
            write_dicom_seg(targets.seg, labels, case.images[0], segment_names(predictor.labels, predictor.regions),
                            version=__version__, parameters={"models": used, "checkpoint": job.checkpoint,
                                                             "tta": "on" if job.tta else "off"})
        del predictions
        written.append(targets.primary)
    return written, str(predictor.device), predictor.stats


def _predict_sharded(job: _CasesJob, devices: Sequence[str],
                     callbacks: PredictCallbacks) -> tuple[list[Path], str, PredictorStats]:
    """Share the cases out round robin over one process per device."""
    import dataclasses

    from autoseg.training import distributed

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
    written = sorted((path for paths, _, _ in results for path in paths), key=str)
    stats = PredictorStats()
    for _, _, part in results:
        for name in ("forward_s", "forward_calls", "samples", "windows", "predict_s", "preprocess_s", "export_s"):
            setattr(stats, name, getattr(stats, name) + getattr(part, name))
    used = ", ".join(sorted({device for _, device, _ in results}))
    return written, f"{used} × {count} processes" if len(set(devices)) == 1 else used, stats


def _predict_child(child: Any, job: _CasesJob) -> tuple[list[Path], str, PredictorStats]:
    """Runs in a spawned process: this device's share of the cases."""
    from autoseg.training.distributed import Event

    callbacks = PredictCallbacks(on_case=lambda index, total, case_id: child.post(Event(index, "case", (case_id,))))
    return _predict_cases(job, child.device, callbacks)
