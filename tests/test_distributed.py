"""Several processes on the CPU (gloo): DDP training, folds in parallel, the launcher's error handling.

This is the CUDA/NCCL code path with another backend: the same trainer, launcher and rank logic.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import phantoms
import pytest
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.data.sampler import num_forced
from autoseg.errors import ConfigError
from autoseg.planning.run import plan_dataset
from autoseg import distributed
from autoseg.training import run as training
from autoseg.training.config import TrainConfig
from autoseg.distributed import ChildFailed, DistContext, Launch, rank_batch, rank_oversample, resolve_launch
from autoseg.training.trainer import Callbacks

CPU2 = Launch("ddp", ("cpu", "cpu"), "gloo")
EXPECTED_FILES = {"checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_latest.pt", "log.jsonl",
                  "progress.png", "train_config.yaml"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    phantoms.write_nnunet_dataset(root / "raw", n_cases=6)
    plan_dataset(root / "raw", root / "work", planner="tiny", workers=1)
    return root / "work"


def _cfg(epochs: int) -> TrainConfig:
    # Batch 4 over 2 ranks: 2 patches each.
    return TrainConfig(epochs=epochs, iters_per_epoch=4, val_iters=2, device="cpu", workers=0, seed=3,
                       batch_size=4, optimizer="adamw", lr=3e-3)


def _fold(work: Path, fold: int) -> Path:
    return work / "models" / "3d_fullres" / f"fold_{fold}"


@pytest.fixture(scope="module")
def ddp_run(work: Path) -> tuple[object, list[int]]:
    """Fold 0 trained by 2-process DDP for 4 epochs: the result and the epochs the launcher saw.

    A fixture, not a test's side effect: the resume test compares against this run, and under
    ``pytest -n 2`` the two tests may run on different workers.
    """
    epochs: list[int] = []

    def callbacks_for(fold: int) -> Callbacks:
        return Callbacks(on_epoch_end=lambda record: epochs.append(record["epoch"]))

    [result] = training.run(work, "3d_fullres", "0", _cfg(4), launch=CPU2, callbacks_for=callbacks_for,
                            validate=False)
    return result, epochs


# ----------------------------------------------------------------------------------------------
# Options and batch splitting (no processes)


def test_resolve_launch_modes() -> None:
    assert resolve_launch("auto", None, None, False) == Launch("single", ("auto",))
    assert resolve_launch("cpu", None, 2, False) == Launch("ddp", ("cpu", "cpu"), "gloo")
    assert resolve_launch("cpu", None, 3, True) == Launch("folds", ("cpu",) * 3, "gloo")
    assert resolve_launch("auto", 2, None, False, cuda_count=lambda: 4) == Launch("ddp", ("cuda:0", "cuda:1"), "nccl")
    assert resolve_launch("auto", 1, None, False, cuda_count=lambda: 1) == Launch("single", ("cuda:0",))
    assert resolve_launch("cuda", 2, None, True, cuda_count=lambda: 2).mode == "folds"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(device="auto", gpus=1, procs=None, folds_parallel=False, cuda_count=lambda: 0), "no CUDA device"),
    (dict(device="auto", gpus=4, procs=None, folds_parallel=False, cuda_count=lambda: 2), "only 2 CUDA device"),
    (dict(device="cpu", gpus=2, procs=None, folds_parallel=False, cuda_count=lambda: 2), "drop --device"),
    (dict(device="auto", gpus=2, procs=2, folds_parallel=False), "cannot be combined"),
    (dict(device="auto", gpus=None, procs=2, folds_parallel=False), "needs --device cpu"),
    (dict(device="auto", gpus=None, procs=None, folds_parallel=True), "--folds-parallel needs"),
])
def test_resolve_launch_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_launch(**kwargs)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [4, 5, 8, 9])
def test_batch_split_keeps_size_and_forced_patches(world: int, batch: int) -> None:
    ranks = [DistContext(rank, world, rank) for rank in range(world)]
    shares = [rank_batch(batch, ctx) for ctx in ranks]
    assert sum(size for _, size in shares) == batch
    assert [start for start, _ in shares] == [sum(size for _, size in shares[:r]) for r in range(world)]
    forced = sum(num_forced(size, rank_oversample(batch, 0.33, ctx)) for ctx, (_, size) in zip(ranks, shares))
    assert forced == num_forced(batch, 0.33)


def test_batch_smaller_than_world_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        rank_batch(2, DistContext(0, 4, 0))


# ----------------------------------------------------------------------------------------------
# DDP over gloo


def test_ddp_two_processes_identical_weights_one_set_of_files(work: Path, ddp_run: tuple) -> None:
    result, epochs = ddp_run
    digests = result.state.replica_digests
    assert len(digests) == 2 and digests[0] == digests[1]
    # Rank 0's checkpoint holds exactly the replicas' weights.
    final = load_checkpoint(_fold(work, 0) / "checkpoint_final.pt")
    assert distributed.state_digest(final["model"]) == digests[0]
    assert epochs == [0, 1, 2, 3], "progress events reach the launching process once per epoch"
    records = [json.loads(line) for line in (_fold(work, 0) / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3], "one log, written by rank 0 alone"
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[0]["samples_per_s"] > 0
    assert set(os.listdir(_fold(work, 0))) == EXPECTED_FILES
    config = (_fold(work, 0) / "train_config.yaml").read_text()
    assert "processes: 2" in config and "batch_size: 4" in config


def test_ddp_resume_continues_exactly(work: Path, ddp_run: tuple) -> None:
    """Interrupt a DDP run after epoch 1 (Ctrl-C in the launcher), resume: same weights as fold 0's
    uninterrupted run (``ddp_run``: same seed, same splits shape)."""
    reference = load_checkpoint(_fold(work, 0) / "checkpoint_final.pt")["model"]

    class Stop(Exception):
        pass

    def stop_after_epoch_1(fold: int) -> Callbacks:
        def end(record: dict) -> None:
            if record["epoch"] == 1:
                raise Stop

        return Callbacks(on_epoch_end=end)

    # Fold 0 again, in a copy of the experiment without its models.
    copy = work.parent / "resume"
    import shutil

    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("models"))
    started = time.monotonic()
    with pytest.raises(Stop):
        training.run(copy, "3d_fullres", "0", _cfg(4), launch=CPU2, callbacks_for=stop_after_epoch_1, validate=False)
    assert time.monotonic() - started < 300
    fold = _fold(copy, 0)
    assert not (fold / "checkpoint_final.pt").exists()
    assert len((fold / "log.jsonl").read_text().splitlines()) == 2

    [result] = training.run(copy, "3d_fullres", "0", _cfg(4), launch=CPU2, resume=True, validate=False)
    assert result.state.epoch == 4
    resumed = load_checkpoint(fold / "checkpoint_final.pt")["model"]
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert [json.loads(line)["epoch"] for line in (fold / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_ddp_user_error_in_every_rank_is_one_clear_error(work: Path) -> None:
    # Fold 4 has a checkpoint already (placed here, so the test does not depend on another test
    # having trained a fold first on the same xdist worker): every rank refuses to overwrite it.
    _fold(work, 4).mkdir(parents=True, exist_ok=True)
    (_fold(work, 4) / "checkpoint_final.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(ConfigError, match="already has checkpoints; use --resume"):
        training.run(work, "3d_fullres", "4", _cfg(1), launch=CPU2, validate=False)


def test_folds_parallel_trains_each_fold_once(work: Path) -> None:
    seen: dict[int, list[int]] = {}
    validated: list[int] = []
    validating: dict[int, list[tuple[int, int]]] = {}  # the children's validation progress, relayed

    def callbacks_for(fold: int) -> Callbacks:
        return Callbacks(on_epoch_end=lambda record: seen.setdefault(fold, []).append(record["epoch"]),
                         on_validation=lambda done, total: validating.setdefault(fold, []).append((done, total)))

    results = training.run(work, "3d_fullres", "1,2", _cfg(2), launch=Launch("folds", ("cpu", "cpu")),
                           callbacks_for=callbacks_for, on_validated=lambda fold, m: validated.append(fold))
    assert [r.fold for r in results] == [1, 2]
    assert seen == {1: [0, 1], 2: [0, 1]}
    assert sorted(validated) == [1, 2]
    for fold in (1, 2):
        total = len(json.loads((_fold(work, fold) / "metrics.json").read_text())["per_case"])
        assert validating[fold] == [(done, total) for done in range(total + 1)]
    for fold in (1, 2):
        assert (_fold(work, fold) / "checkpoint_final.pt").is_file()
        metrics = json.loads((_fold(work, fold) / "metrics.json").read_text())
        assert metrics["per_case"], "the fold's validation cases were predicted and scored"
        assert "processes: 1" in (_fold(work, fold) / "train_config.yaml").read_text()


# ----------------------------------------------------------------------------------------------
# The launcher: a failing rank stops the others, the user sees the real error


def _rank1_raises(child: distributed.ChildContext, payload: object) -> None:
    import torch.distributed as dist

    if child.rank == 1:
        raise ValueError("rank one broke: the real error")
    dist.all_reduce(torch.ones(1))  # rank 0 would wait here forever without the launcher
    dist.barrier()


def _rank1_dies(child: distributed.ChildContext, payload: object) -> None:
    import signal

    import torch.distributed as dist

    if child.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _rank0_returns(child: distributed.ChildContext, payload: int) -> tuple[int, int]:
    import torch.distributed as dist

    value = torch.tensor([float(payload)])
    dist.all_reduce(value)
    return child.rank, int(value.item())


def test_launcher_returns_every_ranks_result() -> None:
    assert distributed.launch(_rank0_returns, [1, 2], CPU2) == [(0, 3), (1, 3)]


def test_launcher_reports_the_failing_ranks_traceback_without_hanging() -> None:
    started = time.monotonic()
    with pytest.raises(ChildFailed, match="(?s)process 1 failed.*ValueError: rank one broke: the real error"):
        distributed.launch(_rank1_raises, [None, None], CPU2)
    assert time.monotonic() - started < 120


def test_launcher_reports_a_killed_rank() -> None:
    with pytest.raises(ChildFailed, match="process 1 .* killed by signal 9"):
        distributed.launch(_rank1_dies, [None, None], CPU2)


def test_cli_gpus_without_cuda_is_a_clear_error(cli, work: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("train", str(work), "-c", "3d_fullres", "-f", "3", "--gpus", "1")
    assert result.exit_code == 2
    assert "--gpus 1: no CUDA device on this machine" in result.output
    assert "Traceback" not in result.output


def test_torchrun_runs_the_same_code_path(work: Path, tmp_path: Path) -> None:
    """The README's torchrun command, on one node with two CPU processes."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("models", "preprocessed"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "autoseg", "train", str(copy), "-c", "3d_fullres", "-f", "0", "--device", "cpu", "-j", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # Under torchrun, preprocessing is a step of its own (the ranks would all do it at once).
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode != 0
    assert "not preprocessed; under torchrun run 'autoseg preprocess" in refused.stderr
    from autoseg.preprocessing import run as preprocessing

    preprocessing.run(copy, ["3d_fullres"], 1, None)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command + ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "--batch-size",
                                     "4", "--no-validate"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("✓ fold 0") == 1, "rank 0 alone reports"
    fold = _fold(copy, 0)
    assert set(os.listdir(fold)) == EXPECTED_FILES
    assert "processes: 2" in (fold / "train_config.yaml").read_text()


def _dice_share(child: distributed.ChildContext, payload: tuple) -> tuple[float, list[float]]:
    """One rank's half of a batch through the synced Dice + CE: the loss, and the gradient on its
    logits divided by the world size (DDP averages the parameters' gradients over the ranks)."""
    from autoseg.tasks.segmentation_loss import DiceCELoss

    logits, target = payload
    logits = logits.clone().requires_grad_(True)
    loss = DiceCELoss(batch_dice=True, sync=True)(logits, target)
    loss.backward()
    return float(loss), (logits.grad / child.world_size).flatten().tolist()


def test_ddp_batch_dice_equals_the_global_batch() -> None:
    from autoseg.tasks.segmentation_loss import DiceCELoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 5, 4, generator=generator)
    target = torch.randint(0, 3, (4, 1, 6, 5, 4), generator=generator)
    full = logits.clone().requires_grad_(True)
    reference = DiceCELoss(batch_dice=True)(full, target)
    reference.backward()
    halves = [(logits[:2], target[:2]), (logits[2:], target[2:])]
    (loss0, grad0), (loss1, grad1) = distributed.launch(_dice_share, halves, CPU2)
    # The Dice part is the global batch's on both ranks; the CE part is each half's own mean.
    ce = [torch.nn.functional.cross_entropy(lg, tg[:, 0]).item() for lg, tg in halves]
    dice = reference.item() - torch.nn.functional.cross_entropy(logits, target[:, 0]).item()
    assert loss0 - ce[0] == pytest.approx(dice, abs=1e-5)
    assert loss1 - ce[1] == pytest.approx(dice, abs=1e-5)
    # What reaches the parameters from each half, after DDP's averaging, is the one-process
    # gradient of the whole batch's loss with respect to that half.
    for got, expected in zip((grad0, grad1), (full.grad[:2].flatten(), full.grad[2:].flatten())):
        assert torch.allclose(torch.tensor(got), expected, rtol=1e-4, atol=1e-7)


def test_children_stop_when_the_launcher_is_killed(tmp_path: Path) -> None:
    """kill -9 of the launching process (a scheduler, a closed terminal) leaves no orphans running."""
    import signal
    import subprocess
    import sys

    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        "def sleep(child, folder):\n"
        "    open(os.path.join(folder, f'pid{child.rank}'), 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import sleeper\n"
              "from autoseg import distributed\n"
              "distributed.launch(sleeper.sleep, [sys.argv[1]] * 2, distributed.Launch('folds', ('cpu', 'cpu')),"
              " join_group=False)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all((tmp_path / f"pid{r}").is_file() for r in (0, 1)):
            time.sleep(0.1)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init to reap it is gone too
            return stat.read().split(")")[-1].split()[0] != "Z"

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
