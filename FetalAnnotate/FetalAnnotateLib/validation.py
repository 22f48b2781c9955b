"""Errors of the annotation engine and the checks that raise them.

Every check returns new arrays or read-only views; the caller's arrays are never modified.
"""

import numpy as np


class FetalAnnotateError(ValueError):
    """Base class of the errors raised by FetalAnnotateLib for bad input."""


class StrokeError(FetalAnnotateError):
    """The strokes cannot train a classifier (none, one class only, wrong shape or type)."""


class ImageError(FetalAnnotateError):
    """The image cannot be segmented (empty, constant, not finite, multi-component)."""


class OperationCancelled(FetalAnnotateError):
    """The progress callback asked to stop the running operation."""


def report_progress(progress, fraction, message):
    """Call ``progress(fraction, message)`` and raise :class:`OperationCancelled` on request.

    Parameters
    ----------
    progress : callable or None
        ``progress(fraction, message) -> bool | None``; returning True requests cancellation.
    fraction : float
        Completed fraction in [0, 1].
    message : str
        What is being done.
    """
    if progress is not None and progress(float(min(max(fraction, 0.0), 1.0)), message) is True:
        raise OperationCancelled(f"cancelled by the user during: {message}")


def check_image(image):
    """Validate an image and return it as a 3D (z, y, x) array.

    Parameters
    ----------
    image : array_like
        A 3D (z, y, x) scalar volume, or a 2D (y, x) image treated as one slice.

    Returns
    -------
    volume : ndarray, shape (z, y, x)
        A view of ``image`` (2D input gets a leading axis of length 1).
    """
    volume = np.asarray(image)
    if volume.dtype.kind == "c" or volume.dtype.kind not in "biuf":
        raise ImageError(
            f"image of dtype {volume.dtype} is not a scalar intensity image; "
            "convert it to a real-valued scalar volume first"
        )
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    elif volume.ndim == 4:
        raise ImageError(
            f"image of shape {volume.shape} has several components per voxel; convert it to a "
            "scalar volume first (e.g. Slicer's 'Vector to Scalar Volume' module or a luminance "
            "conversion)"
        )
    elif volume.ndim != 3:
        raise ImageError(f"image must be 3D (z, y, x) or 2D (y, x), got {volume.ndim} dimensions")
    if volume.size == 0:
        raise ImageError("image is empty; load a volume with voxels before annotating")
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise ImageError(
            "image contains NaN or infinite values; replace them (e.g. with 0) before annotating"
        )
    if volume.min() == volume.max():
        raise ImageError("image is constant; there is nothing to segment in a volume of one value")
    return volume


def check_spacing(spacing, ndim):
    """Return the voxel spacing as a tuple of ``ndim`` positive floats in mm (None -> 1.0).

    Parameters
    ----------
    spacing : sequence of float or None
        Spacing in (z, y, x) order for 3D, (y, x) for 2D, or None for 1 mm.
    ndim : int
        Number of dimensions of the image as given by the caller (2 or 3).
    """
    if spacing is None:
        return (1.0,) * 3
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != ndim:
        raise ImageError(f"spacing {values} must have {ndim} values (one per image axis, z y x)")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ImageError(f"spacing {values} must be positive millimetres")
    return values if ndim == 3 else (1.0,) + values


def check_strokes(strokes, shape):
    """Validate a stroke label array against the 3D image shape.

    Parameters
    ----------
    strokes : array_like of int
        0 = unpainted, k > 0 = class k; image shape (2D images: (y, x) or (1, y, x)).
    shape : tuple of int
        The 3D (z, y, x) shape of the image.

    Returns
    -------
    strokes3d : ndarray, shape (z, y, x)
        A view of ``strokes``.
    classes : tuple of int
        Sorted class values present.
    """
    labels = np.asarray(strokes)
    if labels.dtype.kind not in "biu":
        if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise StrokeError(f"strokes must be an integer label array, got dtype {labels.dtype}")
    if labels.ndim == 2 and shape[0] == 1:
        labels = labels[np.newaxis]
    if labels.shape != tuple(shape):
        raise StrokeError(
            f"strokes of shape {labels.shape} do not match the image of shape {tuple(shape)}; "
            "paint the strokes on a labelmap with the image's geometry"
        )
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise StrokeError("strokes must be >= 0 (0 = unpainted, k > 0 = class k)")
    classes = tuple(int(c) for c in np.unique(labels) if c != 0)
    if not classes:
        raise StrokeError("no strokes painted; paint at least one stroke of two different classes")
    if len(classes) < 2:
        raise StrokeError(
            f"strokes contain only class {classes[0]}; paint at least one stroke of a second class "
            "(e.g. background) so the classifier can tell them apart"
        )
    return labels, classes
