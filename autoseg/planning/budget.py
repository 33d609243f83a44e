"""Plans sized by compute: ``autoseg plan RAW -o WORK --time-budget 15m``.

On a CPU the limit is arithmetic, not memory: a plan that fits in memory may run 10 s per
iteration and reach 60 optimiser steps in a 10-minute budget. With a time budget each
configuration is re-fitted so that the budget buys :data:`TARGET_ITERATIONS` training iterations
after reserving the fold's validation, by the compute model of :mod:`autoseg.planning.compute`,
trading in the order a careful human would:

1. the batch down to the preset's minimum;
2. the patch, down to 1/8 of the median image's volume in 3D (half its extent per axis on
   average; 1/4 of a 2D image, :data:`MIN_CONTEXT`), and in 3D never below the preset's
   ``min_3d_patch_voxels`` — below that the network loses the context it needs;
3. a coarser spacing (x :data:`SPACING_FACTORS`), which shrinks the image so the same patch sees
   more of it, before the patch becomes smaller than that;
4. half the features (1/4 of the FLOPs per voxel), before fewer iterations;
5. failing all that, the cheapest candidate, said plainly in the notes — and a 3D configuration
   that cannot reach the target is no longer recommended first: 2d/2.5d, which see whole slices at
   a fraction of the cost, go ahead of it.

A configuration whose validation alone would take more than :data:`MAX_VALIDATION_SHARE` of the
budget does not count as converging either (its note says to validate separately). The coarse
axis of anisotropic data keeps its spacing.

Without a budget nothing here runs, and plans stay exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from autoseg.planning.compute import ConfigCost, Throughput, config_cost
from autoseg.planning.planner import NO_CASCADE_PATCH_NOTE, _topology, memory_gb, shrink_patch
from autoseg.planning.presets import Preset
from autoseg.planning.topology import pool_and_conv_props
from autoseg.plans import Configuration

#: Training iterations a budget should buy: the cpu plan's 3d_fullres on MSD Hippocampus reached
#: 0.853 mean Dice over 5-fold CV in 600 iterations (benchmarks/README.md) and ~0.84 in ~800 in the
#: runs issue 15 reports; 800 keeps a margin for harder data.
TARGET_ITERATIONS = 800
#: Spacing multipliers tried, finest first; beyond 2x the structures radiologists segment start to
#: vanish (a 5 mm organ at 2x of a 2.5 mm CT spacing is one voxel wide), and 2D does better.
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0)
#: Feature multipliers tried after the coarsest spacing (base and maximum features of the preset).
FEATURE_FACTORS = (1.0, 0.5)
#: The smallest patch, as a fraction of the median image's volume (1/2 of the extent per axis in 3D).
MIN_CONTEXT = {3: 0.125, 2: 0.25}
#: The fold's validation may take at most this share of the budget; the rest trains.
MAX_VALIDATION_SHARE = 0.4
#: Seconds per validation case besides the network calls (reading, preprocessing, export), per
#: million voxels of the median image at the configuration's spacing.
VALIDATION_OVERHEAD_S_PER_MVOXEL = 1.5
#: Validation cases are not all median-sized: OpenKBP's budget plan took 23.4 s a case where the
#: median case predicts in 18.8 s (more windows on the larger cases), so the estimate gets 25 % more.
VALIDATION_MARGIN = 1.25


@dataclass(frozen=True)
class TimeBudget:
    """A wall-clock budget for ``autoseg train`` of one fold, training and validation together.

    Attributes:
        seconds: the budget.
        throughput: the machine's convolution rate.
        validation_cases: cases the fold validates on (a fifth of the dataset with 5 folds).
    """

    seconds: float
    throughput: Throughput
    validation_cases: int


@dataclass(frozen=True)
class BudgetFit:
    """A configuration fitted to a budget, and what the budget buys with it."""

    config: Configuration
    cost: ConfigCost
    validation_s: float
    training_s: float
    iterations: int
    spacing_factor: float
    feature_factor: float

    @property
    def converges(self) -> bool:
        """Enough iterations, and a validation that leaves most of the budget to training."""
        return self.iterations >= TARGET_ITERATIONS and self.validation_s <= MAX_VALIDATION_SHARE * (
            self.validation_s + self.training_s)


def validation_seconds(config: Configuration, cost: ConfigCost, cases: int) -> float:
    """The fold's validation: every case with TTA (one fold) and its reading and export."""
    mvoxels = math.prod(config.median_shape) / 1e6
    return VALIDATION_MARGIN * cases * (cost.predict_s_tta + VALIDATION_OVERHEAD_S_PER_MVOXEL * mvoxels)


def _evaluate(config: Configuration, num_classes: int, budget: TimeBudget, spacing_factor: float,
              feature_factor: float) -> BudgetFit:
    cost = config_cost(config, num_classes, budget.throughput)
    validation = validation_seconds(config, cost, budget.validation_cases)
    training = max(0.0, budget.seconds - validation)
    return BudgetFit(config, cost, validation, training, cost.iterations(training), spacing_factor, feature_factor)


def fit_to_budget(base: Configuration, dims_spacing: Sequence[float], median_shape: Sequence[float],
                  preset: Preset, num_classes: int, budget: TimeBudget, build) -> BudgetFit:  # noqa: ANN001
    """``base`` (the memory-fitted configuration) refitted to the budget (the module doc's order).

    Args:
        base: the configuration as planned without a budget.
        dims_spacing: its spacing along its patch axes (the last 2 for 2D).
        median_shape: the median image along the same axes, at that spacing.
        preset: the planner preset.
        num_classes: output channels.
        budget: the budget.
        build: ``build(spacing_factor, preset, patch, batch) -> Configuration`` — the configuration
            at a coarser spacing, with a preset's features, a patch and a batch (the planner's
            topology rules, so every candidate is a valid plan).
    """
    fallback: BudgetFit | None = None
    first = _evaluate(base, num_classes, budget, 1.0, 1.0)
    if first.converges:
        return first
    dims = len(dims_spacing)
    for feature_factor in FEATURE_FACTORS:
        scaled = replace(preset, base_features=max(4, round(preset.base_features * feature_factor)),
                         max_features_3d=max(8, round(preset.max_features_3d * feature_factor)),
                         max_features_2d=max(8, round(preset.max_features_2d * feature_factor)))
        for factor in SPACING_FACTORS:
            spacing = _coarser(dims_spacing, factor, preset.anisotropy_threshold)
            median = [max(1.0, m * s / c) for m, s, c in zip(median_shape, dims_spacing, spacing)]
            patch = [int(min(p, _ceil_to(m, 1))) for p, m in zip(base.patch_size, median)]
            patch = pool_and_conv_props(spacing, patch, preset.min_feature_map_edge)[2]
            smallest = MIN_CONTEXT[dims] * math.prod(median)
            if dims == 3:  # never below what the recommendation calls a starved 3D patch
                smallest = max(smallest, min(preset.min_3d_patch_voxels, math.prod(median)))
            batch = preset.min_batch_size
            while True:
                candidate = _evaluate(build(factor, scaled, patch, batch), num_classes, budget, factor, feature_factor)
                if fallback is None or candidate.cost.s_per_iteration < fallback.cost.s_per_iteration:
                    fallback = candidate
                if candidate.converges:
                    return candidate
                smaller = shrink_patch(patch, spacing, median, preset.min_feature_map_edge)
                if smaller is None or math.prod(smaller) < smallest:
                    break
                patch = smaller
    assert fallback is not None
    return fallback


def _coarser(spacing: Sequence[float], factor: float, anisotropy: float) -> list[float]:
    """``spacing`` x ``factor``, except the coarse axis of anisotropic data (coarser than
    ``anisotropy`` x the finest), which keeps its spacing: 5 mm slices do not become 10 mm."""
    finest = min(spacing)
    return [s if s > anisotropy * finest else s * factor for s in spacing]


def _ceil_to(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def budget_note(name: str, fit: BudgetFit, budget: TimeBudget) -> str:
    """One line for the plan table: what the budget buys with this configuration."""
    changes = []
    if fit.spacing_factor != 1.0:
        changes.append(f"spacing x{fit.spacing_factor:g}")
    if fit.feature_factor != 1.0:
        changes.append(f"features x{fit.feature_factor:g}")
    how = f" ({', '.join(changes)})" if changes else ""
    if fit.iterations < TARGET_ITERATIONS:
        verdict = f" — fewer than the {TARGET_ITERATIONS} it needs to converge"
    elif not fit.converges:
        verdict = (f" — validating takes more than {MAX_VALIDATION_SHARE:.0%} of the budget: train with "
                   "--no-validate and validate later (--validate-only), or give a larger budget")
    else:
        verdict = ""
    return (f"{name}{how}: ~{fit.cost.s_per_iteration:.2f} s/iteration, ~{fit.iterations} iterations in "
            f"{fit.training_s / 60:.1f} min of training + {fit.validation_s / 60:.1f} min validating "
            f"{budget.validation_cases} cases{verdict}")


def apply_budget(configs: dict[str, Configuration], budget: TimeBudget, preset: Preset, num_classes: int,
                 notes: list[str]) -> tuple[dict[str, Configuration], dict[str, BudgetFit]]:
    """Every configuration refitted to ``budget`` (:func:`fit_to_budget`), with a note each on
    what the budget buys. A cascade is not planned under a budget (its two stages would share it)."""
    fitted: dict[str, Configuration] = {}
    fits: dict[str, BudgetFit] = {}
    notes.append(f"time budget {budget.seconds / 60:g} min per fold (training and validation) on "
                 f"{budget.throughput.describe(short=True)}")
    if "3d_lowres" in configs:
        notes[:] = [n for n in notes if not n.startswith("3d_lowres:")]
        notes.append("3d_lowres / 3d_cascade_fullres: not planned under a time budget (two stages would share it)")
    else:  # the reason given was measured on the patch planned without the budget: say so
        notes[:] = [f"{n} (the patch planned without a time budget)"
                    if n.startswith(NO_CASCADE_PATCH_NOTE) else n
                    for n in notes]
    for name, config in configs.items():
        if name in ("3d_lowres", "3d_cascade_fullres"):
            continue
        dims = config.dims
        axes = list(range(3 - dims, 3))

        def build(factor: float, scaled: Preset, patch: Sequence[int], batch: int,
                  config: Configuration = config, axes: list[int] = axes) -> Configuration:
            coarse = _coarser([config.spacing[i] for i in axes], factor, scaled.anisotropy_threshold)
            spacing, median = list(config.spacing), list(config.median_shape)
            for i, value in zip(axes, coarse):
                median[i] = median[i] * spacing[i] / value
                spacing[i] = value
            strides, kernels, size, _ = pool_and_conv_props([spacing[i] for i in axes], patch,
                                                            scaled.min_feature_map_edge)
            topology = _topology(scaled, dims, strides, kernels)
            return replace(config, spacing=tuple(float(round(s, 10)) for s in spacing),
                           median_shape=tuple(float(round(m, 4)) for m in median), patch_size=tuple(size),
                           batch_size=int(batch), topology=topology,
                           estimated_memory_gb=round(memory_gb(size, topology, int(batch), scaled, num_classes), 3))

        if name == "2.5d" and "2d" in fits:  # 2.5d shares 2d's plan, with neighbour slices as channels
            base = fits["2d"]
            fit = _evaluate(replace(base.config, context_slices=config.context_slices), num_classes, budget,
                            base.spacing_factor, base.feature_factor)
        else:
            fit = fit_to_budget(config, [config.spacing[i] for i in axes], [config.median_shape[i] for i in axes],
                                preset, num_classes, budget, build)
        fitted[name], fits[name] = fit.config, fit
        notes.append(budget_note(name, fit, budget))
    return fitted, fits


def recommend_for_budget(recommended: Sequence[str], fits: dict[str, BudgetFit], notes: list[str]) -> list[str]:
    """The recommendation with configurations that converge in the budget first (2d/2.5d ahead of
    a 3d_fullres that cannot)."""
    good = [n for n in recommended if n in fits and fits[n].converges]
    rest = [n for n in recommended if n not in good]
    if "3d_fullres" in rest and good:
        notes.append(f"3d_fullres cannot train {TARGET_ITERATIONS} iterations in the budget: "
                     f"{', '.join(good)} recommended first")
    return good + rest


__all__ = ["MAX_VALIDATION_SHARE", "TARGET_ITERATIONS", "BudgetFit", "TimeBudget", "apply_budget", "budget_note", "fit_to_budget",
           "recommend_for_budget",
           "validation_seconds"]
