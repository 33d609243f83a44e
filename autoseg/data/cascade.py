"""The previous stage's segmentation as a cascade stage's input: one-hot channels, and their
training augmentation.

nnU-Net v2 feeds ``3d_cascade_fullres`` the ``3d_lowres`` segmentation one-hot (one channel per
foreground label) beside the image, and perturbs those channels while training so that the
network does not trust them blindly (``nnUNetTrainer.get_training_transforms`` with
``is_cascaded``): a random morphological operator per label (p 0.4 per sample, structuring
element size 1–8) and the removal of a random connected component (p 0.2 per sample, only
components under 15 % of the patch). The same here, with one difference said in
:func:`perturb_previous`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: nnU-Net v2's cascade augmentation (``nnUNetTrainer.get_training_transforms``).
P_BINARY_OPERATOR = 0.4
STRUCTURE_SIZE = (1, 8)
P_REMOVE_COMPONENT = 0.2
MAX_COMPONENT_SHARE = 0.15


def one_hot_previous(labels: np.ndarray, values: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """``(len(values), *labels.shape)`` float32 one-hot channels of a previous stage's labels, one
    per foreground value (background has none: it is the absence of every other); written into
    ``out`` when given (e.g. the channels after the image's in the network input, without a copy)."""
    if out is None:
        out = np.empty((len(values), *labels.shape), dtype=np.float32)
    for i, value in enumerate(values):
        np.equal(labels, value, out=out[i], casting="unsafe")
    return out


def perturb_previous(onehot: np.ndarray, rng: np.random.Generator) -> None:
    """Augment a batch of one-hot previous-stage channels ``(B, K, *spatial)`` in place.

    Per sample, with p 0.4: each channel in random order gets a dilation, erosion, opening or
    closing of size 1–8 voxels; what a channel gains is taken from the others (the channels stay
    exclusive). With p 0.2: each channel loses one random connected component smaller than 15 % of
    the patch. Sizes are repeated 3×3(×3) cross steps (``iterations``), not nnU-Net's ball
    structuring element: the same reach along the axes for a fraction of the cost on 3D patches.
    """
    from scipy import ndimage

    operators = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_closing, ndimage.binary_opening)
    for sample in onehot:
        channels = sample.shape[0]
        structure = ndimage.generate_binary_structure(sample.ndim - 1, 1)
        if rng.random() < P_BINARY_OPERATOR:
            for k in rng.permutation(channels):
                mask = sample[k] > 0
                if not mask.any():
                    continue
                operator = operators[int(rng.integers(len(operators)))]
                size = int(rng.integers(STRUCTURE_SIZE[0], STRUCTURE_SIZE[1] + 1))
                changed = operator(mask, structure=structure, iterations=size)
                gained = changed & ~mask
                sample[:, gained] = 0
                sample[k] = changed
        if rng.random() < P_REMOVE_COMPONENT:
            limit = MAX_COMPONENT_SHARE * sample[0].size
            for k in range(channels):
                components, count = ndimage.label(sample[k] > 0)
                if count == 0:
                    continue
                sizes = np.bincount(components.ravel())[1:]
                small = np.flatnonzero(sizes < limit) + 1
                if len(small):
                    sample[k][components == int(rng.choice(small))] = 0
