"""Metrics against hand-computed cases, and postprocessing decisions on synthetic CV results."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.evaluation.postprocess import (
    PostprocessingDecision,
    apply_postprocessing,
    decide_postprocessing,
    keep_largest_component,
)
from autoseg.metrics import (
    case_metrics,
    dice_per_label,
    mask_metrics,
    mean_foreground_dice,
    summarize,
    surface_distances,
)

LABELS = {"background": [0], "fg": [1]}


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int, value: int = 1) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    seg[tuple(slice(s, s + size) for s in start)] = value
    return seg


def brute_force_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances by comparing every pair of surface voxels (independent of the EDT and box)."""
    from scipy import ndimage

    def surface(mask: np.ndarray) -> np.ndarray:
        eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)
        return np.argwhere(mask & ~eroded) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    pairwise = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return pairwise.min(axis=1), pairwise.min(axis=0)


# ----------------------------------------------------------------------------------------------
# Hand-computed cubes


def test_cubes_offset_along_z_with_anisotropic_spacing() -> None:
    # Two 4×4×4 cubes, the second one voxel further along z, spacing (z, y, x) = (2, 1, 1) mm.
    # Surface (6-connectivity) of each cube: 64 - 8 inner = 56 voxels. From A to B's surface:
    #   A's bottom face z=0 (16 voxels): B's bottom face one slice up -> 2 mm;
    #   A's top face interior (2×2 voxels at z=3, inside B): B's side ring 1 mm away in-plane -> 1 mm;
    #   the other 36 lie on B's surface -> 0. By symmetry B -> A is the same.
    # Pooled: 72 × 0, 8 × 1, 32 × 2 (112 values); the 95th percentile (index 105.45) is 2 mm.
    shape = (8, 8, 8)
    pred, ref = cube(shape, (1, 2, 2), 4), cube(shape, (2, 2, 2), 4)
    spacing = (2.0, 1.0, 1.0)
    m = case_metrics(pred, ref, spacing, LABELS, nsd_tolerance_mm=1.5)["fg"]
    assert m["tp"] == 48 and m["fp"] == 16 and m["fn"] == 16 and m["n_ref"] == 64 and m["n_pred"] == 64
    assert m["dice"] == pytest.approx(96 / 128)
    assert m["iou"] == pytest.approx(48 / 80)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(80 / 112)  # distances <= 1.5 mm: the zeros and ones
    assert case_metrics(pred, ref, spacing, LABELS, nsd_tolerance_mm=0.5)["fg"]["nsd"] == pytest.approx(72 / 112)
    assert case_metrics(pred, ref, spacing, LABELS, nsd_tolerance_mm=2.0)["fg"]["nsd"] == pytest.approx(1.0)

    to_ref, to_pred = surface_distances(pred.astype(bool), ref.astype(bool), spacing)
    assert sorted(to_ref.tolist()) == [0.0] * 36 + [1.0] * 4 + [2.0] * 16
    assert sorted(to_pred.tolist()) == sorted(to_ref.tolist())


def test_finer_z_spacing_changes_distances() -> None:
    # The same cubes with z spacing 0.5 mm: the bottom face is 0.5 mm from B's, and the top-face
    # interior is 0.5 mm from B's top face (closer than the 1 mm ring): 20 × 0.5 per direction.
    shape = (8, 8, 8)
    pred, ref = cube(shape, (1, 2, 2), 4), cube(shape, (2, 2, 2), 4)
    m = case_metrics(pred, ref, (0.5, 1.0, 1.0), LABELS, nsd_tolerance_mm=0.4)["fg"]
    assert m["hd95"] == pytest.approx(0.5)
    assert m["nsd"] == pytest.approx(72 / 112)


def test_pooled_percentile_matches_brute_force_on_shifted_spheres() -> None:
    grid = np.mgrid[:20, :24, :22]
    sphere = lambda c, r: (((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) <= r * r)  # noqa: E731
    a, b = sphere((9, 11, 10), 6), sphere((10, 12, 9), 5)
    spacing = (1.5, 0.7, 0.9)
    to_b, to_a = brute_force_distances(a, b, spacing)
    pooled = np.concatenate([to_b, to_a])
    m = mask_metrics(a, b, spacing, nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(float(np.percentile(pooled, 95)))
    assert m["nsd"] == pytest.approx(float(np.mean(pooled <= 1.0)))


def test_object_on_the_image_border_is_measured_as_on_a_padded_image() -> None:
    # The bounding-box crop must not change the result: an object touching the image edge gives
    # the same metrics as the same object with background around it.
    pred, ref = cube((6, 6, 6), (0, 0, 0), 4), cube((6, 6, 6), (1, 0, 0), 4)
    padded = [np.pad(x, 3) for x in (pred, ref)]
    spacing = (2.0, 1.0, 1.0)
    on_edge = case_metrics(pred, ref, spacing, LABELS)["fg"]
    inside = case_metrics(*padded, spacing, LABELS)["fg"]
    assert on_edge == inside


def test_sphere_against_itself() -> None:
    grid = np.mgrid[:16, :16, :16]
    sphere = ((grid - 7.5) ** 2).sum(0) <= 36
    m = case_metrics(sphere.astype(np.uint8), sphere.astype(np.uint8), (1.0, 1.0, 1.0), LABELS)["fg"]
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["hd95"] == 0.0 and m["nsd"] == 1.0
    assert m["fp"] == 0 and m["fn"] == 0 and m["tp"] == int(sphere.sum())


def test_2d_image_is_measured_in_plane() -> None:
    # A 2D image (1, Y, X) with the 999 mm dummy z spacing: squares 4×4 offset by one pixel in x.
    # Ring surfaces of 12 pixels; from A: the x=0 column (4) and the two interior pixels of its
    # right column are 1 mm from B's ring, 6 pixels lie on it. Pooled: 12 × 0, 12 × 1.
    pred, ref = np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8)
    pred[0, 2:6, 1:5] = 1
    ref[0, 2:6, 2:6] = 1
    m = case_metrics(pred, ref, (999.0, 1.0, 1.0), LABELS, nsd_tolerance_mm=0.5)["fg"]
    assert m["hd95"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(2 * 12 / 32)


# ----------------------------------------------------------------------------------------------
# Empty masks, regions, summary


def test_empty_conventions() -> None:
    empty, full = np.zeros((4, 5, 6), np.uint8), cube((4, 5, 6), (1, 1, 1), 2)
    both = case_metrics(empty, empty, (1.0, 1.0, 1.0), LABELS)["fg"]
    assert both == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0,
                    "n_ref": 0, "n_pred": 0}
    missed = case_metrics(empty, full, (1.0, 1.0, 1.0), LABELS)["fg"]
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and missed["nsd"] == 0.0 and missed["hd95"] is None
    assert missed["fn"] == 8 and missed["n_ref"] == 8 and missed["n_pred"] == 0
    spurious = case_metrics(full, empty, (1.0, 1.0, 1.0), LABELS)["fg"]
    assert spurious["dice"] == 0.0 and spurious["hd95"] is None and spurious["fp"] == 8


def test_regions_and_background_skipped() -> None:
    labels = {"background": [0], "edema": [1], "tumour": [2], "whole": [1, 2]}
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[1, 1, 1] = 2
    pred = ref.copy()
    pred[1, 1, 1] = 1  # the tumour voxel predicted as edema: wrong per label, right for the region
    result = case_metrics(pred, ref, (1.0, 1.0, 1.0), labels)
    assert set(result) == {"edema", "tumour", "whole"}
    assert result["whole"]["dice"] == 1.0
    assert result["tumour"]["dice"] == 0.0 and result["tumour"]["hd95"] is None
    assert result["edema"]["dice"] == pytest.approx(2 * 7 / 15)


def test_case_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1.0, 1.0, 1.0), LABELS)


def test_summarize_ignores_undefined_and_counts_them() -> None:
    per_case = {
        "a": {"fg": {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}, "core": {"dice": 0.5, "hd95": 4.0}},
        "b": {"fg": {"dice": 0.0, "hd95": None, "nsd": 0.0}, "core": {"dice": 0.7, "hd95": 2.0}},
        "c": {"fg": {"dice": 0.8, "hd95": 3.0, "nsd": 0.9}, "core": {"dice": 0.9, "hd95": 1.0}},
    }
    summary = summarize(per_case)
    assert summary["n_cases"] == 3
    fg = summary["labels"]["fg"]
    assert fg["dice"]["mean"] == pytest.approx(0.6) and fg["dice"]["median"] == pytest.approx(0.8)
    assert fg["hd95"] == {"mean": pytest.approx(1.5), "median": pytest.approx(1.5), "n": 2, "n_undefined": 1}
    assert summary["mean_foreground_dice"] == pytest.approx((0.6 + 0.7) / 2)
    assert mean_foreground_dice(per_case) == pytest.approx(0.65)
    assert summarize({})["mean_foreground_dice"] is None


def test_summarize_label_absent_from_every_pair_is_none_not_a_score() -> None:
    """Excluded in every case, a label reports every metric as None over 0 pairs and is left out of the
    overall mean; with ``perfect`` it averages in as 1."""
    absent = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0, "n_ref": 0, "n_pred": 0}
    found = {"dice": 0.6, "iou": 0.4, "hd95": 2.0, "nsd": 0.7, "tp": 3, "fp": 2, "fn": 2, "n_ref": 5, "n_pred": 5}
    per_case = {"a": {"fg": found, "rare": absent}, "b": {"fg": found, "rare": absent}}
    summary = summarize(per_case)
    rare = summary["labels"]["rare"]
    assert rare["n_both_empty"] == 2
    assert rare["dice"] == {"mean": None, "median": None, "n": 0, "n_undefined": 0}
    assert rare["hd95"]["mean"] is None and rare["nsd"]["mean"] is None
    assert summary["mean_foreground_dice"] == pytest.approx(0.6)
    assert summarize(per_case, "perfect")["mean_foreground_dice"] == pytest.approx(0.8)
    assert summarize({"a": {"rare": absent}})["mean_foreground_dice"] is None


def test_dice_per_label_leaves_a_label_absent_from_both_unscored() -> None:
    pred, ref = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    pred[1:3, 1:3, 1:3] = 1
    ref[1:3, 1:3, 1:4] = 1
    dice = dice_per_label(pred, ref, {"background": [0], "fg": [1], "rare": [2]})
    assert dice == {"fg": pytest.approx(2 * 8 / 20), "rare": None}


# ----------------------------------------------------------------------------------------------
# Postprocessing


def test_keep_largest_component_all_foreground_vs_per_label() -> None:
    seg = np.zeros((6, 12, 12), np.uint8)
    seg[1:5, 1:6, 1:6] = 1      # big label-1 object
    seg[1:3, 1:3, 8:10] = 2     # separate small label-2 object
    seg[4, 10, 10] = 1          # stray label-1 voxel
    union = keep_largest_component(seg, [1, 2], per_label=False)
    assert (union == 2).sum() == 0 and union[4, 10, 10] == 0 and (union == 1).sum() == 100
    each = keep_largest_component(seg, [1, 2], per_label=True)
    assert (each == 2).sum() == 8 and each[4, 10, 10] == 0
    assert seg[4, 10, 10] == 1  # input untouched
    # A region entry acts on the union of its values.
    region = keep_largest_component(seg, [(1, 2)], per_label=True)
    assert np.array_equal(region, union)


def _cv(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    return [(p, r, (1.0, 1.0, 1.0)) for p, r in pairs]


def test_stray_blob_is_removed_by_all_foreground_lcc() -> None:
    cases = []
    for shift in range(3):
        ref = cube((10, 14, 14), (2, 2 + shift, 2), 5)
        pred = ref.copy()
        pred[8:10, 11:13, 11:13] = 1  # a false-positive blob far from the object
        cases.append((pred, ref))
    decision = decide_postprocessing(_cv(cases), LABELS)
    assert decision.all_foreground and decision.per_label == ()
    assert decision.dice_after > decision.dice_before
    cleaned = apply_postprocessing(cases[0][0], decision)
    assert np.array_equal(cleaned, cases[0][1])


def test_lcc_rejected_when_it_removes_a_true_second_component() -> None:
    ref = cube((10, 16, 16), (1, 1, 1), 5)
    ref[6:9, 10:13, 10:13] = 1  # a real second lesion, predicted correctly
    decision = decide_postprocessing(_cv([(ref.copy(), ref)]), LABELS)
    assert not decision.all_foreground and decision.is_noop


def test_per_label_lcc_accepted_when_all_foreground_is_not() -> None:
    labels = {"background": [0], "liver": [1], "lesion": [2]}
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[1:7, 1:9, 1:9] = 1     # large label-1 object
    ref[1:4, 12:16, 12:16] = 2  # a separate label-2 object: all-foreground LCC would delete it
    pred = ref.copy()
    pred[8, 17:19, 1:3] = 2    # a stray label-2 blob
    decision = decide_postprocessing(_cv([(pred, ref)]), labels)
    assert not decision.all_foreground
    assert decision.per_label == ("lesion",)
    assert decision.label_dice_after["lesion"] == 1.0
    round_trip = PostprocessingDecision.from_dict(decision.to_dict())
    assert round_trip == decision
    assert np.array_equal(apply_postprocessing(pred, round_trip), ref)


def test_postprocessing_scores_absences_as_evaluate_does() -> None:
    """A label absent from both prediction and reference is left out of the Dice that decides
    postprocessing, as it is left out of evaluate's and find-best's means (it used to count as 1)."""
    labels = {"background": [0], "liver": [1], "lesion": [2], "cyst": [3]}
    cases = []
    for index in range(3):
        ref = cube((10, 20, 20), (1, 1 + index, 1), 6)
        pred = cube((10, 20, 20), (1, 2 + index, 1), 6)
        if index == 0:
            ref[1:4, 14:17, 14:17] = 2  # the only case with a lesion, predicted half right
            pred[1:4, 14:17, 15:18] = 2
        if index == 1:
            pred[8, 18, 18] = 2  # a spurious lesion voxel where there is none
        cases.append((pred, ref))
    per_case = {str(i): case_metrics(p, r, (1.0, 1.0, 1.0), labels) for i, (p, r) in enumerate(cases)}
    summary = summarize(per_case)
    decision = decide_postprocessing(_cv(cases), labels)
    for name in ("liver", "lesion"):
        assert decision.label_dice_before[name] == pytest.approx(summary["labels"][name]["dice"]["mean"])
    assert decision.label_dice_before["cyst"] is None  # absent everywhere: no score, not 1
    assert decision.dice_before == pytest.approx(summary["mean_foreground_dice"])
    assert PostprocessingDecision.from_dict(decision.to_dict()) == decision


def test_removing_the_only_predictions_of_a_label_no_reference_has_is_accepted() -> None:
    """The stray lesion is the only lesion anywhere: after keeping the largest component the label is
    absent from every pair (no mean), which is no worse than Dice 0 and lifts the overall mean."""
    labels = {"background": [0], "liver": [1], "lesion": [2]}
    ref = cube((10, 20, 20), (1, 1, 1), 6)
    pred = ref.copy()
    pred[8, 18, 18] = 2
    decision = decide_postprocessing(_cv([(pred, ref), (ref.copy(), ref)]), labels)
    assert decision.all_foreground
    assert decision.label_dice_before == {"liver": 1.0, "lesion": 0.0}
    assert decision.label_dice_after == {"liver": 1.0, "lesion": None}
    assert decision.dice_before == pytest.approx(0.5) and decision.dice_after == pytest.approx(1.0)
