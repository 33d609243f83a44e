"""Which models predict: trained configurations and folds of WORK (torch-free), and building their networks."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from autoseg.errors import ConfigError, PlanError, UnknownNameError
from autoseg.plans import Configuration

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

#: Which checkpoint of a fold to use.
CHECKPOINT_KINDS = ("final", "best", "latest")
_FOLD_FOLDER = re.compile(r"^fold_(\d+)$")


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


def graph_path(checkpoint: Path, kind: str) -> Path:
    """Where a checkpoint's ONNX graph of ``kind`` (``fp32`` / ``int8``) lives: beside it, as
    ``checkpoint_<kind>.<fp32|int8>.onnx`` (written by ``autoseg import`` of a model file exported
    with ``--format onnx``). A graph records the digest of the weights it was made from and is
    used only with them."""
    return Path(checkpoint).with_suffix(f".{kind}.onnx")


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
            # find-best chooses among segmentation models only (it refuses restoration ones).
            task = _plans_data(plans_path).get("task") or "segmentation"
            hint = "repeat -c to average several" if task != "segmentation" else "or run 'autoseg find-best'"
            raise ConfigError(f"{work}: several configurations are trained ({_describe(trained)}) and there is "
                              f"no best.yaml; choose with -c ({hint})")
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


def previous_stage_selection(selection: ModelSelection, previous: str | None,
                             selections: Sequence[ModelSelection]) -> ModelSelection | None:
    """A cascade configuration's previous stage: the same folds and checkpoint kind, beside the
    cascade's fold folders; None when ``previous`` is None or requested itself with those folds.

    Raises:
        ConfigError: a fold of the previous stage is not trained.
    """
    if not previous or any(s.configuration == previous and s.folds == selection.folds for s in selections):
        return None
    paths = tuple(c.parent.parent.parent / previous / c.parent.name / c.name for c in selection.checkpoints)
    missing = [f for f, path in zip(selection.folds, paths) if not path.is_file()]
    if missing:
        raise ConfigError(f"{selection.configuration} predicts from {previous}'s segmentation, and {previous} "
                          f"fold(s) {', '.join(str(f) for f in missing)} are not trained "
                          f"({paths[selection.folds.index(missing[0])]} missing); train them with "
                          f"'autoseg train WORK -c {previous} -f {','.join(str(f) for f in missing)}'")
    return ModelSelection(previous, selection.folds, paths)


def _plans_data(plans_path: Path) -> dict:
    """plans.yaml as plain data, unvalidated ({} when unreadable): a hand-edited plans file with an
    unrelated error still lets -c report typos and the messages name the task."""
    import yaml

    try:
        data = yaml.safe_load(plans_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _planned_configurations(plans_path: Path) -> list[str]:
    configurations = _plans_data(plans_path).get("configurations")
    return [str(k) for k in configurations] if isinstance(configurations, dict) else []


def _describe(trained: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} (folds {' '.join(str(f) for f in folds)})" for name, folds in trained.items())


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


def build_inference_network(config: Configuration, num_classes: int, state: dict[str, Any], path: Path,
                            residual: tuple[int, int] | None = None) -> "torch.nn.Module":
    """The inference network of ``config`` with the weights ``state``, on the CPU, in eval mode
    (``residual``: the task's :meth:`~autoseg.tasks.base.Task.residual_channels`)."""
    from autoseg.networks import build_network

    with _without_weight_init():
        net = build_network(config.topology, config.input_channels, num_classes, deep_supervision=False,
                            residual=residual)
    try:
        # assign: the module takes the checkpoint's tensors (no copy of the weights).
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: weights do not fit the network of its configuration "
                          f"({str(exc).splitlines()[0]}); the checkpoint is damaged or edited") from None
    net.deep_supervision = False
    return net.eval()
