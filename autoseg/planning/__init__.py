"""Planning: from a dataset fingerprint and a preset to plans (pure, torch-free)."""

from autoseg.planning.planner import GpuMemory, plan, preset_for_gpu
from autoseg.planning.presets import Preset, builtin_presets, load_preset

__all__ = ["GpuMemory", "Preset", "builtin_presets", "load_preset", "plan", "preset_for_gpu"]
