"""The progressive (curriculum) part of PFA: how many training samples each epoch sees, and which.

Pure Python/numpy, no torch: the driver of a distributed run can plan epochs without a model.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

# Guards ceil() against float noise such as 0.07 * 100 == 7.000000000000001.
_EPS = 1e-9


def _ceil_fraction(fraction: float, n: int) -> int:
    return math.ceil(fraction * n - _EPS)


def progressive_schedule(
    n_train: int, first_fraction: float, stride: float, epochs_per_stage: int, total_epochs: int
) -> list[int]:
    """The training-subset size of every epoch (a list of length ``total_epochs``).

    With ``first = min(n, max(1, ceil(first_fraction * n)))`` and ``step = max(1, ceil(stride * n))``,
    epoch ``e`` (0-based) belongs to stage ``s = e // epochs_per_stage`` and sees
    ``min(n, first + s * step)`` samples. So the size grows by ``step`` every ``epochs_per_stage``
    epochs, is capped at ``n``, and stays at ``n`` for the remaining epochs.

    The schedule always ENDS on the full set: if ``total_epochs`` is too small to reach ``n`` by the
    natural growth, every epoch of the last stage (the last ``total_epochs % epochs_per_stage``
    epochs, or the last ``epochs_per_stage`` when that is 0) is forced to ``n``. When
    ``total_epochs <= epochs_per_stage`` there is only one stage, so every epoch uses the full set.

    Example: n=100, first_fraction=0.2, stride=0.2, epochs_per_stage=5, total_epochs=30 ->
    20 x5, 40 x5, 60 x5, 80 x5, 100 x10. With total_epochs=12 -> 20 x5, 40 x5, 100 x2 (forced).
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if not 0 < first_fraction <= 1 or not 0 < stride <= 1:
        raise ValueError(f"first_fraction and stride must be in (0, 1], got {first_fraction}, {stride}")
    if epochs_per_stage < 1 or total_epochs < 0:
        raise ValueError(f"need epochs_per_stage >= 1 and total_epochs >= 0, got {epochs_per_stage}, {total_epochs}")
    first = min(n_train, max(1, _ceil_fraction(first_fraction, n_train)))
    step = max(1, _ceil_fraction(stride, n_train))
    sizes = [min(n_train, first + (epoch // epochs_per_stage) * step) for epoch in range(total_epochs)]
    if sizes and sizes[-1] < n_train:
        last_stage = (total_epochs - 1) // epochs_per_stage
        sizes = [n_train if epoch // epochs_per_stage == last_stage else size for epoch, size in enumerate(sizes)]
    return sizes


def select_subset(
    similarity: np.ndarray, size: int, ordering: Literal["easy_first", "hard_first"],
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the ``size`` samples to train on, in rank order (the first is the easiest/hardest).

    ``easy_first`` ranks by highest image-text similarity first, ``hard_first`` by lowest first; equal
    similarities are ranked by lower index first, so the result is deterministic.

    With ``labels`` the ranking is within each class: a sample's key is its rank in its own class
    divided by the class's size, so every stage holds about the same share of every class (a rare class
    whose texts match its images less well is not left out of the early stages); equal shares are
    ranked by similarity, then by index.
    """
    sim = np.asarray(similarity, dtype=np.float64).reshape(-1)
    if not 0 <= size <= len(sim):
        raise ValueError(f"size must be in [0, {len(sim)}], got {size}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    if ordering == "easy_first":
        key = -sim
    elif ordering == "hard_first":
        key = sim
    else:
        raise ValueError(f"ordering must be easy_first or hard_first, got {ordering!r}")
    index = np.arange(len(sim))
    order = np.lexsort((index, key))  # last key is primary
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(sim):
            raise ValueError(f"labels has {len(labels)} entries for {len(sim)} similarities")
        share = np.empty(len(sim))
        for label in np.unique(labels):
            members = order[labels[order] == label]  # this class, in global rank order
            share[members] = (np.arange(len(members)) + 1) / len(members)
        order = np.lexsort((index, key, share))
    return order[:size].astype(np.int64)
