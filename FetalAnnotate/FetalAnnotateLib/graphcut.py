"""Edge-aware smoothing of a label map by graph cuts (Potts model, Boykov & Jolly 2001).

The forest labels each voxel on its own; :func:`graph_cut_labels` trades its probabilities
against the length of the label boundary, where a boundary across an intensity edge costs
little and one through homogeneous tissue a lot. Only an uncertain band of voxels is solved,
so a round stays interactive; the maximum flows are Boykov and Kolmogorov's, compiled by numba
(cached on disk: the first use in an installation compiles them, a few seconds).
"""

import numpy as np
from scipy import ndimage as ndi

from .compiled import compiled

#: Capacities of the maximum flow are integers: energies (nats) times this.
_CAPACITY_SCALE = 1000.0
#: Probabilities are clipped here before the log, so one voxel costs at most ~9 nats.
_MIN_PROBABILITY = 1e-4
#: Alpha-expansion leaves out voxels whose probability of alpha is below 10 %: on the largest
#: atlas brain the moves' graphs shrink by almost a third and a few hundred voxels in 4 M change
#: (docs/engine.md).
_MAX_MOVE_COST = -np.log(0.1)


def edge_contrast(image, spacing):
    """Mean squared intensity step between neighbouring voxels, along the finest-spaced axes.

    Returns twice it, the ``2 sigma^2`` of the edge weight ``exp(-(I_p - I_q)^2 / (2 sigma^2))``
    (Boykov & Jolly): cutting across a typical step costs ``1/e`` of cutting through flat tissue.
    Thick-slice steps are left out (slices are far apart and move between acquisitions).
    """
    image = np.asarray(image, np.float32)
    finest = min(spacing[axis] for axis in range(image.ndim) if image.shape[axis] > 1)
    steps = [np.diff(image, axis=axis) for axis in range(image.ndim)
             if image.shape[axis] > 1 and spacing[axis] <= 1.5 * finest]
    variance = float(np.mean(np.concatenate([(s[..., ::3] ** 2).ravel() for s in steps])))
    return max(2.0 * variance, 1e-12)


def graph_cut_labels(probabilities, labels, image, spacing, smoothness, contrast, fixed=None,
                     confident=0.75, band=1, cycles=1):
    """Labels minimising forest cost plus edge-aware boundary length, solved in an uncertain band.

    Minimises ``sum_p -log P_p(l_p) + smoothness * sum_{p~q} w_pq [l_p != l_q]`` over the
    6-neighbourhood, with ``w_pq = exp(-(I_p - I_q)^2 / contrast) * h_min / h_pq`` (``h`` the
    neighbour distance in mm, so thick-slice neighbours weigh less). Voxels that are painted
    (``fixed``), or whose label has probability >= ``confident`` and lies more than ``band``
    voxels from a label boundary, keep their label and act as boundary conditions. Two classes
    are solved exactly in that band by one minimum cut; more classes by alpha-expansion, where
    a move to class alpha leaves out voxels whose probability of alpha is below 10 %.

    Parameters
    ----------
    probabilities : ndarray of float, shape (n_classes, z, y, x)
    labels : ndarray of uint8, shape (z, y, x)
        Class indices (into ``probabilities``) to start from, e.g. the argmax.
    image : ndarray of float, shape (z, y, x)
        Intensity the edges are read from (normalised, lightly smoothed).
    spacing : sequence of 3 float
        Voxel spacing in mm.
    smoothness : float
        Weight of the boundary term; 0 returns ``labels`` unchanged.
    contrast : float
        ``2 sigma^2`` of the edge weight, see :func:`edge_contrast`.
    fixed : ndarray of bool, optional
        Voxels whose label must not change.
    confident : float
        Probability above which a voxel away from boundaries is left out of the solve.
    band : int
        Voxels within this many voxels (per axis) of a label boundary are solved.
    cycles : int
        Alpha-expansion cycles over all classes (more than two classes only). A second cycle
        moved a few hundred voxels of a 9-class atlas volume, took 0.2 s and cost the thin
        classes (docs/engine.md).

    Returns
    -------
    ndarray of uint8, shape (z, y, x)
        Class indices.
    """
    labels = np.array(labels, np.uint8, copy=True)
    if smoothness <= 0:
        return labels
    n_classes = probabilities.shape[0]
    shape = labels.shape
    free = near_boundary(labels, band) | (probabilities.max(axis=0) < confident)
    if fixed is not None:
        free &= ~fixed
    voxels = np.flatnonzero(free)
    if voxels.size == 0:
        return labels
    flat_labels = labels.reshape(-1)
    costs = -np.log(np.maximum(probabilities.reshape(n_classes, -1)[:, voxels], _MIN_PROBABILITY))
    image = np.asarray(image, np.float32).reshape(-1)
    if n_classes == 2:
        pairs = _neighbour_pairs(voxels, shape, image, spacing, smoothness, contrast)
        stay = np.zeros(voxels.size, np.uint8)
        flat_labels[voxels] = _solve_moves(costs[0], costs[1], pairs, stay, 1, flat_labels[pairs[1][1]])
        return labels
    # A voxel no other class reaches the move threshold at is never moved: it takes part as a
    # fixed neighbour, as outside the band (a third of the band on the largest atlas brain).
    can_move = ((costs <= _MAX_MOVE_COST) & (np.arange(n_classes)[:, None] != flat_labels[voxels])).any(axis=0)
    voxels, costs = voxels[can_move], costs[:, can_move]
    if voxels.size == 0:
        return labels
    # The band's pairs once; each move takes its share of them (_move_pairs).
    band_pairs = _neighbour_pairs(voxels, shape, image, spacing, smoothness, contrast)
    for _ in range(cycles):
        for alpha in range(n_classes):
            # An expansion move only concerns voxels not labelled alpha yet and not unlikely to be
            # alpha; the others are boundary conditions of this move, which keeps each cut small.
            movable = np.flatnonzero((flat_labels[voxels] != alpha) & (costs[alpha] <= _MAX_MOVE_COST))
            if movable.size == 0:
                continue
            moving = voxels[movable]
            pairs = _move_pairs(band_pairs, voxels, movable)
            stay = flat_labels[moving]
            stay_cost = np.take_along_axis(costs[:, movable], stay[None].astype(np.intp), axis=0)[0]
            move = _solve_moves(stay_cost, costs[alpha, movable], pairs, stay, alpha, flat_labels[pairs[1][1]])
            flat_labels[moving[move.astype(bool)]] = alpha
    return labels


def near_boundary(labels, band=1):
    """Voxels within ``band`` voxels (a box) of a voxel with another label.

    Parameters
    ----------
    labels : ndarray of non-negative int, shape (z, y, x)
    band : int

    Returns
    -------
    ndarray of bool, shape (z, y, x)
    """
    near = np.zeros(labels.shape, bool)
    counts = np.bincount(labels.reshape(-1))
    others = ndi.find_objects((labels != np.argmax(counts)).view(np.uint8))
    if not others:
        return near
    # Boundaries lie within the box of the labels other than the most common one.
    box = tuple(slice(max(s.start - band - 1, 0), s.stop + band + 1) for s in others[0])
    size = tuple(2 * band + 1 if n > 1 else 1 for n in labels.shape)
    near[box] = ndi.maximum_filter(labels[box], size=size) != ndi.minimum_filter(labels[box], size=size)
    return near


def _neighbour_pairs(voxels, shape, image, spacing, smoothness, contrast):
    """Weighted 6-neighbour pairs of the solved voxels (``voxels``: sorted flat indices).

    Returns
    -------
    inner : (ndarray, ndarray, ndarray)
        Pairs of solved voxels (positions in ``voxels``), each once, and their weights.
    outer : (ndarray, ndarray, ndarray)
        Node position, flat index of the fixed neighbour, and weight.
    """
    coordinates = np.unravel_index(voxels, shape)
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1]
    finest = min(spacing[axis] for axis in range(3) if shape[axis] > 1)
    inner, outer = [[], [], []], [[], [], []]
    for axis in range(3):
        if shape[axis] < 2:
            continue
        for sign in (1, -1):
            valid = (coordinates[axis] + sign >= 0) & (coordinates[axis] + sign < shape[axis])
            p = np.flatnonzero(valid)
            q = voxels[p] + sign * int(strides[axis])
            step = image[voxels[p]] - image[q]
            weight = smoothness * (finest / spacing[axis]) * np.exp(-(step * step) / contrast)
            q_node = _sorted_positions(voxels, q)
            both = q_node >= 0
            if sign == 1:  # pairs of two solved voxels once, from the lower one
                for store, values in zip(inner, (p[both], q_node[both], weight[both])):
                    store.append(values)
            for store, values in zip(outer, (p[~both], q[~both], weight[~both])):
                store.append(values)
    return tuple(np.concatenate(s) for s in inner), tuple(np.concatenate(s) for s in outer)


@compiled
def _sorted_positions(values, keys):
    """Position of each of the ascending ``keys`` in the ascending ``values``, -1 where absent:
    one merge pass (a binary search per key took most of :func:`_neighbour_pairs`)."""
    positions = np.empty(keys.size, np.int64)
    k = 0
    for m in range(keys.size):
        while k < values.size and values[k] < keys[m]:
            k += 1
        positions[m] = k if k < values.size and values[k] == keys[m] else -1
    return positions


def _move_pairs(band_pairs, voxels, movable):
    """The :func:`_neighbour_pairs` of ``voxels[movable]``, taken from those of ``voxels``.

    A pair of two band voxels of which only one moves becomes a pair with a fixed neighbour.
    """
    position = np.full(voxels.size, -1, np.int64)
    position[movable] = np.arange(movable.size)
    return _pairs_of_moving(*band_pairs[0], *band_pairs[1], voxels, position)


@compiled
def _pairs_of_moving(i, j, w_inner, p, q, w_outer, voxels, position):
    """:func:`_move_pairs` in one pass over the band's pairs (``position``: each band voxel's
    node in the move, -1 if it stays); the pairs with a fixed neighbour come in the order:
    the band's own, then those whose second voxel stays, then those whose first one does."""
    n_inner = n_outer = 0
    for k in range(i.size):
        moves_i, moves_j = position[i[k]] >= 0, position[j[k]] >= 0
        n_inner += moves_i and moves_j
        n_outer += moves_i != moves_j
    for k in range(p.size):
        n_outer += position[p[k]] >= 0
    inner_i, inner_j = np.empty(n_inner, np.int64), np.empty(n_inner, np.int64)
    inner_w = np.empty(n_inner, w_inner.dtype)
    outer_p, outer_q = np.empty(n_outer, np.int64), np.empty(n_outer, np.int64)
    outer_w = np.empty(n_outer, w_inner.dtype)
    m = o = 0
    for k in range(p.size):
        if position[p[k]] >= 0:
            outer_p[o], outer_q[o], outer_w[o] = position[p[k]], q[k], w_outer[k]
            o += 1
    for k in range(i.size):
        if position[i[k]] >= 0 and position[j[k]] >= 0:
            inner_i[m], inner_j[m], inner_w[m] = position[i[k]], position[j[k]], w_inner[k]
            m += 1
        elif position[i[k]] >= 0:
            outer_p[o], outer_q[o], outer_w[o] = position[i[k]], voxels[j[k]], w_inner[k]
            o += 1
    for k in range(i.size):
        if position[j[k]] >= 0 and position[i[k]] < 0:
            outer_p[o], outer_q[o], outer_w[o] = position[j[k]], voxels[i[k]], w_inner[k]
            o += 1
    return (inner_i, inner_j, inner_w), (outer_p, outer_q, outer_w)


def _solve_moves(unary0, unary1, pairs, stay, move_to, fixed_labels):
    """Binary choice per solved voxel by one minimum cut: x = 0 gives it label ``stay`` (per
    voxel), x = 1 label ``move_to``. Two classes: stay = 0, move_to = 1; an expansion move:
    stay = the current labels, move_to = alpha."""
    (i, j, w_inner), (p, q, w_outer) = pairs
    n = unary0.size
    e00 = w_inner * (stay[i] != stay[j])
    e01 = w_inner * (stay[i] != move_to)
    e10 = w_inner * (move_to != stay[j])
    # E(xi, xj) = e00 + (e10 - e00) xi - e10 xj + (e01 + e10 - e00) (1 - xi) xj   (e11 = 0)
    unary0 = unary0 + np.bincount(p, w_outer * (stay[p] != fixed_labels), n)
    unary1 = (unary1 + np.bincount(p, w_outer * (move_to != fixed_labels), n)
              + np.bincount(i, e10 - e00, n) - np.bincount(j, e10, n))
    return _min_cut(unary0, unary1, i, j, e01 + e10 - e00)


def _min_cut(unary0, unary1, i, j, pair_capacity):
    """x in {0, 1} per node minimising sum unary_x + sum pair_capacity * [x_i = 0, x_j = 1].

    The nodes the source reaches in the residual graph of a maximum flow (:func:`_source_side`)
    take x = 0, every other node x = 1: of all minimisers, the one with the smallest source side.
    """
    # A node's two terminal edges are cut alike whichever side it takes: only their difference matters.
    terminal = np.rint((unary1 - unary0) * _CAPACITY_SCALE).astype(np.int64)
    pair_capacity = np.rint(pair_capacity * _CAPACITY_SCALE).astype(np.int64)
    keep = (pair_capacity > 0) & (i != j)  # [x_i = 0, x_i = 1] never holds
    arcs = _arc_lists(unary0.size, i[keep].astype(np.int64, copy=False), j[keep].astype(np.int64, copy=False),
                      pair_capacity[keep])
    return (~_source_side(*arcs, terminal)).astype(np.uint8)


@compiled
def _arc_lists(n, tails, heads, capacity):
    """Residual arcs of edges ``tails -> heads``, grouped by tail, each with its reverse arc.

    Returns
    -------
    first : ndarray of int64, shape (n + 1,)
        The arcs out of node ``k`` are ``first[k]:first[k + 1]``.
    head, residual, sister : ndarray of int64, shape (2 * len(tails),)
        Each arc's end node, residual capacity (the edge's capacity, 0 for the reverse arc) and
        the index of its reverse arc (whose end node is this arc's start).
    """
    m = tails.size
    first = np.zeros(n + 1, np.int64)
    for e in range(m):
        first[tails[e] + 1] += 1
        first[heads[e] + 1] += 1
    for k in range(n):
        first[k + 1] += first[k]
    filled = first[:-1].copy()
    head, residual, sister = np.empty(2 * m, np.int64), np.empty(2 * m, np.int64), np.empty(2 * m, np.int64)
    for e in range(m):
        forward, backward = filled[tails[e]], filled[heads[e]]
        filled[tails[e]] += 1
        filled[heads[e]] += 1
        head[forward], residual[forward], sister[forward] = heads[e], capacity[e], backward
        head[backward], residual[backward], sister[backward] = tails[e], 0, forward
    return first, head, residual, sister


_NO_PARENT, _TERMINAL_PARENT, _ORPHAN = -1, -2, -3


@compiled
def _source_side(first, head, residual, sister, terminal):
    """The nodes the source reaches in the residual graph of a maximum flow (Boykov & Kolmogorov 2004).

    Two search trees grow from the terminals along residual arcs, one from the source and one
    from the sink; where they meet, flow is pushed along the path so found, and the nodes cut off
    from their tree by a saturated arc look for another parent in it (or leave it). When no path
    is left, the source tree holds exactly the nodes the source reaches. Boykov and Kolmogorov
    designed it for the short paths of image grids, where it is several times faster than
    augmenting along shortest paths (Dinic's algorithm).

    Parameters
    ----------
    first, head, residual, sister : ndarray of int64
        The arcs (:func:`_arc_lists`); ``residual`` is modified in place.
    terminal : ndarray of int64, shape (n,)
        Capacity from the source (positive) or to the sink (negative) of each node; modified.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    n = terminal.size
    parent = np.full(n, _NO_PARENT, np.int64)  # the arc to the parent, or a marker
    in_sink_tree = np.zeros(n, np.bool_)
    # Each node's distance to its terminal, valid at its time stamp (adoption prefers short paths).
    stamp, distance = np.zeros(n, np.int64), np.zeros(n, np.int64)
    is_active = np.zeros(n, np.bool_)
    size = n + 1
    active, active_first, active_end = np.empty(size, np.int64), 0, 0
    orphans, orphan_first, orphan_end = np.empty(size, np.int64), 0, 0
    for k in range(n):
        if terminal[k] != 0:
            in_sink_tree[k] = terminal[k] < 0
            parent[k], distance[k], is_active[k] = _TERMINAL_PARENT, 1, True
            active[active_end] = k
            active_end = (active_end + 1) % size
    time, current, unreachable = 0, -1, 1 << 62
    while True:
        node = current
        if node >= 0:
            is_active[node] = False
            if parent[node] == _NO_PARENT:
                node = -1
        while node < 0 and active_first != active_end:
            k = active[active_first]
            active_first = (active_first + 1) % size
            is_active[k] = False
            if parent[k] != _NO_PARENT:
                node = k
        if node < 0:
            break
        # Growth: the node's tree takes its free neighbours, until an arc reaches the other tree.
        sink_tree = in_sink_tree[node]
        middle = -1
        for a in range(first[node], first[node + 1]):
            if (residual[sister[a]] if sink_tree else residual[a]) <= 0:
                continue
            other = head[a]
            if parent[other] == _NO_PARENT:
                in_sink_tree[other], parent[other] = sink_tree, sister[a]
                stamp[other], distance[other] = stamp[node], distance[node] + 1
                if not is_active[other]:
                    is_active[other] = True
                    active[active_end] = other
                    active_end = (active_end + 1) % size
            elif in_sink_tree[other] != sink_tree:
                middle = sister[a] if sink_tree else a  # oriented from the source tree to the sink tree
                break
            elif stamp[other] <= stamp[node] and distance[other] > distance[node]:
                parent[other], stamp[other], distance[other] = sister[a], stamp[node], distance[node] + 1
        time += 1
        if middle < 0:
            current = -1
            continue
        is_active[node], current = True, node
        # Augmentation by the bottleneck of source -> middle's start -> middle's end -> sink.
        flow = residual[middle]
        for sink_side in (False, True):
            k = head[middle] if sink_side else head[sister[middle]]
            while parent[k] != _TERMINAL_PARENT:
                to_parent = parent[k]
                flow = min(flow, residual[to_parent] if sink_side else residual[sister[to_parent]])
                k = head[to_parent]
            flow = min(flow, -terminal[k] if sink_side else terminal[k])
        residual[middle] -= flow
        residual[sister[middle]] += flow
        for sink_side in (False, True):
            k = head[middle] if sink_side else head[sister[middle]]
            while parent[k] != _TERMINAL_PARENT:
                to_parent = parent[k]
                along = to_parent if sink_side else sister[to_parent]  # the arc the flow takes
                residual[along] -= flow
                residual[sister[along]] += flow
                next_node = head[to_parent]
                if residual[along] == 0:
                    parent[k] = _ORPHAN
                    orphans[orphan_end] = k
                    orphan_end = (orphan_end + 1) % size
                k = next_node
            terminal[k] += flow if sink_side else -flow
            if terminal[k] == 0:
                parent[k] = _ORPHAN
                orphans[orphan_end] = k
                orphan_end = (orphan_end + 1) % size
        # Adoption: each orphan takes the neighbour in its tree nearest the terminal as parent.
        while orphan_first != orphan_end:
            orphan = orphans[orphan_first]
            orphan_first = (orphan_first + 1) % size
            sink_tree = in_sink_tree[orphan]
            best, best_distance = -1, unreachable
            for a in range(first[orphan], first[orphan + 1]):
                if (residual[a] if sink_tree else residual[sister[a]]) <= 0:
                    continue
                other = head[a]
                if parent[other] == _NO_PARENT or in_sink_tree[other] != sink_tree:
                    continue
                d, k = 0, other
                while True:  # does `other` still hang from the terminal, and how far?
                    if stamp[k] == time:
                        d += distance[k]
                        break
                    to_parent = parent[k]
                    d += 1
                    if to_parent == _TERMINAL_PARENT:
                        stamp[k], distance[k] = time, 1
                        break
                    if to_parent == _ORPHAN:
                        d = unreachable
                        break
                    k = head[to_parent]
                if d == unreachable:
                    continue
                if d < best_distance:
                    best, best_distance = a, d
                k = other
                while stamp[k] != time:
                    stamp[k], distance[k] = time, d
                    d -= 1
                    k = head[parent[k]]
            if best >= 0:
                parent[orphan], stamp[orphan], distance[orphan] = best, time, best_distance + 1
                continue
            # No parent: the orphan leaves its tree; its children become orphans, and its tree
            # neighbours that could reach it become active, to grow into it again.
            parent[orphan] = _NO_PARENT
            for a in range(first[orphan], first[orphan + 1]):
                other = head[a]
                if parent[other] == _NO_PARENT or in_sink_tree[other] != sink_tree:
                    continue
                if (residual[a] if sink_tree else residual[sister[a]]) > 0 and not is_active[other]:
                    is_active[other] = True
                    active[active_end] = other
                    active_end = (active_end + 1) % size
                if parent[other] >= 0 and head[parent[other]] == orphan:
                    parent[other] = _ORPHAN
                    orphans[orphan_end] = other
                    orphan_end = (orphan_end + 1) % size
    return (parent != _NO_PARENT) & ~in_sink_tree
