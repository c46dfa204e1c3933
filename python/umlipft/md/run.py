"""``umlipft md``: LAMMPS MD with pair_style mace, from the same inputs users run by hand.

Each replica lives in its own directory and is restartable: with ``restart_every`` set,
LAMMPS writes restart files; a killed run resumes from the newest one, the trajectory is cut
back to the restart step, and ``run N upto`` stops at the same final step as an uninterrupted
run. Each attempt logs to its own ``log.lammps.K``; the thermo table joins them, every attempt
up to the step the next one resumed from. A finished replica is never rerun: its summary records
the hash, size and frame or row count of each output, and reuse checks them.

With ``watch_every`` the run uses ``watch.in`` (compute mace/q): a run the watch stopped is a
finished run, shorter than asked. Its outputs end at the halting step, its summary's ``watch``
says where and why (:func:`watch_record`), and ``flagged.extxyz`` holds the frames the watch
flagged with each atom's Q columns.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ExternalProgramError, InputError, StateError
from ..io import atomic_path, atomic_write_text, read_frames, write_frames
from ..lock import locks_output, mpi_world
from ..summary import RunSummary
from .config import SAFETY_KEYS, MDConfig

if TYPE_CHECKING:
    from ase import Atoms

PREFIX = "md"
TRAJECTORY = "trajectory.extxyz"
THERMO = "thermo.csv"
FINAL = "final.extxyz"
SUMMARY = "summary.json"
FLAGGED = "flagged.extxyz"
# The per-atom columns of watch.in's flagged dump (compute mace/q), as flagged.extxyz names them.
WATCH_COLUMNS = {"c_watch[1]": "watch_q", "c_watch[2]": "watch_q_ratio", "c_watch[3]": "watch_t2",
                 "c_watch[4]": "watch_halt_ratio"}


@dataclass(frozen=True)
class ReplicaResult:
    directory: Path
    trajectory: Path
    thermo: Path
    final: Path
    steps: int  # run; fewer than asked when the extrapolation watch stopped the run
    simulated_ps: float
    wall_time_s: float
    watch: dict[str, Any] | None = None  # watch_record() of a watched run

    @property
    def ns_per_day(self) -> float:
        return 0.0 if self.wall_time_s <= 0 else self.simulated_ps / 1000.0 / self.wall_time_s * 86400.0


@dataclass(frozen=True)
class PreparedRun:
    run_dir: Path
    model: Path
    elements: tuple[str, ...]
    starts: tuple["Atoms", ...]      # one start structure per replica
    keep_velocities: tuple[bool, ...]


# --------------------------------------------------------------------------------------------
# preparation: model, elements, start structures (all checked before any MD starts)


def resolve_model(model: str, dtype: str, run_dir: Path, elements: Sequence[str]) -> Path:
    """An exported model file: the given one, or an export of a mace-torch model into run_dir,
    restricted to ``elements`` (the optimised export, several times faster in MD)."""
    from ..models.export import ExportConfig, export_lammps_model, read_export_metadata
    from ..models.foundation import resolve_foundation_model

    path = Path(model)
    if path.is_file() and path.suffix == ".pt":
        read_export_metadata(path)
        return path
    source = resolve_foundation_model(model)
    target = run_dir / f"{source.stem}-{''.join(elements)}-lammps-{dtype}.pt"
    if not target.is_file():
        export_lammps_model(ExportConfig(model=str(source), output=str(target), dtype=dtype,
                                         elements=tuple(elements)))
    return target


def default_elements(frames: Sequence["Atoms"]) -> tuple[str, ...]:
    from ase.data import atomic_numbers

    symbols = {s for atoms in frames for s in atoms.get_chemical_symbols()}
    return tuple(sorted(symbols, key=lambda s: atomic_numbers[s]))


def read_start_structure(path: str | Path) -> "Atoms":
    path = Path(path)
    if path.suffix in (".data", ".lmp"):
        frames = read_frames(path, index=-1, format="lammps-data")
    else:
        frames = read_frames(path, index=-1)
    atoms = frames[-1]
    if not all(atoms.pbc) or atoms.cell.volume <= 0:
        raise InputError(
            f"{path}: MD runs in a periodic box, but this structure has pbc={list(atoms.pbc)} "
            f"and cell volume {atoms.cell.volume:.3g} Å^3; set a cell and pbc=True (e.g. Lattice=... in extxyz)"
        )
    return atoms


def previous_final_frames(previous: Path, replicas: int) -> list["Atoms"]:
    previous = Path(previous)
    finals = sorted(previous.glob(f"replica-*/{FINAL}")) or [previous / FINAL]
    if not all(p.is_file() for p in finals):
        raise InputError(
            f"{previous} holds no finished MD run ({FINAL} missing); finish that run first "
            "(rerun its umlipft md command to resume it)"
        )
    for final in finals:
        summary = final.parent / SUMMARY
        try:
            outputs = json.loads(summary.read_text()).get("results", {}).get("outputs")
        except (OSError, ValueError):
            outputs = None
        verify_outputs(final.parent, outputs, names=(FINAL,))
    frames = [read_frames(p, index=-1)[-1] for p in finals]
    if len(frames) == 1:
        return frames * replicas
    if len(frames) != replicas:
        raise InputError(f"{previous} has {len(frames)} replicas but this run asks for {replicas}")
    return frames


def prepare(config: MDConfig) -> PreparedRun:
    from ..models.export import read_export_metadata
    from ase.data import chemical_symbols

    # Absolute: LAMMPS runs inside the replica folder, so relative paths would point elsewhere.
    run_dir = Path(config.output).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config_unchanged(run_dir, config)
    if config.continue_from:
        starts = previous_final_frames(Path(config.continue_from), config.replicas)
    else:
        structures = [read_start_structure(p) for p in config.structure]
        starts = structures * config.replicas if len(structures) == 1 else structures
    stored = [atoms.has("momenta") for atoms in starts]
    if config.velocities == "keep" and not all(stored):
        raise InputError(f"velocities: keep, but the start ({config.continue_from or config.structure[0]}) "
                         "stores no velocities; use velocities: create (or auto)")
    if config.velocities == "create":
        keep = [False] * len(starts)
    elif config.velocities == "keep":
        keep = [True] * len(starts)
    else:
        keep = stored if config.continue_from else [False] * len(starts)
    elements = tuple(config.elements) or default_elements(starts)
    model = resolve_model(config.model, config.dtype, run_dir, elements)
    covered = {chemical_symbols[z] for z in read_export_metadata(model)["atomic_numbers"]}
    missing = sorted(set(elements) - covered)
    if missing:
        raise InputError(
            f"model {model} does not cover {', '.join(missing)}; fine-tune or export a model with these elements"
        )
    if config.watch_every:
        check_model_watch(model, elements, config.watch_every)
    sources = ([f"{config.continue_from} (final frame)"] * len(starts) if config.continue_from
               else [str(p) for p in config.structure] * (len(starts) if len(config.structure) == 1 else 1))
    for atoms, source in zip(starts, sources):
        extra = sorted(set(atoms.get_chemical_symbols()) - set(elements))
        if extra:
            raise InputError(f"the start structure contains {', '.join(extra)}, missing from elements {' '.join(elements)}")
        check_min_distance(atoms, source, config.min_distance_A)
    return PreparedRun(run_dir, model, elements, tuple(starts), tuple(keep))


def check_model_watch(model: Path, elements: Sequence[str], watch_every: int) -> None:
    """Refuse a watched run before LAMMPS when the model carries no watch or one without some of
    the run's elements (compute mace/q would refuse it at init, after the start-up)."""
    from ..models.export import read_export_metadata
    from ..models.watch import read_watch

    fix = ("export the model with one, fitted on the frames it was trained on: umlipft export MODEL "
           "--watch TRAIN.extxyz -o OUT.pt (umlipft finetune adds one by itself)")
    if not read_export_metadata(model).get("watch"):
        raise InputError(f"watch_every = {watch_every} asks for the extrapolation watch, but the model {model} "
                         f"carries none; {fix}, or set watch_every: 0")
    covered = set(read_watch(model).get("elements", {}))
    missing = [e for e in elements if e not in covered]
    if missing:
        raise InputError(f"the extrapolation watch of {model} was fitted without {', '.join(missing)} "
                         f"(it knows {', '.join(sorted(covered))}), so it cannot judge those atoms; refit it "
                         "on training frames with every element of the run (umlipft export MODEL --watch "
                         "TRAIN.extxyz), or set watch_every: 0")


def check_min_distance(atoms: "Atoms", source: str, min_distance_A: float) -> None:
    """Refuse atoms closer than ``min_distance_A`` before LAMMPS starts (pair_style mace checks
    again in LAMMPS); atoms are named by LAMMPS ID, which is the 1-based index in the file."""
    import numpy as np
    from ase.neighborlist import neighbor_list

    if min_distance_A <= 0 or len(atoms) < 2:
        return
    first, second, distance = neighbor_list("ijd", atoms, min_distance_A)
    pairs = first <= second  # each pair once (an atom and its own periodic image: i == j)
    if not pairs.any():
        return
    first, second, distance = first[pairs], second[pairs], distance[pairs]
    k = int(np.argmin(distance))
    i, j = int(first[k]), int(second[k])
    symbols = atoms.get_chemical_symbols()
    raise InputError(
        f"{source}: atoms {i + 1} ({symbols[i]}) and {j + 1} ({symbols[j]}) are {distance[k]:.3f} Å apart "
        f"({len(distance)} pair(s) closer than min_distance_A = {min_distance_A} Å); overlapping atoms make "
        "the model's forces meaningless and the run explodes. Fix the structure (duplicated atoms, wrong "
        "cell or units), or if such pairs are intended lower min_distance_A (--min-distance-A, 0 turns "
        "the check off)"
    )


# The device changes where the forces are computed, not the run: a run interrupted on a CPU
# node resumes on a GPU node and the other way round. The safety limits only decide whether
# the run may go on.
NOT_IDENTITY = ("device",) + SAFETY_KEYS


def config_fingerprint(config: MDConfig) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_IDENTITY}
    if not config.watch_every:  # runs made before the watch existed keep their identity
        values.pop("watch_every", None)
        values.pop("watch_patience", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def check_config_unchanged(run_dir: Path, config: MDConfig) -> None:
    record = run_dir / "md-config.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != config_fingerprint(config):
            changed = sorted(k for k, v in config.to_dict().items()
                             if k not in NOT_IDENTITY and saved.get("config", {}).get(k) != v)
            raise StateError(
                f"{run_dir} holds an MD run made with other settings ({', '.join(changed)}); "
                "rerun with the original settings to resume it, or choose a new output directory"
            )
    else:
        atomic_write_text(record, json.dumps({"fingerprint": config_fingerprint(config),
                                              "config": config.to_dict()}, indent=2))


def replica_dir(run_dir: Path, index: int, replicas: int) -> Path:
    return run_dir if replicas == 1 else run_dir / f"replica-{index:03d}"


# --------------------------------------------------------------------------------------------
# one replica


def lammps_variables(config: MDConfig, prepared: PreparedRun, index: int, directory: Path,
                     restart_from: Path | None) -> dict[str, str]:
    velocities = "keep" if prepared.keep_velocities[index] else "create"
    variables = {
        "model": str(prepared.model.resolve()),
        "data": str((directory / "start.data").resolve()),
        "elements": " ".join(prepared.elements),
        "temperature_K": repr(config.temperature_K),
        "timestep_fs": repr(config.timestep_fs),
        "steps": str(config.steps),
        "thermo_every": str(config.thermo_every),
        "dump_every": str(config.dump_every),
        "seed": str(config.seed + index),
        "velocities": velocities,
        "output": str((directory / PREFIX).resolve()),
        "tdamp_fs": repr(config.tdamp_fs),
        "restart_every": str(config.restart_every),
        "resume": "yes" if restart_from else "no",
        "restart_from": str(restart_from.resolve()) if restart_from else "none",
        "device": config.device,
        "min_distance_A": repr(config.min_distance_A),
        "max_force_eV_A": repr(config.max_force_eV_A),
        "watchdog_temperature_factor": repr(config.watchdog_temperature_factor),
    }
    if config.ensemble == "npt":
        variables["pressure_bar"] = repr(config.pressure_bar)
        variables["pdamp_fs"] = repr(config.pdamp_fs)
    if config.watch_every:
        variables["watch_every"] = str(config.watch_every)
        variables["watch_patience"] = str(config.watch_patience)
    return variables


def input_name(config: MDConfig) -> str:
    """The packaged input a run uses: watch.in (NVT with the watch) or the ensemble's."""
    return "watch" if config.watch_every else config.ensemble


def newest_restart(directory: Path) -> tuple[Path, int] | None:
    found = []
    for path in directory.glob(f"{PREFIX}.restart.*"):
        suffix = path.name.rsplit(".", 1)[-1]
        if suffix.isdigit() and path.stat().st_size > 0:
            found.append((int(suffix), path))
    if not found:
        return None
    # Restart files of one run all have the same size (same atoms, same fixes); a shorter newest
    # one was being written when the run was killed, so the one before it is the last complete.
    sizes = [path.stat().st_size for _, path in found]
    complete = [(step, path) for (step, path), size in zip(found, sizes) if size >= max(sizes)]
    step, path = max(complete)
    return path, step


def truncate_dump(dump: Path, first_step_to_drop: int) -> None:
    """Drop dump frames at or after ``first_step_to_drop`` (LAMMPS rewrites them on resume)."""
    if not dump.is_file():
        return
    lines = dump.read_text().splitlines(keepends=True)
    cut = len(lines)
    for i, line in enumerate(lines[:-1]):
        if line.startswith("ITEM: TIMESTEP") and int(lines[i + 1]) >= first_step_to_drop:
            cut = i
            break
    with atomic_path(dump) as tmp:
        tmp.write_text("".join(lines[:cut]))


def lammps_log_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("log.lammps.*"), key=lambda p: int(p.name.rsplit(".", 1)[-1]))


def run_replica(config: MDConfig, prepared: PreparedRun, index: int, comm: Any = None,
                progress: bool = True) -> ReplicaResult:
    """Run (or resume, or skip if finished) replica ``index``; ``comm`` selects the in-process
    LAMMPS module on an MPI communicator, otherwise lmp runs as a subprocess."""
    from ..lammps import input_script, write_lammps_data

    directory = replica_dir(prepared.run_dir, index, config.replicas)
    directory.mkdir(parents=True, exist_ok=True)
    done = _finished_result(directory, config)
    if done is not None:
        return done

    summary = RunSummary("md", config, seed=config.seed + index)
    restart_from = None
    attempt = len(lammps_log_paths(directory))
    wall = 0.0
    # A run the watch stopped whose conversion was interrupted: LAMMPS finished (halt, then
    # write_data); resuming from a restart file would run on past the halt with a fresh window.
    lammps_done = bool(config.watch_every) and attempt > 0 and _watch_halted_and_written(directory)
    if not lammps_done:
        resume = newest_restart(directory)
        if resume is not None:
            restart_from, step = resume
            truncate_dump(directory / f"{PREFIX}.lammpstrj", step)
            truncate_dump(directory / f"{PREFIX}.flagged.lammpstrj", step)
        else:
            (directory / f"{PREFIX}.lammpstrj").unlink(missing_ok=True)
            (directory / f"{PREFIX}.flagged.lammpstrj").unlink(missing_ok=True)
            write_lammps_data(directory / "start.data", prepared.starts[index], prepared.elements)
        variables = lammps_variables(config, prepared, index, directory, restart_from)
        log = directory / f"log.lammps.{attempt}"
        script = input_script(input_name(config))
        t0 = time.perf_counter()
        with summary.timed("lammps"):
            if comm is None:
                _run_subprocess(script, variables, log, directory, config, progress)
            else:
                _run_in_process(script, variables, log, comm, config)
        wall = time.perf_counter() - t0
        attempt += 1
    if comm is not None and comm.Get_rank() != 0:
        return _result(directory, config, wall)
    with summary.timed("convert"):
        end_step = finish_outputs(directory, prepared.elements, config)
        watch = watch_record(directory, config, end_step) if config.watch_every else None
        outputs = record_outputs(directory, config)
    result = _result(directory, config, wall, end_step, watch)
    summary.results.update({"steps": end_step, "steps_requested": config.steps,
                            "simulated_ps": end_step * config.timestep_ps,
                            "ns_per_day": result.ns_per_day, "resumed_from": str(restart_from) if restart_from else None,
                            "attempts": attempt, "model": str(prepared.model),
                            "elements": list(prepared.elements), "outputs": outputs})
    if watch is not None:
        summary.results["watch"] = watch
    summary.write(directory / SUMMARY)
    return result


def _result(directory: Path, config: MDConfig, wall: float, steps: int | None = None,
            watch: dict[str, Any] | None = None) -> ReplicaResult:
    steps = config.steps if steps is None else steps
    return ReplicaResult(directory=directory, trajectory=directory / TRAJECTORY, thermo=directory / THERMO,
                         final=directory / FINAL, steps=steps, simulated_ps=steps * config.timestep_ps,
                         wall_time_s=wall, watch=watch)


def _finished_result(directory: Path, config: MDConfig) -> ReplicaResult | None:
    summary = directory / SUMMARY
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None  # written atomically: unreadable means it is not ours, and the run is redone
    if data.get("status") != "finished":
        return None
    results = data.get("results", {})
    verify_outputs(directory, results.get("outputs"), names=output_names(config),
                   legacy_frames=config.steps // config.dump_every + 1)
    # A run the watch stopped is finished at its halting step (recorded), not the steps asked.
    return _result(directory, config, data.get("timings_s", {}).get("lammps", 0.0),
                   int(results.get("steps", config.steps)), results.get("watch"))


# --------------------------------------------------------------------------------------------
# finished outputs: recorded when the run finishes, checked whenever they are reused


OUTPUTS = (TRAJECTORY, THERMO, FINAL)


def output_names(config: MDConfig) -> tuple[str, ...]:
    """The outputs a finished run records: a watched run adds its flagged frames."""
    return OUTPUTS + ((FLAGGED,) if config.watch_every else ())


def count_extxyz_frames(path: Path) -> tuple[int, bool]:
    """(complete frames, whether the file also ends in a cut frame or line), from the atom-count
    lines alone: a cheap structural check that needs no parsing of the frames."""
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    ends_in_newline = lines[-1] == b""
    if ends_in_newline:
        lines.pop()
    frames, at = 0, 0
    while at < len(lines):
        try:
            natoms = int(lines[at])
        except ValueError:
            return frames, True
        if at + natoms + 2 > len(lines):
            return frames, True
        frames += 1
        at += natoms + 2
    return frames, not ends_in_newline


def count_csv_rows(path: Path) -> tuple[int, bool]:
    with open(path, "rb") as handle:
        text = handle.read()
    lines = text.split(b"\n")
    cut = not text.endswith(b"\n") and bool(text)
    return max(len([line for line in lines if line]) - 1, 0), cut


def describe_output(path: Path) -> dict[str, Any]:
    from ..io import sha256_file

    record: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.name == THERMO:
        record["rows"], _ = count_csv_rows(path)
    else:
        record["frames"], _ = count_extxyz_frames(path)
    return record


def record_outputs(directory: Path, config: MDConfig | None = None) -> dict[str, dict[str, Any]]:
    names = output_names(config) if config is not None else OUTPUTS
    return {name: describe_output(directory / name) for name in names}


def verify_outputs(directory: Path, recorded: dict[str, dict[str, Any]] | None,
                   names: Sequence[str] = OUTPUTS, legacy_frames: int | None = None) -> None:
    """Refuse to reuse a finished replica whose outputs are not what its run wrote."""
    from ..io import sha256_file

    redo = (f"delete {directory} and rerun the umlipft md command that made it to redo the run "
            "(or put the original file back)")
    if recorded is None:
        # Written before outputs were recorded: the structure is all that can be checked.
        recorded = {name: {} for name in OUTPUTS}
        if legacy_frames is not None:
            recorded[TRAJECTORY]["frames"] = legacy_frames
    for name in names:
        path = directory / name
        want = recorded.get(name, {})
        if not path.is_file():
            raise StateError(f"{path} is missing from this finished MD run; {redo}")
        counter = count_csv_rows if name == THERMO else count_extxyz_frames
        unit = "rows" if name == THERMO else "frames"
        have, cut = counter(path)
        changes = []
        if unit in want and have != want[unit]:
            changes.append(f"it has {have} of the {want[unit]} {unit} the run wrote")
        if cut:
            changes.append("its last " + ("line" if name == THERMO else "frame") + " is cut off")
        if "bytes" in want and path.stat().st_size != want["bytes"]:
            changes.append(f"{path.stat().st_size} bytes instead of {want['bytes']}")
        if not changes and "sha256" in want and sha256_file(path) != want["sha256"]:
            changes.append("its content differs from what the run wrote (sha256)")
        if changes:
            raise StateError(f"{path} was changed after this MD run finished: {'; '.join(changes)}; {redo}")


THERMO_LINE = re.compile(r"^\s*(\d+)\s+[-+0-9.eE]")


def _run_subprocess(script: Path, variables: dict[str, str], log: Path, directory: Path,
                    config: MDConfig, progress: bool) -> None:
    from ..lammps import lammps_environment, lmp_executable

    command = [str(lmp_executable()), "-in", str(script), "-log", str(log)]
    for name, value in variables.items():
        command += ["-var", name, value]
    total_ps = config.steps * config.timestep_ps
    bar = _progress_bar(total_ps, directory.name, progress)
    tail: list[str] = []
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=directory, env=lammps_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail = (tail + [line])[-40:]
            match = THERMO_LINE.match(line)
            if bar is not None and match:
                done_ps = min(int(match.group(1)) * config.timestep_ps, total_ps)
                bar.update(done_ps - bar.n)
                elapsed = time.perf_counter() - started
                if elapsed > 0 and done_ps > 0:
                    bar.set_postfix_str(f"{done_ps / 1000.0 / elapsed * 86400.0:.4f} ns/day")
        code = process.wait()
    if bar is not None:
        bar.close()
    if code != 0:
        text = "".join(tail[-15:])
        raise ExternalProgramError(
            f"LAMMPS failed (exit {code}) in {directory}: {explain_failure(text, config)}"
            f"its last lines:\n{text}"
        )


FIX_HALT = re.compile(r"Fix halt condition for fix-id watchdog_temperature met on step (\d+) with value (\S+)")


def explain_failure(text: str, config: MDConfig) -> str:
    """A lead for LAMMPS' message when it comes from a safety check or a blow-up, saying which
    setting of umlipft md changes it; empty otherwise."""
    rerun = ("rerun the same command: it resumes from the last restart file" if config.restart_every
             else "rerun the same command (it starts again from the beginning; restart_every lets a "
                  "rerun resume instead)")
    causes = ("likely causes: a timestep too large for these atoms (timestep_fs; 0.5 fs with "
              "hydrogen), atoms overlapping in the start structure, or the model extrapolating far "
              "outside its training data (fine-tune it on this chemistry)")
    halt = FIX_HALT.search(text)
    if halt:
        step, ratio = int(halt.group(1)), float(halt.group(2).rstrip(")").rstrip(","))
        return (f"the temperature watchdog stopped the run at step {step}: the temperature reached "
                f"{ratio * config.temperature_K:.4g} K, {ratio:.3g} times temperature_K ({config.temperature_K:g} K), "
                f"above watchdog_temperature_factor = {config.watchdog_temperature_factor:g}. The run is "
                f"blowing up; {causes}. If such temperatures are intended, raise watchdog_temperature_factor "
                f"(--watchdog-temperature-factor, 0 turns it off) and {rerun}.\n")
    if "pair_style mace: watchdog" in text:
        return ("the force watchdog stopped the run (LAMMPS' message below names the step and atoms). "
                "If such forces are intended, raise max_force_eV_A (--max-force-eV-A, 0 turns it off) "
                f"and {rerun}.\n")
    if "closer than min_distance" in text:
        return ("atoms are closer than min_distance_A (LAMMPS' message below names them); fix the "
                "structure, or lower min_distance_A (--min-distance-A, 0 turns the check off).\n")
    if "Lost atoms" in text or "Out of range atoms" in text:
        return (f"atoms left the box or moved too far in one step: the run blew up; {causes}. "
                "Lower timestep_fs or fix the structure, then rerun.\n")
    return ""


def _progress_bar(total_ps: float, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_ps, unit="ps", desc=f"md {name}", bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} ps [{elapsed}<{remaining}{postfix}]")


def _run_in_process(script: Path, variables: dict[str, str], log: Path, comm: Any, config: MDConfig) -> None:
    from ..lammps import open_lammps

    cmdargs = ["-screen", "none", "-log", str(log)]
    for name, value in variables.items():
        cmdargs += ["-var", name, value]
    lmp = open_lammps(cmdargs, comm=comm)
    try:
        lmp.file(str(script))
    except Exception as err:
        raise ExternalProgramError(f"LAMMPS failed: {explain_failure(str(err), config)}{err}") from None
    finally:
        lmp.close()


# --------------------------------------------------------------------------------------------
# outputs: extxyz trajectory with real symbols, step and time; thermo table; final frame


def read_thermo_log(log: Path) -> list[dict[str, float]]:
    """Thermo rows of one LAMMPS log, also of a run killed mid-way (no 'Loop time' line, its
    last line possibly cut: only lines that end in a newline count)."""
    rows: list[dict[str, float]] = []
    if not log.is_file():
        return rows
    names: list[str] | None = None
    with open(log, encoding="utf-8", errors="replace", newline="") as handle:
        for line in handle:
            fields = line.split()
            if fields[:1] == ["Step"]:
                names = fields
                continue
            if names is None:
                continue
            if line.startswith("Loop time of"):
                names = None
                continue
            if len(fields) != len(names) or not line.endswith("\n"):
                continue  # a warning between thermo lines, or the line being written when killed
            try:
                values = [float(v) for v in fields]
            except ValueError:
                continue
            row = dict(zip(names, values))
            row["Step"] = int(row["Step"])
            rows.append(row)
    return rows


def read_thermo(logs: Sequence[Path]) -> list[dict[str, float]]:
    """Thermo rows of all attempts in order: each attempt's rows up to the step the next attempt
    started from (a resume repeats the steps after its restart file; a restart from scratch
    repeats everything)."""
    attempts = [rows for rows in (read_thermo_log(log) for log in logs) if rows]
    joined: list[dict[str, float]] = []
    for k, rows in enumerate(attempts):
        upto = attempts[k + 1][0]["Step"] if k + 1 < len(attempts) else None
        joined += [row for row in rows if upto is None or row["Step"] < upto]
    return joined


def write_thermo_csv(rows: Sequence[dict[str, float]], path: Path) -> None:
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def expected_steps(every: int, steps: int, last: bool) -> list[int]:
    """Steps LAMMPS writes output at: multiples of ``every``, plus the final step for thermo."""
    found = list(range(0, steps + 1, every))
    if last and found[-1] != steps:
        found.append(steps)
    return found


def check_steps(what: Path, have: Sequence[int], want: Sequence[int], directory: Path) -> None:
    if list(have) == list(want):
        return
    missing = sorted(set(want) - set(have))
    repeated = sorted({s for s in have if list(have).count(s) > 1})
    extra = sorted(set(have) - set(want))
    details = [f"{label} {', '.join(map(str, found[:8]))}{' ...' if len(found) > 8 else ''}"
               for label, found in (("missing steps", missing), ("repeated steps", repeated),
                                    ("unexpected steps", extra)) if found]
    raise StateError(
        f"{what}: {len(have)} entries where the run has {len(want)} ({'; '.join(details) or 'out of order'}); "
        f"the LAMMPS logs and dump in {directory} do not add up to one run. Delete {directory} and "
        "rerun the same umlipft md command to redo it"
    )


def finish_outputs(directory: Path, elements: Sequence[str], config: MDConfig) -> int:
    """Convert LAMMPS' outputs (thermo.csv, trajectory.extxyz, final.extxyz and, when watched,
    flagged.extxyz) after checking that the attempts add up to one run; returns the run's last
    step: ``steps``, or the step where the extrapolation watch stopped it."""
    from ase.io import read

    from ..lammps import read_lammps_dump

    logs = lammps_log_paths(directory)
    halted = watch_halt_step(logs[-1]) if config.watch_every and logs else None
    end = config.steps if halted is None else halted
    rows = read_thermo(logs)
    # A run stopped by fix halt prints no thermo line at its last step unless one is due there.
    check_steps(directory / "log.lammps.*", [int(r["Step"]) for r in rows],
                expected_steps(config.thermo_every, end, last=end == config.steps), directory)
    write_thermo_csv(rows, directory / THERMO)
    energy_at = {int(r["Step"]): r["PotEng"] for r in rows if "PotEng" in r}
    frames = read_lammps_dump(directory / f"{PREFIX}.lammpstrj")
    check_steps(directory / f"{PREFIX}.lammpstrj", [int(a.info.get("timestep", -1)) for a in frames],
                expected_steps(config.dump_every, end, last=False), directory)
    for atoms in frames:
        step = int(atoms.info.pop("timestep", 0))
        atoms.info["step"] = step
        atoms.info["time_ps"] = step * config.timestep_ps
        if step in energy_at:
            atoms.info["md_energy"] = energy_at[step]
        atoms.calc = None
    write_frames(directory / TRAJECTORY, frames)
    final = read(directory / f"{PREFIX}.final.data", format="lammps-data", atom_style="atomic",
                 units="metal", Z_of_type={k + 1: _z(s) for k, s in enumerate(elements)}, parallel=False)
    final.info["step"] = end
    final.info["time_ps"] = end * config.timestep_ps
    write_frames(directory / FINAL, [final])
    if config.watch_every:
        write_frames(directory / FLAGGED, flagged_frames(directory, config))
    for path in directory.glob(f"{PREFIX}.restart.*"):
        path.unlink()
    return end


# --------------------------------------------------------------------------------------------
# the extrapolation watch (watch.in): where it stopped the run, the frames it flagged


WATCH_HALT = re.compile(r"Fix halt condition for fix-id watch_halt met on step (\d+)")


def watch_halt_step(log: Path) -> int | None:
    """The step at which watch.in's ``fix watch_halt`` stopped the attempt that wrote ``log``."""
    if not log.is_file():
        return None
    found = WATCH_HALT.findall(log.read_text(encoding="utf-8", errors="replace"))
    return int(found[-1]) if found else None


def _watch_halted_and_written(directory: Path) -> bool:
    """Whether the newest attempt was stopped by the watch and LAMMPS then ran to its end
    (write_data of the final frame; LAMMPS' last log line)."""
    log = lammps_log_paths(directory)[-1]
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    return (WATCH_HALT.search(text) is not None and "Total wall time" in text
            and (directory / f"{PREFIX}.final.data").is_file())


def flagged_frames(directory: Path, config: MDConfig) -> list["Atoms"]:
    """The whole frames watch.in dumped where the halting statistic exceeded 1, with the per-atom
    columns of compute mace/q: ``watch_q`` (Q), ``watch_q_ratio`` (Q over the element's limit at
    the watch's alpha), ``watch_t2`` and ``watch_halt_ratio`` (Q over the element's halting limit;
    its maximum is the frame's statistic), the LAMMPS atom ID in ``id``; info: step, time_ps and
    ``watch_statistic``."""
    import numpy as np

    from ..lammps import read_lammps_dump

    dump = directory / f"{PREFIX}.flagged.lammpstrj"
    if not dump.is_file() or not dump.read_text().strip():
        return []
    frames = read_lammps_dump(dump)
    out = []
    for atoms in frames:
        step = int(atoms.info.pop("timestep", 0))
        missing = [c for c in WATCH_COLUMNS if c not in atoms.arrays]
        if missing:
            raise StateError(f"{dump}: the frame of step {step} has no {', '.join(missing)} column; it was not "
                             f"written by watch.in. Delete {directory} and rerun the umlipft md command")
        for column, name in WATCH_COLUMNS.items():
            atoms.arrays[name] = np.asarray(atoms.arrays.pop(column), dtype=float)
        atoms.arrays["id"] = np.arange(1, len(atoms) + 1)  # sorted by ID, IDs 1..N (atom_modify map array)
        atoms.arrays.pop("type", None)
        atoms.info.update(step=step, time_ps=step * config.timestep_ps,
                          watch_statistic=float(atoms.arrays["watch_halt_ratio"].max()))
        atoms.calc = None
        out.append(atoms)
    return out


def fired_atoms(atoms: "Atoms", limit: float = 1.0) -> list[dict[str, Any]]:
    """The atoms of a flagged frame beyond their element's halting limit (``watch_halt_ratio`` >
    ``limit``: what makes the statistic exceed 1), largest first."""
    import numpy as np

    ratio = np.asarray(atoms.arrays["watch_halt_ratio"])
    ids = np.asarray(atoms.arrays.get("id", np.arange(1, len(atoms) + 1)))
    symbols = atoms.get_chemical_symbols()
    order = [int(i) for i in np.argsort(-ratio) if ratio[i] > limit]
    return [{"id": int(ids[i]), "element": symbols[i], "halt_ratio": float(ratio[i])} for i in order]


def watch_record(directory: Path, config: MDConfig, end_step: int) -> dict[str, Any]:
    """What the watch saw in a finished run: whether and where it stopped it (``halted``,
    ``halted_at_step``, ``halted_at_ps``), the flagged frames (count, steps), the largest halting
    statistic seen (over the flagged frames and the thermo rows, the steps where it was recorded)
    and the atoms that fired it: those above their halting limit in the last flagged frame (the
    halting frame when it halted)."""
    halted_at = watch_halt_step(lammps_log_paths(directory)[-1])
    # From LAMMPS' dump (%.12g), not flagged.extxyz (ASE writes per-atom values to 8 decimals).
    flagged = flagged_frames(directory, config)
    thermo_values = []
    for row in read_thermo(lammps_log_paths(directory)):
        if "c_watch" in row:
            thermo_values.append(float(row["c_watch"]))
    statistics = [float(a.info["watch_statistic"]) for a in flagged] + thermo_values
    last = flagged[-1] if flagged else None
    return {
        "every": config.watch_every, "patience": config.watch_patience,
        "halted": halted_at is not None, "halted_at_step": halted_at,
        "halted_at_ps": None if halted_at is None else halted_at * config.timestep_ps,
        "steps_run": end_step, "steps_requested": config.steps,
        "flagged_frames": len(flagged), "flagged_steps": [int(a.info["step"]) for a in flagged],
        "max_statistic": max(statistics) if statistics else None,
        "fired_at_step": None if last is None else int(last.info["step"]),
        "fired_atoms": [] if last is None else fired_atoms(last),
    }


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


# --------------------------------------------------------------------------------------------
# entry points


@locks_output("md", lambda config, *_, **__: config.output)
def run_md(config: MDConfig, progress: bool = True) -> list[ReplicaResult]:
    """Run every replica here, one after another (no MPI)."""
    prepared = prepare(config)
    return [run_replica(config, prepared, k, progress=progress) for k in range(config.replicas)]


# The K ranks share one run directory: rank 0 holds it for all of them.
@locks_output("md", lambda config, *_, **__: config.output,
              comm=lambda config, world=None: world or mpi_world())
def run_md_mpi(config: MDConfig, world: Any = None) -> list[ReplicaResult]:
    """Under ``mpiexec -n K``: split the ranks into ``replicas`` groups, each running one
    replica through the LAMMPS Python module on its own communicator."""
    from mpi4py import MPI

    world = world or MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    if size < config.replicas or size % config.replicas:
        raise InputError(
            f"{size} MPI ranks cannot be split evenly into {config.replicas} replicas; "
            f"launch with mpiexec -n {config.replicas} (or a multiple)"
        )
    prepared = None
    error = None
    if rank == 0:
        try:
            prepared = prepare(config)
        except Exception as err:  # share the message with every rank, then fail everywhere
            error = err
    error = world.bcast(error, root=0)
    if error is not None:
        raise error
    prepared = world.bcast(prepared, root=0)
    color = rank % config.replicas
    group = world.Split(color, rank)
    # A replica that fails must not leave the others waiting: every rank reports, then all
    # ranks raise the same error together.
    try:
        outcome: tuple[str, Any] = ("ok", run_replica(config, prepared, color, comm=group, progress=False))
    except Exception as err:
        outcome = ("error", f"replica {color} (rank {rank}): {err}")
    finally:
        group.Free()
    outcomes = world.allgather(outcome)
    failures = [detail for status, detail in outcomes if status == "error"]
    if failures:
        raise ExternalProgramError("MD replicas failed:\n" + "\n".join(failures))
    if rank != 0:
        return []
    by_directory = {detail.directory: detail for _, detail in outcomes}
    return [by_directory[replica_dir(prepared.run_dir, k, config.replicas)] for k in range(config.replicas)]
