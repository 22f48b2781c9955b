"""Overlap measures for comparing a segmentation with a reference."""

import numpy as np


def dice(a, b):
    """Dice coefficient of two boolean masks.

    Parameters
    ----------
    a, b : ndarray of bool
        Masks of the same shape.

    Returns
    -------
    float
        ``2 |a & b| / (|a| + |b|)``; 1.0 when both masks are empty.
    """
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(np.logical_and(a, b)) / total)
