"""``umlipft report``: one HTML page with every figure and run summary of a run directory; a
workflow's report folder (``report-<strategies>``, with its ``report.json``) gets the study's layout."""

from __future__ import annotations

from .html import build_report
from .workflow import build_workflow_report

__all__ = ["build_report", "build_workflow_report"]
