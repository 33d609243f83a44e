"""The CLI's shape: the version option, every command still registered, and a light start-up."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import autoseg
from autoseg.cli import app

COMMANDS = ("check", "fingerprint", "plan", "preprocess", "train", "evaluate", "find-best", "ensemble", "predict",
            "export", "import", "example", "demo", "convert", "simulate")
CONVERTERS = ("dicom-rt", "kaggle-uwmgi", "png-masks")
SIMULATORS = ("low-dose", "thick-slices")


def _listed_commands(help_text: str) -> list[str]:
    """The command names in the 'Commands:' section of a click help page, in order."""
    section = help_text.split("Commands:", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.strip()]


def test_version_prints_the_version_and_exits_0() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"autoseg {autoseg.__version__}\n"


def test_version_through_python_m_autoseg() -> None:
    result = subprocess.run([sys.executable, "-m", "autoseg", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"autoseg {autoseg.__version__}"


def test_every_command_is_listed_in_pipeline_order() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--version" in result.output
    assert _listed_commands(result.output) == list(COMMANDS)


def test_no_arguments_shows_the_help() -> None:
    result = CliRunner().invoke(app, [], env={"COLUMNS": "200"})
    assert "Usage: autoseg" in result.output
    assert _listed_commands(result.output) == list(COMMANDS)


def test_convert_lists_its_converters() -> None:
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert _listed_commands(result.output) == list(CONVERTERS)


def test_simulate_lists_its_simulations() -> None:
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert _listed_commands(result.output) == list(SIMULATORS)


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in ([[name] for name in COMMANDS] + [["convert", name] for name in CONVERTERS]
                 + [["simulate", name] for name in SIMULATORS]):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        assert f"Usage: autoseg {' '.join(args)}" in result.output


def test_version_imports_neither_torch_nor_simpleitk() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from autoseg.cli import app\n"
        "r = CliRunner().invoke(app, ['--version'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'SimpleITK', 'numpy', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fold_validation_line_prints_zero_as_zero_and_no_score_as_na() -> None:
    """A model that finds nothing scores 0.0000 (it used to print "nan", as if nothing was scored)."""
    from autoseg.cli.train import validation_line

    cases = {"a": {}, "b": {}}
    assert "Dice 0.0000 →" in validation_line(0, {"per_case": cases, "summary": {"mean_foreground_dice": 0.0}})
    assert "Dice n/a →" in validation_line(1, {"per_case": cases, "summary": {"mean_foreground_dice": None}})
    assert "(2 cases, TTA)" in validation_line(1, {"per_case": cases, "summary": {"mean_foreground_dice": 0.5}})
