"""File helpers shared by every stage: atomic writes and forgiving, checked structure reading."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .errors import InputError

if TYPE_CHECKING:
    from ase import Atoms

REF_ENERGY_KEY = "REF_energy"
REF_FORCES_KEY = "REF_forces"
REF_STRESS_KEY = "REF_stress"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed run therefore never leaves a half-written file that a rerun would trust.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                                   dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write {path}: {os_error_reason(err)}") from err
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would hide results from collaborators
    try:
        yield tmp_path
        try:
            os.replace(tmp_path, path)
        except OSError as err:
            raise InputError(f"cannot write {path}: {os_error_reason(err)}") from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def os_error_reason(err: OSError) -> str:
    """Why a file operation failed and what to do, for messages (the caller names the path)."""
    import errno

    name = err.filename
    if isinstance(err, FileExistsError) and name and not Path(name).is_dir():
        return f"{name} is a file, not a directory; choose another output location"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory; choose another output location"
    if err.errno == errno.EISDIR:
        return f"{name or 'it'} is a directory; give a file name"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror}; choose an output location you can write to"
    if err.errno == errno.ENOSPC:
        return f"{err.strerror}; free space on that file system or choose another output location"
    return str(err.strerror or err)


def sha256_file(path: str | Path) -> str:
    """Content hash used to recognise inputs a finished stage was made from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_frames(path: str | Path, frames: "Sequence[Atoms]", format: str = "extxyz") -> Path:
    """Write frames atomically (extxyz by default), keeping info and arrays."""
    from ase.io import write

    path = Path(path)
    with atomic_path(path) as tmp:
        # parallel=False: under mpiexec ASE would otherwise write from rank 0 only, silently.
        write(tmp, list(frames), format=format, parallel=False)
    return path


def read_frames(path: str | Path, index: str | int | slice = ":", format: str | None = None) -> "list[Atoms]":
    """Read structures with ASE, turning ASE's many failure modes into one clear error.

    Any format ASE reads works (extxyz, POSCAR, LAMMPS data with ``format='lammps-data'``, ...).
    Energies, forces and stresses stored by a single-point calculator (plain ``energy=`` keys in
    extxyz) are kept on ``atoms.calc``.
    """
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise InputError(f"structure file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a structure file (extxyz, POSCAR, ...)")
    if path.stat().st_size == 0:
        raise InputError(f"structure file {path} is empty")
    try:
        frames = read(path, index=index, format=format, parallel=False)
    except Exception as err:  # ASE raises many types for malformed files
        raise InputError(
            f"cannot read {path} as {'format ' + format if format else 'a structure file'}: {err}. "
            "Check the file is complete (a killed writer leaves truncated files) or pass its format"
        ) from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise InputError(f"{path} holds no structures")
    for i, atoms in enumerate(frames):
        where = f"frame {i}" if index == ":" else f"frame {i} of selection {index!r}"
        problem = non_finite_value(atoms)
        if problem:
            raise InputError(
                f"{path}: {where}, {problem}. A NaN or Inf is a diverged or corrupted result that "
                "would poison everything downstream: remove or relabel that frame"
            )
    return frames


# Quantities refused when not finite: positions, cell, and every energy, force, stress or velocity
# a file carries (plain and REF_/custom-prefixed keys alike).
_CHECKED_ARRAY_WORDS = ("force", "momenta", "velocit")
_CHECKED_INFO_WORDS = ("energy", "stress", "virial")


def non_finite_value(atoms: "Atoms") -> str | None:
    """Describe the first NaN/Inf among positions, cell, energies, forces and stresses, or None."""
    import numpy as np

    def first_bad(name: str, value, per_atom: bool) -> str | None:
        try:
            array = np.asarray(value)
        except Exception:  # ragged or odd objects are not numbers we label with
            return None
        if array.dtype.kind not in "fc" or np.isfinite(array).all():
            return None
        bad = np.argwhere(~np.isfinite(array))[0]
        if per_atom and array.ndim >= 1:
            return f"atom {int(bad[0])}: {name} is {array[tuple(bad)]}"
        return f"{name} is {array[tuple(bad)] if array.ndim else array}"

    found = first_bad("position", atoms.positions, True) or first_bad("cell", atoms.cell.array, False)
    for key, value in atoms.arrays.items():
        if not found and any(w in key.lower() for w in _CHECKED_ARRAY_WORDS):
            found = first_bad(key, value, True)
    for key, value in atoms.info.items():
        if not found and any(w in key.lower() for w in _CHECKED_INFO_WORDS):
            found = first_bad(key, value, False)
    results = getattr(atoms.calc, "results", None) or {}
    for key, value in results.items():
        if not found:
            per_atom = np.ndim(value) >= 1 and np.shape(value)[0] == len(atoms) and len(atoms) > 1
            found = first_bad(key, value, per_atom)
    return found


def require_reference_labels(frames: "Sequence[Atoms]", path: str | Path, *, forces: bool = True,
                             energy_key: str = REF_ENERGY_KEY, forces_key: str = REF_FORCES_KEY) -> None:
    """Raise InputError naming the first frame that lacks reference labels."""
    for i, atoms in enumerate(frames):
        missing = []
        if reference_energy(atoms, energy_key) is None:
            missing.append(energy_key)
        if forces and reference_forces(atoms, forces_key) is None:
            missing.append(forces_key)
        if missing:
            raise InputError(
                f"{path}: frame {i} has no {' or '.join(missing)}; label the frames first "
                f"(umlipft label {path} --calculator ...) or name the keys your file uses"
            )


def reference_energy(atoms: "Atoms", key: str = REF_ENERGY_KEY) -> float | None:
    """Reference energy from ``info[key]``, falling back to a single-point calculator's energy."""
    if key in atoms.info:
        return _finite(float(atoms.info[key]), key, atoms)
    if key == REF_ENERGY_KEY and "energy" in atoms.info:
        return _finite(float(atoms.info["energy"]), "energy", atoms)
    if _is_single_point(atoms.calc) and "energy" in atoms.calc.results:
        return _finite(float(atoms.calc.results["energy"]), "energy", atoms)
    return None


def reference_forces(atoms: "Atoms", key: str = REF_FORCES_KEY):
    """Reference forces from ``arrays[key]``, falling back to a single-point calculator's forces."""
    if key in atoms.arrays:
        return _finite(atoms.arrays[key], key, atoms)
    if key == REF_FORCES_KEY and "forces" in atoms.arrays:
        return _finite(atoms.arrays["forces"], "forces", atoms)
    if _is_single_point(atoms.calc) and "forces" in atoms.calc.results:
        return _finite(atoms.calc.results["forces"], "forces", atoms)
    return None


def reference_stress(atoms: "Atoms", key: str = REF_STRESS_KEY):
    """Reference stress as a 3x3 array (eV/Å^3, ASE sign) or None."""
    import numpy as np
    from ase.stress import voigt_6_to_full_3x3_stress

    value = atoms.info.get(key)
    if value is None and key == REF_STRESS_KEY:
        value = atoms.info.get("stress")
    if value is None and _is_single_point(atoms.calc):
        value = atoms.calc.results.get("stress")
    if value is None:
        return None
    value = _finite(np.asarray(value, dtype=float), key, atoms)
    if value.size == 6:
        return voigt_6_to_full_3x3_stress(value)
    return value.reshape(3, 3)


def _finite(value, key: str, atoms: "Atoms"):
    """``value`` itself; InputError if any of it is NaN/Inf (frames made in memory skip read_frames)."""
    import numpy as np

    array = np.asarray(value, dtype=float)
    if np.isfinite(array).all():
        return value
    bad = np.argwhere(~np.isfinite(array))
    where = f", atom {int(bad[0][0])}" if array.ndim == 2 and array.shape[0] == len(atoms) else ""
    origin = next((f" ({k}={atoms.info[k]})" for k in ("source", "label_index") if k in atoms.info), "")
    raise InputError(f"reference {key}{where} of the frame {atoms.get_chemical_formula()}{origin} is not "
                     "finite; a diverged or corrupted label must not be trained or evaluated on: remove or "
                     "relabel that frame")


def _is_single_point(calc) -> bool:
    from ase.calculators.singlepoint import SinglePointCalculator

    return isinstance(calc, SinglePointCalculator)
