"""The GPU check (``benchmarks/gpu_check.py``): its CPU dry run runs every step, so the script cannot
rot between the rare GPU runs; and its step runner reports failures, time-outs and the budget
instead of stopping."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
#: Every step, in the order the script runs them.
STEPS = [
    "environment", "data_hippocampus", "data_ct", "plan_hippocampus_default", "plan_hippocampus_resenc_m",
    "plan_ct_default", "train_hippocampus_default", "train_hippocampus_resenc_m", "train_ct_default",
    "launcher_gpus_1", "torchrun_1", "nccl_ddp", "predict_hippocampus", "predict_ct", "dice_hippocampus",
    "compile_hippocampus_default",
]
#: Steps that cannot run on the CPU, and the status the dry run gives them.
CPU_ONLY_SKIPS = {"compile_hippocampus_default": "skipped: cpu"}


def load_script() -> ModuleType:
    """The script as a module (loaded once)."""
    name = "autoseg_benchmarks_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--scratch",
                           str(tmp_path / "scratch")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(proc.stdout) == document
    assert document["dry_run"] is True
    assert document["device"] == "cpu"
    assert list(document["steps"]) == STEPS
    for name, step in document["steps"].items():
        if name in CPU_ONLY_SKIPS:
            assert step["status"].startswith(CPU_ONLY_SKIPS[name]), (name, step)
        else:
            assert step["status"] == "ok", f"{name}: {step.get('error')}\n{step.get('stderr_tail')}"

    steps = {name: step.get("figures", {}) for name, step in document["steps"].items()}
    for name in ("train_hippocampus_default", "train_hippocampus_resenc_m", "train_ct_default"):
        figures = steps[name]
        for key in ("s_per_it", "samples_per_s", "data_wait_fraction_250_iters", "memory", "loader", "log_jsonl"):
            assert key in figures, (name, key)
        assert figures["amp"] == "off (cpu)"
        assert figures["memory"]["estimated_gb"] > 0
        assert figures["loader"]["verdict"]
    assert steps["plan_hippocampus_resenc_m"]["residual_encoder"] is True
    assert steps["plan_hippocampus_default"]["residual_encoder"] is False
    for name in ("launcher_gpus_1", "torchrun_1"):
        assert steps[name]["epochs"] == 2 and steps[name]["resumed"] is True
        assert steps[name]["device"] == "cpu"
    assert "--procs 1" in steps["launcher_gpus_1"]["command"]
    assert steps["nccl_ddp"]["backend"] == "gloo"
    for name in ("predict_hippocampus", "predict_ct"):
        assert 0 < steps[name]["gpu_busy_fraction"] <= 1
    assert steps["dice_hippocampus"]["curve"]

    # Nothing measured on the CPU counts for or against a target, but every target is listed.
    rows = {(row["target"], row["step"]): row for row in document["targets"]}
    assert ("pseudo-Dice >= 0.85", "dice_hippocampus") in rows
    assert ("peak GPU memory vs estimated_memory_gb", "train_ct_default") in rows
    assert all(row["met"] is None for row in document["targets"] if row["target"] != "whole check")
    assert "autoseg GPU check" in proc.stderr and "DRY RUN" in proc.stderr
    assert wall < 120, f"the dry run took {wall:.0f} s; it should stay well under a minute"


def _check(module: ModuleType, tmp_path: Path, budget: float = 60.0) -> object:
    now = time.perf_counter()
    return module.Check(sizes=module.DRY_RUN, dry_run=True, scratch=tmp_path, data=tmp_path, started=now,
                        deadline=now + budget)


def test_a_failing_step_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    module = load_script()
    check = _check(module, tmp_path)

    def broken(check: object, limit: float) -> dict:
        raise ValueError("bad value 3\nsecond line")

    failed = module.run_step(check, "broken", broken, 10)
    assert failed.status == "failed"
    assert failed.error == "ValueError: bad value 3"
    assert "ValueError" in failed.stderr_tail
    assert module.run_step(check, "after", lambda c, limit: {"summary": "fine", "x": 1}, 10).status == "ok"
    assert check.results["after"].figures == {"x": 1}
    assert module.run_step(check, "dependent", lambda c, limit: {}, 10, needs=["broken"]).status == \
        "skipped: needs broken"


def test_a_step_past_its_cap_or_the_budget_is_stopped(tmp_path: Path) -> None:
    module = load_script()
    check = _check(module, tmp_path)

    def slow(check: object, limit: float) -> dict:
        time.sleep(5)
        return {}

    started = time.perf_counter()
    result = module.run_step(check, "slow", slow, 0.3)
    assert time.perf_counter() - started < 3
    assert result.status == "failed" and result.error.startswith("timed out")
    check.deadline = time.perf_counter() + 1.0
    assert module.run_step(check, "late", lambda c, limit: {}, 10, min_s=5).status == "skipped: budget"


def test_a_failing_command_reports_its_stderr_tail(tmp_path: Path) -> None:
    module = load_script()
    code = "import sys; print('line one', file=sys.stderr); print('the real error', file=sys.stderr); sys.exit(3)"
    with pytest.raises(module.StepFailed) as info:
        module.run_command([sys.executable, "-c", code], 30, tmp_path / "logs")
    assert str(info.value) == "exit code 3: the real error"
    assert "line one" in info.value.tail
    with pytest.raises(module.StepFailed, match="timed out"):
        module.run_command([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, tmp_path / "logs2")


def test_without_cuda_and_without_dry_run_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    assert load_script().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
