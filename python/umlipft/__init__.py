"""umlipft: fine-tune universal MACE potentials and run long LAMMPS MD with them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("umlipft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
