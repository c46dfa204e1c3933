"""Thermo logs of MD runs and the MD step each labelled frame came from.

The self-consistent residual compares the energy a model *itself* reported during its MD
(PotEng in the thermo output) with the DFT energy of the same snapshot, so each labelled frame
must be tied to its step. Frames written by umlipft carry ``info['step']``; the study's frames
carry only ``source=.../name.K`` where K is the dump index (one dump every ``dump_every_steps``
steps, so PotEng at step K*dump_every_steps belongs to frame K).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import InputError

if TYPE_CHECKING:
    from ase import Atoms

_SOURCE_INDEX = re.compile(r"\.(\d+)$")


def read_thermo_table(path: str | Path) -> dict[str, list[float]]:
    """Columns of a thermo table: a whitespace or CSV table (``Step Temp PotEng ...`` header then rows, as
    the study's ``run_info.txt``) or a LAMMPS log with one or more run blocks.

    Rows are matched to the header above them; anything else (LAMMPS chatter, warnings, the
    ``Loop time`` line) is skipped. A repeated step (a continued run starts where the last one
    ended) keeps its last value.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"thermo log {path} does not exist")
    columns: dict[str, list[float]] = {}
    header: list[str] | None = None
    by_step: dict[int, list[float]] = {}
    names: list[str] | None = None
    for line in path.read_text(errors="replace").splitlines():
        fields = line.replace(",", " ").split()  # whitespace or CSV tables
        if not fields:
            continue
        if fields[0] == "Step":
            header = fields
            if names is None:
                names = fields
            elif fields != names:
                raise InputError(f"{path}: thermo blocks have different columns ({names} vs {fields})")
            continue
        # Inside a block LAMMPS may print warnings; only full numeric rows are data.
        if header is None or len(fields) != len(header) or not _numeric(fields):
            continue
        values = [float(v) for v in fields]
        by_step[int(round(values[0]))] = values
    if names is None or not by_step:
        raise InputError(f"{path} holds no thermo table (a header line starting with 'Step' and numeric rows)")
    if "PotEng" not in names:
        raise InputError(f"{path}: the thermo table has no PotEng column (columns: {' '.join(names)})")
    for j, name in enumerate(names):
        columns[name] = [by_step[s][j] for s in sorted(by_step)]
    return columns


def _numeric(fields: Sequence[str]) -> bool:
    try:
        for v in fields:
            float(v)
    except ValueError:
        return False
    return True


def frame_step(atoms: "Atoms", index: int, *, step_key: str = "step", dump_every_steps: int = 1000,
               source: str = "frames") -> int:
    """The MD step a frame was taken at, from ``info[step_key]`` or the dump index in ``source``."""
    if step_key in atoms.info:
        return int(atoms.info[step_key])
    match = _SOURCE_INDEX.search(str(atoms.info.get("source", "")))
    if match:
        return int(match.group(1)) * dump_every_steps
    raise InputError(
        f"{source}: frame {index} has neither info['{step_key}'] nor a source ending in .<dump index>, "
        "so its MD step is unknown; extract frames with umlipft extract (which records the step) "
        "or name the info key holding it with --step-key"
    )
