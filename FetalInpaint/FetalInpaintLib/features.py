"""Feature export: dense per-voxel encoder features, per-patch embeddings, t-SNE plots.

The dense maps are what FetalAnnotate takes as ``extra_features`` of shape (C, *image.shape):
the encoder runs on every whole slice along the acquisition axis, its bottleneck (1 / 2**depth of
the slice resolution) is optionally reduced by PCA, then bilinearly upsampled to the slice grid.
PCA is fitted and applied on the low-resolution bottleneck cells, at a fraction of the memory and
time of the upsampled map: the projection commutes with bilinear upsampling (weights summing to
1), though the basis fitted on the cells is not the one a fit on the upsampled map would give.
"""

import csv

import numpy as np
import torch
import torch.nn.functional as F

from .data import acquisition_axis, check_volume, extract_patches, normalize_intensity, slices_along
from .errors import FetalInpaintError, InvalidVolumeError


def _normalized_slices(volume, spacing, metadata):
    """Normalised slices along the training's slicing axis; refused where training would refuse them."""
    array = check_volume(volume)
    axis = acquisition_axis(spacing, array.shape)
    rows, cols = (size for index, size in enumerate(array.shape) if index != axis)
    patch_size = int(metadata.get("patch_size", 1))
    if min(rows, cols) < patch_size:
        raise InvalidVolumeError(
            f"the slices of the volume are {rows} x {cols} voxels, smaller than the {patch_size} x {patch_size} "
            "patches the model was trained on: use a larger volume."
        )
    percentiles = tuple(metadata.get("normalization", {}).get("percentiles", (0.5, 99.5)))
    normalized, _ = normalize_intensity(array, percentiles)
    return np.ascontiguousarray(slices_along(normalized, axis)), axis


def _bottlenecks(model, slices, device, batch_size, progress=None):
    """(n, C, h, w) float32 bottleneck of every slice."""
    outputs = []
    model = model.to(device).eval()
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            x = torch.as_tensor(slices[start : start + batch_size]).unsqueeze(1).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                outputs.append(model.encode(x).float().cpu())
            if progress is not None:
                progress(min(1.0, (start + batch_size) / len(slices)) * 0.8, "encoding slices")
    return torch.cat(outputs)


def encode_volume(model, volume, spacing, metadata, pca_components=None, progress=None, device=None, batch_size=4,
                  random_state=0):
    """Dense encoder feature maps on the voxel grid of ``volume``.

    Parameters
    ----------
    model : InpaintingAutoencoder
    volume : array_like (z, y, x)
    spacing : sequence of 3 float
        z, y, x in mm; decides the slicing (acquisition) axis as in training.
    metadata : dict
        Checkpoint metadata (its intensity normalisation is applied).
    pca_components : int or None
        Keep this many principal components (fitted on this volume); None = all bottleneck
        channels (C x the volume's size in float32: ~2.3 GB for 256 channels of 320x320x22; the
        command line's ``export`` peaks at about twice that while writing the file).
    progress : callable or None
        ``progress(fraction, message)``.
    device : str or None
        None = the model's device.
    batch_size : int, default 4
        Slices encoded at once.
    random_state : int, default 0
        PCA solver seed.

    Returns
    -------
    numpy.ndarray
        float32 (C, z, y, x), C = ``pca_components`` or the bottleneck channels.
    """
    device = device or next(model.parameters()).device
    slices, axis = _normalized_slices(volume, spacing, metadata)
    codes = _bottlenecks(model, slices, device, batch_size, progress)  # (n, C, h, w)
    n, channels, h, w = codes.shape
    if pca_components:
        from sklearn.decomposition import PCA

        k = int(pca_components)
        if not 1 <= k <= channels:
            raise FetalInpaintError(f"pca_components must be between 1 and {channels}, got {pca_components}.")
        table = codes.permute(0, 2, 3, 1).reshape(-1, channels).numpy()
        reduced = PCA(n_components=min(k, len(table)), random_state=random_state).fit_transform(table)
        codes = torch.as_tensor(reduced.astype(np.float32)).reshape(n, h, w, -1).permute(0, 3, 1, 2)
        channels = codes.shape[1]
    scale = 2**model.depth
    rows, cols = slices.shape[1:]
    out = np.empty((channels, n, rows, cols), np.float32)
    for start in range(0, n, batch_size):
        # Cell (i, j) covers pixels [i*scale, (i+1)*scale): align_corners=False puts its value at the cell centre.
        up = F.interpolate(codes[start : start + batch_size], size=(h * scale, w * scale), mode="bilinear", align_corners=False)
        out[:, start : start + batch_size] = up[:, :, :rows, :cols].permute(1, 0, 2, 3).numpy()
    if progress is not None:
        progress(1.0, "features ready")
    # Slices were stacked along ``axis``: put it back so the map matches the volume's (z, y, x).
    return np.moveaxis(out, 1, 1 + axis)


def write_feature_volume(features, spacing, path, origin=(0.0, 0.0, 0.0)):
    """Write (C, z, y, x) features as one vector image (NRRD, NIfTI... by extension) with SimpleITK."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.moveaxis(np.asarray(features, np.float32), 0, -1), isVector=True)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(image, str(path))
    return str(path)


def patch_embeddings(model, volume, spacing, metadata, mask=None, patch_size=None, stride=None, min_foreground=0.1,
                     device=None, batch_size=256):
    """One embedding per patch: the patch's bottleneck, averaged over its cells.

    Parameters
    ----------
    model : InpaintingAutoencoder
    volume : array_like (z, y, x)
    spacing : sequence of 3 float
    metadata : dict
        Checkpoint metadata (normalisation, default patch size).
    mask : array_like of bool or None
        Same shape as ``volume``; its fraction inside each patch goes into the table.
    patch_size, stride : int or None
        Default: the training patch size and half of it.
    min_foreground : float
    device : str or None
    batch_size : int

    Returns
    -------
    dict
        ``positions`` (n, 3) slice/row/col along the acquisition axis, ``mask_fraction`` (n,)
        (NaN without a mask), ``embeddings`` (n, C) float32.
    """
    patch_size = int(patch_size or metadata.get("patch_size", 48))
    stride = int(stride or max(1, patch_size // 2))
    slices, axis = _normalized_slices(volume, spacing, metadata)
    patches, positions = extract_patches(slices, patch_size, stride, min_foreground)
    if mask is not None:
        mask_slices = slices_along(np.asarray(mask, bool), axis).astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(mask_slices, (patch_size, patch_size), axis=(1, 2))
        fraction = windows[positions[:, 0], positions[:, 1], positions[:, 2]].mean(axis=(-1, -2))
    else:
        fraction = np.full(len(patches), np.nan)
    device = device or next(model.parameters()).device
    codes = _bottlenecks(model, patches, device, batch_size)
    return {"positions": positions, "mask_fraction": fraction.astype(np.float32),
            "embeddings": codes.mean(dim=(2, 3)).numpy().astype(np.float32)}


def write_embedding_csv(table, path):
    """CSV with columns slice,row,col,mask_fraction,e0..e{C-1} of a :func:`patch_embeddings` table."""
    embeddings = table["embeddings"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slice", "row", "col", "mask_fraction"] + [f"e{i}" for i in range(embeddings.shape[1])])
        for position, fraction, embedding in zip(table["positions"], table["mask_fraction"], embeddings):
            writer.writerow([*map(int, position), f"{fraction:.4f}", *(f"{v:.6g}" for v in embedding)])
    return str(path)


def plot_embedding(embeddings, labels, path, label_names=("outside mask", "inside mask"), perplexity=30.0,
                   random_state=0, title="t-SNE of patch embeddings"):
    """t-SNE scatter of embeddings coloured by a binary (or integer) label; writes a PNG.

    Parameters
    ----------
    embeddings : numpy.ndarray (n, C)
    labels : array_like (n,)
        e.g. ``mask_fraction >= 0.5``.
    path : str or Path
    label_names : sequence of str
    perplexity : float, default 30
        Lowered automatically for fewer than 4 x perplexity points.
    random_state : int, default 0
    title : str

    Returns
    -------
    numpy.ndarray (n, 2)
        The t-SNE coordinates.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels).astype(int)
    if len(embeddings) < 5:
        raise FetalInpaintError(f"t-SNE needs at least 5 patches, got {len(embeddings)}.")
    perplexity = min(perplexity, (len(embeddings) - 1) / 3.0)
    scaled = StandardScaler().fit_transform(embeddings)
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state).fit_transform(scaled)
    figure = Figure(figsize=(5, 5), dpi=100)
    axes = figure.add_subplot()
    for value in np.unique(labels):
        chosen = labels == value
        name = label_names[value] if 0 <= value < len(label_names) else str(value)
        axes.scatter(coords[chosen, 0], coords[chosen, 1], s=6, alpha=0.7, label=f"{name} ({chosen.sum()})")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return coords
