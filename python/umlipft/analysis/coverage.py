"""Coverage of descriptor space: which PC1/PC2 regions a dataset reaches and another does not.

Definition ("A not in B"), documented and tested:
1. Take the scores of both datasets on the same fitted PCA (PC1 and PC2 by default), per element
   when asked (each element's atoms form their own clusters).
2. Lay one grid of ``bins`` × ``bins`` equal cells over the joint bounding box of A and B
   (padded by half a cell so that extreme points fall inside).
3. A cell is covered by a dataset when it holds at least ``min_count`` of its atoms.
4. "A not in B" is the set of cells covered by A and not by B; the atoms of A that fall in those
   cells are the "A not in B" atoms, and their share of A is reported with the share of cells.

The grid resolution is the only length scale: coarser grids call more of A "covered". Because
the bounds are joint, swapping A and B changes the answer only by the asymmetric definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..errors import InputError


@dataclasses.dataclass
class Coverage:
    label_a: str
    label_b: str
    x_edges: np.ndarray
    y_edges: np.ndarray
    count_a: np.ndarray  # (bins, bins) atoms of A per cell, [x, y]
    count_b: np.ndarray
    min_count: int
    a_points_not_in_b: np.ndarray  # bool per atom of A
    b_points_not_in_a: np.ndarray

    @property
    def covered_a(self) -> np.ndarray:
        return self.count_a >= self.min_count

    @property
    def covered_b(self) -> np.ndarray:
        return self.count_b >= self.min_count

    @property
    def a_not_in_b(self) -> np.ndarray:
        return self.covered_a & ~self.covered_b

    @property
    def b_not_in_a(self) -> np.ndarray:
        return self.covered_b & ~self.covered_a

    def to_dict(self) -> dict[str, Any]:
        n_a, n_b = self.a_points_not_in_b.size, self.b_points_not_in_a.size
        return {
            "a": self.label_a, "b": self.label_b, "bins": int(self.count_a.shape[0]),
            "min_count": self.min_count,
            "x_range": [float(self.x_edges[0]), float(self.x_edges[-1])],
            "y_range": [float(self.y_edges[0]), float(self.y_edges[-1])],
            "cells_a": int(self.covered_a.sum()), "cells_b": int(self.covered_b.sum()),
            "cells_a_not_in_b": int(self.a_not_in_b.sum()), "cells_b_not_in_a": int(self.b_not_in_a.sum()),
            "atoms_a": n_a, "atoms_b": n_b,
            "fraction_atoms_a_not_in_b": float(self.a_points_not_in_b.mean()) if n_a else 0.0,
            "fraction_atoms_b_not_in_a": float(self.b_points_not_in_a.mean()) if n_b else 0.0,
        }


def coverage(scores_a: np.ndarray, scores_b: np.ndarray, bins: int = 50, min_count: int = 1,
             label_a: str = "A", label_b: str = "B", components: tuple[int, int] = (0, 1),
             bounds: tuple[float, float, float, float] | None = None) -> Coverage:
    """Grid coverage of two score sets and the regions each covers alone (see module docstring)."""
    if bins < 1 or min_count < 1:
        raise InputError("bins and min_count must be at least 1")
    a_all, fin_a = _plane(scores_a, components, label_a)
    b_all, fin_b = _plane(scores_b, components, label_b)
    a, b = a_all[fin_a], b_all[fin_b]  # atoms of elements without a PCA (NaN scores) cover nothing
    if bounds is None:
        both = np.vstack([a, b])
        if both.size == 0:
            raise InputError("coverage needs at least one atom in A or B")
        lo, hi = both.min(axis=0), both.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        pad = 0.5 * span / bins
        bounds = (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])
    x_edges = np.linspace(bounds[0], bounds[1], bins + 1)
    y_edges = np.linspace(bounds[2], bounds[3], bins + 1)
    count_a = np.histogram2d(a[:, 0], a[:, 1], bins=(x_edges, y_edges))[0].astype(np.int64)
    count_b = np.histogram2d(b[:, 0], b[:, 1], bins=(x_edges, y_edges))[0].astype(np.int64)
    covered_a, covered_b = count_a >= min_count, count_b >= min_count
    a_only = np.zeros(fin_a.size, dtype=bool)
    a_only[fin_a] = _points_in(a, x_edges, y_edges, covered_a & ~covered_b)
    b_only = np.zeros(fin_b.size, dtype=bool)
    b_only[fin_b] = _points_in(b, x_edges, y_edges, covered_b & ~covered_a)
    return Coverage(label_a, label_b, x_edges, y_edges, count_a, count_b, min_count, a_only, b_only)


def coverage_by_element(scores_a: np.ndarray, symbols_a: Sequence[str], scores_b: np.ndarray,
                        symbols_b: Sequence[str], **kwargs: Any) -> dict[str, Coverage]:
    """One :func:`coverage` per element present in A or B (each with its own joint bounds)."""
    from ase.data import atomic_numbers

    sa, sb = np.asarray(symbols_a), np.asarray(symbols_b)
    out = {}
    for element in sorted(set(sa) | set(sb), key=lambda s: atomic_numbers.get(s, 0)):
        out[element] = coverage(np.asarray(scores_a)[sa == element], np.asarray(scores_b)[sb == element],
                                **kwargs)
    return out


def _plane(scores: np.ndarray, components: tuple[int, int], label: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[1] <= max(components):
        raise InputError(f"{label}: scores of shape {scores.shape} lack components {components}")
    plane = scores[:, list(components)]
    return plane, np.isfinite(plane).all(axis=1)


def _points_in(points: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Which points lie in the marked cells, binned exactly as numpy.histogram2d bins them."""
    if points.size == 0:
        return np.zeros(0, dtype=bool)
    ix = _bin_index(points[:, 0], x_edges)
    iy = _bin_index(points[:, 1], y_edges)
    inside = (ix >= 0) & (iy >= 0)
    out = np.zeros(points.shape[0], dtype=bool)
    out[inside] = cells[ix[inside], iy[inside]]
    return out


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # histogram2d's rule: bins are half-open [e_i, e_{i+1}) except the last, which is closed.
    index = np.searchsorted(edges, values, side="right") - 1
    index[values == edges[-1]] = edges.size - 2
    index[(values < edges[0]) | (values > edges[-1])] = -1
    return index
