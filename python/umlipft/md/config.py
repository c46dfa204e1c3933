"""Configuration of ``umlipft md``."""

from __future__ import annotations

import dataclasses
import math

from ..config import DriverConfig
from ..errors import ConfigError


VELOCITIES = ("auto", "create", "keep")
DEVICES = ("cpu", "cuda")
# Below 0.05 fs nothing moves in a useful run time; above 5 fs even heavy atoms are lost.
TIMESTEP_RANGE_FS = (0.05, 5.0)
# Above this, bonds to hydrogen (period ~9 fs) are integrated too coarsely: legal but unusual.
MAX_TIMESTEP_WITH_H_FS = 2.0
# Safety checks: they decide whether a run may go on, never what it computes, so changing them
# resumes the same run (e.g. a higher max_force after the watchdog stopped it).
SAFETY_KEYS = ("min_distance_A", "max_force_eV_A", "watchdog_temperature_factor")


def timestep_warning(timestep_fs: float, elements) -> str | None:
    """A warning for a legal but unusual timestep, or None."""
    if "H" in set(elements) and timestep_fs > MAX_TIMESTEP_WITH_H_FS:
        return (f"timestep_fs = {timestep_fs} fs with H atoms: O-H/C-H vibrations (about 9 fs) need "
                f"<= {MAX_TIMESTEP_WITH_H_FS} fs; the study used 0.5 fs")
    return None


@dataclasses.dataclass(frozen=True)
class MDConfig(DriverConfig):
    """One MD run (or K independent replicas) of LAMMPS with pair_style mace.

    ``structure`` is any file ASE reads (extxyz, POSCAR, LAMMPS data via ``.data``/``.lmp``);
    with several replicas it may list one file per replica (different start structures).
    ``continue_from`` is a previous run directory: its last frame is used WITH velocities and
    box, which is how the periodic workflow continues one trajectory across model changes.
    ``model`` is a file written by ``umlipft export``, or a mace-torch model / foundation name
    that is exported into the run directory first.
    """

    output: str = "md-run"
    structure: tuple[str, ...] = ()
    continue_from: str | None = None
    model: str = "small"
    dtype: str = "float64"
    elements: tuple[str, ...] = ()
    ensemble: str = "npt"
    temperature_K: float = 300.0
    pressure_bar: float = 1.0
    timestep_fs: float = 0.5
    steps: int = 1000
    thermo_every: int = 100
    dump_every: int = 100
    restart_every: int = 0
    tdamp_fs: float = 50.0
    pdamp_fs: float = 500.0
    seed: int = 12345
    replicas: int = 1
    # Velocities at the start: "auto" keeps those of a continued run (continue_from) and draws
    # new ones at temperature_K otherwise; "create" always draws (the study's segments restart
    # from the previous positions and box at 300 K); "keep" requires stored velocities.
    velocities: str = "auto"
    # Where pair_style mace evaluates the model (``pair_style mace device cuda``: one GPU per MPI
    # rank). Not part of the run's identity: a run resumed on the other device continues it.
    device: str = "cpu"
    # Refuse start structures with atoms closer than this (also pair_style mace min_distance at
    # every run start); 0 turns the check off.
    min_distance_A: float = 0.5
    # Watchdog: stop the run when a force exceeds max_force_eV_A (pair_style mace max_force) or
    # the temperature exceeds watchdog_temperature_factor x temperature_K (fix halt); 0: off.
    max_force_eV_A: float = 50.0
    watchdog_temperature_factor: float = 10.0
    # The in-run extrapolation watch (compute mace/q; lammps_inputs/watch.in): every watch_every
    # steps each atom's node features are compared with the model's training data, frames where
    # the halting statistic exceeds 1 are kept (flagged.extxyz) and the run stops once it did at
    # watch_patience consecutive checks: a finished run, shorter than steps (summary: watch). The
    # model must carry a watch (umlipft export --watch). 0: off. NVT only (watch.in).
    watch_every: int = 0
    watch_patience: int = 2

    def validate(self) -> None:
        if self.ensemble not in ("nvt", "npt"):
            raise ConfigError(f"ensemble must be nvt or npt, got {self.ensemble!r}")
        if isinstance(self.watch_every, bool) or self.watch_every < 0:
            raise ConfigError(f"watch_every must be 0 (off) or a number of steps between checks of the "
                              f"extrapolation watch (10 costs under 1 % of a step), got {self.watch_every}")
        if isinstance(self.watch_patience, bool) or self.watch_patience < 1:
            raise ConfigError(f"watch_patience must be at least 1 (consecutive checks outside the training "
                              f"data before the run stops), got {self.watch_patience}")
        if self.watch_every and self.ensemble != "nvt":
            raise ConfigError(
                f"watch_every = {self.watch_every} runs lammps_inputs/watch.in, which is NVT only, but ensemble "
                f"is {self.ensemble}; set ensemble: nvt (--ensemble nvt) for a watched run, or watch_every: 0"
            )
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for key in ("steps", "thermo_every", "dump_every", "replicas"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.restart_every < 0:
            raise ConfigError(f"restart_every must be 0 (off) or positive, got {self.restart_every}")
        if self.restart_every and self.restart_every % self.dump_every:
            raise ConfigError(
                f"restart_every ({self.restart_every}) must be a multiple of dump_every "
                f"({self.dump_every}) so that a resumed trajectory has no gap or duplicate"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.velocities not in VELOCITIES:
            raise ConfigError(f"velocities must be one of {', '.join(VELOCITIES)}, got {self.velocities!r}")
        if not self.temperature_K > 0:
            raise ConfigError(f"temperature_K must be > 0 K (the thermostat's target), got {self.temperature_K}")
        for key in ("tdamp_fs", "pdamp_fs"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0 fs, got {getattr(self, key)}")
        for key in ("min_distance_A", "max_force_eV_A"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be >= 0 (0 turns the check off), got {value}")
        factor = self.watchdog_temperature_factor
        if not (factor == 0 or (math.isfinite(factor) and factor > 1)):
            raise ConfigError(
                f"watchdog_temperature_factor must be 0 (off) or above 1 (the run stops above this "
                f"multiple of temperature_K; default 10), got {factor}"
            )
        lo, hi = TIMESTEP_RANGE_FS
        if not lo <= self.timestep_fs <= hi:
            raise ConfigError(f"timestep_fs must be within {lo}-{hi} fs (0.5-1 fs with hydrogen), "
                              f"got {self.timestep_fs}")
        if not self.structure and not self.continue_from:
            raise ConfigError("give a start structure (structure) or a previous run (continue_from)")
        if self.structure and self.continue_from:
            raise ConfigError("give either structure or continue_from, not both")
        if len(self.structure) > 1 and len(self.structure) != self.replicas:
            raise ConfigError(
                f"{len(self.structure)} structures for {self.replicas} replicas: give one structure "
                "for all replicas or one per replica"
            )

    @property
    def timestep_ps(self) -> float:
        return self.timestep_fs / 1000.0
