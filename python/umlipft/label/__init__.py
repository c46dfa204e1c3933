"""Reference labelling: ``label_frames(LabelConfig(...)) -> LabelReport`` (``umlipft label``)."""

from __future__ import annotations

from .calculators import (
    cp2k_command,
    cp2k_input_template,
    multiplicity,
    write_espresso_inputs,
    write_vasp_inputs,
)
from .config import (
    CALCULATORS,
    Cp2kConfig,
    EspressoConfig,
    LabelConfig,
    VaspConfig,
    XtbConfig,
)
from .core import LabelReport, attempts, fingerprint, label_frames, validate_frames_for
from .isolated import IsolatedAtomsConfig, IsolatedAtomsReport, isolated_atom_energies, label_isolated_atoms

__all__ = ["CALCULATORS", "Cp2kConfig", "EspressoConfig", "IsolatedAtomsConfig", "IsolatedAtomsReport",
           "LabelConfig", "LabelReport", "VaspConfig", "XtbConfig", "attempts", "cp2k_command",
           "cp2k_input_template", "fingerprint", "isolated_atom_energies", "label_frames",
           "label_isolated_atoms", "multiplicity", "validate_frames_for", "write_espresso_inputs",
           "write_vasp_inputs"]
