"""Fast geodesic distance maps by vectorised raster scans (fast sweeping).

The distance from a seed set is the cheapest path cost where one step between face-neighbour
voxels along ``axis`` costs ``sqrt(h**2 + (contrast * dI)**2)``: ``h`` the spacing in mm and
``dI`` the intensity difference, so crossing an edge costs as much as walking ``contrast * dI``
mm. Each sweep visits the volume slice by slice along one axis, forward then backward, and
updates a whole slice per numpy operation; a few rounds of sweeps over all axes converge for
paths that bend around obstacles. Seconds-per-round matters more than exact paths here: the
maps are classifier features, not measurements.
"""

import numpy as np


class GeodesicCosts:
    """Per-axis step costs of one image, computed once and reused for every seed set.

    Parameters
    ----------
    image : ndarray, shape (z, y, x)
        Normalised, lightly smoothed intensity.
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm.
    contrast : float
        Millimetres of path per unit of intensity difference (0: plain distance along the grid).
    axes : tuple of int, optional
        Axes along which paths may step; default all axes of length > 1.
    """

    def __init__(self, image, spacing, contrast=30.0, axes=None):
        if axes is None:
            axes = tuple(axis for axis in range(3) if image.shape[axis] > 1)
        self.shape = image.shape
        self.axes = tuple(axes)
        # Sweep-major copies: the swept axis first, so each update touches contiguous memory.
        self.extent_mm = float(sum(image.shape[axis] * spacing[axis] for axis in self.axes))
        self._costs = {}
        for axis in self.axes:
            moved = np.moveaxis(image, axis, 0)
            step = np.diff(moved, axis=0).astype(np.float32)
            step *= np.float32(contrast)
            step *= step
            step += np.float32(spacing[axis] ** 2)
            self._costs[axis] = np.ascontiguousarray(np.sqrt(step, out=step))

    def distance(self, seeds, n_rounds=2, limit=None, box=None):
        """Geodesic distance (mm, float32) from the voxels where ``seeds`` is True.

        Parameters
        ----------
        seeds : ndarray of bool, shape (z, y, x)
            Seed voxels (distance 0). If none, every voxel gets ``limit``.
        n_rounds : int
            Rounds of forward and backward sweeps along every axis.
        limit : float, optional
            Distances are clipped to this value so the map stays finite (default: four
            times the sum of the volume's extents in mm).
        box : tuple of slice, optional
            Compute only inside this box (paths stay inside it); returns the box's shape.
        """
        if box is None:
            box = tuple(slice(0, n) for n in self.shape)
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, self.shape))
        if limit is None:
            limit = 4.0 * self.extent_mm
        seeds = seeds[box]
        distance = np.where(seeds, np.float32(0.0), np.float32(limit)).astype(np.float32)
        if not seeds.any():
            return distance
        for _ in range(n_rounds):
            for axis in self.axes:
                if distance.shape[axis] < 2:
                    continue
                others = tuple(box[a] for a in range(3) if a != axis)
                cost = self._costs[axis][(slice(box[axis].start, box[axis].stop - 1),) + others]
                moved = np.ascontiguousarray(np.moveaxis(distance, axis, 0))
                _sweep(moved, cost)
                np.moveaxis(distance, axis, 0)[...] = moved
        return distance


def _sweep(distance, cost):
    """Forward and backward relaxation along axis 0, in place."""
    candidate = np.empty(distance.shape[1:], np.float32)
    for index in range(1, distance.shape[0]):
        np.add(distance[index - 1], cost[index - 1], out=candidate)
        np.minimum(distance[index], candidate, out=distance[index])
    for index in range(distance.shape[0] - 2, -1, -1):
        np.add(distance[index + 1], cost[index], out=candidate)
        np.minimum(distance[index], candidate, out=distance[index])
