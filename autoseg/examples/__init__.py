"""Small real datasets shipped with autoseg (see each folder's NOTICE.md for source and licence)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from autoseg.errors import ConfigError, UnknownNameError


def available() -> list[str]:
    """Names of the bundled example datasets."""
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.is_dir() and not p.name.startswith("_"))


def copy_example(name: str, destination: Path) -> Path:
    """Copy a bundled example dataset to ``destination`` (which must not exist or be empty).

    Raises:
        UnknownNameError: no such example.
        ConfigError: ``destination`` exists and is not empty.
    """
    if name not in available():
        raise UnknownNameError("example", name, available())
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise ConfigError(f"{destination}: folder exists and is not empty; choose a new folder")
    with resources.as_file(resources.files(__name__).joinpath(name)) as source:
        shutil.copytree(source, destination, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return destination
