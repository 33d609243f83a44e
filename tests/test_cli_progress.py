"""Progress when the output is no terminal (a log file, a pipe): plain lines every 10 s and at the end.

A fake clock drives the lines, and the console writes to a string: nothing sleeps.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from autoseg.cli._render import predict_progress, progress_bar, training_progress


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _log() -> Console:
    """A console writing to a string, as to a redirected file: no terminal, so no live bars."""
    console = Console(file=io.StringIO(), width=80)
    assert not console.is_terminal
    return console


def _lines(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_a_line_every_10_s_and_one_at_the_end() -> None:
    clock, log = FakeClock(), _log()
    with progress_bar("preprocessing", console=log, clock=clock) as progress:
        for done in range(1, 21):
            clock.now += 2.0  # 20 cases, 2 s each
            progress(done, 20)
    assert _lines(log) == [
        "preprocessing: 5/20 (25%), elapsed 0:10, ETA 0:30",
        "preprocessing: 10/20 (50%), elapsed 0:20, ETA 0:20",
        "preprocessing: 15/20 (75%), elapsed 0:30, ETA 0:10",
        "preprocessing: 20/20 (100%), elapsed 0:40, ETA 0:00",
        "preprocessing: finished 20/20, elapsed 0:40",
    ]


def test_work_shorter_than_10_s_stays_quiet() -> None:
    clock, log = FakeClock(), _log()
    with progress_bar("checking cases", console=log, clock=clock) as progress:
        for done in range(1, 6):
            clock.now += 1.0
            progress(done, 5)
    assert _lines(log) == []


def test_no_closing_line_after_an_error() -> None:
    """'finished' would be a lie: the error line follows instead."""
    clock, log = FakeClock(), _log()
    with pytest.raises(RuntimeError), progress_bar("evaluating", console=log, clock=clock) as progress:
        clock.now += 12.0
        progress(1, 3)
        raise RuntimeError("case 2 unreadable")
    assert _lines(log) == ["evaluating: 1/3 (33%), elapsed 0:12, ETA 0:24"]


def test_predict_lines_name_the_case_and_its_windows_with_an_eta_over_all_cases() -> None:
    clock, log = FakeClock(), _log()
    with predict_progress(console=log, clock=clock) as callbacks:
        for index, case_id in enumerate(("a", "b")):
            callbacks.on_case(index, 2, case_id)
            for done in range(1, 5):
                clock.now += 5.0  # 4 windows of 5 s per case
                callbacks.on_windows(done, 4)
    assert _lines(log) == [
        "predicting a (1/2): windows 2/4, elapsed 0:10, ETA 0:30",
        "predicting a (1/2): windows 4/4, elapsed 0:20, ETA 0:20",
        "predicting b (2/2): windows 2/4, elapsed 0:30, ETA 0:10",
        "predicting b (2/2): windows 4/4, elapsed 0:40, ETA 0:00",
        "predicting: finished 2 case(s), elapsed 0:40",
    ]


def test_fold_validation_after_training_reports_its_cases_with_its_own_eta() -> None:
    """The validation's ETA counts from its start, not from the start of training."""
    clock, log = FakeClock(), _log()
    with training_progress(log, clock=clock) as callbacks_for:
        callbacks = callbacks_for(0)
        callbacks.on_epoch_start(0, 2)
        for it in range(2):
            clock.now += 30.0
            callbacks.on_iteration(it, 0.5)
        callbacks.on_validation(0, 4)
        for done in range(1, 5):
            clock.now += 6.0  # 4 cases of 6 s
            callbacks.on_validation(done, 4)
    assert _lines(log) == [
        "fold 0 epoch 0: iteration 1/2, loss 0.5000",
        "fold 0 epoch 0: iteration 2/2, loss 0.5000",
        "fold 0 validation: case 2/4, elapsed 0:12, ETA 0:12",
        "fold 0 validation: case 4/4, elapsed 0:24, ETA 0:00",
    ]


def test_cascade_preparation_of_the_previous_stage_reports_its_cases() -> None:
    """A cascade's first step (the lowres segmentations of every case onto the fullres grid) takes
    minutes on big CTs: it shows where it is, in the training display, and says when it ended."""
    clock, log = FakeClock(), _log()
    with training_progress(log, clock=clock) as callbacks_for:
        callbacks_for.previous_stage(0, 6)
        for done in range(1, 7):
            clock.now += 4.0  # 6 cases of 4 s
            callbacks_for.previous_stage(done, 6)
    assert _lines(log) == [
        "previous stage's segmentations onto this grid: case 3/6, elapsed 0:12, ETA 0:12",
        "previous stage's segmentations onto this grid: case 6/6, elapsed 0:24, ETA 0:00",
    ]
