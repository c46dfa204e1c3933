"""Figures of the study's analyses, built with matplotlib's object API (no pyplot state).

Every ``plot_*`` function returns ``(figure, data)``: ``data`` holds exactly the numbers drawn, so
:func:`save_figure` can store them beside the PNG (``NAME.json``) for the report and for checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .coverage import Coverage
    from .geometry import BondDistribution, CoordinationSeries, Event

# Fixed per-element colours (colour-blind-safe Okabe-Ito first), so that figures of one study match.
_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
            "#999999", "#882255"]
_ELEMENT_ORDER = ["H", "O", "C", "N", "Cl", "Li", "Co", "S", "F", "Na"]


def element_colors(elements: Sequence[str]) -> dict[str, str]:
    colors = {}
    spare = iter(_PALETTE[len(_ELEMENT_ORDER):] + _PALETTE)
    for e in elements:
        colors[e] = _PALETTE[_ELEMENT_ORDER.index(e)] if e in _ELEMENT_ORDER else next(spare)
    return colors


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save_figure(fig: "Figure", data: Mapping[str, Any], path: str | Path, caption: str = "") -> Path:
    """Write the PNG atomically and ``path.json`` with the caption and the plotted numbers."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    sidecar = {"figure": path.name, "caption": caption, "data": _jsonable(data)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1, allow_nan=False) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _elements(symbols: Sequence[str]) -> list[str]:
    from ase.data import atomic_numbers

    return sorted(set(str(s) for s in symbols), key=lambda s: atomic_numbers.get(s, 0))


# ------------------------------------------------------------------------ PCA map
def plot_pca_map(scores: np.ndarray, symbols: Sequence[str],
                 explained_variance_ratio: Sequence[float] | None = None, title: str = "",
                 components: tuple[int, int] = (0, 1)) -> tuple["Figure", dict]:
    """PC scores of every atom, one colour per element."""
    scores, symbols = np.asarray(scores), np.asarray(symbols)
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    colors = element_colors(_elements(symbols))
    data: dict[str, Any] = {"components": list(components), "points": {}}
    cx, cy = components
    for element in _elements(symbols):
        pts = scores[symbols == element][:, [cx, cy]]
        pts = pts[np.isfinite(pts).all(axis=1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, color=colors[element], label=element, rasterized=True)
        data["points"][element] = pts
    evr = list(explained_variance_ratio) if explained_variance_ratio is not None else None
    ax.set_xlabel(f"PC{cx + 1}" + (f" ({100 * evr[cx]:.1f} %)" if evr else ""))
    ax.set_ylabel(f"PC{cy + 1}" + (f" ({100 * evr[cy]:.1f} %)" if evr else ""))
    if evr:
        data["explained_variance_ratio"] = evr
    ax.legend(markerscale=3, frameon=False, fontsize=8)
    ax.set_title(title or "Per-atom descriptors in PC space")
    return fig, data


# ----------------------------------------------------------------------- coverage
COVERAGE_BOTH, COVERAGE_A_ONLY, COVERAGE_B_ONLY = 1, 2, 3


def coverage_categories(cov: "Coverage") -> np.ndarray:
    """Cell map (bins × bins, [x, y]): 0 empty, 1 both, 2 A only, 3 B only."""
    cat = np.zeros(cov.count_a.shape, dtype=int)
    cat[cov.covered_a & cov.covered_b] = COVERAGE_BOTH
    cat[cov.a_not_in_b] = COVERAGE_A_ONLY
    cat[cov.b_not_in_a] = COVERAGE_B_ONLY
    return cat


def plot_coverage(panels: Mapping[str, "Coverage"]) -> tuple["Figure", dict]:
    """One panel per comparison (element or iteration): cells covered by both, A only, B only."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(panels)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig = _figure(4.0 * cols, 3.6 * rows)
    cmap = ListedColormap(["white", "#bbbbbb", "#D55E00", "#0072B2"])
    data: dict[str, Any] = {}
    for k, (name, cov) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        cat = coverage_categories(cov)
        # pcolormesh wants [y, x]; categories are [x, y] as numpy.histogram2d returns them.
        ax.pcolormesh(cov.x_edges, cov.y_edges, cat.T, cmap=cmap, vmin=-0.5, vmax=3.5)
        summary = cov.to_dict()
        ax.set_title(f"{name}: {100 * summary['fraction_atoms_a_not_in_b']:.1f} % of {cov.label_a} "
                     f"not in {cov.label_b}", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        data[name] = {"categories": cat, **summary}
    first = next(iter(panels.values()))
    fig.legend(handles=[Patch(color="#bbbbbb", label="both"),
                        Patch(color="#D55E00", label=f"{first.label_a} only"),
                        Patch(color="#0072B2", label=f"{first.label_b} only")], loc="outside lower center",
               ncols=3, frameon=False)
    return fig, data


# ------------------------------------------------------------------ control charts
def plot_control_chart(times: np.ndarray, values: np.ndarray, labels: Sequence[str], ylabel: str,
                       limits: Sequence[float] | None = None, bands: Sequence[tuple[float, float]] | None = None,
                       events: Sequence["Event"] = (), xlabel: str = "frame", log: bool = False,
                       title: str = "") -> tuple["Figure", dict]:
    """Q(t) or T²(t) of tracked atoms with each atom's limit (dashed), band (shaded) and events."""
    times = np.asarray(times, dtype=float)
    values = np.asarray(values, dtype=float).reshape(times.size, -1)
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    data: dict[str, Any] = {"times": times, "series": {}, "events": []}
    for k, label in enumerate(labels):
        (line,) = ax.plot(times, values[:, k], lw=1.2, label=label)
        entry: dict[str, Any] = {"values": values[:, k]}
        if limits is not None and np.isfinite(limits[k]):
            ax.axhline(limits[k], color=line.get_color(), ls="--", lw=0.8)
            entry["limit"] = float(limits[k])
        if bands is not None and np.all(np.isfinite(bands[k])):
            ax.axhspan(bands[k][0], bands[k][1], color=line.get_color(), alpha=0.08, lw=0)
            entry["band"] = [float(bands[k][0]), float(bands[k][1])]
        data["series"][label] = entry
    at: dict[float, list[str]] = {}
    for event in events:
        t = event.time if event.time is not None and xlabel != "frame" else float(event.frame)
        at.setdefault(t, []).append(event.label)
        data["events"].append({"time": t, "label": event.label})
    for t, labels_at in at.items():  # one line and one joined label per time, not overprinted text
        ax.axvline(t, color="k", lw=0.8, alpha=0.6)
        ax.annotate("; ".join(labels_at), (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=6, va="top", ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False, ncols=2)
    ax.set_title(title or f"{ylabel} of tracked atoms (dashed: control limit, shaded: mean ± kσ)",
                 fontsize=9)
    return fig, data


# ------------------------------------------------------------ model-level figures
def plot_residuals(naive: Mapping[str, Sequence[float]], periodic: Mapping[str, Sequence[float]],
                   ylabel: str = "(E_model − E_DFT)/N (meV/atom)") -> tuple["Figure", dict]:
    """Residual per model, naive and periodic panels: every frame (dots) and mean ± std (bars)."""
    fig = _figure(8.0, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    data: dict[str, Any] = {}
    for ax, (panel, models) in zip(axes, (("naive", naive), ("periodic", periodic))):
        data[panel] = {}
        for x, (name, values) in enumerate(models.items()):
            v = np.asarray(values, dtype=float)
            # Deterministic spread of the dots: figures must not change between runs.
            jitter = (np.arange(v.size) - (v.size - 1) / 2) * (0.3 / max(v.size, 1))
            ax.scatter(x + jitter, v, s=8, alpha=0.5, color="#999999")
            mean, std = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
            ax.errorbar([x], [mean], yerr=[std], fmt="o", color="#D55E00" if panel == "naive" else "#0072B2",
                        capsize=3)
            data[panel][name] = {"values": v, "mean": mean, "std": std}
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xticks(range(len(models)), list(models), rotation=45, fontsize=8)
        ax.set_title(panel)
    axes[0].set_ylabel(ylabel)
    return fig, data


def plot_energy_trajectory(times: np.ndarray, energies: np.ndarray, dft_times: np.ndarray | None = None,
                           dft_energies: np.ndarray | None = None,
                           cross: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                           xlabel: str = "time (ns)", ylabel: str = "energy (eV)",
                           label: str = "MD (model)") -> tuple["Figure", dict]:
    """Potential energy along a trajectory, DFT single points, and other models on the same frames."""
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    ax.plot(times, energies, lw=0.8, color="#999999", label=label)
    data: dict[str, Any] = {"md": {"times": np.asarray(times), "energies": np.asarray(energies)}}
    if dft_times is not None and dft_energies is not None:
        ax.plot(dft_times, dft_energies, "o", color="k", ms=4, label="DFT")
        data["dft"] = {"times": np.asarray(dft_times), "energies": np.asarray(dft_energies)}
    for name, (t, e) in (cross or {}).items():
        ax.plot(t, e, "s", ms=3, label=name)
        data[name] = {"times": np.asarray(t), "energies": np.asarray(e)}
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, frameon=False)
    return fig, data


def plot_force_parity(reference: np.ndarray, predicted: np.ndarray, symbols: Sequence[str],
                      title: str = "") -> tuple["Figure", dict]:
    """Force components, model against reference, one panel per element with its RMSE."""
    ref = np.asarray(reference, dtype=float).reshape(-1, 3)
    pred = np.asarray(predicted, dtype=float).reshape(-1, 3)
    symbols = np.asarray(symbols)
    elements = _elements(symbols)
    cols = min(len(elements), 4)
    rows = int(np.ceil(len(elements) / cols))
    fig = _figure(3.0 * cols, 3.0 * rows)
    colors = element_colors(elements)
    data: dict[str, Any] = {}
    for k, element in enumerate(elements):
        ax = fig.add_subplot(rows, cols, k + 1)
        r, p = ref[symbols == element].ravel(), pred[symbols == element].ravel()
        rmse = float(np.sqrt(np.mean((p - r) ** 2)))
        ax.scatter(r, p, s=3, alpha=0.4, color=colors[element], rasterized=True)
        lo, hi = float(min(r.min(), p.min())), float(max(r.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.6)
        ax.set_title(f"{element}: RMSE {1000 * rmse:.0f} meV/Å", fontsize=9)
        ax.set_xlabel("reference F (eV/Å)", fontsize=8)
        ax.set_ylabel("model F (eV/Å)", fontsize=8)
        data[element] = {"rmse_eV_A": rmse, "n_components": int(r.size)}
    if title:
        fig.suptitle(title)
    return fig, data


# ------------------------------------------------------------------- chemistry
def plot_bond_histograms(datasets: Mapping[str, Mapping[str, "BondDistribution"]]) -> tuple["Figure", dict]:
    """Bond-length distributions per pair (panels), one line per dataset (e.g. U vs FT1 frames)."""
    pairs: list[str] = []
    for dists in datasets.values():
        pairs.extend(p for p in dists if p not in pairs)
    fig = _figure(3.6 * max(len(pairs), 1), 3.2)
    data: dict[str, Any] = {}
    for k, pair in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        data[pair] = {}
        for name, dists in datasets.items():
            if pair not in dists or dists[pair].n_bonds == 0:
                continue
            dist = dists[pair]
            density = dist.density
            ax.stairs(density, dist.edges, label=f"{name} (mean {dist.mean_A:.3f} Å)")
            data[pair][name] = {"edges": dist.edges, "density": density, "mean_A": dist.mean_A,
                                "n_bonds": dist.n_bonds}
        nonzero = [d[pair] for d in datasets.values() if pair in d and d[pair].n_bonds]
        if nonzero:
            ax.set_xlim(min(d.min_d for d in nonzero) - 0.05, max(d.max_d for d in nonzero) + 0.05)
        else:
            ax.text(0.5, 0.5, "no pairs within the cutoff", transform=ax.transAxes, ha="center")
        ax.set_xlabel(f"{pair} distance (Å)")
        ax.set_ylabel("density (1/Å)")
        if nonzero:
            ax.legend(fontsize=7, frameon=False)
    return fig, data


def plot_coordination(times: np.ndarray, series: "CoordinationSeries", xlabel: str = "frame",
                      events: Sequence["Event"] = ()) -> tuple["Figure", dict]:
    """Ligand counts of each centre atom over time (steps) with coordination events marked."""
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    data: dict[str, Any] = {"times": np.asarray(times), "series": {}}
    for k, label in enumerate(series.column_labels()):
        ax.step(times, series.counts[:, k], where="post", label=label)
        data["series"][label] = series.counts[:, k]
    for event in events:
        if event.kind == "coordination_change":
            t = event.time if event.time is not None and xlabel != "frame" else float(event.frame)
            ax.axvline(t, color="k", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("coordination number")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, frameon=False)
    return fig, data
