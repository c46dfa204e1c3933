"""Foundation-model resolution and export of mace-torch models for the LAMMPS plugin."""

from .foundation import FOUNDATION_NAMES, add_foundation_model, load_mace_model, resolve_foundation_model
from .export import ExportConfig, export_lammps_model, read_export_metadata

__all__ = [
    "FOUNDATION_NAMES",
    "ExportConfig",
    "add_foundation_model",
    "export_lammps_model",
    "load_mace_model",
    "read_export_metadata",
    "resolve_foundation_model",
]
