"""The compiled kernels optimised exports call (``torch.ops.umlipft.*``).

``libumlipft_kernels.so`` is built with the plugin and installed beside it. LAMMPS gets the ops
through the pair style, which links the library; Python processes that script, check or run an
exported model load it here first (TorchScript resolves ``torch.ops.umlipft.*`` at load time).

``UMLIPFT_KERNELS_LIBRARY=/path/to/libumlipft_kernels.so`` loads another build instead (the
sanitizer tests, scripts/test-sanitize.sh); Python only, the pair style keeps the one it links.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

KERNELS_FILE = "libumlipft_kernels.so"
KERNELS_OVERRIDE_ENV = "UMLIPFT_KERNELS_LIBRARY"


def kernels_path() -> Path:
    from ..lammps.session import plugin_dir

    override = os.environ.get(KERNELS_OVERRIDE_ENV)
    if override:
        return Path(override)
    return Path(plugin_dir()) / KERNELS_FILE


@functools.lru_cache(maxsize=None)
def load_kernels() -> bool:
    """Register the ops with torch once per process; False when the library was not built."""
    import torch

    path = kernels_path()
    if not path.is_file():
        if os.environ.get(KERNELS_OVERRIDE_ENV):
            # Asked for by name: falling back (or skipping the tests) would hide a broken setup.
            from ..errors import InputError

            raise InputError(
                f"{KERNELS_OVERRIDE_ENV}={path} is not a file; build it or unset {KERNELS_OVERRIDE_ENV}"
            )
        return False
    torch.ops.load_library(str(path))
    return True


def require_kernels() -> None:
    """Raise InputError with the fix when the ops are needed but missing."""
    from ..errors import InputError

    if not load_kernels():
        raise InputError(
            f"{kernels_path()} is missing: this model was exported with umlipft's compiled kernels; "
            "rebuild umlipft (./setup.sh, or pip install --no-build-isolation -e .) or re-export "
            "the model with --no-kernels"
        )
