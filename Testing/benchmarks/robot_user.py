"""The robot-user protocol of the benchmark (same rules as the reference harness ../shared/bench/robot.py).

Round 0 paints ONE 2D slice: the one with the largest target area along the acquisition
axis. Foreground = the skeleton of the target eroded by 2 voxels (dilated by 1, kept inside
the target); background = a ring 4-6 voxels outside the target plus the skeleton of the
background farther than 15 voxels (eroded by 5). Each later round adds ONE stroke on the
largest connected error blob, on the blob's largest slice: the skeleton of the blob,
foreground when the blob is mostly target (a miss), background otherwise.
Stroke values: 0 unpainted, 1 background, 2 foreground.
"""

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from FetalAnnotateLib.metrics import dice  # noqa: F401  (the score every method is given, re-exported here)

BACKGROUND = 1
FOREGROUND = 2


def acquisition_axis(spacing, anisotropy_ratio=1.5):
    """Axis of the largest spacing for thick-slice stacks, else 0 (as the reference harness)."""
    if max(spacing) > anisotropy_ratio * min(spacing):
        return int(np.argmax(spacing))
    return 0


def largest_slice(mask, axis):
    """Index along ``axis`` of the slice with the most True voxels, and its 3D slicing tuple."""
    other_axes = tuple(a for a in range(mask.ndim) if a != axis)
    index = int(np.argmax(mask.sum(axis=other_axes)))
    where = [slice(None)] * mask.ndim
    where[axis] = index
    return index, tuple(where)


def skeleton_stroke(region):
    """Stroke drawn inside a 2D region: skeleton of the region eroded by 2, dilated by 1."""
    core = ndi.binary_erosion(region, iterations=2)
    if core.sum() < 5:
        core = region
    skeleton = skeletonize(core)
    if skeleton.sum() == 0:
        skeleton = core
    return ndi.binary_dilation(skeleton) & region


def initial_strokes(target, axis):
    """Round-0 strokes of the robot user on the target's largest slice.

    Parameters
    ----------
    target : ndarray of bool, shape (z, y, x)
        Ground-truth mask.
    axis : int
        Acquisition axis (see :func:`acquisition_axis`).

    Returns
    -------
    ndarray of uint8, shape (z, y, x)
        0 unpainted, 1 background, 2 foreground.
    """
    strokes = np.zeros(target.shape, np.uint8)
    _, where = largest_slice(target, axis)
    plane = target[where]
    foreground = skeleton_stroke(plane)
    ring = ndi.binary_dilation(plane, iterations=6) & ~ndi.binary_dilation(plane, iterations=4)
    far = ndi.binary_erosion(~ndi.binary_dilation(plane, iterations=15), iterations=5)
    background = ring | (skeletonize(far) if far.any() else far)
    painted = np.zeros(plane.shape, np.uint8)
    painted[background] = BACKGROUND
    painted[foreground] = FOREGROUND
    strokes[where] = painted
    return strokes


def add_correction_stroke(strokes, target, prediction, axis):
    """Paint one correction stroke on the largest error blob, in place.

    Parameters
    ----------
    strokes : ndarray of uint8, shape (z, y, x)
        Current strokes; modified in place.
    target, prediction : ndarray of bool, shape (z, y, x)
    axis : int
        Acquisition axis.

    Returns
    -------
    bool
        False when the prediction has no error (nothing painted).
    """
    error = prediction != target
    components, count = ndi.label(error)
    if count == 0:
        return False
    sizes = ndi.sum_labels(error, components, index=np.arange(1, count + 1))
    blob = components == int(np.argmax(sizes)) + 1
    _, where = largest_slice(blob, axis)
    region = blob[where]
    stroke = skeleton_stroke(region)
    is_miss = bool(target[where][region].mean() > 0.5)
    plane = strokes[where].copy()
    plane[stroke] = FOREGROUND if is_miss else BACKGROUND
    strokes[where] = plane
    return True
