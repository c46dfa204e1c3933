"""Frame extraction: ``extract_frames(ExtractConfig(...)) -> list[Atoms]`` (``umlipft extract``)."""

from __future__ import annotations

from .core import (
    ExtractConfig,
    extract_frames,
    farthest_point_order,
    frame_times_ps,
    parse_time_ns,
    run_extract,
    select_window,
    soap_descriptors,
)

__all__ = ["ExtractConfig", "extract_frames", "farthest_point_order", "frame_times_ps",
           "parse_time_ns", "run_extract", "select_window", "soap_descriptors"]
