"""Fast geodesic distance maps by vectorised raster scans (fast sweeping).

The distance from a seed set is the cheapest path cost where one step between face-neighbour
voxels along ``axis`` costs ``sqrt(h**2 + (contrast * dI)**2)``: ``h`` the spacing in mm and
``dI`` the intensity difference, so crossing an edge costs as much as walking ``contrast * dI``
mm. Each sweep visits the volume slice by slice along one axis, forward then backward (loops
compiled by numba, which release the interpreter lock, so maps can be computed in threads); a
few rounds of sweeps over all axes converge for paths that bend around obstacles.
Seconds-per-round matters more than exact paths here: the maps are classifier features, not
measurements.

:func:`grow_from_seeds` relaxes the same way the cost of Slicer's *Grow from seeds* (intensity
change only, 26 neighbours) and carries along the class of the cheapest seed.
"""

import copy

import numba
import numpy as np

from .compiled import compiled


class GeodesicCosts:
    """Per-axis step costs of one image, computed once and reused for every seed set.

    Parameters
    ----------
    image : ndarray, shape (z, y, x), or sequence of them
        Normalised, lightly smoothed intensity; several channels (e.g. an image and class
        probabilities) add their squared contrast-weighted differences.
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm.
    contrast : float or sequence of float
        Millimetres of path per unit of difference, per channel (0: plain grid distance).
    stride : tuple of int
        Work on every ``stride``-th voxel per axis (large volumes); distances are returned
        at full resolution, constant over each cell.
    """

    def __init__(self, image, spacing, contrast=30.0, stride=(1, 1, 1)):
        channels = [image] if isinstance(image, np.ndarray) else list(image)
        contrasts = np.broadcast_to(np.asarray(contrast, np.float32), (len(channels),))
        self.shape = channels[0].shape
        self.stride = tuple(int(s) for s in stride)
        grid = tuple(slice(0, None, s) for s in self.stride)
        channels = [channel[grid] for channel in channels]
        coarse_spacing = tuple(s * k for s, k in zip(spacing, self.stride))
        self.axes = tuple(axis for axis in range(3) if channels[0].shape[axis] > 1)
        self.extent_mm = float(sum(self.shape[axis] * spacing[axis] for axis in self.axes))
        # Per axis, the cost of the step from each voxel to the next one along it.
        self._costs = {}
        for axis in self.axes:
            total = None
            for channel, weight in zip(channels, contrasts):
                step = np.diff(channel, axis=axis).astype(np.float32)
                step *= weight
                step *= step
                total = step if total is None else np.add(total, step, out=total)
            total += np.float32(coarse_spacing[axis] ** 2)
            self._costs[axis] = np.sqrt(total, out=total)

    def scaled(self, axis, factor):
        """The same costs with every step along ``axis`` costing ``factor`` times more.

        Returns a new :class:`GeodesicCosts` sharing the other axes' step costs.
        """
        scaled = copy.copy(self)
        scaled._costs = dict(self._costs)
        if axis in scaled._costs:
            scaled._costs[axis] = self._costs[axis] * np.float32(factor)
        return scaled

    def coarse_box(self, box=None):
        """The cells (slices of the working grid) covering a full-resolution ``box``."""
        if box is None:
            box = tuple(slice(0, n) for n in self.shape)
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, self.shape))
        return tuple(slice(b.start // k, -(-b.stop // k)) for b, k in zip(box, self.stride))

    def distance(self, seeds, n_rounds=2, limit=None, box=None):
        """Geodesic distance (mm, float32) from the voxels where ``seeds`` is True.

        Parameters
        ----------
        seeds : ndarray of bool, shape (z, y, x), or tuple of 3 index arrays
            Seed voxels (distance 0), as a mask or as their (z, y, x) coordinates. If none,
            every voxel gets ``limit``.
        n_rounds : int
            Rounds of forward and backward sweeps along every axis.
        limit : float, optional
            Distances are clipped to this value so the map stays finite (default: four
            times the sum of the volume's extents in mm).
        box : tuple of slice, optional
            Compute only inside this box (paths stay inside it; seeds outside are ignored).

        Returns
        -------
        ndarray of float32
            The distance on the working grid (``coarse_box(box)`` of it); read voxel values
            with :meth:`values_at`.
        """
        if limit is None:
            limit = 4.0 * self.extent_mm
        coarse_box = self.coarse_box(box)
        coordinates = np.nonzero(seeds) if isinstance(seeds, np.ndarray) else seeds
        cells = [np.asarray(c) // k - b.start for c, k, b in zip(coordinates, self.stride, coarse_box)]
        inside = np.logical_and.reduce([(c >= 0) & (c < b.stop - b.start) for c, b in zip(cells, coarse_box)])
        distance = np.full(tuple(b.stop - b.start for b in coarse_box), np.float32(limit), np.float32)
        if not inside.any():
            return distance
        distance[tuple(c[inside] for c in cells)] = 0.0
        for _ in range(n_rounds):
            for axis in self.axes:
                if distance.shape[axis] < 2:
                    continue
                steps = tuple(slice(b.start, b.stop - 1) if a == axis else b for a, b in enumerate(coarse_box))
                _sweep(distance, self._costs[axis][steps], axis)
        return distance

    def values_at(self, distance, coordinates, box=None):
        """Values of a :meth:`distance` result at full-resolution voxel ``coordinates`` (z, y, x arrays)."""
        coarse_box = self.coarse_box(box)
        return distance[tuple(c // k - b.start for c, k, b in zip(coordinates, self.stride, coarse_box))]

    def values_at_index(self, distance, index):
        """Values of a whole-volume :meth:`distance` result at flat (C-order) full-resolution voxel indices."""
        if self.stride == (1, 1, 1):
            return np.take(distance, index)
        return self.values_at(distance, np.unravel_index(index, self.shape))

    def full_resolution(self, distance):
        """A whole-volume :meth:`distance` result at full resolution (constant over cells)."""
        return cells_to_voxels(distance, self.stride, self.shape)


def cells_to_voxels(cells, stride, shape):
    """Full-resolution array of a grid of cells, constant over each cell.

    Parameters
    ----------
    cells : ndarray, shape (..., nz, ny, nx)
        One value per cell of ``stride`` voxels (the last three axes).
    stride : tuple of 3 int
        Cell size per axis.
    shape : tuple of 3 int
        Full-resolution shape; cells at the far edges are cropped to it.

    Returns
    -------
    ndarray, shape (..., *shape)
        A new C-contiguous array, or ``cells`` itself when every stride is 1.
    """
    offset = cells.ndim - 3
    # One gather per axis, the contiguous axis first: about 4x faster than np.repeat, then a crop.
    for axis in (2, 1, 0):
        if stride[axis] > 1:
            cells = np.take(cells, np.arange(shape[axis]) // stride[axis], axis=offset + axis)
    return cells


@compiled
def _sweep(distance, cost, axis):
    """Forward and backward relaxation along ``axis``, in place: ``distance`` falls to its
    neighbour's plus ``cost``, the step between them (one voxel less along ``axis``)."""
    nz, ny, nx = distance.shape
    # Only the loop along the swept axis carries a dependency; the innermost loop runs along the
    # last axis wherever it can, in memory order.
    if axis == 0:
        for z in range(1, nz):
            for y in range(ny):
                for x in range(nx):
                    distance[z, y, x] = min(distance[z, y, x], distance[z - 1, y, x] + cost[z - 1, y, x])
        for z in range(nz - 2, -1, -1):
            for y in range(ny):
                for x in range(nx):
                    distance[z, y, x] = min(distance[z, y, x], distance[z + 1, y, x] + cost[z, y, x])
    elif axis == 1:
        for z in range(nz):
            for y in range(1, ny):
                for x in range(nx):
                    distance[z, y, x] = min(distance[z, y, x], distance[z, y - 1, x] + cost[z, y - 1, x])
            for y in range(ny - 2, -1, -1):
                for x in range(nx):
                    distance[z, y, x] = min(distance[z, y, x], distance[z, y + 1, x] + cost[z, y, x])
    else:
        for z in range(nz):
            for y in range(ny):
                for x in range(1, nx):
                    distance[z, y, x] = min(distance[z, y, x], distance[z, y, x - 1] + cost[z, y, x - 1])
                for x in range(nx - 2, -1, -1):
                    distance[z, y, x] = min(distance[z, y, x], distance[z, y, x + 1] + cost[z, y, x])


def grow_from_seeds(image, seeds, previous=None, n_rounds=2):
    """Label every voxel with the seed class reached at the least intensity change.

    The cost of a path is the sum of the absolute intensity differences of its steps, each
    step to any of the 26 neighbours, with no length term: the cost of Slicer's *Grow from
    seeds* (``vtkImageGrowCutSegment`` with distance penalty 0), here relaxed by rounds of
    forward and backward raster sweeps along every axis instead of Dijkstra's algorithm
    (repeated rounds converge to its costs). On the atlas volumes (4 M voxels, 9 classes) two
    rounds give 99.7-99.9 % of the voxels the class of Slicer's filter, in 0.23-0.31 s against
    its 1.4-2.3 s. In noisy tissue reached from few seeds the cheapest paths wind, and each
    round of sweeps follows one more turn of them: on the generated phantom with four small
    background dabs two rounds give 90-94 % of the voxels Slicer's class, sixteen 99.4 %; after
    a 3 x 3 median of the image (``engine.median_filtered``, what the engine grows on) two
    rounds give 98.5-99.6 %.

    Parameters
    ----------
    image : ndarray of float, shape (z, y, x)
        Intensity, denoised without moving edges if need be (a median: Gaussian smoothing
        merges thin structures into their neighbours).
    seeds : ndarray of int, shape (z, y, x)
        Class values, 0 where unpainted.
    previous : (labels, cost) or None
        The result for seeds that ``seeds`` only adds to (same class wherever those were
        painted); it is updated in place. The costs of a union of seed sets are the minimum
        of theirs, so only the added seeds' paths are relaxed, in a box around them
        (:func:`_relax_in_growing_box`).
    n_rounds : int
        Rounds of sweeps (within each box).

    Returns
    -------
    labels : ndarray of the dtype of ``seeds``, shape (z, y, x)
        The class of the cheapest seed (0 everywhere when there are no seeds).
    cost : ndarray of float32, shape (z, y, x)
        That path's cost.
    """
    image = np.asarray(image, np.float32)
    painted = seeds != 0
    if previous is None:
        labels = np.where(painted, seeds, 0).astype(seeds.dtype)
        cost = np.where(painted, np.float32(0.0), np.float32(np.inf)).astype(np.float32)
        _relax(labels, cost, image, tuple(slice(0, n) for n in image.shape), n_rounds)
        return labels, cost
    labels, cost = previous
    added = painted & ((cost != 0) | (labels != seeds))
    if not added.any():
        return labels, cost
    labels[added] = seeds[added]
    cost[added] = 0.0
    _relax_in_growing_box(lambda box: _relax(labels, cost, image, box, n_rounds), np.nonzero(added), image.shape)
    return labels, cost


def _relax(labels, cost, image, box, n_rounds):
    """Sweeps of :func:`grow_from_seeds` inside ``box``, in place; the faces of the box on
    which they lowered a cost (:func:`_lowered_faces`)."""
    faces = _inner_faces(box, image.shape)
    before = [_face(cost, box, face).copy() for face in faces]
    for _ in range(n_rounds):
        for axis in range(3):
            _grow_sweep(labels[box], cost[box], image[box], axis)
    return _lowered_faces(cost, box, faces, before)


def _relax_in_growing_box(relax, coordinates, shape):
    """``relax(box)`` in boxes around voxel ``coordinates`` until no face of the box is lowered.

    Used where a map already relaxed for some seeds gets more seeds: only paths from the
    added seeds can lower it, and a path that leaves the box lowers the map on a face of it.
    The box first reaches :data:`_GROWTH_MARGIN` voxels beyond the seeds on every side; each
    side whose face ``relax`` reports lowered (a list of (axis, side) pairs) then reaches four
    times further, until the volume's edge.
    """
    low = [int(c.min()) for c in coordinates]
    high = [int(c.max()) + 1 for c in coordinates]
    margins = np.full((3, 2), _GROWTH_MARGIN)
    while True:
        box = tuple(slice(max(a - m[0], 0), min(b + m[1], n)) for a, b, m, n in zip(low, high, margins, shape))
        lowered = relax(box)
        if not lowered:
            return
        for axis, side in lowered:
            margins[axis, side] *= 4


def _inner_faces(box, shape):
    """The faces of ``box`` inside a volume of ``shape``, as (axis, side, index) with side 0 the low face."""
    return [(axis, side, end) for axis in range(3) for side, end in enumerate((box[axis].start, box[axis].stop - 1))
            if (end > 0 if side == 0 else end < shape[axis] - 1)]


def _face(values, box, face):
    """The voxels of ``values`` on one face of ``box`` (an :func:`_inner_faces` entry)."""
    axis, _, end = face
    return np.take(values[box], end - box[axis].start, axis=axis)


def _lowered_faces(values, box, faces, before):
    """The (axis, side) of the ``faces`` of ``box`` where ``values`` fell below ``before``."""
    return [face[:2] for face, was in zip(faces, before) if np.any(_face(values, box, face) < was)]


#: Voxels around added seeds within which :func:`_relax_in_growing_box` first relaxes their
#: paths (a side of the box then reaches four times further while they lower the map on its face).
_GROWTH_MARGIN = 8

@compiled
def _grow_sweep(labels, cost, image, axis):
    """Forward and backward relaxation of :func:`grow_from_seeds` along ``axis``, in place.

    Each voxel reads the neighbours in the previous slice along ``axis`` (the one before it in
    the sweep's direction) that no other axis's sweep reads: all nine for axis 0, the three in
    line along the last axis for axis 1, the one straight behind for axis 2; 26 in all.
    """
    nz, ny, nx = cost.shape
    if axis == 0:
        for direction in (1, -1):
            for step in range(nz - 1):
                z = 1 + step if direction == 1 else nz - 2 - step
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        for y in range(max(0, -dy), ny - max(0, dy)):
                            _relax_row(labels[z, y], cost[z, y], image[z, y], labels[z - direction, y + dy],
                                       cost[z - direction, y + dy], image[z - direction, y + dy], dx)
    elif axis == 1:
        for z in range(nz):  # the slices along axis 0 do not read each other here
            for direction in (1, -1):
                for step in range(ny - 1):
                    y = 1 + step if direction == 1 else ny - 2 - step
                    for dx in range(-1, 2):
                        _relax_row(labels[z, y], cost[z, y], image[z, y], labels[z, y - direction],
                                   cost[z, y - direction], image[z, y - direction], dx)
    else:
        for z in range(nz):
            for y in range(ny):
                for direction in (1, -1):
                    for step in range(nx - 1):
                        x = 1 + step if direction == 1 else nx - 2 - step
                        before = x - direction
                        candidate = abs(image[z, y, x] - image[z, y, before]) + cost[z, y, before]
                        if candidate < cost[z, y, x]:
                            cost[z, y, x] = candidate
                            labels[z, y, x] = labels[z, y, before]


# Not :func:`compiled`: inlined into :func:`_grow_sweep`, compiled and cached with it.
@numba.njit(inline="always")
def _relax_row(labels, cost, image, labels_from, cost_from, image_from, shift):
    """Each voxel ``x`` of a row takes the path through voxel ``x + shift`` of another row when it costs less."""
    for x in range(max(0, -shift), cost.size - max(0, shift)):
        candidate = abs(image[x] - image_from[x + shift]) + cost_from[x + shift]
        if candidate < cost[x]:
            cost[x] = candidate
            labels[x] = labels_from[x + shift]
