"""Corruptions for the inpainting pretext task: classic holes, random shapes, biased toss.

Every corruptor returns ``(corrupted, mask)`` where ``mask`` is True on hidden pixels and the
hidden pixels of ``corrupted`` hold ``fill``. The numpy functions work on one 2D image and are
reproducible from a seed or a ``numpy.random.Generator``; :func:`corrupt_batch` does the same on a
batch of torch tensors on any device, so training corrupts on the GPU without a host round trip.
Both share one implementation (the numpy functions call the torch core on the CPU), so a given
corruptor hides the same kind of regions in training and in evaluation.
"""

import math
from functools import partial

import numpy as np
import torch

from .errors import FetalInpaintError

SHAPE_KINDS = ("circle", "triangle", "square")


def _as_generator(rng):
    """A ``numpy.random.Generator`` from a Generator, a seed or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_fraction(value, name):
    if not 0.0 <= float(value) < 1.0:
        raise FetalInpaintError(f"{name} must be in [0, 1), got {value}; it is the fraction of pixels to hide.")
    return float(value)


def _rand(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device)


def _square_masks(batch, count, height, width, size, generator, device):
    """``make_mask(k)`` -> (batch, 1, H, W) mask of the k-th ``size`` x ``size`` square inside the image."""
    size_y, size_x = min(size, height), min(size, width)
    top = torch.floor(_rand((count, batch, 1, 1, 1), generator, device) * (height - size_y + 1))
    left = torch.floor(_rand((count, batch, 1, 1, 1), generator, device) * (width - size_x + 1))
    yy = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xx = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)

    def make_mask(k):
        return (yy >= top[k]) & (yy < top[k] + size_y) & (xx >= left[k]) & (xx < left[k] + size_x)

    return make_mask


def _shape_masks(batch, count, height, width, size, kinds, generator, device):
    """``make_mask(k)`` -> (batch, 1, H, W) mask of the k-th circle, triangle or square.

    Diameters span size/2..size; triangles are equilateral with a random rotation.
    """
    yy = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1) + 0.5
    xx = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width) + 0.5
    params = _rand((5, count, batch, 1, 1, 1), generator, device)
    centre_y, centre_x = params[0] * height, params[1] * width
    radii = (0.5 + 0.5 * params[2]) * size / 2.0
    angles = params[3] * (2.0 * math.pi)
    choices = torch.floor(params[4] * len(kinds)).clamp(max=len(kinds) - 1)

    def triangle(dy, dx, radius, angle):
        # Circumradius 1.3 r gives roughly the circle's area; inside = same side of all 3 edges.
        vertices = [
            (1.3 * radius * torch.sin(angle + j * 2.0 * math.pi / 3.0), 1.3 * radius * torch.cos(angle + j * 2.0 * math.pi / 3.0))
            for j in range(3)
        ]
        crosses = []
        for j in range(3):
            (y0, x0), (y1, x1) = vertices[j], vertices[(j + 1) % 3]
            crosses.append((x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0))
        positive = (crosses[0] >= 0) & (crosses[1] >= 0) & (crosses[2] >= 0)
        negative = (crosses[0] <= 0) & (crosses[1] <= 0) & (crosses[2] <= 0)
        return positive | negative

    def make_mask(k):
        dy, dx, radius = yy - centre_y[k], xx - centre_x[k], radii[k]
        mask = torch.zeros((batch, 1, height, width), dtype=torch.bool, device=device)
        for index, kind in enumerate(kinds):
            if kind == "circle":
                shape = dy**2 + dx**2 <= radius**2
            elif kind == "square":
                # Half side r * sqrt(pi) / 2: the square has the circle's area.
                shape = (dy.abs() <= radius * 0.886) & (dx.abs() <= radius * 0.886)
            else:
                shape = triangle(dy, dx, radius, angles[k])
            mask |= (choices[k] == index) & shape
        return mask

    return make_mask


def _union_until(make_mask, count, fraction):
    """Union of the first k of ``count`` masks, with k per image the smallest that hides >= ``fraction``.

    ``make_mask(k)`` gives the (batch, 1, H, W) mask of shape k; shapes are drawn one at a time so
    memory stays at one batch of masks and the loop stops once every image has reached the target.
    """
    union = make_mask(0)
    for k in range(1, count):
        done = union.flatten(1).float().mean(dim=1) >= fraction
        if bool(done.all()):
            break
        union = union | (make_mask(k) & ~done.view(-1, 1, 1, 1))
    return union[:, 0]


def _mask_count(fraction, area, shape_area):
    """Enough shapes to reach ``fraction`` despite overlaps (4..1024).

    n shapes of area a dropped at random cover about 1 - exp(-n a / A) of the area A; the count
    is three times what that needs (shapes cut by the border cover less).
    """
    coverage = -3.0 * math.log1p(-fraction)
    return int(min(1024, max(4, math.ceil(coverage * area / max(shape_area, 1.0)) + 2)))


def batch_masks(shape, name, strength=0.2, size=None, count=None, kinds=SHAPE_KINDS, generator=None, device="cpu"):
    """Boolean hidden-pixel masks for a batch, computed on ``device``.

    Parameters
    ----------
    shape : tuple of int
        ``(batch, height, width)``.
    name : {"holes", "shapes", "toss"}
        Corruptor.
    strength : float, default 0.2
        Fraction of pixels to hide (for "toss" the per-pixel probability ``p``). For holes and
        shapes, regions are added until at least this fraction is hidden (ignored when ``count``
        is given).
    size : int or None
        Side of the square holes / largest diameter of the shapes in pixels; None = min(H, W) // 8
        for holes and min(H, W) // 4 for shapes (at least 2).
    count : int or None
        Exact number of holes or shapes instead of a target fraction.
    kinds : tuple of str
        Shape kinds for "shapes".
    generator : torch.Generator or None
        Random source on ``device`` (None = torch's global generator).
    device : str or torch.device

    Returns
    -------
    torch.Tensor
        ``(batch, height, width)`` bool, True = hidden.
    """
    batch, height, width = shape
    fraction = _check_fraction(strength, "strength")
    if name == "toss":
        return _rand((batch, height, width), generator, device) < fraction
    if name not in ("holes", "shapes"):
        raise FetalInpaintError(f"unknown corruptor {name!r}; choose one of {sorted(CORRUPTORS)}.")
    # Default sizes give holes and shapes of similar area (8 px squares, 8-16 px shapes at 64x64).
    default_size = min(height, width) // (8 if name == "holes" else 4)
    size = int(size) if size else max(2, default_size)
    if (count is None and fraction == 0.0) or count == 0:
        return torch.zeros((batch, height, width), dtype=torch.bool, device=device)
    if name == "holes":
        number = count if count is not None else _mask_count(fraction, height * width, size * size)
        make_mask = _square_masks(batch, number, height, width, size, generator, device)
    else:
        kinds = tuple(kinds)
        unknown = set(kinds) - set(SHAPE_KINDS)
        if not kinds or unknown:
            raise FetalInpaintError(f"shape kinds must be a non-empty subset of {SHAPE_KINDS}, got {kinds}.")
        number = count if count is not None else _mask_count(fraction, height * width,
                                                              0.6 * math.pi * (size / 2.0) ** 2)
        make_mask = _shape_masks(batch, number, height, width, size, kinds, generator, device)
    if count is not None:
        return _union_until(make_mask, number, fraction=2.0)
    return _union_until(make_mask, number, fraction)


def corrupt_batch(images, name, strength=0.2, fill=0.0, generator=None, **params):
    """Corrupt a batch of images on their own device.

    Parameters
    ----------
    images : torch.Tensor
        ``(batch, channels, height, width)``; every channel of a pixel is hidden together.
    name, strength, generator, **params
        See :func:`batch_masks` (``size``, ``count``, ``kinds``).
    fill : float, default 0.0
        Value written into hidden pixels.

    Returns
    -------
    corrupted : torch.Tensor
        Same shape and dtype as ``images``.
    mask : torch.Tensor
        ``(batch, 1, height, width)`` bool, True = hidden.
    """
    batch, _, height, width = images.shape
    mask = batch_masks((batch, height, width), name, strength, generator=generator, device=images.device, **params)
    mask = mask.unsqueeze(1)
    return images.masked_fill(mask, fill), mask


def _corrupt_numpy(image, rng, name, strength, fill, **params):
    image = np.asarray(image)
    if image.ndim != 2:
        raise FetalInpaintError(f"corruptors take one 2D image, got shape {image.shape}; corrupt slices one at a time.")
    seed = int(_as_generator(rng).integers(0, 2**62))
    generator = torch.Generator().manual_seed(seed)
    mask = batch_masks((1,) + image.shape, name, strength, generator=generator, device="cpu", **params)[0].numpy()
    corrupted = image.copy()
    corrupted[mask] = fill
    return corrupted, mask


def corrupt_holes(image, rng=None, n_holes=None, hole_size=None, fraction=0.2, fill=0.0):
    """Classic holes: several random squares.

    Parameters
    ----------
    image : array_like, 2D
    rng : numpy.random.Generator, int or None
        Random source or seed (same seed -> same mask).
    n_holes : int or None
        Exact number of squares (may overlap). None = add squares until ``fraction`` is hidden.
    hole_size : int or None
        Side of each square in pixels; None = min(H, W) // 8.
    fraction : float, default 0.2
        Target hidden fraction when ``n_holes`` is None (reached or exceeded by at most one hole).
    fill : float, default 0.0

    Returns
    -------
    corrupted : numpy.ndarray
    mask : numpy.ndarray of bool
        True = hidden.
    """
    return _corrupt_numpy(image, rng, "holes", fraction, fill, size=hole_size, count=n_holes)


def corrupt_shapes(image, rng=None, n_shapes=None, size=None, fraction=0.2, kinds=SHAPE_KINDS, fill=0.0):
    """Random shapes: circles, triangles and squares of random position, size and orientation.

    Parameters
    ----------
    image : array_like, 2D
    rng : numpy.random.Generator, int or None
    n_shapes : int or None
        Exact number of shapes; None = add shapes until ``fraction`` is hidden.
    size : int or None
        Largest shape diameter in pixels (shapes span size/2..size); None = min(H, W) // 4.
    fraction : float, default 0.2
    kinds : tuple of str, default ("circle", "triangle", "square")
    fill : float, default 0.0

    Returns
    -------
    corrupted, mask : numpy.ndarray
    """
    return _corrupt_numpy(image, rng, "shapes", fraction, fill, size=size, count=n_shapes, kinds=kinds)


def corrupt_toss(image, rng=None, p=0.2, fill=0.0):
    """Biased toss: every pixel is hidden independently with probability ``p``.

    Parameters
    ----------
    image : array_like, 2D
    rng : numpy.random.Generator, int or None
    p : float, default 0.2
    fill : float, default 0.0

    Returns
    -------
    corrupted, mask : numpy.ndarray
    """
    return _corrupt_numpy(image, rng, "toss", p, fill)


CORRUPTORS = {"holes": corrupt_holes, "shapes": corrupt_shapes, "toss": corrupt_toss}

# The keyword each corruptor uses for its strength (hidden fraction).
STRENGTH_KEYWORD = {"holes": "fraction", "shapes": "fraction", "toss": "p"}


def make_corruptor(name, strength=None, **params):
    """A corruptor with fixed parameters: ``corruptor(image, rng) -> (corrupted, mask)``.

    Parameters
    ----------
    name : {"holes", "shapes", "toss"}
    strength : float or None
        Hidden fraction, passed as ``fraction`` (holes, shapes) or ``p`` (toss).
    **params
        Other keyword arguments of the corruptor.

    Returns
    -------
    callable
    """
    if name not in CORRUPTORS:
        raise FetalInpaintError(f"unknown corruptor {name!r}; choose one of {sorted(CORRUPTORS)}.")
    if strength is not None:
        params[STRENGTH_KEYWORD[name]] = strength
    return partial(CORRUPTORS[name], **params)
