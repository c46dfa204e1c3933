"""``umlipft evaluate``: model errors on labelled frames, cross-evaluation, self-consistent residual.

- :func:`evaluate_model`: one model on one set of labelled frames.
- :func:`cross_evaluate`: every model on every frame set (the study evaluates each long-run model
  on the other's snapshots).
- :func:`self_consistent_residual`: the study's headline metric, (PotEng of the model's own MD at
  the labelled step - E_DFT)/N, from the run's thermo log and its labelled frames; no model is
  evaluated, the MD already did that.
- :func:`evaluate`: the driver behind the CLI, doing any of the above from an
  :class:`EvaluateConfig` and writing JSON, CSV and a run summary.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError
from ..io import (REF_ENERGY_KEY, REF_FORCES_KEY, REF_STRESS_KEY, atomic_path, atomic_write_text,
                  read_frames, reference_energy, reference_forces, reference_stress,
                  require_reference_labels)
from ..lock import locks_output
from ..summary import RunSummary
from .metrics import ErrorSummary, FrameError, energy_residuals_meV_per_atom, rmse, summarise, voigt6
from .thermo import frame_step, read_thermo_table

if TYPE_CHECKING:
    from ase import Atoms

    from .predict import ModelEvaluator

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(DriverConfig):
    """What to evaluate. ``models`` and ``frames`` entries are ``PATH`` or ``NAME=PATH``; every
    model is evaluated on every frame set. ``md_log`` adds the self-consistent residual of that
    MD run against the (single) frame set labelled from it."""

    models: tuple[str, ...] = ()
    frames: tuple[str, ...] = ()
    md_log: str | None = None
    output_dir: str = "evaluation"
    dtype: str = "float64"
    head: str | None = None
    device: str = "cpu"
    energy_key: str = REF_ENERGY_KEY
    forces_key: str = REF_FORCES_KEY
    stress_key: str = REF_STRESS_KEY
    step_key: str = "step"
    dump_every_steps: int = 1000

    def validate(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if not self.frames:
            raise ConfigError("give at least one labelled frames file")
        if not self.models and not self.md_log:
            raise ConfigError("nothing to do: give --model (model errors) and/or --md-log (self-consistent residual)")
        if self.md_log and len(self.frames) != 1:
            raise ConfigError("--md-log pairs one MD run with the frames labelled from it; give exactly one frames file")
        if self.dump_every_steps < 1:
            raise ConfigError(f"dump_every_steps must be positive, got {self.dump_every_steps}")
        for entry in (*self.models, *self.frames):
            _split_named(entry)


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """One model on one frame set."""

    model: str
    model_path: str
    frames: str
    frames_path: str
    dtype: str
    head: str
    summary: ErrorSummary
    per_frame: tuple[FrameError, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SelfConsistentRow:
    index: int
    step: int
    n_atoms: int
    energy_ref_eV: float
    pot_eng_eV: float
    residual_meV_per_atom: float
    source: str | None


@dataclasses.dataclass(frozen=True)
class SelfConsistentReport:
    md_log: str
    frames_path: str
    n_frames: int
    residual_mean_meV_per_atom: float
    residual_rmse_meV_per_atom: float
    residual_max_abs_meV_per_atom: float
    per_frame: tuple[SelfConsistentRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    reports: tuple[EvaluationReport, ...]
    self_consistent: SelfConsistentReport | None
    output_dir: Path
    json_path: Path
    csv_path: Path | None

    def report(self, model: str, frames: str) -> EvaluationReport:
        for r in self.reports:
            if r.model == model and r.frames == frames:
                return r
        raise KeyError(f"no report for model {model!r} on frames {frames!r}")


def _split_named(entry: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path is named after its file stem."""
    if "=" in entry and not Path(entry).exists():
        name, _, path = entry.partition("=")
        if not name or not path:
            raise ConfigError(f"expected PATH or NAME=PATH, got {entry!r}")
        return name, path
    stem = Path(entry).name
    for suffix in (".extxyz", ".xyz", ".model", ".pt"):
        stem = stem.removesuffix(suffix)
    return stem, entry


def load_labelled_frames(path: str | Path, *, energy_key: str = REF_ENERGY_KEY,
                         forces_key: str = REF_FORCES_KEY, forces: bool = True) -> "list[Atoms]":
    """Read frames and insist on reference labels (``REF_*`` keys or plain ``energy``/``forces``)."""
    frames = read_frames(path)
    require_reference_labels(frames, path, forces=forces, energy_key=energy_key, forces_key=forces_key)
    return frames


def compare(predictions: Sequence[Any], frames: "Sequence[Atoms]", *, energy_key: str = REF_ENERGY_KEY,
            forces_key: str = REF_FORCES_KEY, stress_key: str = REF_STRESS_KEY,
            step_key: str = "step") -> tuple[ErrorSummary, tuple[FrameError, ...]]:
    """Errors of predictions (``.energy_eV``, ``.forces_eV_per_A``, ``.stress_eV_per_A3``) against labels."""
    rows: list[FrameError] = []
    force_diffs: list[np.ndarray] = []
    stress_diffs: list[np.ndarray | None] = []
    symbols: list[list[str]] = []
    for i, (pred, atoms) in enumerate(zip(predictions, frames, strict=True)):
        n = len(atoms)
        e_ref = reference_energy(atoms, energy_key)
        assert e_ref is not None  # checked by load_labelled_frames before any work
        f_ref = reference_forces(atoms, forces_key)
        s_ref = reference_stress(atoms, stress_key)
        f_diff = (np.asarray(pred.forces_eV_per_A) - np.asarray(f_ref, dtype=float)
                  if f_ref is not None else np.empty((0, 3)))
        s_diff = None
        if s_ref is not None and np.all(np.isfinite(pred.stress_eV_per_A3)):
            s_diff = voigt6(pred.stress_eV_per_A3) - voigt6(s_ref)
        step = atoms.info.get(step_key)
        rows.append(FrameError(
            index=i, n_atoms=n, energy_ref_eV=e_ref, energy_model_eV=float(pred.energy_eV),
            energy_residual_meV_per_atom=float(energy_residuals_meV_per_atom([pred.energy_eV], [e_ref], [n])[0]),
            force_rmse_eV_per_A=rmse(f_diff) if f_diff.size else None,
            stress_rmse_eV_per_A3=rmse(s_diff) if s_diff is not None else None,
            step=int(step) if step is not None else None,
            source=str(atoms.info["source"]) if "source" in atoms.info else None,
        ))
        force_diffs.append(f_diff)
        stress_diffs.append(s_diff)
        symbols.append(atoms.get_chemical_symbols())
    return summarise(rows, force_diffs, symbols, stress_diffs), tuple(rows)


def evaluate_model(model: "str | Path | ModelEvaluator", frames: "str | Path | Sequence[Atoms]", *,
                   dtype: str = "float64", head: str | None = None, device: str = "cpu",
                   model_name: str | None = None, frames_name: str | None = None,
                   energy_key: str = REF_ENERGY_KEY, forces_key: str = REF_FORCES_KEY,
                   stress_key: str = REF_STRESS_KEY, step_key: str = "step",
                   progress: Callable[[int, int], None] | None = None) -> EvaluationReport:
    """Evaluate one model (a file, a foundation name or a loaded :class:`ModelEvaluator`) on
    labelled frames (a file or a list of Atoms)."""
    from .predict import ModelEvaluator

    evaluator = model if isinstance(model, ModelEvaluator) else ModelEvaluator(
        model, dtype=dtype, head=head, device=device)
    if isinstance(frames, (str, Path)):
        frames_path = str(frames)
        atoms_list = load_labelled_frames(frames, energy_key=energy_key, forces_key=forces_key)
    else:
        frames_path = "<in memory>"
        atoms_list = list(frames)
        require_reference_labels(atoms_list, frames_path, energy_key=energy_key, forces_key=forces_key)
    evaluator.check_elements(atoms_list, frames_path)
    predictions = evaluator.predict(atoms_list, progress=progress, source=frames_path)
    summary, rows = compare(predictions, atoms_list, energy_key=energy_key, forces_key=forces_key,
                            stress_key=stress_key, step_key=step_key)
    return EvaluationReport(
        model=model_name or _split_named(str(evaluator.path))[0], model_path=str(evaluator.path),
        frames=frames_name or _split_named(frames_path)[0], frames_path=frames_path,
        dtype=evaluator.dtype, head=evaluator.head, summary=summary, per_frame=rows,
    )


def cross_evaluate(models: "Mapping[str, str | Path | ModelEvaluator]", frames: Mapping[str, str | Path], *,
                   dtype: str = "float64", head: str | None = None, device: str = "cpu",
                   energy_key: str = REF_ENERGY_KEY, forces_key: str = REF_FORCES_KEY,
                   stress_key: str = REF_STRESS_KEY,
                   progress: Callable[[str, str, int, int], None] | None = None) -> list[EvaluationReport]:
    """Every model (a file, a foundation name or a loaded :class:`ModelEvaluator`, which keeps
    its own dtype and head) on every frame set; all inputs are checked before the first prediction."""
    from .predict import ModelEvaluator

    evaluators = {name: path if isinstance(path, ModelEvaluator)
                  else ModelEvaluator(path, dtype=dtype, head=head, device=device)
                  for name, path in models.items()}
    frame_sets = {name: load_labelled_frames(path, energy_key=energy_key, forces_key=forces_key)
                  for name, path in frames.items()}
    for evaluator in evaluators.values():
        for fname, atoms_list in frame_sets.items():
            evaluator.check_elements(atoms_list, str(frames[fname]))
    reports = []
    for mname, evaluator in evaluators.items():
        for fname, atoms_list in frame_sets.items():
            def step(done: int, total: int, _m: str = mname, _f: str = fname) -> None:
                if progress is not None:
                    progress(_m, _f, done, total)
            predictions = evaluator.predict(atoms_list, progress=step, source=str(frames[fname]))
            summary, rows = compare(predictions, atoms_list, energy_key=energy_key,
                                    forces_key=forces_key, stress_key=stress_key)
            reports.append(EvaluationReport(
                model=mname, model_path=str(evaluator.path), frames=fname, frames_path=str(frames[fname]),
                dtype=evaluator.dtype, head=evaluator.head, summary=summary, per_frame=rows))
    return reports


def self_consistent_residual(md_log: str | Path, frames: str | Path, *, energy_key: str = REF_ENERGY_KEY,
                             step_key: str = "step", dump_every_steps: int = 1000) -> SelfConsistentReport:
    """(PotEng at each labelled frame's step - E_ref)/N for an MD run and the frames labelled from it."""
    atoms_list = load_labelled_frames(frames, energy_key=energy_key, forces=False)
    table = read_thermo_table(md_log)
    pot_eng = dict(zip((int(round(s)) for s in table["Step"]), table["PotEng"]))
    rows = []
    for i, atoms in enumerate(atoms_list):
        step = frame_step(atoms, i, step_key=step_key, dump_every_steps=dump_every_steps, source=str(frames))
        if step not in pot_eng:
            steps = sorted(pot_eng)
            raise InputError(
                f"{frames}: frame {i} is from step {step}, which {md_log} does not list (it covers steps "
                f"{steps[0]}-{steps[-1]}, every {steps[1] - steps[0] if len(steps) > 1 else '?'}). Check that "
                "the log belongs to the run the frames were labelled from, and --dump-every-steps"
            )
        e_ref = reference_energy(atoms, energy_key)
        assert e_ref is not None
        n = len(atoms)
        rows.append(SelfConsistentRow(
            index=i, step=step, n_atoms=n, energy_ref_eV=e_ref, pot_eng_eV=pot_eng[step],
            residual_meV_per_atom=(pot_eng[step] - e_ref) / n * 1000.0,
            source=str(atoms.info["source"]) if "source" in atoms.info else None))
    residuals = np.array([r.residual_meV_per_atom for r in rows])
    return SelfConsistentReport(
        md_log=str(md_log), frames_path=str(frames), n_frames=len(rows),
        residual_mean_meV_per_atom=float(residuals.mean()),
        residual_rmse_meV_per_atom=rmse(residuals),
        residual_max_abs_meV_per_atom=float(np.abs(residuals).max()),
        per_frame=tuple(rows))


_SUMMARY_COLUMNS = (
    "model", "frames", "n_frames", "n_atoms", "energy_residual_mean_meV_per_atom",
    "energy_residual_rmse_meV_per_atom", "energy_residual_mae_meV_per_atom",
    "energy_residual_max_abs_meV_per_atom", "force_rmse_eV_per_A", "force_mae_eV_per_A",
    "stress_rmse_eV_per_A3", "stress_rmse_GPa",
)


def write_reports_csv(path: str | Path, reports: Sequence[EvaluationReport]) -> Path:
    """One row per (model, frames): the cross-evaluation table. Per-element force RMSEs are
    extra columns ``force_rmse_<El>_eV_per_A``."""
    elements = sorted({el for r in reports for el in r.summary.force_rmse_per_element_eV_per_A})
    header = list(_SUMMARY_COLUMNS) + [f"force_rmse_{el}_eV_per_A" for el in elements]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in reports:
            s = dataclasses.asdict(r.summary)
            row = [r.model, r.frames] + [s[c] for c in _SUMMARY_COLUMNS[2:]]
            row += [s["force_rmse_per_element_eV_per_A"].get(el) for el in elements]
            writer.writerow(row)
    return Path(path)


def write_rows_csv(path: str | Path, rows: Sequence[Any]) -> Path:
    """Per-frame rows (dataclasses) as CSV."""
    fields = [f.name for f in dataclasses.fields(rows[0])] if rows else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, f) for f in fields])
    return Path(path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@locks_output("evaluate", lambda config, **_: config.output_dir)
def evaluate(config: EvaluateConfig, *, progress: bool = False) -> EvaluationResult:
    """Run what ``config`` asks for and write ``evaluation.json``, ``evaluation.csv`` (one row per
    model and frame set), per-frame CSVs and ``summary.json`` under ``config.output_dir``."""
    config.validate()
    summary = RunSummary("evaluate", config)
    out = Path(config.output_dir)
    models = dict(_split_named(m) for m in config.models)
    frames = dict(_split_named(f) for f in config.frames)
    if len(models) != len(config.models) or len(frames) != len(config.frames):
        raise ConfigError("two models or two frame sets have the same name; name them with NAME=PATH")

    # Self-consistent inputs are checked before any model is loaded: one error, before any work.
    sc_report = None
    if config.md_log:
        with summary.timed("self_consistent"):
            sc_report = self_consistent_residual(
                config.md_log, next(iter(frames.values())), energy_key=config.energy_key,
                step_key=config.step_key, dump_every_steps=config.dump_every_steps)

    reports: list[EvaluationReport] = []
    if models:
        def show(model: str, frame_set: str, done: int, total: int) -> None:
            if progress:
                print(f"\r{model} on {frame_set}: {done}/{total} frames", end="" if done < total else "\n",
                      file=sys.stderr, flush=True)
        with summary.timed("evaluate"):
            reports = cross_evaluate(models, frames, dtype=config.dtype, head=config.head,
                                     device=config.device, energy_key=config.energy_key,
                                     forces_key=config.forces_key, stress_key=config.stress_key,
                                     progress=show)

    payload: dict[str, Any] = {"reports": [r.to_dict() for r in reports],
                               "self_consistent": sc_report.to_dict() if sc_report else None}
    json_path = out / "evaluation.json"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    csv_path = None
    if reports:
        csv_path = write_reports_csv(out / "evaluation.csv", reports)
        for r in reports:
            write_rows_csv(out / f"frames__{_safe(r.model)}__{_safe(r.frames)}.csv", r.per_frame)
    if sc_report:
        write_rows_csv(out / "self_consistent.csv", sc_report.per_frame)
    summary.results = {
        "reports": [{"model": r.model, "frames": r.frames, **{k: v for k, v in dataclasses.asdict(r.summary).items()}}
                    for r in reports],
        "self_consistent": ({k: v for k, v in sc_report.to_dict().items() if k != "per_frame"}
                            if sc_report else None),
    }
    summary.write(out / "summary.json")
    return EvaluationResult(tuple(reports), sc_report, out, json_path, csv_path)
