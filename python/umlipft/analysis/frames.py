"""Streaming access to trajectories: frames come one batch at a time, never all at once.

Long MD trajectories (10^4-10^5 frames) do not fit in memory once per-atom descriptors are
attached, so every trajectory analysis in this package consumes an iterator from here.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, TypeVar

from ..errors import InputError

if TYPE_CHECKING:
    from ase import Atoms

T = TypeVar("T")


def iter_frames(path: str | Path, index: str = ":", format: str | None = None) -> "Iterator[Atoms]":
    """Yield the frames of any ASE-readable file lazily (``ase.io.iread``), with clear errors."""
    from ase.io import iread

    path = Path(path)
    if not path.exists():
        raise InputError(f"trajectory file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a trajectory file (extxyz, LAMMPS dump, ...)")
    if path.stat().st_size == 0:
        raise InputError(f"trajectory file {path} is empty")
    count = 0
    try:
        for atoms in iread(path, index=index, format=format):
            count += 1
            yield atoms
    except InputError:
        raise
    except Exception as err:  # ASE raises many types for malformed or truncated files
        raise InputError(
            f"cannot read frame {count} of {path}"
            f"{' as ' + format if format else ''}: {err}. A killed writer leaves a truncated last "
            "frame: cut the file before it, or pass --format if the file type is not guessed"
        ) from None
    if count == 0:
        raise InputError(f"{path} holds no frames")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Group an iterable into lists of at most ``size`` items (the last may be shorter)."""
    if size < 1:
        raise InputError(f"batch size must be at least 1, got {size}")
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def frame_times(n_frames: int, frame_interval_ps: float | None, start_ps: float = 0.0):
    """Times of frames in ps when the interval is known, else frame indices (as floats)."""
    import numpy as np

    index = np.arange(n_frames, dtype=float)
    if frame_interval_ps is None:
        return index
    return start_ps + index * frame_interval_ps


def time_label(frame_interval_ps: float | None) -> str:
    return "time (ps)" if frame_interval_ps is not None else "frame"


def check_same_atoms(reference: Sequence[str], atoms: "Atoms", frame: int, path: str | Path) -> None:
    """Per-atom time series need a fixed atom order; refuse a trajectory that changes it."""
    symbols = atoms.get_chemical_symbols()
    if list(symbols) != list(reference):
        raise InputError(
            f"{path}: frame {frame} has {len(symbols)} atoms ({atoms.get_chemical_formula()}) but frame 0 "
            f"had {len(reference)} in another order; per-atom analysis needs the same atoms in the same "
            "order in every frame (LAMMPS: dump_modify sort id)"
        )


def drop_isolated_atoms(frames: "Sequence[Atoms]") -> "list[Atoms]":
    """Training sets carry isolated-atom frames (``config_type=IsolatedAtom``, one atom in a
    vacuum box) for the E0s; they are no environment of the system and, in a descriptor PCA,
    only add elements (C, N in the aqueous sets) the system never contains."""
    return [a for a in frames if len(a) > 1 and a.info.get("config_type") != "IsolatedAtom"]


def frame_fingerprint(atoms: "Atoms", decimals: int = 6) -> str:
    """A content hash of a frame's atomic numbers, cell, periodicity and positions (rounded to
    ``10**-decimals`` Å, so that the same frame read from two extxyz files, or once in float32,
    hashes the same). Identifies frames across datasets by what they are, not by where they sit
    in a file: the naive workflow writes its subsets in pool order, not in order of addition."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.uint8).tobytes())
    for values in (atoms.cell.array, atoms.positions):
        # + 0.0 turns -0.0 into 0.0: both round from tiny values of either sign.
        digest.update((np.round(np.asarray(values, dtype=np.float64), decimals) + 0.0).tobytes())
    return digest.hexdigest()


def new_frames(frames: "Sequence[Atoms]", earlier: "Sequence[Atoms]") -> "list[Atoms]":
    """The frames of ``frames`` that ``earlier`` does not hold (by :func:`frame_fingerprint`), in
    their order: what an iteration added to a dataset, wherever the new frames sit in its file."""
    seen = {frame_fingerprint(a) for a in earlier}
    return [a for a in frames if frame_fingerprint(a) not in seen]
