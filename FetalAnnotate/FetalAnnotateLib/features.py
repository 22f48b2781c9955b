"""Stroke-independent image features: a multi-scale filter bank with scales in millimetres.

Thick-slice stacks (slice spacing > ``anisotropy_ratio`` x in-plane spacing) get in-plane
filters only: slices of clinical fetal stacks are acquired one by one with fetal motion in
between, so smoothing across them mixes unrelated anatomy. Isotropic volumes get 3D filters.
"""

import numpy as np
from scipy import ndimage as ndi

from .validation import check_spacing, report_progress

#: Named feature settings. Every value is JSON-able so a trained classifier can be saved with
#: the settings that rebuild its features on another volume.
FEATURE_PRESETS = {
    # Smoothed intensity, gradient magnitude, Laplacian and local standard deviation at
    # physical scales; clearly ahead of the Table I set in the robot-user benchmark
    # (docs/engine.md).
    "default": {
        "preset": "default",
        "filters": ["gaussian", "gradient", "laplacian", "std"],
        "scales_mm": [1.0, 2.0, 4.0, 8.0],
        "intensity": True,
        "anisotropy_ratio": 1.5,
        "normalize_percentiles": [0.5, 99.5],
    },
    # Table I of the reference paper (2D per-slice filters, kernel sizes in voxels), for comparison.
    "paper-table1": {
        "preset": "paper-table1",
        "entropy_radius": [1, 3],
        "std_size": [3, 5],
        "gaussian_sigma": [3, 5],
        "gradient_sigma": [3, 5],
        "laplacian_sigma": [2, 4, 8, 16, 32],
        "maximum_size": [1, 5, 9],
        "minimum_size": [5, 9],
        "mean_size": [5],
        "anisotropy_ratio": 1.5,
        "normalize_percentiles": [0.5, 99.5],
    },
}


def feature_settings_for(preset):
    """Return a copy of the named preset's settings (or of a settings dict).

    Parameters
    ----------
    preset : str or dict
        A key of :data:`FEATURE_PRESETS` or a settings dict with a ``"preset"`` key.
    """
    if isinstance(preset, dict):
        return {key: (list(value) if isinstance(value, (list, tuple)) else value) for key, value in preset.items()}
    if preset not in FEATURE_PRESETS:
        raise ValueError(f"unknown feature preset {preset!r}; choose one of {sorted(FEATURE_PRESETS)}")
    return feature_settings_for(FEATURE_PRESETS[preset])


def slice_axis(spacing, shape, anisotropy_ratio=1.5):
    """Axis of thick slices, or None for a (nearly) isotropic volume.

    Parameters
    ----------
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm.
    shape : tuple of int
        Volume shape; axes of length 1 (2D images) are ignored.
    anisotropy_ratio : float
        A volume is a stack of slices when its largest spacing exceeds this times the smallest.
    """
    active = [axis for axis in range(3) if shape[axis] > 1]
    if len(active) < 3:
        return None
    spacings = [spacing[axis] for axis in active]
    if max(spacings) > anisotropy_ratio * min(spacings):
        return active[int(np.argmax(spacings))]
    return None


def filter_axes(spacing, shape, anisotropy_ratio=1.5):
    """Axes that filters act along: all axes of length > 1 except the thick-slice axis."""
    thick = slice_axis(spacing, shape, anisotropy_ratio)
    return tuple(axis for axis in range(3) if shape[axis] > 1 and axis != thick)


#: Normalised intensities are clipped to this many robust ranges below 0 and above 1. Real
#: images stay within about 3; a voxel beyond is a corrupt value (1e30) whose square would
#: overflow the float32 features.
OUTLIER_RANGES = 10.0

#: Below this magnitude float32 arithmetic is exact enough; beyond it (a float64 image x 1e300)
#: normalisation runs in float64 so that nothing overflows in the float32 cast.
_FLOAT32_SAFE = 1e30

#: A float32 cast keeps 24 bits of each value: where the largest magnitude exceeds the robust
#: range this many times, fewer than 2**16 steps of that range would survive it. Such a volume
#: of a wider type (1e8 + [0, 1] in float64, 2**63 + [0, 1e6] in uint64) is offset and scaled
#: in float64 before the cast, else its contrast is rounded away.
_FLOAT32_OFFSET_RATIO = 2.0**8


def padding_value(volume, sample):
    """The constant value that fills ``volume`` outside its field of view, or None.

    Resampled or reoriented volumes are often padded with one negative value far below every
    intensity (-1000, -32768). It is recognised as the image minimum when it is negative,
    covers more than 0.5 % of ``sample``, touches a face of the volume, and the other voxels
    are not negative (MR magnitudes, ultrasound) or lie above it by more than their own robust
    range. A zero background (air, a masked or skull-stripped image) is image, not padding.

    Parameters
    ----------
    volume : ndarray, shape (z, y, x)
    sample : ndarray
        A subsample of ``volume``'s voxels.
    """
    value = volume.min()
    on_value = sample == value
    if not value < 0 or on_value.mean() <= 0.005 or on_value.all():
        return None
    rest_low, rest_high = np.percentile(sample[~on_value], (0.5, 99.5))
    if not (rest_low >= 0 or rest_low - value > rest_high - rest_low) or rest_high <= rest_low:
        return None
    touches_border = any(
        np.any(np.take(volume, end, axis=axis) == value) for axis in range(3) for end in (0, -1)
    )
    return value if touches_border else None


def normalize_intensity(volume, percentiles=(0.5, 99.5), spacing=(1.0, 1.0, 1.0)):
    """Map the robust intensity range of the field of view of ``volume`` to [0, 1] (float32).

    A subsample estimates the percentiles so that large volumes stay fast. Padding outside
    the field of view (:func:`padding_value`) is left out of them and replaced by the nearest
    voxel of the field of view, so it adds no edges to the features. Values more than
    :data:`OUTLIER_RANGES` robust ranges outside [0, 1] are clipped.

    Parameters
    ----------
    volume : ndarray, shape (z, y, x)
        Finite real values; not modified.
    percentiles : pair of float
        Percentiles mapped to 0 and 1.
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm: which field-of-view voxel is nearest to the padding.

    Returns
    -------
    ndarray of float32, shape (z, y, x)
    """
    sample = volume.ravel()[:: max(1, volume.size // 1_000_000)]
    padding = padding_value(volume, sample)
    if padding is not None:
        sample = sample[sample != padding]
    low, high = np.percentile(sample, percentiles)
    if high <= low:
        field = volume if padding is None else volume[volume != padding]
        low, high = float(field.min()), float(field.max())
    extremes = (abs(float(volume.min())), abs(float(volume.max())), abs(float(low)), abs(float(high)))
    robust_range = float(high) - float(low)
    small_range = robust_range < 1.0 / _FLOAT32_SAFE
    large_offset = (not np.can_cast(volume.dtype, np.float32)
                    and max(extremes) > _FLOAT32_OFFSET_RATIO * robust_range)
    work = np.float64 if max(extremes) >= _FLOAT32_SAFE or small_range or large_offset else np.float32
    out = volume.astype(work, copy=True)
    out -= work(low)
    scale = 1.0 / robust_range
    if np.isfinite(scale):
        out *= work(scale)
    else:  # a subnormal range, whose reciprocal overflows
        out /= work(robust_range)
    np.clip(out, -OUTLIER_RANGES, 1.0 + OUTLIER_RANGES, out=out)
    out = out.astype(np.float32, copy=False)
    if padding is not None:
        nearest = ndi.distance_transform_edt(
            volume == padding, sampling=spacing, return_distances=False, return_indices=True
        )
        out = out[tuple(nearest)]
    return out


def count_features(settings):
    """Number of channels :func:`compute_features` returns for ``settings``."""
    if settings["preset"] == "paper-table1":
        return 1 + sum(len(settings[key]) for key in (
            "entropy_radius", "std_size", "gaussian_sigma", "gradient_sigma",
            "laplacian_sigma", "maximum_size", "minimum_size", "mean_size"))
    return int(settings["intensity"]) + len(settings["filters"]) * len(settings["scales_mm"])


def compute_features(volume, spacing, settings, progress=None, normalized=None):
    """Compute the feature channels of a 3D volume.

    Parameters
    ----------
    volume : ndarray, shape (z, y, x)
        Scalar image (any real dtype); not modified.
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm.
    settings : dict
        Feature settings, e.g. ``feature_settings_for("default")``.
    progress : callable or None
        ``progress(fraction, message)``; returning True cancels.
    normalized : ndarray of float32, shape (z, y, x), optional
        ``normalize_intensity(volume, settings["normalize_percentiles"], spacing)``, when the
        caller already has it (on padded volumes it costs a distance transform).

    Returns
    -------
    features : ndarray of float32, shape (z, y, x, n_features)
        Voxel-major, so that blocks of voxels are contiguous rows for the classifier.
    """
    spacing = check_spacing(spacing, 3)
    image = normalize_intensity(volume, settings["normalize_percentiles"], spacing) if normalized is None else normalized
    axes = filter_axes(spacing, image.shape, settings["anisotropy_ratio"])
    features = np.empty(image.shape + (count_features(settings),), np.float32)
    if settings["preset"] == "paper-table1":
        _paper_table1_features(image, axes, settings, features, progress)
    else:
        _scale_space_features(image, spacing, axes, settings, features, progress)
    report_progress(progress, 1.0, "features computed")
    return features


def _sigmas(scale_mm, spacing, axes):
    """Gaussian sigma in voxels per axis; 0 along axes that are not filtered."""
    return tuple(scale_mm / spacing[axis] if axis in axes else 0.0 for axis in range(3))


def _scale_space_features(image, spacing, axes, settings, out, progress):
    """Fill ``out`` with intensity and Gaussian-derivative features at mm scales."""
    channel = 0
    if settings["intensity"]:
        out[..., channel] = image
        channel += 1
    filters = settings["filters"]
    scales = settings["scales_mm"]
    for index, scale in enumerate(scales):
        fraction, message = index / len(scales), f"image features at {scale:g} mm"
        report_progress(progress, fraction, message)
        sigma = _sigmas(scale, spacing, axes)
        smooth = gaussian_smooth(image, sigma, progress, fraction, message)
        for name in filters:
            if name == "gaussian":
                out[..., channel] = smooth
            elif name == "gradient":
                out[..., channel] = _gradient_magnitude(smooth, spacing, axes) * np.float32(scale)
            elif name == "laplacian":
                out[..., channel] = _laplacian(smooth, spacing, axes) * np.float32(scale**2)
            elif name == "std":
                second_moment = gaussian_smooth(image * image, sigma, progress, fraction, message)
                np.sqrt(np.maximum(second_moment - smooth * smooth, 0.0), out=out[..., channel])
            else:
                raise ValueError(f"unknown filter {name!r}")
            channel += 1


def gaussian_smooth(image, sigma, progress=None, fraction=0.0, message="smoothing", mode="nearest"):
    """``scipy.ndimage.gaussian_filter(image, sigma, mode=mode)``, one axis at a time.

    A cancel request is honoured between axes, and each sigma is bounded by the length of
    its axis: a wider kernel only flattens that axis further, at a cost that grows with its
    width (millions of taps for a spacing given in metres).

    Parameters
    ----------
    image : ndarray of float32, shape (z, y, x)
    sigma : sequence of float
        Per axis, in voxels; 0 leaves the axis unfiltered.
    progress : callable or None
        ``progress(fraction, message)``; returning True cancels.
    fraction : float
        Progress reported while smoothing.
    message : str
        What is being done.
    mode : str
        How the image is extended beyond its border (:func:`scipy.ndimage.gaussian_filter1d`).

    Returns
    -------
    ndarray of float32, shape (z, y, x)
        A new array, or ``image`` itself when no axis is filtered.
    """
    out = None
    for axis, width in enumerate(sigma):
        if width > 1e-15:  # as scipy.ndimage.gaussian_filter: smaller sigmas leave the axis alone
            report_progress(progress, fraction, message)
            source = image if out is None else out
            out = ndi.gaussian_filter1d(source, min(width, image.shape[axis]), axis=axis, output=out, mode=mode)
    return image if out is None else out


def _gradient_magnitude(smooth, spacing, axes):
    """Magnitude of the central-difference gradient (per mm) along ``axes``."""
    total = np.zeros(smooth.shape, np.float32)
    for axis in axes:
        derivative = np.gradient(smooth, axis=axis) / np.float32(spacing[axis])
        total += derivative * derivative
    return np.sqrt(total, out=total)


def _laplacian(smooth, spacing, axes):
    """Sum of second differences (per mm^2) along ``axes``."""
    total = np.zeros(smooth.shape, np.float32)
    for axis in axes:
        total += ndi.correlate1d(smooth, [1.0, -2.0, 1.0], axis=axis, mode="nearest") / np.float32(spacing[axis] ** 2)
    return total


def _paper_table1_features(image, axes, settings, out, progress):
    """Fill ``out`` with the reference paper's Table I filters (kernel sizes in voxels)."""
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    def size(k):
        return tuple(k if axis in axes else 1 for axis in range(3))

    def sigma(s):
        return tuple(float(s) if axis in axes else 0.0 for axis in range(3))

    channel = 0
    out[..., channel] = image
    channel += 1
    u8 = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    plane_axis = next((axis for axis in range(3) if axis not in axes), 0)
    for radius in settings["entropy_radius"]:
        planes = np.moveaxis(out[..., channel], plane_axis, 0)
        for index, plane in enumerate(np.moveaxis(u8, plane_axis, 0)):
            planes[index] = entropy(plane, disk(radius))
        channel += 1
    report_progress(progress, 0.4, "Table I filters")
    for k in settings["std_size"]:
        mean = ndi.uniform_filter(image, size(k))
        out[..., channel] = np.sqrt(np.maximum(ndi.uniform_filter(image * image, size(k)) - mean * mean, 0.0))
        channel += 1

    def smoothed(s):
        # scipy's default border (reflect), as the paper's filters; a cancel is honoured between axes.
        fraction = 0.4 + 0.6 * channel / out.shape[-1]
        return gaussian_smooth(image, sigma(s), progress, fraction, "Table I filters", mode="reflect")

    for s in settings["gaussian_sigma"]:
        out[..., channel] = smoothed(s)
        channel += 1
    for s in settings["gradient_sigma"]:
        out[..., channel] = _gradient_magnitude(smoothed(s), (1.0, 1.0, 1.0), axes)
        channel += 1
    for s in settings["laplacian_sigma"]:
        out[..., channel] = _laplacian(smoothed(s), (1.0, 1.0, 1.0), axes)
        channel += 1
    for k in settings["maximum_size"]:
        out[..., channel] = ndi.maximum_filter(image, size(k))
        channel += 1
    for k in settings["minimum_size"]:
        out[..., channel] = ndi.minimum_filter(image, size(k))
        channel += 1
    for k in settings["mean_size"]:
        out[..., channel] = ndi.uniform_filter(image, size(k))
        channel += 1
