"""Planner presets: YAML data files (``planners/*.yaml``), validated into a frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from autoseg.errors import ConfigError, UnknownNameError, did_you_mean

KNOWN_CONFIGURATIONS = ("2d", "2.5d", "3d_fullres", "3d_lowres")


@dataclass(frozen=True)
class Preset:
    """Everything a planner preset sets. See ``planners/default.yaml`` for the meaning of each key."""

    name: str
    description: str
    memory_budget_gb: float
    reference_units_3d: float
    reference_units_2d: float
    reference_memory_gb: float
    reference_batch_3d: int
    reference_batch_2d: int
    base_features: int
    max_features_3d: int
    max_features_2d: int
    blocks_per_stage: tuple[int, ...]
    decoder_blocks_per_stage: tuple[int, ...]
    residual_encoder: bool
    min_feature_map_edge: int
    min_batch_size: int
    max_batch_size: int | None
    max_dataset_fraction_per_batch: float
    configurations: tuple[str, ...]
    lowres_threshold: float
    lowres_spacing_step: float
    anisotropy_threshold: float
    context_mm: float
    max_context_slices: int
    min_3d_patch_voxels: int


def builtin_presets() -> list[str]:
    """Names of the presets shipped in ``planners/``."""
    folder = resources.files("autoseg.planners")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a preset file by path.

    Raises:
        UnknownNameError: neither a built-in name nor an existing file (with a suggestion).
        ConfigError: the file is not valid YAML or has unknown, missing or mistyped keys.
    """
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{path}: planner preset file not found; built-in presets: {', '.join(builtin_presets())}")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        if name_or_path not in builtin_presets():
            raise UnknownNameError("planner preset", name_or_path, builtin_presets())
        text = resources.files("autoseg.planners").joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        where = f"planners/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return preset_from_dict(data, where)


def preset_from_dict(data: Any, where: str = "preset") -> Preset:
    """Validate plain data into a :class:`Preset` (unknown keys are errors, with a suggestion)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a preset must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), fields)}")
    missing = [name for name in fields if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}; copy them from planners/default.yaml")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        values[name] = _coerce(data[name], str(f.type), f"{where}: {name}")
    for config in values["configurations"]:
        if config not in KNOWN_CONFIGURATIONS:
            raise ConfigError(f"{where}: configurations: unknown configuration {config!r}"
                              f"{did_you_mean(config, KNOWN_CONFIGURATIONS)}")
    for key in ("memory_budget_gb", "reference_units_3d", "reference_units_2d", "reference_memory_gb",
                "max_dataset_fraction_per_batch", "lowres_spacing_step", "anisotropy_threshold"):
        if values[key] <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {values[key]}")
    if values["lowres_spacing_step"] <= 1:
        raise ConfigError(f"{where}: lowres_spacing_step must be > 1, got {values['lowres_spacing_step']}")
    if values["min_batch_size"] < 1 or (values["max_batch_size"] is not None
                                        and values["max_batch_size"] < values["min_batch_size"]):
        raise ConfigError(f"{where}: need 1 <= min_batch_size <= max_batch_size")
    if len(values["blocks_per_stage"]) < 2 or len(values["decoder_blocks_per_stage"]) < len(values["blocks_per_stage"]) - 1:
        raise ConfigError(f"{where}: blocks_per_stage needs >= 2 entries and decoder_blocks_per_stage one fewer")
    return Preset(**values)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    ann = annotation.replace(" ", "")
    if ann.endswith("|None"):
        if value is None:
            return None
        ann = ann[: -len("|None")]
    if ann == "str" and isinstance(value, str):
        return value
    if ann == "bool" and isinstance(value, bool):
        return value
    if ann == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if ann == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if ann == "tuple[int,...]" and isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value):
        return tuple(value)
    if ann == "tuple[str,...]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected {ann}, got {value!r}")


__all__ = ["KNOWN_CONFIGURATIONS", "Preset", "builtin_presets", "load_preset", "preset_from_dict"]
