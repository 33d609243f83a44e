"""The peers of ``bench_denoise_peers.py`` (BM3D, RED-CNN), run in their own Python environment.

    PEERS_PYTHON benchmarks/denoise_peers_worker.py {bm3d,redcnn-train,redcnn-predict} JOB.json

Called by ``benchmarks/bench_denoise_peers.py`` with ``--peers-python``; never imports autoseg. The
job file names a folder of arrays written by the harness — ``{case}_low.npy`` (the low-dose input)
and ``{case}_full.npy`` (the full-dose target), float32 HU, the axial axis first — the train, val
and test cases, the budget and the output folder. Outputs are ``{case}.npy`` (float32 HU, same
layout), which the harness writes back in the input's geometry and pixel type. The last line on
stdout is ``BENCH_RESULT {json}``.

The environment needs ``torch`` (CPU), ``ldct-benchmark`` (installed with ``--no-deps``: only
``ldctbench.methods.redcnn.network`` is imported, whose package ``__init__`` files are empty, so
neither wandb nor torchvision is needed), ``bm3d`` with ``bm4d``, ``scikit-image`` and
``PyWavelets`` (``estimate_sigma``, the fallback of the σ estimate).

RED-CNN is the ldct-benchmark package's network (Chen et al., IEEE TMI 36(12), 2017; the package
drops the final ReLU so that mean/std-normalised data can be negative) trained with the recipe of
its ``configs/redcnn.yaml`` and ``ldctbench.methods.base.BaseTrainer`` (see :data:`REDCNN_CONFIG`
and :func:`train_redcnn`). BM3D is the ``bm3d`` package per axial slice (see :func:`run_bm3d`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: ldct-benchmark's configs/redcnn.yaml (repository eeulig/ldct-benchmark, commit 73b4cef; the
#: file is not in the wheel): the hyper-parameters used here. ``max_iterations`` is replaced by
#: the wall-clock budget; ``cuda``, ``devices``, ``num_workers``, ``dryrun`` and ``valsamples``
#: (wandb image logging) have no counterpart on the CPU here.
REDCNN_CONFIG: dict[str, Any] = {
    "adam_b1": 0.9, "adam_b2": 0.999, "data_norm": "meanstd", "data_subset": 1.0, "iterations_before_val": 1000,
    "lr": 9.583417460320728e-05, "max_iterations": 92994, "mbs": 73, "optimizer": "adam", "patchsize": 128,
    "seed": 1339, "trainer": "redcnn", "eval_patchsize": 128,
}
#: ldctbench.utils.metrics: validation images are clipped to [0, 2924] in its raw units (HU + 1024),
#: i.e. [-1024, 1900] HU, and SSIM uses that data range.
LDCT_VAL_CLIP_HU = (-1024.0, 1900.0)
#: BM3D's block-matching thresholds are set for images on [0, 1] (bm3d: tau_match / 255**2), so the
#: slice is given as (HU - low) / width with the AAPM window [-160, 240] HU mapped onto [0, 1], not
#: clipped (air and bone keep their values outside it).
BM3D_WINDOW_HU = (-160.0, 240.0)
#: Body: above -500 HU (autoseg's CT body threshold); blocks needed for a body-only σ estimate.
BODY_HU = -500.0
MIN_BODY_BLOCKS = 64


def load_job(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_pair(arrays: Path, case: str, target: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The low-dose volume and (optionally) its full-dose target, float32 HU, axial axis first."""
    low = np.load(arrays / f"{case}_low.npy")
    full = np.load(arrays / f"{case}_full.npy") if target else None
    return low, full


def report(result: dict[str, Any]) -> None:
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# BM3D


def bm3d_sigma_estimate(slice_hu: np.ndarray) -> float:
    """Noise standard deviation of one low-dose slice, in HU, estimated from the slice alone.

    Donoho's estimator, as scikit-image's ``estimate_sigma``: median(|HH|) / 0.6745 over the finest
    diagonal wavelet coefficients — here orthonormal Haar, (a - b - c + d) / 2 over 2×2 blocks, whose
    standard deviation is σ for white noise — but only over blocks inside the body (all four pixels
    above -500 HU). Over the whole slice the median is 0 on head-and-neck CT: the air is most of the
    slice, and the simulation (as scanners) clips it at the lowest stored value, so its noise is
    mostly gone. Without 64 body blocks, ``estimate_sigma`` of the whole slice. Like any white-noise
    estimator it reads the highest frequencies only: FBP noise is correlated, so σ may come out low.
    """
    rows, cols = (n - n % 2 for n in slice_hu.shape)
    a, b = slice_hu[0:rows:2, 0:cols:2], slice_hu[0:rows:2, 1:cols:2]
    c, d = slice_hu[1:rows:2, 0:cols:2], slice_hu[1:rows:2, 1:cols:2]
    body = np.minimum(np.minimum(a, b), np.minimum(c, d)) > BODY_HU
    if body.sum() >= MIN_BODY_BLOCKS:
        return float(np.median(np.abs((a - b - c + d)[body] / 2)) / 0.6745)
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(slice_hu, channel_axis=None))


def bm3d_sigma_oracle(low: np.ndarray, full: np.ndarray) -> float:
    """Standard deviation of low - full over the body (full-dose > -500 HU), in HU: an oracle."""
    body = full > BODY_HU
    diff = (low - full)[body] if body.any() else (low - full).ravel()
    return float(diff.std())


def run_bm3d(job: dict[str, Any]) -> dict[str, Any]:
    """Denoise every test case slice by slice with ``bm3d.bm3d`` (profile ``np``), σ per ``job['sigma']``.

    ``estimate``: per slice, :func:`bm3d_sigma_estimate` of the low-dose slice (blind, as BM3D is
    used in practice). ``oracle``: one σ per case from the pair, :func:`bm3d_sigma_oracle` (not
    available to a real denoiser; an upper bound on what a better noise estimate could give).
    """
    import bm3d

    arrays, out = Path(job["arrays"]), Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    low_hu, width = BM3D_WINDOW_HU[0], BM3D_WINDOW_HU[1] - BM3D_WINDOW_HU[0]
    mode = job["sigma"]
    cases: dict[str, Any] = {}
    started = time.perf_counter()
    for case in job["test"]:
        low, full = load_pair(arrays, case, target=mode == "oracle")
        restored = np.empty_like(low)
        oracle = bm3d_sigma_oracle(low, full) / width if mode == "oracle" else None
        sigmas = []
        for k in range(low.shape[0]):
            scaled = (low[k].astype(np.float64) - low_hu) / width
            sigma = oracle if oracle is not None else bm3d_sigma_estimate(low[k].astype(np.float64)) / width
            sigmas.append(sigma * width)
            if not sigma > 0:  # a constant slice (padding only): nothing to denoise
                restored[k] = low[k]
                continue
            restored[k] = (np.asarray(bm3d.bm3d(scaled, sigma), dtype=np.float64) * width + low_hu).astype(np.float32)
        np.save(out / f"{case}.npy", restored)
        cases[case] = {"slices": int(low.shape[0]), "sigma_hu_median": float(np.median(sigmas)),
                       "sigma_hu_min": float(np.min(sigmas)), "sigma_hu_max": float(np.max(sigmas))}
    return {"method": "bm3d", "sigma": mode, "profile": "np", "window_hu_scaled_to_unit": list(BM3D_WINDOW_HU),
            "denoise_s": round(time.perf_counter() - started, 2), "cases": cases}


# ----------------------------------------------------------------------------------------------
# RED-CNN


def redcnn_model() -> Any:
    """ldct-benchmark's RED-CNN (``ldctbench.methods.redcnn.network.Model``, 96 channels)."""
    from argparse import Namespace

    from ldctbench.methods.redcnn.network import Model

    return Model(Namespace())


def norm_stats(arrays: Path, cases: list[str]) -> tuple[float, float]:
    """Mean and std over every voxel of the training pairs (inputs and targets), in HU.

    ldct-benchmark normalises with one dataset mean/std (its data/info.yml, in the Mayo DICOMs'
    stored units); here they are computed on the training cases, padding included as there.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for case in cases:
        for part in ("low", "full"):
            volume = np.load(arrays / f"{case}_{part}.npy").astype(np.float64)
            total += float(volume.sum())
            total_sq += float(np.square(volume).sum())
            count += volume.size
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))


class SliceSampler:
    """Random patches of random axial slices, as ldct-benchmark's loader draws them.

    ``WeightedRandomSampler`` over all slices with weight 1/n_slices of the slice's patient (every
    patient equally likely, then a slice uniformly), with replacement; then ``_random_crop``: the
    same ``patch`` × ``patch`` window of input and target at ``np.random.randint(size - patch)`` per
    axis (no crop when the slice is exactly the patch). Slices smaller than the patch (not in the
    Mayo data) are padded to it with the volume's minimum (air or scanner padding). No augmentation.
    """

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], patch: int) -> None:
        import torch

        self.pairs = pairs
        self.patch = patch
        self.index = [(p, k) for p, (low, _) in enumerate(pairs) for k in range(low.shape[0])]
        self.weights = torch.tensor([1.0 / pairs[p][0].shape[0] for p, _ in self.index], dtype=torch.double)

    def _slice(self, volume: np.ndarray, k: int) -> np.ndarray:
        image = volume[k]
        pad = [(0, max(0, self.patch - n)) for n in image.shape]
        if any(after for _, after in pad):
            image = np.pad(image, [((after) // 2, after - after // 2) for _, after in pad],
                           constant_values=float(volume.min()))
        return image

    def crop(self, p: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        low, full = self.pairs[p]
        x, y = self._slice(low, k), self._slice(full, k)
        if self.patch != x.shape[0] or self.patch != x.shape[1]:
            i = np.random.randint(x.shape[0] - self.patch) if x.shape[0] > self.patch else 0
            j = np.random.randint(x.shape[1] - self.patch) if x.shape[1] > self.patch else 0
            x, y = x[i:i + self.patch, j:j + self.patch], y[i:i + self.patch, j:j + self.patch]
        return x, y

    def batch(self, draws: Any, mean: float, std: float) -> tuple[Any, Any]:
        import torch

        crops = [self.crop(*self.index[int(d)]) for d in draws]
        x = np.stack([c[0] for c in crops])[:, None]
        y = np.stack([c[1] for c in crops])[:, None]
        return torch.from_numpy((x - mean) / std).float(), torch.from_numpy((y - mean) / std).float()


def validate_redcnn(model: Any, sampler: SliceSampler, mbs: int, mean: float, std: float) -> dict[str, float]:
    """ldct-benchmark's validation: as many weighted random 128² crops as there are val slices,
    MSE loss and SSIM/PSNR/RMSE in HU clipped to [-1024, 1900] (data range 2924), mean over batches.

    Its loader drops an incomplete last batch; here the last batch is kept (a small val set would
    otherwise give no batch at all).
    """
    import torch
    from skimage.metrics import structural_similarity

    low_clip, high_clip = LDCT_VAL_CLIP_HU
    data_range = high_clip - low_clip
    draws = torch.multinomial(sampler.weights, len(sampler.index), replacement=True)
    scores: dict[str, list[float]] = {"loss": [], "SSIM": [], "PSNR": [], "RMSE": []}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(draws), mbs):
            x, y = sampler.batch(draws[start:start + mbs], mean, std)
            out = model(x)
            scores["loss"].append(float(torch.nn.functional.mse_loss(out, y)))
            t = np.clip(y.numpy()[:, 0] * std + mean, low_clip, high_clip)
            p = np.clip(out.numpy()[:, 0] * std + mean, low_clip, high_clip)
            mse = np.mean((t - p) ** 2, axis=(1, 2))
            scores["SSIM"].append(float(np.mean([structural_similarity(a, b, data_range=data_range)
                                                 for a, b in zip(t, p)])))
            scores["PSNR"].append(float(np.mean(10 * np.log10(data_range ** 2 / (mse + 1e-10)))))
            scores["RMSE"].append(float(np.mean(np.sqrt(mse))))
    model.train()
    return {key: float(np.mean(values)) for key, values in scores.items()}


def train_redcnn(job: dict[str, Any]) -> dict[str, Any]:
    """Train RED-CNN for ``job['budget_s']`` wall-clock seconds with ldct-benchmark's recipe.

    ``BaseTrainer.fit``: blocks of ``iterations_before_val`` iterations, each block re-seeding torch
    and numpy with ``seed + block``; a batch of ``mbs`` patches (:class:`SliceSampler`), MSE, Adam
    (lr, betas of the config, no weight decay, no schedule); after each block a validation and a
    checkpoint when its SSIM is the best so far. The final model is the best-SSIM checkpoint, as its
    test script loads; when the budget ends before the first validation, the last weights. Training
    stops before an iteration (or a validation) that the last measured one says would overrun the
    budget. The clock starts after the arrays are loaded and the normalisation computed.
    """
    import torch

    config = {**REDCNN_CONFIG, **job.get("overrides", {})}
    arrays, out = Path(job["arrays"]), Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    loaded = time.perf_counter()
    mean, std = norm_stats(arrays, job["train"])
    train = SliceSampler([load_pair(arrays, c) for c in job["train"]], config["patchsize"])  # type: ignore[misc]
    val = SliceSampler([load_pair(arrays, c) for c in job["val"]], config["eval_patchsize"]) if job["val"] else None  # type: ignore[misc]
    load_s = time.perf_counter() - loaded

    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    model = redcnn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(config["adam_b1"], config["adam_b2"]))
    criterion = torch.nn.MSELoss()
    budget, mbs, block = float(job["budget_s"]), int(config["mbs"]), int(config["iterations_before_val"])
    started = time.perf_counter()
    iteration, step_s, val_s, losses = 0, 0.0, 0.0, []
    history: list[dict[str, float]] = []
    best_ssim = -np.inf
    draws = None
    model.train()
    while iteration < config["max_iterations"]:
        elapsed = time.perf_counter() - started
        if elapsed + step_s > budget:
            break
        if iteration % block == 0:
            torch.manual_seed(config["seed"] + iteration // block)
            np.random.seed(config["seed"] + iteration // block)
            draws = torch.multinomial(train.weights, mbs * block, replacement=True)
        offset = (iteration % block) * mbs
        x, y = train.batch(draws[offset:offset + mbs], mean, std)  # type: ignore[index]
        t0 = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iteration += 1
        losses.append(float(loss))
        step_s = time.perf_counter() - t0
        if iteration % block == 0 and val is not None:
            # The first validation's cost is guessed as forward passes at a third of a training step.
            guess = val_s or -(-len(val.index) // mbs) * step_s / 3
            if time.perf_counter() - started + guess > budget:
                break
            t1 = time.perf_counter()
            scores = validate_redcnn(model, val, mbs, mean, std)
            val_s = time.perf_counter() - t1
            history.append({"iteration": iteration, **scores})
            if scores["SSIM"] > best_ssim:
                best_ssim = scores["SSIM"]
                torch.save({"model_state_dict": model.state_dict(), "iteration": iteration}, out / "best_SSIM.pt")
    train_s = time.perf_counter() - started
    chosen = "best_SSIM" if history else "last"
    if not history:
        torch.save({"model_state_dict": model.state_dict(), "iteration": iteration}, out / "best_SSIM.pt")
    (out / "norm.json").write_text(json.dumps({"mean": mean, "std": std}))
    return {"method": "redcnn", "config": config, "norm_mean_hu": mean, "norm_std_hu": std, "iterations": iteration,
            "patches_seen": iteration * mbs, "train_s": round(train_s, 2), "load_s": round(load_s, 2),
            "last_step_s": round(step_s, 3), "first_loss": losses[0] if losses else None,
            "last_loss_mean_10": float(np.mean(losses[-10:])) if losses else None, "validations": history,
            "checkpoint": chosen, "threads": torch.get_num_threads()}


def predict_redcnn(job: dict[str, Any]) -> dict[str, Any]:
    """Apply the trained RED-CNN to every full axial slice of the test cases, one slice at a time
    (as ldct-benchmark's test script; the network is fully convolutional and keeps the size),
    and denormalise to HU."""
    import torch

    out = Path(job["out"])
    state = torch.load(out / "best_SSIM.pt", weights_only=True)
    norm = json.loads((out / "norm.json").read_text())
    mean, std = norm["mean"], norm["std"]
    model = redcnn_model()
    model.load_state_dict(state["model_state_dict"])
    model.eval()
    arrays = Path(job["arrays"])
    started = time.perf_counter()
    with torch.no_grad():
        for case in job["test"]:
            low, _ = load_pair(arrays, case, target=False)
            restored = np.empty_like(low)
            for k in range(low.shape[0]):
                x = torch.from_numpy((low[k][None, None] - mean) / std).float()
                restored[k] = model(x).numpy()[0, 0] * std + mean
            np.save(out / f"{case}.npy", restored)
    return {"method": "redcnn", "iteration": state["iteration"], "predict_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("bm3d", "redcnn-train", "redcnn-predict"))
    parser.add_argument("job", type=Path)
    args = parser.parse_args()
    job = load_job(args.job)
    steps = {"bm3d": run_bm3d, "redcnn-train": train_redcnn, "redcnn-predict": predict_redcnn}
    report(steps[args.step](job))


if __name__ == "__main__":
    main()
