"""Evaluation of models against labelled frames: errors, cross-evaluation, self-consistent residual."""

from .driver import (EvaluateConfig, EvaluationReport, EvaluationResult, SelfConsistentReport,
                     cross_evaluate, evaluate, evaluate_model, self_consistent_residual)
from .metrics import ErrorSummary, FrameError

__all__ = [
    "ErrorSummary",
    "EvaluateConfig",
    "EvaluationReport",
    "EvaluationResult",
    "FrameError",
    "SelfConsistentReport",
    "cross_evaluate",
    "evaluate",
    "evaluate_model",
    "self_consistent_residual",
]
