"""Inpainting quality on held-out volumes: PSNR and SSIM, model vs mean fill vs biharmonic.

Intensities are compared after the per-volume percentile normalisation used for training
(0.5th -> 0, 99.5th percentile -> 1, clipped), so the data range of PSNR and SSIM is 1.0.
PSNR pools the squared error of all hidden pixels (or all pixels) of all evaluated patches of one
seed: ``10 log10(1 / MSE)``. SSIM uses scikit-image's 7x7 Gaussian-free window; the hidden-region
SSIM averages the SSIM map over hidden pixels. Each seed draws new corruptions of the same
patches; tables report mean ± sd over seeds.
"""

import numpy as np
import torch
from skimage.metrics import structural_similarity
from skimage.restoration import inpaint_biharmonic

from .corruptors import make_corruptor
from .data import check_volume, volume_patches

DATA_RANGE = 1.0
METHODS = ("model", "mean", "biharmonic")


def psnr(reference, estimate, mask=None, data_range=DATA_RANGE):
    """Peak signal-to-noise ratio in dB over ``mask`` (all pixels when None)."""
    error = (np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)) ** 2
    mse = error[mask].mean() if mask is not None else error.mean()
    return float(10.0 * np.log10(data_range**2 / max(mse, 1e-12)))


def ssim_pair(reference, estimate, mask, data_range=DATA_RANGE):
    """(whole-image SSIM, mean SSIM over hidden pixels) of one 2D image pair."""
    whole, ssim_map = structural_similarity(reference, estimate, data_range=data_range, full=True)
    return float(whole), float(ssim_map[mask].mean()) if mask.any() else float("nan")


def mean_fill(corrupted, mask):
    """Hidden pixels set to the mean of the visible ones."""
    filled = corrupted.copy()
    filled[mask] = corrupted[~mask].mean() if (~mask).any() else 0.0
    return filled


def biharmonic_fill(corrupted, mask):
    """scikit-image biharmonic inpainting of the hidden pixels."""
    return inpaint_biharmonic(corrupted, mask).astype(np.float32)


def model_fill(model, corrupted, masks, device="cpu", batch_size=128):
    """Inpaint a stack of 2D patches with a trained model (visible pixels kept).

    Parameters
    ----------
    model : InpaintingAutoencoder
    corrupted : numpy.ndarray (n, H, W)
    masks : numpy.ndarray (n, H, W) bool
    device : str
    batch_size : int

    Returns
    -------
    numpy.ndarray (n, H, W) float32
    """
    model = model.to(device).eval()
    out = np.empty_like(corrupted, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(corrupted), batch_size):
            x = torch.as_tensor(corrupted[start : start + batch_size], dtype=torch.float32).unsqueeze(1).to(device)
            m = torch.as_tensor(masks[start : start + batch_size]).unsqueeze(1).to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                _, filled = model.inpaint(x, m)
            out[start : start + batch_size] = filled.float().clamp(0, 1).squeeze(1).cpu().numpy()
    return out


def held_out_patches(volumes, patch_size, percentiles=(0.5, 99.5), max_patches=300, min_foreground=0.25, seed=0):
    """Non-overlapping normalised patches of held-out volumes (a fixed random subset).

    Parameters
    ----------
    volumes : sequence of (array, spacing)
    patch_size : int
    percentiles : (float, float)
    max_patches : int
        Patches kept in total (biharmonic inpainting costs ~10 ms per patch).
    min_foreground : float
        Fraction of tissue a patch needs (evaluating empty background flatters every method).
    seed : int

    Returns
    -------
    numpy.ndarray (n, P, P) float32
    """
    parts = [
        volume_patches(check_volume(array), spacing, patch_size, patch_size, percentiles, min_foreground)[0]
        for array, spacing in volumes
    ]
    patches = np.concatenate(parts)
    order = np.random.default_rng(seed).permutation(len(patches))[:max_patches]
    return patches[np.sort(order)]


def evaluate_inpainting(model, patches, corruptors=("shapes", "holes", "toss"), strength=0.2, seeds=(0, 1, 2),
                        methods=METHODS, device="cpu"):
    """Inpainting metrics per corruptor and method, mean ± sd over seeds.

    Parameters
    ----------
    model : InpaintingAutoencoder or None
        None skips the "model" method.
    patches : numpy.ndarray (n, P, P)
        Clean normalised patches (see :func:`held_out_patches`).
    corruptors : sequence of str
    strength : float
        Hidden fraction.
    seeds : sequence of int
    methods : sequence of {"model", "mean", "biharmonic"}
    device : str

    Returns
    -------
    list of dict
        One row per (corruptor, method): ``psnr_hidden``, ``psnr_whole``, ``ssim_hidden``,
        ``ssim_whole`` as ``(mean, sd)`` tuples, plus ``n_patches`` and ``seeds``.
    """
    methods = [m for m in methods if m != "model" or model is not None]
    rows = []
    for name in corruptors:
        corrupt = make_corruptor(name, strength=strength)
        scores = {method: {key: [] for key in ("psnr_hidden", "psnr_whole", "ssim_hidden", "ssim_whole")} for method in methods}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            pairs = [corrupt(patch, rng) for patch in patches]
            corrupted = np.stack([c for c, _ in pairs]).astype(np.float32)
            masks = np.stack([m for _, m in pairs])
            for method in methods:
                if method == "model":
                    filled = model_fill(model, corrupted, masks, device)
                elif method == "mean":
                    filled = np.stack([mean_fill(c, m) for c, m in zip(corrupted, masks)])
                else:
                    filled = np.stack([biharmonic_fill(c, m) for c, m in zip(corrupted, masks)])
                ssim = np.array([ssim_pair(p, f, m) for p, f, m in zip(patches, filled, masks)])
                scores[method]["psnr_hidden"].append(psnr(patches, filled, masks))
                scores[method]["psnr_whole"].append(psnr(patches, filled))
                scores[method]["ssim_whole"].append(float(np.nanmean(ssim[:, 0])))
                scores[method]["ssim_hidden"].append(float(np.nanmean(ssim[:, 1])))
        for method in methods:
            row = {"corruptor": name, "method": method, "n_patches": len(patches), "seeds": list(seeds)}
            row.update({key: (float(np.mean(v)), float(np.std(v))) for key, v in scores[method].items()})
            rows.append(row)
    return rows


def format_table(rows):
    """Markdown table of :func:`evaluate_inpainting` rows."""
    lines = [
        "| corruptor | method | PSNR hidden (dB) | PSNR whole (dB) | SSIM hidden | SSIM whole |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['corruptor']} | {row['method']} | {row['psnr_hidden'][0]:.2f} ± {row['psnr_hidden'][1]:.2f} | "
            f"{row['psnr_whole'][0]:.2f} ± {row['psnr_whole'][1]:.2f} | {row['ssim_hidden'][0]:.3f} ± {row['ssim_hidden'][1]:.3f} | "
            f"{row['ssim_whole'][0]:.3f} ± {row['ssim_whole'][1]:.3f} |"
        )
    return "\n".join(lines)
