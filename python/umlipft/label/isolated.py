"""Isolated-atom energies with the labeller's own settings (``umlipft label --isolated-atoms``).

A foundation fine-tuned on labels from another code or pseudopotential set needs per-element
reference energies on that code's absolute scale (see :mod:`umlipft.finetune.e0`): CP2K's GTH
energies are valence-only, tens of eV per atom away from VASP's PAW totals that MACE-MP-0 learned.
Here every element is labelled alone, by the same code with the same settings as the condensed
frames, except what an isolated neutral atom must differ in: charge 0 and the atom's ground-state
spin multiplicity (ase.data's ground-state moments; the label stage's automatic rule is for
condensed frames and would make O a singlet).

Each element is one :func:`~umlipft.label.core.label_frames` run in its own directory, named by a
hash of everything that decides its energy (code, code settings, box, multiplicity, element).
Rerunning with the same settings therefore recomputes nothing; changing a setting makes a new
directory and a new calculation; adding an element computes only that element. Layout::

    WORKDIR/isolated_atoms.extxyz     one frame per element of the latest call: config_type=IsolatedAtom,
                                      REF_energy, label_multiplicity, isolated_settings_sha256
    WORKDIR/isolated_atoms.json       per element: energy, multiplicity, settings hash, run dir
    WORKDIR/runs/EL-CODE-HASH/        settings.json, atom.extxyz, label/ (label_frames' workdir)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from ..config import DriverConfig
from ..errors import ConfigError, ExternalProgramError, InputError
from .config import CALCULATORS, Cp2kConfig, check_run_settings, EspressoConfig, SpinSettings, VaspConfig, XtbConfig

if TYPE_CHECKING:
    from ase import Atoms

# Periodic images of a neutral atom interact only through their density tails. Measured with
# CP2K (PBE, DZVP-MOLOPT-SR-GTH, 250 Ry): the H atom's energy in 8, 10, 12 and 14 Å boxes agrees
# within 1.2 meV, which is grid noise, not a trend. 12 Å leaves margin for more diffuse atoms
# (Cl, the 3d metals) and for codes with longer basis tails; the cost of a GPW or plane-wave atom
# grows with the box volume, so a smaller box_A is a fair saving for those codes.
DEFAULT_BOX_A = 12.0
ISOLATED_CP2K_EPS_SCF = 1e-4
OUTPUT_NAME = "isolated_atoms.extxyz"
SUMMARY_NAME = "isolated_atoms.json"
# xTB has a molecular (non-periodic) mode; the plane-wave/GPW codes need a periodic box.
NON_PERIODIC_CODES = frozenset({"xtb"})


class LabelSettingsLike(Protocol):
    """What the labeller's settings must provide: LabelConfig, the workflow's LabelSettings and
    :class:`IsolatedAtomsConfig` all do. ``processes``, ``threads_per_frame``, ``timeout_s``,
    ``retry_failed`` and ``box_A`` are read when present."""

    calculator: str
    cp2k: Cp2kConfig
    xtb: XtbConfig
    vasp: VaspConfig
    espresso: EspressoConfig


@dataclasses.dataclass(frozen=True)
class IsolatedAtomsConfig(DriverConfig):
    """Settings of ``umlipft label --isolated-atoms``: the keys of LabelConfig that decide a label
    (code and code sections) or how it runs, plus the box edge. ``processes`` elements run at
    once (one at a time under mpiexec)."""

    calculator: str = "xtb"
    box_A: float = DEFAULT_BOX_A
    processes: int = 1
    threads_per_frame: int | None = None
    timeout_s: float | None = None
    retry_failed: bool = False
    cp2k: Cp2kConfig = dataclasses.field(default_factory=Cp2kConfig)
    xtb: XtbConfig = dataclasses.field(default_factory=XtbConfig)
    vasp: VaspConfig = dataclasses.field(default_factory=VaspConfig)
    espresso: EspressoConfig = dataclasses.field(default_factory=EspressoConfig)

    def validate(self) -> None:
        if self.calculator in CALCULATORS and self.box_A <= 0:
            raise ConfigError(f"box_A must be > 0, got {self.box_A}")
        check_run_settings(self)

    def code_config(self) -> SpinSettings:
        return getattr(self, self.calculator)


@dataclasses.dataclass
class IsolatedAtomsReport:
    """What :func:`label_isolated_atoms` did; element symbols throughout."""

    energies_eV: dict[str, float]
    multiplicities: dict[str, int]
    settings_sha256: dict[str, str]
    run_dirs: dict[str, Path]
    computed: list[str]  # labelled by this call
    reused: list[str]  # found finished with the same settings
    output: Path
    summary: Path

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run_dirs"] = {k: str(v) for k, v in self.run_dirs.items()}
        d["output"], d["summary"] = str(self.output), str(self.summary)
        return d


def ground_state_multiplicity(symbol: str) -> int:
    """2S+1 of the free atom's ground state (Hund's rules, ase.data)."""
    from ase.data import atomic_numbers, ground_state_magnetic_moments

    return int(round(float(ground_state_magnetic_moments[atomic_numbers[symbol]]))) + 1


def isolated_code_config(settings: LabelSettingsLike) -> SpinSettings:
    """The labeller's code settings for a neutral isolated atom: everything as for the frames
    (functional, basis, cutoffs, +U, ...) except charge 0 and no frame-wide multiplicity or
    unpaired-electron rule (each atom carries its own multiplicity)."""
    code = getattr(settings, settings.calculator)
    values = {**code.to_dict(), "charge": 0, "multiplicity": None, "unpaired_electrons": {}}
    if settings.calculator == "cp2k":
        # An open-shell atom's degenerate p or d shell makes OT crawl once the energy has
        # converged: isolated Cl (PBE, DZVP-MOLOPT-SR) stalled at an OT gradient of 1.6e-5 for 400
        # steps with its energy fixed to 1e-9 Ha. The E0s need the energy, whose error is second
        # order in that gradient (~1e-8 Ha at 1e-4), not the condensed frames' force accuracy.
        values["eps_scf"] = max(code.eps_scf, ISOLATED_CP2K_EPS_SCF)
    # from_dict, not replace(): replace() reads None as 'keep the old value'
    return type(code).from_dict(values, source=f"{settings.calculator} settings for isolated atoms")


def isolated_atom_frame(symbol: str, calculator: str, box_A: float, multiplicity: int) -> "Atoms":
    """One atom at the centre of a cubic box, tagged for mace-torch (config_type=IsolatedAtom)
    and for the labeller (its own multiplicity; initial moment for VASP/pw.x)."""
    from ase import Atoms

    from .calculators import FRAME_MULTIPLICITY_KEY

    atoms = Atoms(symbol, positions=[[box_A / 2] * 3], cell=[box_A] * 3,
                  pbc=calculator not in NON_PERIODIC_CODES)
    atoms.set_initial_magnetic_moments([float(multiplicity - 1)])
    atoms.info["config_type"] = "IsolatedAtom"
    atoms.info[FRAME_MULTIPLICITY_KEY] = int(multiplicity)
    return atoms


def _settings_record(calculator: str, code: SpinSettings, symbol: str, box_A: float,
                     multiplicity: int) -> tuple[dict[str, Any], str]:
    record = {"element": symbol, "calculator": calculator, "code_config": code.to_dict(),
              "box_A": float(box_A), "periodic": calculator not in NON_PERIODIC_CODES,
              "multiplicity": int(multiplicity)}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return record, digest


def _elements(elements: Sequence[str]) -> list[str]:
    from ase.data import atomic_numbers, chemical_symbols

    unknown = [e for e in elements if e not in chemical_symbols[1:]]
    if unknown:
        raise InputError(f"unknown element symbol(s) {', '.join(map(repr, unknown))} (use e.g. H O Co)")
    if not elements:
        raise InputError("no elements given for isolated-atom energies")
    return sorted(set(elements), key=lambda e: atomic_numbers[e])


def label_isolated_atoms(settings: LabelSettingsLike, elements: Sequence[str], workdir: str | Path, *,
                         box_A: float | None = None,
                         multiplicities: Mapping[str, int] | None = None) -> IsolatedAtomsReport:
    """Label one isolated atom per element with ``settings``' code; see the module docstring.

    ``box_A``: cubic box edge (default: ``settings.box_A`` if it has one, else 12 Å).
    ``multiplicities`` overrides the ground-state multiplicity of some elements.
    Bad input (element, spin parity, code not installed) raises InputError before anything
    runs; an element whose calculation fails raises ExternalProgramError naming its directory
    (rerun with ``retry_failed`` to try it again).
    """
    from .core import _agree, _Comm, label_frames
    from .config import LabelConfig

    box = float(box_A if box_A is not None else getattr(settings, "box_A", DEFAULT_BOX_A))
    if box <= 0:
        raise ConfigError(f"box_A must be > 0, got {box}")
    if settings.calculator not in CALCULATORS:
        raise ConfigError(f"calculator must be one of {', '.join(CALCULATORS)}, got {settings.calculator!r}")
    symbols = _elements(list(elements))
    overrides = dict(multiplicities or {})
    stray = sorted(set(overrides) - set(symbols))
    if stray:
        raise ConfigError(f"multiplicities given for {', '.join(stray)}, which are not among the elements")
    code = isolated_code_config(settings)
    workdir = Path(workdir).resolve()
    comm = _Comm()

    plans: list[tuple[str, int, str, Path, LabelConfig]] = []
    for symbol in symbols:
        mult = int(overrides.get(symbol, ground_state_multiplicity(symbol)))
        record, digest = _settings_record(settings.calculator, code, symbol, box, mult)
        run = workdir / "runs" / f"{symbol}-{settings.calculator}-{digest[:12]}"
        frames = run / "atom.extxyz"

        def prepare(run: Path = run, record: dict = record, frames: Path = frames, symbol: str = symbol,
                    mult: int = mult) -> None:
            from ..io import atomic_write_text
            from .core import _write_extxyz

            if not (run / "settings.json").is_file():
                atomic_write_text(run / "settings.json", json.dumps(record, indent=1, default=str) + "\n")
            if not frames.is_file():  # rewriting it would only change its time stamp
                _write_extxyz(frames, [isolated_atom_frame(symbol, settings.calculator, box, mult)])

        _agree(comm, prepare)
        label_config = LabelConfig(
            frames=frames, calculator=settings.calculator, output=run / "labelled.extxyz",
            workdir=run / "label", processes=1,
            threads_per_frame=getattr(settings, "threads_per_frame", None),
            timeout_s=getattr(settings, "timeout_s", None),
            retry_failed=bool(getattr(settings, "retry_failed", False)),
            **{settings.calculator: code})
        label_config.validate()
        plans.append((symbol, mult, digest, run, label_config))

    # Elements at once only without MPI: label_frames' collectives must not interleave.
    workers = 1 if comm.size > 1 else max(1, min(int(getattr(settings, "processes", 1)), len(plans)))
    if workers > 1 and getattr(settings, "threads_per_frame", None) is None:
        from .core import _cpu_count

        plans = [(s, m, d, r, c.replace(threads_per_frame=max(1, _cpu_count() // workers)))
                 for s, m, d, r, c in plans]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reports = list(pool.map(lambda plan: label_frames(plan[4]), plans))

    failed = {plan[0]: (report.failed.get(0, "no result"), plan[3])
              for plan, report in zip(plans, reports) if not report.complete}
    if failed:
        detail = "; ".join(f"{s}: {reason} (see {run / 'label' / 'frame_000000'})"
                           for s, (reason, run) in failed.items())
        raise ExternalProgramError(
            f"isolated-atom calculation failed for {', '.join(failed)}: {detail}. Fix the cause and "
            "rerun with retry_failed (--retry-failed); finished elements are kept")

    def collect() -> dict[str, Any]:
        from ase.io import read

        from ..io import REF_ENERGY_KEY, atomic_write_text
        from .core import _write_extxyz

        out_frames = []
        entries: dict[str, Any] = {}
        for (symbol, mult, digest, run, _), report in zip(plans, reports):
            atoms = read(report.output, format="extxyz", parallel=False)
            atoms.calc = None
            atoms.info["isolated_settings_sha256"] = digest
            out_frames.append(atoms)
            entries[symbol] = {"energy_eV": float(atoms.info[REF_ENERGY_KEY]), "multiplicity": mult,
                               "settings_sha256": digest, "run_dir": str(run),
                               "reused": bool(report.reused), "settings": json.loads((run / "settings.json").read_text())}
        output = _write_extxyz(workdir / OUTPUT_NAME, out_frames)
        summary = workdir / SUMMARY_NAME
        atomic_write_text(summary, json.dumps({
            "calculator": settings.calculator, "box_A": box, "code_config": code.to_dict(),
            "elements": entries}, indent=1, default=str) + "\n")
        return {"entries": entries, "output": str(output), "summary": str(summary)}

    done = _agree(comm, collect)
    entries = done["entries"]
    return IsolatedAtomsReport(
        energies_eV={s: e["energy_eV"] for s, e in entries.items()},
        multiplicities={s: e["multiplicity"] for s, e in entries.items()},
        settings_sha256={s: e["settings_sha256"] for s, e in entries.items()},
        run_dirs={s: Path(e["run_dir"]) for s, e in entries.items()},
        computed=[s for s, e in entries.items() if not e["reused"]],
        reused=[s for s, e in entries.items() if e["reused"]],
        output=Path(done["output"]), summary=Path(done["summary"]))


def isolated_atom_energies(settings: LabelSettingsLike, elements: Sequence[str], workdir: str | Path, *,
                           box_A: float | None = None,
                           multiplicities: Mapping[str, int] | None = None) -> dict[str, float]:
    """Isolated-atom energies (eV, element symbol -> energy) with the labeller's settings; also
    writes ``workdir/isolated_atoms.extxyz`` (config_type=IsolatedAtom, REF_energy), the file a
    fine-tune takes as ``isolated_atoms_file``. See :func:`label_isolated_atoms`."""
    return label_isolated_atoms(settings, elements, workdir, box_A=box_A,
                                multiplicities=multiplicities).energies_eV
