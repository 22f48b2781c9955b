"""Errors of the annotation engine and the checks that raise them.

Every check returns new arrays or read-only views; the caller's arrays are never modified.
"""

import numpy as np

#: Plausible voxel spacing in mm (fetal MRI 0.3-10 mm, ultrasound pixels from 0.05 mm). Outside
#: it the unit is almost surely wrong (metres, micrometres), and the feature scales in mm
#: would be filters of millions of taps or of less than one voxel.
SPACING_RANGE_MM = (0.01, 20.0)

#: Most stroke classes one session segments: class indices are stored in 8 bits, as in a
#: uint8 labelmap.
MAX_CLASSES = 255

#: Largest class value of float strokes (they are converted to int64 labels).
_MAX_FLOAT_CLASS_VALUE = 2**31 - 1


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
        ``progress(fraction, message) -> bool | None``; returning True (Python's or numpy's,
        e.g. a comparison of arrays) requests cancellation, anything else continues.
    fraction : float
        Completed fraction in [0, 1].
    message : str
        What is being done.
    """
    if progress is None:
        return
    answer = progress(float(min(max(fraction, 0.0), 1.0)), message)
    if answer is True or (isinstance(answer, np.bool_) and answer):
        raise OperationCancelled(f"cancelled by the user during: {message}")


def check_option(name, value, meaning, positive=False):
    """Return a numeric session option as a float, or raise :class:`FetalAnnotateError`.

    Parameters
    ----------
    name : str
        The option's keyword, named in the message.
    value : float
        Must be finite and at least 0 (above 0 with ``positive``).
    meaning : str
        What the option or its smallest value means, quoted in the message.
    positive : bool
        Refuse 0 too.
    """
    number = float(value)
    if not (number > 0 if positive else number >= 0) or not np.isfinite(number):
        bound = "positive" if positive else "at least 0"
        raise FetalAnnotateError(f"{name} must be finite and {bound} ({meaning}), got {value}")
    return number


def check_extra_features(extra_features, image_shape):
    """Validate caller-supplied feature channels and return them as float32.

    Parameters
    ----------
    extra_features : array_like, shape (C, *image_shape)
        Real numbers (bool and integers too), C channels of the image's shape; C may be 0.
    image_shape : tuple of int
        The image's shape as given by the caller ((z, y, x) or (y, x)).

    Returns
    -------
    extra : ndarray of float32, shape (C, *image_shape)
        ``extra_features`` itself when it is a native float32 array, else a converted copy.
    """
    extra = np.asarray(extra_features)
    image_shape = tuple(image_shape)
    expected = f"(channels, {', '.join(map(str, image_shape))})"
    if extra.dtype.kind == "c":
        raise ImageError(
            f"extra_features of dtype {extra.dtype} are complex; pass real-valued channels (a complex "
            "feature as its real and imaginary parts, or its magnitude, in channels of their own)"
        )
    if extra.dtype.kind not in "biuf":
        raise ImageError(
            f"extra_features of dtype {extra.dtype} are not numbers; pass real-valued channels "
            "(e.g. numpy.asarray(extra, numpy.float32))"
        )
    if extra.ndim != len(image_shape) + 1 or extra.shape[1:] != image_shape:
        if extra.shape == image_shape:
            how_to_fix = "a single channel needs a leading axis of length 1 (extra[numpy.newaxis])"
        elif extra.shape[:-1] == image_shape:
            how_to_fix = "put the channel axis first (numpy.moveaxis(extra, -1, 0))"
        else:
            how_to_fix = "pass one channel axis first, then the image's axes"
        raise ImageError(
            f"extra_features of shape {extra.shape} must be (channels, *image.shape) = {expected}; {how_to_fix}"
        )
    with np.errstate(over="ignore"):  # reported below
        extra = extra.astype(np.float32, copy=False)
    if not np.isfinite(extra).all():
        raise ImageError(
            "extra_features contain NaN, infinite or float32-overflowing (|x| > 3.4e38) values; "
            "replace or rescale them first"
        )
    return extra


def check_image(image):
    """Validate an image and return it as a 3D (z, y, x) array.

    Parameters
    ----------
    image : array_like
        A 3D (z, y, x) scalar volume, or a 2D (y, x) image treated as one slice.

    Returns
    -------
    volume : ndarray, shape (z, y, x)
        A view of ``image`` (2D input gets a leading axis of length 1; bool is viewed as uint8).
    """
    volume = np.asarray(image)
    if volume.dtype.kind == "c" or volume.dtype.kind not in "biuf":
        raise ImageError(
            f"image of dtype {volume.dtype} is not a scalar intensity image; "
            "convert it to a real-valued scalar volume first"
        )
    if volume.dtype == bool:  # a mask as an image: 0 and 1 intensities
        volume = volume.view(np.uint8)
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    elif volume.ndim == 4:
        raise ImageError(
            f"image of shape {volume.shape} has several components per voxel; convert it to a "
            "scalar volume first (e.g. Slicer's 'Vector to Scalar Volume' module or a luminance "
            "conversion)"
        )
    elif volume.ndim != 3:
        raise ImageError(
            f"image must be 3D (z, y, x) or 2D (y, x), got {volume.ndim} dimensions; pass one scalar volume"
        )
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
    """Return the voxel spacing as a tuple of 3 floats in mm (None -> 1.0; 2D: (1.0, y, x)).

    Parameters
    ----------
    spacing : sequence of float or None
        Spacing in mm, in (z, y, x) order for 3D, (y, x) for 2D, or None for 1 mm. Each value
        must lie in :data:`SPACING_RANGE_MM`.
    ndim : int
        Number of dimensions of the image as given by the caller (2 or 3).
    """
    if spacing is None:
        return (1.0,) * 3
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != ndim:
        raise ImageError(f"spacing {values} must have {ndim} values (one per image axis, z y x)")
    how_to_fix = "set the volume's spacing in mm (in Slicer: Volumes module, Volume Information, Image Spacing)"
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ImageError(f"spacing {values} must be positive and finite; {how_to_fix}")
    smallest, largest = SPACING_RANGE_MM
    if min(values) < smallest:
        raise ImageError(
            f"spacing {values} has a value below {smallest} mm: it looks like metres; {how_to_fix}"
        )
    if max(values) > largest:
        raise ImageError(
            f"spacing {values} has a value above {largest:g} mm: it looks like micrometres or a "
            f"wrong header; {how_to_fix}"
        )
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
        A view of ``strokes``; a copy when they are float (int64 labels) or of the
        non-native byte order (the compiled loops read native arrays only).
    classes : tuple of int
        Sorted class values present.
    """
    labels = np.asarray(strokes)
    labels = labels.astype(labels.dtype.newbyteorder("="), copy=False)
    if labels.dtype.kind not in "biu":
        if not _whole_class_values(labels):
            found = f"dtype {labels.dtype}"
            if labels.dtype.kind == "f" and not np.isfinite(labels).all():
                found += " with NaN or infinite values, which are not class labels (unpainted voxels are 0)"
            elif labels.dtype.kind == "f":
                found += f" with values from {labels.min():g} to {labels.max():g}"
            raise StrokeError(
                f"strokes must be integer class labels (0 = unpainted, k > 0 = class k, at most "
                f"{_MAX_FLOAT_CLASS_VALUE}), got {found}; paint the strokes in a labelmap or "
                "segmentation, not in a scalar volume"
            )
        labels = labels.astype(np.int64)
    if labels.ndim == 2 and shape[0] == 1:
        labels = labels[np.newaxis]
    if labels.shape != tuple(shape):
        raise StrokeError(
            f"strokes of shape {labels.shape} do not match the image of shape {tuple(shape)}; "
            "paint the strokes on a labelmap with the image's geometry"
        )
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise StrokeError(
            f"strokes must be >= 0 (0 = unpainted, k > 0 = class k), got {labels.min()}; "
            "paint every class with a positive label value"
        )
    # Unique values of the painted voxels only: np.unique sorts (or hashes) every voxel.
    classes = tuple(int(c) for c in np.unique(labels[labels != 0]))
    if len(classes) > MAX_CLASSES:
        raise StrokeError(
            f"strokes have {len(classes)} classes, more than the {MAX_CLASSES} one session "
            "segments; merge classes, or segment the image in several passes"
        )
    if not classes:
        raise StrokeError("no strokes painted; paint at least one stroke of two different classes")
    if len(classes) < 2:
        raise StrokeError(
            f"strokes contain only class {classes[0]}; paint at least one stroke of a second class "
            "(e.g. background) so the classifier can tell them apart"
        )
    return labels, classes


def _whole_class_values(labels):
    """Whether a float array holds only whole numbers from 0 to ``_MAX_FLOAT_CLASS_VALUE``."""
    if labels.dtype.kind != "f":
        return False
    with np.errstate(invalid="ignore"):  # NaN fails every comparison
        # Against a float64 bound: a float16 array would cast the bound to its own type (inf).
        in_range = np.all((labels >= 0) & (labels <= np.float64(_MAX_FLOAT_CLASS_VALUE)))
    return bool(in_range and np.all(np.mod(labels, 1) == 0))
