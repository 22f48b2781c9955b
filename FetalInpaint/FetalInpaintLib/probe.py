"""Patch probe: how well do features separate patches inside vs outside an expert mask?

Patches are labelled from the mask (inside: at least ``positive_fraction`` of the patch in the
mask; outside: no mask pixel; in-between patches are dropped), classifiers are cross-validated
leaving one volume out (never patches of the test volume in training), and balanced accuracy and
AUROC are reported as mean ± sd over folds.
"""

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .data import acquisition_axis, check_volume, extract_patches, normalize_intensity, slices_along
from .errors import FetalInpaintError


def labelled_patches(volume, mask, spacing, patch_size=32, stride=8, positive_fraction=0.5, negatives_per_positive=3.0,
                     min_foreground=0.1, seed=0):
    """Normalised patches along the acquisition axis with inside / outside labels.

    Parameters
    ----------
    volume : array_like (z, y, x)
    mask : array_like of bool, same shape
    spacing : sequence of 3 float
    patch_size, stride : int
    positive_fraction : float, default 0.5
    negatives_per_positive : float, default 3
        Outside patches are randomly subsampled to at most this many per inside patch.
    min_foreground : float
    seed : int

    Returns
    -------
    dict
        ``patches`` (n, P, P), ``labels`` (n,) int, ``positions`` (n, 3), ``slices`` (the
        normalised slices) and ``axis``.
    """
    array = check_volume(volume)
    mask = np.asarray(mask, bool)
    if mask.shape != array.shape:
        raise FetalInpaintError(f"mask shape {mask.shape} differs from the volume shape {array.shape}.")
    normalized, _ = normalize_intensity(array)
    axis = acquisition_axis(spacing, array.shape)
    slices = np.ascontiguousarray(slices_along(normalized, axis))
    patches, positions = extract_patches(slices, patch_size, stride, min_foreground)
    mask_slices = slices_along(mask, axis).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(mask_slices, (patch_size, patch_size), axis=(1, 2))
    fraction = windows[positions[:, 0], positions[:, 1], positions[:, 2]].mean(axis=(-1, -2))
    inside, outside = np.flatnonzero(fraction >= positive_fraction), np.flatnonzero(fraction == 0)
    rng = np.random.default_rng(seed)
    n_outside = min(len(outside), int(np.ceil(negatives_per_positive * max(len(inside), 1))))
    outside = np.sort(rng.choice(outside, n_outside, replace=False))
    keep = np.concatenate([inside, outside])
    labels = np.concatenate([np.ones(len(inside), int), np.zeros(len(outside), int)])
    return {"patches": patches[keep], "labels": labels, "positions": positions[keep], "slices": slices, "axis": axis}


def latent_features(model, patches, batch_size=256):
    """Bottleneck of each patch encoded on its own, averaged over its cells: (n, C)."""
    model = model.eval()
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for start in range(0, len(patches), batch_size):
            x = torch.as_tensor(patches[start : start + batch_size], dtype=torch.float32).unsqueeze(1).to(device)
            outputs.append(model.encode(x).float().mean(dim=(2, 3)).cpu())
    return torch.cat(outputs).numpy()


def dense_latent_features(model, slices, positions, patch_size, batch_size=4):
    """Whole-slice bottleneck averaged over the cells each patch covers (context beyond the patch): (n, C)."""
    model = model.eval()
    device = next(model.parameters()).device
    scale = 2**model.depth
    codes = []
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            x = torch.as_tensor(slices[start : start + batch_size], dtype=torch.float32).unsqueeze(1).to(device)
            codes.append(model.encode(x).float().cpu())
    codes = torch.cat(codes).numpy()  # (n_slices, C, h, w)
    out = np.empty((len(positions), codes.shape[1]), np.float32)
    for i, (s, r, c) in enumerate(positions):
        r0, c0 = r // scale, c // scale
        r1, c1 = max(r0 + 1, (r + patch_size) // scale), max(c0 + 1, (c + patch_size) // scale)
        out[i] = codes[s, :, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def window_means(feature_volume, axis, positions, patch_size):
    """Mean of each channel of a (z, y, x, n) feature volume over every patch window: (n_patches, n)."""
    slices = np.moveaxis(feature_volume, axis, 0)
    integral = np.pad(slices.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0), (0, 0)))
    s, r, c = positions[:, 0], positions[:, 1], positions[:, 2]
    p = patch_size
    total = integral[s, r + p, c + p] - integral[s, r, c + p] - integral[s, r + p, c] + integral[s, r, c]
    return (total / (p * p)).astype(np.float32)


def raw_features(patches, size=16):
    """Raw pixels, block-averaged to ``size`` x ``size`` (keeps forests and linear probes tractable)."""
    n, p, _ = patches.shape
    factor = max(1, p // size)
    trimmed = patches[:, : factor * (p // factor), : factor * (p // factor)]
    blocks = trimmed.reshape(n, p // factor, factor, p // factor, factor).mean(axis=(2, 4))
    return blocks.reshape(n, -1).astype(np.float32)


def make_classifier(name, seed=0):
    """"random_forest" (200 trees, balanced class weights) or "linear" (standardised logistic regression)."""
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=200, class_weight="balanced", n_jobs=2, random_state=seed)
    if name == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000))
    raise FetalInpaintError(f"unknown classifier {name!r}; use 'random_forest' or 'linear'.")


def cross_validate(features, labels, groups, classifier="random_forest", seed=0):
    """Leave-one-group-out balanced accuracy and AUROC.

    Parameters
    ----------
    features : numpy.ndarray (n, d)
    labels : numpy.ndarray (n,) of {0, 1}
    groups : numpy.ndarray (n,)
        Volume of each patch; each fold tests one volume.
    classifier : {"random_forest", "linear"}
    seed : int

    Returns
    -------
    dict
        ``balanced_accuracy`` and ``auroc`` as (mean, sd) over folds, and per-fold lists.
    """
    if len(np.unique(groups)) < 2:
        raise FetalInpaintError("the probe needs patches of at least two volumes (cross-validation by volume).")
    accuracy, auroc = [], []
    for train_index, test_index in LeaveOneGroupOut().split(features, labels, groups):
        model = make_classifier(classifier, seed).fit(features[train_index], labels[train_index])
        scores = model.predict_proba(features[test_index])[:, 1]
        accuracy.append(balanced_accuracy_score(labels[test_index], scores >= 0.5))
        auroc.append(roc_auc_score(labels[test_index], scores) if len(np.unique(labels[test_index])) == 2 else np.nan)
    return {
        "balanced_accuracy": (float(np.mean(accuracy)), float(np.std(accuracy))),
        "auroc": (float(np.nanmean(auroc)), float(np.nanstd(auroc))),
        "folds_balanced_accuracy": [float(a) for a in accuracy],
        "folds_auroc": [float(a) for a in auroc],
    }
