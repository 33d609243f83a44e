"""Packaging: every sub-package ships, the presets and example data are found without path setup."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "autoseg").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["autoseg.planners"] == "planners"


def test_presets_and_example_are_resources() -> None:
    from autoseg.examples import available
    from autoseg.planning import builtin_presets

    assert {"default", "resenc-m", "resenc-l", "cpu", "tiny"} <= set(builtin_presets())
    assert "hippocampus" in available()


def test_example_copy_and_plan(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from autoseg.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["example", "hippocampus", "-o", str(tmp_path / "raw")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "raw" / "imagesTr").glob("*.nii.gz"))) == 24
    result = runner.invoke(app, ["plan", str(tmp_path / "raw"), "-o", str(tmp_path / "work"), "-j", "1",
                                 "--planner", "cpu"])
    assert result.exit_code == 0, result.output
    assert "3d_fullres" in result.output and (tmp_path / "work" / "plans.yaml").is_file()
    again = runner.invoke(app, ["example", "hippocampus", "-o", str(tmp_path / "raw")])
    assert again.exit_code != 0 and "not empty" in again.output
