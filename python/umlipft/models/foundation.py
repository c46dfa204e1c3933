"""Resolve foundation-model names (``small``, ``medium``, ...) to files, offline.

On a connected machine mace-torch downloads these into its cache
(``$XDG_CACHE_HOME/mace``, else ``~/.cache/mace``) under a name derived from the release URL.
Compute nodes usually have no internet, so ``umlipft models add FILE --as small`` puts a local
copy where mace-torch itself would look, and every umlipft command resolves names there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..io import sha256_file

# Release file names of the MACE-MP family, as mace-torch 0.3.16 names its download targets.
FOUNDATION_NAMES: dict[str, str] = {
    "small": "2023-12-10-mace-128-L0_energy_epoch-249.model",
    "medium": "2023-12-03-mace-128-L1_epoch-199.model",
    "large": "MACE_MPtrj_2022.9.model",
    "small-0b": "mace_agnesi_small.model",
    "medium-0b": "mace_agnesi_medium.model",
    "small-0b2": "mace-small-density-agnesi-stress.model",
    "medium-0b2": "mace-medium-density-agnesi-stress.model",
    "large-0b2": "mace-large-density-agnesi-stress.model",
    "medium-0b3": "mace-mp-0b3-medium.model",
    "medium-mpa-0": "mace-mpa-0-medium.model",
    "small-omat-0": "mace-omat-0-small.model",
    "medium-omat-0": "mace-omat-0-medium.model",
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace"


def _cached_name(release_file: str) -> str:
    # mace-torch keeps only alphanumerics and underscores of the URL's base name.
    return "".join(c for c in release_file if c.isalnum() or c == "_")


def cached_path(name: str) -> Path:
    return cache_dir() / _cached_name(FOUNDATION_NAMES[name])


def resolve_foundation_model(name_or_path: str | Path) -> Path:
    """Return the file of a model given as a path or a foundation name, without any download."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"model {path} is a directory; give the model file inside it (NAME.model)")
    name = str(name_or_path)
    if name in FOUNDATION_NAMES:
        cached = cached_path(name)
        if cached.is_file():
            return cached
        raise InputError(
            f"foundation model {name!r} is not in the local cache ({cached}) and umlipft never "
            f"downloads at run time. Copy the release file {FOUNDATION_NAMES[name]} to this machine "
            f"and run: umlipft models add FILE --as {name}"
        )
    if path.suffix in {".model", ".pt", ".pth"} or os.sep in name:
        raise InputError(f"model file {path} does not exist")
    raise InputError(
        f"{name!r} is neither a model file nor a known foundation name; "
        f"known names: {', '.join(FOUNDATION_NAMES)}"
    )


def add_foundation_model(path: str | Path, name: str) -> Path:
    """Install a local model file under a foundation name, where mace-torch's cache looks for it."""
    path = Path(path).expanduser()
    if name not in FOUNDATION_NAMES:
        raise InputError(f"unknown foundation name {name!r}; choose one of {', '.join(FOUNDATION_NAMES)}")
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    model = load_mace_model(path)  # refuse anything mace-torch cannot load before installing it
    del model
    target = cached_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and sha256_file(target) == sha256_file(path):
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target


def load_mace_model(name_or_path: str | Path, dtype: str | None = None):
    """Load a mace-torch model (a pickled ``torch.nn.Module``) on the CPU, in eval mode."""
    import torch

    path = resolve_foundation_model(name_or_path)
    if is_torchscript_archive(path):
        raise InputError(
            f"{path} is a LAMMPS export (TorchScript, for pair_style mace), not a mace-torch model; "
            "pass the mace-torch .model it was exported from (e.g. finetune's OUTPUT/NAME.model)"
        )
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(f"{path} is not a mace-torch model file that torch can load: {err}") from None
    if isinstance(model, dict) or not hasattr(model, "atomic_numbers") or not hasattr(model, "r_max"):
        raise InputError(
            f"{path} is not a mace-torch model (a training checkpoint or another object?); "
            "give the .model file that mace-torch's training writes"
        )
    if dtype is not None:
        model = model.to(_torch_dtype(dtype))
    return model.eval()


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript file (``umlipft export`` writes them; torch.jit.save's zip holds
    compiled code, which a pickled mace-torch model never does)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] in ("constants.pkl", "extra/umlipft.json")
                       or name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "float64": torch.float64}[dtype]
    except KeyError:
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}") from None
