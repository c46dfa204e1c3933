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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, ExternalProgramError, InputError, StateError
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

# Settings that may change between a run and its rerun without invalidating the checkpoints:
# more epochs continue the same training; the rest do not touch the trained weights (the E0
# guard's settings only decide whether to start; the E0s themselves follow from e0s and data).
_RESUMABLE_KEYS = frozenset({"epochs", "output_dir", "export_dtype", "export", "e0_check_frames",
                             "max_start_error_meV_per_atom", "accept_large_start_error", "mace_plots"})


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
    # mace-torch's end-of-training plots (its --plot): they evaluate every training and
    # validation frame once more, which on 3 aqueous frames was 30 s of a 165 s fine-tune.
    mace_plots: bool = False
    seed: int = 123
    device: str = "cpu"
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
    final_valid_rmse_e_meV_per_atom: float | None
    final_valid_rmse_f_meV_per_A: float | None
    skipped: bool  # True when the output already held this finished fine-tune

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("model_path", "lammps_model_path", "output_dir"):
            d[key] = str(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneResult":
        d = dict(d)
        d["model_path"] = Path(d["model_path"])
        d["lammps_model_path"] = Path(d["lammps_model_path"]) if d["lammps_model_path"] else None
        d["output_dir"] = Path(d["output_dir"])
        d["epoch_times_s"] = tuple(d["epoch_times_s"])
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
    """Seeded train/valid split. Fewer than 5 frames cannot spare any: validate on the training
    frames (mace-torch needs a validation set), which the result records."""
    if len(frames) < 5:
        return frames, list(frames)
    n_valid = max(1, int(round(fraction * len(frames))))
    order = np.random.default_rng(seed).permutation(len(frames))
    valid_idx = set(order[:n_valid].tolist())
    return ([a for i, a in enumerate(frames) if i not in valid_idx],
            [a for i, a in enumerate(frames) if i in valid_idx])


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


_VALID_LINE = re.compile(
    r"(?P<tag>Initial|Epoch (?P<epoch>\d+)): head: (?P<head>\S+), loss=\s*\S+, "
    r"RMSE_E_per_atom=\s*(?P<e>[-\d.naninf]+) meV, RMSE_F=\s*(?P<f>[-\d.naninf]+) meV")


def mace_arguments(cfg: FinetuneConfig, foundation_path: Path, data_dir: Path, work_dir: Path,
                   e0: E0Decision, prepared: _Prepared) -> list[str]:
    """The ``mace.cli.run_train`` command line for this fine-tune."""
    # mace-torch drops the last incomplete batch: a batch larger than the data means no step.
    batch = min(cfg.batch_size, len(prepared.train))
    args = [
        "--name", cfg.name,
        "--seed", str(cfg.seed),
        "--work_dir", str(work_dir),
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
        "--restart_latest",
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


def _run_mace(args: list[str], log_path: Path, cfg: FinetuneConfig, start_epoch: int,
              progress: Callable[[EpochProgress], None] | None) -> tuple[list[float], list[tuple[float | None, float | None]], float | None]:
    """Run mace-torch's training, following its validation lines for progress and the start guard."""
    # -u: mace-torch logs to stdout; block buffering would hold progress and the start guard
    # back until the end of training.
    cmd = [sys.executable, "-u", "-m", "mace.cli.run_train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(steady_state_malloc_environment(env))
    epoch_times: list[float] = []
    valid_errors: list[tuple[float | None, float | None]] = []
    initial: float | None = None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        t_last = time.perf_counter()
        try:
            for line in proc.stdout:
                log_file.write(line)
                match = _VALID_LINE.search(line)
                if not match or match["head"] == "pt_head":
                    continue
                e = float(match["e"])
                f = float(match["f"])
                now = time.perf_counter()
                if match["tag"] == "Initial":
                    initial = e
                    t_last = now
                    # Second E0 guard, on mace-torch's own evaluation of the model it built: the
                    # prediction of e0.decide_e0s must hold whatever mace-torch did internally.
                    if (not cfg.accept_large_start_error and start_epoch == 0
                            and not e <= cfg.max_start_error_meV_per_atom):
                        proc.terminate()
                        proc.wait()
                        raise InputError(
                            f"mace-torch's starting model has an energy RMSE of {e:.1f} meV/atom on the "
                            f"validation frames, above max_start_error_meV_per_atom = "
                            f"{cfg.max_start_error_meV_per_atom:g}; training stopped before the first step. "
                            "Check the E0s (--e0s) and the reference energies, or pass "
                            "--accept-large-start-error")
                    continue
                epoch_times.append(now - t_last)
                t_last = now
                valid_errors.append((e, f))
                if progress is not None:
                    progress(EpochProgress(int(match["epoch"]) + 1, cfg.epochs, e, f, epoch_times[-1]))
        except BaseException:
            if proc.poll() is None:
                proc.terminate()  # a killed driver must not leave training running
                proc.wait()
            raise
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise ExternalProgramError(f"mace-torch training failed (exit {rc}); see {log_path}. Last lines:\n{tail}")
    return epoch_times, valid_errors, initial


# glibc's default serves every large tensor with a fresh mmap() and gives freed heap back, so
# each training step page-faults its working set in again (benchmarks/finetune_epoch.py).
# The same setting as pair_style mace; UMLIPFT_NO_MALLOC_TUNING=1 leaves malloc alone.
STEADY_STATE_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"


def steady_state_malloc_environment(env: dict[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES for a training subprocess, unless the user set their own or opted out."""
    if env.get("UMLIPFT_NO_MALLOC_TUNING") == "1" or "GLIBC_TUNABLES" in env:
        return {}
    return {"GLIBC_TUNABLES": STEADY_STATE_MALLOC}


def _checkpoint_epoch(work_dir: Path, cfg: FinetuneConfig) -> int:
    """Epoch of the newest mace-torch checkpoint (0 when none): where a rerun resumes."""
    best = 0
    for path in (work_dir / "checkpoints").glob(f"{cfg.name}_run-{cfg.seed}_epoch-*.pt"):
        match = re.search(r"_epoch-(\d+)\.pt$", path.name)
        if match:
            best = max(best, int(match.group(1)) + 1)
    return best


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

    Restartable: rerunning the same request in the same ``output_dir`` resumes from mace-torch's
    latest checkpoint, or does nothing when the fine-tune already finished.
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
    result_path = out / "result.json"

    if previous is not None and result_path.is_file() and model_path.is_file():
        done = FinetuneResult.from_dict(json.loads(result_path.read_text()))
        if done.epochs >= config.epochs:
            lammps = done.lammps_model_path
            if config.export and not lammps_path.is_file():
                lammps = export_lammps_model(ExportConfig(model=str(model_path), output=str(lammps_path),
                                                          dtype=config.export_dtype, optimize=True))
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
        energies = [p.energy_eV for p in evaluator.predict(check)]
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
    start_epoch = _checkpoint_epoch(work_dir, config)
    args = mace_arguments(config, foundation_path, data_dir, work_dir, e0, prepared)

    def show(p: EpochProgress) -> None:
        if progress is not None:
            progress(p)
        if log_progress:
            print(f"\repoch {p.epoch}/{p.epochs}: valid RMSE E {p.valid_rmse_e_meV_per_atom:.2f} meV/atom, "
                  f"F {p.valid_rmse_f_meV_per_A:.1f} meV/Å ({p.seconds:.1f} s/epoch)",
                  end="\n" if p.epoch == p.epochs else "", file=sys.stderr, flush=True)

    with summary.timed("train"):
        epoch_times, valid_errors, initial = _run_mace(args, work_dir / "umlipft-train.log", config,
                                                       start_epoch, show)
    trained = work_dir / f"{config.name}.model"
    if not trained.is_file():
        raise ExternalProgramError(f"mace-torch finished without writing {trained}; see {work_dir / 'umlipft-train.log'}")
    with atomic_path(model_path) as tmp:
        shutil.copyfile(trained, tmp)
    lammps_model: Path | None = None
    if config.export:
        with summary.timed("export"):
            lammps_model = export_lammps_model(ExportConfig(model=str(model_path), output=str(lammps_path),
                                                            dtype=config.export_dtype, optimize=True))
    result = FinetuneResult(
        model_path=model_path, lammps_model_path=lammps_model, output_dir=out, mode=config.mode,
        e0=e0.to_dict(), n_train=len(prepared.train), n_valid=len(prepared.valid),
        n_replay=len(prepared.replay), epochs=config.epochs, epoch_times_s=tuple(epoch_times),
        initial_valid_rmse_e_meV_per_atom=initial,
        final_valid_rmse_e_meV_per_atom=valid_errors[-1][0] if valid_errors else None,
        final_valid_rmse_f_meV_per_A=valid_errors[-1][1] if valid_errors else None,
        skipped=False,
    )
    summary.results = {**result.to_dict(), "e0_policy": e0.policy, "e0_reason": e0.reason,
                       "valid_is_train": prepared.valid_is_train,
                       "mace_arguments": args, "resumed_from_epoch": start_epoch}
    atomic_write_text(result_path, json.dumps(result.to_dict(), indent=2) + "\n")
    summary.write(out / "summary.json")
    return result
