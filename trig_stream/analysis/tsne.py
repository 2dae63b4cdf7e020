"""A small exact t-SNE in numpy, for maps of a handful of points (the ten dimensions).

It is van der Maaten and Hinton's (2008) algorithm without the approximations large data
sets need: Gaussian affinities calibrated to a perplexity by bisection, symmetrised; a
Student-t kernel in the map; plain gradient descent with momentum and early exaggeration.
Seeded, so the same distances always give the same map.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import NDArray

EXAGGERATION: Final = 4.0
EXAGGERATED_STEPS: Final = 100
LEARNING_RATE: Final = 50.0


def _affinities(distances: NDArray[np.float64], perplexity: float) -> NDArray[np.float64]:
    """Row-wise Gaussian affinities whose entropy matches ``log(perplexity)``, symmetrised."""
    n = distances.shape[0]
    squared = distances**2
    target = math.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        others = np.delete(squared[i], i)
        low, high, beta = 0.0, math.inf, 1.0
        for _ in range(64):
            weights = np.exp(-(others - others.min()) * beta)
            row = weights / weights.sum()
            entropy = -float(np.sum(row * np.log(np.maximum(row, 1e-300))))
            if abs(entropy - target) < 1e-6:
                break
            if entropy > target:  # too flat: sharpen
                low = beta
                beta = beta * 2.0 if high == math.inf else (beta + high) / 2.0
            else:
                high = beta
                beta = (beta + low) / 2.0
        p[i, np.arange(n) != i] = row
    symmetric: NDArray[np.float64] = (p + p.T) / (2.0 * n)
    return symmetric


def tsne(
    distances: NDArray[np.float64],
    *,
    perplexity: float = 3.0,
    steps: int = 600,
    seed: int = 0,
) -> NDArray[np.float64]:
    """Embed points given by a symmetric distance matrix into 2-D.

    Args:
        distances: an ``n x n`` symmetric matrix with a zero diagonal.
        perplexity: the effective number of neighbours; lowered to ``(n - 1) / 3`` (at least
            1) for very few points.
        steps: gradient steps.
        seed: seeds the initial layout.

    Returns:
        An ``n x 2`` array of coordinates (all zeros for fewer than two points).
    """
    n = distances.shape[0]
    if n < 2:
        return np.zeros((n, 2))
    p = _affinities(distances, max(1.0, min(perplexity, (n - 1) / 3.0)))
    p = np.maximum(p, 1e-12)
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1e-4, size=(n, 2))
    velocity = np.zeros_like(y)
    for step in range(steps):
        exaggeration = EXAGGERATION if step < EXAGGERATED_STEPS else 1.0
        momentum = 0.5 if step < EXAGGERATED_STEPS else 0.8
        diff = y[:, None, :] - y[None, :, :]
        kernel = 1.0 / (1.0 + np.sum(diff**2, axis=2))
        np.fill_diagonal(kernel, 0.0)
        q = np.maximum(kernel / kernel.sum(), 1e-12)
        weights = (exaggeration * p - q) * kernel
        gradient = 4.0 * np.einsum("ij,ijk->ik", weights, diff)
        velocity = momentum * velocity - LEARNING_RATE * gradient
        y = y + velocity
        y = y - y.mean(axis=0)
    return y
