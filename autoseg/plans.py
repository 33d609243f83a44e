"""Plans: the contract between stages — frozen dataclasses with a YAML round trip.

``plans.yaml`` is meant to be read and hand-edited. Loading validates it: unknown keys are
rejected with a did-you-mean, types and shapes are checked, and every error names the key path.
Array order everywhere is (z, y, x) after the plan's ``transpose`` (see :mod:`autoseg.imageio`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autoseg.atomic import write_text
from autoseg.errors import PlanError, did_you_mean
from autoseg.channels import SCHEMES
from autoseg.regions import is_region_based, num_outputs

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """How one input channel is normalised.

    Attributes:
        scheme: one of :data:`autoseg.channels.SCHEMES`.
        use_mask: z-score statistics (and output) restricted to the nonzero region.
        clip: ``[low, high]`` intensity window (``ct`` only): foreground 0.5/99.5 percentiles.
        mean, std: global foreground statistics (``ct`` only).
    """

    scheme: str
    use_mask: bool = False
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Topology:
    """A U-Net's shape: one entry per resolution stage (the first stage has stride 1).

    Attributes:
        features_per_stage: output channels of each encoder stage.
        strides: downsampling of each stage relative to the previous one, per axis.
        kernel_sizes: convolution kernel of each stage, per axis.
        blocks_per_stage: convolutions (plain) or residual blocks (residual) per encoder stage.
        decoder_blocks_per_stage: convolutions per decoder stage (one fewer stage than the encoder).
        residual_encoder: residual blocks in the encoder (nnU-Net ResEnc) instead of plain convs.
    """

    features_per_stage: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    blocks_per_stage: tuple[int, ...]
    decoder_blocks_per_stage: tuple[int, ...]
    residual_encoder: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def dims(self) -> int:
        return len(self.kernel_sizes[0])


@dataclass(frozen=True)
class Resampling:
    """How images and labels are resampled to the configuration's spacing.

    Attributes:
        image_order: spline order for images (3, as nnU-Net).
        label_order: 1 = one-hot labels interpolated linearly then argmax; 0 = nearest.
        separate_z: resample the out-of-plane axis separately (``order_z``) when the data is
            anisotropic (coarsest / finest spacing > ``anisotropy_threshold``).
    """

    image_order: int = 3
    label_order: int = 1
    order_z: int = 0
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (``2d``, ``2.5d``, ``3d_fullres``, ``3d_lowres``, ...).

    Attributes:
        dims: 2 or 3 (2.5d is a 2D network).
        spacing: target spacing, array order after transpose (3 values; 2D configs use the in-plane two).
        patch_size: network input size (2 or 3 values).
        median_shape: median resampled image shape at this spacing (3 values).
        context_slices: 2.5d only: k neighbouring slices on each side fed as extra channels.
        estimated_memory_gb: the planner's estimate of training memory at this batch size.
        previous_stage / next_stage: cascade links (3d_lowres -> 3d_cascade_fullres).
        previous_stage_channels: a cascade stage's extra input channels: the previous stage's
            segmentation, one-hot, one channel per foreground label value (0 elsewhere; not
            written when 0).
        mirror_axes: the patch axes mirrored in training and in mirroring TTA (0-based, ``(0, 1, 2)``
            in 3D); None (not written) for every axis. The planner leaves out the left-right axis
            when a label names a side (:mod:`autoseg.planning.mirroring`).
        orientation: the training images' orientation code (the most common, ``"LPS"``), recorded
            where a label names a side (None, not written, elsewhere): ``predict`` warns on an input
            whose left-right runs along another axis or the other way.
    """

    dims: int
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    median_shape: tuple[float, ...]
    normalization: tuple[Normalization, ...]
    topology: Topology
    resampling: Resampling = Resampling()
    context_slices: int = 0
    estimated_memory_gb: float = 0.0
    previous_stage: str | None = None
    next_stage: str | None = None
    previous_stage_channels: int = 0
    mirror_axes: tuple[int, ...] | None = None
    orientation: str | None = None

    @property
    def mirrored_axes(self) -> tuple[int, ...]:
        """The axes mirrored in training and TTA: ``mirror_axes``, or every patch axis when None."""
        return tuple(range(self.dims)) if self.mirror_axes is None else tuple(self.mirror_axes)

    @property
    def input_channels(self) -> int:
        """The network's input channels: the image's (with 2.5D neighbours), then the previous
        stage's one-hot segmentation for a cascade stage."""
        return len(self.normalization) * (2 * self.context_slices + 1) + self.previous_stage_channels


@dataclass(frozen=True)
class Plans:
    """Every configuration planned for a dataset, and what they share."""

    dataset_name: str
    planner: str
    transpose: tuple[int, int, int]
    channel_names: tuple[str, ...]
    labels: dict[str, list[int]]
    configurations: dict[str, Configuration]
    recommended: tuple[str, ...]
    memory_budget_gb: float
    gpu_memory_gb: float
    gpu_memory_source: str
    original_median_spacing: tuple[float, float, float]
    original_median_shape: tuple[float, float, float]
    anisotropic: bool = False
    #: What the networks learn (:data:`autoseg.tasks.TASKS`): the loss, head, export and metrics.
    task: str = "segmentation"
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION
    fingerprint_sha256: str = ""
    #: The time budget per fold the plan was sized for (``autoseg plan --time-budget``), in seconds;
    #: ``autoseg train`` uses it when given no budget of its own. Not written when None.
    time_budget_s: float | None = None
    #: The machine's convolution rate the budget was planned for, ``[training, forward]`` GFLOP/s:
    #: ``autoseg train`` estimates the validation from the same numbers. Not written when None.
    throughput_gflops: tuple[float, float] | None = None
    #: Super-resolution: each input's grid is refined by these integer factors, array order (z, y, x)
    #: of the image as read (before ``transpose``), onto the fine grid the networks work and write on
    #: (:mod:`autoseg.dataset.super_resolution`). Not written when None (every other task).
    upsample_factor: tuple[int, int, int] | None = None
    #: Super-resolution: the smallest target spacing per axis over the training cases, array order as
    #: ``upsample_factor``: prediction refuses an input that is about this fine already
    #: (:func:`autoseg.dataset.super_resolution.check_coarse_input`). Not written when None.
    min_target_spacing: tuple[float, float, float] | None = None

    @property
    def transpose_backward(self) -> tuple[int, int, int]:
        return tuple(sorted(range(3), key=lambda i: self.transpose[i]))  # type: ignore[return-value]

    @property
    def region_based(self) -> bool:
        """True when a label declares several values: sigmoid outputs per region (:mod:`autoseg.regions`)."""
        return is_region_based(self.labels)

    @property
    def num_classes(self) -> int:
        """Output channels of the network: every label (background included), or, region-based,
        one per label except background; without labels (restoration), one per input channel."""
        return num_outputs(self.labels) if self.labels else len(self.channel_names)

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            raise PlanError(f"configuration {name!r} is not in the plans{did_you_mean(name, self.configurations)}")
        return self.configurations[name]


# ----------------------------------------------------------------------------------------------
# YAML round trip


def to_dict(plans: Plans) -> dict[str, Any]:
    """Plain data (lists, dicts, Python scalars) in a stable key order."""
    data = _plain(dataclasses.asdict(plans))
    for key in ("time_budget_s", "throughput_gflops", "upsample_factor", "min_target_spacing"):
        if data.get(key) is None:
            data.pop(key, None)  # plans without a budget stay byte-identical to before
    for config in data["configurations"].values():
        if not config.get("previous_stage_channels"):
            config.pop("previous_stage_channels", None)  # only cascade stages have them
        for key in ("mirror_axes", "orientation"):
            if config.get(key) is None:
                config.pop(key, None)  # plans without labels that name a side stay as before
    return {"schema_version": data.pop("schema_version"), **data}


def _plain(value: Any) -> Any:
    # The one place numpy scalars and tuples become YAML-safe Python types.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    if isinstance(value, float):
        return float(round(value, 10))
    return value


class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Short lists of scalars (spacings, patch sizes) inline: [40, 56, 40].
    flow = len(data) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dumps(plans: Plans) -> str:
    header = (
        "# autoseg plans — written by `autoseg plan`. Hand edits are allowed and validated on load.\n"
        "# Axes are (z, y, x) after `transpose`; spacing in mm; memory in GB.\n"
    )
    if plans.region_based:
        header += "# Region-based labels: one sigmoid output per label except background, in `labels` order.\n"
    return header + yaml.dump(to_dict(plans), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def save(plans: Plans, path: Path) -> None:
    """Atomically write ``plans`` as YAML."""
    write_text(Path(path), dumps(plans))


def load(path: Path) -> Plans:
    """Read and validate a plans file.

    Raises:
        PlanError: the file is missing, not YAML, or fails validation (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: plans file not found; run 'autoseg plan RAW -o {path.parent}' first")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    try:
        return from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def from_dict(data: Any) -> Plans:
    """Build :class:`Plans` from plain data, validating keys, types and shapes."""
    if not isinstance(data, dict):
        raise PlanError("plans must be a mapping at the top level")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PlanError(f"schema_version is {version!r}, this autoseg reads {SCHEMA_VERSION}; re-run 'autoseg plan'")
    plans = _build(Plans, data, "")
    plans = _fill_previous_stage_channels(plans, data)
    _validate(plans)
    return plans


def _fill_previous_stage_channels(plans: Plans, data: dict[str, Any]) -> Plans:
    """Plans written before ``previous_stage_channels`` existed (autoseg did not train cascades
    then, so no network disagrees): a cascade stage gets one channel per foreground label value."""
    configurations = dict(plans.configurations)
    for name, config in plans.configurations.items():
        raw = data["configurations"].get(name) or {}
        if config.previous_stage and "previous_stage_channels" not in raw:
            configurations[name] = dataclasses.replace(
                config, previous_stage_channels=len(foreground_label_values(plans.labels)))
    return dataclasses.replace(plans, configurations=configurations) if configurations != plans.configurations else plans


_NESTED = {
    ("Configuration", "normalization"): Normalization,
    ("Configuration", "topology"): Topology,
    ("Configuration", "resampling"): Resampling,
}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise PlanError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise PlanError(f"{_join(where, key)}: unknown key{did_you_mean(str(key), fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise PlanError(f"{_join(where, name)}: required key is missing")
            continue
        value, key_path = data[name], _join(where, name)
        if cls is Plans and name == "configurations":
            if not isinstance(value, dict) or not value:
                raise PlanError(f"{key_path}: expected a non-empty mapping of configurations")
            kwargs[name] = {str(k): _build(Configuration, v, _join(key_path, str(k))) for k, v in value.items()}
        elif (cls.__name__, name) in _NESTED:
            nested = _NESTED[(cls.__name__, name)]
            if name == "normalization":
                if not isinstance(value, list) or not value:
                    raise PlanError(f"{key_path}: expected a list with one entry per channel")
                kwargs[name] = tuple(_build(nested, v, f"{key_path}[{i}]") for i, v in enumerate(value))
            else:
                kwargs[name] = _build(nested, value, key_path)
        else:
            kwargs[name] = _convert(value, f.type, key_path)
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert a YAML value against a field's annotation (a string, PEP 563)."""
    ann = str(annotation).replace(" ", "")
    optional = ann.endswith("|None")
    if optional:
        if value is None:
            return None
        ann = ann[: -len("|None")]
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where}: expected an integer, got {value!r}")
        return value
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise PlanError(f"{where}: expected true or false, got {value!r}")
        return value
    if ann == "str":
        if not isinstance(value, str):
            raise PlanError(f"{where}: expected a string, got {value!r}")
        return value
    if ann.startswith("tuple[tuple["):
        if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
            raise PlanError(f"{where}: expected a list of lists, got {value!r}")
        inner = ann[len("tuple["): -len(",...]")]
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if ann.startswith("tuple["):
        if not isinstance(value, list):
            raise PlanError(f"{where}: expected a list, got {value!r}")
        element = ann[len("tuple["):].split(",")[0].rstrip("]")
        converted = tuple(_convert(v, element, f"{where}[{i}]") for i, v in enumerate(value))
        if not ann.endswith(",...]"):
            expected = ann.count(",") + 1
            if len(converted) != expected:
                raise PlanError(f"{where}: expected {expected} values, got {len(converted)}")
        return converted
    if ann.startswith("dict[str,list[int]]"):
        if not isinstance(value, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) for i in v) for v in value.values()
        ):
            raise PlanError(f"{where}: expected a mapping of name to a list of integers")
        return {str(k): list(v) for k, v in value.items()}
    raise TypeError(f"no converter for {annotation!r} at {where}")  # a bug in this module, not user input


def _validate(plans: Plans) -> None:
    """Cross-field checks a hand edit can break."""
    if plans.time_budget_s is not None and not (math.isfinite(plans.time_budget_s) and plans.time_budget_s > 0):
        raise PlanError(f"time_budget_s: must be a positive number of seconds, got {plans.time_budget_s}")
    if plans.throughput_gflops is not None and (len(plans.throughput_gflops) != 2 or not all(
            math.isfinite(v) and v > 0 for v in plans.throughput_gflops)):
        raise PlanError(f"throughput_gflops: must be two positive rates [training, forward], got "
                        f"{list(plans.throughput_gflops)}")
    if sorted(plans.transpose) != [0, 1, 2]:
        raise PlanError(f"transpose: {list(plans.transpose)} is not a permutation of [0, 1, 2]")
    if (plans.task == "super-resolution") != (plans.upsample_factor is not None):
        raise PlanError("upsample_factor: super-resolution plans need one (e.g. [3, 1, 1]) and other tasks none; "
                        "re-run 'autoseg plan'")
    if plans.upsample_factor is not None and (min(plans.upsample_factor) < 1 or max(plans.upsample_factor) < 2):
        raise PlanError(f"upsample_factor: {list(plans.upsample_factor)}: whole numbers >= 1 per axis (z, y, x), at "
                        "least one >= 2")
    if (plans.upsample_factor is None) != (plans.min_target_spacing is None):
        raise PlanError("min_target_spacing: super-resolution plans need one (the smallest target spacing per axis, "
                        "z, y, x) and other tasks none; re-run 'autoseg plan'")
    if plans.min_target_spacing is not None and min(plans.min_target_spacing) <= 0:
        raise PlanError(f"min_target_spacing: {list(plans.min_target_spacing)}: spacings must be > 0 mm")
    for name in plans.recommended:
        if name not in plans.configurations:
            raise PlanError(f"recommended: {name!r} is not a planned configuration{did_you_mean(name, plans.configurations)}")
    for name, config in plans.configurations.items():
        where = f"configurations.{name}"
        topo = config.topology
        dims = config.dims
        if dims not in (2, 3):
            raise PlanError(f"{where}.dims: must be 2 or 3, got {dims}")
        if len(config.patch_size) != dims:
            raise PlanError(f"{where}.patch_size: {dims}D configuration needs {dims} values, got {list(config.patch_size)}")
        if len(config.spacing) != 3:
            raise PlanError(f"{where}.spacing: needs 3 values (z, y, x), got {list(config.spacing)}")
        if any(p < 1 for p in config.patch_size) or config.batch_size < 1:
            raise PlanError(f"{where}: patch_size and batch_size must be positive")
        if any(s <= 0 for s in config.spacing):
            raise PlanError(f"{where}.spacing: must be positive, got {list(config.spacing)}")
        n = topo.num_stages
        for key in ("strides", "kernel_sizes", "blocks_per_stage"):
            if len(getattr(topo, key)) != n:
                raise PlanError(f"{where}.topology.{key}: needs {n} entries (one per stage), got {len(getattr(topo, key))}")
        if len(topo.decoder_blocks_per_stage) != n - 1:
            raise PlanError(f"{where}.topology.decoder_blocks_per_stage: needs {n - 1} entries, "
                            f"got {len(topo.decoder_blocks_per_stage)}")
        for key in ("strides", "kernel_sizes"):
            for i, entry in enumerate(getattr(topo, key)):
                if len(entry) != dims:
                    raise PlanError(f"{where}.topology.{key}[{i}]: needs {dims} values, got {list(entry)}")
        divisor = [1] * dims
        for stride in topo.strides:
            divisor = [d * s for d, s in zip(divisor, stride)]
        for axis, (p, d) in enumerate(zip(config.patch_size, divisor)):
            if p % d:
                raise PlanError(f"{where}.patch_size: axis {axis} size {p} is not divisible by {d} "
                                f"(the product of its strides); use a multiple of {d}")
        if len(config.normalization) != len(plans.channel_names):
            raise PlanError(f"{where}.normalization: {len(config.normalization)} entries for "
                            f"{len(plans.channel_names)} channel(s)")
        for i, norm in enumerate(config.normalization):
            if norm.scheme not in SCHEMES:
                raise PlanError(f"{where}.normalization[{i}].scheme: unknown scheme {norm.scheme!r}"
                                f"{did_you_mean(norm.scheme, SCHEMES)}")
            if norm.scheme == "ct" and (norm.clip is None or norm.mean is None or norm.std is None):
                raise PlanError(f"{where}.normalization[{i}]: scheme 'ct' needs clip, mean and std")
            if norm.scheme == "linear" and (norm.clip is not None or norm.mean is None or norm.std is None
                                            or not norm.std > 0):
                raise PlanError(f"{where}.normalization[{i}]: scheme 'linear' needs mean and a positive std, and "
                                "no clip (it must stay invertible)")
        for link in (config.previous_stage, config.next_stage):
            if link is not None and link not in plans.configurations:
                raise PlanError(f"{where}: cascade link {link!r} is not a planned configuration")
        expected = len(foreground_label_values(plans.labels)) if config.previous_stage else 0
        if config.previous_stage_channels != expected:
            raise PlanError(f"{where}.previous_stage_channels: must be {expected} "
                            + ("(one per foreground label value of the previous stage's segmentation)"
                               if config.previous_stage else "without a previous_stage")
                            + f", got {config.previous_stage_channels}")
        if config.mirror_axes is not None and not plans.labels:
            raise PlanError(f"{where}.mirror_axes: only segmentation plans choose their mirror axes "
                            f"(a {plans.task} task mirrors every axis); remove the key")
        if config.mirror_axes is not None and (len(set(config.mirror_axes)) != len(config.mirror_axes) or any(
                not 0 <= a < dims for a in config.mirror_axes)):
            raise PlanError(f"{where}.mirror_axes: {list(config.mirror_axes)}: distinct patch axes from 0 to "
                            f"{dims - 1} ([] for no mirroring; remove the key to mirror every axis)")
        if config.orientation is not None and not re.fullmatch(r"[LRAPSI]{2,3}", config.orientation):
            raise PlanError(f"{where}.orientation: {config.orientation!r} is not an orientation code such as 'LPS'")
        if config.previous_stage and (config.dims != 3 or plans.configurations[config.previous_stage].dims != 3):
            raise PlanError(f"{where}: a cascade links two 3D configurations")


def configuration_changes(saved: dict[str, Any] | None, plans: Plans, name: str) -> str:
    """The keys of configuration ``name`` in which ``plans`` differ from ``saved`` (a checkpoint's
    :func:`to_dict` entry), comma-separated; empty when they agree or nothing was saved."""
    if saved is None:
        return ""
    current = to_dict(plans)["configurations"][name]
    return ", ".join(sorted(k for k in {**saved, **current} if saved.get(k) != current.get(k)))


def with_configuration(data: dict[str, Any], name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Plans data (:func:`to_dict`) holding one configuration, e.g. a checkpoint's own, in place of
    the planned ones, ready for :func:`from_dict`.

    A cascade stage keeps its previous stage (the planned one: only its link is checked here, the
    stage predicts with its own checkpoints); a stage followed by another loses that link, which
    does not change how it predicts.

    Raises:
        PlanError: the configuration follows a previous stage the plans do not have.
    """
    config = {**config, "next_stage": None}
    configurations = {name: config}
    previous = config.get("previous_stage")
    if previous:
        planned = data.get("configurations") or {}
        if previous not in planned:
            raise PlanError(f"configuration {name!r} follows {previous!r}, which the plans do not have; restore "
                            "the plans the model was trained with")
        configurations[previous] = {**planned[previous], "next_stage": None}
    return {**data, "configurations": configurations, "recommended": [name]}


def foreground_label_values(labels: dict[str, list[int]]) -> list[int]:
    """Every foreground label value, sorted (regions contribute their values): what a label map
    holds besides background 0."""
    return sorted({int(v) for values in labels.values() for v in values if v != 0})


__all__ = [
    "Configuration", "Normalization", "Plans", "Resampling", "Topology", "configuration_changes", "dumps",
    "foreground_label_values", "from_dict",
    "load", "save", "to_dict", "with_configuration",
]
