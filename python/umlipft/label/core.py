"""``label_frames``: single points of every frame with a reference code, restartable and
parallel over frames (local worker processes and/or MPI ranks)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError, StateError
from ..lock import locks_output, mpi_world
from .config import LabelConfig
from .worker import ATTEMPTS, INPUT, RESULT, STATUS, TASK

if TYPE_CHECKING:
    from ase import Atoms

MANIFEST = "manifest.json"
FAILED = "failed.json"
# Variables an MPI launcher sets for its ranks. A worker must not inherit them: CP2K's own MPI
# (Open MPI on Debian) would otherwise try to join the labelling job's MPICH world.
_MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "MPI_LOCAL", "I_MPI_")


@dataclasses.dataclass
class LabelReport:
    """What a labelling run did. Frame numbers are 0-based positions in FRAMES."""

    output: Path | None
    workdir: Path
    n_frames: int
    labelled: list[int]
    reused: list[int]
    failed: dict[int, str]
    summary: Path | None = None

    @property
    def n_done(self) -> int:
        return len(self.labelled) + len(self.reused)

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_frames

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output) if self.output else None, "workdir": str(self.workdir),
                "n_frames": self.n_frames, "labelled": self.labelled, "reused": self.reused,
                "failed": {str(k): v for k, v in self.failed.items()},
                "summary": str(self.summary) if self.summary else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelReport":
        return cls(output=Path(d["output"]) if d["output"] else None, workdir=Path(d["workdir"]),
                   n_frames=d["n_frames"], labelled=list(d["labelled"]), reused=list(d["reused"]),
                   failed={int(k): v for k, v in d["failed"].items()},
                   summary=Path(d["summary"]) if d["summary"] else None)


def fingerprint(atoms: "Atoms") -> str:
    """Identity of a structure (species, positions, cell, pbc) to 1e-6 Å, and of its own spin
    multiplicity if it has one (a frame's multiplicity changes its label)."""
    import numpy as np

    from .calculators import FRAME_MULTIPLICITY_KEY

    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(atoms.positions, dtype=float), 6).tobytes())
    h.update(np.round(np.asarray(atoms.cell.array, dtype=float), 6).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    if atoms.info.get(FRAME_MULTIPLICITY_KEY) is not None:  # absent: the hash frames always had
        h.update(f"multiplicity={int(atoms.info[FRAME_MULTIPLICITY_KEY])}".encode())
    return h.hexdigest()[:32]


def frame_dir(workdir: Path, index: int) -> Path:
    return workdir / f"frame_{index:06d}"


class _Comm:
    """The MPI world when launched by mpiexec with several ranks, else a one-rank stand-in."""

    def __init__(self) -> None:
        self.comm = None
        self.rank, self.size = 0, 1
        launched = any(k in os.environ for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK",
                                                  "PMI_SIZE", "MPI_LOCALNRANKS"))
        if launched:
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_size() > 1:
                self.comm = MPI.COMM_WORLD
                self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def bcast(self, value: Any) -> Any:
        return value if self.comm is None else self.comm.bcast(value, root=0)

    def gather(self, value: Any) -> list[Any]:
        return [value] if self.comm is None else self.comm.gather(value, root=0)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()


def _agree(comm: _Comm, func: Any) -> Any:
    """Run ``func`` on rank 0 and share its result or its error with every rank, so that a
    rank-0 failure raises everywhere instead of leaving the others at a barrier."""
    outcome: tuple[str, Any] = ("ok", None)
    if comm.rank == 0:
        try:
            outcome = ("ok", func())
        except Exception as err:
            outcome = ("error", err)
    kind, value = comm.bcast(outcome)
    if kind == "error":
        raise value
    return value


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_env(threads: int, rank: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_ENV_PREFIXES)}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    env["OMP_STACKSIZE"] = env.get("OMP_STACKSIZE", "512M")  # xTB/CP2K need big OpenMP stacks
    env["UMLIPFT_LABEL_RANK"] = str(rank)
    return env


def _frame_state(directory: Path, fp: str) -> tuple[str, str]:
    """('done'|'failed'|'todo', reason). A result counts only if it was made from this very
    structure; result.extxyz is written atomically, so its presence means it is complete."""
    task_file = directory / TASK
    if not task_file.is_file():
        return "todo", ""
    task = json.loads(task_file.read_text())
    if task.get("fingerprint") != fp:
        raise StateError(
            f"{directory} holds a different structure than this frame of the input; the frames "
            "file changed since the last run. Use a new --workdir (or delete this one)"
        )
    if (directory / RESULT).is_file():
        from ..io import read_frames, sha256_file

        try:
            written = _done_hash(directory)
            if written and sha256_file(directory / RESULT) != written:
                raise InputError(f"{directory / RESULT} is not the file the labeller wrote (cut short "
                                 "or changed since)")
            read_frames(directory / RESULT, format="extxyz")
        except InputError as err:  # cut short or corrupted outside our atomic write: relabel
            os.replace(directory / RESULT, directory / (RESULT + ".unreadable"))
            print(f"umlipft label: {err}; relabelling this frame (the file is kept as "
                  f"{RESULT}.unreadable)", file=sys.stderr)
            return "todo", ""
        return "done", ""
    status = directory / STATUS
    if status.is_file():
        data = json.loads(status.read_text())
        if data.get("status") == "failed":
            return "failed", data.get("reason", "unknown")
        if data.get("status") == "done":  # finished once: its result was removed since
            print(f"umlipft label: {directory / RESULT} of this finished frame is missing; relabelling "
                  "this frame", file=sys.stderr)
    return "todo", ""


def _done_hash(directory: Path) -> str | None:
    """The hash of result.extxyz that the worker recorded when it finished (None: not recorded)."""
    try:
        return json.loads((directory / STATUS).read_text()).get("result_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _run_worker(directory: Path, *, env: dict[str, str], timeout_s: float | None) -> tuple[bool, str, float]:
    """Label one prepared frame directory in a child process; (ok, reason, wall seconds)."""
    t0 = time.perf_counter()
    (directory / STATUS).unlink(missing_ok=True)
    with open(directory / "worker.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "umlipft.label.worker", str(directory), str(os.getpid())],
            cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills CP2K with it
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reason = f"timeout: no result after {timeout_s:g} s"
            _write_status(directory, {"status": "failed", "reason": reason})
            return False, reason, time.perf_counter() - t0
        except BaseException:
            _kill_group(proc)
            raise
    wall = time.perf_counter() - t0
    if (directory / RESULT).is_file():
        return True, "", wall
    status = directory / STATUS
    if status.is_file():
        data = json.loads(status.read_text())
        if data.get("status") == "failed":
            return False, data.get("reason", "unknown"), wall
    if code < 0:
        reason = f"worker killed by signal {signal.Signals(-code).name}"
    else:
        tail = (directory / "worker.log").read_text(errors="replace").strip().splitlines()[-1:]
        reason = f"worker exited with code {code}" + (f": {tail[0]}" if tail else "")
    _write_status(directory, {"status": "failed", "reason": reason})
    return False, reason, wall


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _write_status(directory: Path, data: dict[str, Any]) -> None:
    from ..io import atomic_write_text

    atomic_write_text(directory / STATUS, json.dumps(data) + "\n")


def _write_extxyz(path: Path, frames: "Sequence[Atoms]") -> Path:
    """Atomic extxyz write by THIS rank. ASE's own write/read are 'parallel' by default: under
    mpiexec only rank 0 writes and reads are broadcast, which would leave other ranks' frame
    inputs empty and mismatch our own collective calls."""
    from ase.io import write

    from ..io import atomic_path

    with atomic_path(path) as tmp:
        write(tmp, list(frames), format="extxyz", parallel=False)
    return path


def _prepare_frame(directory: Path, atoms: "Atoms", index: int, fp: str, config: LabelConfig) -> None:
    from ..io import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    frame = atoms.copy()
    frame.calc = None
    frame.info["label_index"] = index
    _write_extxyz(directory / INPUT, [frame])
    atomic_write_text(directory / TASK, json.dumps({
        "index": index, "fingerprint": fp, "calculator": config.calculator,
        "config": config.code_config().to_dict(),
    }, indent=1) + "\n")


def _manifest(config: LabelConfig, fingerprints: Sequence[str]) -> dict[str, Any]:
    return {"frames": str(Path(config.frames).resolve()), "n_frames": len(fingerprints),
            "calculator": config.calculator, "config": config.code_config().to_dict(),
            "fingerprints": list(fingerprints)}


def _check_manifest(workdir: Path, manifest: dict[str, Any]) -> None:
    from ..io import atomic_write_text

    path = workdir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        for key, what in (("fingerprints", "frames"), ("calculator", "calculator"),
                          ("config", "calculator settings")):
            if old.get(key) != manifest[key]:
                raise StateError(
                    f"{workdir} belongs to a labelling run with different {what}; labels made "
                    "with different inputs must not be mixed. Use a new --workdir or delete it"
                )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


@locks_output("label", lambda config: config.workdir_path(), comm=lambda config: mpi_world())
def label_frames(config: LabelConfig) -> LabelReport:
    """Label every frame of ``config.frames``; resume from ``config.workdir`` if it exists.

    Bad input (missing/malformed file, element or spin the code cannot do, missing program)
    raises InputError before any frame runs. A frame that fails is recorded in its directory
    and in ``failed.json`` and skipped; the others go on. Only rank 0 writes the output file.
    """
    from ..io import read_frames
    from ..summary import RunSummary
    from .calculators import preflight

    config.validate()
    comm = _Comm()
    summary = RunSummary("label", config)
    frames = read_frames(config.frames, format=config.format)
    preflight(config.calculator, config.code_config(), frames, str(config.frames))
    fps = [fingerprint(a) for a in frames]
    workdir = config.workdir_path().resolve()
    _agree(comm, lambda: _check_manifest(workdir, _manifest(config, fps)))

    mine = list(range(comm.rank, len(frames), comm.size))
    reused: list[int] = []
    failed_before: dict[int, str] = {}
    pending: list[int] = []
    for i in mine:
        state, reason = _frame_state(frame_dir(workdir, i), fps[i])
        if state == "done":
            reused.append(i)
        elif state == "failed" and not config.retry_failed:
            failed_before[i] = reason
        else:
            pending.append(i)

    local_ranks = int(os.environ.get("MPI_LOCALNRANKS", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", comm.size)))
    threads = config.threads_per_frame or max(1, _cpu_count() // max(1, config.processes * local_ranks))
    env = _worker_env(threads, comm.rank)
    for i in pending:
        _prepare_frame(frame_dir(workdir, i), frames[i], i, fps[i], config)

    labelled: list[int] = []
    failed_now: dict[int, str] = {}
    walls: dict[int, float] = {}
    with summary.timed("label"):
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=f"label {config.calculator}", unit="frame",
                   disable=comm.rank != 0 or not pending, dynamic_ncols=True)

        def one(i: int) -> tuple[int, bool, str, float]:
            ok, reason, wall = _run_worker(frame_dir(workdir, i), env=env, timeout_s=config.timeout_s)
            return i, ok, reason, wall

        with ThreadPoolExecutor(max_workers=config.processes) as pool:
            for i, ok, reason, wall in pool.map(one, pending):
                walls[i] = wall
                if ok:
                    labelled.append(i)
                else:
                    failed_now[i] = reason
                    bar.write(f"frame {i} failed: {reason}")
                bar.update(1)
        bar.close()

    parts = comm.gather({"labelled": labelled, "reused": reused,
                         "failed": {**failed_before, **failed_now}, "walls": walls})

    def finish() -> dict[str, Any]:
        all_labelled = sorted(i for p in parts for i in p["labelled"])
        all_reused = sorted(i for p in parts for i in p["reused"])
        all_failed = {i: r for p in parts for i, r in p["failed"].items()}
        all_walls = {i: w for p in parts for i, w in p["walls"].items()}
        output = _collect(config, workdir, sorted(all_labelled + all_reused))
        from ..io import atomic_write_text

        atomic_write_text(workdir / FAILED, json.dumps(
            {str(i): all_failed[i] for i in sorted(all_failed)}, indent=1) + "\n")
        report = LabelReport(output=output, workdir=workdir, n_frames=len(frames),
                             labelled=all_labelled, reused=all_reused,
                             failed=dict(sorted(all_failed.items())))
        summary.results.update({**report.to_dict(), "ranks": comm.size, "processes": config.processes,
                                "threads_per_frame": threads,
                                "frame_wall_s": {str(i): round(w, 3) for i, w in sorted(all_walls.items())}})
        summary_path = (output or workdir / "labelled").with_name(
            (output or workdir / "labelled").name + ".summary.json")
        report.summary = summary.write(summary_path, status="finished" if report.complete else "partial")
        return report.to_dict()

    return LabelReport.from_dict(_agree(comm, finish))


def _collect(config: LabelConfig, workdir: Path, done: Sequence[int]) -> Path | None:
    """Write the labelled frames (in input order) to the output file; None if there are none."""
    from ..io import read_frames

    if not done:
        return None
    out = [read_frames(frame_dir(workdir, i) / RESULT, format="extxyz")[0] for i in done]
    for atoms in out:
        atoms.calc = None
    return _write_extxyz(config.output_path(), out)


def attempts(workdir: str | Path, index: int) -> int:
    """How many times a worker started on this frame (for audits and tests)."""
    path = frame_dir(Path(workdir), index) / ATTEMPTS
    return len(path.read_text().splitlines()) if path.is_file() else 0


def validate_frames_for(config: LabelConfig) -> "list[Atoms]":
    """Read FRAMES and run every pre-flight check; raises InputError, runs nothing."""
    from ..io import read_frames
    from .calculators import preflight

    config.validate()
    frames = read_frames(config.frames, format=config.format)
    if not frames:
        raise InputError(f"{config.frames} holds no frames")
    preflight(config.calculator, config.code_config(), frames, str(config.frames))
    return frames
