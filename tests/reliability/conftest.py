"""Fixtures of the reliability tests: where the fault-injection tallies go."""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_trials import tally_path


@pytest.fixture(scope="session")
def fault_tally_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSON the kill trials write their tallies to (scripts/fault_injection_table.py reads it)."""
    return tally_path(tmp_path_factory.getbasetemp())
