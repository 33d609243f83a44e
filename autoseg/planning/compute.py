"""The compute model: seconds per training iteration and per predicted case, before any training.

Pure and torch-free: the machine enters as a :class:`Throughput` (measured once and cached by
:func:`autoseg.networks.throughput.machine_rates`, or given with ``--throughput``).

A training iteration costs its convolutions — forward + backward ≈ 3 × the forward FLOPs
(:func:`autoseg.networks.conv_flops`, deep-supervision heads included) at the measured convolution
rate — plus the memory-bound work around them (normalisation, activations, the loss, the
optimiser, reading and augmenting the batch), which grows with the feature maps rather than the
FLOPs: :data:`MEMORY_S_PER_UNIT` seconds per feature-map element
(:func:`autoseg.planning.topology.estimate_feature_map_units`, the quantity the memory model uses),
scaled by the machine's conv rate relative to :data:`REFERENCE_GFLOPS`, and dearer when the
full-resolution feature map outgrows the caches (+1 per :data:`LARGE_MAP_MB` MB of it per sample).
The constants were fitted on five configurations measured on this project's development CPU
(``benchmarks/README.md``, "Compute model": each within 11 %); the conv term alone is the
arithmetic floor. Prediction costs every window × mirror forward pass (the planned mirror axes) at the forward rate, plus its norms and
activations (:data:`INFER_MEMORY_S_PER_UNIT`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from autoseg.networks.analysis import conv_flops
from autoseg.planning.topology import estimate_feature_map_units
from autoseg.plans import Configuration

#: Backward ≈ 2 × forward (gradients of inputs and of weights).
TRAIN_FLOP_FACTOR = 3.0
#: Convolution FLOPs run at this fraction of the representative convolution's rate (the fit gave
#: 0.98 for the conv term's coefficient, i.e. the measured rate itself).
CONV_EFFICIENCY = 1.0
#: Seconds per feature-map element of a training iteration (forward + backward of norms and
#: activations, loss, augmentation), on a machine whose conv rate is REFERENCE_GFLOPS (fitted).
MEMORY_S_PER_UNIT = 9.7e-9
#: The conv rate (fwd+bwd GFLOP/s) of the machine MEMORY_S_PER_UNIT was fitted on.
REFERENCE_GFLOPS = 300.0
#: Memory-bound work costs 1 + (full-resolution feature map of one sample, MB) / this much: the
#: 16-feature 112^3 map of OpenKBP's cpu plan (90 MB) ran its norms and activations at about half
#: the rate of the 6-12 MB maps of the Hippocampus plans.
LARGE_MAP_MB = 100.0
#: The same for a forward pass at prediction (norms and activations only; fitted on OpenKBP's
#: budget plan: 78 ms per 64x56x56 window, of which the convolutions take 49 ms).
INFER_MEMORY_S_PER_UNIT = 1.5e-9


@dataclass(frozen=True)
class Throughput:
    """What the machine computes per second.

    Attributes:
        train_gflops: forward + backward GFLOP/s of a representative convolution (32 -> 32
            channels, 3^3, channels-last on the CPU).
        infer_gflops: forward-only GFLOP/s of the same convolution.
        device: what was measured (``cpu: <model>, <n> CPUs, torch <version>`` / ``cuda: <name>``).
        source: ``measured`` (with when) or ``given`` (``--throughput``).
    """

    train_gflops: float
    infer_gflops: float
    device: str
    source: str

    def describe(self, short: bool = False) -> str:
        """``275 GFLOP/s training, 339 forward (<device>; <source>)``; ``short``: without the source
        (what plans.yaml's notes record: no cache path, no time)."""
        what = self.device if short else f"{self.device}; {self.source}"
        return f"{self.train_gflops:.0f} GFLOP/s training, {self.infer_gflops:.0f} forward ({what})"


#: Forward-only convolutions run this much faster per FLOP than forward + backward (measured on the
#: development CPU: 334 against 281 GFLOP/s); used for a user-given rate (``--throughput``).
FORWARD_SPEEDUP = 1.2


def given_throughput(gflops: float) -> Throughput:
    """A user-given training rate (``--throughput GFLOPS``), instead of a measurement."""
    return Throughput(float(gflops), FORWARD_SPEEDUP * float(gflops), "given", "--throughput")


@dataclass(frozen=True)
class ConfigCost:
    """The compute price of one configuration on one machine.

    Attributes:
        s_per_iteration: predicted seconds per training iteration.
        train_tflop_per_iteration: convolution TFLOPs per iteration (forward + backward).
        predict_s_tta: predicted seconds of network calls for a median-sized case, mirroring TTA, one fold.
        predict_s: the same without TTA.
    """

    s_per_iteration: float
    train_tflop_per_iteration: float
    predict_s_tta: float
    predict_s: float

    def iterations(self, seconds: float) -> int:
        """Iterations that fit in ``seconds`` of training."""
        return int(seconds // self.s_per_iteration) if self.s_per_iteration > 0 else 0


def iteration_seconds(config: Configuration, num_classes: int, throughput: Throughput,
                      batch_size: int | None = None) -> tuple[float, float]:
    """Predicted seconds and conv TFLOPs of one training iteration of ``config``."""
    batch = batch_size or config.batch_size
    forward = conv_flops(config.topology, config.patch_size, config.input_channels, num_classes, deep_supervision=True)
    flops = TRAIN_FLOP_FACTOR * forward * batch
    units = estimate_feature_map_units(config.patch_size, config.topology, num_classes, deep_supervision=True) * batch
    top_map_mb = config.topology.features_per_stage[0] * math.prod(config.patch_size) * 4 / 1e6
    conv_s = flops / (throughput.train_gflops * 1e9 * CONV_EFFICIENCY)
    memory_s = units * MEMORY_S_PER_UNIT * REFERENCE_GFLOPS / throughput.train_gflops * (1 + top_map_mb / LARGE_MAP_MB)
    return conv_s + memory_s, flops / 1e12


def window_count(image: Sequence[float], patch: Sequence[int], step: float = 0.5) -> int:
    """Sliding windows over an image of spatial shape ``image`` (2D patches: one slice each)."""
    shape = [max(1, int(round(s))) for s in image]
    patch3 = [1, *patch] if len(patch) == 2 else list(patch)
    count = 1
    for size, p in zip(shape, patch3):
        size = max(size, p)
        count *= 1 if size == p else int(math.ceil((size - p) / (p * (step if p > 1 else 1.0)))) + 1
    return count


def prediction_seconds(config: Configuration, num_classes: int, throughput: Throughput, tta: bool = True) -> float:
    """Predicted seconds of network calls for one median-sized case and one fold."""
    forward = conv_flops(config.topology, config.patch_size, config.input_channels, num_classes, deep_supervision=False)
    units = estimate_feature_map_units(config.patch_size, config.topology, num_classes, deep_supervision=False)
    memory = units * INFER_MEMORY_S_PER_UNIT * REFERENCE_GFLOPS / throughput.train_gflops
    mirrors = 2 ** len(config.mirrored_axes) if tta else 1
    passes = window_count(config.median_shape, config.patch_size) * mirrors
    return passes * (forward / (throughput.infer_gflops * 1e9 * CONV_EFFICIENCY) + memory)


def config_cost(config: Configuration, num_classes: int, throughput: Throughput) -> ConfigCost:
    """Training and prediction price of ``config`` (see the module doc)."""
    seconds, tflop = iteration_seconds(config, num_classes, throughput)
    return ConfigCost(seconds, tflop, prediction_seconds(config, num_classes, throughput, True),
                      prediction_seconds(config, num_classes, throughput, False))


__all__ = ["FORWARD_SPEEDUP", "ConfigCost", "Throughput", "config_cost", "given_throughput", "iteration_seconds", "prediction_seconds", "window_count"]
