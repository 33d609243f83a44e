"""Shared fixtures: the real-data folder (skipped cleanly when absent) and a CLI runner.

Synthetic datasets come from :mod:`phantoms` (``tests/phantoms.py``), imported directly by tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

#: ``../shared/data`` next to the repository (DESIGN §8); never an absolute path.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Wide enough that rich never folds a table row or an error line, even one that holds an absolute
#: path below pytest's tmp_path (assertions look for a file and its value on one line).
CLI_ENV = {"COLUMNS": "1000", "NO_COLOR": "1", "TERM": "dumb"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available ({SHARED_DATA} is absent)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    """MSD Task04_Hippocampus (220 labelled cases); skipped when absent."""
    path = shared_data / "Task04_Hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def cli() -> Callable[..., object]:
    """``cli("check", root, "-j", "1")`` runs ``autoseg`` in-process via Typer's CliRunner."""
    from typer.testing import CliRunner

    from autoseg.cli import app

    runner = CliRunner()

    def invoke(*args: object) -> object:
        return runner.invoke(app, [str(a) for a in args], env=CLI_ENV)

    return invoke
