"""``umlipft finetune``: fine-tune a MACE foundation model with mace-torch's own training.

The driver prepares the data (one key convention, isolated-atom frames handled on purpose, a
validation split), decides the E0s with the starting model's error in view (see :mod:`.e0`),
runs ``python -m mace.cli.run_train`` in a subprocess, and exports the result for
``pair_style mace``. A subprocess, not an in-process call, because mace-torch's training changes
process-wide state (torch's default dtype, the root logger, seeds) that a workflow running
several stages in one process must not inherit.

Layout of ``output_dir``::

    request.json            settings and input hashes of this fine-tune (a rerun must match)
    data/                   the prepared train/valid(/replay) extxyz files mace-torch reads
    mace/                   mace-torch's work_dir: checkpoints/, logs/, results/
    NAME.model              the fine-tuned mace-torch model (written when training finished)
    NAME-lammps-DTYPE.pt    its export for pair_style mace
    result.json, summary.json

The driver follows the training through mace-torch's metrics file (``mace/results/
NAME_run-SEED_train.txt``, one JSON record per training step and per validation), not its log
text: the second E0 check, the progress and the divergence check read it, and a record that is
missing or has changed shape stops the fine-tune naming the mace-torch version (fail closed).

An interrupted fine-tune cannot be continued exactly from mace-torch's checkpoints (see
:data:`INEXACT_RESUME`), so by default a rerun trains it again from epoch 0 with the same seed,
and says so; ``resume_from_checkpoint: true`` continues from mace-torch's checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, ExternalProgramError, InputError, StateError, UmlipftError
from ..io import (REF_ENERGY_KEY, REF_FORCES_KEY, REF_STRESS_KEY, atomic_path, atomic_write_text, sha256_file,
                  read_frames, reference_energy, reference_forces, reference_stress,
                  require_reference_labels, write_frames)
from ..lock import locks_output
from ..summary import RunSummary
from .e0 import (E0_POLICIES, LABELLERS, E0Decision, decide_e0s, foundation_e0s, is_isolated_atom,
                 isolated_atom_energies)

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

# Settings that may change between a run and its rerun in the same output: another number of
# epochs trains again (or continues, with resume_from_checkpoint); the rest do not touch the
# trained weights (the E0 guard's settings only decide whether to start; the E0s themselves
# follow from e0s and data).
_RESUMABLE_KEYS = frozenset({"epochs", "output_dir", "export_dtype", "export", "export_watch", "e0_check_frames",
                             "max_start_error_meV_per_atom", "accept_large_start_error", "mace_plots",
                             "resume_from_checkpoint"})

# The mace-torch release whose metrics records and checkpoints this driver was written against
# (messages name it when the installed release writes something else).
MACE_TESTED_VERSION = "0.3.16"

# Why a rerun does not continue from mace-torch's checkpoint by default (read off mace-torch
# 0.3.16's tools/train.py and cli/run_train.py).
INEXACT_RESUME = (
    "mace-torch cannot continue an interrupted fine-tune exactly: it saves a checkpoint only when "
    "the validation loss improves, and with the EMA weights in place of the trained ones (the EMA "
    "state itself is not saved); a restart trains the checkpoint's epoch again, skips one "
    "learning-rate scheduler step and replays the data order from the first epoch's")

# Shown beside every validation figure of a fine-tune whose few frames left none to validate on.
NO_VALIDATION_SPLIT = "(training frames: no validation split)"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(DriverConfig):
    """Fine-tuning settings; defaults suit a few dozen ~200-atom frames on one machine.

    ``replay_file`` switches to mace-torch's multi-head replay fine-tuning: the replay frames
    (labelled with the foundation's level of theory, e.g. an MPtrj subset or foundation-labelled
    frames) train a second head that keeps the shared weights close to the foundation, and the
    new frames are weighted ``new_frames_weight`` times (the study used 10).

    ``e0s`` (see :mod:`.e0`): ``auto`` (default) resolves per labeller, which is ``labeller``
    or, if unset, the ``label_calculator`` the training frames carry from ``umlipft label``.
    ``isolated_atoms_file`` holds the labeller's isolated-atom energies (IsolatedAtom frames,
    e.g. ``umlipft label --isolated-atoms`` output) for the isolated-atoms(-fitted) policies;
    IsolatedAtom frames in the training file serve too.

    ``resume_from_checkpoint``: false (default) trains an interrupted fine-tune again from epoch
    0 with the same seed, so that its model is the one an uninterrupted run gives; true continues
    from mace-torch's checkpoint (cheaper for long trainings, but the model differs, see
    :data:`INEXACT_RESUME`; the summary records the epoch it resumed from).
    """

    train_file: str = ""
    foundation: str = "small"
    valid_file: str | None = None
    replay_file: str | None = None
    output_dir: str = "finetune"
    name: str = "finetuned"
    e0s: str = "auto"
    isolated_atoms_file: str | None = None
    labeller: str | None = None
    max_start_error_meV_per_atom: float = 100.0
    accept_large_start_error: bool = False
    e0_check_frames: int = 8
    epochs: int = 100
    batch_size: int = 4
    # None: 1e-3 naive, mace-torch's own 1e-4 for replay. Not mace-torch's 0.01 from-scratch
    # default: measured here, one epoch at 0.01 on 3 aqueous frames took the validation energy
    # RMSE from 1.2 to 85 meV/atom and force RMSE from 56 to 1750 meV/Å (Adam's first steps move
    # every weight by about lr); at 1e-3, one epoch on 10 frames moved them from 0.2 to 1.1
    # meV/atom and from 58 to 80 meV/Å. EMA and more epochs recover from either; less is lost.
    lr: float | None = None
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 1.0
    use_stress: bool = True  # train on stress when every training frame has one
    ema_decay: float = 0.99
    new_frames_weight: float = 10.0
    valid_fraction: float = 0.1
    dtype: str = "float64"
    export: bool = True
    export_dtype: str = "float64"
    # The export carries an extrapolation watch fitted on the frames trained on (data/train.extxyz):
    # one forward pass of the model per frame (umlipft export --watch).
    export_watch: bool = True
    # mace-torch's end-of-training plots (its --plot): they evaluate every training and
    # validation frame once more, which on 3 aqueous frames was 30 s of a 165 s fine-tune.
    mace_plots: bool = False
    seed: int = 123
    device: str = "cpu"
    resume_from_checkpoint: bool = False
    energy_key: str = REF_ENERGY_KEY
    forces_key: str = REF_FORCES_KEY
    stress_key: str = REF_STRESS_KEY

    def validate(self) -> None:
        if not self.train_file:
            raise ConfigError("train_file is required (--train FILE)")
        if self.e0s not in E0_POLICIES:
            raise ConfigError(f"e0s must be one of {', '.join(E0_POLICIES)}, got {self.e0s!r}")
        if self.labeller is not None and self.labeller not in LABELLERS:
            raise ConfigError(f"labeller must be one of {', '.join(LABELLERS)} (or unset), got {self.labeller!r}")
        for key in ("dtype", "export_dtype"):
            if getattr(self, key) not in ("float32", "float64"):
                raise ConfigError(f"{key} must be float32 or float64, got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "e0_check_frames"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must be between 0 and 1, got {self.valid_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.new_frames_weight <= 0 or self.max_start_error_meV_per_atom <= 0:
            raise ConfigError("new_frames_weight and max_start_error_meV_per_atom must be positive")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"name {self.name!r} must be letters, digits, '_', '-', '.'")

    @property
    def mode(self) -> str:
        return "replay" if self.replay_file else "naive"


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    epoch: int  # 1-based count of finished epochs in this fine-tune
    epochs: int
    valid_rmse_e_meV_per_atom: float | None
    valid_rmse_f_meV_per_A: float | None
    seconds: float  # wall time of this epoch (training + validation)
    valid_is_train: bool = False  # the "validation" frames are the training frames (no split)

    def describe(self) -> str:
        """One progress line, saying when the validation figures are training-frame figures."""
        split = f" {NO_VALIDATION_SPLIT}" if self.valid_is_train else ""
        return (f"epoch {self.epoch}/{self.epochs}: valid RMSE E {_fmt(self.valid_rmse_e_meV_per_atom, 2)} "
                f"meV/atom, F {_fmt(self.valid_rmse_f_meV_per_A, 1)} meV/Å{split} ({self.seconds:.1f} s/epoch)")


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    model_path: Path
    lammps_model_path: Path | None
    output_dir: Path
    mode: str
    e0: dict[str, Any]
    n_train: int
    n_valid: int
    n_replay: int
    epochs: int
    epoch_times_s: tuple[float, ...]  # this invocation's epochs only (empty when nothing ran)
    initial_valid_rmse_e_meV_per_atom: float | None
    # Validation errors of the model written (mace-torch keeps the epoch of lowest validation
    # loss, model_epoch, which need not be the last one).
    final_valid_rmse_e_meV_per_atom: float | None
    final_valid_rmse_f_meV_per_A: float | None
    skipped: bool  # True when the output already held this finished fine-tune
    valid_is_train: bool = False  # no validation split: the "validation" figures are on training frames
    model_epoch: int | None = None  # 1-based epoch whose weights the model holds

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("model_path", "lammps_model_path", "output_dir"):
            d[key] = str(d[key]) if d[key] is not None else None
        return d

    def describe_validation(self) -> str:
        """The written model's validation errors in one line (what the CLI prints)."""
        where = NO_VALIDATION_SPLIT if self.valid_is_train else f"on {self.n_valid} validation frames"
        epoch = f"epoch {self.model_epoch} of {self.epochs}" if self.model_epoch else f"{self.epochs} epochs"
        return (f"model ({epoch}): valid RMSE E {_fmt(self.final_valid_rmse_e_meV_per_atom, 2)} meV/atom, "
                f"F {_fmt(self.final_valid_rmse_f_meV_per_A, 1)} meV/Å {where}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneResult":
        d = dict(d)
        d["model_path"] = Path(d["model_path"])
        d["lammps_model_path"] = Path(d["lammps_model_path"]) if d["lammps_model_path"] else None
        d["output_dir"] = Path(d["output_dir"])
        d["epoch_times_s"] = tuple(d["epoch_times_s"])
        d.pop("outputs", None)  # result.json's record of the files, checked on reuse (_verify_outputs)
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Data preparation


@dataclasses.dataclass
class _Prepared:
    train: "list[Atoms]"
    valid: "list[Atoms]"
    replay: "list[Atoms]"
    replay_valid: "list[Atoms]"
    isolated: dict[int, float]
    isolated_dropped: int
    labeller: str | None
    has_stress: bool
    valid_is_train: bool


def _normalise(atoms: "Atoms", cfg: FinetuneConfig, weight: float | None) -> "Atoms":
    """A copy with labels under REF_* keys only: the input files use REF_* or plain
    energy/forces/stress (read by ASE onto a single-point calculator), and mace-torch must read
    one convention; a stale plain key left beside a REF_* key would be ambiguous."""
    from ase import Atoms

    energy = reference_energy(atoms, cfg.energy_key)
    forces = reference_forces(atoms, cfg.forces_key)
    stress = reference_stress(atoms, cfg.stress_key)
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for key, value in atoms.info.items():
        if key in ("energy", "stress", "free_energy", "virial", cfg.energy_key, cfg.stress_key,
                   REF_ENERGY_KEY, REF_STRESS_KEY, "config_weight"):
            continue
        if isinstance(value, (str, int, float, np.integer, np.floating)):
            out.info[key] = value  # provenance (source, step, time) travels with the frame
    out.info[REF_ENERGY_KEY] = float(energy)  # type: ignore[arg-type]
    out.arrays[REF_FORCES_KEY] = np.asarray(forces, dtype=float)
    if stress is not None:
        out.info[REF_STRESS_KEY] = np.asarray(stress, dtype=float).reshape(9)
    if weight is not None:
        out.info["config_weight"] = float(weight)
    return out


def _read_labelled(path: str, cfg: FinetuneConfig, what: str) -> "tuple[list[Atoms], list[Atoms]]":
    """(regular frames, isolated-atom frames) of a labelled file; InputError if unusable."""
    frames = read_frames(path)
    isolated = [a for a in frames if is_isolated_atom(a)]
    regular = [a for a in frames if not is_isolated_atom(a)]
    if not regular:
        raise InputError(f"{what} {path} holds only isolated-atom frames; nothing to fit")
    require_reference_labels(regular, path, energy_key=cfg.energy_key, forces_key=cfg.forces_key)
    require_reference_labels(isolated, path, forces=False, energy_key=cfg.energy_key)
    return regular, isolated


def _split(frames: "list[Atoms]", fraction: float, seed: int) -> "tuple[list[Atoms], list[Atoms]]":
    """Seeded train/valid split: mace-torch's own (``--valid_fraction``), so that a fine-tune
    trains on the same frames in the same order as ``mace_run_train`` on the same file with the
    same seed (the order matters: it seeds the batches). Fewer than 5 frames cannot spare any:
    validate on the training frames (mace-torch needs a validation set), which the result and
    every printed validation figure say."""
    from mace.data.utils import random_train_valid_split

    if len(frames) < 5:
        return frames, list(frames)
    # mace-torch writes the indices of a large validation set into its work_dir; not needed here.
    with tempfile.TemporaryDirectory() as scratch:
        train, valid = random_train_valid_split(frames, fraction, seed, scratch)
    return list(train), list(valid)


def _labels_from(frames: "Sequence[Atoms]") -> set[str | None]:
    return {a.info.get("label_calculator") for a in frames}


def _labeller(cfg: FinetuneConfig, regular: "Sequence[Atoms]") -> str | None:
    """The code of the reference labels: the config's, else the one every frame names
    (``umlipft label`` records it); None when unknown. Labels of two codes cannot be fitted
    together (their energies are on different absolute scales)."""
    named = sorted(c for c in _labels_from(regular) if c is not None)
    if len(named) > 1:
        raise InputError(f"the training frames were labelled by several codes ({', '.join(named)}); their "
                         "energies are on different absolute scales and cannot be fitted together")
    if cfg.labeller is not None:
        if named and named[0] != cfg.labeller:
            raise InputError(f"labeller: {cfg.labeller}, but the training frames say they were labelled by "
                             f"{named[0]} (label_calculator)")
        return cfg.labeller
    return named[0] if named and None not in _labels_from(regular) else None


def _isolated_energies(cfg: FinetuneConfig, isolated_frames: "Sequence[Atoms]",
                       labeller: str | None) -> dict[int, float]:
    """Isolated-atom energies of the training file, and of ``isolated_atoms_file``; the two must
    agree where both have an element (energies from two settings must not be mixed)."""
    from ase.data import chemical_symbols

    isolated = isolated_atom_energies(isolated_frames, cfg.energy_key)
    if not cfg.isolated_atoms_file:
        return isolated
    path = cfg.isolated_atoms_file
    frames = read_frames(path)
    not_isolated = [i for i, a in enumerate(frames) if not is_isolated_atom(a) or len(a) != 1]
    if not_isolated:
        raise InputError(f"isolated_atoms_file {path}: frame(s) {not_isolated[:5]} are not single isolated atoms")
    require_reference_labels(frames, path, forces=False, energy_key=cfg.energy_key)
    codes = sorted(c for c in _labels_from(frames) if c is not None)
    if labeller is not None and codes and codes != [labeller]:
        raise InputError(f"isolated_atoms_file {path} was labelled by {', '.join(codes)}, the training frames by "
                         f"{labeller}; the isolated-atom energies must come from the labeller of the training frames")
    given = isolated_atom_energies(frames, cfg.energy_key)
    clash = [chemical_symbols[z] for z in given if z in isolated and abs(given[z] - isolated[z]) > 1e-6]
    if clash:
        raise InputError(f"isolated_atoms_file {path} and the training file's IsolatedAtom frames give different "
                         f"energies for {', '.join(clash)}; keep one source of isolated-atom energies")
    return {**isolated, **given}


def _prepare(cfg: FinetuneConfig, foundation_numbers: frozenset[int]) -> _Prepared:
    from ase.data import chemical_symbols

    train, isolated_frames = _read_labelled(cfg.train_file, cfg, "training file")
    labeller = _labeller(cfg, train)
    isolated = _isolated_energies(cfg, isolated_frames, labeller)
    valid: list = []
    valid_is_train = False
    if cfg.valid_file:
        valid, valid_isolated = _read_labelled(cfg.valid_file, cfg, "validation file")
        isolated_frames += valid_isolated
    replay: list = []
    replay_valid: list = []
    if cfg.replay_file:
        replay, _ = _read_labelled(cfg.replay_file, cfg, "replay file")
    for name, frames in (("training", train), ("validation", valid), ("replay", replay)):
        for i, atoms in enumerate(frames):
            unknown = sorted(set(int(z) for z in atoms.numbers) - foundation_numbers)
            if unknown:
                raise InputError(
                    f"{name} frame {i} contains {', '.join(chemical_symbols[z] for z in unknown)}, which "
                    f"the foundation model {cfg.foundation} does not cover; choose a foundation that does")
    has_stress = cfg.use_stress and all(reference_stress(a, cfg.stress_key) is not None for a in train + valid)
    weight = cfg.new_frames_weight if cfg.replay_file else None
    train_n = [_normalise(a, cfg, weight) for a in train]
    if cfg.valid_file:
        valid_n = [_normalise(a, cfg, weight) for a in valid]
    else:
        train_n, valid_n = _split(train_n, cfg.valid_fraction, cfg.seed)
        valid_is_train = len(train) < 5
    if cfg.replay_file:
        replay_n, replay_valid = _split([_normalise(a, cfg, None) for a in replay], cfg.valid_fraction, cfg.seed)
    else:
        replay_n = []
    return _Prepared(train_n, valid_n, replay_n, replay_valid, isolated, len(isolated_frames), labeller,
                     has_stress, valid_is_train)


# ---------------------------------------------------------------------------------------------
# Restart bookkeeping


def _request(cfg: FinetuneConfig, foundation_path: Path) -> dict[str, Any]:
    inputs = {"foundation": str(foundation_path)}
    for key in ("train_file", "valid_file", "replay_file", "isolated_atoms_file"):
        value = getattr(cfg, key)
        if value:
            inputs[key] = value
    return {
        "config": cfg.to_dict(),
        "input_sha256": {k: sha256_file(v) for k, v in inputs.items()},
    }


def _check_request(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The stored request of a previous run in ``out``; StateError if it is a different fine-tune."""
    path = out / "request.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    changed = sorted(
        k for k in set(old["config"]) | set(request["config"])
        if k not in _RESUMABLE_KEYS and old["config"].get(k) != request["config"].get(k))
    changed += sorted(f"{k} (file contents)" for k in request["input_sha256"]
                      if old["input_sha256"].get(k) != request["input_sha256"][k])
    if changed:
        raise StateError(
            f"{out} holds a fine-tune with different settings or inputs ({', '.join(changed)}); its "
            "checkpoints would not belong to this request. Use another --output-dir, or delete "
            f"{out} to start over")
    return old


# ---------------------------------------------------------------------------------------------
# mace-torch


def mace_arguments(cfg: FinetuneConfig, foundation_path: Path, data_dir: Path, work_dir: Path,
                   e0: E0Decision, prepared: _Prepared, *, resume: bool = False) -> list[str]:
    """The ``mace.cli.run_train`` command line for this fine-tune (``resume``: continue from
    mace-torch's checkpoint in ``work_dir``).

    Everything not given here is mace-torch's default, as for ``mace_run_train`` by hand: Adam
    with AMSGrad, weight decay 5e-7, ReduceLROnPlateau, gradient clipping at 10, the model of the
    lowest validation loss. The differences from a hand-run with the same settings: the split
    is made here (by mace-torch's own function, so the frames and their order are the same),
    isolated-atom frames are left out (the E0s are decided first, see :mod:`.e0`), the loss
    includes stress when every frame has one, and the validation batch is at most the training
    batch (memory; the metrics do not depend on it)."""
    # mace-torch drops the last incomplete batch: a batch larger than the data means no step.
    batch = min(cfg.batch_size, len(prepared.train))
    args = [
        "--name", cfg.name,
        "--seed", str(cfg.seed),
        "--work_dir", str(work_dir),
        # Named, not left to mace-torch's defaults: the driver reads the metrics and checkpoints.
        "--results_dir", str(work_dir / "results"),
        "--checkpoints_dir", str(work_dir / "checkpoints"),
        "--device", cfg.device,
        "--default_dtype", cfg.dtype,
        "--foundation_model", str(foundation_path),  # a path: mace-torch never downloads it
        "--train_file", str(data_dir / "train.extxyz"),
        "--valid_file", str(data_dir / "valid.extxyz"),
        "--E0s", e0.mace_e0s_argument,
        "--energy_key", REF_ENERGY_KEY,
        "--forces_key", REF_FORCES_KEY,
        "--stress_key", REF_STRESS_KEY,
        "--energy_weight", repr(cfg.energy_weight),
        "--forces_weight", repr(cfg.forces_weight),
        "--stress_weight", repr(cfg.stress_weight),
        "--loss", "stress" if prepared.has_stress else "weighted",
        "--error_table", "PerAtomRMSEstressvirials" if prepared.has_stress else "PerAtomRMSE",
        "--batch_size", str(max(1, batch)),
        "--valid_batch_size", str(max(1, min(cfg.batch_size, len(prepared.valid)))),
        "--max_num_epochs", str(cfg.epochs),
        "--eval_interval", "1",
        "--ema", "--ema_decay", repr(cfg.ema_decay),
        "--amsgrad",
        "--num_workers", "0",
        "--save_cpu",
        *(["--restart_latest"] if resume else []),
        "--keep_isolated_atoms", "False",
        "--log_level", "INFO",
        "--plot", str(bool(cfg.mace_plots)),
    ]
    if cfg.replay_file:
        args += [
            "--multiheads_finetuning", "True",
            "--pt_train_file", str(data_dir / "replay.extxyz"),
            "--pt_valid_file", str(data_dir / "replay_valid.extxyz"),
        ]
        if cfg.lr is not None:
            args += ["--lr", repr(cfg.lr), "--force_mh_ft_lr", "True"]
    else:
        args += ["--multiheads_finetuning", "False", "--lr", repr(cfg.lr if cfg.lr is not None else 1e-3)]
    return args


def mace_version() -> str:
    """The installed mace-torch release (for messages and the summary)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mace-torch")
    except PackageNotFoundError:
        return "unknown"


def _format_changed(what: str, path: Path) -> ExternalProgramError:
    """Fail closed: what the driver checks is missing from mace-torch's output."""
    return ExternalProgramError(
        f"{what} in {path}. umlipft follows a fine-tune through the metrics records that mace-torch "
        f"{MACE_TESTED_VERSION} writes there (one JSON object per line: mode 'opt' with the training loss "
        "of each step, mode 'eval' with rmse_e_per_atom and rmse_f of each validation); the installed "
        f"mace-torch {mace_version()} wrote something else, so the E0 check, the progress and the "
        "divergence check cannot be made: the fine-tune was stopped. Install mace-torch "
        f"{MACE_TESTED_VERSION} (pip install mace-torch=={MACE_TESTED_VERSION})")


def _number(record: dict[str, Any], key: str, path: Path, line: int) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _format_changed(f"line {line}: a mode {record.get('mode')!r} record without a number "
                              f"under {key!r} (got {value!r})", path)
    return float(value)


class TrainingMonitor:
    """Reads mace-torch's metrics records as they are written and acts on them: the second E0
    check on the starting model's validation errors (the ``Initial`` evaluation), progress after
    every epoch, and a stop at the first non-finite training loss or validation error.

    ``start_epoch`` is the 0-based epoch mace-torch starts training at (0, or the checkpoint's
    epoch when resuming); ``guard`` applies the start-error limit (not to a resumed model)."""

    def __init__(self, cfg: FinetuneConfig, path: Path, *, start_epoch: int = 0, guard: bool = True,
                 valid_is_train: bool = False, offset: int = 0,
                 progress: Callable[[EpochProgress], None] | None = None) -> None:
        self.cfg = cfg
        self.path = path
        self.start_epoch = start_epoch
        self.guard = guard
        self.valid_is_train = valid_is_train
        self.progress = progress
        self.offset = offset  # bytes of the file already read
        self.line = 0
        self.head: str | None = None  # the fine-tuned head (pt_head is replay's second head)
        self.initial: tuple[float, float] | None = None  # (E meV/atom, F meV/Å) of the user head
        self.valid: dict[int, tuple[float, float]] = {}  # 0-based epoch -> (E, F) of the user head
        self.steps: dict[int, int] = {}  # 0-based epoch -> training steps logged
        self.epoch_times: list[float] = []
        self._t_last = time.perf_counter()

    def poll(self) -> None:
        """Feed the complete lines mace-torch has appended since the last call."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            self.feed(line)

    def feed(self, text: str) -> None:
        """Act on one metrics record (one line of the file)."""
        self.line += 1
        if not text.strip():
            return
        try:
            record = json.loads(text)  # mace-torch writes NaN and Infinity as such; json reads them
        except ValueError:
            raise _format_changed(f"line {self.line} is not a JSON record ({text[:80]!r})", self.path) from None
        if not isinstance(record, dict) or "mode" not in record:
            raise _format_changed(f"line {self.line} has no 'mode' ({text[:80]!r})", self.path)
        if record["mode"] == "opt":
            self._step(record)
        elif record["mode"] == "eval":
            self._eval(record)
        # Other modes (a later mace-torch's additions) carry nothing this driver needs.

    def _epoch_of(self, record: dict[str, Any], allow_none: bool) -> int | None:
        epoch = record.get("epoch", "missing")
        if epoch is None and allow_none:
            return None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise _format_changed(f"line {self.line}: a mode {record['mode']!r} record whose 'epoch' is {epoch!r}",
                                  self.path)
        return epoch

    def _step(self, record: dict[str, Any]) -> None:
        epoch = self._epoch_of(record, allow_none=False)
        assert epoch is not None
        loss = _number(record, "loss", self.path, self.line)
        if self.initial is None:
            raise _format_changed(f"line {self.line}: a training step before any initial validation record "
                                  "(the E0 check needs it)", self.path)
        self.steps[epoch] = self.steps.get(epoch, 0) + 1
        if not math.isfinite(loss):
            raise self._diverged(f"the training loss of step {self.steps[epoch]} of epoch {epoch + 1} is {loss}")

    def _eval(self, record: dict[str, Any]) -> None:
        epoch = self._epoch_of(record, allow_none=True)
        head = record.get("head")
        if not isinstance(head, str):
            raise _format_changed(f"line {self.line}: a validation record without a head name", self.path)
        loss = _number(record, "loss", self.path, self.line)
        e = _number(record, "rmse_e_per_atom", self.path, self.line) * 1000.0
        f = _number(record, "rmse_f", self.path, self.line) * 1000.0
        when = "before training" if epoch is None else f"after epoch {epoch + 1}"
        if not all(math.isfinite(x) for x in (loss, e, f)):
            raise self._diverged(f"the validation errors of head {head} {when} are not finite "
                                 f"(loss {loss}, RMSE E {e} meV/atom, F {f} meV/Å)")
        if head == "pt_head":
            return  # replay's head: finite (checked above), not what the user's model is judged by
        if self.head is None:
            self.head = head
        elif head != self.head:
            raise _format_changed(f"line {self.line}: validation records of two fine-tuned heads "
                                  f"({self.head}, {head})", self.path)
        now = time.perf_counter()
        if epoch is None:
            self.initial = (e, f)
            self._t_last = now
            # Second E0 guard, on mace-torch's own evaluation of the model it built: the
            # prediction of e0.decide_e0s must hold whatever mace-torch did internally.
            if self.guard and not self.cfg.accept_large_start_error and not e <= self.cfg.max_start_error_meV_per_atom:
                raise InputError(
                    f"mace-torch's starting model has an energy RMSE of {e:.1f} meV/atom on the "
                    f"validation frames, above max_start_error_meV_per_atom = "
                    f"{self.cfg.max_start_error_meV_per_atom:g}; training stopped before the first step. "
                    "Check the E0s (--e0s) and the reference energies, or pass --accept-large-start-error")
            return
        if self.initial is None:
            raise _format_changed(f"line {self.line}: an epoch's validation record before any initial one", self.path)
        self.valid[epoch] = (e, f)
        self.epoch_times.append(now - self._t_last)
        self._t_last = now
        if self.progress is not None:
            self.progress(EpochProgress(epoch + 1, self.cfg.epochs, e, f, self.epoch_times[-1], self.valid_is_train))

    def _diverged(self, what: str) -> ExternalProgramError:
        lr = self.cfg.lr if self.cfg.lr is not None else ("mace-torch's 1e-4" if self.cfg.replay_file else "1e-3")
        return ExternalProgramError(
            f"the fine-tune diverged: {what} (mace-torch's metrics, {self.path}). Training was stopped and "
            f"no model was written. Lower the learning rate (lr {lr}), use dtype float64, and check the "
            "reference labels and the starting model")

    def check_complete(self) -> None:
        """After mace-torch exited normally: every epoch it was to train must have logged its
        steps and its validation; if not, its output format changed (fail closed)."""
        if self.initial is None:
            raise _format_changed("no initial validation record of the fine-tuned head", self.path)
        missing = [e + 1 for e in range(self.start_epoch, self.cfg.epochs)
                   if e not in self.valid or not self.steps.get(e)]
        if missing:
            raise _format_changed(f"no training steps or no validation record for epoch(s) "
                                  f"{', '.join(map(str, missing))} of {self.cfg.epochs}", self.path)


def _die_with_parent() -> Callable[[], None] | None:
    """``preexec_fn`` for the training subprocess (Linux): it exits when the driver dies, SIGKILL
    included, so that a killed fine-tune leaves nothing writing into its output while a rerun
    starts (the output lock is the driver's, not the subprocess's). ``prctl`` is looked up here,
    in the parent: the forked child of a threaded workflow must not import anything."""
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the driver still terminates training on every exit it sees
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_parent_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return set_parent_death_signal


def _run_mace(args: list[str], log_path: Path, monitor: TrainingMonitor, *, poll_s: float = 0.25) -> None:
    """Run mace-torch's training, following its metrics records (see :class:`TrainingMonitor`)."""
    cmd = [sys.executable, "-m", "mace.cli.run_train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(steady_state_malloc_environment(env))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent())
        try:
            while True:
                rc = proc.poll()
                monitor.poll()  # after poll(): an exited process has written all its records
                if rc is not None:
                    break
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.terminate()  # a stopped or killed driver must not leave training running
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise ExternalProgramError(f"mace-torch training failed (exit {rc}); see {log_path}. Last lines:\n{tail}")
    monitor.check_complete()


# glibc's default serves every large tensor with a fresh mmap() and gives freed heap back, so
# each training step page-faults its working set in again (benchmarks/finetune_epoch.py).
# The same setting as pair_style mace; UMLIPFT_NO_MALLOC_TUNING=1 leaves malloc alone.
STEADY_STATE_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"


def steady_state_malloc_environment(env: dict[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES for a training subprocess, unless the user set their own or opted out."""
    if env.get("UMLIPFT_NO_MALLOC_TUNING") == "1" or "GLIBC_TUNABLES" in env:
        return {}
    return {"GLIBC_TUNABLES": STEADY_STATE_MALLOC}


def _tag(cfg: FinetuneConfig) -> str:
    return f"{cfg.name}_run-{cfg.seed}"  # mace-torch's tools.get_tag


def metrics_path(work_dir: Path, cfg: FinetuneConfig) -> Path:
    """mace-torch's metrics file of this fine-tune (its MetricsLogger: results/TAG_train.txt)."""
    return work_dir / "results" / f"{_tag(cfg)}_train.txt"


def _checkpoints(work_dir: Path, cfg: FinetuneConfig) -> dict[int, Path]:
    """mace-torch's checkpoints of this fine-tune by 0-based epoch (TAG_epoch-N.pt)."""
    found = {}
    for path in (work_dir / "checkpoints").glob(f"{_tag(cfg)}_epoch-*.pt"):
        match = re.fullmatch(re.escape(_tag(cfg)) + r"_epoch-(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _clear_work_dir(work_dir: Path, keep: Path) -> None:
    """Remove a previous attempt's mace-torch output (checkpoints, metrics, logs, models),
    keeping the driver's own training log (``keep``), which records every attempt."""
    if not work_dir.is_dir():
        return
    for entry in work_dir.iterdir():
        if entry == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _require_finite_weights(model_file: Path) -> None:
    """A model with a NaN or Inf weight predicts NaN somewhere; refuse to hand it on."""
    from ..models.foundation import load_mace_model

    model = load_mace_model(model_file, dtype="float64")
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ExternalProgramError(
            f"mace-torch wrote {model_file} with non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
            "the fine-tune diverged. No model was written: lower the learning rate and check the labels")


def _finished_training(cfg: FinetuneConfig, work_dir: Path, train_log: Path) -> TrainingMonitor | None:
    """The records of an earlier training in ``work_dir`` that validated all ``cfg.epochs`` epochs
    and whose model mace-torch wrote completely (it loads), else None."""
    from ..models.foundation import load_mace_model

    metrics_file = metrics_path(work_dir, cfg)
    trained = work_dir / f"{cfg.name}.model"
    if not metrics_file.is_file() or not trained.is_file() or not _checkpoints(work_dir, cfg):
        return None
    earlier = TrainingMonitor(cfg, metrics_file, guard=False)
    try:
        earlier.poll()
        earlier.check_complete()
        load_mace_model(trained)
    except UmlipftError:  # diverged, cut records, or a model file cut by the kill: train again
        return None
    if max(earlier.valid) != cfg.epochs - 1:
        return None
    log.warning("%s: the earlier training of this fine-tune ran all %d epochs and mace-torch wrote its model "
                "before the fine-tune was interrupted; that model is used, not trained again", work_dir, cfg.epochs)
    with open(train_log, "a") as handle:
        handle.write(f"# umlipft: earlier training finished ({cfg.epochs} epochs had run); its model is used\n")
    return earlier


def _previous_attempt(cfg: FinetuneConfig, work_dir: Path,
                      train_log: Path) -> "tuple[int | None, TrainingMonitor | None]":
    """What to do with an earlier training in ``work_dir``: (0-based epoch mace-torch resumes
    at, what the earlier attempts logged) when continuing from its checkpoint, else (None, None)
    after clearing it away (training starts afresh; said in a warning)."""
    metrics_file = metrics_path(work_dir, cfg)
    checkpoints = _checkpoints(work_dir, cfg)
    if not metrics_file.is_file() and not checkpoints:
        _clear_work_dir(work_dir, keep=train_log)  # nothing trained yet (e.g. killed while starting)
        return None, None
    earlier = TrainingMonitor(cfg, metrics_file, guard=False)
    problem = None
    try:
        earlier.poll()
    except UmlipftError as err:  # diverged or unreadable: nothing to continue from
        problem = str(err)
    done = len(earlier.valid)
    if cfg.resume_from_checkpoint and checkpoints and problem is None and max(checkpoints) < cfg.epochs:
        epoch = max(checkpoints)
        log.warning("%s: continuing this fine-tune from mace-torch's checkpoint of epoch %d (%d of %d epochs "
                    "had run); mace-torch trains epoch %d again. resume_from_checkpoint is inexact: the model "
                    "will differ from an uninterrupted run's, because %s", work_dir, epoch + 1, done,
                    cfg.epochs, epoch + 1, INEXACT_RESUME)
        return epoch, earlier
    why = (f"its metrics cannot be continued from ({problem})" if problem is not None
           else INEXACT_RESUME if not cfg.resume_from_checkpoint
           else "there is no checkpoint to continue from before the requested last epoch")
    log.warning("%s holds an earlier training of this fine-tune (%d of %d epochs had run); %s. It is trained "
                "again from epoch 1 with the same seed, so the model is the one an uninterrupted run gives%s",
                work_dir, done, cfg.epochs, why,
                "" if cfg.resume_from_checkpoint else " (resume_from_checkpoint: true continues instead, inexactly)")
    _clear_work_dir(work_dir, keep=train_log)
    with open(train_log, "a") as handle:
        handle.write(f"# umlipft: earlier training cleared ({done} epochs had run); training from epoch 1\n")
    return None, None


# ---------------------------------------------------------------------------------------------
# The driver


def _evenly(frames: Sequence[Any], count: int) -> list[Any]:
    if len(frames) <= count:
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [frames[i] for i in sorted(set(idx.tolist()))]


def _check_frames(frames: "Sequence[Atoms]", count: int) -> "list[Atoms]":
    """``count`` frames spread over the set, plus the first frame with each element they miss:
    an explicit E0 dict must cover every element mace-torch sees in the training data."""
    chosen = _evenly(frames, count)
    seen = {int(z) for a in chosen for z in a.numbers}
    for atoms in frames:
        new = {int(z) for z in atoms.numbers} - seen
        if new:
            chosen.append(atoms)
            seen |= new
    return chosen


@locks_output("finetune", lambda config, **_: config.output_dir)
def finetune(config: FinetuneConfig, *, progress: Callable[[EpochProgress], None] | None = None,
             log_progress: bool = False) -> FinetuneResult:
    """Fine-tune ``config.foundation`` on ``config.train_file`` and export the result.

    Restartable: rerunning the same request in the same ``output_dir`` does nothing when the
    fine-tune already finished; an interrupted one (or one asked for another number of epochs)
    is trained again from epoch 0 with the same seed, or with ``resume_from_checkpoint``
    continued from mace-torch's checkpoint (see :data:`INEXACT_RESUME`). A diverged training
    (non-finite loss or validation error) stops with an error and writes no model.
    """
    from ..models.export import ExportConfig, export_lammps_model
    from ..models.foundation import load_mace_model, resolve_foundation_model

    config.validate()
    out = Path(config.output_dir)
    summary = RunSummary("finetune", config, seed=config.seed)
    foundation_path = resolve_foundation_model(config.foundation)
    for key in ("train_file", "valid_file", "replay_file", "isolated_atoms_file"):
        value = getattr(config, key)
        if value and not Path(value).is_file():
            raise InputError(f"{key.replace('_', ' ')} {value} does not exist")
    request = _request(config, foundation_path)
    previous = _check_request(out, request)
    model_path = out / f"{config.name}.model"
    lammps_path = out / f"{config.name}-lammps-{config.export_dtype}.pt"
    watch = str(out / "data" / "train.extxyz") if config.export_watch else None
    result_path = out / "result.json"

    if previous is not None and result_path.is_file():
        stored = json.loads(result_path.read_text())
        done = FinetuneResult.from_dict(stored)
        recorded = stored.get("outputs")  # absent in results written before outputs were recorded
        # Only the same number of epochs: mace-torch cannot shorten a training, and lengthening
        # one is a resume (below).
        if done.epochs == config.epochs and (recorded is not None or model_path.is_file()):
            _verify_outputs(out, recorded or {}, model_path.name,
                            lammps_path.name if config.export and lammps_path.is_file() else None)
            lammps = done.lammps_model_path
            if config.export and not lammps_path.is_file():
                lammps = export_lammps_model(ExportConfig(model=str(model_path), output=str(lammps_path),
                                                          dtype=config.export_dtype, optimize=True, watch=watch))
                if recorded is not None:
                    stored["outputs"] = {**recorded, **_describe_outputs(lammps)}
                    atomic_write_text(result_path, json.dumps(stored, indent=2) + "\n")
            return dataclasses.replace(done, lammps_model_path=lammps if config.export else None,
                                       epoch_times_s=(), skipped=True)

    # Everything about the inputs is checked here, before any training.
    with summary.timed("prepare"):
        foundation = load_mace_model(foundation_path, dtype="float32")
        prepared = _prepare(config, frozenset(int(z) for z in foundation.atomic_numbers))
    with summary.timed("e0_check"):
        from ..evaluate.predict import ModelEvaluator

        # float32 is ample for an error measured in tens of meV/atom, and four times faster.
        check = _check_frames(prepared.train, config.e0_check_frames)
        evaluator = ModelEvaluator(foundation_path, dtype="float32", device="cpu", loaded=foundation)
        energies = [p.energy_eV for p in evaluator.predict(check, source=config.train_file)]
        e0 = decide_e0s(
            policy=config.e0s, frames=check, foundation_energies_eV=energies,
            foundation_e0=foundation_e0s(foundation), isolated=prepared.isolated,
            energy_key=REF_ENERGY_KEY, max_start_error_meV_per_atom=config.max_start_error_meV_per_atom,
            accept_large_start_error=config.accept_large_start_error,
            isolated_frames_dropped=prepared.isolated_dropped, labeller=prepared.labeller)
        del evaluator, foundation
    log.info("E0s: %s (%s)", e0.policy, e0.reason)
    if prepared.isolated_dropped:
        log.warning("%d isolated-atom frame(s) left out of training: E0s are %s (policy %r)",
                    prepared.isolated_dropped,
                    "the foundation's fitted values" if e0.policy == "foundation" else "given explicitly",
                    e0.policy)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "request.json", json.dumps(request, indent=2) + "\n")
    data_dir = out / "data"
    write_frames(data_dir / "train.extxyz", prepared.train)
    write_frames(data_dir / "valid.extxyz", prepared.valid)
    if config.replay_file:
        write_frames(data_dir / "replay.extxyz", prepared.replay)
        write_frames(data_dir / "replay_valid.extxyz", prepared.replay_valid)
    work_dir = out / "mace"
    train_log = work_dir / "umlipft-train.log"
    # A previous finished model of another length, or its export, must not outlive this training
    # (a diverged or interrupted one leaves no model behind).
    for stale in (result_path, model_path, *out.glob(f"{config.name}-lammps-*.pt")):
        stale.unlink(missing_ok=True)
    # Killed after mace-torch had trained every epoch and written its model: that is the
    # uninterrupted training's model, used as it is instead of training it again.
    earlier = _finished_training(config, work_dir, train_log)
    resume_epoch, earlier = (None, earlier) if earlier is not None else _previous_attempt(config, work_dir, train_log)
    before = earlier.valid if earlier is not None else {}
    metrics_file = metrics_path(work_dir, config)
    args = mace_arguments(config, foundation_path, data_dir, work_dir, e0, prepared,
                          resume=resume_epoch is not None)

    def show(p: EpochProgress) -> None:
        if progress is not None:
            progress(p)
        if log_progress:
            print(f"\r{p.describe()}", end="\n" if p.epoch == p.epochs else "", file=sys.stderr, flush=True)

    monitor = TrainingMonitor(config, metrics_file, start_epoch=resume_epoch or 0, guard=resume_epoch is None,
                              valid_is_train=prepared.valid_is_train, progress=show,
                              offset=metrics_file.stat().st_size if resume_epoch is not None else 0)
    if earlier is None or resume_epoch is not None:
        with summary.timed("train"):
            _run_mace(args, train_log, monitor)
    trained = work_dir / f"{config.name}.model"
    if not trained.is_file():
        raise ExternalProgramError(f"mace-torch finished without writing {trained}; see {train_log}")
    _require_finite_weights(trained)
    # mace-torch's model is its latest checkpoint: the epoch of lowest validation loss.
    checkpoints = _checkpoints(work_dir, config)
    if not checkpoints:
        raise _format_changed("no checkpoint, so the epoch the model comes from is unknown",
                              work_dir / "checkpoints")
    model_epoch = max(checkpoints)
    model_valid = monitor.valid.get(model_epoch) or before.get(model_epoch)
    if model_valid is None:
        raise _format_changed(f"no validation record of epoch {model_epoch + 1}, whose checkpoint "
                              "the model is", metrics_file)
    with atomic_path(model_path) as tmp:
        shutil.copyfile(trained, tmp)
    lammps_model: Path | None = None
    if config.export:
        with summary.timed("export"):
            lammps_model = export_lammps_model(ExportConfig(model=str(model_path), output=str(lammps_path),
                                                            dtype=config.export_dtype, optimize=True, watch=watch))
    # The starting model's errors (a resumed training's first validation is of its checkpoint).
    start = earlier.initial if earlier is not None and earlier.initial is not None else monitor.initial
    result = FinetuneResult(
        model_path=model_path, lammps_model_path=lammps_model, output_dir=out, mode=config.mode,
        e0=e0.to_dict(), n_train=len(prepared.train), n_valid=len(prepared.valid),
        n_replay=len(prepared.replay), epochs=config.epochs, epoch_times_s=tuple(monitor.epoch_times),
        initial_valid_rmse_e_meV_per_atom=start[0] if start is not None else None,
        final_valid_rmse_e_meV_per_atom=model_valid[0], final_valid_rmse_f_meV_per_A=model_valid[1],
        skipped=False, valid_is_train=prepared.valid_is_train, model_epoch=model_epoch + 1,
    )
    summary.results = {**result.to_dict(), "e0_policy": e0.policy, "e0_reason": e0.reason,
                       "mace_arguments": args, "mace_torch_version": mace_version(),
                       # 1-based epoch training continued from (inexactly), None when it started afresh
                       "resumed_from_epoch": resume_epoch + 1 if resume_epoch is not None else None,
                       "valid_rmse_by_epoch": {str(k + 1): list(v) for k, v in sorted({**before, **monitor.valid}.items())}}
    outputs = _describe_outputs(model_path, *([lammps_model] if lammps_model is not None else []))
    atomic_write_text(result_path, json.dumps({**result.to_dict(), "outputs": outputs}, indent=2) + "\n")
    summary.write(out / "summary.json")
    return result


def _describe_outputs(*paths: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {sha256, bytes}}`` of a finished fine-tune's files, kept in result.json."""
    return {Path(p).name: {"sha256": sha256_file(p), "bytes": Path(p).stat().st_size} for p in paths}


def _verify_outputs(out: Path, recorded: dict[str, dict[str, Any]], model: str, export: str | None) -> None:
    """Refuse to hand on a finished fine-tune's model (or export) that is not the file it wrote:
    a cut, edited or missing model would otherwise be reused as the trained one."""
    for name in (model, export):
        if name is None or name not in recorded:
            continue
        path, want = out / name, recorded[name]
        redo = (f"delete {out} and rerun the same umlipft finetune command to train it again (or put the "
                "original file back)" if name == model else
                f"delete {path} and rerun the same command to export the model again (or put the original back)")
        if not path.is_file():
            raise StateError(f"{path} is missing from this finished fine-tune; {redo}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise StateError(f"{path} was changed after this fine-tune finished: {size} bytes instead of "
                             f"{want['bytes']} (cut off or replaced); {redo}")
        if sha256_file(path) != want["sha256"]:
            raise StateError(f"{path} was changed after this fine-tune finished: its content differs from "
                             f"what the fine-tune wrote (sha256); {redo}")
