"""The study's loop as workflow stages: each wraps one library driver and returns a small,
JSON-able result (paths relative to the workflow directory, counts, hashes)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ExternalProgramError, InputError
from ..label.config import CALCULATORS
from .config import WorkflowConfig
from ..io import sha256_file
from .state import WorkflowState

if TYPE_CHECKING:
    from ase import Atoms

# In-process torch work (model export; the fine-tune driver's data preparation and E0 check)
# changes process-wide torch state (default dtype), so stages running in threads take turns.
TORCH_LOCK = threading.Lock()

LABELLED = "labelled.extxyz"
FRAMES = "frames.extxyz"
TRAIN = "train.extxyz"


def rel(state: WorkflowState, path: str | Path) -> str:
    return str(Path(path).resolve().relative_to(state.root))


def absolute(state: WorkflowState, path: str) -> Path:
    return state.root / path


# ------------------------------------------------------------------------------------------- start
def start_stage(state: WorkflowState, config: WorkflowConfig, count: int) -> dict[str, Any]:
    """``count`` start structures, one stage each (``start/00`` ...): the given files, then
    Packmol boxes with seeds ``seed + k``. Structure 0 is the common start of every strategy."""
    sys_cfg = config.system
    paths, stages = [], []
    for k in range(count):
        name = f"start/{k:02d}"
        given = sys_cfg.structures[k] if k < len(sys_cfg.structures) else None
        inputs: dict[str, Any] = {"index": k}
        if given is not None:
            if not Path(given).is_file():
                raise InputError(f"system.structures[{k}]: {given} does not exist")
            inputs["structure_sha256"] = sha256_file(given)
        else:
            inputs["build"] = {key: v for key, v in sys_cfg.to_dict().items() if key != "structures"}

        def run(folder: Path, k: int = k, given: str | None = given) -> dict[str, Any]:
            from ..build import build_system
            from ..io import write_frames
            from ..md.run import read_start_structure

            if given is not None:
                atoms = read_start_structure(given)
            else:
                atoms = build_system(build_config(config, k))
            target = write_frames(folder / "start.extxyz", [atoms])
            return {"structure": rel(state, target), "sha256": sha256_file(target)}

        paths.append(state.run(name, inputs, run)["structure"])
        stages.append(name)
    return {"structures": paths, "stages": stages}


def build_values(config: WorkflowConfig, k: int) -> dict[str, Any]:
    """``umlipft build`` settings of start structure ``k`` (Packmol seed ``system.seed + k``)."""
    values = {key: v for key, v in config.system.to_dict().items() if key != "structures" and v is not None}
    values["seed"] = config.system.seed + k
    return values


def build_config(config: WorkflowConfig, k: int):
    from ..build import BuildConfig

    return BuildConfig.from_dict(build_values(config, k), source="workflow system")


def elements_of(path: Path) -> tuple[str, ...]:
    from ..io import read_frames
    from ..md.run import default_elements

    return default_elements(read_frames(path, index=-1))


# ---------------------------------------------------------------------------------------------- md
def md_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, model: str,
             steps: int, seed: int, structures: Sequence[str] = (), continue_from: str | None = None,
             deps: Sequence[str] = (), elements: Sequence[str] = (), dtype: str | None = None,
             watch: tuple[int, int] | None = None) -> dict[str, Any]:
    """One LAMMPS run (several replicas when several structures are given). ``watch``: (every,
    patience) of the extrapolation watch (see :func:`md_values`); the result then holds each
    replica's ``watch`` record and ``flagged`` frames, and ``steps`` is the steps asked."""
    md = config.md
    dtype = dtype or md.dtype
    inputs = {"model": model, "model_sha256": model_hash(state, model), "steps": steps, "seed": seed,
              "structures": list(structures), "continue_from": continue_from, "elements": list(elements),
              "md": {k: v for k, v in md.to_dict().items()
                     if k not in ("segment_steps", "seed", "dtype", "optimized_export", "parallel_replicas",
                                  "device")},
              "dtype": dtype}
    if watch:
        inputs["watch"] = list(watch)

    def run(folder: Path) -> dict[str, Any]:
        from ..md import run_md

        cfg = md_config(state, config, folder, model=model, steps=steps, seed=seed, structures=structures,
                        continue_from=continue_from, elements=elements, dtype=dtype, watch=watch)
        if cfg.replicas > 1 and md.parallel_replicas > 1:
            from concurrent.futures import ThreadPoolExecutor

            from ..md import prepare, run_replica

            prepared = prepare(cfg)
            with ThreadPoolExecutor(max_workers=md.parallel_replicas) as pool:
                results = list(pool.map(lambda k: run_replica(cfg, prepared, k, progress=False),
                                        range(cfg.replicas)))
        else:
            results = run_md(cfg, progress=False)
        out = {"directories": [rel(state, r.directory) for r in results],
               "trajectories": [rel(state, r.trajectory) for r in results],
               "thermo": [rel(state, r.thermo) for r in results],
               "finals": [rel(state, r.final) for r in results],
               "steps": steps, "timestep_fs": md.timestep_fs,
               "trajectory_sha256": [sha256_file(r.trajectory) for r in results],
               # the next segment starts from the finals and the report reads the thermo files:
               # recorded so that a rerun refuses them changed (WorkflowState.verify_outputs)
               "outputs": {rel(state, f): sha256_file(f) for r in results for f in (r.thermo, r.final)}}
        if watch:
            flagged = [r.directory / "flagged.extxyz" for r in results]
            out.update(watch=[r.watch for r in results], flagged=[rel(state, f) for f in flagged])
            out["outputs"].update({rel(state, f): sha256_file(f) for f in flagged})
        return out

    return state.run(name, inputs, run, deps=deps)


def md_values(config: WorkflowConfig, output: str, *, model: str, steps: int, seed: int,
              structures: Sequence[str] = (), continue_from: str | None = None,
              elements: Sequence[str] = (), dtype: str | None = None,
              watch: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``umlipft md`` settings of one workflow MD run (paths as given). ``watch``: (every,
    patience) of the extrapolation watch; such a run is NVT (watch.in) whatever md.ensemble says,
    at the volume of the run it continues."""
    md = config.md
    watch_values = {"watch_every": watch[0], "watch_patience": watch[1]} if watch else {}
    return {
        **watch_values,
        "output": output, "structure": list(structures), "continue_from": continue_from, "model": model,
        "dtype": dtype or md.dtype, "elements": list(elements), "ensemble": "nvt" if watch else md.ensemble,
        "temperature_K": md.temperature_K, "pressure_bar": md.pressure_bar, "timestep_fs": md.timestep_fs,
        "steps": steps, "thermo_every": md.thermo_every, "dump_every": md.dump_every,
        "restart_every": md.restart_every if md.restart_every and steps > md.restart_every
        and md.restart_every % md.dump_every == 0 else 0,
        "tdamp_fs": md.tdamp_fs, "pdamp_fs": md.pdamp_fs, "seed": seed,
        "replicas": max(1, len(structures)) if structures else 1,
        # A continued segment keeps the previous segment's velocities, or draws new ones at
        # temperature_K (the study's protocol); a first segment always draws them.
        "velocities": md.segment_velocities if continue_from else "create",
        "device": md.device,
    }


def md_config(state: WorkflowState, config: WorkflowConfig, folder: Path, *, model: str, steps: int, seed: int,
              structures: Sequence[str] = (), continue_from: str | None = None,
              elements: Sequence[str] = (), dtype: str | None = None, watch: tuple[int, int] | None = None):
    from ..md import MDConfig

    values = md_values(
        config, str(folder / "md"), model=str(absolute(state, model)) if (state.root / model).is_file() else model,
        steps=steps, seed=seed, structures=[str(absolute(state, s)) for s in structures],
        continue_from=str(absolute(state, continue_from)) if continue_from else None, elements=elements, dtype=dtype,
        watch=watch)
    return MDConfig.from_dict(values, source="workflow md")


def model_hash(state: WorkflowState, model: str) -> str:
    """Content hash of a model given relative to the workflow directory, as a path, or by name."""
    from ..models.foundation import resolve_foundation_model

    if (state.root / model).is_file():
        return sha256_file(state.root / model)
    try:
        return sha256_file(resolve_foundation_model(model))
    except InputError:
        return model  # resolved (and its absence reported) when the run starts


# ------------------------------------------------------------------------------------------ export
def export_stage(state: WorkflowState, config: WorkflowConfig, model_name: str, model: str,
                 elements: Sequence[str], deps: Sequence[str] = (), watch: str | None = None) -> str:
    """The LAMMPS export of a model for the system's elements (``umlipft export --elements``:
    element-restricted and fused, checked against mace-torch), made once and shared by every
    MD run of that model. ``watch``: the frames the model was trained on (relative to the
    workflow directory), to fit the export's extrapolation watch on (``--watch``). Returns its
    path relative to the workflow directory."""
    dtype = config.md.dtype
    optimize = config.md.optimized_export
    inputs = {"model": model, "model_sha256": model_hash(state, model), "dtype": dtype, "elements": list(elements)}
    if not optimize:
        inputs["optimized"] = False
    if watch is not None:
        inputs.update(watch=watch, watch_sha256=sha256_file(absolute(state, watch)))

    def run(folder: Path) -> dict[str, Any]:
        from ..models.export import export_lammps_model

        source = str(absolute(state, model)) if (state.root / model).is_file() else model
        target = str(folder / f"{model_name}-lammps-{dtype}.pt")
        fallback = None
        with TORCH_LOCK:
            watch_file = str(absolute(state, watch)) if watch is not None else None
            try:
                out = export_lammps_model(export_config(config, source, target, elements if optimize else None,
                                                        watch_file))
            except Exception as err:  # noqa: BLE001 - the plain export is always valid
                if not optimize:
                    raise
                fallback = f"{type(err).__name__}: {err}"
                state.log(f"export/{model_name}: the optimised export failed ({fallback[:200]}); "
                          "using the plain export")
                out = export_lammps_model(export_config(config, source, target, None, watch_file))
        return {"lammps_model": rel(state, out), "sha256": sha256_file(out), "optimized": optimize and not fallback,
                "optimized_export_error": fallback}

    return state.run(f"export/{model_name}", inputs, run, deps=deps)["lammps_model"]


def export_values(config: WorkflowConfig, model: str, output: str,
                  elements: Sequence[str] | None, watch: str | None = None) -> dict[str, Any]:
    values = {"model": model, "output": output, "dtype": config.md.dtype,
              "elements": list(elements) if elements is not None else None}
    if watch is not None:
        values["watch"] = watch
    return values


def export_config(config: WorkflowConfig, model: str, output: str, elements: Sequence[str] | None,
                  watch: str | None = None):
    from ..models.export import ExportConfig

    return ExportConfig.from_dict(export_values(config, model, output, elements, watch), source="workflow export")


def finetune_watch_data(config: WorkflowConfig, ft: dict[str, Any]) -> str | None:
    """The frames a fine-tune stage's model was trained on (its driver's ``data/train.extxyz``,
    relative to the workflow directory): its export's watch is fitted on them, unless
    ``finetune.export_watch`` is off."""
    if not config.finetune.export_watch:
        return None
    return str(Path(ft["model"]).parent / "data" / "train.extxyz")


# ----------------------------------------------------------------------------------------- extract
def extract_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, trajectory: str,
                  start_ps: float, stop_ps: float | None, count: int | None, every_ps: float | None = None,
                  seed: int, deps: Sequence[str] = (), time_offset_ps: float = 0.0,
                  tag: dict[str, Any] | None = None) -> dict[str, Any]:
    """Frames of a trajectory window: ``count`` chosen (random/fps) or one every ``every_ps``."""
    inputs = {"trajectory": trajectory, "start_ps": start_ps, "stop_ps": stop_ps, "count": count,
              "every_ps": every_ps, "seed": seed, "selection": config.selection, "tag": tag or {},
              "time_offset_ps": time_offset_ps, "soap": _soap(config)}

    def run(folder: Path) -> dict[str, Any]:
        from ..extract import extract_frames
        from ..io import write_frames

        frames = extract_frames(extract_config(config, str(absolute(state, trajectory)), start_ps=start_ps,
                                               stop_ps=stop_ps, count=count, every_ps=every_ps, seed=seed))
        for atoms in frames:
            atoms.info["source_file"] = trajectory  # relative: the directory may move
            atoms.info["run_time_ps"] = float(atoms.info["time_ps"]) + time_offset_ps
            for key, value in (tag or {}).items():
                atoms.info[key] = value
        out = write_frames(folder / FRAMES, frames)
        return {"frames": rel(state, out), "n_frames": len(frames),
                "steps": [int(a.info.get("step", -1)) for a in frames], "sha256": sha256_file(out)}

    return state.run(name, inputs, run, deps=deps)


def extract_values(config: WorkflowConfig, trajectory: str, *, start_ps: float, stop_ps: float | None,
                   count: int | None, every_ps: float | None, seed: int) -> dict[str, Any]:
    a = config.analysis
    values: dict[str, Any] = {
        "trajectory": trajectory, "start_ns": start_ps / 1000.0,
        "stop_ns": None if stop_ps is None else stop_ps / 1000.0,
        "every_ns": None if every_ps is None else every_ps / 1000.0, "count": count, "seed": seed,
        "soap_r_cut_A": a.soap_r_cut_A, "soap_n_max": a.soap_n_max, "soap_l_max": a.soap_l_max,
        "soap_sigma_A": a.soap_sigma_A}
    if count is not None:
        values["method"] = config.selection
    return values


def extract_config(config: WorkflowConfig, trajectory: str, **window: Any):
    from ..extract import ExtractConfig

    return ExtractConfig.from_dict(extract_values(config, trajectory, **window), source="workflow extract")


def window_selection(config: WorkflowConfig, window_ps: float, count: int) -> dict[str, Any]:
    """How ``count`` frames are taken from the second half of a run of ``window_ps`` x 2:
    ``selection: stride`` takes them on a fixed stride from the half's start to the run's end
    (the study: 0.5-1.0 ns every 0.05 ns, 11 frames); random and fps pick ``count`` of all the
    half's frames."""
    if config.selection == "stride":
        every = window_ps / (count - 1) if count > 1 else None
        return {"count": None, "every_ps": every, "stop_ps": None if count > 1 else window_ps}
    return {"count": count, "every_ps": None, "stop_ps": None}


def _soap(config: WorkflowConfig) -> dict[str, Any]:
    a = config.analysis
    return {"r": a.soap_r_cut_A, "n": a.soap_n_max, "l": a.soap_l_max, "s": a.soap_sigma_A}


# ------------------------------------------------------------------------------------------- label
def label_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, frames: str,
                deps: Sequence[str] = ()) -> dict[str, Any]:
    """Reference labels of ``frames``; failed frames are recorded and left out."""
    inputs = {"frames": frames, "label": config.label.to_dict()}

    def run(folder: Path) -> dict[str, Any]:
        from ..label import label_frames

        cfg = label_config(config, str(absolute(state, frames)), str(folder / LABELLED), str(folder / "work"))
        report = label_frames(cfg)
        state.journal("label_call", stage=name, labelled=report.labelled, reused=report.reused,
                      failed=list(report.failed))
        if report.output is None:
            raise ExternalProgramError(
                f"{name}: every frame failed to label ({report.failed}); see {folder / 'work'}")
        return {"labelled": rel(state, report.output), "n_labelled": report.n_done,
                "failed": {str(k): v for k, v in report.failed.items()},
                "sha256": sha256_file(report.output)}

    return state.run(name, inputs, run, deps=deps)


def label_values(config: WorkflowConfig, frames: str, output: str, workdir: str) -> dict[str, Any]:
    values = {key: v for key, v in config.label.to_dict().items() if key != "isolated_atom_box_A"}
    return {"frames": frames, "output": output, "workdir": workdir, **values}


def label_config(config: WorkflowConfig, frames: str, output: str, workdir: str):
    from ..label import LabelConfig

    return LabelConfig.from_dict(label_values(config, frames, output, workdir), source="workflow label")


# ---------------------------------------------------------------------------------------- finetune
def finetune_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, model_name: str,
                   train: Sequence["Atoms"] | Sequence[str], start_model: str,
                   deps: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune ``start_model`` on the labelled frames ``train`` (files relative to the root);
    the LAMMPS export follows in its own stage (:func:`export_stage`)."""
    ft = config.finetune
    files = [str(t) for t in train]
    isolated = isolated_atoms_stage(state, config)
    inputs = {"model_name": model_name, "train": files, "start_model": start_model,
              "start_model_sha256": model_hash(state, start_model),
              # export_watch concerns the export stage, not the training
              "finetune": {k: v for k, v in ft.to_dict().items() if k != "export_watch"}}
    if isolated is not None:
        inputs["isolated_atoms_sha256"] = isolated["sha256"]
        deps = [*deps, ISOLATED_ATOMS_STAGE]

    def run(folder: Path) -> dict[str, Any]:
        from ..finetune import finetune
        from ..io import read_frames, write_frames

        frames = [a for f in files for a in read_frames(absolute(state, f))]
        train_path = folder / TRAIN
        write_frames(train_path, frames)  # same frames, same bytes: a rerun's request matches
        out = folder / "model"
        if (not ft.resume_from_checkpoint and (out / "mace").is_dir() and not (out / "result.json").is_file()
                and not (out / "mace" / f"{model_name}.model").is_file()):
            # An interrupted training restarts from epoch 0 with the same seed: the workflow then
            # ends with the models of an uninterrupted run (see FinetuneSettings). One killed after
            # its last epoch (mace-torch's model written) is kept: the driver uses that model.
            shutil.rmtree(out)
        foundation = str(absolute(state, start_model)) if (state.root / start_model).is_file() else start_model
        cfg = finetune_config(config, str(train_path), foundation, str(out), model_name,
                              isolated_atoms_file=str(absolute(state, isolated["file"])) if isolated else None)
        state.journal("finetune_call", stage=name)
        with TORCH_LOCK:
            result = finetune(cfg)
        state.journal("finetune_return", stage=name, skipped=result.skipped,
                      epochs_run=len(result.epoch_times_s))
        return {"model": rel(state, result.model_path),
                "n_train": result.n_train, "n_valid": result.n_valid, "n_frames": len(frames),
                "final_valid_rmse_e_meV_per_atom": result.final_valid_rmse_e_meV_per_atom,
                "final_valid_rmse_f_meV_per_A": result.final_valid_rmse_f_meV_per_A,
                # few frames: those "valid" figures are on the training frames (no split)
                "valid_is_train": result.valid_is_train,
                "e0_policy": result.e0.get("policy"), "e0_reason": result.e0.get("reason"),
                "e0_predicted_start_rmse_meV_per_atom": result.e0.get("chosen_start_rmse_meV_per_atom"),
                # multi-head replay (a replay file is configured) or plain fine-tuning: say which ran
                "mode": cfg.mode, "sha256": sha256_file(result.model_path)}

    return state.run(name, inputs, run, deps=deps)


def finetune_values(config: WorkflowConfig, train_file: str, foundation: str, output_dir: str,
                    name: str, isolated_atoms_file: str | None = None) -> dict[str, Any]:
    ft = config.finetune
    return {"train_file": train_file, "foundation": foundation, "replay_file": ft.replay_file,
            "isolated_atoms_file": isolated_atoms_file,
            # an unknown labeller is the label stage's problem (and reported there), not a second one here
            "labeller": config.label.calculator if config.label.calculator in CALCULATORS else None,
            "output_dir": output_dir, "name": name, "e0s": ft.e0s, "epochs": ft.epochs,
            "batch_size": ft.batch_size, "lr": ft.lr, "energy_weight": ft.energy_weight,
            "forces_weight": ft.forces_weight, "stress_weight": ft.stress_weight,
            "new_frames_weight": ft.new_frames_weight, "valid_fraction": ft.valid_fraction, "dtype": ft.dtype,
            "export": False, "export_dtype": config.md.dtype, "seed": ft.seed, "device": ft.device,
            "resume_from_checkpoint": ft.resume_from_checkpoint}


def finetune_config(config: WorkflowConfig, train_file: str, foundation: str, output_dir: str, name: str,
                    isolated_atoms_file: str | None = None):
    from ..finetune import FinetuneConfig

    return FinetuneConfig.from_dict(finetune_values(config, train_file, foundation, output_dir, name,
                                                    isolated_atoms_file), source="workflow finetune")


# ----------------------------------------------------------------------------------- isolated atoms
ISOLATED_ATOMS_STAGE = "e0/isolated-atoms"


def isolated_atoms_stage(state: WorkflowState, config: WorkflowConfig) -> dict[str, Any] | None:
    """The labeller's isolated-atom energies of every element of the system, when the E0 policy
    needs them (``finetune.e0s``; ``auto`` with CP2K, xTB or QE labels): computed once, with the
    label stage's code and settings, and shared by every fine-tune of every strategy. The
    calculations are kept by a hash of their settings (``umlipft label --isolated-atoms``), so
    a rerun, or a later workflow in the same directory, recomputes nothing."""
    from ..finetune.e0 import e0_policy_needs_isolated_atoms

    lab = config.label
    if not e0_policy_needs_isolated_atoms(config.finetune.e0s, lab.calculator):
        return None
    elements = elements_of(absolute(state, state.result("start/00")["structure"]))
    inputs = {"calculator": lab.calculator, "code": lab.code_config().to_dict(), "elements": list(elements),
              "box_A": lab.isolated_atom_box_A}

    def run(folder: Path) -> dict[str, Any]:
        from ..label.isolated import label_isolated_atoms

        report = label_isolated_atoms(lab, elements, folder, box_A=lab.isolated_atom_box_A)
        state.journal("isolated_atoms_call", stage=ISOLATED_ATOMS_STAGE, computed=report.computed,
                      reused=report.reused)
        return {"file": rel(state, report.output), "energies_eV": report.energies_eV,
                "multiplicities": report.multiplicities, "sha256": sha256_file(report.output)}

    return state.run(ISOLATED_ATOMS_STAGE, inputs, run, deps=["start/00"])
