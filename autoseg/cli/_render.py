"""Pieces every verb module shares: the console, the error and progress wrappers, value formatting.

Everything here imports rich (and the stage modules it renders for) inside the function, so that
importing the CLI for ``autoseg --help`` stays free of numpy, SimpleITK and torch. Helpers used by a
single verb live in that verb's module instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from rich.console import Console


Workers = Annotated[
    Optional[int],
    typer.Option("-j", "--workers", help="Worker processes (default: CPU count, bounded by free memory).",
                 envvar="AUTOSEG_WORKERS", show_envvar=True, min=1),
]


#: Output to a file or a pipe gets no live bars (nothing would show until the end: a 31-minute
#: prediction redirected to a log stayed silent); instead a plain progress line at most this often,
#: and a closing one when the work took at least that long.
LINE_EVERY_S = 10.0

#: A clock for elapsed times: seconds from an arbitrary start (tests pass a fake one).
Clock = Callable[[], float]


class ProgressLines:
    """Throttled plain progress lines (with elapsed time and ETA) for a console that is no terminal.

    Every command's non-terminal progress goes through this one class (:func:`progress_bar`,
    :func:`predict_progress`, :func:`training_progress`), so all say the same things the same way.

    Args:
        console: where the lines go.
        clock: monotonic seconds (``time.monotonic``; a fake clock in tests).
    """

    def __init__(self, console: Console, clock: Clock = time.monotonic) -> None:
        self.console = console
        self.clock = clock
        self.started = self.last = clock()

    def due(self) -> bool:
        """True at most once per :data:`LINE_EVERY_S` (read at each call, so tests may lower it)."""
        now = self.clock()
        if now - self.last < LINE_EVERY_S:
            return False
        self.last = now
        return True

    def long_running(self) -> bool:
        """True once the work has taken :data:`LINE_EVERY_S` or more: it deserves a closing line
        (shorter work stays quiet, as it did on a terminal)."""
        return self.clock() - self.started >= LINE_EVERY_S

    def elapsed(self) -> str:
        """``elapsed 1:02`` since this object was made."""
        return f"elapsed {_clock(self.clock() - self.started)}"

    def timing(self, fraction: float) -> str:
        """``elapsed 1:02, ETA 3:10`` for ``fraction`` of the work done (ETA ``?`` before any)."""
        elapsed = self.clock() - self.started
        eta = _clock(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
        return f"elapsed {_clock(elapsed)}, ETA {eta}"

    def say(self, text: str) -> None:
        """Print ``text`` as it is: no markup, no highlighting, never folded."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout, or on stderr for errors and progress bars (so stdout stays clean)."""
    from rich.console import Console

    # stderr carries one-line errors: never wrap them (soft wrap), so they stay greppable.
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn domain errors into one line on stderr and an exit code."""
    from autoseg.errors import AutosegError

    try:
        yield
    except AutosegError as exc:
        from rich.markup import escape

        # Escaped: a message may hold brackets that are not markup ("pip install 'autoseg[dicom]'").
        make_console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        make_console(stderr=True).print("interrupted; finished outputs were kept, partial ones discarded")
        raise typer.Exit(code=130) from None


@contextlib.contextmanager
def progress_bar(description: str, *, console: Console | None = None,
                 clock: Clock = time.monotonic) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar with ETA; yields a ``progress(done, total)`` callback.

    Not on a terminal: a plain line ``description: done/total (p%), elapsed, ETA`` every
    :data:`LINE_EVERY_S` instead, and ``description: finished done/total, elapsed`` at the end of
    work that took that long.

    Args:
        description: what is being done ("preprocessing").
        console: where it goes (default: stderr, so that stdout stays clean).
        clock: monotonic seconds, for the plain lines (a fake clock in tests).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or make_console(stderr=True)
    if not console.is_terminal:
        lines = ProgressLines(console, clock)
        last = {"done": 0, "total": 0}

        def line(done: int, total: int) -> None:
            last.update(done=done, total=total)
            if total and lines.due():
                lines.say(f"{description}: {done}/{total} ({100 * done / total:.0f}%), {lines.timing(done / total)}")

        yield line
        if lines.long_running():  # so that a log shows when a long step ended (not after an error)
            lines.say(f"{description}: finished {last['done']}/{last['total']}, {lines.elapsed()}")
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task(description, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            # Started lazily, after any worker pool has forked, so no refresh thread is forked.
            progress.start()
            started = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            progress.stop()


@contextlib.contextmanager
def training_progress(console: Console, *, clock: Clock = time.monotonic) -> Iterator[Callable[[int], object]]:
    """Per fold: a bar per epoch with ETA, one summary line per finished epoch, and a bar over the
    cases of the fold's validation after training. Not on a terminal the bars are off and a line
    every :data:`LINE_EVERY_S` says where the epoch, or the validation, is.

    Args:
        console: where it goes.
        clock: monotonic seconds, for the plain lines (a fake clock in tests).

    Yields:
        ``callbacks_for(fold)``, making the fold's ``autoseg.training.trainer.Callbacks``; its
        ``previous_stage(done, total)`` reports a cascade's preparation of the previous stage.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from autoseg.training.trainer import Callbacks

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                        disable=not console.is_terminal)
    lines = None if console.is_terminal else ProgressLines(console, clock)

    def callbacks_for(fold: int) -> Callbacks:
        task: dict = {"id": None, "epoch": None}

        def start(epoch: int, iters: int | None) -> None:
            # Called again within an epoch when a time budget has just sized the epoch.
            if task["epoch"] != epoch:
                if task["id"] is not None:
                    progress.remove_task(task["id"])
                task["id"] = progress.add_task(f"fold {fold} epoch {epoch}", total=iters, loss="-")
                task["epoch"] = epoch
            else:
                progress.update(task["id"], total=iters)

        def step(it: int, loss: float) -> None:
            progress.update(task["id"], completed=it + 1, loss=f"{loss:.4f}")
            if lines is not None and lines.due():
                total = progress.tasks[progress.task_ids.index(task["id"])].total
                of = f"/{int(total)}" if total else ""
                lines.say(f"fold {fold} epoch {task['epoch']}: iteration {it + 1}{of}, loss {loss:.4f}")

        def validating(done: int, total: int) -> None:
            if task["id"] is not None:  # training is over: the last epoch's bar makes way
                progress.remove_task(task["id"])
                task["id"] = None
            if "validation" not in task:
                # Its own clock: the ETA is over the validation cases, not since training began.
                task["validation"] = progress.add_task(f"fold {fold} validation (cases)", total=total, loss="-")
                task["validation_lines"] = None if console.is_terminal else ProgressLines(console, clock)
            progress.update(task["validation"], completed=done, total=total)
            validation_lines = task["validation_lines"]
            if validation_lines is not None and total and validation_lines.due():
                validation_lines.say(f"fold {fold} validation: case {done}/{total}, "
                                     f"{validation_lines.timing(done / total)}")
            if done == total:
                progress.remove_task(task["validation"])
                del task["validation"]

        def end(record: dict) -> None:
            dice = ", ".join("-" if d is None else f"{d:.3f}" for d in record["pseudo_dice"])
            # A restoration task's metric (PSNR, dB) is named in the record; segmentation's is pseudo-Dice.
            metric = record.get("metric", "pseudo-Dice")
            progress.console.print(
                f"fold {fold} epoch {record['epoch']}: train {record['train_loss']:.4f}, val {record['val_loss']:.4f}, "
                f"{metric} [{dice}] (EMA {record['ema_fg_dice']:.3f}), lr {record['lr']:.2e}, "
                f"{record['epoch_time_s']:.1f} s ({record['s_per_it']:.2f} s/it, data wait "
                f"{100 * record['data_wait_fraction']:.0f}%)")

        return Callbacks(on_epoch_start=start, on_iteration=step, on_epoch_end=end, on_validation=validating)

    previous: dict = {}

    def previous_stage(done: int, total: int) -> None:
        # A cascade's first step (autoseg.training.cascade.prepare_previous): a bar in the same live
        # display (a second one cannot run beside it), or lines.
        if "id" not in previous:
            previous["id"] = progress.add_task("previous stage's segmentations onto this grid (cases)",
                                               total=total, loss="-")
            previous["lines"] = None if console.is_terminal else ProgressLines(console, clock)
        progress.update(previous["id"], completed=done, total=total)
        lines_ = previous["lines"]
        if lines_ is not None and total and (lines_.due() or (done == total and lines_.long_running())):
            lines_.say(f"previous stage's segmentations onto this grid: case {done}/{total}, "
                       f"{lines_.timing(done / total)}")
        if done == total:
            progress.remove_task(previous.pop("id"))

    callbacks_for.previous_stage = previous_stage  # type: ignore[attr-defined]
    with progress:
        yield callbacks_for


@contextlib.contextmanager
def predict_progress(*, console: Console | None = None, clock: Clock = time.monotonic) -> Iterator[object]:
    """A bar per case over its sliding windows, with ETA; yields ``autoseg.inference.run.PredictCallbacks``.

    Not on a terminal: a line ``predicting CASE (k/n): windows i/m, elapsed, ETA`` (ETA over all
    cases) every :data:`LINE_EVERY_S` instead of the bars, and ``predicting: finished n case(s),
    elapsed`` at the end of a prediction that took that long.

    Args:
        console: where it goes (default: stderr, so that stdout stays clean).
        clock: monotonic seconds, for the plain lines (a fake clock in tests).
    """
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from autoseg.inference.run import PredictCallbacks

    console = console or make_console(stderr=True)
    if not console.is_terminal:
        lines = ProgressLines(console, clock)
        case: dict = {"index": 0, "total": 1, "id": ""}

        def case_line(index: int, total: int, case_id: str) -> None:
            case.update(index=index, total=total, id=case_id)
            if lines.due():  # also the only signal from processes predicting in parallel (--gpus/--procs)
                lines.say(f"predicting {case_id} ({index + 1}/{total}), {lines.timing(index / total)}")

        def windows_line(done: int, total: int) -> None:
            if total and lines.due():
                fraction = (case["index"] + done / total) / case["total"]
                lines.say(f"predicting {case['id']} ({case['index'] + 1}/{case['total']}): windows {done}/{total}, "
                          f"{lines.timing(fraction)}")

        yield PredictCallbacks(case_line, windows_line)
        if lines.long_running() and case["id"]:  # so that a log shows when it ended (not after an error)
            lines.say(f"predicting: finished {case['total']} case(s), {lines.elapsed()}")
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
    task: dict[str, object] = {}

    def on_case(index: int, total: int, case_id: str) -> None:
        if not progress.live.is_started:
            progress.start()
        if "id" in task:
            progress.remove_task(task["id"])
        task["id"] = progress.add_task(f"{escape(case_id)} ({index + 1}/{total})", total=None)

    def on_windows(done: int, total: int) -> None:
        progress.update(task["id"], completed=done, total=total)

    try:
        yield PredictCallbacks(on_case, on_windows)
    finally:
        if progress.live.is_started:
            progress.stop()


def parse_models(configs: list[str] | None, folds: list[str] | None,
                 extras: list[str]) -> tuple[list[str] | None, list[int] | None]:
    """``-c`` and ``-f`` of ``predict`` and ``export``: names (repeated or comma-separated) and fold
    numbers (``-f 0 1 2``, ``-f 0,1``, ``-f all``); None where the default applies.

    Args:
        extras: the command line's extra arguments: nnU-Net's spelling ``-f 0 1 2`` hands the
            folds after the first over as extras.

    Raises:
        ConfigError: an extra argument that is no fold number, or a fold that is no number.
    """
    from autoseg.errors import ConfigError

    names = [n.strip() for c in (configs or []) for n in c.split(",") if n.strip()] or None
    fold_words = [w.strip() for f in (folds or []) for w in f.split(",") if w.strip()]
    for extra in extras:
        if not (folds and extra.isdigit()):
            raise ConfigError(f"unexpected argument {extra!r}; folds go after -f (-f 0 1 2), inputs after -i")
        fold_words.append(extra)
    if not fold_words or [w.lower() for w in fold_words] == ["all"]:
        return names, None
    bad = [w for w in fold_words if not w.isdigit()]
    if bad:
        raise ConfigError(f"-f {bad[0]}: expected fold numbers (-f 0 1 2), a comma list, or 'all'")
    return names, [int(w) for w in fold_words]


def escape_markup(text: str) -> str:
    """``text`` with rich markup escaped: case ids, label names and paths may hold brackets."""
    from rich.markup import escape

    return escape(text)


def fmt_metric(value: float | None, digits: int = 4) -> str:
    """A table cell: ``digits`` significant figures from 10 up, else ``digits - 1`` decimals; None is "-"."""
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) >= 10 else f"{value:.{digits - 1}f}"
