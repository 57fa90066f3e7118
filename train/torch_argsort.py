"""The order `torch.argsort(row, descending=True)` gives on the CPU, ties included.

LAION's metric code (`get_metrics`, `evaluate_clotho_audiocaps`, the zero-shot script) moves its logits
to the CPU and ranks them with `torch.argsort(..., descending=True)`, which is `torch.sort(stable=False)`:
for a float row that is libstdc++'s `std::sort` (introsort: median-of-three quicksort down to blocks
of 16, heapsort past a depth limit, then one insertion sort) over (value, index) pairs, compared by
value alone. Equal values therefore come out in whatever order the partitioning leaves them: a row of
40 equal values sorts to 30, 21, …, 29, 20, 31, …, 10, 1, …, 9, 0, 11, …. When a ground truth ties
with another entry, LAION's rank is that artefact, so matching its numbers means replaying the sort.

`descending_order` replays it step for step in Python. It is only called for the few rows whose
ground truth ties (see metrics.py); a row of 25 000 entries takes a few tenths of a second.
"""
from __future__ import annotations

import numpy as np

_INSERTION_BLOCK = 16   # libstdc++'s _S_threshold: introsort stops partitioning below this size


def descending_order(row: np.ndarray) -> np.ndarray:
    """(C,) int64: the permutation torch.argsort(torch.from_numpy(row), descending=True) returns on CPU.
    Row values must not be NaN (torch puts NaN first; a NaN logit is a broken model, not a tie)."""
    values = np.asarray(row)
    if values.ndim != 1:
        raise ValueError(f"descending_order sorts one row, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("descending_order: the row holds NaN")
    v = values.astype(np.float64).tolist()    # exact for float32 and below
    idx = list(range(len(v)))
    _introsort_loop(v, idx, 0, len(v), 2 * (len(v).bit_length() - 1) if v else 0)
    # the final insertion sort moves an entry left only past strictly smaller ones: a stable sort
    # of the arrangement the loop left
    arranged = np.asarray(v)
    return np.asarray(idx, np.int64)[np.argsort(-arranged, kind="stable")]


def _swap(v, idx, i, j):
    v[i], v[j] = v[j], v[i]
    idx[i], idx[j] = idx[j], idx[i]


def _introsort_loop(v, idx, first, last, depth):
    while last - first > _INSERTION_BLOCK:
        if depth == 0:
            _heap_sort(v, idx, first, last)
            return
        depth -= 1
        cut = _partition_pivot(v, idx, first, last)
        _introsort_loop(v, idx, cut, last, depth)
        last = cut


def _partition_pivot(v, idx, first, last):
    """__unguarded_partition_pivot: median of (first+1, mid, last-1) moved to first, Hoare partition."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    if v[a] > v[b]:
        median = b if v[b] > v[c] else (c if v[a] > v[c] else a)
    elif v[a] > v[c]:
        median = a
    elif v[b] > v[c]:
        median = c
    else:
        median = b
    _swap(v, idx, first, median)
    pivot, lo, hi = v[first], first + 1, last
    while True:
        while v[lo] > pivot:
            lo += 1
        hi -= 1
        while pivot > v[hi]:
            hi -= 1
        if not lo < hi:
            return lo
        _swap(v, idx, lo, hi)
        lo += 1


def _heap_sort(v, idx, first, last):
    """std::partial_sort(first, last, last): make_heap then sort_heap, with libstdc++'s __adjust_heap."""
    n = last - first
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(v, idx, first, parent, n, (v[first + parent], idx[first + parent]))
    while last - first > 1:
        last -= 1
        value = (v[last], idx[last])
        v[last], idx[last] = v[first], idx[first]
        _adjust_heap(v, idx, first, 0, last - first, value)


def _adjust_heap(v, idx, first, hole, n, value):
    top, child = hole, hole
    while child < (n - 1) // 2:
        child = 2 * (child + 1)
        if v[first + child] > v[first + child - 1]:      # comp(child, child - 1), comp = "sorts before"
            child -= 1
        v[first + hole], idx[first + hole] = v[first + child], idx[first + child]
        hole = child
    if n % 2 == 0 and child == (n - 2) // 2:
        child = 2 * (child + 1)
        v[first + hole], idx[first + hole] = v[first + child - 1], idx[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2                               # __push_heap
    while hole > top and v[first + parent] > value[0]:
        v[first + hole], idx[first + hole] = v[first + parent], idx[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    v[first + hole], idx[first + hole] = value
