"""Typed configurations of ``umlipft label`` and of each electronic-structure code."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import DriverConfig
from ..errors import ConfigError

CALCULATORS = ("cp2k", "xtb", "vasp", "espresso")
# The study's reference: VASP PBE+U with U(Co 3d) = 5.76 eV from linear response.
STUDY_U_CO_EV = 5.76
# High-spin Co(II) (d7, S = 3/2) is the ground state of Co2+ with water and chloride ligands.
DEFAULT_UNPAIRED: dict[str, int] = {"Co": 3}


def _check_mapping(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float) if kind is float else kind)
        and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ConfigError(f"{name} must map element symbols to {kind.__name__} values, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SpinSettings(DriverConfig):
    """Shared by the codes: total charge and spin multiplicity (``None`` = automatic).

    Automatic multiplicity: 1 + the unpaired electrons of the transition-metal atoms
    (``unpaired_electrons``, high-spin Co(II) by default), plus one more if the electron
    count would otherwise have the wrong parity (a radical).
    """

    charge: int = 0
    multiplicity: int | None = None
    unpaired_electrons: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_UNPAIRED))

    def validate(self) -> None:
        _check_mapping("unpaired_electrons", self.unpaired_electrons, int)
        if self.multiplicity is not None and self.multiplicity < 1:
            raise ConfigError(f"multiplicity must be >= 1, got {self.multiplicity}")


@dataclasses.dataclass(frozen=True)
class Cp2kConfig(SpinSettings):
    """CP2K (Quickstep, GPW) through ASE's cp2k_shell calculator.

    Defaults for Co(II) in water: PBE-D3, DZVP-MOLOPT-SR-GTH, GTH-PBE pseudopotentials,
    unrestricted Kohn-Sham with the automatic multiplicity, OT with the FULL_ALL
    preconditioner (robust for open-shell d7) and an outer SCF loop. ``hubbard_u_eV`` adds
    +U (Mulliken projection, d shell), e.g. ``{Co: 5.76}`` as in the study.
    """

    command: str | None = None
    xc: str = "PBE"
    dispersion: str = "D3"
    basis_set: str = "DZVP-MOLOPT-SR-GTH"
    basis_set_file: str = "BASIS_MOLOPT"
    pseudopotential: str = "GTH-PBE"
    potential_file: str = "GTH_POTENTIALS"
    cutoff_Ry: float = 500.0
    rel_cutoff_Ry: float = 50.0
    eps_scf: float = 1e-6
    max_scf: int = 50
    outer_max_scf: int = 10
    hubbard_u_eV: dict[str, float] = dataclasses.field(default_factory=dict)
    data_dir: Path | None = None

    def validate(self) -> None:
        super().validate()
        _check_mapping("hubbard_u_eV", self.hubbard_u_eV, float)
        if self.dispersion.upper() not in ("D3", "D3BJ", "NONE"):
            raise ConfigError(f"cp2k dispersion must be D3, D3BJ or none, got {self.dispersion!r}")
        if self.cutoff_Ry <= 0 or self.rel_cutoff_Ry <= 0:
            raise ConfigError("cp2k cutoff_Ry and rel_cutoff_Ry must be > 0")
        if self.max_scf < 1 or self.outer_max_scf < 0 or self.eps_scf <= 0:
            raise ConfigError("cp2k needs max_scf >= 1, outer_max_scf >= 0, eps_scf > 0")


@dataclasses.dataclass(frozen=True)
class XtbConfig(SpinSettings):
    """GFN2-xTB (or GFN1) through tblite's ASE calculator; periodic when the frame is."""

    method: str = "GFN2-xTB"
    accuracy: float = 1.0
    max_iterations: int = 250
    electronic_temperature_K: float = 300.0

    def validate(self) -> None:
        super().validate()
        if self.method not in ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"):
            raise ConfigError(f"xtb method must be GFN2-xTB, GFN1-xTB or IPEA1-xTB, got {self.method!r}")
        if self.max_iterations < 1 or self.accuracy <= 0 or self.electronic_temperature_K <= 0:
            raise ConfigError("xtb needs max_iterations >= 1, accuracy > 0, electronic_temperature_K > 0")


@dataclasses.dataclass(frozen=True)
class VaspConfig(SpinSettings):
    """VASP through ASE (user profile: ``command`` or $ASE_VASP_COMMAND, ``pp_path`` or
    $VASP_PP_PATH). Defaults reproduce the study's reference: PBE+U, U(Co) = 5.76 eV,
    Gamma point, spin-polarised when the multiplicity is above 1."""

    command: str | None = None
    pp_path: Path | None = None
    xc: str = "PBE"
    setups: str = "recommended"
    encut_eV: float = 520.0
    kpts: tuple[int, ...] = (1, 1, 1)
    ediff_eV: float = 1e-6
    nelm: int = 100
    hubbard_u_eV: dict[str, float] = dataclasses.field(default_factory=lambda: {"Co": STUDY_U_CO_EV})
    ivdw: int = 0
    incar: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        _check_mapping("hubbard_u_eV", self.hubbard_u_eV, float)
        if len(self.kpts) != 3 or any(k < 1 for k in self.kpts):
            raise ConfigError(f"vasp kpts must be three integers >= 1, got {self.kpts}")
        if self.encut_eV <= 0 or self.ediff_eV <= 0 or self.nelm < 1:
            raise ConfigError("vasp needs encut_eV > 0, ediff_eV > 0, nelm >= 1")


@dataclasses.dataclass(frozen=True)
class EspressoConfig(SpinSettings):
    """Quantum ESPRESSO pw.x through ASE (user profile: ``command``, ``pseudo_dir`` and one
    pseudopotential file per element in ``pseudopotentials``)."""

    command: str | None = None
    pseudo_dir: Path | None = None
    pseudopotentials: dict[str, str] = dataclasses.field(default_factory=dict)
    ecutwfc_Ry: float = 60.0
    ecutrho_Ry: float = 480.0
    kpts: tuple[int, ...] = (1, 1, 1)
    conv_thr_Ry: float = 1e-8
    hubbard_u_eV: dict[str, float] = dataclasses.field(default_factory=dict)
    input_data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        _check_mapping("hubbard_u_eV", self.hubbard_u_eV, float)
        _check_mapping("pseudopotentials", self.pseudopotentials, str)
        if len(self.kpts) != 3 or any(k < 1 for k in self.kpts):
            raise ConfigError(f"espresso kpts must be three integers >= 1, got {self.kpts}")
        if self.ecutwfc_Ry <= 0 or self.ecutrho_Ry < self.ecutwfc_Ry:
            raise ConfigError("espresso needs ecutwfc_Ry > 0 and ecutrho_Ry >= ecutwfc_Ry")


def check_run_settings(cfg: Any) -> None:
    """The checks shared by every labelling run's settings (LabelConfig, IsolatedAtomsConfig):
    the code, how many frames at once, threads, time limit, and the code's own section."""
    if cfg.calculator not in CALCULATORS:
        raise ConfigError(f"calculator must be one of {', '.join(CALCULATORS)}, got {cfg.calculator!r}")
    if cfg.processes < 1:
        raise ConfigError(f"processes must be >= 1, got {cfg.processes}")
    if cfg.threads_per_frame is not None and cfg.threads_per_frame < 1:
        raise ConfigError(f"threads_per_frame must be >= 1, got {cfg.threads_per_frame}")
    if cfg.timeout_s is not None and cfg.timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {cfg.timeout_s}")
    cfg.code_config().validate()


@dataclasses.dataclass(frozen=True)
class LabelConfig(DriverConfig):
    """One labelling run: FRAMES in, ``output`` (extxyz with REF_energy/REF_forces/REF_stress)
    out, one directory per frame under ``workdir``. Rerunning resumes.

    ``processes`` frames run at once on this machine (each in its own worker process);
    under ``mpiexec -n N`` every rank takes every N-th frame. ``threads_per_frame`` sets
    OMP_NUM_THREADS of each worker (default: the cores divided by ``processes``).
    """

    frames: Path
    calculator: str = "xtb"
    output: Path | None = None
    workdir: Path | None = None
    processes: int = 1
    threads_per_frame: int | None = None
    timeout_s: float | None = None
    retry_failed: bool = False
    format: str | None = None
    cp2k: Cp2kConfig = dataclasses.field(default_factory=Cp2kConfig)
    xtb: XtbConfig = dataclasses.field(default_factory=XtbConfig)
    vasp: VaspConfig = dataclasses.field(default_factory=VaspConfig)
    espresso: EspressoConfig = dataclasses.field(default_factory=EspressoConfig)

    def validate(self) -> None:
        check_run_settings(self)

    def code_config(self) -> SpinSettings:
        return getattr(self, self.calculator)

    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        frames = Path(self.frames)
        return frames.with_name(frames.name.split(".")[0] + "-labelled.extxyz")

    def workdir_path(self) -> Path:
        if self.workdir is not None:
            return Path(self.workdir)
        out = self.output_path()
        return out.with_name(out.name.split(".")[0] + "-label")


CODE_CONFIGS: dict[str, type[SpinSettings]] = {
    "cp2k": Cp2kConfig,
    "xtb": XtbConfig,
    "vasp": VaspConfig,
    "espresso": EspressoConfig,
}
