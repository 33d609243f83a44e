"""Kill -9 in the middle of a stage, then rerun: the work completes and nothing corrupt is used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import phantoms

from autoseg.planning.run import plan_dataset


def _autoseg(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "autoseg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_kill_during_training_then_resume(tmp_path: Path) -> None:
    raw, work = tmp_path / "raw", tmp_path / "work"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    plan_dataset(raw, work, planner="tiny", workers=1)
    fold = work / "models" / "3d_fullres" / "fold_0"
    args = ["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "12", "--iters-per-epoch", "2",
            "--val-iters", "1", "-j", "0", "--device", "cpu"]
    process = _autoseg(*args)
    try:
        assert _wait_for(lambda: (fold / "checkpoint_latest.pt").is_file(), 120), process.communicate()[0]
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (fold / "checkpoint_final.pt").exists()
    done_before = len((fold / "log.jsonl").read_text().splitlines())
    assert 1 <= done_before < 12

    resumed = subprocess.run([sys.executable, "-m", "autoseg", *args, "--resume"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(12))
    assert (fold / "checkpoint_final.pt").is_file()
    assert not list(fold.glob(".tmp-*")), "a temporary file was left behind"


def test_kill_during_preprocessing_then_rerun(tmp_path: Path) -> None:
    raw, work = tmp_path / "raw", tmp_path / "work"
    phantoms.write_nnunet_dataset(raw, n_cases=60, shape=(24, 48, 44))
    plan_dataset(raw, work, planner="tiny", workers=1)
    folder = work / "preprocessed" / "3d_fullres"
    process = _autoseg("preprocess", str(work), "-c", "3d_fullres", "-j", "1")
    try:
        _wait_for(lambda: folder.is_dir() and len(list(folder.glob("*.json"))) >= 3, 120)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished_before = len(list(folder.glob("*.json")))
    assert finished_before < 60, "the kill came too late to test anything; use more cases"
    rerun = subprocess.run([sys.executable, "-m", "autoseg", "preprocess", str(work), "-c", "3d_fullres", "-j", "2"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(list(folder.glob("*.json"))) == 60
    assert not list(folder.glob(".tmp-*"))
    # Every case is complete and consistent: arrays load and match their recorded shape.
    for props_path in folder.glob("*.json"):
        props = json.loads(props_path.read_text())
        data = np.load(folder / f"{props_path.stem}.npy", mmap_mode="r")
        seg = np.load(folder / f"{props_path.stem}_seg.npy", mmap_mode="r")
        assert tuple(data.shape[1:]) == tuple(seg.shape) == tuple(props["shape_after_resample"])


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s autoseg lock until it is killed."""
    code = ("import sys, time; from autoseg.atomic import folder_lock\n"
            "with folder_lock(sys.argv[1], 'test'):\n    print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_folder_stops_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    """Two runs writing into one folder would delete each other's temporary files: the second
    stops with one line (exit 2) and nothing of the first's is touched; a holder killed with -9
    leaves no stale lock."""
    from autoseg.preprocessing.run import preprocessed_dir

    raw, work = tmp_path / "raw", tmp_path / "work"
    phantoms.write_nnunet_dataset(raw, n_cases=5)
    plan_dataset(raw, work, planner="tiny", workers=1)
    target = preprocessed_dir(work, "3d_fullres")
    fold = work / "models" / "3d_fullres" / "fold_0"
    commands = {
        target: ["preprocess", str(work), "-c", "3d_fullres", "-j", "1"],
        fold: ["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iters-per-epoch", "1",
               "--val-iters", "1", "-j", "0", "--device", "cpu", "--no-validate"],
    }
    for folder, args in commands.items():
        holder = _hold_lock(folder)
        in_flight = folder / ".tmp-in-flight"
        in_flight.write_bytes(b"the other run's file")
        try:
            blocked = subprocess.run([sys.executable, "-m", "autoseg", *args], capture_output=True, text=True,
                                     timeout=300)
        finally:
            holder.kill()
            holder.wait()
        message = (blocked.stdout + blocked.stderr).strip()
        assert blocked.returncode == 2, message
        assert f"another 'autoseg {args[0]}' is writing into this folder" in message
        assert str(folder) in message and "Traceback" not in message and len(message.splitlines()) == 1
        assert in_flight.read_bytes() == b"the other run's file"
        done = subprocess.run([sys.executable, "-m", "autoseg", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not in_flight.exists()  # the run that holds the folder removes a dead run's leftovers
