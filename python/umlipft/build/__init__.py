"""Start structures: ``build_system(BuildConfig(...)) -> Atoms`` (``umlipft build``)."""

from __future__ import annotations

from .core import (
    BuildConfig,
    build_system,
    min_intermolecular_distance,
    run_build,
    species_counts,
    write_structure,
)

__all__ = ["BuildConfig", "build_system", "min_intermolecular_distance", "run_build",
           "species_counts", "write_structure"]
