"""One run per output: every restartable driver holds a lock on its output while it works.

Two identical commands on one output directory would otherwise both run and redo (and
overwrite) each other's work. The lock is ``fcntl.flock`` on a file inside the output
directory (``DIR/.umlipft.lock``; for a single output file ``.NAME.umlipft.lock`` beside it),
so the kernel releases it when the process dies, ``kill -9`` included: a lock is never stale.
The holder writes its PID, host and command into the file so that a refused run can say who
holds it, and removes the file when it is done.

Locks are per process: a driver called from inside another one (the workflow runs md, label,
finetune ... in its own process, stages in threads) takes a lock its process already holds
without waiting on itself, which a second ``flock`` on the same file would do. Under MPI the
ranks of one command share the directory: only rank 0 locks, and its outcome is shared.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .errors import InputError, StateError

DIRECTORY_LOCK_NAME = ".umlipft.lock"
# Launchers set these in every rank they start (MPICH/Hydra, PMIx, Open MPI).
_MPI_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")

F = TypeVar("F", bound=Callable[..., Any])


class OutputLockedError(StateError):
    """Another process holds the output; the command exits with status 2."""

    exit_code = 2

    def __init__(self, message: str, *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet  # MPI ranks other than 0: rank 0 already says it

    def __reduce__(self):  # keep ``quiet`` across pickling (process pools, MPI)
        return (_rebuild_locked, (str(self), self.quiet))


def _rebuild_locked(message: str, quiet: bool) -> "OutputLockedError":
    return OutputLockedError(message, quiet=quiet)


@dataclass
class _Held:
    fd: int
    shared: bool
    count: int = 1
    created: list[Path] = field(default_factory=list)  # directories made for the lock, deepest first


_held: dict[Path, _Held] = {}
_registry = threading.Lock()


def lock_file_for(path: str | Path, *, file: bool = False) -> Path:
    """The lock file of an output directory, or of one output file (``file=True``)."""
    path = Path(path)
    return path.parent / f".{path.name}.umlipft.lock" if file else path / DIRECTORY_LOCK_NAME


def holders(path: str | Path, *, file: bool = False) -> list[dict[str, Any]]:
    """What the lock file of ``path`` says about its holders (pid, host, command, since)."""
    return _entries(lock_file_for(path, file=file))


def _entries(lock_path: Path) -> list[dict[str, Any]]:
    try:
        text = lock_path.read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "pid" in entry:
            found.append(entry)
    return found


@contextlib.contextmanager
def output_lock(path: str | Path, command: str, *, file: bool = False, shared: bool = False,
                comm: Any = None) -> Iterator[Path]:
    """Hold the lock of output directory ``path`` (or of output file ``path`` with ``file=True``).

    Raises OutputLockedError naming the directory and the holder's PID if another process holds
    it, InputError if the directory cannot be created or written. ``shared``: several processes
    may hold it at once, but none of them together with an exclusive holder. ``comm``: an mpi4py
    communicator whose ranks all work in ``path``; only its rank 0 takes the lock. Directories
    made only for the lock are removed again if the run leaves them empty (a refused input
    leaves nothing behind).
    """
    target = Path(path).absolute()
    directory = target.parent if file else target
    if comm is not None and comm.Get_size() > 1:
        with _rank_zero_lock(target, directory, command, file, shared, comm):
            yield directory
        return
    key = _acquire(target, directory, command, file, shared)
    try:
        yield directory
    finally:
        _release(key)


def locks_output(command: str, where: Callable[..., str | Path | None], *, file: bool = False,
                 comm: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Decorator for a driver entry point: hold ``where(*args, **kwargs)`` locked during the call
    (no lock when it returns None); ``comm(*args, **kwargs)`` gives the MPI communicator, if any."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            target = where(*args, **kwargs)
            if target is None:
                return func(*args, **kwargs)
            with output_lock(target, command, file=file, comm=comm(*args, **kwargs) if comm else None):
                return func(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def workflow_lock(directory: str | Path, only: Sequence[str] | None = None) -> Iterator[Path]:
    """A workflow directory: the whole of it for a run of every stage. The batch jobs of parallel
    branches (``only``: the stage groups a job runs) share the directory with each other, each
    holding its own groups' folders, so that a resubmitted job waits for nobody but cannot run
    beside itself."""
    if not only:
        with output_lock(directory, "workflow") as held:
            yield held
        return
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(output_lock(directory, "workflow --only", shared=True))
        for group in sorted(set(only)):
            stack.enter_context(output_lock(Path(directory) / group, f"workflow --only {group}"))
        yield held


def locks_workflow(func: F) -> F:
    """Decorator for ``run_workflow(strategies, config, directory, *, only=None, ...)``."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def locked(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        with workflow_lock(bound.arguments["directory"], bound.arguments.get("only")):
            return func(*args, **kwargs)

    return locked  # type: ignore[return-value]


def mpi_world() -> Any:
    """``MPI.COMM_WORLD`` when this process is one of several MPI ranks, else None."""
    if not any(k in os.environ for k in _MPI_RANK_VARIABLES):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rank_zero_lock(target: Path, directory: Path, command: str, file: bool, shared: bool,
                    comm: Any) -> Iterator[None]:
    key = None
    failure: Exception | None = None
    outcome: tuple[str, str] = ("ok", "")
    if comm.Get_rank() == 0:
        try:
            key = _acquire(target, directory, command, file, shared)
        except Exception as err:  # every rank must learn of it, or the others wait forever
            failure = err
            outcome = ("locked" if isinstance(err, OutputLockedError) else "other", str(err))
    kind, message = comm.bcast(outcome, root=0)
    if failure is not None:
        raise failure
    if kind == "locked":
        raise OutputLockedError(message, quiet=True)
    if kind == "other":
        raise InputError(f"rank 0 could not lock {directory}: {message}")
    try:
        yield
    finally:
        if key is not None:
            _release(key)


def _acquire(target: Path, directory: Path, command: str, file: bool, shared: bool) -> Path:
    created = _make_directories(directory)
    lock_path = lock_file_for(target, file=file)
    key = Path(os.path.realpath(lock_path))
    with _registry:
        held = _held.get(key)
        if held is not None:  # this process holds it already (a driver inside the workflow)
            held.count += 1
            # A thread that made the directory can lose the race for the lock to one that found
            # it made: the holder must still remove it at the end.
            held.created = sorted(set(held.created) | set(created), key=lambda d: len(d.parts), reverse=True)
            return key
        try:
            fd = _lock_fd(lock_path, directory, command, shared, created)
        except Exception:
            _remove_empty(created)
            raise
        _held[key] = _Held(fd=fd, shared=shared, created=created)
    return key


def _release(key: Path) -> None:
    with _registry:
        held = _held[key]
        held.count -= 1
        if held.count:
            return
        del _held[key]
        try:
            # Only the last holder removes the file (a shared holder finds out by taking it
            # exclusively), and while still holding it: a process that opened the file meanwhile
            # finds it gone once it gets the lock, and starts over on a new one (see _lock_fd).
            if held.shared:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(key)
        except OSError:
            return
        finally:
            os.close(held.fd)
        _remove_empty(held.created)


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories made for a lock (deepest first) that the run left empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


def _lock_fd(lock_path: Path, directory: Path, command: str, shared: bool, created: list[Path]) -> int:
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the directory was removed by a holder that just finished
            created[:] = _make_directories(directory) + created
            continue
        except OSError as err:
            raise InputError(
                f"cannot write in the output directory {directory}: {err.strerror}; choose an "
                "output location you can write to"
            ) from err
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise InputError(f"cannot lock {lock_path}: {err.strerror}") from err
            raise OutputLockedError(_locked_message(lock_path, directory)) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # locked a file its holder removed on release: take the current one
            os.close(fd)
            continue
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        if shared:  # one line per holder
            os.lseek(fd, 0, os.SEEK_END)
        else:
            os.ftruncate(fd, 0)
        os.write(fd, line.encode())
        return fd
    raise InputError(f"cannot take the lock {lock_path}: it keeps being replaced; is it on a shared "
                     "file system without locking?")


def _locked_message(lock_path: Path, directory: Path) -> str:
    entries: list[dict[str, Any]] = []
    for _ in range(20):  # the holder writes its PID right after locking
        entries = _entries(lock_path)
        if entries:
            break
        time.sleep(0.05)
    here = socket.gethostname()
    alive = [e for e in entries if e.get("host") != here or _alive(e["pid"])] or entries
    if alive:
        entry = alive[-1]
        pids = ", ".join(str(e["pid"]) for e in alive)
        who = f"umlipft {entry.get('command', '?')} (PID {pids}"
        who += f" on {entry['host']}" if entry.get("host") and entry["host"] != here else ""
        who += f", since {entry['since']})" if entry.get("since") else ")"
    else:
        who = "another umlipft process (PID unknown)"
    return (f"{directory} is in use by {who}; two runs in one output would redo and overwrite each "
            "other's work. Wait for that run to finish (or stop it), or choose another output for this one")


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def _make_directories(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those this call created, deepest first.

    Each level is made with its own mkdir, so "created" means this call made it: a thread that
    saw the directory, lost it to a finishing holder's cleanup and then recreated it must know
    it did, or the directory outlives the run."""
    chain: list[Path] = []
    probe = directory
    while not probe.is_dir() and probe != probe.parent:
        chain.append(probe)
        probe = probe.parent
    created: list[Path] = []
    for level in reversed(chain):
        try:
            os.mkdir(level)
        except FileExistsError as err:
            if level.is_dir():
                continue
            raise InputError(f"cannot create the output directory {directory}: {level} is a file, not a "
                             "directory; choose another output location") from err
        except OSError as err:
            raise InputError(f"cannot create the output directory {directory}: {err.strerror}; choose an "
                             "output location you can write to") from err
        created.append(level)
    return created[::-1]
