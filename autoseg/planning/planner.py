"""``plan(fingerprint, preset) -> Plans``: pure, torch-free, deterministic.

Baseline: nnU-Net v2's published heuristics (DESIGN §5), with three additions: a ``2.5d``
configuration, a ``recommended`` list for the available GPU memory, and explicit notes that say
why each non-obvious decision was taken.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from autoseg.channels import FALLBACK_SCHEME, is_known_channel, scheme_for_channel
from autoseg.dataset.fingerprint import Fingerprint
from autoseg.dataset.kinds import DATASET_KINDS
from autoseg.errors import PlanError
from autoseg.planning.mirroring import with_mirror_axes
from autoseg.planning.presets import Preset
from autoseg.planning.restoration import restoration_normalization, restoration_notes

if TYPE_CHECKING:
    from autoseg.planning.budget import TimeBudget
from autoseg.planning.topology import (
    estimate_feature_map_units,
    features_per_stage,
    pool_and_conv_props,
)
from autoseg.plans import Configuration, Normalization, Plans, Resampling, Topology, foreground_label_values
from autoseg.regions import (
    indistinguishable_values,
    is_region_based,
    output_names,
    output_regions,
)

#: nnU-Net uses the nonzero mask for z-score normalisation when cropping to nonzero kept less
#: than this fraction of the median image.
MASK_NORM_THRESHOLD = 0.75
#: Initial patch volume before fitting to the budget (nnU-Net v2: 256^3 voxels in 3D, 2048^2 in 2D).
INITIAL_PATCH_VOXELS_3D = 256**3
INITIAL_PATCH_VOXELS_2D = 2048**2


@dataclass(frozen=True)
class GpuMemory:
    """The GPU memory the recommendation is made for, and where the number came from."""

    gb: float
    source: str


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, threshold: float) -> tuple[np.ndarray, int | None]:
    """Per-axis median spacing; for anisotropic data, the coarse axis' 10th percentile instead.

    Returns:
        The target spacing and the index of the anisotropic axis (``None`` if isotropic enough).
    """
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > threshold * max(target[others])
    aniso_voxels = median_shape[worst] * threshold < min(median_shape[others])
    if not (aniso_spacing and aniso_voxels):
        return target, None
    coarse = float(np.percentile(spacings[:, worst], 10))
    # Never finer than the coarsest of the other axes (nnU-Net adds 1e-5 to keep the axis the coarsest).
    if coarse < max(target[others]):
        coarse = max(max(target[others]), coarse) + 1e-5
    target = target.copy()
    target[worst] = coarse
    return target, worst


def transpose_for(spacing: Sequence[float]) -> tuple[int, int, int]:
    """Move the coarsest axis first (2D and 2.5D slice along axis 0 after the transpose)."""
    coarsest = int(np.argmax(spacing))
    return (coarsest, *[i for i in range(3) if i != coarsest])  # type: ignore[return-value]


def resampled_shapes(fp: Fingerprint, spacing: np.ndarray) -> np.ndarray:
    """Each case's cropped shape after resampling to ``spacing`` (nnU-Net's compute_new_shape)."""
    return np.array(
        [[int(round(s / t * n)) for s, t, n in zip(case.spacing, spacing, case.shape_after_crop)] for case in fp.cases],
        dtype=np.float64,
    )


def _topology(preset: Preset, dims: int, strides: list[list[int]], kernels: list[list[int]]) -> Topology:
    n = len(strides)
    if n > len(preset.blocks_per_stage):
        raise PlanError(f"preset {preset.name!r}: the patch needs {n} stages but blocks_per_stage lists "
                        f"{len(preset.blocks_per_stage)}; add entries to the preset")
    return Topology(
        features_per_stage=features_per_stage(n, preset.base_features,
                                              preset.max_features_3d if dims == 3 else preset.max_features_2d),
        strides=tuple(tuple(s) for s in strides),
        kernel_sizes=tuple(tuple(k) for k in kernels),
        blocks_per_stage=tuple(preset.blocks_per_stage[:n]),
        decoder_blocks_per_stage=tuple(preset.decoder_blocks_per_stage[: n - 1]),
        residual_encoder=preset.residual_encoder,
    )


def fit_patch(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    preset: Preset,
    num_classes: int,
    n_voxels_dataset: float,
) -> tuple[list[int], int, Topology, float]:
    """Patch, batch and topology that fit the preset's memory budget.

    Start from a patch ∝ 1/spacing with 256³ (3D) / 2048² (2D) voxels clipped to the median
    shape; shrink the axis with the largest patch/median ratio until batch 2 fits; spend the
    remaining budget on the batch, capped so one batch covers at most
    ``max_dataset_fraction_per_batch`` of the dataset.

    Returns:
        ``(patch_size, batch_size, topology, estimated_memory_gb)``.
    """
    dims = len(spacing)
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    volume = INITIAL_PATCH_VOXELS_3D if dims == 3 else INITIAL_PATCH_VOXELS_2D
    initial = [round(v) for v in inverse * (volume / np.prod(inverse)) ** (1 / dims)]
    initial = [int(min(p, m)) for p, m in zip(initial, median_shape)]
    initial = [max(p, 1) for p in initial]

    strides, kernels, patch, divisor = pool_and_conv_props(spacing, initial, preset.min_feature_map_edge)
    reference_units = (preset.reference_units_3d if dims == 3 else preset.reference_units_2d)
    reference = reference_units * preset.memory_budget_gb / preset.reference_memory_gb
    reference_batch = preset.reference_batch_3d if dims == 3 else preset.reference_batch_2d

    def estimate(p: list[int], s: list[list[int]], k: list[list[int]]) -> float:
        return float(estimate_feature_map_units(p, _topology(preset, dims, s, k), num_classes))

    units = estimate(patch, strides, kernels)
    # Shrink until a batch of 2 fits (the reference batch may differ from 2, hence the rescaling).
    while units / reference_batch * 2 > reference:
        smaller = shrink_patch(patch, spacing, median_shape, preset.min_feature_map_edge)
        if smaller is None:
            break
        strides, kernels, patch, divisor = pool_and_conv_props(spacing, smaller, preset.min_feature_map_edge)
        units = estimate(patch, strides, kernels)

    batch = round(reference / units * reference_batch)
    cap = round(n_voxels_dataset * preset.max_dataset_fraction_per_batch / float(np.prod(patch, dtype=np.float64)))
    batch = max(min(batch, cap), preset.min_batch_size)
    if preset.max_batch_size is not None:
        batch = min(batch, preset.max_batch_size)
    topology = _topology(preset, dims, strides, kernels)
    return [int(p) for p in patch], int(batch), topology, memory_gb(patch, topology, int(batch), preset, num_classes)


def memory_gb(patch: Sequence[int], topology: Topology, batch: int, preset: Preset, num_classes: int) -> float:
    """Estimated training memory of a patch, topology and batch (nnU-Net's feature-map calibration)."""
    dims = len(patch)
    reference_units = preset.reference_units_3d if dims == 3 else preset.reference_units_2d
    reference_batch = preset.reference_batch_3d if dims == 3 else preset.reference_batch_2d
    units = float(estimate_feature_map_units(list(patch), topology, num_classes))
    return float(units * batch / reference_batch / reference_units * preset.reference_memory_gb)


def shrink_patch(patch: Sequence[int], spacing: Sequence[float], median_shape: Sequence[float],
                 min_edge: int) -> list[int] | None:
    """The patch one step smaller along the axis with the largest patch/median ratio (the memory
    fit's step, also the time budget's), or None when that axis cannot shrink.

    The step is the divisor of the *reduced* size, so that no valid size is skipped (256 -> 224,
    not 192).
    """
    ratios = [p / m for p, m in zip(patch, median_shape)]
    axis = int(np.argsort(ratios, kind="stable")[-1])
    trial = list(patch)
    trial[axis] -= pool_and_conv_props(spacing, trial, min_edge)[3][axis]
    if trial[axis] < 1:
        return None
    result = list(patch)
    # Fewer pools at the reduced size: its divisor is at most the current one, so result >= trial >= 1.
    result[axis] -= pool_and_conv_props(spacing, trial, min_edge)[3][axis]
    return pool_and_conv_props(spacing, result, min_edge)[2]


def normalization_for(fp: Fingerprint) -> tuple[Normalization, ...]:
    """One scheme per channel, by channel name (:func:`autoseg.channels.scheme_for_channel`: unknown
    names get z-score, near misses of a scheme raise with a suggestion)."""
    use_mask = fp.median_relative_size_after_crop < MASK_NORM_THRESHOLD
    result = []
    for index, name in enumerate(fp.channel_names):
        scheme = scheme_for_channel(name)
        if scheme == "ct":
            stats = fp.intensity[index]
            if stats.n == 0 or stats.mean is None:
                raise PlanError(f"channel {index} ({name}): no foreground voxels to compute CT statistics; "
                                "check that the labels are not empty")
            result.append(Normalization("ct", False, (stats.p00_5, stats.p99_5), stats.mean, stats.std))
        elif scheme == "zscore":
            result.append(Normalization("zscore", use_mask))
        else:
            result.append(Normalization(scheme, False))
    return tuple(result)


def preset_for_gpu(preset: Preset, gpu_memory_gb: float) -> Preset:
    """The preset with its memory budget set to an explicit GPU size (``--gpu-memory``)."""
    if gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
    return replace(preset, memory_budget_gb=float(gpu_memory_gb))


def context_slices(slice_spacing: float, preset: Preset) -> int:
    """2.5D neighbours on each side: about ``context_mm`` of tissue in total, 1..max_context_slices.

    Thin slices get more neighbours (1 mm -> 3 with the default preset), thick ones fewer (5 mm -> 1).
    """
    k = round(preset.context_mm / (2.0 * slice_spacing))
    return int(min(max(k, 1), preset.max_context_slices))


def _resampling(preset: Preset) -> Resampling:
    return Resampling(image_order=3, label_order=1, order_z=0, anisotropy_threshold=preset.anisotropy_threshold)


def plan(fp: Fingerprint, preset: Preset, gpu_memory: GpuMemory | None = None, planner_name: str | None = None,
         budget: TimeBudget | None = None) -> Plans:
    """Plan every configuration the preset asks for.

    Args:
        fp: the dataset fingerprint.
        preset: planner preset (memory budget, network sizes, thresholds).
        gpu_memory: memory available for training, for the ``recommended`` list (default: the
            preset's budget).
        planner_name: recorded in the plans (default: the preset's name).
        budget: a time budget per fold (:mod:`autoseg.planning.budget`): every configuration is
            refitted so that it buys enough iterations; None plans as nnU-Net would.

    Raises:
        PlanError: the fingerprint has no cases, or no patch fits the budget.
    """
    if fp.num_cases == 0:
        raise PlanError("the fingerprint has no cases; nothing to plan")
    gpu = gpu_memory or GpuMemory(preset.memory_budget_gb, f"preset {preset.name}")
    spacings, shapes = fp.spacings, fp.shapes_after_crop
    # A restoration dataset (no labels, autoseg.dataset.kinds) has one output per input channel, an
    # invertible normalisation and no cascade (autoseg.planning.restoration); the memory model,
    # spacing, patch and configurations are the same for every task.
    kind = DATASET_KINDS.get(fp.task)
    if kind is None or not kind.plannable:
        raise PlanError(f"task {fp.task!r}: not supported yet by the planner (it plans "
                        f"{', '.join(k for k, v in DATASET_KINDS.items() if v.plannable)})")
    restoration = not kind.labels
    num_classes = len(fp.channel_names) if restoration else fp.num_classes
    notes: list[str] = []

    if fp.dims == 2:
        full_spacing, aniso_axis = np.median(spacings, axis=0), None
        transpose: tuple[int, int, int] = (0, 1, 2)
    else:
        full_spacing, aniso_axis = target_spacing(spacings, shapes, preset.anisotropy_threshold)
        transpose = transpose_for(full_spacing)
        if aniso_axis is not None:
            notes.append(f"anisotropic: axis {aniso_axis} spacing {np.median(spacings[:, aniso_axis]):.3g} mm "
                         f"(median) planned at its 10th percentile {full_spacing[aniso_axis]:.3g} mm")
    new_shapes = resampled_shapes(fp, full_spacing)
    median_shape = np.median(new_shapes, axis=0)[list(transpose)]
    spacing_t = np.asarray(full_spacing)[list(transpose)]
    n_voxels_dataset = float(np.prod(median_shape, dtype=np.float64)) * fp.num_cases
    normalization = restoration_normalization(fp) if restoration else normalization_for(fp)
    wanted = set(preset.configurations)
    configs: dict[str, Configuration] = {}
    resampling = _resampling(preset)
    spacing_list = tuple(float(round(s, 10)) for s in spacing_t)
    median_list = tuple(float(m) for m in median_shape)

    plan_2d: Configuration | None = None
    if "2d" in wanted or "2.5d" in wanted or fp.dims == 2:
        patch, batch, topo, mem = fit_patch(spacing_t[1:], median_shape[1:], preset, num_classes, n_voxels_dataset)
        plan_2d = Configuration(2, spacing_list, tuple(patch), batch, median_list, normalization, topo,
                                resampling, 0, round(mem, 3))
        if "2d" in wanted or fp.dims == 2:
            configs["2d"] = plan_2d

    if fp.dims == 3 and "2.5d" in wanted and plan_2d is not None:
        k = context_slices(float(spacing_t[0]), preset)
        configs["2.5d"] = Configuration(2, spacing_list, plan_2d.patch_size, plan_2d.batch_size, median_list,
                                        normalization, plan_2d.topology, resampling, k,
                                        plan_2d.estimated_memory_gb)
        notes.append(f"2.5d: {2 * k + 1} slices ({spacing_t[0]:.3g} mm apart) as input channels")

    if fp.dims == 3 and ("3d_fullres" in wanted or "3d_lowres" in wanted):
        patch, batch, topo, mem = fit_patch(spacing_t, median_shape, preset, num_classes, n_voxels_dataset)
        fullres = Configuration(3, spacing_list, tuple(patch), batch, median_list, normalization, topo,
                                resampling, 0, round(mem, 3))
        if "3d_fullres" in wanted:
            configs["3d_fullres"] = fullres
        if "3d_lowres" in wanted and not restoration:
            lowres = _plan_lowres(fullres, spacing_t, median_shape, preset, num_classes, n_voxels_dataset,
                                  normalization, resampling)
            if lowres is not None and "3d_fullres" in configs:
                configs["3d_lowres"] = Configuration(**{**lowres.__dict__, "next_stage": "3d_cascade_fullres"})
                configs["3d_cascade_fullres"] = Configuration(**{
                    **fullres.__dict__, "previous_stage": "3d_lowres",
                    "previous_stage_channels": len(foreground_label_values(fp.labels))})
                notes.append(f"3d_lowres: fullres patch covers "
                             f"{100 * np.prod(fullres.patch_size) / np.prod(median_shape):.0f}% of the median image "
                             f"(< {100 * preset.lowres_threshold:.0f}%); lowres at spacing "
                             f"{[round(s, 3) for s in lowres.spacing]}")
            elif "3d_fullres" in configs and not restoration:
                notes.append(lowres_absent_note(fullres, median_shape, preset))

    if not configs:
        raise PlanError(f"preset {preset.name!r} plans no configuration for a {fp.dims}D dataset; "
                        "add '2d' to its configurations")
    if not restoration:  # before the budget: its prediction estimates count the mirrored passes
        configs = with_mirror_axes(configs, fp.labels, [c.orientation for c in fp.cases], transpose, notes)
    fits = None
    if budget is not None:
        from autoseg.planning.budget import apply_budget

        configs, fits = apply_budget(configs, budget, preset, num_classes, notes)
    notes.extend(region_notes(fp.labels))
    notes.extend(restoration_notes(fp, normalization) if restoration else [])
    notes.extend(f"channel {index} ({name!r}): no modality autoseg knows; normalised with {FALLBACK_SCHEME} "
                 "(nnU-Net's fallback) — name it in dataset.json to choose" for index, name in
                 enumerate(fp.channel_names) if not is_known_channel(name))
    recommended = _recommend(configs, gpu, preset, notes)
    if fits is not None:
        from autoseg.planning.budget import recommend_for_budget

        recommended = recommend_for_budget(recommended, fits, notes)
    plans = Plans(
        dataset_name=fp.dataset_name,
        planner=planner_name or preset.name,
        transpose=transpose,
        channel_names=tuple(fp.channel_names),
        labels={k: list(v) for k, v in fp.labels.items()},
        configurations=dict(sorted(configs.items(), key=lambda kv: _ORDER.index(kv[0]))),
        recommended=tuple(recommended),
        memory_budget_gb=float(preset.memory_budget_gb),
        gpu_memory_gb=float(gpu.gb),
        gpu_memory_source=gpu.source,
        original_median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),
        original_median_shape=tuple(float(v) for v in np.median(shapes, axis=0)),
        anisotropic=aniso_axis is not None,
        task=fp.task,
        upsample_factor=fp.upsample_factor,
        # Super-resolution: the thinnest target, so that no training input reads as "fine already".
        min_target_spacing=None if fp.upsample_factor is None else tuple(float(v) for v in np.min(spacings, axis=0)),
        notes=tuple(notes),
        fingerprint_sha256=fingerprint_digest(fp),
        time_budget_s=None if budget is None else float(budget.seconds),
        # 4 significant digits: a slow machine's (or a small --throughput's) rate must not round to 0.
        throughput_gflops=None if budget is None else (float(f"{budget.throughput.train_gflops:.4g}"),
                                                      float(f"{budget.throughput.infer_gflops:.4g}")),
    )
    return plans


_ORDER = ["2d", "2.5d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]


def region_notes(labels: dict[str, list[int]]) -> list[str]:
    """What the plan table says about region-based labels (nothing for softmax classes)."""
    if not is_region_based(labels):
        return []
    notes = [f"region-based labels: {len(output_names(labels))} sigmoid outputs ({', '.join(output_names(labels))}), "
             "Dice + BCE loss"]
    for group in indistinguishable_values(output_regions(labels)):
        notes.append(f"label values {list(group)} lie in the same regions: predictions write {group[0]} for all")
    return notes


#: How the plan table's "why no cascade" note starts when the 3d_fullres patch decided it (a time
#: budget, which refits that patch, qualifies this note: autoseg.planning.budget).
NO_CASCADE_PATCH_NOTE = "3d_lowres / 3d_cascade_fullres: not planned: the 3d_fullres patch"


def lowres_absent_note(fullres: Configuration, median_shape: np.ndarray, preset: Preset) -> str:
    """Why the plan has no cascade (said in the plan table, as the issue of users asking for
    ``3d_lowres`` on data that does not need it shows)."""
    covered = float(np.prod(fullres.patch_size, dtype=np.float64) / np.prod(median_shape, dtype=np.float64))
    if covered >= preset.lowres_threshold:
        return (f"{NO_CASCADE_PATCH_NOTE} covers "
                f"{min(100 * covered, 100):.0f}% of the median image (a cascade starts below "
                f"{100 * preset.lowres_threshold:.0f}%)")
    return ("3d_lowres / 3d_cascade_fullres: not planned: a coarser spacing that lets the patch see "
            f"{100 * preset.lowres_threshold:.0f}% of the image would not halve the median image")


def _plan_lowres(
    fullres: Configuration, spacing: np.ndarray, median_shape: np.ndarray, preset: Preset, num_classes: int,
    n_voxels_dataset: float, normalization: tuple[Normalization, ...], resampling: Resampling,
) -> Configuration | None:
    """A coarser 3D configuration when the fullres patch sees < ``lowres_threshold`` of the image.

    Spacing grows by ``lowres_spacing_step`` per step (coarse axes first, until within 2x of the
    others) until the patch covers the threshold; kept only if it halves the median image at least.
    """
    patch_voxels = float(np.prod(fullres.patch_size, dtype=np.float64))
    median_voxels = float(np.prod(median_shape, dtype=np.float64))
    if patch_voxels / median_voxels >= preset.lowres_threshold:
        return None
    lowres_spacing = np.array(spacing, dtype=np.float64)
    lowres: Configuration | None = None
    lowres_shape = median_shape
    for _ in range(1000):  # the loop always ends long before; the bound guards against a bad preset
        if patch_voxels / median_voxels >= preset.lowres_threshold:
            break
        coarsest = lowres_spacing.max()
        if np.any(coarsest / lowres_spacing > 2):
            lowres_spacing[coarsest / lowres_spacing > 2] *= preset.lowres_spacing_step
        else:
            lowres_spacing *= preset.lowres_spacing_step
        lowres_shape = spacing / lowres_spacing * median_shape
        median_voxels = float(np.prod(lowres_shape, dtype=np.float64))
        rounded = np.array([round(v) for v in lowres_shape], dtype=np.float64)
        patch, batch, topo, mem = fit_patch(lowres_spacing, rounded, preset, num_classes, n_voxels_dataset)
        patch_voxels = float(np.prod(patch, dtype=np.float64))
        lowres = Configuration(3, tuple(float(round(s, 10)) for s in lowres_spacing), tuple(patch), batch,
                               tuple(float(v) for v in rounded), normalization, topo, resampling, 0, round(mem, 3))
    if lowres is None or 2 * np.prod(lowres.median_shape) >= np.prod(median_shape):
        return None
    return lowres


def _recommend(configs: dict[str, Configuration], gpu: GpuMemory, preset: Preset, notes: list[str]) -> list[str]:
    """Configurations worth training for this GPU memory, best first.

    3D configurations are recommended when their estimated memory fits and the patch is not
    starved (at least ``min_3d_patch_voxels`` or the whole median image); otherwise 2.5D/2D, which
    see a whole slice, are the better use of little memory.
    """
    recommended: list[str] = []
    # Batch sizes are rounded to the nearest integer (as nnU-Net does), which can overshoot the
    # budget by up to half a sample; a 10 % margin keeps such a plan "fitting" its own budget.
    fits = {name: c.estimated_memory_gb <= gpu.gb * 1.1 for name, c in configs.items()}
    full = configs.get("3d_fullres")
    if full is not None:
        starved = np.prod(full.patch_size) < min(preset.min_3d_patch_voxels, np.prod(full.median_shape))
        if not fits["3d_fullres"]:
            notes.append(f"3d_fullres needs about {full.estimated_memory_gb:.1f} GB but {gpu.gb:.1f} GB are "
                         f"available ({gpu.source}): not recommended; re-plan with --gpu-memory {gpu.gb:g}")
        elif starved:
            notes.append(f"3d_fullres patch {list(full.patch_size)} is too small to see enough context: "
                         "not recommended; 2D/2.5D recommended instead")
        else:
            recommended.append("3d_fullres")
            if "3d_lowres" in configs and fits["3d_lowres"] and fits["3d_cascade_fullres"]:
                recommended += ["3d_lowres", "3d_cascade_fullres"]
    for name in ("2d", "2.5d"):
        if name in configs and fits[name]:
            recommended.append(name)
    if not recommended:
        smallest = min(configs, key=lambda n: configs[n].estimated_memory_gb)
        notes.append(f"no configuration fits {gpu.gb:g} GB; {smallest} needs the least "
                     f"({configs[smallest].estimated_memory_gb:.1f} GB)")
        recommended.append(smallest)
    return recommended


def fingerprint_digest(fp: Fingerprint) -> str:
    """SHA-256 of the fingerprint's content, to tie plans to the data they were made from."""
    payload = json.dumps(fp.to_dict(), sort_keys=True, default=_json_default, allow_nan=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # type: ignore[union-attr]
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["GpuMemory", "context_slices", "fit_patch", "normalization_for", "plan", "preset_for_gpu", "target_spacing",
           "transpose_for"]
