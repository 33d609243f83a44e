"""Tests of the training data pipeline: sampler, augmentation, deep-supervision targets, loader.

Everything runs on tiny synthetic arrays (a few thousand voxels); the worker tests start real
processes (spawn) and check that errors surface with the worker's traceback and nothing hangs.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg.data import (
    AugmentationSettings,
    Augmenter,
    BatchLoader,
    Case,
    DataLoaderWorkerError,
    deep_supervision_strides,
    downsample_seg,
    initial_patch_size,
    is_anisotropic,
    load_cases,
    num_forced,
    sample_batch,
    stack_context,
)
from autoseg.errors import ConfigError
from autoseg.plans import Configuration, Normalization, Topology


def make_config(
    patch: tuple[int, ...] = (16, 16, 16),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    strides: tuple[tuple[int, ...], ...] | None = None,
    context_slices: int = 0,
    batch_size: int = 4,
    channels: int = 1,
) -> Configuration:
    dims = len(patch)
    strides = strides or ((1,) * dims, (2,) * dims, (2,) * dims)
    topology = Topology(
        features_per_stage=tuple(8 * 2**i for i in range(len(strides))),
        strides=strides,
        kernel_sizes=((3,) * dims,) * len(strides),
        blocks_per_stage=(1,) * len(strides),
        decoder_blocks_per_stage=(1,) * (len(strides) - 1),
    )
    return Configuration(
        dims=dims, spacing=spacing, patch_size=patch, batch_size=batch_size, median_shape=(20.0, 20.0, 20.0),
        normalization=(Normalization("zscore"),) * channels, topology=topology, context_slices=context_slices,
    )


def blob_case(case_id: str = "c0", shape: tuple[int, int, int] = (24, 24, 24), seed: int = 0) -> Case:
    """Sparse foreground: a 2×2×2 block of class 1 and a single voxel of class 2."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    seg = np.zeros(shape, dtype=np.int8)
    z, y, x = shape
    seg[3:5, y - 7:y - 5, x // 2:x // 2 + 2] = 1
    seg[z - 3, 2, x - 2] = 2
    return Case(case_id, image, seg)


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray) -> None:
    """A case in the preprocessed contract: <case>.npy, <case>_seg.npy, <case>.json."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}.npy", image.astype(np.float32))
    np.save(folder / f"{case_id}_seg.npy", seg.astype(np.int8))
    locations = {str(int(c)): np.argwhere(seg == c).tolist() for c in np.unique(seg) if c > 0}
    (folder / f"{case_id}.json").write_text(json.dumps({"case_id": case_id, "class_locations": locations}))


# ----------------------------------------------------------------------------------------------
# Sampler


def test_num_forced_follows_nnunet_rounding() -> None:
    assert [num_forced(b, 0.33) for b in (1, 2, 3, 4, 8, 12)] == [0, 1, 1, 1, 3, 4]
    assert num_forced(8, 0.0) == 0 and num_forced(8, 1.0) == 8


@pytest.mark.parametrize("patch, final", [((8, 8, 8), None), ((14, 16, 12), (8, 8, 8)), ((12, 12), (8, 8))])
def test_foreground_oversampling_rate_and_forced_patches_contain_their_class(patch, final) -> None:
    cases = [blob_case(f"c{i}", seed=i) for i in range(3)]
    rng = np.random.default_rng(0)
    final_size = final or patch
    with_fg, total, classes = 0, 0, []
    for _ in range(150):
        batch = sample_batch(cases, patch, 3, rng, 0.33, final_patch_size=final)
        # The final patch is the centre of the sampled one (what the spatial transform keeps).
        lo = [(p - f) // 2 for p, f in zip(patch, final_size)]
        centre = (slice(None), slice(None)) + tuple(slice(a, a + f) for a, f in zip(lo, final_size))
        seg = batch.seg[centre]
        for i, label in enumerate(batch.forced_class):
            if i < 3 - num_forced(3, 0.33):
                assert label is None
            else:
                assert label in (1, 2)
                assert (seg[i] == label).any(), "a forced patch must contain its class"
                classes.append(label)
        with_fg += int((seg.reshape(3, -1) > 0).any(axis=1).sum())
        total += 3
    assert with_fg / total >= 1 / 3
    # The class is drawn uniformly among those present, not by voxel count (8 : 1 here).
    assert 0.35 < np.mean(np.array(classes) == 2) < 0.65


def test_images_smaller_than_the_patch_are_padded_with_zero() -> None:
    image = np.ones((2, 4, 5, 6), dtype=np.float32)
    seg = np.zeros((4, 5, 6), dtype=np.int16)
    seg[1, 2, 3] = 1
    case = Case("small", image, seg)
    batch = sample_batch([case], (8, 8, 8), 4, np.random.default_rng(1), 0.5)
    assert batch.image.shape == (4, 2, 8, 8, 8) and batch.image.dtype == np.float32
    assert batch.seg.shape == (4, 1, 8, 8, 8) and batch.seg.dtype == np.int16
    for i in range(4):
        assert batch.image[i, 0].sum() == 4 * 5 * 6  # the whole image is inside, the rest is 0
        assert batch.seg[i].sum() == 1
    batch2d = sample_batch([case], (8, 8), 2, np.random.default_rng(1), 0.5)
    assert batch2d.image.shape == (2, 2, 8, 8)
    assert all(batch2d.image[i, 0].sum() == 5 * 6 for i in range(2))


def test_2d_and_25d_shapes_and_channel_order() -> None:
    depth, k = 7, 2
    image = np.stack([
        np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None], (depth, 6, 5)),
        np.broadcast_to(100 + np.arange(depth, dtype=np.float32)[:, None, None], (depth, 6, 5)),
    ])
    seg = np.broadcast_to(np.arange(depth, dtype=np.int16)[:, None, None] % 3, (depth, 6, 5)).copy()
    case = Case("slices", image, seg)

    # Offset-major: channel (o + k) * C + c is channel c of slice z + o; edges repeat.
    stacked = stack_context(image, 0, k)
    assert stacked.shape == (2 * (2 * k + 1), 6, 5)
    assert [float(v) for v in stacked[:, 0, 0]] == [0, 100, 0, 100, 0, 100, 1, 101, 2, 102]
    stacked = stack_context(image, 3, k)
    centre = stacked[k * 2: k * 2 + 2, 0, 0]
    assert [float(v) for v in centre] == [3, 103]
    assert [float(v) for v in stacked[::2, 0, 0]] == [1, 2, 3, 4, 5]

    rng = np.random.default_rng(0)
    plain = sample_batch([case], (4, 4), 6, rng, 0.5)
    assert plain.image.shape == (6, 2, 4, 4) and plain.seg.shape == (6, 1, 4, 4)
    batch = sample_batch([case], (4, 4), 6, rng, 0.5, context_slices=k)
    assert batch.image.shape == (6, 2 * (2 * k + 1), 4, 4) and batch.seg.shape == (6, 1, 4, 4)
    for i in range(6):
        z = int(batch.image[i, 2 * k, 0, 0])  # the centre slice's first channel holds z
        assert batch.image[i, 2 * k + 1, 0, 0] == 100 + z
        assert (batch.seg[i] == z % 3).all(), "the label is the centre slice"
        expected = np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)
        assert np.array_equal(batch.image[i, ::2, 0, 0], expected)


def test_cases_from_disk_follow_the_contract_and_pickle_without_arrays(tmp_path: Path) -> None:
    folder = tmp_path / "preprocessed" / "3d_fullres"
    for i in range(2):
        case = blob_case(f"case_{i}", shape=(12, 14, 10), seed=i)
        write_case(folder, case.case_id, np.asarray(case.image), np.asarray(case.seg))
    cases = load_cases(folder)
    assert [c.case_id for c in cases] == ["case_0", "case_1"]
    assert isinstance(cases[0].image, np.memmap) and cases[0].class_locations[1].shape == (8, 3)
    clone = pickle.loads(pickle.dumps(cases[0]))
    assert len(pickle.dumps(cases[0])) < 1000  # a path, not the arrays
    assert np.array_equal(clone.seg, cases[0].seg)
    batch = sample_batch(cases, (8, 8, 8), 3, np.random.default_rng(0), 1.0)
    assert all((batch.seg[i] > 0).any() for i in range(3))


def test_bad_options_raise_config_errors() -> None:
    case = blob_case()
    with pytest.raises(ConfigError, match="oversample"):
        sample_batch([case], (8, 8, 8), 2, np.random.default_rng(0), 1.5)
    with pytest.raises(ConfigError, match="p_noise"):
        AugmentationSettings(p_noise=2.0)
    with pytest.raises(ConfigError, match="scale"):
        AugmentationSettings(scale=(1.4, 0.7))
    with pytest.raises(ConfigError, match="start_method"):
        BatchLoader([case], make_config(), workers=1, start_method="fork")
    with pytest.raises(ConfigError, match="workers"):
        BatchLoader([case], make_config(), workers=-1)


# ----------------------------------------------------------------------------------------------
# Augmentation and deep supervision

ALL_ON = AugmentationSettings(
    p_rotation=1.0, p_scale=1.0, p_noise=1.0, p_blur=1.0, p_brightness=1.0, p_contrast=1.0,
    p_low_res=1.0, p_gamma=1.0, p_gamma_inverted=1.0,
)


@pytest.mark.parametrize("patch", [(16, 16, 16), (8, 24, 24), (24, 20)])
def test_augmentation_keeps_shapes_and_valid_integer_labels(patch) -> None:
    config = make_config(patch=patch, spacing=(1.0, 1.0, 1.0), context_slices=1 if len(patch) == 2 else 0)
    augmenter = Augmenter(config, ALL_ON)
    initial = augmenter.initial_patch_size
    rng = np.random.default_rng(0)
    channels = config.input_channels
    image = rng.normal(size=(3, channels, *initial)).astype(np.float32)
    seg = (rng.random((3, 1, *initial)) * 2.99).astype(np.int16)  # labels 0, 1, 2 in speckle
    out_image, out_seg = augmenter(image, seg)
    assert out_image.shape == (3, channels, *patch) and out_image.dtype == np.float32
    assert out_seg.shape == (3, 1, *patch) and out_seg.dtype == np.int16
    assert set(np.unique(out_seg)) <= {0, 1, 2}
    assert np.isfinite(out_image).all()


def test_anisotropic_patches_rotate_in_plane_only() -> None:
    only_rotation = AugmentationSettings(
        p_rotation=1.0, p_scale=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0,
        p_low_res=0.0, p_gamma=0.0, p_gamma_inverted=0.0, mirror=False,
    )

    def slice_spread(config: Configuration) -> float:
        augmenter = Augmenter(config, only_rotation)
        initial = augmenter.initial_patch_size
        # Every slice constant (its index + 1): an in-plane rotation keeps each slice constant.
        image = np.broadcast_to(1.0 + np.arange(initial[0], dtype=np.float32)[:, None, None], initial)
        image = np.ascontiguousarray(np.broadcast_to(image, (4, 1, *initial)))
        out, _ = augmenter(image, np.zeros((4, 1, *initial), dtype=np.int16))
        return float(out.std(axis=(3, 4)).max())

    anisotropic = make_config(patch=(8, 24, 24), spacing=(5.0, 1.0, 1.0), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)))
    assert is_anisotropic(anisotropic)
    assert initial_patch_size(anisotropic, only_rotation)[0] == 8  # axis 0 is never enlarged
    assert slice_spread(anisotropic) < 1e-3
    isotropic = make_config(patch=(16, 16, 16))
    assert not is_anisotropic(isotropic)
    assert slice_spread(isotropic) > 0.5  # a 3D rotation mixes slices


def test_deep_supervision_targets() -> None:
    config = make_config(patch=(8, 16, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)))
    assert deep_supervision_strides(config.topology) == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    seg = np.random.default_rng(0).integers(0, 3, size=(2, 1, 8, 16, 16)).astype(np.int16)
    targets = downsample_seg(seg, deep_supervision_strides(config.topology))
    assert [t.shape for t in targets] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    assert np.array_equal(targets[2], seg[:, :, ::2, ::4, ::4])

    cases = [blob_case(f"c{i}", seed=i) for i in range(2)]
    with BatchLoader(cases, config, augment=False, seed=0, batch_size=2) as loader:
        batch = next(loader)
    assert batch.image.shape == (2, 1, 8, 16, 16)
    assert [tuple(t.shape) for t in batch.target] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    assert all(str(t.dtype) == "torch.int64" for t in batch.target)
    assert batch.wait_s >= 0
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


# ----------------------------------------------------------------------------------------------
# Loader


def test_in_process_loader_is_deterministic_and_leaves_global_random_state_alone() -> None:
    cases = [blob_case(f"c{i}", seed=i) for i in range(3)]
    config = make_config(patch=(8, 8, 8))

    def draw(seed: int) -> list[np.ndarray]:
        with BatchLoader(cases, config, seed=seed, batch_size=3) as loader:
            return [np.concatenate([b.image.numpy().ravel(), b.target[0].numpy().ravel()])
                    for b in (next(loader) for _ in range(4))]

    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    first = draw(1)
    assert np.random.rand() == expected, "the loader must not consume the caller's global random state"
    second, other = draw(1), draw(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_one_worker_reproduces_the_in_process_batches(tmp_path: Path) -> None:
    folder = tmp_path / "pre"
    for i in range(3):
        case = blob_case(f"case_{i}", shape=(12, 14, 10), seed=i)
        write_case(folder, case.case_id, np.asarray(case.image), np.asarray(case.seg))
    cases = load_cases(folder)
    config = make_config(patch=(8, 8, 8))
    with BatchLoader(cases, config, seed=3, batch_size=2) as loader:
        expected = [next(loader) for _ in range(3)]
    with BatchLoader(cases, config, seed=3, batch_size=2, workers=1, timeout_s=60) as loader:
        got = [next(loader) for _ in range(3)]
        processes = loader.processes
    for a, b in zip(expected, got):
        assert a.case_ids == b.case_ids
        assert np.array_equal(a.image.numpy(), b.image.numpy())
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.target, b.target))
    assert all(not p.is_alive() and p.exitcode is not None for p in processes)


class ExplodingCase(Case):
    """Fails only inside a worker (after unpickling): the error must reach the consumer intact."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.in_worker = True

    @property
    def image(self) -> np.ndarray:
        if getattr(self, "in_worker", False):
            raise ValueError("corrupt voxels in case boom")
        return self._image


class ExitingCase(ExplodingCase):
    """Kills its worker without a word (as the out-of-memory killer would)."""

    @property
    def image(self) -> np.ndarray:
        if getattr(self, "in_worker", False):
            os._exit(3)
        return self._image


def test_worker_exception_surfaces_with_its_traceback_and_the_loader_shuts_down() -> None:
    base = blob_case("boom", shape=(10, 10, 10))
    case = ExplodingCase("boom", np.asarray(base.image), np.asarray(base.seg))
    start = time.monotonic()
    loader = BatchLoader([case], make_config(patch=(8, 8, 8)), workers=1, batch_size=2, timeout_s=20)
    with pytest.raises(ValueError, match="corrupt voxels in case boom") as info:
        next(loader)
    assert time.monotonic() - start < 20
    remote = str(info.value.__cause__)
    assert "Traceback (most recent call last)" in remote
    assert "test_data.py" in remote and "in image" in remote  # the worker's own frames
    assert "ValueError: corrupt voxels in case boom" in remote
    assert any("data-loader worker 0" in note for note in info.value.__notes__)
    assert all(not p.is_alive() and p.exitcode is not None for p in loader.processes)


def test_a_worker_dying_silently_raises_instead_of_hanging() -> None:
    base = blob_case("gone", shape=(10, 10, 10))
    case = ExitingCase("gone", np.asarray(base.image), np.asarray(base.seg))
    loader = BatchLoader([case], make_config(patch=(8, 8, 8)), workers=1, batch_size=2, timeout_s=20)
    with pytest.raises(DataLoaderWorkerError, match="exit code 3"):
        next(loader)
    assert all(not p.is_alive() for p in loader.processes)


class SleepingCase(ExplodingCase):
    """Hangs inside its worker, as a stuck network file system would."""

    @property
    def image(self) -> np.ndarray:
        if getattr(self, "in_worker", False):
            time.sleep(60)
        return self._image


def test_a_silent_worker_times_out_and_is_terminated() -> None:
    base = blob_case("slow", shape=(10, 10, 10))
    case = SleepingCase("slow", np.asarray(base.image), np.asarray(base.seg))
    start = time.monotonic()
    loader = BatchLoader([case], make_config(patch=(8, 8, 8)), workers=1, batch_size=2, timeout_s=1.0)
    with pytest.raises(DataLoaderWorkerError, match="no batch in 1 s"):
        next(loader)
    assert time.monotonic() - start < 15
    assert all(not p.is_alive() for p in loader.processes)


def test_keyboard_interrupt_and_garbage_collection_stop_the_workers() -> None:
    cases = [blob_case("c0", shape=(10, 10, 10))]
    config = make_config(patch=(8, 8, 8))
    loader = BatchLoader(cases, config, workers=1, batch_size=2, timeout_s=60)
    assert next(loader).image.shape == (2, 1, 8, 8, 8)

    def interrupted(worker: int) -> dict:
        raise KeyboardInterrupt

    loader._receive = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        next(loader)
    assert all(not p.is_alive() for p in loader.processes)

    loader = BatchLoader(cases, config, workers=1, batch_size=2, timeout_s=60)
    processes = loader.processes
    next(loader)
    del loader
    assert all(not p.is_alive() for p in processes)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open file descriptors through /proc")
def test_cases_on_disk_hold_no_file_descriptors(tmp_path: Path) -> None:
    # A memory map keeps a descriptor open; 600+ cached cases would exhaust the usual limit of 1024.
    folder = tmp_path / "pre"
    for i in range(12):
        case = blob_case(f"case_{i:02d}", shape=(10, 12, 10), seed=i)
        write_case(folder, case.case_id, np.asarray(case.image), np.asarray(case.seg))
    before = len(os.listdir("/proc/self/fd"))
    cases = load_cases(folder)
    for seed in range(5):
        sample_batch(cases, (8, 8, 8), 6, np.random.default_rng(seed), 0.5)
    assert len(os.listdir("/proc/self/fd")) - before < 3


@pytest.mark.parametrize("context_slices", [0, 2])
def test_2d_and_25d_loader_batches(context_slices: int) -> None:
    config = make_config(patch=(16, 12), context_slices=context_slices, strides=((1, 1), (2, 2), (2, 2)))
    cases = [blob_case(f"c{i}", shape=(9, 20, 16), seed=i) for i in range(2)]
    with BatchLoader(cases, config, seed=0, batch_size=4) as loader:
        batch = next(loader)
    assert tuple(batch.image.shape) == (4, 2 * context_slices + 1, 16, 12)
    assert [tuple(t.shape) for t in batch.target] == [(4, 1, 16, 12), (4, 1, 8, 6)]
    assert set(np.unique(batch.target[0].numpy())) <= {0, 1, 2}


def test_pin_memory() -> None:
    torch = pytest.importorskip("torch")
    config = make_config(patch=(8, 8, 8))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pin_memory"):
            BatchLoader([blob_case()], config, pin_memory=True)
        return
    with BatchLoader([blob_case()], config, pin_memory=True, batch_size=2) as loader:
        batch = next(loader)
    assert batch.image.is_pinned() and all(t.is_pinned() for t in batch.target)
