"""Per-atom Q-residual and T² along a trajectory, in bounded memory.

Frames are read lazily and descriptors exist for one batch of frames at a time; per-atom results
stream to ``.npy`` files on disk. Peak memory is therefore set by ``batch_frames`` × atoms ×
descriptor width, not by the trajectory length.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError
from ..io import atomic_path, atomic_write_text
from .frames import batched, check_same_atoms, frame_times, iter_frames

if TYPE_CHECKING:
    from .pca import DescriptorPCA

Q_FILE = "q.npy"
T2_FILE = "t2.npy"
SCORES_FILE = "scores.npy"
RESULTS_FILE = "q_results.json"


@dataclasses.dataclass(frozen=True)
class QConfig(DriverConfig):
    """Settings of ``umlipft analyze q``."""

    alpha: float = 0.01  # false-alarm probability of the Q and T² limits
    k_sigma: float = 2.0  # width of the empirical band (the study drew mean ± 2σ)
    batch_frames: int = 4
    index: str = ":"
    format: str | None = None
    frame_interval_ps: float | None = None
    model: str | None = None  # a moved MACE model file, for --descriptor mace PCAs
    track: tuple[int, ...] = ()  # atoms to plot; empty: the n_track atoms with the largest Q/limit
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
                       config: QConfig = QConfig()) -> QResult:
    """Q, T² and scores of every atom of every frame; flags against the limits; a JSON summary.

    Writes ``q.npy`` and ``t2.npy`` (n_frames × n_atoms, float64), ``scores.npy``
    (n_frames × n_atoms × k, float32) and ``q_results.json`` into ``out_dir``.
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
    summary = _summary(pca, config, frames_path, np.asarray(symbols), limits, acc, n_frames)
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
        self.n_band_flags = np.zeros(n_atoms, dtype=np.int64)
        self.first_q_flag = np.full(n_atoms, -1, dtype=np.int64)
        self.frame_q_flags: list[int] = []
        self.frame_t2_flags: list[int] = []
        self.frame_band_flags: list[int] = []
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
        self.n_band_flags += band_flag
        self.first_q_flag[(self.first_q_flag < 0) & q_flag] = frame
        self.frame_q_flags.append(int(q_flag.sum()))
        self.frame_t2_flags.append(int(t2_flag.sum()))
        self.frame_band_flags.append(int(band_flag.sum()))
        self.frame_max_q.append(float(np.nanmax(q)) if np.isfinite(q).any() else float("nan"))


def _summary(pca: "DescriptorPCA", config: QConfig, frames_path: str | Path, symbols: np.ndarray,
             limits: dict, acc: _Accumulator, n_frames: int) -> dict[str, Any]:
    order = np.argsort(-np.nan_to_num(acc.max_q_ratio, nan=-np.inf))
    track = list(config.track) or [int(i) for i in order[:config.n_track]]
    bad = [i for i in track if not 0 <= i < symbols.size]
    if bad:
        raise InputError(f"tracked atom indices {bad} are outside 0..{symbols.size - 1}")
    per_element = {}
    for element in limits:
        mask = symbols == element
        if not mask.any():
            continue
        per_element[element] = {
            "n_atoms": int(mask.sum()),
            "q_flag_fraction": float(acc.n_q_flags[mask].sum() / (mask.sum() * n_frames)),
            "t2_flag_fraction": float(acc.n_t2_flags[mask].sum() / (mask.sum() * n_frames)),
            "band_flag_fraction": float(acc.n_band_flags[mask].sum() / (mask.sum() * n_frames)),
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
        "atoms": {
            "max_q": _nan_list(acc.max_q),
            "max_q_over_limit": _nan_list(acc.max_q_ratio),
            "q_flag_frames": acc.n_q_flags.tolist(),
            "t2_flag_frames": acc.n_t2_flags.tolist(),
            "band_flag_frames": acc.n_band_flags.tolist(),
            "first_q_flag_frame": acc.first_q_flag.tolist(),
        },
        "per_frame": {
            "q_flags": acc.frame_q_flags,
            "t2_flags": acc.frame_t2_flags,
            "band_flags": acc.frame_band_flags,
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
    """Q and T² of the tracked atoms over time, read from the memory-mapped arrays."""
    q, t2 = result.load(mmap=True)
    track = result.summary["tracked_atoms"]
    times = frame_times(result.summary["n_frames"], result.summary["frame_interval_ps"])
    return {"times": times, "atoms": track, "q": np.asarray(q[:, track]), "t2": np.asarray(t2[:, track])}
