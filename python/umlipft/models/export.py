"""``umlipft export``: turn a mace-torch model into the TorchScript file ``pair_style mace`` loads."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from ..config import DriverConfig
from ..errors import ConfigError, InputError
from ..io import atomic_path

METADATA_NAME = "umlipft.json"
FORMAT_NAME = "umlipft-mace-lammps"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportConfig(DriverConfig):
    model: str = "small"
    output: str = ""
    dtype: str = "float64"
    head: str | None = None

    def validate(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")


def default_output_path(model: str | Path, dtype: str) -> Path:
    stem = Path(str(model)).name
    for suffix in (".model", ".pt", ".pth"):
        stem = stem.removesuffix(suffix)
    return Path(f"{stem}-lammps-{dtype}.pt")


def model_heads(model) -> list[str]:
    heads = getattr(model, "heads", None)
    return list(heads) if heads else ["Default"]


def choose_head(model, head: str | None) -> tuple[int, str]:
    heads = model_heads(model)
    if head is not None:
        if head not in heads:
            raise InputError(f"head {head!r} is not in the model; its heads are: {', '.join(heads)}")
        return heads.index(head), head
    if len(heads) == 1:
        return 0, heads[0]
    # Replay fine-tuning adds the foundation's data as "pt_head"; the user's head is the other one.
    own = [h for h in heads if h != "pt_head"]
    if len(own) == 1:
        return heads.index(own[0]), own[0]
    raise InputError(f"the model has several heads ({', '.join(heads)}); choose one with --head NAME")


def export_lammps_model(config: ExportConfig) -> Path:
    """Script the model with its LAMMPS wrapper and save it with embedded metadata."""
    import torch
    from e3nn.util import jit

    from .. import __version__
    from .foundation import load_mace_model, resolve_foundation_model
    from .lammps_module import MACEEdgeGradientModel

    source = resolve_foundation_model(config.model)
    model = load_mace_model(source, dtype=config.dtype)
    head_index, head_name = choose_head(model, config.head)
    wrapper = MACEEdgeGradientModel(model, head_index).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e3nn and mace emit harmless scripting warnings
        scripted = jit.compile(wrapper)
    metadata = build_metadata(model, config, source, head_name, __version__)
    output = Path(config.output) if config.output else default_output_path(config.model, config.dtype)
    with atomic_path(output) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(metadata)})
    return output


def build_metadata(model, config: ExportConfig, source: Path, head: str, umlipft_version: str) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "r_max": float(model.r_max),
        "atomic_numbers": [int(z) for z in model.atomic_numbers],
        "num_interactions": int(model.num_interactions),
        "dtype": config.dtype,
        "head": head,
        "heads": model_heads(model),
        "source_model": str(source),
        "model_class": type(model).__name__,
        "mace_torch_version": version("mace-torch"),
        "torch_version": torch.__version__,
        "umlipft_version": umlipft_version,
    }


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported file; InputError if it is not one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"exported model {path} does not exist")
    extra = {METADATA_NAME: ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise InputError(f"{path} is not a TorchScript file: {err}") from None
    if not extra[METADATA_NAME]:
        raise InputError(f"{path} was not written by umlipft export; run: umlipft export MODEL -o {path}")
    metadata = json.loads(extra[METADATA_NAME])
    if metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not a umlipft LAMMPS export; run: umlipft export MODEL -o {path}")
    return metadata
