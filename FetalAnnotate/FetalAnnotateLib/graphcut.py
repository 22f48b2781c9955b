"""Edge-aware smoothing of a label map by graph cuts (Potts model, Boykov & Jolly 2001).

The forest labels each voxel on its own; :func:`graph_cut_labels` trades its probabilities
against the length of the label boundary, where a boundary across an intensity edge costs
little and one through homogeneous tissue a lot. Only an uncertain band of voxels is solved,
so a round stays interactive; maximum flows come from :func:`scipy.sparse.csgraph.maximum_flow`.
"""

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph

#: Capacities are integers for scipy's maximum flow: energies (nats) times this, or less when
#: the total source capacity (which bounds the flow) would not fit in int32.
_CAPACITY_SCALE = 1000.0
_MAX_TOTAL_CAPACITY = 2.0**30
#: Sides of a node in a minimum cut: undecided, source side (x = 0), sink side (x = 1).
_FREE, _SOURCE, _SINK = 0, 1, 2
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
            q_node = np.minimum(np.searchsorted(voxels, q), voxels.size - 1)  # voxels are sorted
            both = voxels[q_node] == q
            if sign == 1:  # pairs of two solved voxels once, from the lower one
                for store, values in zip(inner, (p[both], q_node[both], weight[both])):
                    store.append(values)
            for store, values in zip(outer, (p[~both], q[~both], weight[~both])):
                store.append(values)
    return tuple(np.concatenate(s) for s in inner), tuple(np.concatenate(s) for s in outer)


def _move_pairs(band_pairs, voxels, movable):
    """The :func:`_neighbour_pairs` of ``voxels[movable]``, taken from those of ``voxels``.

    A pair of two band voxels of which only one moves becomes a pair with a fixed neighbour.
    """
    (i, j, w_inner), (p, q, w_outer) = band_pairs
    position = np.full(voxels.size, -1, np.int64)
    position[movable] = np.arange(movable.size)
    i_node, j_node, p_node = position[i], position[j], position[p]
    both = (i_node >= 0) & (j_node >= 0)
    only_i = (i_node >= 0) & (j_node < 0)
    only_j = (i_node < 0) & (j_node >= 0)
    p_moves = p_node >= 0
    inner = (i_node[both], j_node[both], w_inner[both])
    outer = (
        np.concatenate([p_node[p_moves], i_node[only_i], j_node[only_j]]),
        np.concatenate([q[p_moves], voxels[j[only_i]], voxels[i[only_j]]]),
        np.concatenate([w_outer[p_moves], w_inner[only_i], w_inner[only_j]]),
    )
    return inner, outer


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

    Nodes whose unary preference outweighs all their pair capacities are decided first
    (:func:`_decided_nodes`); scipy's maximum flow solves the rest (about half the nodes of an
    expansion move on the 9-class atlas, 1.7x faster), with the same result as on the whole graph.
    """
    n = unary0.size
    difference = unary1 - unary0
    source_capacity, sink_capacity = np.maximum(difference, 0), np.maximum(-difference, 0)
    scale = min(_CAPACITY_SCALE, _MAX_TOTAL_CAPACITY / max(float(source_capacity.sum()), 1.0))
    source_capacity, sink_capacity, pair_capacity = (
        np.rint(c * scale).astype(np.int64) for c in (source_capacity, sink_capacity, pair_capacity)
    )
    keep = pair_capacity > 0
    side, (source_capacity, sink_capacity, i, j, pair_capacity) = _decided_nodes(
        source_capacity, sink_capacity, i[keep], j[keep], pair_capacity[keep]
    )
    x = (side == _SINK).astype(np.uint8)
    free = np.flatnonzero(side == _FREE)
    if free.size == 0:
        return x
    m = free.size
    position = np.full(n, -1, np.int64)
    position[free] = np.arange(m)
    # The same amount off both terminal edges of a node changes every cut alike.
    both = np.minimum(source_capacity[free], sink_capacity[free])
    source, sink = m, m + 1
    nodes = np.arange(m)
    rows = np.concatenate([np.full(m, source), nodes, position[i]])
    cols = np.concatenate([nodes, np.full(m, sink), position[j]])
    capacity = np.concatenate([source_capacity[free] - both, sink_capacity[free] - both, pair_capacity])
    keep = capacity > 0
    graph = sparse.csr_matrix((capacity[keep].astype(np.int32), (rows[keep], cols[keep])), shape=(m + 2, m + 2))
    flow = csgraph.maximum_flow(graph, source, sink).flow
    residual = (graph + 0 * graph.T).tocsr() - flow
    residual.data = np.maximum(residual.data, 0)
    residual.eliminate_zeros()
    reachable = csgraph.breadth_first_order(residual, source, directed=True, return_predecessors=False)
    on_sink_side = np.ones(m, np.uint8)
    on_sink_side[reachable[reachable < m]] = 0
    x[free] = on_sink_side
    return x


def _decided_nodes(source_capacity, sink_capacity, i, j, pair_capacity, max_rounds=8):
    """Nodes on the same side of every minimum cut, found from their capacities alone.

    A node whose source capacity exceeds its sink capacity plus all its outgoing pair
    capacities is on the source side of every minimum cut (moving it to the sink side always
    costs more than it saves); likewise for the sink side with the incoming pair capacities.
    Decided nodes are merged into the terminal: their pair edges to undecided nodes become
    terminal capacities, which may decide more nodes in the next round. Later rounds decide
    few nodes, hence ``max_rounds``; the minimum cut of the rest is that of the whole graph.

    Parameters
    ----------
    source_capacity, sink_capacity : ndarray of int64, shape (n,)
        Modified in place.
    i, j, pair_capacity : ndarray
        Edges ``i -> j`` with positive capacity.

    Returns
    -------
    side : ndarray of int8, shape (n,)
        ``_FREE``, ``_SOURCE`` or ``_SINK``.
    rest : tuple
        ``(source_capacity, sink_capacity, i, j, pair_capacity)`` with only the edges between
        undecided nodes.
    """
    n = source_capacity.size
    side = np.full(n, _FREE, np.int8)
    for _ in range(max_rounds):
        free = side == _FREE
        to_source = free & (source_capacity > sink_capacity + np.bincount(i, pair_capacity, n))
        to_sink = free & (sink_capacity > source_capacity + np.bincount(j, pair_capacity, n))
        if not (to_source.any() or to_sink.any()):
            break
        side[to_source] = _SOURCE
        side[to_sink] = _SINK
        # i on the source side: i -> j is cut when j is on the sink side, a source edge of j.
        merged = to_source[i] & ~to_sink[j]
        source_capacity += np.bincount(j[merged], pair_capacity[merged], n).astype(np.int64)
        merged = to_sink[j] & ~to_source[i]
        sink_capacity += np.bincount(i[merged], pair_capacity[merged], n).astype(np.int64)
        live = (side[i] == _FREE) & (side[j] == _FREE)
        i, j, pair_capacity = i[live], j[live], pair_capacity[live]
    return side, (source_capacity, sink_capacity, i, j, pair_capacity)
