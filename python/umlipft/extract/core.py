"""``extract_frames``: pick frames from an MD trajectory by time window, at random, or by
farthest-point sampling in SOAP descriptor space; every frame keeps its provenance."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..config import DriverConfig
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    import numpy as np
    from ase import Atoms

METHODS = ("random", "fps")
# Keys an MD driver may use for a frame's simulation time, with their factor to ps.
TIME_KEYS_PS = {"time_ps": 1.0, "time_fs": 1e-3, "time_ns": 1e3}
_EPS_PS = 1e-6  # times are compared in ps; below this two times are equal (0.5 fs steps)


@dataclasses.dataclass(frozen=True)
class ExtractConfig(DriverConfig):
    """Which frames to take from ``trajectory``.

    Frames between ``start_ns`` and ``stop_ns`` (inclusive) are candidates; with ``every_ns``
    only the frame nearest each ``start + k * every`` is (the study: 0.5-1.0 ns every 0.05 ns,
    11 frames). With ``count``, ``count`` frames are picked among the candidates, at random
    (``seed``) or by farthest-point sampling on mean per-atom SOAP vectors (``method: fps``).
    A frame's time comes from ``time_ps``/``time_fs``/``time_ns`` in its info, else from
    ``step * timestep_fs``, else from ``index * dump_interval_ps``.
    """

    trajectory: Path
    output: Path | None = None
    start_ns: float = 0.0
    stop_ns: float | None = None
    every_ns: float | None = None
    count: int | None = None
    method: str = "random"
    seed: int = 0
    timestep_fs: float | None = None
    dump_interval_ps: float | None = None
    format: str | None = None
    soap_r_cut_A: float = 5.0
    soap_n_max: int = 8
    soap_l_max: int = 6
    soap_sigma_A: float = 0.375

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.start_ns < 0:
            raise ConfigError(f"start_ns must be >= 0, got {self.start_ns}")
        if self.stop_ns is not None and self.stop_ns < self.start_ns:
            raise ConfigError(f"stop_ns ({self.stop_ns}) is before start_ns ({self.start_ns})")
        if self.every_ns is not None and self.every_ns <= 0:
            raise ConfigError(f"every_ns must be > 0, got {self.every_ns}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be >= 1, got {self.count}")
        for key in ("timestep_fs", "dump_interval_ps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if self.soap_r_cut_A <= 1.0 or self.soap_n_max < 1 or self.soap_l_max < 0 or self.soap_sigma_A <= 0:
            raise ConfigError("SOAP settings need r_cut > 1 Å, n_max >= 1, l_max >= 0, sigma > 0")


def frame_times_ps(frames: "Sequence[Atoms]", *, timestep_fs: float | None = None,
                   dump_interval_ps: float | None = None, source: str = "trajectory") -> "np.ndarray":
    """Simulation time of every frame in ps (see ExtractConfig for where it comes from)."""
    import numpy as np

    times = np.empty(len(frames))
    for i, atoms in enumerate(frames):
        key = next((k for k in TIME_KEYS_PS if k in atoms.info), None)
        if key is not None:
            times[i] = float(atoms.info[key]) * TIME_KEYS_PS[key]
        elif "step" in atoms.info and timestep_fs is not None:
            times[i] = int(atoms.info["step"]) * timestep_fs * 1e-3
        elif dump_interval_ps is not None:
            times[i] = i * dump_interval_ps
        else:
            has_step = "step" in atoms.info
            raise InputError(
                f"{source}: frame {i} carries no time ({', '.join(TIME_KEYS_PS)}); "
                + ("give the MD timestep (--timestep-fs) to turn its 'step' into time"
                   if has_step else "give the interval between frames (--dump-interval-ps)")
            )
    if len(times) > 1 and np.any(np.diff(times) <= 0):
        bad = int(np.argmax(np.diff(times) <= 0)) + 1
        raise InputError(f"{source}: times do not increase at frame {bad} "
                         f"({times[bad - 1]} ps then {times[bad]} ps); is this one trajectory?")
    return times


def select_window(times_ps: "np.ndarray", start_ns: float, stop_ns: float | None,
                  every_ns: float | None) -> list[int]:
    """Indices of frames in [start, stop], or of the frame nearest each grid time."""
    import numpy as np

    start = start_ns * 1e3
    stop = times_ps.max() if stop_ns is None else stop_ns * 1e3
    inside = np.flatnonzero((times_ps >= start - _EPS_PS) & (times_ps <= stop + _EPS_PS))
    if every_ns is None or inside.size == 0:
        return inside.tolist()
    every = every_ns * 1e3
    # A grid time matches the nearest frame within half the dump interval, so an 'every'
    # that is not a multiple of the dump interval still picks one frame per grid point.
    spacing = float(np.median(np.diff(times_ps))) if times_ps.size > 1 else 0.0
    tolerance = max(spacing / 2.0, _EPS_PS)
    chosen: list[int] = []
    n_grid = int(np.floor((stop - start) / every + 1e-9)) + 1
    for k in range(n_grid):
        target = start + k * every
        j = inside[np.argmin(np.abs(times_ps[inside] - target))]
        if abs(times_ps[j] - target) <= tolerance + _EPS_PS and (not chosen or chosen[-1] != j):
            chosen.append(int(j))
    return chosen


def soap_descriptors(frames: "Sequence[Atoms]", *, r_cut_A: float = 5.0, n_max: int = 8,
                     l_max: int = 6, sigma_A: float = 0.375) -> "np.ndarray":
    """One vector per frame: the mean of its per-atom SOAP vectors (DScribe, periodic)."""
    import numpy as np
    from dscribe.descriptors import SOAP

    species = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    periodic = all(atoms.pbc.all() for atoms in frames)
    soap = SOAP(species=species, r_cut=r_cut_A, n_max=n_max, l_max=l_max, sigma=sigma_A,
                periodic=periodic, average="outer", sparse=False)
    return np.asarray([soap.create(atoms) for atoms in frames], dtype=float).reshape(len(frames), -1)


def farthest_point_order(descriptors: "np.ndarray", count: int) -> list[int]:
    """Greedy max-min selection; starts from the point farthest from the centroid.

    Starting there (not at a random point) makes the choice independent of the seed and
    puts the most unusual frame first.
    """
    import numpy as np

    x = np.asarray(descriptors, dtype=float)
    first = int(np.argmax(np.linalg.norm(x - x.mean(axis=0), axis=1)))
    chosen = [first]
    dist = np.linalg.norm(x - x[first], axis=1)
    while len(chosen) < min(count, len(x)):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return chosen


def extract_frames(config: ExtractConfig) -> "list[Atoms]":
    """The selected frames, in time order, each with provenance in ``info``.

    ``info`` gains ``source_file``, ``source_index`` (0-based frame in the trajectory),
    ``time_ps``, ``selection``, and keeps ``step`` if the trajectory had it. Energies and forces
    the MD model wrote are moved to ``md_energy``/``md_forces``/``md_stress`` so that nothing
    downstream mistakes them for reference labels.
    """
    import numpy as np

    from ..io import read_frames

    config.validate()
    frames = read_frames(config.trajectory, format=config.format)
    source = str(config.trajectory)
    times = frame_times_ps(frames, timestep_fs=config.timestep_fs,
                           dump_interval_ps=config.dump_interval_ps, source=source)
    picked = select_window(times, config.start_ns, config.stop_ns, config.every_ns)
    if not picked:
        raise InputError(
            f"{source}: no frame between {config.start_ns} ns and "
            f"{config.stop_ns if config.stop_ns is not None else 'the end'}; the trajectory "
            f"spans {times.min() / 1e3:.4g}-{times.max() / 1e3:.4g} ns"
        )
    selection = "window" if config.every_ns is None else "every"
    if config.count is not None:
        if config.count > len(picked):
            raise InputError(f"{source}: asked for {config.count} frames but only {len(picked)} "
                             "lie in the window")
        if config.method == "random":
            rng = np.random.default_rng(config.seed)
            picked = sorted(int(i) for i in rng.choice(picked, size=config.count, replace=False))
        else:
            desc = soap_descriptors([frames[i] for i in picked], r_cut_A=config.soap_r_cut_A,
                                    n_max=config.soap_n_max, l_max=config.soap_l_max,
                                    sigma_A=config.soap_sigma_A)
            order = farthest_point_order(desc, config.count)
            fps_rank = {picked[j]: rank for rank, j in enumerate(order)}
            picked = sorted(picked[j] for j in order)
        selection = config.method
    out = []
    resolved = str(Path(config.trajectory).resolve())
    for i in picked:
        atoms = _without_model_results(frames[i])
        atoms.info.update({"source_file": resolved, "source_index": int(i),
                           "time_ps": float(times[i]), "selection": selection})
        if selection == "fps":
            atoms.info["fps_rank"] = fps_rank[i]
        out.append(atoms)
    return out


def _without_model_results(atoms: "Atoms") -> "Atoms":
    copy = atoms.copy()
    results = atoms.calc.results if atoms.calc is not None else {}
    for key in ("energy", "free_energy", "stress"):
        if key in results:
            copy.info[f"md_{key}"] = results[key]
        if key in copy.info:
            copy.info[f"md_{key}"] = copy.info.pop(key)
    if "forces" in results:
        copy.arrays["md_forces"] = results["forces"]
    if "forces" in copy.arrays:
        copy.arrays["md_forces"] = copy.arrays.pop("forces")
    copy.calc = None
    return copy


def run_extract(config: ExtractConfig) -> Path:
    """Extract, write the frames atomically (extxyz) and a summary beside them."""
    from ..io import write_frames
    from ..summary import RunSummary

    path = Path(config.output or Path(config.trajectory).with_suffix("").name + "-frames.extxyz")
    summary = RunSummary("extract", config, seed=config.seed)
    with summary.timed("extract"):
        frames = extract_frames(config)
    write_frames(path, frames)
    summary.results.update({
        "output": str(path),
        "n_frames": len(frames),
        "source_index": [a.info["source_index"] for a in frames],
        "time_ps": [a.info["time_ps"] for a in frames],
    })
    summary.write(path.with_name(path.name + ".summary.json"))
    return path


def parse_time_ns(text: str) -> float:
    """'0.5ns', '500ps', '500000fs' or '0.5 ns' -> 0.5 (ns). A unit is required."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ns|ps|fs)\s*", text)
    if not match:
        raise InputError(f"cannot read time {text!r}: write a number with a unit, e.g. 0.5ns, 500ps")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"ns": 1.0, "ps": 1e-3, "fs": 1e-6}[unit]
