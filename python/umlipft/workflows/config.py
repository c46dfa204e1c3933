"""Configuration of ``umlipft workflow``: one YAML file, nested sections, units in key names.

Two profiles give the defaults (``profile: quick`` or ``profile: study``); every key of the YAML
overrides them. Unknown keys are errors at every level, as for every umlipft driver.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..config import DriverConfig, read_yaml_mapping
from ..errors import ConfigError
from ..label.config import Cp2kConfig, EspressoConfig, VaspConfig, XtbConfig

STRATEGIES = ("periodic", "naive", "control", "adaptive")
PROFILES = ("quick", "study")
START_FROM = ("universal", "previous")


@dataclasses.dataclass(frozen=True)
class SystemSettings(DriverConfig):
    """The start structures: built with Packmol (``umlipft build``), or given as files.

    ``structures`` lists files (one is enough; the naive workflow needs one per trajectory and
    builds the missing ones with seeds ``seed + k``). The first structure is the common start of
    the periodic and control trajectories and of every model's self-consistent test.
    """

    system: str = "aqueous"
    structures: tuple[str, ...] = ()
    n_water: int | None = None
    n_licl: int | None = None
    n_cocl2: int | None = None
    n_choline_chloride: int | None = None
    n_citric_acid: int | None = None
    density_g_cm3: float | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MDSettings(DriverConfig):
    """LAMMPS MD of every trajectory (see ``umlipft md``); a segment is ``segment_steps`` long."""

    ensemble: str = "npt"
    temperature_K: float = 300.0
    pressure_bar: float = 1.0
    timestep_fs: float = 0.5
    segment_steps: int = 2_000_000
    dump_every: int = 1000
    thermo_every: int = 1000
    restart_every: int = 100_000
    dtype: str = "float64"
    tdamp_fs: float = 50.0
    pdamp_fs: float = 500.0
    seed: int = 12345
    # Export each model restricted to the system's elements with the fused convolution
    # (``umlipft export --elements``): faster MD, but the export itself takes tens of seconds on
    # a CPU, which only pays off for runs longer than a few hundred steps.
    optimized_export: bool = True
    # Independent trajectories of one stage (the naive ensemble) run this many at a time, each
    # its own single-threaded LAMMPS process (without MPI; under MPI see the Slurm scripts).
    parallel_replicas: int = 1

    def validate(self) -> None:
        if self.parallel_replicas < 1:
            raise ConfigError("md.parallel_replicas must be at least 1")
        if self.segment_steps < 2 * self.dump_every:
            raise ConfigError(f"md.segment_steps ({self.segment_steps}) must hold at least two dumps "
                              f"(md.dump_every = {self.dump_every})")
        if self.segment_steps % self.dump_every:
            raise ConfigError("md.segment_steps must be a multiple of md.dump_every")
        if self.thermo_every < 1 or self.dump_every % self.thermo_every:
            raise ConfigError("md.dump_every must be a multiple of md.thermo_every (the self-consistent "
                              "residual needs the potential energy at every dumped frame)")

    def segment_ps(self) -> float:
        return self.segment_steps * self.timestep_fs / 1000.0


@dataclasses.dataclass(frozen=True)
class LabelSettings(DriverConfig):
    """Reference labelling (see ``umlipft label``); the code sections are those of LabelConfig."""

    calculator: str = "xtb"
    processes: int = 1
    threads_per_frame: int | None = None
    timeout_s: float | None = None
    cp2k: Cp2kConfig = dataclasses.field(default_factory=Cp2kConfig)
    xtb: XtbConfig = dataclasses.field(default_factory=XtbConfig)
    vasp: VaspConfig = dataclasses.field(default_factory=VaspConfig)
    espresso: EspressoConfig = dataclasses.field(default_factory=EspressoConfig)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings(DriverConfig):
    """Fine-tuning of every model (see ``umlipft finetune``).

    ``start_from: universal`` (default) fine-tunes the universal model on each model's whole
    (cumulative) dataset, so that every model of every strategy differs only by its data, as
    in the study; ``previous`` starts from the strategy's previous model (cheaper, fewer epochs,
    but errors and forgetting compound across iterations).

    ``resume_from_checkpoint: false`` (default) restarts an interrupted training from epoch 0
    with the same seed, so a killed and resumed workflow ends with exactly the models of an
    uninterrupted one; ``true`` resumes from mace-torch's last checkpoint (worth it for long
    trainings; the data order after the resume differs, so the weights differ slightly).
    """

    start_from: str = "universal"
    epochs: int = 100
    batch_size: int = 4
    lr: float | None = None
    e0s: str = "foundation"
    forces_weight: float = 10.0
    energy_weight: float = 1.0
    stress_weight: float = 1.0
    replay_file: str | None = None
    new_frames_weight: float = 10.0
    valid_fraction: float = 0.1
    dtype: str = "float64"
    device: str = "cpu"
    seed: int = 123
    resume_from_checkpoint: bool = False

    def validate(self) -> None:
        if self.start_from not in START_FROM:
            raise ConfigError(f"finetune.start_from must be one of {', '.join(START_FROM)}, got {self.start_from!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("finetune.epochs and finetune.batch_size must be at least 1")


@dataclasses.dataclass(frozen=True)
class EvaluationSettings(DriverConfig):
    """How the models are judged, as in the study.

    Self-consistent test: every model runs ``test_steps`` from the common start; ``test_frames``
    frames of the second half are labelled. Long runs: the last model of each strategy continues
    its test trajectory for ``long_steps`` more steps, labelled every ``long_label_every`` steps,
    and is cross-evaluated on the other strategies' long runs.
    """

    self_consistent: bool = True
    test_steps: int = 2_000_000
    test_frames: int = 11
    long_runs: bool = True
    long_steps: int = 16_000_000
    long_label_every: int = 200_000
    seed: int = 777
    dtype: str = "float64"
    # The universal model's energies are on its training data's scale (PBE/PBE+U of the Materials
    # Project); reference labels from another theory (xTB, another functional or code) differ by
    # a constant per atom for one composition. "auto": for xtb labels, U's residuals are shown
    # after removing its mean residual on the strategies' training frames (what the fine-tunes'
    # E0 estimate does), reported as ``universal_offset_meV_per_atom``; "yes"/"no" force it.
    align_universal_energy: str = "auto"

    def validate(self) -> None:
        if self.align_universal_energy not in ("auto", "yes", "no"):
            raise ConfigError("evaluation.align_universal_energy must be auto, yes or no")


@dataclasses.dataclass(frozen=True)
class AnalysisSettings(DriverConfig):
    """Descriptor-space analysis: SOAP (the study's settings by default), PCA, Q-residual."""

    soap_r_cut_A: float = 5.0
    soap_n_max: int = 8
    soap_l_max: int = 6
    soap_sigma_A: float = 0.375
    components: int = 5
    alpha: float = 0.01
    k_sigma: float = 2.0
    coverage_bins: int = 40
    events_persistence_frames: int = 1
    n_track: int = 4


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings(DriverConfig):
    """The adaptive strategy: a segment runs in chunks of ``chunk_steps``; it ends early when a
    frame has more than ``max_fraction_outside`` of its atoms above their Q control limit (PCA of
    the current training data); the frames furthest outside are labelled."""

    chunk_steps: int = 200_000
    max_fraction_outside: float = 0.05
    statistic: str = "q"

    def validate(self) -> None:
        if self.statistic not in ("q", "t2"):
            raise ConfigError(f"adaptive.statistic must be q or t2, got {self.statistic!r}")
        if not 0.0 <= self.max_fraction_outside < 1.0:
            raise ConfigError("adaptive.max_fraction_outside must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SlurmSettings(DriverConfig):
    """Header of the emitted batch scripts (``--slurm``); ``extra`` lines go verbatim after it."""

    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8
    gpus: int = 1
    mpi_ranks_md: int | None = None  # default: one rank per naive trajectory
    mpiexec: str = "srun"
    modules: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class WorkflowConfig(DriverConfig):
    """Everything one workflow directory needs. ``iterations`` is the number of periodic
    segments (models FT1 ... FTn), of naive trajectories (K) and of control windows."""

    profile: str = "study"
    foundation: str = "small"
    iterations: int = 5
    frames_per_segment: int = 10
    naive_subsets: tuple[int, ...] = ()  # default: i * frames_per_segment for i = 1..iterations
    selection: str = "random"
    seed: int = 2026
    # Independent stages run this many at a time in threads (the strategies of a comparison,
    # the models' self-consistent tests); each stage's own processes (LAMMPS, xTB, mace-torch)
    # keep their thread settings. Results do not depend on it.
    parallel_stages: int = 1
    system: SystemSettings = dataclasses.field(default_factory=SystemSettings)
    md: MDSettings = dataclasses.field(default_factory=MDSettings)
    label: LabelSettings = dataclasses.field(default_factory=LabelSettings)
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    evaluation: EvaluationSettings = dataclasses.field(default_factory=EvaluationSettings)
    analysis: AnalysisSettings = dataclasses.field(default_factory=AnalysisSettings)
    adaptive: AdaptiveSettings = dataclasses.field(default_factory=AdaptiveSettings)
    slurm: SlurmSettings = dataclasses.field(default_factory=SlurmSettings)

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.iterations < 1 or self.frames_per_segment < 1 or self.parallel_stages < 1:
            raise ConfigError("iterations, frames_per_segment and parallel_stages must be at least 1")
        if self.selection not in ("random", "fps"):
            raise ConfigError(f"selection must be random or fps, got {self.selection!r}")
        half = self.md.segment_steps // 2 // self.md.dump_every + 1
        if self.frames_per_segment > half:
            raise ConfigError(f"frames_per_segment = {self.frames_per_segment} but the second half of a segment "
                              f"holds only {half} dumped frames; dump more often or label fewer frames")
        pool = self.iterations * self.frames_per_segment
        for n in self.subsets():
            if not 1 <= n <= pool:
                raise ConfigError(f"naive_subsets: {n} is outside 1..{pool} (iterations x frames_per_segment)")
        if list(self.subsets()) != sorted(set(self.subsets())):
            raise ConfigError("naive_subsets must increase")
        ev = self.evaluation
        if ev.test_steps < 2 * self.md.dump_every or ev.test_steps % self.md.dump_every:
            raise ConfigError("evaluation.test_steps must be a multiple of md.dump_every and hold two dumps")
        if ev.long_label_every % self.md.dump_every or ev.long_steps % self.md.dump_every:
            raise ConfigError("evaluation.long_steps and long_label_every must be multiples of md.dump_every")
        if self.adaptive.chunk_steps % self.md.dump_every or self.md.segment_steps % self.adaptive.chunk_steps:
            raise ConfigError("adaptive.chunk_steps must divide md.segment_steps and be a multiple of md.dump_every")

    def subsets(self) -> tuple[int, ...]:
        if self.naive_subsets:
            return tuple(self.naive_subsets)
        return tuple(self.frames_per_segment * (i + 1) for i in range(self.iterations))


# ---------------------------------------------------------------------------------------------
# profiles

# The study's protocol (../docs/study.md): 1 ns segments at 0.5 fs, dumps every 1000 steps,
# ~10 frames a segment from the second half, 9 ns long runs (1 ns test + 8 ns more), DFT every 0.1 ns.
STUDY_PROFILE: dict[str, Any] = {
    "profile": "study",
    "iterations": 5,
    "frames_per_segment": 10,
    "naive_subsets": [10, 21, 31, 40, 50],
    "system": {"system": "des"},
    "md": {"segment_steps": 2_000_000, "dump_every": 1000, "thermo_every": 1000, "restart_every": 100_000,
           "dtype": "float64"},
    "label": {"calculator": "cp2k"},
    "finetune": {"epochs": 100, "resume_from_checkpoint": True},
    "evaluation": {"test_steps": 2_000_000, "test_frames": 11, "long_steps": 16_000_000,
                   "long_label_every": 200_000},
}

# A laptop-sized version of the naive-vs-periodic comparison with report, sized for about
# 15 minutes on two cores: LiCl + CoCl2 in 10 waters (35 atoms), float32 MD with plain exports
# (the optimised export costs more than it saves on 40-step runs), 2 iterations of 2 frames,
# xTB labels with estimated E0s (xTB has another energy zero than MACE-MP-0), one epoch per
# fine-tune (mace-torch's start-up and final evaluation dominate: ~1-2 min per fine-tune), two
# independent stages at a time. Measured wall times: examples/WORKFLOWS.md.
QUICK_PROFILE: dict[str, Any] = {
    "profile": "quick",
    "iterations": 2,
    "frames_per_segment": 2,
    "naive_subsets": [2, 4],
    "parallel_stages": 2,
    "system": {"system": "aqueous", "n_water": 10},
    "md": {"segment_steps": 40, "dump_every": 10, "thermo_every": 10, "restart_every": 20,
           "dtype": "float32", "optimized_export": False, "parallel_replicas": 2},
    "label": {"calculator": "xtb"},
    "finetune": {"epochs": 1, "batch_size": 2, "e0s": "estimated", "dtype": "float64"},
    "evaluation": {"test_steps": 40, "test_frames": 2, "long_steps": 40, "long_label_every": 20,
                   "dtype": "float64"},
    "analysis": {"soap_n_max": 4, "soap_l_max": 3, "components": 3, "coverage_bins": 20},
    "adaptive": {"chunk_steps": 20},
}

PROFILE_DEFAULTS = {"quick": QUICK_PROFILE, "study": STUDY_PROFILE}


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_workflow_config(path: str | Path | None = None, profile: str | None = None,
                         overrides: Mapping[str, Any] | None = None) -> WorkflowConfig:
    """The profile's defaults, then the YAML file, then ``overrides`` (nested mappings)."""
    values: dict[str, Any] = {}
    source = "workflow configuration"
    if path is not None:
        values = read_yaml_mapping(path)
        source = str(path)
    name = profile or values.get("profile") or "quick"
    if name not in PROFILE_DEFAULTS:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {name!r}")
    if profile and values.get("profile") not in (None, profile):
        raise ConfigError(f"{source} says profile: {values['profile']} but --profile {profile} was given")
    merged = _merge(_merge(PROFILE_DEFAULTS[name], values), overrides or {})
    merged["profile"] = name
    _check_sections(WorkflowConfig, merged, source)
    return WorkflowConfig.from_dict(merged, source=source)


def _check_sections(cls: type[DriverConfig], values: Mapping[str, Any], source: str) -> None:
    """Build every nested section on its own first, so that an error names the section and the
    key (the generic conversion would only say the section is malformed)."""
    import typing

    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if isinstance(hint, type) and issubclass(hint, DriverConfig) and isinstance(value, Mapping):
            _check_sections(hint, value, f"{source}: {key}")
            hint.from_dict(value, source=f"{source}: {key}")
