"""``kill -9`` trials: the real command in its own process group, SIGKILLed as a whole at a
seeded random moment, rerun and killed again, ..., then run to completion (a chain).

A moment is drawn on the timeline of an uninterrupted run of the same command (the reference),
stratified so that the trials of a chain cover the whole run: trial k of n falls in the k-th n-th
of it, up to the command's last journal event (its own "finished" record). It is replayed as
"once the journal shows the progress the reference had reached just before that moment, wait
the rest": for a command that resumes (md, label, workflow) the chain moves on through the run
while every kill lands at a random point of the work (mid-step, mid-frame, mid-stage, while
writing); for one that starts over (a killed fine-tune is trained again from epoch 1) the
progress is that of the attempt itself. An attempt that ends before its moment (faster than
the reference) ends its chain, which is checked, and the trial is drawn again in a new directory.

After each kill the process tree taken just before it (the group, and children in sessions of
their own such as label workers) must be gone within a few seconds, and so must every process
whose command line or working directory is inside the run's directory: an orphan that keeps
writing behind a rerun's back is a failure of the trial.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

POLL_S = 0.02
ORPHAN_GRACE_S = 10.0


# ------------------------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a live process; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> dict[int, tuple[int, str]]:
    """``{pid: (start time, command line)}`` of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)], starts[int(entry.name)] = stat[0], stat[2]
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in starts and pid not in tree:
            tree[pid] = (starts[pid], _cmdline(pid))
            frontier += [child for child, parent in parents.items() if parent == pid]
    return tree


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[1] != "Z"


def processes_in(directory: Path) -> dict[int, str]:
    """Live processes (not this one) whose command line names ``directory`` or whose working
    directory is inside it."""
    found = {}
    inside = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[1] == "Z":
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        command = _cmdline(pid)
        if inside in command or cwd == inside or cwd.startswith(inside + "/"):
            found[pid] = command
    return found


def kill_group(process: subprocess.Popen, directory: Path) -> list[str]:
    """SIGKILL the process group of ``process`` (started with ``start_new_session``); the
    processes of its tree, or working in ``directory``, still alive after the grace time."""
    tree = process_tree(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while True:
        left = {pid: cmd for pid, (start, cmd) in tree.items() if _alive(pid, start)}
        left.update(processes_in(directory))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in left:  # leave nothing running into the next trial, but report it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"{pid}: {cmd[:200]}" for pid, cmd in sorted(left.items())]


# ------------------------------------------------------------------------------------ timelines
@dataclasses.dataclass
class Reference:
    """An uninterrupted run: its wall time and when its journal showed each progress value."""

    returncode: int
    seconds: float
    events: list[tuple[float, float]]  # (seconds since start, progress), progress increasing
    stderr: str


def start(command: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    handle = open(log, "ab")
    try:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: killpg reaches all of it
    finally:
        handle.close()


def run_reference(command: list[str], progress: Callable[[], float], log: Path, *,
                  env: dict[str, str] | None = None, timeout_s: float = 1200) -> Reference:
    """Run ``command`` to completion, recording when ``progress()`` increased."""
    t0 = time.monotonic()
    process = start(command, log, env)
    events: list[tuple[float, float]] = [(0.0, progress())]
    try:
        while process.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"the reference run did not finish in {timeout_s} s")
            value = progress()
            if value > events[-1][1]:
                events.append((time.monotonic() - t0, value))
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.monotonic() - t0
    value = progress()
    if value > events[-1][1]:
        events.append((seconds, value))
    return Reference(process.returncode, seconds, events, log.read_text(errors="replace"))


@dataclasses.dataclass(frozen=True)
class Moment:
    trial: int
    reference_s: float  # where on the reference run's timeline the kill is aimed
    after_progress: float  # wait until the journal shows this much progress ...
    delay_s: float  # ... then this long


def draw_moments(reference: Reference, trials: int, seed: int, *, resumes: bool = True) -> list[Moment]:
    """One seeded moment per trial, trial k within the k-th ``trials``-th of the reference run up
    to its last journal event (the progress functions end with the command's own "finished"
    record, so that the moments cover its last writes and still come before it ends). With
    ``resumes=False`` a moment is a plain delay from the start of the attempt."""
    rng = random.Random(seed)
    moments = []
    for k in range(trials):
        moments.append(_moment(reference, k, trials, rng, resumes))
    return moments


def redraw(reference: Reference, moment: Moment, trials: int, rng: random.Random, *, resumes: bool = True) -> Moment:
    """Another moment in the same part of the run, for an attempt that ended before ``moment``
    came (a run faster than the reference)."""
    return _moment(reference, moment.trial, trials, rng, resumes)


def _moment(reference: Reference, k: int, trials: int, rng: random.Random, resumes: bool) -> Moment:
    span = reference.events[-1][0] if len(reference.events) > 1 else reference.seconds
    t = rng.uniform(k / trials, (k + 1) / trials) * span
    if not resumes:
        return Moment(k, t, 0.0, t)
    at, value = max((e for e in reference.events if e[0] <= t), key=lambda e: e[0])
    return Moment(k, t, value, t - at)


@dataclasses.dataclass
class Attempt:
    moment: Moment
    directory: str
    killed: bool  # False: the command ended before the moment came
    returncode: int | None
    seconds: float  # from the start of this attempt to the kill (or its end)
    progress_at_kill: float | None
    orphans: list[str]
    snapshot: Any = None  # what the stage's journal said right after the kill


def attempt(command: list[str], moment: Moment, progress: Callable[[], float], directory: Path, log: Path, *,
            env: dict[str, str] | None = None, snapshot: Callable[[], Any] | None = None,
            timeout_s: float = 1200) -> Attempt:
    """Start ``command`` and kill its group at ``moment`` (if it has not ended by then)."""
    t0 = time.monotonic()
    process = start(command, log, env)
    reached: float | None = None
    try:
        while True:
            now = time.monotonic()
            if process.poll() is not None:
                return Attempt(moment, str(directory), False, process.returncode, now - t0, None, [])
            if now - t0 > timeout_s:
                raise AssertionError(f"trial {moment.trial}: the moment never came in {timeout_s} s")
            if reached is None and progress() >= moment.after_progress:
                reached = now
            if reached is not None and now - reached >= moment.delay_s:
                value = progress()
                orphans = kill_group(process, directory)
                return Attempt(moment, str(directory), True, None, now - t0, value, orphans,
                               snapshot() if snapshot else None)
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def finish(command: list[str], log: Path, *, env: dict[str, str] | None = None,
           timeout_s: float = 1200) -> subprocess.CompletedProcess:
    """The rerun to completion that ends a chain."""
    with open(log, "ab") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s,
                              start_new_session=True)
    return subprocess.CompletedProcess(done.args, done.returncode, log.read_text(errors="replace"), "")


def run_chain(command: Callable[[Path], list[str]], reference: Reference, trials: int, seed: int,
              directory: Callable[[int], Path], progress: Callable[[Path], Callable[[], float]],
              snapshot: Callable[[Path], Any], close: Callable[[Path, int | None, str, list[Attempt]], None],
              log: Path, *, env: dict[str, str] | None = None, timeout_s: float = 1200) -> list[Attempt]:
    """``trials`` kills in one directory, each rerun killed again, then a rerun to completion;
    ``close(directory, exit code, console, its attempts)`` checks a chain that ended. An attempt
    that ends before its moment (faster than the reference) ends its chain: it is closed, and that
    part of the run is tried again at another moment in a new directory. ``progress(directory)``
    makes the progress function of the attempt about to start."""
    rng = random.Random(seed + 1)
    chain, out = 0, directory(0)
    attempts: list[Attempt] = []
    for moment in draw_moments(reference, trials, seed):
        for _ in range(4):
            t = attempt(command(out), moment, progress(out), out, log, env=env,
                        snapshot=lambda: snapshot(out), timeout_s=timeout_s)
            attempts.append(t)
            if t.killed:
                break
            close(out, t.returncode, log.read_text(errors="replace"), [a for a in attempts if a.directory == str(out)])
            chain += 1
            out = directory(chain)
            moment = redraw(reference, moment, trials, rng)
    done = finish(command(out), log, env=env, timeout_s=timeout_s)
    close(out, done.returncode, done.stdout, [a for a in attempts if a.directory == str(out)])
    return attempts


# ------------------------------------------------------------------------------------ tallies
@dataclasses.dataclass
class Tally:
    """One stage kind's outcome, as the README's reliability table reports it."""

    kind: str
    command: str
    seed: int
    trials: int = 0  # kills made
    survived: int = 0  # trials after which the chain ended complete, right and without repeated work
    frames_lost: int = 0  # frames, rows or labels of the reference missing from the final outputs
    silent_wrong: int = 0  # chains that ended with exit 0 and outputs unlike the reference's
    repeated_work: int = 0  # finished frames/trainings/stages done again
    orphans: int = 0  # processes left alive by a group kill
    reference_s: float = 0.0
    chain_s: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    moments: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def tally_path(default_dir: Path) -> Path:
    """``$UMLIPFT_FAULT_INJECTION_JSON`` (scripts/fault_injection_table.py sets it), else a file
    in pytest's temporary directory."""
    return Path(os.environ.get("UMLIPFT_FAULT_INJECTION_JSON") or default_dir / "fault_injection.json")


def finish_tally(tally: Tally, trials: list[Attempt], path: Path, details: Callable[[Attempt], dict] = lambda t: {},
                 *, progress_key: str = "progress", ended_early: str = "") -> list[Attempt]:
    """Count a chain's kills, orphans and time into ``tally``, list its kill moments (plus the
    stage's ``details`` of each), record it in ``path``; returns the attempts that were killed."""
    killed = [t for t in trials if t.killed]
    tally.trials, tally.chain_s = len(killed), sum(t.seconds for t in trials)
    tally.orphans = sum(len(t.orphans) for t in killed)
    tally.moments = [{"reference_s": round(t.moment.reference_s, 3), progress_key: t.progress_at_kill,
                      "attempt_s": round(t.seconds, 3), **details(t)} for t in killed]
    tally.notes.append(f"{len(trials) - len(killed)} attempt(s) ended before their moment{ended_early}")
    record(path, tally)
    return killed


def record(path: Path, tally: Tally) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[tally.kind] = dataclasses.asdict(tally)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nfault injection, {tally.kind}: {tally.trials} trials, {tally.survived} survived, "
          f"{tally.frames_lost} frames lost, {tally.silent_wrong} silent wrong results, "
          f"{tally.repeated_work} repeated, {tally.orphans} orphans (reference {tally.reference_s:.1f} s, "
          f"chain {tally.chain_s:.1f} s) -> {path}")
