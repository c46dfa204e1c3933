"""The state of a workflow directory: which stages finished, with which inputs, with what result.

``state.json`` maps every stage (``periodic/seg-01/label``, ...) to the fingerprint of its
inputs (its settings and the fingerprints of the stages it reads), its status and its result.
A stage runs in its own folder ``DIR/<stage>``; the libraries it calls resume their own partial
work there (LAMMPS restart files, per-frame label directories). So a rerun after ``kill -9``:

- skips every finished stage whose inputs are unchanged (no relabelling, no retraining);
- refuses, naming the stage and the changed settings, when the inputs of a finished stage
  changed, unless ``--from STAGE`` asks to redo that stage and everything after it;
- resumes an unfinished stage with unchanged inputs, and starts an unfinished stage whose
  inputs changed afresh (its folder holds work for other inputs);
- refuses to reuse a finished stage whose outputs changed since it finished (a file its result
  names with a content hash was edited, truncated or removed), naming the file and ``--from``.

Several processes may share one directory (the Slurm jobs of parallel branches): every save
merges, under a file lock, the stages this process changed into the file as it is now. With
``only``, a process runs no unfinished stage outside the given groups: it raises
:class:`Deferred` there, which the strategies' independent loops (naive trajectories and
fine-tunes, the models' tests) skip and which otherwise stops the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import threading
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import StateError
from ..io import atomic_write_text

STATE_FILE = "state.json"
JOURNAL_FILE = "journal.jsonl"
FORMAT_VERSION = 1


def fingerprint(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


# Result keys naming one output file whose content hash the stage records under "sha256".
_PATH_KEYS = ("labelled", "frames", "model", "lammps_model", "structure", "file")
# Result keys naming a list of files, with the key holding their hashes in the same order.
_LIST_KEYS = {"trajectories": "trajectory_sha256", "subsets": "sha256"}


def recorded_outputs(result: Mapping[str, Any]) -> dict[str, str]:
    """``{path relative to the workflow directory: sha256}`` of the files a stage's result names
    with a recorded hash: its ``outputs`` map, a single path with ``sha256`` (label, extract,
    fine-tune, export, start, isolated atoms) and path lists with their hash lists (MD
    trajectories, naive subsets)."""
    outputs: dict[str, str] = {}
    explicit = result.get("outputs")
    if isinstance(explicit, Mapping):
        outputs.update({str(k): str(v) for k, v in explicit.items()})
    digest = result.get("sha256")
    if isinstance(digest, str):
        paths = [result[k] for k in _PATH_KEYS if isinstance(result.get(k), str)]
        if len(paths) == 1:  # more than one path: the hash's file is ambiguous, recorded via outputs
            outputs.setdefault(paths[0], digest)
    for paths_key, hashes_key in _LIST_KEYS.items():
        paths, hashes = result.get(paths_key), result.get(hashes_key)
        if isinstance(paths, list) and isinstance(hashes, list) and len(paths) == len(hashes):
            for path, h in zip(paths, hashes):
                if isinstance(path, str) and isinstance(h, str):
                    outputs.setdefault(path, h)
    return outputs


# (resolved path) -> (size, mtime_ns, sha256): every reuse of a finished stage checks its
# outputs, and the trajectories of a long run are hundreds of MB, so a file is hashed once per
# process unless its size or modification time changed.
_HASH_CACHE: dict[str, tuple[int, int, str]] = {}
_HASH_LOCK = threading.Lock()


def _cached_sha256(path: Path, stat: os.stat_result) -> str:
    from ..io import sha256_file

    key = str(path)
    with _HASH_LOCK:
        hit = _HASH_CACHE.get(key)
    if hit is not None and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
        return hit[2]
    digest = sha256_file(path)
    with _HASH_LOCK:
        _HASH_CACHE[key] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


def _remember_sha256(path: Path, digest: str) -> None:
    """Seed the cache with the hash a stage just computed of the file it wrote."""
    try:
        stat = path.stat()
    except OSError:
        return
    with _HASH_LOCK:
        _HASH_CACHE[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)


class WorkflowState:
    """Stages of one workflow directory, persisted atomically after every change."""

    def __init__(self, root: str | Path, *, from_stage: str | None = None, until: str | None = None,
                 log: Callable[[str], None] | None = None, only: Sequence[str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / STATE_FILE
        self.log = log or (lambda message: None)
        self.until = until
        self.reached_until = False
        self.only = tuple(only) if only else None
        self._touched: set[str] = set()  # stages this process wrote or removed (merged on save)
        # Independent stages may run in threads (``parallel_stages``): one lock guards the state,
        # one per stage makes a second thread wait for a shared stage (export/U) instead of
        # running it twice.
        self._lock = threading.RLock()
        self._stage_locks: dict[str, threading.Lock] = {}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("format_version") != FORMAT_VERSION:
                raise StateError(f"{self.path} was written by another version of umlipft workflows")
        else:
            self.data = {"format_version": FORMAT_VERSION, "stages": {}, "order": []}
        if from_stage:
            self.reset_from(from_stage)

    # ----------------------------------------------------------------------------------------
    def save(self) -> None:
        with self._lock, open(self.root / (STATE_FILE + ".lock"), "a") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)  # POSIX lock: also across nodes on NFS
            if self.path.is_file():
                self.data = self._merged(json.loads(self.path.read_text()))
            atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")

    def _merged(self, disk: dict[str, Any]) -> dict[str, Any]:
        """The file's stages with this process's changes on top (other jobs' results kept)."""
        stages = dict(disk.get("stages", {}))
        for name in self._touched:
            if name in self.data["stages"]:
                stages[name] = self.data["stages"][name]
            else:
                stages.pop(name, None)
        order = [n for n in disk.get("order", []) if n in stages]
        order += [n for n in self.data["order"] if n in stages and n not in order]
        return {**disk, **{k: v for k, v in self.data.items() if k not in ("stages", "order")},
                "stages": stages, "order": order}

    def journal(self, event: str, **fields: Any) -> None:
        """Append one line to ``journal.jsonl``: what ran (used to count labeller/trainer calls)."""
        line = json.dumps({"time": time.time(), "event": event, **fields}, default=str)
        with self._lock, open(self.root / JOURNAL_FILE, "a") as handle:
            handle.write(line + "\n")
            handle.flush()

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        entry = self.data["stages"].get(name)
        return bool(entry and entry.get("status") == "done")

    def result(self, name: str) -> dict[str, Any]:
        entry = self.data["stages"].get(name)
        if not entry or entry.get("status") != "done":
            raise StateError(f"stage {name} has not finished")
        self.verify_outputs(name, entry)
        return entry["result"]

    def verify_outputs(self, name: str, entry: Mapping[str, Any]) -> None:
        """Refuse a finished stage whose recorded output files are not what it recorded."""
        recorded = entry.get("outputs")
        if not isinstance(recorded, Mapping):  # state written before outputs were recorded
            recorded = {p: {"sha256": h} for p, h in recorded_outputs(entry.get("result") or {}).items()}
        for rel_path, record in recorded.items():
            path = self.root / rel_path
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise StateError(self._output_message(name, path, "is missing")) from None
            size = record.get("bytes")
            if size is not None and stat.st_size != size:
                raise StateError(self._output_message(
                    name, path, f"changed size: {stat.st_size} bytes, {size} when the stage finished"))
            digest = _cached_sha256(path, stat)
            if digest != record["sha256"]:
                raise StateError(self._output_message(
                    name, path, f"changed content: sha256 {digest[:12]}..., {record['sha256'][:12]}... "
                    f"when the stage finished"))

    def _output_message(self, name: str, path: Path, what: str) -> str:
        return (f"stage {name} finished, but its output {path} {what}; the stages after it may not "
                f"use it as it is. Restore the file, or redo the stage and everything after it with "
                f"`umlipft workflow ... -o {self.root} --from {name}`")

    def _record_outputs(self, result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        outputs: dict[str, dict[str, Any]] = {}
        for rel_path, digest in recorded_outputs(result).items():
            path = self.root / rel_path
            if not path.is_file():
                raise StateError(f"{rel_path}: a stage recorded this output but did not write it")
            _remember_sha256(path, digest)
            outputs[rel_path] = {"sha256": digest, "bytes": path.stat().st_size}
        return outputs

    def fingerprint_of(self, name: str) -> str:
        return self.data["stages"][name]["fingerprint"]

    def reset_from(self, name: str) -> None:
        order: list[str] = self.data["order"]
        matches = [s for s in order if s == name or s.startswith(name.rstrip("/") + "/")]
        if not matches:
            known = ", ".join(order) or "none yet"
            raise StateError(f"--from {name}: no such stage in {self.path} (stages: {known})")
        first = order.index(matches[0])
        for stage in order[first:]:
            self.data["stages"].pop(stage, None)
            self._touched.add(stage)
            folder = self.stage_dir(stage)
            if folder.is_dir():
                shutil.rmtree(folder)
        self.data["order"] = order[:first]
        self.save()
        self.journal("reset", stage=name, removed=order[first:])
        self.log(f"--from {name}: removed {len(order) - first} stage(s), they run again")

    # ----------------------------------------------------------------------------------------
    def run(self, name: str, inputs: Mapping[str, Any], func: Callable[[Path], dict[str, Any]],
            deps: Sequence[str] = ()) -> dict[str, Any]:
        """Run stage ``name`` (or return its stored result); ``inputs`` are its settings."""
        with self._lock:
            stage_lock = self._stage_locks.setdefault(name, threading.Lock())
        with stage_lock:
            return self._run(name, inputs, func, deps)

    def _run(self, name: str, inputs: Mapping[str, Any], func: Callable[[Path], dict[str, Any]],
             deps: Sequence[str]) -> dict[str, Any]:
        if self.reached_until and not self._within_until(name):
            raise _Stop()
        if self.only is not None and not self.done(name) and not self._owned(name):
            raise Deferred(name)
        full = {"inputs": dict(inputs), "deps": {d: self.fingerprint_of(d) for d in deps}}
        fp = fingerprint(full)
        entry = self.data["stages"].get(name)
        folder = self.stage_dir(name)
        if entry is not None and entry.get("fingerprint") != fp:
            if entry.get("status") == "done":
                raise StateError(self._changed_message(name, entry, full))
            self.log(f"{name}: inputs changed since the interrupted attempt; starting it afresh")
            if folder.is_dir():
                shutil.rmtree(folder)
            entry = None
        if entry is not None and entry.get("status") == "done":
            self.verify_outputs(name, entry)
            if self._within_until(name):
                self.reached_until = True
            return entry["result"]
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.data["stages"][name] = {"fingerprint": fp, "inputs": full, "status": "running",
                                         "attempts": (entry or {}).get("attempts", 0) + 1}
            if name not in self.data["order"]:
                self.data["order"].append(name)
            self._touched.add(name)
            self.save()
        self.log(f"{name}: running" + (" (resuming)" if entry else ""))
        t0 = time.perf_counter()
        result = func(folder)
        wall = time.perf_counter() - t0
        outputs = self._record_outputs(result)
        with self._lock:
            self.data["stages"][name].update({"status": "done", "result": result, "outputs": outputs,
                                              "wall_s": round(wall, 3)})
            self.save()
        self.journal("stage_done", stage=name, wall_s=wall)
        if self._within_until(name):
            self.reached_until = True
        return result

    def _owned(self, name: str) -> bool:
        return any(name == group or name.startswith(group.rstrip("/") + "/") for group in self.only or ())

    def _within_until(self, name: str) -> bool:
        """Whether ``name`` is the ``--until`` stage or inside that group (``start`` covers ``start/03``)."""
        return bool(self.until) and (name == self.until or name.startswith(str(self.until).rstrip("/") + "/"))

    def _changed_message(self, name: str, entry: Mapping[str, Any], full: Mapping[str, Any]) -> str:
        old = _flatten(entry.get("inputs", {}))
        new = _flatten(full)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = ", ".join(c.removeprefix("inputs.") for c in changed[:8]) or "inputs"
        return (f"stage {name} finished with other settings (changed: {detail}). Rerun with the "
                f"original configuration to go on, or redo it and everything after it with "
                f"--from {name} (or choose a new workflow directory)")


class _Stop(Exception):
    """Raised to stop after the stage named by ``--until``."""


class Deferred(_Stop):
    """Raised at an unfinished stage outside ``only``: another batch job runs it."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage
