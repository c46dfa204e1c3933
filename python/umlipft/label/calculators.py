"""Electronic-structure calculators for labelling: set-up, pre-flight checks, input files.

Everything here runs inside a frame's worker process or before the run starts; nothing is
imported at module level beyond the standard library so the CLI stays fast.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError
from .config import Cp2kConfig, EspressoConfig, SpinSettings, VaspConfig, XtbConfig

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator

RYDBERG_EV = 13.605693122994  # CODATA 2018, as ase.units.Rydberg
# Debian ships cp2k_shell (-> cp2k_shell.psmp); other builds only have cp2k.<variant> -s.
CP2K_SHELL_NAMES = ("cp2k_shell", "cp2k_shell.psmp", "cp2k_shell.ssmp", "cp2k_shell.popt",
                    "cp2k_shell.sopt")
CP2K_BINARY_NAMES = ("cp2k.psmp", "cp2k.ssmp", "cp2k.popt", "cp2k.sopt", "cp2k")
XTB_MAX_Z = 86  # GFN1/GFN2-xTB are parametrised for H-Rn
# A frame's own spin multiplicity (atoms.info), above the configured or automatic one: the
# automatic rule is for condensed frames and would make an isolated O atom a singlet.
FRAME_MULTIPLICITY_KEY = "label_multiplicity"


def multiplicity(atoms: "Atoms", spin: SpinSettings) -> int:
    """The frame's own (``atoms.info["label_multiplicity"]``), the configured, or the automatic
    multiplicity (see SpinSettings)."""
    own = atoms.info.get(FRAME_MULTIPLICITY_KEY)
    if own is not None:
        return int(own)
    if spin.multiplicity is not None:
        return spin.multiplicity
    symbols = atoms.get_chemical_symbols()
    unpaired = sum(spin.unpaired_electrons.get(s, 0) for s in symbols)
    electrons = int(atoms.get_atomic_numbers().sum()) - spin.charge
    if (electrons - unpaired) % 2:
        unpaired += 1
    return unpaired + 1


def check_multiplicity(atoms: "Atoms", spin: SpinSettings, where: str) -> None:
    electrons = int(atoms.get_atomic_numbers().sum()) - spin.charge
    mult = multiplicity(atoms, spin)
    if mult < 1:
        raise InputError(f"{where}: multiplicity {mult} must be >= 1")
    if (electrons - (mult - 1)) % 2:
        raise InputError(f"{where}: multiplicity {mult} is impossible with {electrons} electrons "
                         f"(charge {spin.charge}); the parity of 2S must match the electron count")
    if mult - 1 > electrons:
        raise InputError(f"{where}: multiplicity {mult} needs more unpaired electrons than the "
                         f"{electrons} electrons present")


def wants_stress(atoms: "Atoms") -> bool:
    """Stress for periodic frames, except isolated-atom references: a plane-wave code needs their
    box periodic, but their stress means nothing and costs CP2K an extra gradient pass."""
    return bool(atoms.pbc.all()) and atoms.info.get("config_type") != "IsolatedAtom"


# --------------------------------------------------------------------------------------- CP2K


def cp2k_command(cfg: Cp2kConfig) -> str:
    """The cp2k_shell command: the config's, $ASE_CP2K_COMMAND, or the first one on PATH."""
    if cfg.command:
        return cfg.command
    env = os.environ.get("ASE_CP2K_COMMAND")
    if env:
        return env
    for name in CP2K_SHELL_NAMES:
        if shutil.which(name):
            return name
    for name in CP2K_BINARY_NAMES:
        if shutil.which(name):
            return f"{name} -s"
    raise InputError(
        "CP2K is not installed: none of " + ", ".join(CP2K_SHELL_NAMES + CP2K_BINARY_NAMES)
        + " is on PATH. Install Debian's package ('sudo apt-get install -y cp2k', or run "
        "scripts/install-system-packages.sh) or set cp2k.command / $ASE_CP2K_COMMAND"
    )


def cp2k_data_dir(cfg: Cp2kConfig, command: str | None = None) -> Path | None:
    """Where BASIS_MOLOPT and GTH_POTENTIALS live, if it can be found."""
    candidates: list[Path] = []
    if cfg.data_dir:
        candidates.append(Path(cfg.data_dir))
    if os.environ.get("CP2K_DATA_DIR"):
        candidates.append(Path(os.environ["CP2K_DATA_DIR"]))
    exe = shutil.which(shlex.split(command)[0]) if command else None
    if exe:
        prefix = Path(os.path.realpath(exe)).parent.parent
        candidates += [prefix / "share" / "cp2k" / "data", prefix / "share" / "cp2k"]
    candidates.append(Path("/usr/share/cp2k"))
    for path in candidates:
        if (path / cfg.basis_set_file).is_file():
            return path
    return None


def _cp2k_library_elements(path: Path, name: str) -> set[str]:
    """Elements that have an entry called ``name`` in a CP2K basis or potential library.

    Entry headers read 'El NAME [ALIAS ...]' (BASIS_MOLOPT indents them by one space).
    """
    from ase.data import chemical_symbols

    symbols = set(chemical_symbols[1:])
    found: set[str] = set()
    with open(path, errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 2 and fields[0] in symbols and name in fields[1:]:
                found.add(fields[0])
    return found


def cp2k_preflight(cfg: Cp2kConfig, elements: Sequence[str]) -> str:
    """Check CP2K is runnable and knows every element; return the command."""
    command = cp2k_command(cfg)
    exe = shlex.split(command)
    program = next((w for w in exe if w != "env" and "=" not in w), exe[0])
    if shutil.which(program) is None:
        raise InputError(f"cp2k command {command!r}: {program} is not on PATH")
    data = cp2k_data_dir(cfg, command)
    if data is not None:
        for filename, name in ((cfg.basis_set_file, cfg.basis_set), (cfg.potential_file, cfg.pseudopotential)):
            if not (data / filename).is_file():
                continue
            known = _cp2k_library_elements(data / filename, name)
            missing = sorted(set(elements) - known)
            if missing:
                raise InputError(
                    f"CP2K's {data / filename} has no {name} for {', '.join(missing)}; choose a "
                    "basis/pseudopotential that covers every element (cp2k.basis_set, "
                    "cp2k.pseudopotential)"
                )
    return command


def cp2k_input_template(atoms: "Atoms", cfg: Cp2kConfig) -> str:
    """The CP2K input ASE's calculator completes (it adds coordinates, cell, kinds' basis and
    potential, XC functional, CUTOFF, MAX_SCF, spin and charge from its own parameters)."""
    lines = [
        "&FORCE_EVAL",
        "  &DFT",
    ]
    if cfg.hubbard_u_eV:
        lines.append("    PLUS_U_METHOD MULLIKEN")
    lines += [
        "    &QS",
        "      EPS_DEFAULT 1.0E-12",
        "    &END QS",
        "    &MGRID",
        "      NGRIDS 5",  # MOLOPT's diffuse functions: 5 grids, as BASIS_MOLOPT advises
        f"      REL_CUTOFF [Ry] {cfg.rel_cutoff_Ry:g}",
        "    &END MGRID",
        "    &SCF",
        f"      EPS_SCF {cfg.eps_scf:.3E}",
        "      &OT",
        "        MINIMIZER DIIS",
        "        PRECONDITIONER FULL_ALL",
        "      &END OT",
    ]
    if cfg.outer_max_scf > 0:
        lines += [
            "      &OUTER_SCF",
            f"        EPS_SCF {cfg.eps_scf:.3E}",
            f"        MAX_SCF {cfg.outer_max_scf}",
            "      &END OUTER_SCF",
        ]
    lines += ["    &END SCF"]
    if cfg.dispersion.upper() != "NONE":
        kind = "DFTD3(BJ)" if cfg.dispersion.upper() == "D3BJ" else "DFTD3"
        lines += [
            "    &XC",
            "      &VDW_POTENTIAL",
            "        POTENTIAL_TYPE PAIR_POTENTIAL",
            "        &PAIR_POTENTIAL",
            f"          TYPE {kind}",
            "          PARAMETER_FILE_NAME dftd3.dat",
            f"          REFERENCE_FUNCTIONAL {cfg.xc.upper()}",
            "          R_CUTOFF [angstrom] 15.0",
            "        &END PAIR_POTENTIAL",
            "      &END VDW_POTENTIAL",
            "    &END XC",
        ]
    lines += ["  &END DFT"]
    present = set(atoms.get_chemical_symbols())
    kinds = [(el, u) for el, u in sorted(cfg.hubbard_u_eV.items()) if el in present and u]
    if kinds:
        lines += ["  &SUBSYS"]
        for el, u in kinds:
            lines += [
                f"    &KIND {el}",
                "      &DFT_PLUS_U",
                "        L 2",  # the d shell: +U is for the transition metal's 3d states
                f"        U_MINUS_J [eV] {u:g}",
                "      &END DFT_PLUS_U",
                f"    &END KIND",
            ]
        lines += ["  &END SUBSYS"]
    lines += ["&END FORCE_EVAL"]
    return "\n".join(lines) + "\n"


def make_cp2k(atoms: "Atoms", cfg: Cp2kConfig, directory: Path) -> "Calculator":
    from ase.calculators.cp2k import CP2K

    mult = multiplicity(atoms, cfg)
    return CP2K(
        command=cp2k_command(cfg),
        # relative to the worker's cwd (the frame directory): CP2K truncates PROJECT names
        # longer than 80 characters and aborts, which deep work directories easily exceed
        label="cp2k" if Path.cwd().resolve() == directory.resolve() else str(directory / "cp2k"),
        inp=cp2k_input_template(atoms, cfg),
        xc=cfg.xc,
        basis_set=cfg.basis_set,
        basis_set_file=cfg.basis_set_file,
        potential_file=cfg.potential_file,
        pseudo_potential=cfg.pseudopotential,
        cutoff=cfg.cutoff_Ry * RYDBERG_EV,
        max_scf=cfg.max_scf,
        charge=cfg.charge,
        uks=mult > 1,
        multiplicity=mult,
        stress_tensor=wants_stress(atoms),
        print_level="LOW",
    )


def cp2k_check_output(directory: Path) -> None:
    """Raise if CP2K's output says the SCF did not converge (it may still return numbers)."""
    out = directory / "cp2k.out"
    if out.is_file():
        text = out.read_text(errors="replace")
        if "SCF run NOT converged" in text:
            raise RuntimeError("SCF not converged (CP2K: 'SCF run NOT converged'); see cp2k.out")


# ---------------------------------------------------------------------------------------- xTB


def xtb_preflight(cfg: XtbConfig, elements: Sequence[str]) -> None:
    from ase.data import atomic_numbers

    try:
        import tblite.ase  # noqa: F401
    except ImportError as err:
        raise InputError(f"tblite is not importable ({err}); pip install tblite") from None
    beyond = sorted(e for e in elements if atomic_numbers[e] > XTB_MAX_Z)
    if beyond:
        raise InputError(f"{cfg.method} has no parameters for {', '.join(beyond)} (it covers H-Rn)")


def make_xtb(atoms: "Atoms", cfg: XtbConfig) -> "Calculator":
    from tblite.ase import TBLite

    return TBLite(method=cfg.method, charge=cfg.charge, multiplicity=multiplicity(atoms, cfg),
                  accuracy=cfg.accuracy, max_iterations=cfg.max_iterations,
                  electronic_temperature=cfg.electronic_temperature_K, verbosity=0)


# --------------------------------------------------------------------------------------- VASP


def _vasp_pp_path(cfg: VaspConfig) -> Path:
    value = cfg.pp_path or os.environ.get("VASP_PP_PATH")
    if not value:
        raise InputError("VASP needs its POTCAR library: set vasp.pp_path or $VASP_PP_PATH "
                         "(the folder holding potpaw_PBE/)")
    return Path(value)


def vasp_parameters(atoms: "Atoms", cfg: VaspConfig) -> dict[str, Any]:
    symbols = list(dict.fromkeys(atoms.get_chemical_symbols()))
    mult = multiplicity(atoms, cfg)
    params: dict[str, Any] = dict(
        xc=cfg.xc, setups=cfg.setups, encut=cfg.encut_eV, kpts=tuple(cfg.kpts), gamma=True,
        ediff=cfg.ediff_eV, nelm=cfg.nelm, prec="Accurate", lreal="Auto", ismear=0, sigma=0.05,
        algo="Normal", lwave=False, lcharg=False, isym=0, ibrion=-1, nsw=0, isif=2,
        lasph=True,
    )
    if cfg.charge:
        params["charge"] = cfg.charge
    if mult > 1:
        params.update(ispin=2, nupdown=mult - 1)
    u = {el: cfg.hubbard_u_eV.get(el, 0.0) for el in symbols}
    if any(u.values()):
        params.update(
            ldau=True, ldautype=2, lmaxmix=4,
            ldau_luj={el: {"L": 2 if u[el] else -1, "U": u[el], "J": 0.0} for el in symbols},
        )
    if cfg.ivdw:
        params["ivdw"] = cfg.ivdw
    params.update({k.lower(): v for k, v in cfg.incar.items()})
    return params


def vasp_preflight(cfg: VaspConfig, elements: Sequence[str], *, need_command: bool = True) -> None:
    pp = _vasp_pp_path(cfg)
    folder = {"PBE": "potpaw_PBE", "LDA": "potpaw"}.get(cfg.xc.upper(), "potpaw_PBE")
    from ase.calculators.vasp.setups import setups_defaults

    setups = setups_defaults.get(cfg.setups, {}) if isinstance(cfg.setups, str) else {}
    # ASE picks the POTCAR variant from ``setups`` (e.g. Li_sv for 'recommended')
    missing = [f"{el} ({el}{setups.get(el, '')}/POTCAR)" for el in elements
               if not (pp / folder / f"{el}{setups.get(el, '')}" / "POTCAR").is_file()]
    if missing:
        raise InputError(f"no POTCAR for {', '.join(missing)} under {pp / folder}")
    if need_command:
        command = cfg.command or os.environ.get("ASE_VASP_COMMAND")
        if not command:
            raise InputError("VASP has no command: set vasp.command (e.g. 'mpirun -n 64 vasp_std') "
                             "or $ASE_VASP_COMMAND")


def make_vasp(atoms: "Atoms", cfg: VaspConfig, directory: Path) -> "Calculator":
    from ase.calculators.vasp import Vasp

    # ASE finds POTCARs through $VASP_PP_PATH; this runs in the frame's own worker process
    # (or for input generation), so setting it here does not leak into other frames.
    os.environ["VASP_PP_PATH"] = str(_vasp_pp_path(cfg))
    kwargs: dict[str, Any] = dict(directory=str(directory), **vasp_parameters(atoms, cfg))
    command = cfg.command or os.environ.get("ASE_VASP_COMMAND")
    if command:
        kwargs["command"] = command
    return Vasp(**kwargs)


def write_vasp_inputs(atoms: "Atoms", cfg: VaspConfig, directory: str | Path) -> list[Path]:
    """INCAR, KPOINTS, POSCAR and POTCAR for one frame (no VASP needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vasp_preflight(cfg, sorted(set(atoms.get_chemical_symbols())), need_command=False)
    atoms = prepare_atoms("vasp", cfg, atoms)
    previous = os.environ.get("VASP_PP_PATH")
    try:
        calc = make_vasp(atoms, cfg, directory)
        calc.write_input(atoms)
    finally:  # input generation runs in the caller's process: leave its environment as it was
        if previous is None:
            os.environ.pop("VASP_PP_PATH", None)
        else:
            os.environ["VASP_PP_PATH"] = previous
    return [directory / name for name in ("INCAR", "KPOINTS", "POSCAR", "POTCAR")]


# ----------------------------------------------------------------------------- Quantum ESPRESSO


def espresso_input_data(atoms: "Atoms", cfg: EspressoConfig) -> dict[str, Any]:
    mult = multiplicity(atoms, cfg)
    data: dict[str, Any] = {
        "control": {"calculation": "scf", "tprnfor": True, "tstress": wants_stress(atoms),
                    "disk_io": "low"},
        "system": {"ecutwfc": cfg.ecutwfc_Ry, "ecutrho": cfg.ecutrho_Ry, "occupations": "fixed",
                   "tot_charge": float(cfg.charge)},
        "electrons": {"conv_thr": cfg.conv_thr_Ry, "mixing_beta": 0.3},
    }
    if mult > 1:
        # ASE writes starting_magnetization per species from the atoms' initial moments
        # (set by prepare_atoms); the total moment is fixed to the multiplicity.
        data["system"].update(nspin=2, tot_magnetization=mult - 1)
    for section, values in cfg.input_data.items():
        data.setdefault(section, {}).update(values)
    return data


def espresso_preflight(cfg: EspressoConfig, elements: Sequence[str], *, need_command: bool = True) -> None:
    missing = sorted(set(elements) - set(cfg.pseudopotentials))
    if missing:
        raise InputError(f"espresso.pseudopotentials names no file for {', '.join(missing)}")
    if cfg.pseudo_dir is not None:
        absent = [f for el, f in cfg.pseudopotentials.items()
                  if el in elements and not (Path(cfg.pseudo_dir) / f).is_file()]
        if absent:
            raise InputError(f"pseudopotential file(s) {', '.join(absent)} not in {cfg.pseudo_dir}")
    if need_command:
        command = cfg.command or "pw.x"
        if shutil.which(shlex.split(command)[0]) is None and "mpirun" not in command:
            raise InputError(f"Quantum ESPRESSO command {command!r} is not on PATH; set espresso.command")


def make_espresso(atoms: "Atoms", cfg: EspressoConfig, directory: Path) -> "Calculator":
    from ase.calculators.espresso import Espresso, EspressoProfile

    profile = EspressoProfile(command=cfg.command or "pw.x",
                              pseudo_dir=str(cfg.pseudo_dir or directory))
    return Espresso(profile=profile, directory=str(directory),
                    pseudopotentials={el: cfg.pseudopotentials[el]
                                      for el in set(atoms.get_chemical_symbols())},
                    input_data=espresso_input_data(atoms, cfg), kpts=tuple(cfg.kpts),
                    additional_cards=hubbard_cards(atoms, cfg) or None)


def write_espresso_inputs(atoms: "Atoms", cfg: EspressoConfig, directory: str | Path) -> list[Path]:
    """The pw.x input for one frame (no Quantum ESPRESSO needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    espresso_preflight(cfg, sorted(set(atoms.get_chemical_symbols())), need_command=False)
    atoms = prepare_atoms("espresso", cfg, atoms)
    calc = make_espresso(atoms, cfg, directory)
    calc.write_inputfiles(atoms, ["energy", "forces", "stress"])
    return [directory / "espresso.pwi"]


def hubbard_cards(atoms: "Atoms", cfg: EspressoConfig) -> str:
    """QE >= 7.1 HUBBARD card for ``hubbard_u_eV`` (appended to the pw.x input)."""
    present = set(atoms.get_chemical_symbols())
    lines = [f"U {el}-3d {u:g}" for el, u in sorted(cfg.hubbard_u_eV.items()) if el in present and u]
    return "HUBBARD (ortho-atomic)\n" + "\n".join(lines) + "\n" if lines else ""


# ----------------------------------------------------------------------------------- dispatch


def prepare_atoms(name: str, cfg: SpinSettings, atoms: "Atoms") -> "Atoms":
    """A copy of the frame ready for the code: initial moments on the open-shell metals
    (VASP's MAGMOM and pw.x's starting_magnetization come from them), no old results."""
    import numpy as np

    prepared = atoms.copy()
    prepared.calc = None
    own_moments = FRAME_MULTIPLICITY_KEY in atoms.info and atoms.has("initial_magmoms")
    if name in ("vasp", "espresso") and multiplicity(atoms, cfg) > 1 and not own_moments:
        moments = np.array([float(cfg.unpaired_electrons.get(s, 0)) for s in atoms.get_chemical_symbols()])
        prepared.set_initial_magnetic_moments(moments)
    return prepared


def preflight(name: str, cfg: SpinSettings, frames: "Sequence[Atoms]", where: str) -> None:
    """Every check that can fail before the first frame runs (element coverage, programs,
    spin parity)."""
    elements = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    if name == "cp2k":
        assert isinstance(cfg, Cp2kConfig)
        cp2k_preflight(cfg, elements)
    elif name == "xtb":
        assert isinstance(cfg, XtbConfig)
        xtb_preflight(cfg, elements)
    elif name == "vasp":
        assert isinstance(cfg, VaspConfig)
        vasp_preflight(cfg, elements)
    elif name == "espresso":
        assert isinstance(cfg, EspressoConfig)
        espresso_preflight(cfg, elements)
    for i, atoms in enumerate(frames):
        check_multiplicity(atoms, cfg, f"{where} frame {i}")


def make_calculator(name: str, cfg: SpinSettings, atoms: "Atoms", directory: Path) -> "Calculator":
    if name == "cp2k":
        assert isinstance(cfg, Cp2kConfig)
        return make_cp2k(atoms, cfg, directory)
    if name == "xtb":
        assert isinstance(cfg, XtbConfig)
        return make_xtb(atoms, cfg)
    if name == "vasp":
        assert isinstance(cfg, VaspConfig)
        return make_vasp(atoms, cfg, directory)
    if name == "espresso":
        assert isinstance(cfg, EspressoConfig)
        return make_espresso(atoms, cfg, directory)
    raise InputError(f"unknown calculator {name!r}")
