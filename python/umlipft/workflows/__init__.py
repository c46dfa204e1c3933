"""Workflows: the study's data-generation strategies (periodic, naive, control, adaptive) end to
end, restartable, with the study's judgement of the models and a report (``umlipft workflow``)."""

from __future__ import annotations

from .config import (PROFILE_DEFAULTS, STRATEGIES, WorkflowConfig, load_workflow_config)
from .runner import WorkflowOutcome, counts, run_workflow

__all__ = ["PROFILE_DEFAULTS", "STRATEGIES", "WorkflowConfig", "WorkflowOutcome", "counts",
           "load_workflow_config", "run_workflow"]
