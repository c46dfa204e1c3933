"""Descriptor-space and chemistry analyses of the uMLIP-bias study.

Public API (imported lazily so that ``import umlipft.analysis`` stays cheap):

- descriptors: :class:`SoapDescriptor`, :class:`MaceDescriptor`, :func:`make_descriptor`,
  :func:`descriptor_from_settings`, :func:`species_of`
- PCA and statistics: :class:`DescriptorPCA` (fit / evaluate / limits / save / load),
  :class:`PCAConfig`, :func:`fit_pca_files`, :func:`compute_features`,
  :func:`jackson_mudholkar_limit`, :func:`hotelling_t2_limit`, :func:`empirical_band`
- trajectories in bounded memory: :func:`analyze_trajectory`, :class:`QConfig`, :func:`iter_frames`,
  :func:`select_tracked_atoms`, :func:`own_band` (the study's band: a tracked atom's own Q(t) mean ± kσ)
- frame identity: :func:`frame_fingerprint`, :func:`new_frames`
- coverage: ``umlipft.analysis.coverage.coverage``, :func:`coverage_by_element`
- chemistry: :func:`bond_length_distributions`, :func:`coordination_series`, :func:`detect_events`,
  :class:`EventsConfig`, :class:`PairRule`
- figures: ``umlipft.analysis.plots`` (``plot_*`` return ``(figure, data)``; :func:`save_figure`)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SoapDescriptor": "descriptors", "MaceDescriptor": "descriptors", "SoapSettings": "descriptors",
    "MaceSettings": "descriptors", "make_descriptor": "descriptors",
    "descriptor_from_settings": "descriptors", "species_of": "descriptors",
    "DescriptorPCA": "pca", "PCAConfig": "pca", "fit_pca_files": "pca", "compute_features": "pca",
    "jackson_mudholkar_limit": "stats", "hotelling_t2_limit": "stats", "empirical_band": "stats",
    "analyze_trajectory": "monitor", "QConfig": "monitor", "iter_frames": "frames",
    "select_tracked_atoms": "monitor", "own_band": "monitor", "frame_fingerprint": "frames",
    "new_frames": "frames",
    "coverage_by_element": "coverage",
    "bond_length_distributions": "geometry", "coordination_series": "geometry",
    "detect_events": "geometry", "EventsConfig": "geometry", "PairRule": "geometry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
