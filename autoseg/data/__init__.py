"""Training data: patch sampling with foreground oversampling, augmentation, and batch loaders.

What the trainer uses::

    cases = load_cases(work / "preprocessed" / name, split["train"])
    with BatchLoader(cases, config, augment=True, seed=seed, workers=n) as loader:
        batch = next(loader)   # batch.image, batch.target (one per decoder output), batch.wait_s

The package is torch-free at import time (the loader imports torch when it builds tensors), so
worker processes start fast.
"""

from autoseg.data.augment import (
    AugmentationSettings,
    Augmenter,
    deep_supervision_strides,
    downsample_seg,
    initial_patch_size,
    is_anisotropic,
    mirror_axes,
)
from autoseg.data.loader import Batch, BatchLoader, BatchProducer, DataLoaderWorkerError, RemoteTraceback
from autoseg.data.sampler import Case, PatchBatch, load_cases, num_forced, sample_batch, stack_context

__all__ = [
    "AugmentationSettings", "Augmenter", "Batch", "BatchLoader", "BatchProducer", "Case",
    "DataLoaderWorkerError", "PatchBatch", "RemoteTraceback", "deep_supervision_strides",
    "downsample_seg", "initial_patch_size", "is_anisotropic", "load_cases", "mirror_axes",
    "num_forced", "sample_batch", "stack_context",
]
