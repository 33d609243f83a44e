"""Planner presets shipped with autoseg (YAML data files; this file only makes them a package)."""
