"""Big volumes in bounded memory (issue 16 item 2): the export, the resampling and the
preprocessing hold no whole-volume float copies of all classes, and give the results they gave
before (bitwise where the arithmetic is the same, to float32 rounding where it is not).

Memory is checked with ``tracemalloc`` (numpy reports its buffers to it) on moderate volumes
against the size of one volume of the original grid, never with wall-clock times.
"""

from __future__ import annotations

import io
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoseg.imageio import Geometry
from autoseg.tasks.base import ConfigPrediction


def _props(original: tuple[int, int, int], bbox: list[list[int]], grid: tuple[int, int, int],
           axis: int | None = None, order_z: int = 0, transpose: tuple[int, int, int] = (0, 1, 2)) -> dict[str, Any]:
    """The props the export reads, for a crop box ``bbox`` (preprocessed axis order) resampled to ``grid``."""
    return {"shape_original": list(original), "transpose": list(transpose), "bbox": bbox,
            "shape_after_crop": [hi - lo for lo, hi in bbox], "shape_after_resample": list(grid),
            "separate_axis": axis, "order_z": order_z}


def _prediction(name: str, props: dict[str, Any], classes: int, seed: int) -> ConfigPrediction:
    logits = np.random.default_rng(seed).normal(size=(classes, *props["shape_after_resample"])) * 3
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    return ConfigPrediction(name, probabilities.astype(np.float32), props)


def _peak_bytes(function: Callable[[], Any]) -> int:
    """Peak of the memory numpy (and Python) allocated while ``function`` ran, above what was held before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


GEOMETRY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 3)


# ----------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize(("shape", "new_shape"), [
    ((5, 7, 9), (11, 3, 9)), ((20, 30, 40), (41, 61, 17)), ((1, 30, 40), (1, 64, 64)), ((12, 17, 9), (5, 40, 9)),
    ((2, 3, 2), (1, 1, 7)), ((30, 8, 8), (7, 8, 8)), ((9, 10, 11), (9, 10, 11)),
])
@pytest.mark.parametrize(("axis", "order_z"), [(None, 0), (0, 0), (0, 1), (1, 0)])
def test_rows_of_a_resampling_are_bitwise_those_of_the_whole(shape: tuple[int, ...], new_shape: tuple[int, ...],
                                                            axis: int | None, order_z: int) -> None:
    """Slab by slab (any slab height) gives exactly the whole volume's values: the export's label
    maps do not change with the slab size. A separate axis other than 0 cannot be cut and falls back
    to the whole volume (same values)."""
    from autoseg.preprocessing.resample import resample_image, resample_rows

    volume = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    whole = resample_image(volume[None], new_shape, 1, axis, order_z)[0]
    for height in (1, 2, 3, 7, 100):
        slabs = [resample_rows(volume, new_shape, start, min(start + height, new_shape[0]), 1, axis, order_z)
                 for start in range(0, new_shape[0], height)]
        assert np.array_equal(np.concatenate(slabs), whole)


@pytest.mark.parametrize(("shape", "new_shape"), [
    ((20, 30, 25), (40, 13, 25)), ((7, 9, 11), (3, 20, 11)), ((50, 60, 70), (19, 21, 140)), ((5, 5), (17, 2)),
    ((1, 30, 40), (1, 64, 64)), ((9,), (20,)),
])
def test_cubic_resampling_equals_scipy_order_3(shape: tuple[int, ...], new_shape: tuple[int, ...],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The separable order-3 passes give scipy's 3-D affine_transform (mode nearest, prefiltered,
    pixel centres aligned) to float32 rounding, also when the prefilter runs piece by piece."""
    from scipy import ndimage

    from autoseg.preprocessing import resample

    monkeypatch.setattr(resample, "SPLINE_PIECE", 1000)  # many pieces even for these small arrays
    array = np.random.default_rng(len(shape) + shape[0]).normal(size=shape).astype(np.float32)
    scale = np.asarray(shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    expected = ndimage.affine_transform(array, scale, offset=0.5 * scale - 0.5, output_shape=new_shape, order=3,
                                        mode="nearest", prefilter=True, output=np.float32)
    got = resample._affine(array, new_shape, 3)
    assert got.dtype == np.float32 and got.shape == new_shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_cubic_resampling_holds_no_float64_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """scipy prefilters the edge-padded volume in float64; the separable passes hold their output
    and one bounded piece of the padded input: with 1 MB pieces the peak stays below 0.8 input
    volume when shrinking z to a third, and below a third of scipy's peak (measured here too)."""
    from autoseg.preprocessing import resample

    monkeypatch.setattr(resample, "SPLINE_PIECE", 2**18)
    array = np.random.default_rng(0).normal(size=(96, 128, 128)).astype(np.float32)
    ours = _peak_bytes(lambda: resample._affine(array, (32, 128, 128), 3))
    scipy = _peak_bytes(lambda: resample._scipy_affine(array, (32, 128, 128), 3))
    assert ours < 0.8 * array.nbytes and ours < scipy / 3, (ours, scipy)


def test_ct_normalisation_in_float32_gives_the_float64_clip_values() -> None:
    from autoseg.preprocessing.normalization import normalize_ct

    rng = np.random.default_rng(0)
    for image in (rng.integers(-2000, 3000, size=(7, 9, 11)).astype(np.int16), rng.normal(0, 900, size=(5, 6)),
                  rng.normal(0, 900, size=(5, 6)).astype(np.float32)):
        expected = np.clip(image, -1000.0, 567.0).astype(np.float32)
        expected -= np.float32(-383.6)
        expected /= np.float32(445.3)
        np.testing.assert_array_equal(normalize_ct(image, -1000.0, 567.0, -383.6, 445.3), expected)


def test_crop_box_without_hole_filling_is_the_filled_masks_box(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filling holes never grows the box, so the box of the nonzero voxels is the crop box."""
    from autoseg.dataset import fingerprint
    from autoseg.dataset.fingerprint import bbox_of, nonzero_box, nonzero_mask

    monkeypatch.setattr(fingerprint, "NONZERO_SLAB_VOXELS", 50)  # several slabs
    rng = np.random.default_rng(3)
    for _ in range(20):
        image = np.zeros((2, 9, 10, 11), dtype=np.int16)
        lo = rng.integers(0, 5, size=3)
        hi = lo + rng.integers(1, 5, size=3)
        shell = image[int(rng.integers(2)), lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        shell[...] = rng.integers(0, 2, size=shell.shape)  # holes and specks
        assert nonzero_box(image) == bbox_of(nonzero_mask(image))
    assert nonzero_box(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))


# ----------------------------------------------------------------------------------------------
# Export


EXPORT_CASES = {
    "joint": [_props((40, 36, 30), [[2, 38], [3, 33], [0, 30]], (18, 15, 12))],
    "separate z, nearest": [_props((40, 36, 30), [[0, 40], [0, 36], [0, 30]], (13, 20, 18), axis=0, order_z=0)],
    "separate z, linear, transposed": [_props((30, 40, 36), [[1, 40], [0, 36], [2, 28]], (50, 20, 18), axis=0,
                                              order_z=1, transpose=(1, 2, 0))],
    "separate y (one slab)": [_props((40, 36, 30), [[0, 40], [0, 36], [0, 30]], (20, 9, 15), axis=1)],
    "two grids": [_props((40, 36, 30), [[2, 38], [3, 33], [0, 30]], (18, 15, 12)),
                  _props((40, 36, 30), [[2, 38], [3, 33], [0, 30]], (36, 30, 30), axis=0, order_z=0)],
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_slab_export_is_the_argmax_of_the_whole_volume_probabilities(case: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Label maps and saved probabilities are those of the whole-volume inverse (argmax of
    input_grid_probabilities; ties to the lower class), whatever the slab size."""
    from autoseg.tasks import segmentation_export
    from autoseg.tasks.segmentation_export import (
        export_prediction,
        input_grid_probabilities,
    )

    predictions = [_prediction(f"c{i}", props, 9, i) for i, props in enumerate(EXPORT_CASES[case])]
    expected = input_grid_probabilities(predictions)
    for slab in (1, 700, 2**22):
        monkeypatch.setattr(segmentation_export, "EXPORT_SLAB_VOXELS", slab)
        path = tmp_path / f"{slab}.npz"
        labels = export_prediction(predictions, GEOMETRY, probabilities_path=path)
        np.testing.assert_array_equal(labels, np.argmax(expected, axis=0).astype(np.uint8))
        np.testing.assert_array_equal(np.load(path)["probabilities"], expected.astype(np.float16))
        np.testing.assert_array_equal(export_prediction(predictions, GEOMETRY), labels)


def test_export_workers_follow_cpus_slabs_and_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preprocessing's rule for the export's threads: CPUs, bounded by the work and by 70 % of
    MemAvailable at (6 + configurations) float32 slab volumes per worker."""
    from autoseg import distributed
    from autoseg.dataset import scan
    from autoseg.tasks.segmentation_export import export_workers

    monkeypatch.setattr(distributed, "available_cpus", lambda: 8)
    monkeypatch.setattr(scan, "available_memory_bytes", lambda: 64 * 2**30)
    assert export_workers(2**22, 1, 100) == 8
    assert export_workers(2**22, 1, 3) == 3
    per_worker = 4 * 2**22 * (6 + 2)  # 128 MiB: two configurations
    monkeypatch.setattr(scan, "available_memory_bytes", lambda: int(3 * per_worker / 0.7) + 1)
    assert export_workers(2**22, 2, 100) == 3
    monkeypatch.setattr(scan, "available_memory_bytes", lambda: 0)
    assert export_workers(2**22, 2, 100) == 1


def test_export_is_the_same_on_any_number_of_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autoseg.tasks import segmentation_export
    from autoseg.tasks.segmentation_export import export_prediction

    predictions = [_prediction(f"c{i}", props, 9, i) for i, props in enumerate(EXPORT_CASES["two grids"])]
    monkeypatch.setattr(segmentation_export, "EXPORT_SLAB_VOXELS", 1000)
    results = []
    for workers in (1, 3):
        monkeypatch.setattr(segmentation_export, "export_workers", lambda *args, workers=workers: workers)
        path = tmp_path / f"{workers}.npz"
        results.append((export_prediction(predictions, GEOMETRY), export_prediction(predictions, GEOMETRY,
                        probabilities_path=path), np.load(path)["probabilities"]))
    for one, three in zip(*results):
        np.testing.assert_array_equal(one, three)


def test_region_export_by_slab_equals_the_whole_volume_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoseg.regions import membership, regions_to_labels
    from autoseg.tasks import segmentation_export
    from autoseg.tasks.segmentation_export import (
        export_prediction,
        input_grid_probabilities,
    )

    member = membership([(1, 2, 3), (2, 3), (3,)])  # BraTS-like nested regions
    props = _props((30, 28, 26), [[1, 29], [0, 28], [2, 24]], (14, 14, 11))
    sigmoid = np.random.default_rng(5).random((3, 14, 14, 11), dtype=np.float32)
    prediction = ConfigPrediction("3d", sigmoid, props)
    expected = regions_to_labels(input_grid_probabilities([prediction], regions=True), member)
    monkeypatch.setattr(segmentation_export, "EXPORT_SLAB_VOXELS", 500)
    np.testing.assert_array_equal(export_prediction([prediction], GEOMETRY, regions=member), expected)


def test_export_holds_no_whole_volume_float_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine classes on a 64x96x96 original grid from a coarser network grid, in slabs of two
    planes (the default slab, 2^22 voxels, is a 16th of a 512x512x400 CT): the label map export
    peaks below two bytes per original voxel (the uint8 label map and slabs; one float32 volume
    would be four bytes, the nine classes in float32 36). With --save-probabilities it adds one
    float32 and one float16 volume (the running maximum and the class being written), still far
    from the nine classes."""
    from autoseg.tasks import segmentation_export

    monkeypatch.setattr(segmentation_export, "EXPORT_SLAB_VOXELS", 2 * 96 * 96)
    monkeypatch.setattr(segmentation_export, "export_workers", lambda *args: 1)  # each thread adds its slabs
    original = (64, 96, 96)
    voxels = int(np.prod(original))
    props = _props(original, [[0, 64], [0, 96], [0, 96]], (32, 40, 40))
    predictions = [_prediction("3d", props, 9, 0)]
    from autoseg.tasks.segmentation_export import export_prediction

    assert _peak_bytes(lambda: export_prediction(predictions, GEOMETRY)) < 2 * voxels
    path = tmp_path / "p.npz"
    assert _peak_bytes(lambda: export_prediction(predictions, GEOMETRY, probabilities_path=path)) < 9 * voxels


def test_softmax_in_slabs_is_the_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from autoseg.tasks import segmentation
    from autoseg.tasks.segmentation import Segmentation

    monkeypatch.setattr(segmentation, "ACTIVATION_SLAB_VOXELS", 30)  # one z plane of 5x6 per slab
    logits = torch.randn(9, 7, 5, 6) * 4
    expected = torch.softmax(logits, dim=0)
    got = Segmentation({"background": [0], **{f"l{k}": [k] for k in range(1, 9)}}).activate_(logits.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# ONNX export at load


@pytest.mark.parametrize(("multiple", "patch", "expected"), [
    ((16, 32, 32), (48, 128, 128), (16, 32, 64)), ((16, 32, 32), (48, 64, 32), (16, 64, 32)),
    ((16, 32, 32), (16, 32, 32), (16, 32, 32)), ((32, 32), (256, 256), (32, 64)),
])
def test_onnx_trace_size_is_the_smallest_the_network_takes(multiple: tuple[int, ...], patch: tuple[int, ...],
                                                           expected: tuple[int, ...]) -> None:
    from autoseg.inference.onnx_export import trace_size

    assert trace_size(multiple, patch) == expected


def test_onnx_graph_traced_small_is_the_graph_traced_at_the_patch() -> None:
    """The same nodes, attributes and weights as a trace at the patch size, the patch declared."""
    onnx = pytest.importorskip("onnx")
    import torch

    from autoseg.inference.onnx_export import network_to_onnx
    from autoseg.networks import build_network
    from autoseg.plans import Topology

    topology = Topology(features_per_stage=(4, 8, 8), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                        kernel_sizes=((3, 3, 3),) * 3, blocks_per_stage=(1, 1, 1), decoder_blocks_per_stage=(1, 1))
    net = build_network(topology, 1, 3, deep_supervision=False).eval()
    patch = (1, 1, 16, 24, 32)
    small = onnx.load_model_from_string(network_to_onnx(net, patch, weights_sha256="ab" * 32))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(net, (torch.zeros(patch),), buffer, dynamo=False, input_names=["x"], output_names=["logits"],
                          opset_version=17, dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    full = onnx.load_model_from_string(buffer.getvalue())
    assert [(n.op_type, list(n.input), list(n.attribute)) for n in small.graph.node] == \
           [(n.op_type, list(n.input), list(n.attribute)) for n in full.graph.node]
    assert list(small.graph.initializer) == list(full.graph.initializer)
    dims = [d.dim_value for d in small.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 16, 24, 32] and not small.graph.input[0].type.tensor_type.shape.dim[0].dim_value


# ----------------------------------------------------------------------------------------------
# Fingerprint


def _old_pooled_stats(chunks: list[np.ndarray]) -> Any:
    """The pooling before issue 16 (weights materialised, float64 sort), kept as the reference."""
    from autoseg.dataset.fingerprint import _stats

    values = np.concatenate(chunks).astype(np.float64)
    weights = np.concatenate([np.full(c.size, 1.0 / c.size) for c in chunks])
    return _stats(values, weights)


def test_pooled_intensities_are_unchanged_in_less_memory() -> None:
    """The same statistics to the last bit as the whole-array pooling, at about half its peak
    (48 bytes a sample before)."""
    from autoseg.dataset.fingerprint import pool_intensities

    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        chunks = [rng.normal(rng.uniform(-5, 5), 3, size=int(n)).round(1).astype(dtype)  # rounding: ties
                  for n in rng.integers(1, 3000, size=40)]
        assert pool_intensities([[c] for c in chunks], 1)[0] == _old_pooled_stats(chunks)
    chunks = [rng.normal(0, 1, size=20_000).astype(np.float32) for _ in range(25)]
    samples = sum(c.size for c in chunks)
    new = _peak_bytes(lambda: pool_intensities([[c] for c in chunks], 1))
    old = _peak_bytes(lambda: _old_pooled_stats(chunks))
    assert new < 30 * samples and new < 0.65 * old, (new / samples, old / samples)
