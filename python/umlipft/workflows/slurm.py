"""Batch scripts for clusters (``umlipft workflow ... --slurm``): one Slurm job per stage group,
submitted as a dependency graph in which independent branches run at the same time.

Every job runs the same workflow command in the shared workflow directory, for its own strategy,
with ``--until STAGE --only GROUP...``: finished stages are skipped (state file), the job runs
only its own stages (another branch's unfinished stages are left to that branch's job) and stops
after STAGE, so a failed or preempted job is simply resubmitted. The graph (``submit.sh``, each
job ``--dependency=afterok`` on the jobs whose stages it needs):

- ``start`` (start structures, U's LAMMPS export), then every strategy as its own branch;
- periodic/control/adaptive: a chain md -> label -> fine-tune (+ export) per segment (an adaptive
  segment's md job runs it with the watch until the watch stops it or its steps are done; its
  label job then chooses the frames, ``select`` or ``extract``, and labels them);
- naive: one MPI ensemble job (``srun``/``mpiexec -n K umlipft md --config DIR/naive/md/md.yaml``:
  K replicas on split communicators; the workflow then records the finished run), one label job
  per trajectory in parallel, the pool, then the fine-tunes (in parallel when they all start
  from U);
- the judge: per model, its self-consistent test (MD job, then label job) once its strategy's
  models exist; per final model, the long run after its test's MD; the report after everything.

MD jobs with GPUs run ``pair_style mace device cuda`` (the job's config has ``md.device: cuda``),
the fine-tunes run on ``finetune.device``; every job has OMP_NUM_THREADS = ``cpus_per_task``.
Programs are called by absolute path (this environment's ``umlipft`` and Python). Time limits
are estimated from each job's work (constants below) unless ``slurm.time_by_kind`` or
``slurm.time`` give one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..io import atomic_write_text
from .config import WorkflowConfig

JOB_KINDS = ("start", "md", "label", "pool", "finetune", "judge")
CONFIG_NAME = "workflow-input.yaml"

# --------------------------------------------------------------------------- time estimates
# Every estimate is work x rate x SAFETY, at least MIN_JOB_S. Sources: README "Performance"
# (MACE-MP-0 small, optimised export, 2 cores) and examples/WORKFLOWS.md; the rest are stated
# assumptions: measure on your cluster and set slurm.time_by_kind if they are off.
SAFETY = 2.0
MIN_JOB_S = 15 * 60
# README: "0.43 ms (fp32) and 1.2 ms (fp64) per atom and step on 2 cores" (linear from ~500
# atoms; smaller systems are cheaper per atom, so this errs long).
CPU_MS_PER_ATOM_STEP = {"float32": 0.43, "float64": 1.2}
# Threads behind the README numbers; a job with cpus_per_task threads is assumed to scale
# linearly from them (README: one thread 373 ms, two 190 ms), SAFETY covering worse scaling.
CPU_THREADS_MEASURED = 2
# Assumed, not measured: README says the CUDA path has not been run here. A ~200-atom MACE
# small step on a GPU is latency-bound at some 10-20 ms, i.e. about 0.05-0.1 ms per atom.
GPU_MS_PER_ATOM_STEP = {"float32": 0.05, "float64": 0.1}
MD_OVERHEAD_S = 600.0  # start-up, TorchScript warm-up, trajectory conversion at the end
# README: streamed SOAP "about 0.1 s per frame" (200 atoms): fps selection, report.
SOAP_S_PER_FRAME = 0.1
# Seconds per labelled frame of up to LABEL_REFERENCE_ATOMS atoms, one frame at a time with the
# job's cores; larger frames scale with (atoms / LABEL_REFERENCE_ATOMS)^3. xtb: WORKFLOWS.md
# measured ~5 s per 35-atom frame, scaled ~N^2 to 200 atoms; DFT: assumed (PBE, DZVP/PAW,
# ~200 atoms with an open-shell Co on one node), not measured here.
LABEL_REFERENCE_ATOMS = 200
LABEL_S_PER_FRAME = {"xtb": 120.0, "cp2k": 3600.0, "vasp": 3600.0, "espresso": 3600.0}
# README: a float64 epoch on the 11-frame set takes 16.2 s on 2 threads (~1.5 s per frame);
# GPU assumed 10x faster. WORKFLOWS.md: mace-torch's start-up, compilation and final
# evaluation take 1-2 min, plus the LAMMPS export (tens of seconds): FT_OVERHEAD_S covers both.
FT_S_PER_FRAME_EPOCH = {"cpu": 1.5, "cuda": 0.15}
FT_OVERHEAD_S = 900.0
START_S_PER_STRUCTURE = 120.0  # Packmol for ~200 atoms: seconds to a minute
EXPORT_S = 300.0               # optimised export with its check against mace-torch, CPU
POOL_S = 60.0
REPORT_OVERHEAD_S = 1800.0     # figures, cross-evaluation of the long-run labels, HTML


@dataclasses.dataclass(frozen=True)
class Job:
    """One batch job: its stages (``until`` the last, ``only`` the groups it may run)."""

    name: str
    kind: str
    strategies: tuple[str, ...]
    until: str | None
    only: tuple[str, ...]
    after: tuple[str, ...]
    seconds: float
    note: str
    judge: bool = False  # whether the job needs the judge (evaluation jobs, the report)
    mpi: bool = False


def slurm_seconds(text: str, key: str = "time") -> float:
    """Seconds of a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return math.inf
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"{key}: {text!r} is not a Slurm time; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts = [int(a), int(b or 0), int(c or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def slurm_time(seconds: float) -> str:
    """``D-HH:MM:SS``, rounded up to whole minutes."""
    minutes = max(1, math.ceil(seconds / 60.0))
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


# ------------------------------------------------------------------------------------- the plan
def model_names(strategy: str, config: WorkflowConfig) -> list[str]:
    """The models a strategy makes, in order (names as the strategies give them, assuming every
    frame gets labelled: with failed labels naive/control names shift and their jobs say so)."""
    n, f = config.iterations, config.frames_per_segment
    if strategy == "periodic":
        return [f"FT{i + 1}" for i in range(n)]
    if strategy == "adaptive":
        return [f"AD{i + 1}" for i in range(n)]
    if strategy == "control":
        return [f"NP-{f * (i + 1)}" for i in range(n)]
    return [f"N-{size}pts" for size in config.subsets()]


def count_atoms(config: WorkflowConfig) -> int:
    """Atoms of the first start structure: the given file, or the Packmol composition."""
    system = config.system
    if system.structures and Path(system.structures[0]).is_file():
        from ase.io import read

        return len(read(system.structures[0], index=0))
    from ..build.core import BuildConfig, species_counts
    from ..build.molecules import template

    counts = {key: getattr(system, key) for key in ("n_water", "n_licl", "n_cocl2", "n_choline_chloride",
                                                    "n_citric_acid")}
    build = BuildConfig(system=system.system, **counts)
    return sum(len(template(name)) * k for name, k in species_counts(build).items())


class _Estimator:
    def __init__(self, config: WorkflowConfig, atoms: int) -> None:
        self.config = config
        self.atoms = atoms
        s = config.slurm
        self.md_device = "cuda" if s.gpus > 0 else "cpu"
        self.threads = s.cpus_per_task

    def md(self, steps: int, replicas_per_rank: int = 1) -> tuple[float, str]:
        dtype = self.config.md.dtype
        if self.md_device == "cuda":
            rate, where = GPU_MS_PER_ATOM_STEP[dtype], "GPU"
        else:
            rate = CPU_MS_PER_ATOM_STEP[dtype] * CPU_THREADS_MEASURED / self.threads
            where = f"{self.threads} CPU threads"
        seconds = steps * self.atoms * rate / 1000.0 * replicas_per_rank + MD_OVERHEAD_S
        return seconds, (f"{steps:,} steps x {self.atoms} atoms x {rate:.3g} ms ({where}, {dtype})"
                         + (f" x {replicas_per_rank} replicas a rank" if replicas_per_rank > 1 else ""))

    def label(self, frames: int, candidates: int = 0) -> tuple[float, str]:
        lab = self.config.label
        per_frame = LABEL_S_PER_FRAME.get(lab.calculator, max(LABEL_S_PER_FRAME.values()))
        per_frame *= max(1.0, (self.atoms / LABEL_REFERENCE_ATOMS) ** 3)
        seconds = math.ceil(frames / max(1, lab.processes)) * per_frame
        if self.config.selection == "fps":
            seconds += candidates * SOAP_S_PER_FRAME
        return seconds, f"{frames} frames x {per_frame:.0f} s ({lab.calculator}), {lab.processes} at a time"

    def finetune(self, frames: int) -> tuple[float, str]:
        ft = self.config.finetune
        rate = FT_S_PER_FRAME_EPOCH["cuda" if ft.device == "cuda" else "cpu"]
        if ft.device != "cuda":
            rate *= CPU_THREADS_MEASURED / self.threads
        seconds = ft.epochs * frames * rate + FT_OVERHEAD_S
        return seconds, (f"{ft.epochs} epochs x {frames} frames x {rate:.3g} s ({ft.device})"
                         + (" + replay frames not counted" if ft.replay_file else ""))


def plan_jobs(strategies: Sequence[str], config: WorkflowConfig, judge: bool = True,
              atoms: int | None = None) -> list[Job]:
    """The jobs in submission order (every job after the jobs it depends on)."""
    atoms = atoms or count_atoms(config)
    est = _Estimator(config, atoms)
    md, ev = config.md, config.evaluation
    n = config.iterations
    jobs: list[Job] = []

    def add(name: str, kind: str, strategy: Sequence[str], until: str | None, only: Sequence[str],
            after: Sequence[str], estimate: tuple[float, str], **extra: bool) -> str:
        seconds, note = estimate
        jobs.append(Job(name, kind, tuple(strategy), until, tuple(only), tuple(after), seconds, note, **extra))
        return name

    first = "naive" if "naive" in strategies else strategies[0]
    starts = n if first == "naive" else 1
    start = add("start", "start", [first], "export/U", ["start", "export/U"], [],
                (starts * START_S_PER_STRUCTURE + EXPORT_S, f"{starts} start structure(s) + U's export"))
    ends: dict[str, list[str]] = {}
    segment_frames = md.segment_steps // md.dump_every // 2 + 1
    for strategy in strategies:
        names = model_names(strategy, config)
        if strategy == "naive":
            ranks = config.slurm.mpi_ranks_md or n
            if ranks % n:
                raise ConfigError(f"slurm.mpi_ranks_md = {ranks} cannot be split evenly into the {n} naive "
                                  "trajectories (iterations); use a multiple of it")
            md_job = add("naive-md", "md", ["naive"], "naive/md", ["naive/md"], [start],
                         est.md(md.segment_steps), mpi=True)
            labels = [add(f"naive-label-{j:02d}", "label", ["naive"], f"naive/traj-{j:02d}/label",
                          [f"naive/traj-{j:02d}"], [md_job], est.label(config.frames_per_segment, segment_frames))
                      for j in range(n)]
            pool = add("naive-pool", "pool", ["naive"], "naive/pool", ["naive/pool"], labels, (POOL_S, "pooling"))
            fts: list[str] = []
            for size, name in zip(config.subsets(), names):
                chained = config.finetune.start_from == "previous" and fts
                fts.append(add(f"naive-ft-{size:03d}", "finetune", ["naive"], f"export/{name}",
                               [f"naive/ft-{size:03d}", f"export/{name}"], [pool] + (fts[-1:] if chained else []),
                               est.finetune(size)))
            ends[strategy] = fts
            continue
        previous = start
        for i in range(n):
            seg = f"{strategy}/seg-{i:02d}"
            # The adaptive watch (compute mace/q every adaptive.watch_every steps) costs under 1 % of
            # the step (README), inside SAFETY; a segment it stops is shorter than estimated.
            md_job = add(f"{strategy}-md-{i:02d}", "md", [strategy], f"{seg}/md", [seg], [previous],
                         est.md(md.segment_steps))
            label = add(f"{strategy}-label-{i:02d}", "label", [strategy], f"{seg}/label", [seg], [md_job],
                        est.label(config.frames_per_segment, segment_frames))
            ft = f"{strategy}/ft-{i + 1:02d}"
            previous = add(f"{strategy}-ft-{i + 1:02d}", "finetune", [strategy], f"export/{names[i]}",
                           [ft, f"export/{names[i]}"], [label], est.finetune(config.frames_per_segment * (i + 1)))
        ends[strategy] = [previous]
    if not judge:
        return jobs

    # The judge: each model's test runs with its strategy (U's with the first), so that the
    # strategy's models exist; the workflow skips the other models' tests (--only).
    tested: dict[str, str] = {"U": first}
    for strategy in strategies:
        for name in model_names(strategy, config):
            tested.setdefault(name, strategy)
    finals = {model_names(s, config)[-1] for s in strategies}
    long_frames = ev.long_steps // ev.long_label_every
    test_frames = ev.test_steps // md.dump_every // 2 + 1
    for name, strategy in tested.items():
        final = ev.long_runs and name in finals
        if not (ev.self_consistent or final):
            continue
        base = f"eval/sc/{name}"
        sc_md = add(f"eval-sc-{name}-md", "md", [strategy], f"{base}/md", [base], ends[strategy],
                    est.md(ev.test_steps), judge=True)
        if ev.self_consistent:
            add(f"eval-sc-{name}-label", "label", [strategy], f"{base}/label", [base], [sc_md],
                est.label(ev.test_frames, test_frames), judge=True)
        if final:
            base = f"eval/long/{name}"
            long_md = add(f"eval-long-{name}-md", "md", [strategy], f"{base}/md", [base], [sc_md],
                          est.md(ev.long_steps), judge=True)
            add(f"eval-long-{name}-label", "label", [strategy], f"{base}/label", [base], [long_md],
                est.label(long_frames), judge=True)
    needed = {a for job in jobs for a in job.after}
    analysed = (len(finals) * ev.long_steps + len(tested) * ev.test_steps) // md.dump_every
    add("report", "judge", list(strategies), None, [], [j.name for j in jobs if j.name not in needed],
        (REPORT_OVERHEAD_S + analysed * SOAP_S_PER_FRAME, f"report: SOAP of {analysed:,} frames + figures"),
        judge=True)
    return jobs


# ------------------------------------------------------------------------------------ the scripts
def environment_programs() -> tuple[Path, Path]:
    """This environment's Python and ``umlipft`` (absolute; the symlinked venv python is kept,
    not resolved, so that the job runs in the same environment)."""
    python = Path(sys.executable).absolute()
    umlipft = python.parent / "umlipft"
    if not umlipft.is_file():
        raise ConfigError(f"no umlipft script next to {python}; install umlipft in this environment "
                          "(./setup.sh) and write the scripts with its umlipft")
    return python, umlipft


def _cluster_program(name: str) -> str:
    """A Slurm/MPI launcher by absolute path where this machine has it (the login node of the
    cluster that runs the jobs), else by name (Slurm's own commands are on every node)."""
    python, _ = environment_programs()
    local = python.parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    return str(Path(found).absolute()) if found else name


def job_config(config: WorkflowConfig) -> WorkflowConfig:
    """The configuration every job reads: MD on the GPUs the MD jobs ask for."""
    s = config.slurm
    if s.gpus > 0:
        return dataclasses.replace(config, md=dataclasses.replace(config.md, device="cuda"))
    if config.md.device == "cuda":
        raise ConfigError("md.device is cuda but slurm.gpus is 0: the MD jobs would have no GPU; "
                          "set slurm.gpus (or md.device: cpu)")
    return config


def write_slurm_scripts(command: str, strategies: Sequence[str], config: WorkflowConfig, directory: str | Path,
                        *, config_path: str | None = None, judge: bool = True) -> Path:
    """Write DIR/slurm/NN-name.sbatch and DIR/slurm/submit.sh; returns submit.sh.

    ``command`` and ``config_path`` are those of the invocation; every job runs
    ``workflow compare --strategies S`` with the resolved configuration written beside the state.
    """
    import yaml

    del command, config_path  # the jobs name their strategies and read the written configuration
    s = config.slurm
    if config.finetune.device == "cuda" and s.gpus == 0:
        raise ConfigError("finetune.device is cuda but slurm.gpus is 0: the fine-tune jobs would have no GPU; "
                          "set slurm.gpus (or finetune.device: cpu)")
    resolved = job_config(config)
    jobs = plan_jobs(strategies, config, judge)
    python, umlipft = environment_programs()
    directory = Path(directory).resolve()
    folder = directory / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = directory / CONFIG_NAME
    atomic_write_text(cfg_file, yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    width = max(2, len(str(len(jobs) - 1)))
    files: dict[str, str] = {}
    for k, job in enumerate(jobs):
        files[job.name] = f"{k:0{width}d}-{job.name}.sbatch"
        path = folder / files[job.name]
        atomic_write_text(path, _script(job, resolved, python, umlipft, cfg_file, directory,
                                        folder / f"{k:0{width}d}-{job.name}-%j.out"))
        path.chmod(0o755)
    target = folder / "submit.sh"
    atomic_write_text(target, _submit_script(jobs, files, folder))
    target.chmod(0o755)
    return target


def _time_limit(job: Job, config: WorkflowConfig) -> tuple[str, str]:
    s = config.slurm
    if job.kind in s.time_by_kind:
        return str(s.time_by_kind[job.kind]), f"slurm.time_by_kind.{job.kind}"
    if s.time:
        return str(s.time), "slurm.time"
    seconds = max(MIN_JOB_S, job.seconds * SAFETY)
    return slurm_time(seconds), f"estimated: {job.note}, x{SAFETY:g} safety, at least {MIN_JOB_S // 60} min"


def _script(job: Job, config: WorkflowConfig, python: Path, umlipft: Path, cfg_file: Path,
            directory: Path, output: Path) -> str:
    s = config.slurm
    time, why = _time_limit(job, config)
    gpu = s.gpus > 0 and (job.kind == "md" or (job.kind == "finetune" and config.finetune.device == "cuda"))
    lines = ["#!/bin/bash", f"#SBATCH --job-name=umlipft-{job.name}", f"#SBATCH --time={time}",
             f"#SBATCH --output={output}"]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    ranks = s.mpi_ranks_md or config.iterations
    if job.mpi:
        lines += [f"#SBATCH --ntasks={ranks}", f"#SBATCH --cpus-per-task={s.cpus_per_task}"]
        if gpu:
            lines.append(f"#SBATCH --gpus-per-task={max(1, s.gpus // ranks)}")
    else:
        lines += ["#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={s.cpus_per_task}"]
        if gpu:
            lines.append(f"#SBATCH --gpus={s.gpus}")
    lines += list(s.extra)
    stages = f"{', '.join(job.only)} (until {job.until})" if job.only else "the report (every stage left)"
    lines += ["", f"# stages: {stages}", f"# time limit: {why}"]
    if job.kind == "md":
        lines.append(f"# MD on {'the GPU: md.device cuda' if config.md.device == 'cuda' else 'the CPU: md.device cpu'}"
                     f" in {cfg_file.name}")
    elif job.kind == "finetune":
        lines.append(f"# fine-tuning on finetune.device = {config.finetune.device}")
    lines += ["set -euo pipefail"]
    lines += [f"module load {m}" for m in s.modules]
    # libtorch (LAMMPS plugin, mace-torch) and the labellers size their thread pools from it.
    lines.append(f"export OMP_NUM_THREADS={s.cpus_per_task}")
    base = [str(umlipft), "workflow", "compare", "--config", str(cfg_file), "-o", str(directory),
            "--strategies", *job.strategies]
    if not job.judge:
        base.append("--no-judge")
    if job.mpi:
        # The workflow writes the ensemble's MD config (what its naive/md stage would run), the
        # replicas run as one MPI job, then the workflow records the finished run.
        lines.append(" ".join(shlex.quote(a) for a in [str(python), "-m", "umlipft.workflows.slurm",
                                                       str(cfg_file), str(directory)]))
        launcher = [_cluster_program("srun")] if s.mpiexec == "srun" else [_cluster_program(s.mpiexec), "-n", str(ranks)]
        lines.append(" ".join(shlex.quote(a) for a in launcher + [
            str(umlipft), "md", "--config", str(directory / "naive/md/md.yaml"), "--no-progress"]))
    if job.until:
        base += ["--until", job.until, "--only", *job.only]
    lines.append(" ".join(shlex.quote(a) for a in base))
    return "\n".join(lines) + "\n"


def _submit_script(jobs: Sequence[Job], files: dict[str, str], folder: Path) -> str:
    var = {job.name: f"j{k}" for k, job in enumerate(jobs)}
    lines = ["#!/bin/bash",
             "# Submit every job of this workflow; each starts when the jobs whose stages it needs",
             "# succeeded (afterok), so independent branches run at the same time. A failed job is",
             "# resubmitted alone: sbatch NN-name.sbatch (finished stages are skipped).",
             "set -euo pipefail", f"cd {shlex.quote(str(folder))}",
             f"SBATCH={shlex.quote(_cluster_program('sbatch'))}",
             'submit() { local out; out=$("$SBATCH" --parsable "$@"); echo "${out%%;*}"; }']
    for job in jobs:
        dependency = ""
        if job.after:
            dependency = "--dependency=afterok:" + ":".join(f"${{{var[a]}}}" for a in job.after) + " "
        lines.append(f"{var[job.name]}=$(submit {dependency}{shlex.quote(files[job.name])})")
        lines.append(f'echo "{files[job.name]}: ${{{var[job.name]}}}"')
    return "\n".join(lines) + "\n"


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
    from .config import load_workflow_config

    print(write_naive_md_config(load_workflow_config(sys.argv[1]), sys.argv[2]))
