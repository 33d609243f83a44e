"""Tasks: the seam between the shared pipeline and what one kind of problem needs.

A task is a :class:`~autoseg.tasks.base.Task` subclass in a module of this package, registered in
:data:`TASKS` by its name; plans.yaml and every checkpoint record the name (``task:``). Adding a
task (denoising, super-resolution, ...) adds a module and a registry entry, not a branch in the
stages. See :mod:`autoseg.tasks.base` for what a task decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from autoseg.errors import UnknownNameError
from autoseg.tasks.base import ConfigPrediction, Task
from autoseg.tasks.segmentation import Segmentation

#: Every task, by the name written in plans.yaml and checkpoints.
TASKS: dict[str, type[Task]] = {Segmentation.name: Segmentation}
#: The task of plans and checkpoints that name none (everything autoseg wrote before tasks).
DEFAULT_TASK = Segmentation.name


def get_task(name: str | None, labels: Mapping[str, Sequence[int]], where: str = "task") -> Task:
    """The task called ``name`` (None: :data:`DEFAULT_TASK`) for a dataset with ``labels``.

    Raises:
        UnknownNameError: no task has that name (the message lists them, with a did-you-mean).
    """
    name = DEFAULT_TASK if name is None else name
    if name not in TASKS:
        raise UnknownNameError("task", name, TASKS, where)
    return TASKS[name](labels)


__all__ = ["DEFAULT_TASK", "TASKS", "ConfigPrediction", "Segmentation", "Task", "get_task"]
