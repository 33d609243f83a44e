"""Tasks: the seam between the shared pipeline and what one kind of problem needs.

A task is a :class:`~autoseg.tasks.base.Task` subclass in a module of this package, registered in
:data:`TASKS` by its name; plans.yaml and every checkpoint record the name (``task:``). Adding a
task (denoising, super-resolution, ...) adds a module and a registry entry, not a branch in the
stages. See :mod:`autoseg.tasks.base` for what a task decides, and :mod:`autoseg.dataset.kinds` for
how a task's raw dataset is laid out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from autoseg.errors import UnknownNameError
from autoseg.tasks.base import ConfigPrediction, Task
from autoseg.tasks.restoration import Denoise, SuperResolution
from autoseg.tasks.segmentation import Segmentation

if TYPE_CHECKING:
    from autoseg.plans import Normalization, Plans

#: Every task, by the name written in plans.yaml and checkpoints.
TASKS: dict[str, type[Task]] = {Segmentation.name: Segmentation, Denoise.name: Denoise,
                                SuperResolution.name: SuperResolution}
#: The task of plans and checkpoints that name none (everything autoseg wrote before tasks).
DEFAULT_TASK = Segmentation.name


def get_task(name: str | None, labels: Mapping[str, Sequence[int]], where: str = "task", *,
             channel_names: Sequence[str] = (), normalization: "Sequence[Normalization]" = (),
             **options: Any) -> Task:
    """The task called ``name`` (None: :data:`DEFAULT_TASK`) for a dataset with ``labels``.

    Args:
        name: the task's name (plans.yaml's or a checkpoint's ``task``).
        labels: the labels (empty for restoration).
        where: names the source in errors.
        channel_names: the input channels (restoration has one output per channel).
        normalization: a configuration's normalisation (restoration's online metric and export
            un-normalise with it).
        options: what only some tasks take (super-resolution: ``upsample_factor``, ``fine_spacing``;
            :func:`task_options` gives them from plans).

    Raises:
        UnknownNameError: no task has that name (the message lists them, with a did-you-mean).
        ConfigError: the task cannot work with these channels or this normalisation.
    """
    name = DEFAULT_TASK if name is None else name
    if name not in TASKS:
        raise UnknownNameError("task", name, TASKS, where)
    return TASKS[name](labels, channel_names=channel_names, normalization=normalization, **options)


def task_options(plans: Plans) -> dict[str, Any]:
    """The task-specific arguments plans hold (super-resolution: its grid), for :func:`get_task`."""
    if plans.upsample_factor is None:
        return {}
    return {"upsample_factor": plans.upsample_factor, "fine_spacing": plans.min_target_spacing}


def task_of(plans: "Plans", configuration: str | None = None) -> Task:
    """The task of ``plans``, with a configuration's normalisation (default: the first's).

    Raises:
        PlanError: ``configuration`` is not in the plans.
    """
    config = plans.configuration(configuration) if configuration else next(iter(plans.configurations.values()))
    return get_task(plans.task, plans.labels, "plans.yaml", channel_names=plans.channel_names,
                    normalization=config.normalization, **task_options(plans))


__all__ = ["DEFAULT_TASK", "TASKS", "ConfigPrediction", "Denoise", "Segmentation", "SuperResolution", "Task", "get_task",
           "task_of", "task_options"]
