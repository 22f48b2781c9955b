"""The robot-user protocol of the benchmarks (same rules as the reference harness ../shared/bench/robot.py).

Binary (robot_benchmark.py): round 0 paints ONE 2D slice, the one with the largest target
area along the acquisition axis. Foreground = the skeleton of the target eroded by 2 voxels
(dilated by 1, kept inside the target); background = a ring 4-6 voxels outside the target
plus the skeleton of the background farther than 15 voxels (eroded by 5). Each later round
adds ONE stroke on the largest connected error blob, on the blob's largest slice: the
skeleton of the blob, foreground when the blob is mostly target (a miss), background
otherwise. Stroke values: 0 unpainted, 1 background, 2 foreground.

Multi-class (multiclass_benchmark.py): the truth is a label map of class values >= 1. Round 0
paints the slice where the classes are best represented (the most classes, then the largest
smallest class) with the skeleton of every connected component of every class; each later
round adds the skeleton of the largest error blob (over all classes), every stroke pixel
painted with the true class under it. Stroke values are the class values.

Round 0 can also be drawn in other ways a person might (``style``, see :data:`STYLES`); the
"background" of a multi-class slice is its largest class (outside the brain, the maternal
background), drawn around the union of the other classes. One style, ``ring-later``, also
draws its first correction itself: the closed ring, after round 0's dabs.
"""

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk, skeletonize

from FetalAnnotateLib.metrics import dice  # noqa: F401  (the score every method is given, re-exported here)

BACKGROUND = 1
FOREGROUND = 2

#: Ways of drawing round 0: ``robot`` the protocol above; ``ring`` the background only as a
#: closed ring 4-6 voxels around the target; ``arcs`` that ring broken into four arcs;
#: ``dabs`` the background as four short dabs around the target; ``thick`` the robot's strokes
#: with a brush of radius 2 (each pixel painted with the true class under it); ``two-slices``
#: the robot's strokes on the first slice and on a second one, a quarter of the target's extent
#: or more away; ``ring-later`` round 0 as ``dabs``, and as the first correction, instead of a
#: stroke on the largest error blob, the closed ring round the target (an outline drawn as a
#: correction; :func:`add_ring_stroke`).
RING_LATER_STYLE = "ring-later"
STYLES = ("robot", "ring", "arcs", "dabs", "thick", "two-slices", RING_LATER_STYLE)
#: Binary only, the failure case of outline mode: background arcs around the target plus a
#: closed loop through the far background around the whole body (near the image border).
LOOPS_STYLE = "loops"
#: Binary only: round 0 as ``robot``; at round :data:`UNDO_ROUND` the robot first paints its
#: correction stroke with the wrong class (a slip), sees that update, erases the slip (as the
#: Segment Editor's Undo does), sees that update, and then paints the right stroke
#: (:func:`add_correction_stroke` with ``wrong_class``).
UNDO_STYLE = "undo"
UNDO_ROUND = 5
#: Round 0 as ``robot``; at round :data:`SLIP_ROUND` the robot paints its correction with the
#: wrong class (the other one; with several classes, the class shown) and goes on as if it had not
#: seen it; at round :data:`UNDO_ROUND` it first erases what is left of that stroke (its voxels
#: still painted with the wrong class: an older stroke, not the last; :func:`erase_slip`), sees
#: that update, and then paints its correction.
ERASE_STYLE = "erase"
SLIP_ROUND = 2
#: Round 0 as ``robot``; at round :data:`UNDO_ROUND`, before its correction, the robot closes the
#: session and opens it again (a scene saved and loaded): a new session takes up the last strokes
#: and probabilities (``AnnotationSession.resume``) and updates; the rounds after go on in it.
REOPEN_STYLE = "reopen"
#: Round 0 as ``robot``; at round :data:`UNDO_ROUND`, before its correction, the robot goes on in
#: a new session that has nothing to take up (as after changing a setting that builds a new
#: session): it updates all the strokes afresh, and the rounds after go on in it.
RESTART_STYLE = "restart"
SESSION_STYLES = (UNDO_STYLE, ERASE_STYLE, REOPEN_STYLE, RESTART_STYLE)
BINARY_STYLES = STYLES + (LOOPS_STYLE,) + SESSION_STYLES
CLASS_STYLES = STYLES + (ERASE_STYLE, REOPEN_STYLE, RESTART_STYLE)


def acquisition_axis(spacing, anisotropy_ratio=1.5):
    """Axis of the largest spacing for thick-slice stacks, else 0 (as the reference harness)."""
    if max(spacing) > anisotropy_ratio * min(spacing):
        return int(np.argmax(spacing))
    return 0


def plane_slicing(axis, index, ndim=3):
    """The slicing tuple of slice ``index`` along ``axis``."""
    where = [slice(None)] * ndim
    where[axis] = index
    return tuple(where)


def largest_slice(mask, axis):
    """Index along ``axis`` of the slice with the most True voxels, and its 3D slicing tuple."""
    other_axes = tuple(a for a in range(mask.ndim) if a != axis)
    index = int(np.argmax(mask.sum(axis=other_axes)))
    return index, plane_slicing(axis, index, mask.ndim)


def skeleton_stroke(region):
    """Stroke drawn inside a 2D region: skeleton of the region eroded by 2, dilated by 1."""
    core = ndi.binary_erosion(region, iterations=2)
    if core.sum() < 5:
        core = region
    skeleton = skeletonize(core)
    if skeleton.sum() == 0:
        skeleton = core
    return ndi.binary_dilation(skeleton) & region


def ring_around(region, near=4, far=6):
    """The closed band of pixels ``near`` < steps <= ``far`` outside a 2D region."""
    return ndi.binary_dilation(region, iterations=far) & ~ndi.binary_dilation(region, iterations=near)


def _angles(mask, centre):
    rows, columns = np.nonzero(mask)
    return rows, columns, np.arctan2(rows - centre[0], columns - centre[1])


def broken_into_arcs(ring, centre, n_arcs=4, gap_degrees=30.0):
    """``ring`` without ``n_arcs`` evenly spaced angular gaps (seen from ``centre``): open arcs."""
    rows, columns, angles = _angles(ring, centre)
    period = 2 * np.pi / n_arcs
    in_gap = np.mod(angles, period) < np.deg2rad(gap_degrees)
    arcs = ring.copy()
    arcs[rows[in_gap], columns[in_gap]] = False
    return arcs


def dabs_on(ring, centre, n_dabs=4, radius=3):
    """``n_dabs`` short pieces of ``ring`` (pixels within ``radius`` of a point), evenly spaced around ``centre``."""
    rows, columns, angles = _angles(ring, centre)
    dabs = np.zeros_like(ring)
    if rows.size == 0:
        return dabs
    for direction in np.arange(n_dabs) * 2 * np.pi / n_dabs - np.pi:
        nearest = int(np.argmin(np.abs(np.angle(np.exp(1j * (angles - direction))))))
        near = (rows - rows[nearest]) ** 2 + (columns - columns[nearest]) ** 2 <= radius ** 2
        dabs[rows[near], columns[near]] = True
    return dabs


def loop_around_body(shape, inset_fraction=1 / 12, width=2):
    """A closed rectangular loop ``width`` pixels wide, inset from the border of a 2D plane of ``shape``."""
    inset = max(2, int(min(shape) * inset_fraction))
    inside = np.zeros(shape, bool)
    inside[inset:-inset, inset:-inset] = True
    return inside & ~ndi.binary_erosion(inside, iterations=width)


def background_strokes(target, style):
    """Background strokes drawn around a 2D ``target`` in the given round-0 ``style``.

    ``robot`` (and ``thick``, ``two-slices`` and :data:`SESSION_STYLES`): the ring 4-6 voxels out plus the skeleton of the
    background farther than 15 voxels; ``ring``, ``arcs``, ``dabs``, ``loops``: see
    :data:`STYLES` and :data:`LOOPS_STYLE`.
    """
    ring = ring_around(target)
    if style in ("robot", "thick", "two-slices") + SESSION_STYLES:
        far = ndi.binary_erosion(~ndi.binary_dilation(target, iterations=15), iterations=5)
        return ring | (skeletonize(far) if far.any() else far)
    if style == "ring":
        return ring
    centre = np.mean(np.nonzero(target), axis=1) if target.any() else np.array(target.shape) / 2
    if style == "arcs":
        return broken_into_arcs(ring, centre)
    if style in ("dabs", RING_LATER_STYLE):
        return dabs_on(ring, centre)
    if style == LOOPS_STYLE:
        return broken_into_arcs(ring, centre) | (loop_around_body(target.shape) & ~ndi.binary_dilation(target, iterations=4))
    raise ValueError(f"unknown drawing style {style!r}; choose from {', '.join(BINARY_STYLES)}")


def thick_brush(painted, truth, radius=2):
    """The strokes of a 2D plane drawn with a brush of ``radius``: every pixel the truth's class."""
    brushed = ndi.binary_dilation(painted > 0, structure=disk(radius))
    return np.where(brushed, truth, 0).astype(painted.dtype)


def _second_slice(scores, occupied, first):
    """The best-scored occupied slice at least a quarter of the occupied extent (>= 1) from ``first``, or None."""
    gap = max(1, int(occupied.sum()) // 4)
    far_enough = occupied & (np.abs(np.arange(scores.size) - first) >= gap)
    if not far_enough.any():
        return None
    return int(np.argmax(np.where(far_enough, scores, -np.inf)))


def _binary_plane(plane, style):
    painted = np.zeros(plane.shape, np.uint8)
    painted[background_strokes(plane, style)] = BACKGROUND
    painted[skeleton_stroke(plane)] = FOREGROUND
    if style == "thick":
        painted = thick_brush(painted, np.where(plane, FOREGROUND, BACKGROUND))
    return painted


def initial_strokes(target, axis, style="robot"):
    """Round-0 strokes of the robot user on the target's largest slice.

    Parameters
    ----------
    target : ndarray of bool, shape (z, y, x)
        Ground-truth mask.
    axis : int
        Acquisition axis (see :func:`acquisition_axis`).
    style : str, default "robot"
        How round 0 is drawn, one of :data:`BINARY_STYLES`.

    Returns
    -------
    ndarray of uint8, shape (z, y, x)
        0 unpainted, 1 background, 2 foreground.
    """
    strokes = np.zeros(target.shape, np.uint8)
    first, where = largest_slice(target, axis)
    strokes[where] = _binary_plane(target[where], style)
    if style == "two-slices":
        areas = target.sum(axis=tuple(a for a in range(3) if a != axis))
        second = _second_slice(areas, areas > 0, first)
        if second is not None:
            other = plane_slicing(axis, second)
            strokes[other] = _binary_plane(target[other], "robot")
    return strokes


def class_slice_scores(truth, axis):
    """Per slice along ``axis``: number of classes present + (smallest present class area) / (slice area + 1).

    The slice with the highest score holds the most classes and, among those, the largest
    smallest class: where the classes are best represented.
    """
    other_axes = tuple(a for a in range(3) if a != axis)
    areas = np.stack([(truth == value).sum(axis=other_axes) for value in np.unique(truth)])
    present = areas > 0
    smallest = np.where(present, areas, np.iinfo(np.int64).max).min(axis=0)
    plane_area = truth.size // truth.shape[axis]
    return present.sum(axis=0) + smallest / (plane_area + 1.0)


def _surrounding_class(plane):
    """The largest class of a 2D plane: the "background" the other styles draw around the others."""
    values, areas = np.unique(plane, return_counts=True)
    return values, values[np.argmax(areas)]


def _best_class_slice(truth, axis):
    """Index of the slice where the classes are best represented (:func:`class_slice_scores`) and the scores."""
    scores = class_slice_scores(truth, axis)
    return int(np.argmax(scores)), scores


def _class_plane(plane, style):
    values, surrounding = _surrounding_class(plane)
    painted = np.zeros(plane.shape, np.uint8)
    skeletonized = values
    if style not in ("robot", "thick", "two-slices"):
        skeletonized = values[values != surrounding]
        painted[background_strokes(plane != surrounding, style)] = surrounding
    for value in skeletonized:
        components, count = ndi.label(plane == value)
        for component in range(1, count + 1):
            region = components == component
            painted[skeleton_stroke(region)] = value
    if style == "thick":
        painted = thick_brush(painted, plane)
    return painted


def initial_class_strokes(truth, axis, style="robot"):
    """Multi-class round 0: a stroke in every class component of the slice where the classes are best represented.

    Parameters
    ----------
    truth : ndarray of int, shape (z, y, x)
        Ground-truth classes, values >= 1.
    axis : int
        Acquisition axis.
    style : str, default "robot"
        How round 0 is drawn, one of :data:`STYLES`; in every style but ``robot``, ``thick``
        and ``two-slices`` the slice's largest class is drawn around the others (ring, arcs,
        dabs) instead of with a skeleton per component.

    Returns
    -------
    ndarray of uint8, shape (z, y, x)
        0 unpainted, else the true class of the pixel.
    """
    if style not in STYLES:
        raise ValueError(f"unknown drawing style {style!r} for several classes; choose from {', '.join(STYLES)}")
    strokes = np.zeros(truth.shape, np.uint8)
    first, scores = _best_class_slice(truth, axis)
    where = plane_slicing(axis, first)
    strokes[where] = _class_plane(truth[where], style)
    if style == "two-slices":
        second = _second_slice(scores, scores >= 2, first)
        if second is not None:
            other = plane_slicing(axis, second)
            strokes[other] = _class_plane(truth[other], "robot")
    return strokes


def add_ring_stroke(strokes, target, axis):
    """The ``ring-later`` style's first correction: the closed background ring round the target
    on round 0's slice (:func:`ring_around`), over the unpainted pixels (in place)."""
    _, where = largest_slice(target, axis)
    plane = strokes[where].copy()
    plane[ring_around(target[where]) & (plane == 0)] = BACKGROUND
    strokes[where] = plane


def add_class_ring_stroke(strokes, truth, axis):
    """Multi-class ``ring-later`` first correction: the closed ring of the round-0 slice's largest
    class round the other classes, over the unpainted pixels (in place)."""
    where = plane_slicing(axis, _best_class_slice(truth, axis)[0])
    _, surrounding = _surrounding_class(truth[where])
    plane = strokes[where].copy()
    plane[ring_around(truth[where] != surrounding) & (plane == 0)] = surrounding
    strokes[where] = plane


def largest_error_blob(truth, prediction, axis):
    """The largest connected blob where ``prediction != truth``, on its largest slice.

    Returns
    -------
    tuple or None
        (slicing tuple of that slice, 2D boolean blob on it), or None when there is no error.
    """
    error = prediction != truth
    components, count = ndi.label(error)
    if count == 0:
        return None
    sizes = ndi.sum_labels(error, components, index=np.arange(1, count + 1))
    blob = components == int(np.argmax(sizes)) + 1
    _, where = largest_slice(blob, axis)
    return where, blob[where]


def add_correction_stroke(strokes, target, prediction, axis, wrong_class=False):
    """Paint one correction stroke on the largest error blob, in place.

    Parameters
    ----------
    strokes : ndarray of uint8, shape (z, y, x)
        Current strokes; modified in place.
    target, prediction : ndarray of bool, shape (z, y, x)
    axis : int
        Acquisition axis.
    wrong_class : bool, default False
        Paint the stroke with the other class (a slip of the user; see :data:`UNDO_STYLE`).

    Returns
    -------
    bool
        False when the prediction has no error (nothing painted).
    """
    blob = largest_error_blob(target, prediction, axis)
    if blob is None:
        return False
    where, region = blob
    is_miss = bool(target[where][region].mean() > 0.5) != wrong_class
    plane = strokes[where].copy()
    plane[skeleton_stroke(region)] = FOREGROUND if is_miss else BACKGROUND
    strokes[where] = plane
    return True


def add_class_correction_stroke(strokes, truth, prediction, axis, wrong_class=False):
    """Multi-class correction: the skeleton of the largest error blob, each pixel its true class (in place).

    ``wrong_class`` paints each pixel with the class shown instead (a slip; see :data:`ERASE_STYLE`).

    Returns
    -------
    bool
        False when the prediction has no error (nothing painted).
    """
    blob = largest_error_blob(truth, prediction, axis)
    if blob is None:
        return False
    where, region = blob
    stroke = skeleton_stroke(region)
    plane = strokes[where].copy()
    plane[stroke] = (prediction if wrong_class else truth)[where][stroke]
    strokes[where] = plane
    return True


def slip_stroke(strokes, add_stroke):
    """Paint a slipped correction with ``add_stroke(strokes)`` (in place) and return it: the
    slipped class at the voxels it painted, 0 elsewhere; None when nothing was painted."""
    before = strokes.copy()
    if not add_stroke(strokes):
        return None
    return np.where(strokes != before, strokes, 0).astype(strokes.dtype)


def erase_slip(strokes, slip):
    """Erase, in place, the voxels of ``slip`` (from :func:`slip_stroke`) that still hold its class."""
    strokes[(slip != 0) & (strokes == slip)] = 0


def class_dices(truth, prediction, classes):
    """Dice of each class value in ``classes`` (a class never predicted scores 0)."""
    return [dice(prediction == value, truth == value) for value in classes]
