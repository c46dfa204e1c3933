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


# ------------------------------------------------------------------------ time axes
_TIME_UNITS = (("fs", 1e-3), ("ps", 1.0), ("ns", 1e3))


def time_axis(times_ps: Sequence[float] | np.ndarray) -> tuple[np.ndarray, str, float]:
    """Times in the unit that fits their span: ``(values, "time (fs|ps|ns)", ps per unit)``.

    fs below 1 ps, ps below 1 ns, ns above: a 20-fs run reads 0-20 fs, not 0-2e-5 ns. Every
    time axis of the figures goes through here, so that all panels of one report agree."""
    t = np.asarray(times_ps, dtype=float)
    finite = t[np.isfinite(t)]
    span = float(np.max(np.abs(finite))) if finite.size else 0.0
    unit, scale = _TIME_UNITS[0]
    for name, ps in _TIME_UNITS:
        if span >= ps:
            unit, scale = name, ps
    return t / scale, f"time ({unit})", scale


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
        ax.set_title(f"{name}:\n{100 * summary['fraction_atoms_a_not_in_b']:.1f} % of {cov.label_a} "
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
def _event_x(event: "Event", xlabel: str | None, scale: float) -> float:
    """Where an event goes on a time axis: its time (ps) in the axis unit (``xlabel`` None), its
    frame on a frame axis, else its time as stored."""
    if xlabel == "frame" or event.time is None:
        return float(event.frame)
    return event.time / scale if xlabel is None else float(event.time)


def _mark_events(ax: Any, events: Sequence["Event"], xlabel: str | None, scale: float) -> list[dict[str, Any]]:
    at: dict[float, list[str]] = {}
    for event in events:
        at.setdefault(_event_x(event, xlabel, scale), []).append(event.label)
    for t, labels_at in at.items():  # one line and one joined label per time, not overprinted text
        ax.axvline(t, color="k", lw=0.8, alpha=0.6)
        ax.annotate("; ".join(labels_at), (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=6, va="top", ha="right")
    return [{"time": t, "label": label} for t, labels_at in at.items() for label in labels_at]


def plot_control_chart(times: np.ndarray, values: np.ndarray, labels: Sequence[str], ylabel: str,
                       limits: Sequence[float] | None = None, bands: Sequence[tuple[float, float]] | None = None,
                       events: Sequence["Event"] = (), xlabel: str | None = "frame", log: bool = False,
                       title: str = "", limit_labels: Sequence[str] | None = None,
                       band_label: str = "mean ± kσ") -> tuple["Figure", dict]:
    """Q(t) or T²(t) of tracked atoms: each series with its band (shaded, legend "<atom>:
    ``band_label``") and limit lines (dashed, one per distinct value, named by ``limit_labels``).

    ``xlabel=None``: ``times`` are in ps and drawn in the unit that fits them (:func:`time_axis`),
    events at their times; ``"frame"``: frame numbers, events at their frames; any other label:
    ``times`` drawn as given."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    times = np.asarray(times, dtype=float)
    values = np.asarray(values, dtype=float).reshape(times.size, -1)
    scale = 1.0
    x, label_x = times, xlabel
    if xlabel is None:
        x, label_x, scale = time_axis(times)
    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot()
    data: dict[str, Any] = {"times": x, "time_axis": label_x, "series": {}, "limits": [], "events": []}
    handles: list[Any] = []
    names: list[str] = []
    drawn_limits: dict[tuple[str, float], str] = {}
    for k, label in enumerate(labels):
        (line,) = ax.plot(x, values[:, k], lw=1.2, label=label)
        entry: dict[str, Any] = {"values": values[:, k]}
        if bands is not None and np.all(np.isfinite(bands[k])):
            ax.axhspan(bands[k][0], bands[k][1], color=line.get_color(), alpha=0.10, lw=0)
            # One legend entry per atom: its line drawn over its band's colour.
            handles.append((Patch(color=line.get_color(), alpha=0.25, lw=0), line))
            names.append(f"{label} (shaded: {band_label})")
            entry["band"] = [float(bands[k][0]), float(bands[k][1])]
        else:
            handles.append(line)
            names.append(label)
        if limits is not None and np.isfinite(limits[k]):
            name = (limit_labels[k] if limit_labels and limit_labels[k] else "control limit")
            entry["limit"] = float(limits[k])
            entry["limit_label"] = name
            key = (name, float(limits[k]))
            if key not in drawn_limits:  # atoms of one element share their element's limit
                ax.axhline(limits[k], color=line.get_color(), ls="--", lw=0.9)
                handles.append(Line2D([], [], color=line.get_color(), ls="--", lw=0.9))
                names.append(name)
                drawn_limits[key] = line.get_color()
                data["limits"].append({"label": name, "value": float(limits[k])})
        data["series"][label] = entry
    data["events"] = _mark_events(ax, events, xlabel, scale)
    if log:
        ax.set_yscale("log")
    elif np.nanmin(values, initial=np.inf) >= 0 and ax.get_ylim()[0] < 0:
        ax.set_ylim(bottom=0.0)  # a band reaching below zero says nothing about a non-negative Q
    ax.set_xlabel(label_x)
    ax.set_ylabel(ylabel)
    fig.legend(handles, names, handler_map={tuple: HandlerTuple(ndivide=1)}, fontsize=7, frameon=False,
               loc="outside lower center", ncols=2)
    ax.set_title(title or f"{ylabel} of tracked atoms", fontsize=9)
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
                           xlabel: str | None = None, ylabel: str = "energy (eV)",
                           label: str = "MD (model)", reference: str = "DFT",
                           events: Sequence["Event"] = (), title: str = "") -> tuple["Figure", dict]:
    """Potential energy along a trajectory, reference single points, other models on the same
    frames (cross-evaluation) and the times of events (vertical lines).

    ``xlabel=None``: all times are in ps and drawn in the unit that fits (:func:`time_axis`)."""
    scale, auto = 1.0, xlabel is None
    if auto:
        _, xlabel, scale = time_axis(np.asarray(times, dtype=float))
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    t_md = np.asarray(times, dtype=float) / scale
    ax.plot(t_md, energies, lw=0.8, color="#999999", label=label)
    data: dict[str, Any] = {"time_axis": xlabel,
                            "md": {"times": t_md, "energies": np.asarray(energies)}}
    if dft_times is not None and dft_energies is not None:
        t_ref = np.asarray(dft_times, dtype=float) / scale
        ax.plot(t_ref, dft_energies, "o", color="k", ms=5, label=reference)
        data["reference"] = {"label": reference, "times": t_ref, "energies": np.asarray(dft_energies)}
    markers = iter("sD^v<>")
    for name, (t, e) in (cross or {}).items():
        t_c = np.asarray(t, dtype=float) / scale
        ax.plot(t_c, e, next(markers, "s"), ms=4, mfc="none", label=name)
        data[name] = {"times": t_c, "energies": np.asarray(e)}
    data["events"] = _mark_events(ax, events, None if auto else xlabel, scale)
    ax.set_xlabel(str(xlabel))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return fig, data


def plot_binned_errors(reference_per_atom: np.ndarray, residuals: Mapping[str, Sequence[float]],
                       edges: np.ndarray, reference: str = "DFT") -> tuple["Figure", dict]:
    """Energy residuals of several models on one labelled set, binned by the frames' reference
    energy per atom: mean ± std of (E_model − E_ref)/N per bin and model, bins side by side."""
    from .stats import bin_index

    ref = np.asarray(reference_per_atom, dtype=float)
    index = bin_index(ref, np.asarray(edges, dtype=float))
    n_bins = len(edges) - 1
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    names = list(residuals)
    width = 0.8 / max(len(names), 1)
    bins = []
    for b in range(n_bins):
        inside = index == b
        bins.append({"low_eV_per_atom": float(edges[b]), "high_eV_per_atom": float(edges[b + 1]),
                     "n_frames": int(inside.sum()), "models": {}})
    for k, name in enumerate(names):
        r = np.asarray(residuals[name], dtype=float)
        means, stds = [], []
        for b in range(n_bins):
            v = r[index == b]
            mean = float(v.mean()) if v.size else float("nan")
            std = float(v.std(ddof=1)) if v.size > 1 else 0.0
            means.append(mean)
            stds.append(std)
            bins[b]["models"][name] = {"mean_meV_per_atom": mean, "std_meV_per_atom": std,
                                       "rmse_meV_per_atom": float(np.sqrt(np.mean(v**2))) if v.size else float("nan")}
        x = np.arange(n_bins) - 0.4 + width * (k + 0.5)
        ax.errorbar(x, means, yerr=stds, fmt="o", ms=4, capsize=2, label=name)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(range(n_bins), [f"{edges[b]:.3f} to {edges[b + 1]:.3f}\n({bins[b]['n_frames']} frames)"
                                  for b in range(n_bins)], fontsize=7)
    ax.set_xlabel(f"E_{reference}/N bin (eV/atom)")
    ax.set_ylabel(f"(E_model − E_{reference})/N (meV/atom)")
    fig.legend(fontsize=7, frameon=False, loc="outside right upper")
    return fig, {"bins": bins, "edges": np.asarray(edges, dtype=float)}


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
    fig = _figure(3.6 * max(len(pairs), 1), 3.9)
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
        if nonzero:  # under the panel, where it hides no bar
            ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return fig, data


def plot_coordination(times: np.ndarray, series: "CoordinationSeries", xlabel: str | None = "frame",
                      events: Sequence["Event"] = ()) -> tuple["Figure", dict]:
    """Ligand counts of each centre atom over time (steps) with coordination events marked.
    ``xlabel=None``: ``times`` in ps, drawn in the unit that fits (:func:`time_axis`)."""
    scale = 1.0
    x, label_x = np.asarray(times, dtype=float), xlabel
    if xlabel is None:
        x, label_x, scale = time_axis(x)
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    data: dict[str, Any] = {"times": x, "time_axis": label_x, "series": {}}
    for k, label in enumerate(series.column_labels()):
        ax.step(x, series.counts[:, k], where="post", label=label)
        data["series"][label] = series.counts[:, k]
    for event in events:
        if event.kind == "coordination_change":
            ax.axvline(_event_x(event, xlabel, scale), color="k", lw=0.6, ls=":")
    ax.set_xlabel(label_x)
    ax.set_ylabel("coordination number")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, frameon=False)
    return fig, data
