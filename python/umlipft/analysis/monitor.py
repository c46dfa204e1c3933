"""Per-atom Q-residual and T² along a trajectory, in bounded memory.

Frames are read lazily and descriptors exist for one batch of frames at a time; per-atom results
stream to ``.npy`` files on disk. Peak memory is therefore set by ``batch_frames`` × atoms ×
descriptor width, not by the trajectory length.

Two kinds of reference lines, kept apart everywhere (summary keys, plots, legends):
- the study's band: mean ± kσ of the tracked atom's OWN Q(t) over the trajectory
  (:func:`own_band`; ``tracked.<atom>.own_band`` in the summary);
- training-set limits per element: the Q limit (Jackson-Mudholkar for a per-element PCA,
  Liu-Tang-Zhang under a global one), the T² limit, and the training-set band (mean ± kσ of the
  element's training Q; ``training_band_*`` flags).

Tracked atoms (plotted and summarised over time): the atoms of the detected events (the H, O and
Cl of an H-Cl formation with its proton transfer, the Co whose coordination changes), else the
highest-Q atom of each element; see :func:`select_tracked_atoms`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError
from ..io import atomic_path, atomic_write_text
from .frames import batched, check_same_atoms, frame_times, iter_frames
from .stats import empirical_band

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .geometry import Event
    from .pca import DescriptorPCA

Q_FILE = "q.npy"
T2_FILE = "t2.npy"
SCORES_FILE = "scores.npy"
RESULTS_FILE = "q_results.json"


@dataclasses.dataclass(frozen=True)
class QConfig(DriverConfig):
    """Settings of ``umlipft analyze q``."""

    alpha: float = 0.01  # false-alarm probability of the Q and T² limits
    # Width of the bands: the study's mean ± kσ of each tracked atom's own Q(t) over the
    # trajectory, and the training-set band per element.
    k_sigma: float = 2.0
    batch_frames: int = 4
    index: str = ":"
    format: str | None = None
    frame_interval_ps: float | None = None
    model: str | None = None  # a moved MACE model file, for --descriptor mace PCAs
    # Atoms to follow over time; empty: the atoms of the events given to analyze_trajectory (at most
    # n_track of them), else the highest-Q atom of each element. n_track = 0 follows none.
    track: tuple[int, ...] = ()
    n_track: int = 5

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.k_sigma <= 0:
            raise ConfigError(f"k_sigma must be positive, got {self.k_sigma}")
        if self.batch_frames < 1:
            raise ConfigError("batch_frames must be at least 1")
        if self.n_track < 0:
            raise ConfigError("n_track must be >= 0")


class NpyRowWriter:
    """Append equally shaped rows to a ``.npy`` file whose length is unknown in advance.

    Rows go to a raw side file; ``close`` writes the header and copies the rows in chunks, so
    memory stays bounded and a killed run leaves no half-valid ``.npy``.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: Any) -> None:
        self.path = Path(path)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._raw_path = self.path.with_name(f".{self.path.name}.rows")
        self._raw = open(self._raw_path, "wb")

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise InputError(f"row of shape {block.shape[1:]} does not fit {self.row_shape}")
        self._raw.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> Path:
        self._raw.close()
        chunk_rows = max(1, (32 << 20) // max(1, self.dtype.itemsize * int(np.prod(self.row_shape))))
        try:
            with atomic_path(self.path) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                                shape=(self.rows, *self.row_shape))
                with open(self._raw_path, "rb") as raw:
                    for start in range(0, self.rows, chunk_rows):
                        n = min(chunk_rows, self.rows - start)
                        out[start:start + n] = np.fromfile(raw, dtype=self.dtype,
                                                           count=n * int(np.prod(self.row_shape))
                                                           ).reshape(n, *self.row_shape)
                out.flush()
                del out
        finally:
            os.unlink(self._raw_path)
        return self.path

    def abort(self) -> None:
        self._raw.close()
        if self._raw_path.exists():
            os.unlink(self._raw_path)


@dataclasses.dataclass
class QResult:
    """Where the per-atom arrays are and the summary written to ``q_results.json``."""

    out_dir: Path
    summary: dict[str, Any]

    @property
    def q_path(self) -> Path:
        return self.out_dir / Q_FILE

    @property
    def t2_path(self) -> Path:
        return self.out_dir / T2_FILE

    @property
    def scores_path(self) -> Path:
        return self.out_dir / SCORES_FILE

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        mode = "r" if mmap else None
        return np.load(self.q_path, mmap_mode=mode), np.load(self.t2_path, mmap_mode=mode)


def analyze_trajectory(pca: "DescriptorPCA", frames_path: str | Path, out_dir: str | Path,
                       config: QConfig = QConfig(), events: "Sequence[Event]" = ()) -> QResult:
    """Q, T² and scores of every atom of every frame; flags against the limits; a JSON summary.

    Writes ``q.npy`` and ``t2.npy`` (n_frames × n_atoms, float64), ``scores.npy``
    (n_frames × n_atoms × k, float32) and ``q_results.json`` into ``out_dir``. ``events``
    (from :func:`umlipft.analysis.detect_events` on the same frames) choose the tracked atoms.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor = pca.descriptor(config.model)
    limits = pca.limits(config.alpha, config.k_sigma)
    frames = iter_frames(frames_path, index=config.index, format=config.format)
    writers: list[NpyRowWriter] = []
    symbols: list[str] | None = None
    n_frames = 0
    try:
        for batch in batched(frames, config.batch_frames):
            if symbols is None:
                symbols = batch[0].get_chemical_symbols()
                n_atoms = len(symbols)
                sym = np.asarray(symbols)
                q_lim, t2_lim, band_hi = _limit_vectors(sym, limits)
                writers = [NpyRowWriter(out_dir / Q_FILE, (n_atoms,), np.float64),
                           NpyRowWriter(out_dir / T2_FILE, (n_atoms,), np.float64),
                           NpyRowWriter(out_dir / SCORES_FILE, (n_atoms, pca.n_components), np.float32)]
                acc = _Accumulator(n_atoms)
            for offset, atoms in enumerate(batch):
                check_same_atoms(symbols, atoms, n_frames + offset, frames_path)
            for x in descriptor.compute(batch):
                # Evaluate one frame at a time: centred copies of a whole batch would double the peak.
                ev = pca.evaluate(x, sym)
                writers[0].append(ev.q[None])
                writers[1].append(ev.t2[None])
                writers[2].append(ev.scores[None])
                acc.add(n_frames, ev.q, ev.t2, q_lim, t2_lim, band_hi)
                n_frames += 1
            del batch
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    assert symbols is not None  # iter_frames raises on an empty file
    summary = _summary(pca, config, frames_path, np.asarray(symbols), limits, acc, n_frames, events)
    summary["tracked"] = _tracked_stats(np.load(out_dir / Q_FILE, mmap_mode="r"), summary, config.k_sigma)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(summary, indent=2) + "\n")
    return QResult(out_dir, summary)


def _limit_vectors(symbols: np.ndarray, limits: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q_lim = np.full(symbols.size, np.nan)
    t2_lim = np.full(symbols.size, np.nan)
    band_hi = np.full(symbols.size, np.nan)
    for element, lim in limits.items():
        mask = symbols == element
        q_lim[mask], t2_lim[mask], band_hi[mask] = lim.q_limit, lim.t2_limit, lim.q_band_high
    return q_lim, t2_lim, band_hi


class _Accumulator:
    """Running per-atom and per-frame statistics, O(n_atoms + n_frames) memory."""

    def __init__(self, n_atoms: int) -> None:
        self.max_q = np.full(n_atoms, -np.inf)
        self.max_q_ratio = np.full(n_atoms, -np.inf)
        self.n_q_flags = np.zeros(n_atoms, dtype=np.int64)
        self.n_t2_flags = np.zeros(n_atoms, dtype=np.int64)
        self.n_training_band_flags = np.zeros(n_atoms, dtype=np.int64)
        self.first_q_flag = np.full(n_atoms, -1, dtype=np.int64)
        self.frame_q_flags: list[int] = []
        self.frame_t2_flags: list[int] = []
        self.frame_training_band_flags: list[int] = []
        self.frame_max_q: list[float] = []

    def add(self, frame: int, q: np.ndarray, t2: np.ndarray, q_lim: np.ndarray, t2_lim: np.ndarray,
            band_hi: np.ndarray) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):
            q_flag = q > q_lim
            t2_flag = t2 > t2_lim
            band_flag = q > band_hi
            ratio = np.where(q_lim > 0, q / q_lim, np.inf * (q > 0))
        self.max_q = np.fmax(self.max_q, q)
        self.max_q_ratio = np.fmax(self.max_q_ratio, ratio)
        self.n_q_flags += q_flag
        self.n_t2_flags += t2_flag
        self.n_training_band_flags += band_flag
        self.first_q_flag[(self.first_q_flag < 0) & q_flag] = frame
        self.frame_q_flags.append(int(q_flag.sum()))
        self.frame_t2_flags.append(int(t2_flag.sum()))
        self.frame_training_band_flags.append(int(band_flag.sum()))
        self.frame_max_q.append(float(np.nanmax(q)) if np.isfinite(q).any() else float("nan"))


def _summary(pca: "DescriptorPCA", config: QConfig, frames_path: str | Path, symbols: np.ndarray,
             limits: dict, acc: _Accumulator, n_frames: int, events: "Sequence[Event]") -> dict[str, Any]:
    if config.track:
        track, reason = list(config.track), "given"
        bad = [i for i in track if not 0 <= i < symbols.size]
        if bad:
            raise InputError(f"tracked atom indices {bad} are outside 0..{symbols.size - 1}")
    else:
        track, reason = select_tracked_atoms(symbols, acc.max_q, events, config.n_track)
    per_element = {}
    for element in limits:
        mask = symbols == element
        if not mask.any():
            continue
        per_element[element] = {
            "n_atoms": int(mask.sum()),
            "q_flag_fraction": float(acc.n_q_flags[mask].sum() / (mask.sum() * n_frames)),
            "t2_flag_fraction": float(acc.n_t2_flags[mask].sum() / (mask.sum() * n_frames)),
            "training_band_flag_fraction": float(acc.n_training_band_flags[mask].sum() / (mask.sum() * n_frames)),
            "max_q": float(np.nanmax(acc.max_q[mask])),
        }
    no_pca = sorted(set(symbols) - set(limits))
    return {
        "frames": str(frames_path),
        "n_frames": n_frames,
        "n_atoms": int(symbols.size),
        "symbols": symbols.tolist(),
        "alpha": config.alpha,
        "k_sigma": config.k_sigma,
        "frame_interval_ps": config.frame_interval_ps,
        "limits": {e: lim.to_dict() for e, lim in limits.items()},
        "elements_without_pca": no_pca,
        "per_element": per_element,
        "tracked_atoms": track,
        "tracked_because": reason,
        "atoms": {
            "max_q": _nan_list(acc.max_q),
            "max_q_over_limit": _nan_list(acc.max_q_ratio),
            "q_flag_frames": acc.n_q_flags.tolist(),
            "t2_flag_frames": acc.n_t2_flags.tolist(),
            "training_band_flag_frames": acc.n_training_band_flags.tolist(),
            "first_q_flag_frame": acc.first_q_flag.tolist(),
        },
        "per_frame": {
            "q_flags": acc.frame_q_flags,
            "t2_flags": acc.frame_t2_flags,
            "training_band_flags": acc.frame_training_band_flags,
            "max_q": _nan_list(np.asarray(acc.frame_max_q)),
        },
        "files": {"q": Q_FILE, "t2": T2_FILE, "scores": SCORES_FILE},
    }


def _nan_list(values: np.ndarray) -> list[float | None]:
    # JSON has no NaN/inf: atoms without a PCA (or never finite) become null.
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def load_result(out_dir: str | Path) -> QResult:
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        raise InputError(f"{out_dir} holds no {RESULTS_FILE}; run umlipft analyze q first")
    return QResult(out_dir, json.loads(path.read_text()))


def tracked_series(result: QResult) -> dict[str, Any]:
    """Q and T² of the tracked atoms over time, read from the memory-mapped arrays; ``times`` in
    ps when the frame interval is known, else frame numbers."""
    q, t2 = result.load(mmap=True)
    track = result.summary["tracked_atoms"]
    times = frame_times(result.summary["n_frames"], result.summary["frame_interval_ps"])
    return {"times": times, "atoms": track, "q": np.asarray(q[:, track]), "t2": np.asarray(t2[:, track])}


# Events whose atoms are followed first: a bond that forms (H-Cl) or a changed coordination shell
# is the chemistry the study tracked; proton transfers on their own (water's proton hopping) last.
_EVENT_PRIORITY = {"bond_formed": 0, "coordination_change": 1, "bond_broken": 2, "proton_transfer": 3}


def select_tracked_atoms(symbols: Sequence[str], max_q: np.ndarray, events: "Sequence[Event]" = (),
                         n_max: int = 5) -> tuple[list[int], str]:
    """The atoms to follow over time, and why: ``(atoms, "events" | "highest Q per element" | "none")``.

    With events: their atoms, most important event first (bonds formed, coordination changes,
    bonds broken, proton transfers; earlier first within a kind), at most ``n_max``. A bond
    event brings the proton transfer of its H nearest in time, so an H-Cl formation gives the H,
    the O it left and the Cl, in that order. Without events: the atom with the largest Q over
    the trajectory of each element (by atomic number); elements without a PCA (NaN Q) have none.
    ``n_max = 0`` tracks nothing.
    """
    from ase.data import atomic_numbers

    if n_max <= 0:
        return [], "none"
    symbols = np.asarray(symbols)
    max_q = np.asarray(max_q, dtype=float)
    chosen: list[int] = []

    def add(atoms: Sequence[int]) -> None:
        for i in atoms:
            if int(i) not in chosen and len(chosen) < n_max:
                chosen.append(int(i))

    transfers = [e for e in events if e.kind == "proton_transfer"]
    for event in sorted(events, key=lambda e: (_EVENT_PRIORITY.get(e.kind, 9), e.frame, e.atoms)):
        if event.kind in ("bond_formed", "bond_broken"):
            own = [t for t in transfers if t.atoms[0] in event.atoms]
            if own:
                add(min(own, key=lambda t: (abs(t.frame - event.frame), t.frame)).atoms)
        add(event.atoms)
    if chosen:
        return chosen, "events"
    for element in sorted(set(symbols.tolist()), key=lambda e: atomic_numbers.get(e, 0)):
        rows = np.flatnonzero((symbols == element) & np.isfinite(max_q))
        if rows.size:
            chosen.append(int(rows[np.argmax(max_q[rows])]))
    return chosen, "highest Q per element"


def own_band(series: np.ndarray, k_sigma: float) -> dict[str, float]:
    """The study's band of one atom: mean ± kσ of its own Q(t) (or T²(t)) over the trajectory."""
    mean, std, low, high = empirical_band(series, k_sigma)
    return {"mean": mean, "std": std, "low": low, "high": high}


def _tracked_stats(q: np.ndarray, summary: dict[str, Any], k_sigma: float) -> dict[str, Any]:
    """Per tracked atom: its own band, and how often it leaves that band and its element's limit."""
    out: dict[str, Any] = {}
    for i in summary["tracked_atoms"]:
        series = np.asarray(q[:, i], dtype=float)
        symbol = summary["symbols"][i]
        band = own_band(series, k_sigma)
        limit = summary["limits"].get(symbol, {}).get("q_limit")
        out[f"{symbol}{i}"] = {
            "atom": int(i), "symbol": symbol,
            "own_band": {k: (v if np.isfinite(v) else None) for k, v in band.items()},
            "frames_above_own_band": int(np.sum(series > band["high"])) if np.isfinite(band["high"]) else 0,
            "q_limit": limit,
            "frames_above_q_limit": int(np.sum(series > limit)) if limit is not None else 0,
            "max_q": float(np.nanmax(series)) if np.isfinite(series).any() else None,
        }
    return out


def plot_tracked(result: QResult, statistic: str = "q", events: "Sequence[Event]" = (),
                 title: str = "") -> tuple["Figure", dict]:
    """Q(t) (or T²(t)) of the tracked atoms: each atom's own mean ± kσ band over the run (the
    study's), and each element's training-set limit as a separately named dashed line."""
    from .plots import plot_control_chart

    series = tracked_series(result)
    summary = result.summary
    symbols = summary["symbols"]
    k_sigma = float(summary["k_sigma"])
    values = series[statistic]
    labels = [f"{symbols[i]}{i}" for i in series["atoms"]]
    bands = [(b["low"], b["high"]) for b in (own_band(values[:, k], k_sigma) for k in range(len(labels)))]
    limits, limit_labels = [], []
    for i in series["atoms"]:
        lim = summary["limits"].get(symbols[i])
        if lim is None:
            limits.append(float("nan"))
            limit_labels.append("")
        elif statistic == "q":
            limits.append(lim["q_limit"])
            limit_labels.append(f"{symbols[i]} training-set Q limit ({lim['q_limit_method']}, "
                                f"α = {summary['alpha']:g})")
        else:
            limits.append(lim["t2_limit"])
            limit_labels.append(f"{symbols[i]} training-set T² limit (F, α = {summary['alpha']:g})")
    name = "Q" if statistic == "q" else "T²"
    return plot_control_chart(
        series["times"], values, labels, f"{name}-residual" if statistic == "q" else "Hotelling T²",
        limits=limits, limit_labels=limit_labels, bands=bands,
        band_label=f"own mean ± {k_sigma:g}σ over the run", events=events,
        xlabel=None if summary["frame_interval_ps"] is not None else "frame", log=False,
        title=title or f"{name} of the tracked atoms ({summary['tracked_because']})")
