"""``build_system``: the study's aqueous and DES boxes packed by Packmol at a target density."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DriverConfig
from ..errors import ConfigError, ExternalProgramError, InputError
from .molecules import SPECIES, template

if TYPE_CHECKING:
    import numpy as np
    from ase import Atoms

SYSTEMS = ("aqueous", "des")
# Defaults per system: aqueous is the study's 55 H2O + LiCl + CoCl2 (about 1.0 g/cm3, the
# density of the shared DFT frames); DES is ChCl:CA 1:2 (3:6) + LiCl + CoCl2 at 1.2 g/cm3,
# inside the study's 1.0-1.25 g/cm3 range.
DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "aqueous": {"water": 55, "choline_chloride": 0, "citric_acid": 0, "licl": 1, "cocl2": 1},
    "des": {"water": 0, "choline_chloride": 3, "citric_acid": 6, "licl": 1, "cocl2": 1},
}
DEFAULT_DENSITY_G_CM3 = {"aqueous": 1.0, "des": 1.2}
# Liquids of these components lie well inside this range; outside it Packmol either cannot
# pack (too dense) or the box is a gas that MD would collapse (too dilute).
DENSITY_RANGE_G_CM3 = (0.3, 2.5)
MIN_SEPARATION_A = 1.5  # hard floor checked after packing, whatever Packmol reports


@dataclasses.dataclass(frozen=True)
class BuildConfig(DriverConfig):
    """Composition, density and packing settings for one start structure.

    Counts left as ``None`` take the system's defaults (``DEFAULT_COUNTS``).
    """

    system: str = "aqueous"
    output: Path | None = None
    n_water: int | None = None
    n_choline_chloride: int | None = None
    n_citric_acid: int | None = None
    n_licl: int | None = None
    n_cocl2: int | None = None
    density_g_cm3: float | None = None
    tolerance_A: float = 2.0
    seed: int = 0
    packmol: str = "packmol"
    packmol_timeout_s: float = 600.0

    def validate(self) -> None:
        if self.system not in SYSTEMS:
            raise ConfigError(f"system must be one of {', '.join(SYSTEMS)}, got {self.system!r}")
        for key, value in self.counts().items():
            if value < 0:
                raise ConfigError(f"n_{key} must be >= 0, got {value}")
        if sum(self.counts().values()) == 0:
            raise ConfigError("the box would be empty: every molecule count is 0")
        lo, hi = DENSITY_RANGE_G_CM3
        if not lo <= self.density() <= hi:
            raise ConfigError(
                f"density_g_cm3={self.density()} is impossible for a liquid of these molecules; "
                f"use a value between {lo} and {hi} (the study used about 1.0-1.25)"
            )
        if not 1.5 <= self.tolerance_A <= 3.5:
            raise ConfigError(f"tolerance_A must be between 1.5 and 3.5 Å, got {self.tolerance_A}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")

    def counts(self) -> dict[str, int]:
        defaults = DEFAULT_COUNTS.get(self.system, DEFAULT_COUNTS["aqueous"])
        return {key: default if getattr(self, f"n_{key}") is None else int(getattr(self, f"n_{key}"))
                for key, default in defaults.items()}

    def density(self) -> float:
        if self.density_g_cm3 is not None:
            return float(self.density_g_cm3)
        return DEFAULT_DENSITY_G_CM3.get(self.system, 1.0)


def species_counts(config: BuildConfig) -> dict[str, int]:
    """Molecules and ions to place, salts split into ions (LiCl -> Li + Cl)."""
    c = config.counts()
    counts = {
        "water": c["water"],
        "choline": c["choline_chloride"],
        "citric_acid": c["citric_acid"],
        "Li": c["licl"],
        "Co": c["cocl2"],
        "Cl": c["choline_chloride"] + c["licl"] + 2 * c["cocl2"],
    }
    return {name: n for name, n in counts.items() if n > 0}


def find_packmol(command: str = "packmol") -> str:
    path = shutil.which(command)
    if path is None:
        raise InputError(
            f"Packmol ({command!r}) is not on PATH. Install it with "
            "'sudo apt-get install -y packmol' (or run scripts/install-system-packages.sh)"
        )
    return path


def build_system(config: BuildConfig) -> "Atoms":
    """Pack the configured molecules into a periodic cubic box at the target density.

    Packmol keeps every pair of atoms from different molecules at least ``tolerance_A`` apart.
    Packmol 20.14 (Debian 12) has no periodic mode, so molecules are packed into the box shrunk
    by ``tolerance_A / 2`` on each side: atoms near opposite faces are then also at least
    ``tolerance_A`` apart through the periodic boundary. The result is checked afterwards
    with minimum-image distances.
    """
    import numpy as np
    from ase import Atoms
    from ase.data import atomic_masses, atomic_numbers
    from ase.units import _Nav

    config.validate()
    packmol = find_packmol(config.packmol)
    counts = species_counts(config)
    charge = sum(SPECIES[name].charge * n for name, n in counts.items())
    if charge != 0:
        raise ConfigError(f"composition {counts} has net charge {charge:+d} e; adjust the counts")

    templates = {name: template(name) for name in counts}
    mass_amu = sum(templates[name].get_masses().sum() * n for name, n in counts.items())
    volume_A3 = mass_amu / (config.density() * _Nav) * 1e24
    edge = volume_A3 ** (1.0 / 3.0)
    margin = config.tolerance_A / 2.0
    for name, atoms in templates.items():
        extent = np.ptp(atoms.positions, axis=0).max() if len(atoms) > 1 else 0.0
        if extent + 2 * margin > edge:
            raise ConfigError(
                f"a {edge:.2f} Å box (density {config.density()} g/cm3) cannot hold {name} "
                f"({extent:.2f} Å across) with {config.tolerance_A} Å clearance; add molecules "
                "or lower the density"
            )

    with tempfile.TemporaryDirectory(prefix="umlipft-packmol-") as tmp:
        workdir = Path(tmp)
        lines = [
            f"tolerance {config.tolerance_A}",
            "filetype xyz",
            "output packed.xyz",
            f"seed {config.seed + 1}",  # Packmol treats seed -1 as 'from the clock'; keep >= 1
            "",
        ]
        order: list[str] = []
        for name, n in counts.items():
            templates[name].write(workdir / f"{name}.xyz", format="xyz")
            lines += [
                f"structure {name}.xyz",
                f"  number {n}",
                f"  inside box {margin:.4f} {margin:.4f} {margin:.4f} "
                f"{edge - margin:.4f} {edge - margin:.4f} {edge - margin:.4f}",
                "end structure",
                "",
            ]
            order += [name] * n
        (workdir / "pack.inp").write_text("\n".join(lines))
        t0 = time.perf_counter()
        try:
            with open(workdir / "pack.inp") as stdin:
                proc = subprocess.run([packmol], stdin=stdin, cwd=workdir, capture_output=True,
                                      text=True, timeout=config.packmol_timeout_s)
        except subprocess.TimeoutExpired:
            raise ExternalProgramError(
                f"Packmol did not finish in {config.packmol_timeout_s} s; lower the density or "
                "the tolerance"
            ) from None
        output = workdir / "packed.xyz"
        if proc.returncode != 0 or "Success!" not in proc.stdout or not output.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ExternalProgramError(
                f"Packmol could not pack {counts} into a {edge:.2f} Å box at "
                f"{config.density()} g/cm3 (exit {proc.returncode}). Lower the density or the "
                f"tolerance. Packmol said:\n{tail}"
            )
        packed = _read_packmol_xyz(output)
        pack_time = time.perf_counter() - t0

    expected = [s for name in order for s in templates[name].get_chemical_symbols()]
    symbols, positions = packed
    if symbols != expected:
        raise ExternalProgramError("Packmol's output atoms do not match the input molecules")
    mol_id = np.concatenate([np.full(len(templates[name]), i, dtype=int) for i, name in enumerate(order)])
    atoms = Atoms(symbols, positions=positions, cell=[edge, edge, edge], pbc=True)
    atoms.arrays["mol_id"] = mol_id
    atoms.info.update({
        "system": config.system,
        "seed": config.seed,
        "density_g_cm3": float(sum(atomic_masses[atomic_numbers[s]] for s in symbols)
                               / (_Nav * atoms.get_volume() * 1e-24)),
        "builder": "umlipft build (packmol)",
        "packmol_tolerance_A": config.tolerance_A,
        "packmol_time_s": round(pack_time, 3),
        "composition": " ".join(f"{name}:{n}" for name, n in counts.items()),
    })
    closest = min_intermolecular_distance(atoms)
    if closest < MIN_SEPARATION_A:
        raise ExternalProgramError(
            f"packed box has atoms of different molecules {closest:.2f} Å apart "
            f"(< {MIN_SEPARATION_A} Å); Packmol did not converge, lower the density"
        )
    return atoms


def min_intermolecular_distance(atoms: "Atoms", mol_id: "np.ndarray | None" = None) -> float:
    """Smallest minimum-image distance between atoms of different molecules, Å."""
    import numpy as np
    from ase.neighborlist import neighbor_list

    ids = atoms.arrays["mol_id"] if mol_id is None else mol_id
    i, j, d = neighbor_list("ijd", atoms, 4.0)
    between = ids[i] != ids[j]
    return float(d[between].min()) if between.any() else float(np.inf)


def _read_packmol_xyz(path: Path) -> tuple[list[str], "np.ndarray"]:
    import numpy as np

    lines = path.read_text().splitlines()
    n = int(lines[0].split()[0])
    fields = [line.split() for line in lines[2:2 + n]]
    return [f[0] for f in fields], np.array([[float(x) for x in f[1:4]] for f in fields])


def run_build(config: BuildConfig, output: str | Path | None = None) -> Path:
    """Build, write the structure atomically and a run summary beside it; return the path."""
    from ..lock import output_lock

    path = Path(output or config.output or f"{config.system}-seed{config.seed}.extxyz")
    with output_lock(path, "build", file=True):  # one build per output file at a time
        return _build_and_write(config, path)


def _build_and_write(config: BuildConfig, path: Path) -> Path:
    from ..summary import RunSummary

    summary = RunSummary("build", config, seed=config.seed)
    with summary.timed("build"):
        atoms = build_system(config)
    write_structure(path, atoms)
    summary.results.update({
        "output": str(path),
        "n_atoms": len(atoms),
        "formula": atoms.get_chemical_formula(),
        "cell_A": atoms.cell.lengths().tolist(),
        "density_g_cm3": atoms.info["density_g_cm3"],
        "min_intermolecular_distance_A": min_intermolecular_distance(atoms),
    })
    summary.write(path.with_name(path.name + ".summary.json"))
    return path


def write_structure(path: str | Path, atoms: "Atoms") -> Path:
    """Write one structure atomically in the format its name implies.

    ``.extxyz``/``.xyz`` keep ``info`` and ``mol_id``; ``POSCAR``/``.vasp`` and LAMMPS data
    (``.data``/``.lmp``, atom_style atomic, masses written) are also understood.
    """
    from ase.io import write

    from ..io import atomic_path

    path = Path(path)
    fmt = _ase_format_for(path)
    kwargs: dict = {}
    if fmt == "lammps-data":
        kwargs = {"atom_style": "atomic", "masses": True, "specorder": sorted(set(atoms.get_chemical_symbols()))}
    elif fmt == "vasp":
        kwargs = {"direct": True, "sort": False}
    with atomic_path(path) as tmp:
        write(tmp, atoms, format=fmt, **kwargs)
    return path


def _ase_format_for(path: Path) -> str:
    from ase.io.formats import ioformats

    name = path.name.lower()
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if name in ("poscar", "contcar") or name.endswith(".vasp"):
        return "vasp"
    if name.endswith((".data", ".lmp")):
        return "lammps-data"
    suffix = path.suffix.lstrip(".").lower()
    if suffix in ioformats:
        return suffix
    raise InputError(f"cannot tell the format of {path}; use .extxyz, POSCAR/.vasp or .data")
