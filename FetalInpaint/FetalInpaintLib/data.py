"""Volumes to training patches: checks, robust normalisation, acquisition-axis slices, split by volume."""

import hashlib
import json

import numpy as np
import torch

from .config import DEFAULT_PERCENTILES
from .errors import FetalInpaintError, InvalidVolumeError


def check_volume(volume, name="volume"):
    """Validate one image volume and return it as a float32 array.

    Parameters
    ----------
    volume : array_like
        2D (y, x) or 3D (z, y, x) image.
    name : str
        How the volume is called in error messages.

    Returns
    -------
    numpy.ndarray
        float32 volume, 3D (a 2D image gets a leading axis of length 1).

    Raises
    ------
    InvalidVolumeError
        None, empty, wrong number of dimensions, or NaN / infinite values.
    """
    if volume is None:
        raise InvalidVolumeError(f"no {name} given: select or load an image volume first.")
    array = np.asarray(volume, dtype=np.float32)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.size == 0:
        raise InvalidVolumeError(f"{name} must be a non-empty 2D or 3D image, got shape {array.shape}.")
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise InvalidVolumeError(
            f"{name} holds {count} NaN or infinite voxels; replace them (e.g. numpy.nan_to_num) or crop them away first."
        )
    return array


def normalize_intensity(volume, percentiles=DEFAULT_PERCENTILES):
    """Robust per-volume scaling to [0, 1]: the given percentiles map to 0 and 1, then clip.

    Parameters
    ----------
    volume : array_like
    percentiles : (float, float), default (0.5, 99.5)
        Lower and upper percentile of the volume's own intensities (outliers beyond are clipped).

    Returns
    -------
    normalized : numpy.ndarray (float32)
    params : dict
        ``{"method": "percentile", "percentiles": [...], "low": float, "high": float}``, enough to
        reproduce the mapping.
    """
    array = np.asarray(volume, dtype=np.float32)
    low, high = np.percentile(array, percentiles).astype(np.float64)
    if not high > low:  # constant volume: map everything to 0 rather than divide by zero
        high = low + 1.0
    normalized = np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    params = {"method": "percentile", "percentiles": [float(p) for p in percentiles], "low": float(low), "high": float(high)}
    return normalized, params


def acquisition_axis(spacing, shape=None):
    """Index (in z, y, x order) of the axis the volume is sliced along: the one with the largest spacing.

    Thick-slice stacks are sliced along their acquisition (thickest) axis so every 2D slice is a
    sharp in-plane image. For isotropic volumes (spacings within 1 %) the default is axis 0, the
    first array axis (axial for the usual z, y, x arrays). A single image (one axis of length 1,
    whatever its spacing) is sliced along that axis: it is its one slice.

    Parameters
    ----------
    spacing : sequence of 3 float
        Voxel spacing in z, y, x order (mm).
    shape : sequence of 3 int or None
        Array shape (z, y, x); needed to recognise a single image.

    Returns
    -------
    int
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise InvalidVolumeError(f"spacing must be 3 positive numbers (z, y, x), got {spacing.tolist()}.")
    if shape is not None and list(shape).count(1) == 1:
        return list(shape).index(1)
    if spacing.max() <= spacing.min() * 1.01:
        return 0
    return int(np.argmax(spacing))


def slices_along(volume, axis):
    """The volume's 2D slices along ``axis`` as an array (n_slices, rows, cols)."""
    return np.moveaxis(np.asarray(volume), axis, 0)


def extract_patches(image_slices, patch_size=64, stride=32, min_foreground=0.1, foreground_level=0.05):
    """Square patches on a regular grid of every slice, skipping nearly empty ones.

    Parameters
    ----------
    image_slices : numpy.ndarray
        (n_slices, rows, cols), normalised to [0, 1].
    patch_size : int, default 64
    stride : int, default 32
    min_foreground : float, default 0.1
        Keep a patch only if at least this fraction of its pixels exceeds ``foreground_level``
        (skull-stripped atlases are mostly zero background; empty patches teach nothing).
    foreground_level : float, default 0.05

    Returns
    -------
    patches : numpy.ndarray
        (n_patches, patch_size, patch_size) float32.
    positions : numpy.ndarray
        (n_patches, 3) int: slice, row, col of each patch's top-left corner.
    """
    if patch_size < 4 or stride < 1:
        raise FetalInpaintError(f"patch_size must be >= 4 and stride >= 1, got {patch_size} and {stride}.")
    n_slices, rows, cols = image_slices.shape
    if rows < patch_size or cols < patch_size:
        raise InvalidVolumeError(
            f"slices of {rows}x{cols} pixels are smaller than one {patch_size}x{patch_size} patch; "
            "use a smaller patch size."
        )
    starts_r = np.arange(0, rows - patch_size + 1, stride)
    starts_c = np.arange(0, cols - patch_size + 1, stride)
    windows = np.lib.stride_tricks.sliding_window_view(image_slices, (patch_size, patch_size), axis=(1, 2))
    windows = windows[:, starts_r][:, :, starts_c]  # (n_slices, n_r, n_c, P, P)
    foreground = (windows > foreground_level).mean(axis=(-1, -2))
    keep = np.argwhere(foreground >= min_foreground)
    patches = windows[keep[:, 0], keep[:, 1], keep[:, 2]].astype(np.float32)
    positions = np.stack([keep[:, 0], starts_r[keep[:, 1]], starts_c[keep[:, 2]]], axis=1)
    return patches, positions


def volume_patches(volume, spacing, patch_size=64, stride=32, percentiles=DEFAULT_PERCENTILES, min_foreground=0.1):
    """Normalise a volume, slice it along its acquisition axis and cut patches.

    Parameters
    ----------
    volume : array_like (z, y, x)
    spacing : sequence of 3 float (z, y, x) mm
    patch_size, stride, min_foreground
        See :func:`extract_patches`.
    percentiles : (float, float)
        See :func:`normalize_intensity`.

    Returns
    -------
    patches : numpy.ndarray (n, P, P) float32
    info : dict
        ``axis`` (slicing axis) and ``normalization`` parameters.
    """
    array = check_volume(volume)
    axis = acquisition_axis(spacing, array.shape)
    normalized, params = normalize_intensity(array, percentiles)
    patches, _ = extract_patches(slices_along(normalized, axis), patch_size, stride, min_foreground)
    return patches, {"axis": axis, "normalization": params}


def split_by_volume(volume_ids, val_fraction=0.2, seed=0):
    """Train / validation split of whole volumes (never patches of one volume in both sets).

    Parameters
    ----------
    volume_ids : sequence of str
        One unique identifier per volume (e.g. file name).
    val_fraction : float, default 0.2
        Fraction of volumes for validation; at least one volume when there are two or more,
        none when there is a single volume.
    seed : int, default 0

    Returns
    -------
    train_ids, val_ids : list of str
    split_hash : str
        First 16 hex digits of SHA-256 of the sorted id lists: identical splits share a hash.
    """
    ids = sorted(str(v) for v in volume_ids)  # the split depends on the set of ids, not their order
    if not ids:
        raise InvalidVolumeError("no volume given: training needs at least one volume.")
    if len(set(ids)) != len(ids):
        raise FetalInpaintError(f"volume ids must be unique, got duplicates in {ids}.")
    if not 0.0 <= val_fraction < 1.0:
        raise FetalInpaintError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = 0 if len(ids) < 2 or val_fraction == 0 else max(1, int(round(val_fraction * len(ids))))
    n_val = min(n_val, len(ids) - 1)
    val_ids = sorted(ids[i] for i in order[:n_val])
    train_ids = sorted(ids[i] for i in order[n_val:])
    return train_ids, val_ids, split_hash(train_ids, val_ids)


def split_hash(train_ids, val_ids):
    """Stable hash of a split (independent of order)."""
    payload = json.dumps({"train": sorted(train_ids), "val": sorted(val_ids)}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


class PatchDataset(torch.utils.data.Dataset):
    """Clean patches as (1, P, P) float tensors; corruption happens batched on the device.

    Parameters
    ----------
    patches : numpy.ndarray or torch.Tensor
        (n, P, P) float32 in [0, 1].
    """

    def __init__(self, patches):
        self.patches = torch.as_tensor(np.ascontiguousarray(patches), dtype=torch.float32).unsqueeze(1)

    def __len__(self):
        return self.patches.shape[0]

    def __getitem__(self, index):
        return self.patches[index]
