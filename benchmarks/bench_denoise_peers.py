"""Benchmark: low-dose CT denoising beside its peers — same data, same split, same CPU budget (issue 12 item 7).

    python benchmarks/bench_denoise_peers.py --peers-python /tmp/peers/bin/python --budget 10m \\
        [--ct PATH ...] [--out /tmp/denoise-peers] [--cases-limit N] [--test-cases N] [--dry-run]

One command, one process per step, one after the other (never concurrently):

1. **Data.** Every ``--ct`` input (default: ``DATA/OpenKBP_HN_CT``, the 60 OpenKBP head-and-neck
   CTs; ``DATA/TotalSegmentator_examples/example_ct.nii.gz``; ``DATA/CT_full_dose``, two NIfTI
   volumes and one DICOM series; ``DATA`` = ``--data-root``) is read as ``autoseg simulate`` reads
   it (a folder of volumes and DICOM series, a segmentation dataset's ``imagesTr/*_0000``, or one
   file); the cases are linked into one staging folder and ``autoseg simulate low-dose --dose 0.25
   --seed 0`` makes the pairs. An existing ``OUT/raw`` with the same cases is reused.
2. **Split by patient** (a case is its own patient unless ``--patient-map`` says otherwise):
   test ≈ ``--test-fraction`` (or exactly ``--test-cases``), stratified over the ``--ct`` inputs,
   each input's patients ordered by sha256("{seed}:{patient}"); of the rest, ≈ ``--val-fraction``
   (at least one patient) validates and the others train. autoseg (``--splits``, fold 0) and
   RED-CNN use the same train/val patients; nobody sees the test patients. The split is in the JSON.
3. **autoseg**: ``plan --planner cpu --time-budget B`` on the train+val pairs (networks sized for
   the budget on this machine, as a CPU user plans; the sizing keeps back time for a fold validation
   that the training below skips, so the networks are a little smaller than the budget allows),
   ``train -c C -f 0 --time-budget B --no-validate`` for 2d, 2.5d and 3d_fullres (the whole budget
   trains, as RED-CNN's does; the test patients score every method), ``predict`` with each and with
   the three averaged (``-c 2d -c 2.5d -c 3d_fullres``, the ensemble; its train wall is the three's sum).
4. **BM3D** (``bm3d.bm3d``, profile ``np``) per axial slice, σ estimated per slice by
   scikit-image's ``estimate_sigma`` (``--bm3d-sigma estimate``; ``oracle``: one σ per case from the
   pair, an upper bound, reported as its own row). See ``denoise_peers_worker.py``.
5. **RED-CNN** as ldct-benchmark publishes it: its network, its configs/redcnn.yaml
   hyper-parameters, its training recipe, for the same wall-clock budget B on the same train/val
   pairs, then applied to whole test slices (``denoise_peers_worker.py``).
6. **Scoring**: ``autoseg evaluate`` of every method against the same full-dose references, in the
   AAPM window [-160, 240] HU, the low-dose input as the baseline. JSON on stdout (and
   ``OUT/report.json``), a markdown table on stderr (and ``OUT/report.md``).

BM3D and RED-CNN run in their own environment (``--peers-python``: torch CPU, ldct-benchmark with
``--no-deps``, bm3d, bm4d, scikit-image, PyWavelets; see benchmarks/README.md); this script runs
with autoseg's, reads and writes the images with ``autoseg.imageio`` and hands the peers float32
arrays (HU, the axial axis first). Their outputs are written back in the input's geometry and
pixel type, as ``autoseg predict`` writes its own.

``--dry-run``: the small inputs only (three OpenKBP cases and the TotalSegmentator example; not
CT_full_dose's 512² slices), 8 central axial slices of each, 20 s budgets (unless ``--budget``),
the ``tiny`` planner, RED-CNN with batch 4 on 64² patches and a validation every 3 iterations — it checks the
plumbing in a few minutes and measures nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "denoise_peers_worker.py"
AUTOSEG_CONFIGS = ("2d", "2.5d", "3d_fullres")
ENSEMBLE = "autoseg ensemble"
#: Dry run: cases per input, and the axial slices kept around each volume's centre (whole slices:
#: the simulated noise depends on everything a ray crosses, so an in-plane crop would remove most of it).
DRY_CASES = 3
DRY_SLICES = 8
DRY_BUDGET_S = 20.0
#: Dry run: RED-CNN's batch, patch and validation interval shrunk so a few iterations fit in 20 s.
DRY_REDCNN = {"mbs": 4, "patchsize": 64, "eval_patchsize": 64, "iterations_before_val": 3}
#: Issue 12 item 7: autoseg ≥ RED-CNN + 0.3 dB PSNR and ≥ its SSIM; BM3D beaten by ≥ 1 dB.
TARGET_VS_REDCNN_DB = 0.3
TARGET_VS_BM3D_DB = 1.0


@dataclass(frozen=True)
class Source:
    """One full-dose CT: the ``--ct`` input it came from, its case id, patient and file (or DICOM folder)."""

    group: str
    case: str
    patient: str
    path: Path


# ----------------------------------------------------------------------------------------------
# Running a step


def parse_budget(text: str) -> float:
    """Seconds of a duration as ``autoseg train --time-budget`` reads it (``10m``, ``1h30m``, ``600``).

    Raises:
        SystemExit: not a positive duration.
    """
    from autoseg.errors import ConfigError
    from autoseg.training.config import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise SystemExit(str(exc).replace("--time-budget", "--budget")) from None


def measure(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command``; its wall seconds and the last ``BENCH_RESULT`` line it printed.

    Raises:
        SystemExit: the command failed (its log's tail is printed).
    """
    started = time.perf_counter()
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)} (log: {log})")
    result: dict[str, Any] = {"wall_s": round(wall, 2)}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result["reported"] = json.loads(line[len("BENCH_RESULT "):])
    return result


def autoseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoseg", *args]


# ----------------------------------------------------------------------------------------------
# 1. Data


def load_patient_map(path: Path | None) -> dict[str, str]:
    """``{case: patient}`` from a JSON file; empty without one (every case its own patient)."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SystemExit(f"--patient-map {path}: expected a JSON object {{case id: patient id}}")
    return data


def find_sources(inputs: list[Path], limit: int | None, patients: dict[str, str]) -> list[Source]:
    """The cases of every input, as ``autoseg simulate`` finds them; the first ``limit`` of each.

    Raises:
        SystemExit: an input holds no CT, or two inputs give the same case id.
    """
    from autoseg.errors import DatasetError
    from autoseg.simulate.run import find_ct_sources

    sources: list[Source] = []
    for path in inputs:
        try:
            found = find_ct_sources(path)
        except DatasetError as exc:
            raise SystemExit(f"--ct {path}: {exc}") from None
        for ct in found[:limit]:
            sources.append(Source(str(path), ct.case_id, patients.get(ct.case_id, ct.case_id), Path(ct.path)))
    seen: dict[str, Source] = {}
    for source in sources:
        if source.case in seen:
            raise SystemExit(f"case id {source.case!r} comes from {seen[source.case].path} and {source.path}; "
                             "leave one input out")
        seen[source.case] = source
    return sources


def central_slices(volume: np.ndarray, axis: int, count: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The ``count`` central slices of a ``(Z, Y, X)`` volume along ``axis``, and the block's start index."""
    first = max(0, (volume.shape[axis] - count) // 2)
    start = tuple(first if a == axis else 0 for a in range(3))
    return np.take(volume, range(first, min(volume.shape[axis], first + count)), axis=axis), start  # type: ignore[return-value]


def stage(sources: list[Source], staging: Path, slices: int | None) -> None:
    """One folder that ``autoseg simulate`` reads as one case per source: ``{case}{ending}`` links to
    volume files, ``{case}/`` folders of links to a DICOM series' files; with ``slices``, NIfTI copies
    of that many central axial slices instead (the dry run; origin moved to the first kept slice)."""
    from autoseg.imageio import read_image, strip_ending, write_image
    from autoseg.overlay import axial_axis

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for source in sources:
        if slices is not None:
            image, geometry = read_image(source.path)
            block, start = central_slices(image[0], axial_axis(geometry), slices)
            write_image(staging / f"{source.case}.nii.gz", np.ascontiguousarray(block), _shifted(geometry, start))
        elif source.path.is_dir():
            folder = staging / source.case
            folder.mkdir()
            for item in sorted(source.path.iterdir()):
                if item.is_file() and not item.name.startswith("."):
                    (folder / item.name).symlink_to(item.resolve())
        else:
            (staging / f"{source.case}{strip_ending(source.path.name)[1]}").symlink_to(source.path.resolve())


def _shifted(geometry: Any, start: tuple[int, int, int]) -> Any:
    """``geometry`` with its origin moved to voxel ``start`` (``(z, y, x)``) of the old grid."""
    import dataclasses

    # ITK order (x, y, z): the index and the spacing reversed from the array's (z, y, x).
    offset = np.array(start[::-1], dtype=float) * np.array(geometry.spacing[::-1], dtype=float)
    direction = np.array(geometry.direction, dtype=float).reshape(3, 3)
    origin = np.array(geometry.origin, dtype=float) + direction @ offset
    return dataclasses.replace(geometry, origin=tuple(float(v) for v in origin))


def simulate(sources: list[Source], out: Path, dose: float, seed: int, slices: int | None, logs: Path,
             photons: float | None = None) -> dict[str, Any]:
    """``autoseg simulate low-dose`` of every source into ``out/raw``; a finished one of the same sources,
    dose, seed and slices (``out/simulate_key.json``, written after it) is reused."""
    raw, key_file = out / "raw", out / "simulate_key.json"
    key = {"sources": sorted([s.case, str(s.path)] for s in sources), "dose": dose, "seed": seed,
           "slices": slices, "photons": photons}
    if (raw / "dataset.json").is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return {"reused": str(raw)}
    key_file.unlink(missing_ok=True)
    shutil.rmtree(raw, ignore_errors=True)
    staging = out / "staging"
    stage(sources, staging, slices)
    run = measure(autoseg_cmd("simulate", "low-dose", str(staging), "-o", str(raw), "--dose", f"{dose:g}",
                              "--seed", str(seed), *(["--photons", f"{photons:g}"] if photons else [])),
                  logs / "simulate.log")
    key_file.write_text(json.dumps(key))
    return {"wall_s": run["wall_s"], "cases": len(sources)}


# ----------------------------------------------------------------------------------------------
# 2. Split by patient


def allocate(counts: dict[str, int], total: int) -> dict[str, int]:
    """``total`` spread over the groups in proportion to ``counts`` (largest remainder; ties: group order)."""
    n = sum(counts.values())
    quotas = {g: total * c / n for g, c in counts.items()}
    shares = {g: int(q) for g, q in quotas.items()}
    order = sorted(counts, key=lambda g: -(quotas[g] - shares[g]))
    for g in order[:total - sum(shares.values())]:
        shares[g] += 1
    return shares


def pick(patients: dict[str, str], count: int, seed: int, salt: str) -> list[str]:
    """``count`` of ``patients`` (patient -> group), stratified by group, each group's patients ordered
    by sha256("{seed}:{salt}:{patient}")."""
    groups: dict[str, list[str]] = {}
    for patient, group in patients.items():
        groups.setdefault(group, []).append(patient)
    shares = allocate({g: len(p) for g, p in groups.items()}, count)
    chosen: list[str] = []
    for group, members in groups.items():
        members.sort(key=lambda p: hashlib.sha256(f"{seed}:{salt}:{p}".encode()).hexdigest())
        chosen += members[:shares[group]]
    return sorted(chosen)


def split_by_patient(sources: list[Source], test_fraction: float, test_cases: int | None, val_fraction: float,
                     seed: int) -> dict[str, Any]:
    """Test, val and train cases, whole patients only (module docstring).

    Raises:
        SystemExit: too few patients for a train, a val and a test patient.
    """
    patients = {s.patient: s.group for s in sources}
    if len(patients) < 3:
        raise SystemExit(f"{len(patients)} patient(s): at least 3 are needed (train, val, test)")
    n_test = test_cases if test_cases is not None else max(1, round(test_fraction * len(patients)))
    if not 1 <= n_test <= len(patients) - 2:
        raise SystemExit(f"--test-cases {n_test}: between 1 and {len(patients) - 2} for {len(patients)} patients")
    test = set(pick(patients, n_test, seed, "test"))
    rest = {p: g for p, g in patients.items() if p not in test}
    n_val = min(len(rest) - 1, max(1, round(val_fraction * len(rest))))
    val = set(pick(rest, n_val, seed, "val"))

    def cases(chosen: set[str]) -> list[str]:
        return sorted(s.case for s in sources if s.patient in chosen)

    train_patients = set(rest) - val
    return {
        "seed": seed, "rule": "whole patients; test then val drawn per --ct input in proportion to its patients, "
                              "each input's patients ordered by sha256('{seed}:{test|val}:{patient}')",
        "test": cases(test), "val": cases(val), "train": cases(train_patients),
        "patients": {"test": len(test), "val": len(val), "train": len(train_patients)},
        "by_input": {g: {part: sorted(s.case for s in sources if s.group == g and s.case in cases(chosen))
                         for part, chosen in (("test", test), ("val", val), ("train", train_patients))}
                     for g in dict.fromkeys(s.group for s in sources)},
    }


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target.resolve())


def build_folders(raw: Path, out: Path, split: dict[str, Any]) -> dict[str, Path]:
    """``raw_train`` (train + val pairs, a restoration dataset), ``test_low`` ({case}_0000 inputs) and
    ``test_ref`` ({case} full-dose references), all links into ``raw``; the one-fold splits file."""
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    folders = {name: out / name for name in ("raw_train", "test_low", "test_ref")}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    learn = split["train"] + split["val"]
    for case in learn:
        link(raw / "imagesTr" / f"{case}_0000{ending}", folders["raw_train"] / "imagesTr" / f"{case}_0000{ending}")
        link(raw / "targetsTr" / f"{case}{ending}", folders["raw_train"] / "targetsTr" / f"{case}{ending}")
    record = meta.get("autoseg_simulate", {})
    record = {**record, "cases": {c: v for c, v in record.get("cases", {}).items() if c in learn}}
    (folders["raw_train"] / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(learn),
                                                                   "autoseg_simulate": record}, indent=1))
    for case in split["test"]:
        link(raw / "imagesTr" / f"{case}_0000{ending}", folders["test_low"] / f"{case}_0000{ending}")
        link(raw / "targetsTr" / f"{case}{ending}", folders["test_ref"] / f"{case}{ending}")
    folders["splits"] = out / "splits.json"
    folders["splits"].write_text(json.dumps([{"train": split["train"], "val": split["val"]}], indent=1))
    return folders


# ----------------------------------------------------------------------------------------------
# 3. autoseg


def run_autoseg(out: Path, folders: dict[str, Path], budget: str, configs: tuple[str, ...], planner: str,
                logs: Path, plan_budget: bool = True, fold_validation: bool = False) -> dict[str, Any]:
    """plan (sized for ``budget`` per fold when ``plan_budget``), train each configuration for ``budget``
    (all of it training unless ``fold_validation``: predicting the validation patient in full would spend
    autoseg's budget on something RED-CNN's recipe does not do), predict with each and with all of them
    averaged."""
    work = out / "autoseg_work"
    shutil.rmtree(work, ignore_errors=True)
    sized = ["--time-budget", budget] if plan_budget else []
    runs: dict[str, Any] = {"plan": measure(autoseg_cmd("plan", str(folders["raw_train"]), "-o", str(work),
                                                        "--planner", planner, *sized), logs / "autoseg_plan.log")}
    methods: dict[str, Any] = {}
    for config in configs:
        train = measure(autoseg_cmd("train", str(work), "-c", config, "-f", "0", "--time-budget", budget,
                                    "--splits", str(folders["splits"]), "--device", "cpu",
                                    *([] if fold_validation else ["--no-validate"])),
                        logs / f"autoseg_train_{config}.log")
        methods[f"autoseg {config}"] = {"train_wall_s": train["wall_s"],
                                        "predict": predict_autoseg(work, folders, out, [config], logs)}
    if len(configs) > 1:
        methods[ENSEMBLE] = {"train_wall_s": round(sum(methods[f"autoseg {c}"]["train_wall_s"] for c in configs), 2),
                             "predict": predict_autoseg(work, folders, out, list(configs), logs)}
    runs["methods"] = methods
    return runs


def predict_autoseg(work: Path, folders: dict[str, Path], out: Path, configs: list[str], logs: Path) -> dict[str, Any]:
    name = "ensemble" if len(configs) > 1 else configs[0]
    target = out / "pred" / f"autoseg_{name}"
    shutil.rmtree(target, ignore_errors=True)
    config_args = [arg for c in configs for arg in ("-c", c)]
    run = measure(autoseg_cmd("predict", str(work), "-i", str(folders["test_low"]), "-o", str(target), *config_args,
                              "-f", "0", "--device", "cpu"), logs / f"autoseg_predict_{name}.log")
    return {"wall_s": run["wall_s"], "folder": str(target)}


# ----------------------------------------------------------------------------------------------
# 4-5. Peers


def export_arrays(raw: Path, cases: list[str], arrays: Path, with_target: bool = True) -> None:
    """``{case}_low.npy`` / ``{case}_full.npy``: float32 HU, the axial axis first."""
    from autoseg.imageio import read_image
    from autoseg.overlay import axial_axis

    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    arrays.mkdir(parents=True, exist_ok=True)
    parts = (("low", raw / "imagesTr", "_0000"), ("full", raw / "targetsTr", ""))
    for case in cases:
        for part, folder, suffix in parts if with_target else parts[:1]:
            image, geometry = read_image(folder / f"{case}{suffix}{ending}")
            np.save(arrays / f"{case}_{part}.npy",
                    np.moveaxis(image[0].astype(np.float32), axial_axis(geometry), 0))


def write_like(array_file: Path, reference: Path, out_file: Path) -> None:
    """The peer's ``(axial, ., .)`` float32 HU output written with ``reference``'s geometry and pixel type
    (integers rounded and clipped to their range, as ``autoseg predict`` writes)."""
    from autoseg.imageio import read_image, write_image
    from autoseg.overlay import axial_axis

    image, geometry = read_image(reference)
    restored = np.moveaxis(np.load(array_file), 0, axial_axis(geometry))
    dtype = image.dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        restored = np.clip(np.rint(restored), info.min, info.max)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_image(out_file, restored.astype(dtype), geometry)


def write_peer_outputs(raw: Path, cases: list[str], folder: Path, target: Path) -> float:
    """Every ``folder/{case}.npy`` as ``target/{case}{ending}``; the seconds it took."""
    started = time.perf_counter()
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    shutil.rmtree(target, ignore_errors=True)
    for case in cases:
        write_like(folder / f"{case}.npy", raw / "imagesTr" / f"{case}_0000{ending}", target / f"{case}{ending}")
    return time.perf_counter() - started


def run_job(peers_python: Path, step: str, job: dict[str, Any], job_file: Path, logs: Path) -> dict[str, Any]:
    job_file.write_text(json.dumps(job, indent=1))
    return measure([str(peers_python), str(WORKER), step, str(job_file)], logs / f"peers_{job_file.stem}_{step}.log")


def run_peers(peers_python: Path, out: Path, raw: Path, split: dict[str, Any], budget_s: float,
              sigmas: list[str], redcnn: bool, dry_run: bool, logs: Path,
              redcnn_batch: int | None = None) -> dict[str, Any]:
    """BM3D (one row per σ mode), RED-CNN as published (when ``redcnn``) and RED-CNN with a batch of
    ``redcnn_batch`` (when given, its own row); train and predict walls per method.

    A peer's predict wall is its worker's wall plus the harness's reading of the test inputs into
    arrays and writing its outputs back as images (``autoseg predict`` reads and writes its own).
    """
    arrays = out / "arrays"
    shutil.rmtree(arrays, ignore_errors=True)
    started = time.perf_counter()
    export_arrays(raw, split["test"], arrays, with_target=True)
    test_io_s = time.perf_counter() - started  # the targets are read for BM3D's oracle σ only; counted anyway
    methods: dict[str, Any] = {}
    for sigma in sigmas:
        name = "BM3D" if sigma == "estimate" else "BM3D (oracle σ)"
        folder = out / "peers" / f"bm3d_{sigma}"
        shutil.rmtree(folder, ignore_errors=True)
        job = {"arrays": str(arrays), "test": split["test"], "out": str(folder), "sigma": sigma}
        run = run_job(peers_python, "bm3d", job, out / "peers" / f"bm3d_{sigma}.json", logs)
        write_s = write_peer_outputs(raw, split["test"], folder, out / "pred" / f"bm3d_{sigma}")
        methods[name] = {"train_wall_s": 0.0, "predict": {"wall_s": round(run["wall_s"] + test_io_s + write_s, 2),
                                                          "folder": str(out / "pred" / f"bm3d_{sigma}")},
                         "details": run.get("reported")}
    variants = ([("RED-CNN", "redcnn", DRY_REDCNN if dry_run else {})] if redcnn else []) + \
        ([(f"RED-CNN (batch {redcnn_batch})", f"redcnn_b{redcnn_batch}",
           {**(DRY_REDCNN if dry_run else {}), "mbs": redcnn_batch})] if redcnn_batch else [])
    if not variants:
        return methods
    started = time.perf_counter()
    export_arrays(raw, split["train"] + split["val"], arrays)
    train_io_s = time.perf_counter() - started
    for name, slug, overrides in variants:
        folder = out / "peers" / slug
        shutil.rmtree(folder, ignore_errors=True)
        job = {"arrays": str(arrays), "train": split["train"], "val": split["val"], "test": split["test"],
               "out": str(folder), "budget_s": budget_s, "overrides": overrides}
        train = run_job(peers_python, "redcnn-train", job, out / "peers" / f"{slug}.json", logs)
        predict = run_job(peers_python, "redcnn-predict", job, out / "peers" / f"{slug}.json", logs)
        write_s = write_peer_outputs(raw, split["test"], folder, out / "pred" / slug)
        methods[name] = {"train_wall_s": round(train["wall_s"] + train_io_s, 2),
                         "predict": {"wall_s": round(predict["wall_s"] + test_io_s + write_s, 2),
                                     "folder": str(out / "pred" / slug)},
                         "details": {"train": train.get("reported"), "predict": predict.get("reported"),
                                     "overrides": overrides}}
    return methods


# ----------------------------------------------------------------------------------------------
# 6. Scoring


def evaluate(pred: Path, folders: dict[str, Path], target: Path, panels: bool, logs: Path) -> dict[str, Any]:
    """``autoseg evaluate`` of one method: its summary (mean, std, n of each score; the input's)."""
    target.parent.mkdir(parents=True, exist_ok=True)  # one folder per method: its report, CSV and panels
    measure(autoseg_cmd("evaluate", str(pred), str(folders["test_ref"]), "--task", "restoration",
                        "--baseline-input", str(folders["test_low"]), "-o", str(target),
                        "--panels" if panels else "--no-panels"), logs / f"evaluate_{target.parent.name}.log")
    return json.loads(target.read_text())["summary"]


def scores(summary: dict[str, Any], image: str = "restored") -> dict[str, Any]:
    part = summary[image]
    return {"psnr_db": part["psnr_db"]["mean"], "psnr_db_std": part["psnr_db"]["std"],
            "ssim_2d": part["ssim_2d"]["mean"], "ssim_2d_std": part["ssim_2d"]["std"],
            "ssim_3d": part["ssim_3d"]["mean"], "rmse_hu": part["rmse_hu"]["mean"], "n_cases": summary["n_cases"]}


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 12 item 7's targets for every autoseg row: PSNR and SSIM margins over RED-CNN and BM3D."""
    out: dict[str, Any] = {}
    redcnn, bm3d = results.get("RED-CNN"), results.get("BM3D")
    for name, row in results.items():
        if not name.startswith("autoseg"):
            continue
        entry: dict[str, Any] = {}
        if redcnn is not None:
            gain = row["psnr_db"] - redcnn["psnr_db"]
            entry["psnr_minus_redcnn_db"] = round(gain, 3)
            entry["ssim_minus_redcnn"] = round(row["ssim_2d"] - redcnn["ssim_2d"], 4)
            entry["met_vs_redcnn"] = gain >= TARGET_VS_REDCNN_DB and row["ssim_2d"] >= redcnn["ssim_2d"]
        if bm3d is not None:
            entry["psnr_minus_bm3d_db"] = round(row["psnr_db"] - bm3d["psnr_db"], 3)
            entry["met_vs_bm3d"] = row["psnr_db"] - bm3d["psnr_db"] >= TARGET_VS_BM3D_DB
        out[name] = entry
    return out


def markdown_table(results: dict[str, dict[str, Any]], caption: str) -> str:
    def number(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [caption, "", "| method | PSNR (dB) | SSIM 2D | RMSE (HU) | train wall (s) | predict wall (s) |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {number(row['psnr_db'], 2)} ± {number(row['psnr_db_std'], 2)} | "
                     f"{number(row['ssim_2d'], 4)} | {number(row['rmse_hu'], 1)} | "
                     f"{number(row.get('train_wall_s'), 1)} | {number(row.get('predict_wall_s'), 1)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def save_report(out: Path, report: dict[str, Any]) -> None:
    """``OUT/report.json``, rewritten after every stage (an interrupted run keeps what it measured)."""
    (out / "report.json").write_text(json.dumps(report, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", type=Path, required=True,
                        help="Python of the peers' environment (torch CPU, ldct-benchmark, bm3d).")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data",
                        help="Folder of the default --ct inputs (default: ../shared/data beside the repository).")
    parser.add_argument("--ct", type=Path, action="append",
                        help="A full-dose CT input (folder, dataset or file); repeat. Default: OpenKBP_HN_CT, "
                             "TotalSegmentator_examples/example_ct.nii.gz, CT_full_dose under --data-root.")
    parser.add_argument("--out", type=Path, help="Output folder (default: /tmp/denoise-peers, "
                                                  "/tmp/denoise-peers-dry-run with --dry-run).")
    parser.add_argument("--budget", help="Wall-clock training budget per trained method: 10m, 1h, 600 (default: "
                                         "10m; 20s with --dry-run).")
    parser.add_argument("--dose", type=float, default=0.25)
    parser.add_argument("--sim-seed", type=int, default=0, help="autoseg simulate --seed.")
    parser.add_argument("--photons", type=float, help="autoseg simulate --photons (default: its own, 1e5 per "
                                                      "1 mm x 1 mm ray; coarse voxels get little noise at it).")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--test-cases", type=int, help="Exactly this many test patients (instead of the fraction).")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="Of the non-test patients, for validation.")
    parser.add_argument("--cases-limit", type=int, help="At most this many cases from each --ct input (sorted ids).")
    parser.add_argument("--patient-map", type=Path, help="JSON {case id: patient id} for cases of one patient.")
    parser.add_argument("--configs", default=",".join(AUTOSEG_CONFIGS), help="autoseg configurations to train.")
    parser.add_argument("--planner", help="autoseg plan --planner (default: cpu; tiny in a dry run).")
    parser.add_argument("--fold-validation", action="store_true",
                        help="Let autoseg train validate its fold in full within the budget (default: off, the whole "
                             "budget trains, as RED-CNN's; the test patients score every method).")
    parser.add_argument("--plan-budget", action=argparse.BooleanOptionalAction, default=None,
                        help="autoseg plan --time-budget BUDGET: networks sized for the budget on this machine, as a "
                             "CPU user plans (default: on; off in a dry run).")
    parser.add_argument("--bm3d-sigma", default="estimate", help="estimate, oracle, or both (estimate,oracle).")
    parser.add_argument("--methods", default="autoseg,bm3d,redcnn",
                        help="Which to run (comma list of autoseg, bm3d, redcnn, redcnn-batch; redcnn-batch: RED-CNN "
                             "with --redcnn-batch patches per step, else as published, as its own row).")
    parser.add_argument("--redcnn-batch", type=int, default=8,
                        help="Patches per step of the redcnn-batch row (published: 73, which leaves RED-CNN a handful "
                             "of iterations in minutes of CPU).")
    parser.add_argument("--panels", action=argparse.BooleanOptionalAction, default=None,
                        help="autoseg evaluate panels (default: on; off in a dry run).")
    parser.add_argument("--dry-run", action="store_true", help="Tiny cropped cases and 20 s budgets: plumbing only.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = args.data_root
    inputs = args.ct or [data / "OpenKBP_HN_CT", data / "TotalSegmentator_examples" / "example_ct.nii.gz",
                         *([] if args.dry_run else [data / "CT_full_dose"])]
    limit = args.cases_limit if args.cases_limit is not None else (DRY_CASES if args.dry_run else None)
    budget_s = parse_budget(args.budget) if args.budget else DRY_BUDGET_S if args.dry_run else parse_budget("10m")
    budget = f"{budget_s:g}s"
    methods = set(args.methods.split(","))
    if methods - {"autoseg", "bm3d", "redcnn", "redcnn-batch"}:
        raise SystemExit(f"--methods {args.methods}: expected a comma list of autoseg, bm3d, redcnn, redcnn-batch")
    if args.redcnn_batch < 1:
        raise SystemExit(f"--redcnn-batch {args.redcnn_batch}: at least 1")
    sigmas = [s for s in args.bm3d_sigma.split(",") if s] if "bm3d" in methods else []
    if set(sigmas) - {"estimate", "oracle"}:
        raise SystemExit(f"--bm3d-sigma {args.bm3d_sigma}: expected estimate, oracle or estimate,oracle")
    out = args.out or Path("/tmp/denoise-peers-dry-run" if args.dry_run else "/tmp/denoise-peers")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "peers").mkdir(exist_ok=True)

    sources = find_sources(inputs, limit, load_patient_map(args.patient_map))
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "note": "DRY RUN: plumbing only, the numbers measure nothing" if args.dry_run else None,
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "budget_s": budget_s, "dose": args.dose, "photons": args.photons, "window_hu": [-160, 240],
        "inputs": [str(p) for p in inputs], "cases_limit_per_input": limit,
        "dry_run_axial_slices": DRY_SLICES if args.dry_run else None,
        "sources": [{**asdict(s), "path": str(s.path)} for s in sources],
    }
    report["simulate"] = simulate(sources, out, args.dose, args.sim_seed, DRY_SLICES if args.dry_run else None, logs,
                                  args.photons)
    raw = out / "raw"
    split = split_by_patient(sources, args.test_fraction, args.test_cases, args.val_fraction, args.split_seed)
    report["split"] = split
    folders = build_folders(raw, out, split)
    save_report(out, report)

    runs: dict[str, Any] = {}
    if "autoseg" in methods:
        configs = tuple(c for c in args.configs.split(",") if c)
        planner = args.planner or ("tiny" if args.dry_run else "cpu")
        plan_budget = args.plan_budget if args.plan_budget is not None else not args.dry_run
        autoseg = run_autoseg(out, folders, budget, configs, planner, logs, plan_budget, args.fold_validation)
        report["autoseg_plan"] = {**autoseg["plan"], "planner": planner, "sized_for_budget": plan_budget,
                                  "fold_validation": args.fold_validation}
        runs.update(autoseg["methods"])
        save_report(out, report)
    if methods & {"bm3d", "redcnn", "redcnn-batch"}:
        runs.update(run_peers(args.peers_python, out, raw, split, budget_s, sigmas, "redcnn" in methods,
                              args.dry_run, logs, args.redcnn_batch if "redcnn-batch" in methods else None))
        save_report(out, report)

    panels = args.panels if args.panels is not None else not args.dry_run
    (out / "evaluation").mkdir(exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    baseline: dict[str, Any] | None = None
    for name, run in runs.items():
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("σ", "sigma")
        summary = evaluate(Path(run["predict"]["folder"]), folders, out / "evaluation" / slug / "evaluation.json",
                           panels, logs)
        baseline = baseline or scores(summary, "input")
        results[name] = {**scores(summary), "train_wall_s": run["train_wall_s"],
                         "predict_wall_s": run["predict"]["wall_s"]}
        if "details" in run:
            report.setdefault("peers", {})[name] = run["details"]
    if baseline is not None:
        results = {"low-dose input": {**baseline, "train_wall_s": None, "predict_wall_s": None}, **results}
    report["results"] = results
    report["targets"] = "not checked in a dry run" if args.dry_run else targets(results)
    report["machine"]["load_avg_end"] = os.getloadavg()
    caption = (f"{'DRY RUN (plumbing only, not results): ' if args.dry_run else ''}{split['patients']['test']} test "
               f"patients, dose {args.dose:g}, budget {budget_s:g} s per trained method, AAPM window [-160, 240] HU, "
               "mean over test cases (PSNR ± std)")
    table = markdown_table(results, caption)
    save_report(out, report)
    (out / "report.md").write_text(table + "\n")
    print(json.dumps(report, indent=1))
    sys.stderr.write(table + "\n")


if __name__ == "__main__":
    main()
