"""Batch scripts for clusters (profile ``study``): one Slurm job per stage group, chained.

Every job runs the same ``umlipft workflow ... --until STAGE`` command in the shared workflow
directory: finished stages are skipped from the state file, so each job does exactly its own
stage and a failed or preempted job is simply resubmitted. The naive trajectories run as one
MPI ensemble (``srun``/``mpiexec -n K umlipft md --config DIR/naive/md/md.yaml``: K replicas
on split communicators); the workflow then records the finished run. ``submit.sh`` submits all
jobs with ``--dependency=afterok`` on the previous one.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_text
from .config import WorkflowConfig


def stage_plan(strategies: Sequence[str], config: WorkflowConfig, judge: bool) -> list[tuple[str, str]]:
    """(job name, last stage of the job) in execution order; stages are deterministic from the config."""
    plan: list[tuple[str, str]] = [("start", "start")]  # --until start: every start structure
    n = config.iterations
    for strategy in strategies:
        if strategy in ("periodic", "control", "adaptive"):
            for i in range(n):
                seg = f"{strategy}/seg-{i:02d}"
                plan.append((f"{strategy}-md-{i:02d}", f"{seg}/md" if strategy != "adaptive" or i == 0 else f"{seg}/select"))
                plan.append((f"{strategy}-label-{i:02d}", f"{seg}/label"))
                plan.append((f"{strategy}-ft-{i + 1:02d}", f"{strategy}/ft-{i + 1:02d}"))
        elif strategy == "naive":
            plan.append(("naive-md", "naive/md"))
            for j in range(n):
                plan.append((f"naive-label-{j:02d}", f"naive/traj-{j:02d}/label"))
            for size in config.subsets():
                plan.append((f"naive-ft-{size:03d}", f"naive/ft-{size:03d}"))
    if judge:
        plan.append(("judge", "report-" + "-".join(strategies)))
    return plan


def write_slurm_scripts(command: str, strategies: Sequence[str], config: WorkflowConfig, directory: str | Path,
                        *, config_path: str | None, judge: bool = True) -> Path:
    """Write DIR/slurm/NN-name.sbatch and DIR/slurm/submit.sh; returns submit.sh."""
    import yaml

    directory = Path(directory).resolve()
    folder = directory / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    # The configuration travels with the directory: every job reads the same file.
    cfg_file = directory / "workflow-input.yaml"
    atomic_write_text(cfg_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    s = config.slurm
    base = ["umlipft", "workflow", command if command != "quick" else "compare", "--config", str(cfg_file),
            "-o", str(directory)]
    if command in ("compare", "quick"):
        base += ["--strategies", *strategies]
    if not judge:
        base.append("--no-judge")
    scripts = []
    for k, (job, until) in enumerate(stage_plan(strategies, config, judge)):
        lines = ["#!/bin/bash", f"#SBATCH --job-name=umlipft-{job}", f"#SBATCH --time={s.time}",
                 f"#SBATCH --output={folder}/{k:02d}-{job}-%j.out"]
        if s.partition:
            lines.append(f"#SBATCH --partition={s.partition}")
        if s.account:
            lines.append(f"#SBATCH --account={s.account}")
        mpi = job == "naive-md"
        ranks = s.mpi_ranks_md or config.iterations
        if mpi:
            lines += [f"#SBATCH --ntasks={ranks}", f"#SBATCH --cpus-per-task={s.cpus_per_task}"]
            if s.gpus:
                lines.append(f"#SBATCH --gpus-per-task={max(1, s.gpus // ranks) if s.gpus >= ranks else 1}")
        else:
            lines += ["#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={s.cpus_per_task}"]
            if s.gpus and (job.endswith("-md") or "-md-" in job or job.startswith(("judge",)) or "-ft-" in job):
                lines.append(f"#SBATCH --gpus={s.gpus}")
        lines += list(s.extra)
        lines += ["", "set -euo pipefail"]
        lines += [f"module load {m}" for m in s.modules]
        lines.append(f"export OMP_NUM_THREADS={s.cpus_per_task}")
        if mpi:
            # The workflow writes the ensemble's MD config (same settings it would run itself),
            # the K replicas run as one MPI job, then the workflow records the finished run.
            lines.append(" ".join(shlex.quote(a) for a in base + ["--until", "export/U"]))
            lines.append(f"python -m umlipft.workflows.slurm {shlex.quote(str(cfg_file))} "
                         f"{shlex.quote(str(directory))}")
            launcher = "srun" if s.mpiexec == "srun" else f"{s.mpiexec} -n {ranks}"
            lines.append(f"{launcher} umlipft md --config {shlex.quote(str(directory / 'naive/md/md.yaml'))} --no-progress")
        lines.append(" ".join(shlex.quote(a) for a in base + ["--until", until]))
        path = folder / f"{k:02d}-{job}.sbatch"
        atomic_write_text(path, "\n".join(lines) + "\n")
        path.chmod(0o755)
        scripts.append(path)
    submit = ["#!/bin/bash", "# Submit every stage of this workflow, each after the previous one succeeded.",
              "set -euo pipefail", f"cd {shlex.quote(str(folder))}", "previous="]
    for path in scripts:
        submit.append(f'id=$(sbatch --parsable ${{previous:+--dependency=afterok:$previous}} {shlex.quote(path.name)})')
        submit.append(f'echo "submitted {path.name}: $id"; previous=$id')
    target = folder / "submit.sh"
    atomic_write_text(target, "\n".join(submit) + "\n")
    target.chmod(0o755)
    return target


def write_naive_md_config(config: WorkflowConfig, directory: str | Path) -> Path:
    """DIR/naive/md/md.yaml: exactly the MDConfig the workflow's naive/md stage runs, for an MPI
    ensemble launched outside the workflow (the stage then finds the replicas finished)."""
    import yaml

    from .stages import elements_of, md_config
    from .state import WorkflowState
    from .strategies import NAIVE_SEED_OFFSET

    state = WorkflowState(directory)
    structures = [state.result(f"start/{k:02d}")["structure"] for k in range(config.iterations)]
    elements = elements_of(state.root / structures[0])
    folder = state.stage_dir("naive/md")
    model = state.result("export/U")["lammps_model"]
    cfg = md_config(state, config, folder, model=model, steps=config.md.segment_steps,
                    seed=config.md.seed + NAIVE_SEED_OFFSET, structures=structures, elements=elements)
    target = folder / "md.yaml"
    atomic_write_text(target, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return target


if __name__ == "__main__":
    import sys

    from .config import load_workflow_config

    print(write_naive_md_config(load_workflow_config(sys.argv[1]), sys.argv[2]))
