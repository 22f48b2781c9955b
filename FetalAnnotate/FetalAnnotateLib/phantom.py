"""A synthetic pregnancy-MRI phantom, so demos and tests run on a fresh clone without patient data.

The phantom mimics what makes real fetal stacks hard: thick anisotropic slices, a fetus
surrounded by bright amniotic fluid, a placenta of intermediate intensity against the uterine
wall, textured maternal tissue, a smooth bias field, noise, and fetal motion between slices.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

PHANTOM_CLASS_NAMES = {1: "background", 2: "fetus", 3: "placenta"}


@dataclass
class Phantom:
    """A generated volume with its ground truth.

    Attributes
    ----------
    image : ndarray of float32, shape (z, y, x)
        The MR-like intensities.
    label_map : ndarray of uint8, shape (z, y, x)
        Ground truth with the values of ``class_names`` (1 background, 2 fetus, 3 placenta).
    spacing : tuple of float
        Voxel size in mm, (z, y, x) order.
    class_names : dict
        Label value -> class name.
    """

    image: np.ndarray
    label_map: np.ndarray
    spacing: tuple
    class_names: dict = field(default_factory=lambda: dict(PHANTOM_CLASS_NAMES))


def make_phantom(shape=(22, 160, 160), spacing=(3.3, 1.125, 1.125), motion_mm=2.0, noise=0.04, seed=0):
    """Generate a pregnant-abdomen phantom with a fetus and a placenta.

    Parameters
    ----------
    shape : tuple of int, default (22, 160, 160)
        Volume size (z, y, x) in voxels; z is the thick-slice acquisition axis.
    spacing : tuple of float, default (3.3, 1.125, 1.125)
        Voxel size (z, y, x) in mm, as in clinical single-shot T2 stacks.
    motion_mm : float, default 2.0
        Standard deviation of the in-plane fetal displacement between slices.
    noise : float, default 0.04
        Standard deviation of the Rician-like noise, relative to the fluid intensity.
    seed : int, default 0
        Seed of every random choice, for reproducible phantoms.

    Returns
    -------
    Phantom
    """
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing)
    z, y, x = (np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing))
    extent = np.array([n * s for n, s in zip(shape, spacing)], np.float32)
    centre = extent / 2
    zz, yy, xx = np.meshgrid(z - centre[0], y - centre[1], x - centre[2], indexing="ij")

    def ellipsoid(offset, radii, dy=0.0, dx=0.0):
        return (((zz - offset[0]) / radii[0]) ** 2 + ((yy - offset[1] - dy) / radii[1]) ** 2
                + ((xx - offset[2] - dx) / radii[2]) ** 2) <= 1.0

    half = extent / 2
    abdomen = ellipsoid((0, 0, 0), (half[0] * 1.6, half[1] * 0.92, half[2] * 0.95))
    uterus = ellipsoid((0, -half[1] * 0.05, 0), (half[0] * 1.3, half[1] * 0.72, half[2] * 0.75))
    placenta = uterus & ~ellipsoid((0, -half[1] * 0.05, 0), (half[0] * 1.25, half[1] * 0.58, half[2] * 0.75)) \
        & (yy < -half[1] * 0.15)

    # Fetal motion: each slice sees the fetus displaced in-plane, as in single-shot stacks.
    shifts = rng.normal(0.0, motion_mm, size=(shape[0], 2)).astype(np.float32)
    dy = shifts[:, 0][:, None, None]
    dx = shifts[:, 1][:, None, None]
    head = ellipsoid((0, half[1] * 0.15, -half[2] * 0.28), (half[0] * 0.55, half[1] * 0.22, half[2] * 0.2), dy, dx)
    body = ellipsoid((0, half[1] * 0.12, half[2] * 0.2), (half[0] * 0.6, half[1] * 0.2, half[2] * 0.32), dy, dx)
    fetus = (head | body) & uterus & ~placenta

    texture = ndi.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=(0.5, 2.5, 2.5))
    texture /= texture.std() + 1e-6
    image = np.full(shape, 0.03, np.float32)
    image[abdomen] = 0.22 + 0.05 * texture[abdomen]
    image[uterus] = 0.92
    image[placenta] = 0.62 + 0.03 * texture[placenta]
    image[fetus] = 0.45 + 0.05 * texture[fetus]
    image[head & fetus & ellipsoid((0, half[1] * 0.15, -half[2] * 0.28), (half[0] * 0.2, half[1] * 0.08, half[2] * 0.07), dy, dx)] = 0.8

    bias = 1.0 + 0.25 * np.sin(yy / extent[1] * np.pi + 0.4) * np.cos(xx / extent[2] * np.pi)
    image = image * bias.astype(np.float32)
    image = np.hypot(image + rng.normal(0, noise, shape), rng.normal(0, noise, shape)).astype(np.float32)

    label_map = np.ones(shape, np.uint8)
    label_map[placenta] = 3
    label_map[fetus] = 2
    return Phantom(image=(image * 1000).astype(np.float32), label_map=label_map, spacing=spacing)


def scribble(region, erosion=2):
    """A stroke an expert could draw inside a 2D region: its thickened skeleton.

    Parameters
    ----------
    region : ndarray of bool, 2D
        The region to scribble in.
    erosion : int, default 2
        Erode the region this many pixels first, so the stroke keeps off the boundary.

    Returns
    -------
    ndarray of bool
        The stroke, inside ``region``.
    """
    core = ndi.binary_erosion(region, iterations=erosion) if erosion else region
    if core.sum() < 5:
        core = region
    skeleton = skeletonize(core)
    if not skeleton.any():
        skeleton = core
    return ndi.binary_dilation(skeleton) & region


def example_strokes(label_map, slice_index=None):
    """Strokes on one slice of ``label_map``: a scribble in every class, as an expert's first round.

    Parameters
    ----------
    label_map : ndarray of int, shape (z, y, x)
        Ground-truth classes (0 is treated as unlabelled).
    slice_index : int, optional
        The slice to paint; default the middle one.

    Returns
    -------
    ndarray of uint8
        Stroke label array: 0 unpainted, else the class value.
    """
    index = label_map.shape[0] // 2 if slice_index is None else slice_index
    strokes = np.zeros(label_map.shape, np.uint8)
    for value in np.unique(label_map[index]):
        if value == 0:
            continue
        strokes[index][scribble(label_map[index] == value)] = value
    return strokes
