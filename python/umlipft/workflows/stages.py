"""The study's loop as workflow stages: each wraps one library driver and returns a small,
JSON-able result (paths relative to the workflow directory, counts, hashes)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ExternalProgramError, InputError
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
            from ..build import BuildConfig, build_system
            from ..io import write_frames
            from ..md.run import read_start_structure

            if given is not None:
                atoms = read_start_structure(given)
            else:
                atoms = build_system(BuildConfig(
                    system=sys_cfg.system, n_water=sys_cfg.n_water, n_licl=sys_cfg.n_licl, n_cocl2=sys_cfg.n_cocl2,
                    n_choline_chloride=sys_cfg.n_choline_chloride, n_citric_acid=sys_cfg.n_citric_acid,
                    density_g_cm3=sys_cfg.density_g_cm3, seed=sys_cfg.seed + k))
            target = write_frames(folder / "start.extxyz", [atoms])
            return {"structure": rel(state, target), "sha256": sha256_file(target)}

        paths.append(state.run(name, inputs, run)["structure"])
        stages.append(name)
    return {"structures": paths, "stages": stages}


def elements_of(path: Path) -> tuple[str, ...]:
    from ..io import read_frames
    from ..md.run import default_elements

    return default_elements(read_frames(path, index=-1))


# ---------------------------------------------------------------------------------------------- md
def md_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, model: str,
             steps: int, seed: int, structures: Sequence[str] = (), continue_from: str | None = None,
             deps: Sequence[str] = (), elements: Sequence[str] = (), dtype: str | None = None) -> dict[str, Any]:
    """One LAMMPS run (several replicas when several structures are given)."""
    md = config.md
    dtype = dtype or md.dtype
    inputs = {"model": model, "model_sha256": model_hash(state, model), "steps": steps, "seed": seed,
              "structures": list(structures), "continue_from": continue_from, "elements": list(elements),
              "md": {k: v for k, v in md.to_dict().items()
                     if k not in ("segment_steps", "seed", "dtype", "optimized_export", "parallel_replicas")},
              "dtype": dtype}

    def run(folder: Path) -> dict[str, Any]:
        from ..md import run_md

        cfg = md_config(state, config, folder, model=model, steps=steps, seed=seed, structures=structures,
                        continue_from=continue_from, elements=elements, dtype=dtype)
        if cfg.replicas > 1 and md.parallel_replicas > 1:
            from concurrent.futures import ThreadPoolExecutor

            from ..md import prepare, run_replica

            prepared = prepare(cfg)
            with ThreadPoolExecutor(max_workers=md.parallel_replicas) as pool:
                results = list(pool.map(lambda k: run_replica(cfg, prepared, k, progress=False),
                                        range(cfg.replicas)))
        else:
            results = run_md(cfg, progress=False)
        return {"directories": [rel(state, r.directory) for r in results],
                "trajectories": [rel(state, r.trajectory) for r in results],
                "thermo": [rel(state, r.thermo) for r in results],
                "finals": [rel(state, r.final) for r in results],
                "steps": steps, "timestep_fs": md.timestep_fs,
                "trajectory_sha256": [sha256_file(r.trajectory) for r in results]}

    return state.run(name, inputs, run, deps=deps)


def md_config(state: WorkflowState, config: WorkflowConfig, folder: Path, *, model: str, steps: int, seed: int,
              structures: Sequence[str] = (), continue_from: str | None = None,
              elements: Sequence[str] = (), dtype: str | None = None):
    from ..md import MDConfig

    md = config.md
    return MDConfig(
        output=str(folder / "md"),
        structure=tuple(str(absolute(state, s)) for s in structures),
        continue_from=str(absolute(state, continue_from)) if continue_from else None,
        model=str(absolute(state, model)) if (state.root / model).is_file() else model,
        dtype=dtype or md.dtype, elements=tuple(elements), ensemble=md.ensemble,
        temperature_K=md.temperature_K, pressure_bar=md.pressure_bar, timestep_fs=md.timestep_fs,
        steps=steps, thermo_every=md.thermo_every, dump_every=md.dump_every,
        restart_every=md.restart_every if md.restart_every and steps > md.restart_every
        and md.restart_every % md.dump_every == 0 else 0,
        tdamp_fs=md.tdamp_fs, pdamp_fs=md.pdamp_fs, seed=seed,
        replicas=max(1, len(structures)) if structures else 1,
    )


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
                 elements: Sequence[str], deps: Sequence[str] = ()) -> str:
    """The LAMMPS export of a model for the system's elements (``umlipft export --elements``:
    element-restricted and fused, checked against mace-torch), made once and shared by every
    MD run of that model. Returns its path relative to the workflow directory."""
    dtype = config.md.dtype
    optimize = config.md.optimized_export
    inputs = {"model": model, "model_sha256": model_hash(state, model), "dtype": dtype, "elements": list(elements)}
    if not optimize:
        inputs["optimized"] = False

    def run(folder: Path) -> dict[str, Any]:
        from ..models.export import ExportConfig, export_lammps_model

        source = str(absolute(state, model)) if (state.root / model).is_file() else model
        target = str(folder / f"{model_name}-lammps-{dtype}.pt")
        fallback = None
        with TORCH_LOCK:
            try:
                out = export_lammps_model(ExportConfig(model=source, output=target, dtype=dtype,
                                                       elements=tuple(elements) if optimize else None))
            except Exception as err:  # noqa: BLE001 - the plain export is always valid
                if not optimize:
                    raise
                fallback = f"{type(err).__name__}: {err}"
                state.log(f"export/{model_name}: the optimised export failed ({fallback[:200]}); "
                          "using the plain export")
                out = export_lammps_model(ExportConfig(model=source, output=target, dtype=dtype))
        return {"lammps_model": rel(state, out), "sha256": sha256_file(out), "optimized": optimize and not fallback,
                "optimized_export_error": fallback}

    return state.run(f"export/{model_name}", inputs, run, deps=deps)["lammps_model"]


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
        from ..extract import ExtractConfig, extract_frames
        from ..io import write_frames

        a = config.analysis
        frames = extract_frames(ExtractConfig(
            trajectory=absolute(state, trajectory), start_ns=start_ps / 1000.0,
            stop_ns=None if stop_ps is None else stop_ps / 1000.0,
            every_ns=None if every_ps is None else every_ps / 1000.0, count=count,
            method=config.selection, seed=seed, soap_r_cut_A=a.soap_r_cut_A, soap_n_max=a.soap_n_max,
            soap_l_max=a.soap_l_max, soap_sigma_A=a.soap_sigma_A))
        for atoms in frames:
            atoms.info["source_file"] = trajectory  # relative: the directory may move
            atoms.info["run_time_ps"] = float(atoms.info["time_ps"]) + time_offset_ps
            for key, value in (tag or {}).items():
                atoms.info[key] = value
        out = write_frames(folder / FRAMES, frames)
        return {"frames": rel(state, out), "n_frames": len(frames),
                "steps": [int(a.info.get("step", -1)) for a in frames], "sha256": sha256_file(out)}

    return state.run(name, inputs, run, deps=deps)


def _soap(config: WorkflowConfig) -> dict[str, Any]:
    a = config.analysis
    return {"r": a.soap_r_cut_A, "n": a.soap_n_max, "l": a.soap_l_max, "s": a.soap_sigma_A}


# ------------------------------------------------------------------------------------------- label
def label_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, frames: str,
                deps: Sequence[str] = ()) -> dict[str, Any]:
    """Reference labels of ``frames``; failed frames are recorded and left out."""
    inputs = {"frames": frames, "label": config.label.to_dict()}

    def run(folder: Path) -> dict[str, Any]:
        from ..label import LabelConfig, label_frames

        lab = config.label
        cfg = LabelConfig(frames=absolute(state, frames), calculator=lab.calculator, output=folder / LABELLED,
                          workdir=folder / "work", processes=lab.processes,
                          threads_per_frame=lab.threads_per_frame, timeout_s=lab.timeout_s,
                          cp2k=lab.cp2k, xtb=lab.xtb, vasp=lab.vasp, espresso=lab.espresso)
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


# ---------------------------------------------------------------------------------------- finetune
def finetune_stage(state: WorkflowState, config: WorkflowConfig, name: str, *, model_name: str,
                   train: Sequence["Atoms"] | Sequence[str], start_model: str,
                   deps: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune ``start_model`` on the labelled frames ``train`` (files relative to the root);
    the LAMMPS export follows in its own stage (:func:`export_stage`)."""
    ft = config.finetune
    files = [str(t) for t in train]
    inputs = {"model_name": model_name, "train": files, "start_model": start_model,
              "start_model_sha256": model_hash(state, start_model),
              "finetune": ft.to_dict()}

    def run(folder: Path) -> dict[str, Any]:
        from ..finetune import FinetuneConfig, finetune
        from ..io import read_frames, write_frames

        frames = [a for f in files for a in read_frames(absolute(state, f))]
        train_path = folder / TRAIN
        write_frames(train_path, frames)  # same frames, same bytes: a rerun's request matches
        out = folder / "model"
        if not ft.resume_from_checkpoint and (out / "mace").is_dir() and not (out / "result.json").is_file():
            # An interrupted training restarts from epoch 0 with the same seed: the workflow then
            # ends with the models of an uninterrupted run (see FinetuneSettings).
            shutil.rmtree(out)
        foundation = str(absolute(state, start_model)) if (state.root / start_model).is_file() else start_model
        cfg = FinetuneConfig(
            train_file=str(train_path), foundation=foundation, replay_file=ft.replay_file,
            output_dir=str(out), name=model_name, e0s=ft.e0s, epochs=ft.epochs, batch_size=ft.batch_size,
            lr=ft.lr, energy_weight=ft.energy_weight, forces_weight=ft.forces_weight,
            stress_weight=ft.stress_weight, new_frames_weight=ft.new_frames_weight,
            valid_fraction=ft.valid_fraction, dtype=ft.dtype, export=False, export_dtype=config.md.dtype,
            seed=ft.seed, device=ft.device)
        state.journal("finetune_call", stage=name)
        with TORCH_LOCK:
            result = finetune(cfg)
        state.journal("finetune_return", stage=name, skipped=result.skipped,
                      epochs_run=len(result.epoch_times_s))
        return {"model": rel(state, result.model_path),
                "n_train": result.n_train, "n_valid": result.n_valid, "n_frames": len(frames),
                "final_valid_rmse_e_meV_per_atom": result.final_valid_rmse_e_meV_per_atom,
                "final_valid_rmse_f_meV_per_A": result.final_valid_rmse_f_meV_per_A,
                "e0_policy": result.e0.get("policy"), "sha256": sha256_file(result.model_path)}

    return state.run(name, inputs, run, deps=deps)
