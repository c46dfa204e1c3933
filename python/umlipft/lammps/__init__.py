"""Running LAMMPS with pair_style mace: plugin location, environment, sessions and data files."""

from .session import (
    PLUGIN_FILE,
    input_script,
    lammps_environment,
    lmp_executable,
    open_lammps,
    plugin_dir,
    require_plugin_library,
)
from .data import read_lammps_dump, write_lammps_data

__all__ = [
    "PLUGIN_FILE",
    "input_script",
    "lammps_environment",
    "lmp_executable",
    "open_lammps",
    "plugin_dir",
    "read_lammps_dump",
    "require_plugin_library",
    "write_lammps_data",
]
