"""``umlipft report``: one HTML page with every figure and run summary of a run directory."""

from __future__ import annotations

from .html import build_report

__all__ = ["build_report"]
