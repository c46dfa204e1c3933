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
# 2: the layer methods for several MPI ranks (pair_style mace refuses version 1 files).
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ExportConfig(DriverConfig):
    model: str = "small"
    output: str = ""
    dtype: str = "float64"
    head: str | None = None
    # Elements the MD will use (symbols); given, the export is restricted to them and optimised.
    elements: tuple[str, ...] | None = None
    # True: the plain mace-torch model, all elements, for checking the optimised export.
    reference: bool = False
    # None: optimise when elements are given; True: fuse the convolution even for all elements.
    optimize: bool | None = None
    # Optimised exports call umlipft's compiled CPU kernels when built; False keeps them pure PyTorch.
    kernels: bool = True
    # Training frames to fit the extrapolation watch on (models/watch.py); None: no watch.
    watch: str | None = None
    watch_components: int = 5  # analyze pca's default (PCAConfig.components; a test keeps them equal)
    watch_alpha: float = 0.01  # per-atom false-alarm probability of the watch's Q limits

    def validate(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.reference and not self.kernels:
            raise ConfigError("--no-kernels applies to optimised exports; --reference never uses kernels")
        if self.reference and (self.elements or self.optimize):
            raise ConfigError("--reference exports the plain mace-torch model with all its elements; "
                              "drop --elements/--optimize, or drop --reference")
        if self.elements is not None:
            from ase.data import atomic_numbers

            bad = [e for e in self.elements if e not in atomic_numbers or e == "X"]
            if bad:
                raise ConfigError(f"not element symbols: {' '.join(bad)} (case matters: Co, Cl, ...)")
            if not self.elements:
                raise ConfigError("--elements needs at least one element symbol")
        if self.watch is not None and not str(self.watch).strip():
            raise ConfigError("--watch needs the training frames' file (extxyz), got an empty name")
        if isinstance(self.watch_components, bool) or self.watch_components < 1:
            raise ConfigError(f"--watch-components must be a positive number of principal components, "
                              f"got {self.watch_components}")
        if not 0.0 < self.watch_alpha < 1.0:
            raise ConfigError(f"--watch-alpha (per-atom false-alarm probability) must be between 0 and 1, "
                              f"got {self.watch_alpha}")

    @property
    def optimized(self) -> bool:
        if self.reference:
            return False
        return bool(self.optimize) if self.optimize is not None else self.elements is not None


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
    """Script the model with its LAMMPS wrapper and save it with embedded metadata.

    The optimised export (elements given, or ``optimize=True``) restricts the model to the
    elements and fuses the convolution (see :mod:`umlipft.models.fast`); before saving, it is
    compared with the plain mace-torch model on a probe structure and refused if they differ by
    more than rounding.
    """
    import torch
    from e3nn.util import jit

    from .. import __version__
    from .foundation import load_mace_model, resolve_foundation_model
    from .lammps_module import MACEEdgeGradientModel
    from .watch import WATCH_FILE

    config.validate()
    source = resolve_foundation_model(config.model)
    model = load_mace_model(source, dtype=config.dtype)
    head_index, head_name = choose_head(model, config.head)
    watch = _fit_watch(config, source, model)  # before the slow steps: a bad --watch fails fast
    wrapper = MACEEdgeGradientModel(model, head_index).eval()
    optimization: dict[str, Any] = {"optimized": False}
    if config.optimized:
        wrapper, optimization = _optimized_wrapper(source, model, wrapper, config, head_index)
    metadata = build_metadata(model, config, source, head_name, __version__)
    metadata["atomic_numbers"] = [int(z) for z in wrapper.atomic_numbers]
    metadata.update(optimization)
    metadata["watch"] = watch is not None
    if watch is not None:
        metadata["watch_file"] = WATCH_FILE
    from .lammps_module import layered_support

    unsupported = layered_support(wrapper.model)  # before scripting, which replaces the submodules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e3nn and mace emit harmless scripting warnings
        scripted = jit.compile(wrapper)
    metadata.update(_layered_check(scripted, unsupported, config))
    output = Path(config.output) if config.output else default_output_path(config.model, config.dtype)
    extra_files = {METADATA_NAME: json.dumps(metadata)}
    if watch is not None:
        extra_files[WATCH_FILE] = json.dumps(watch, allow_nan=False)
    with atomic_path(output) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files=extra_files)
    return output


def _fit_watch(config: ExportConfig, source: Path, model) -> dict[str, Any] | None:
    """The extrapolation watch (``--watch``), fitted on the model's invariant node features."""
    if not config.watch:
        return None
    from ase.data import atomic_numbers as symbol_to_z

    from .watch import fit_watch

    # An element-restricted export covers only --elements: the watch's elements must be among them.
    covered = ([symbol_to_z[e] for e in config.elements] if config.elements and config.optimized
               else [int(z) for z in model.atomic_numbers])
    return fit_watch(source, config.watch, n_components=config.watch_components, alpha=config.watch_alpha,
                     covered_numbers=covered)


# Largest |difference| from the plain mace-torch export allowed on the probe structure's edge
# gradients (eV/Å) and node energies (eV): rounding only.
CHECK_TOLERANCE = {"float64": 1e-9, "float32": 5e-5}


def _optimized_wrapper(source, model, reference_wrapper, config: ExportConfig, head_index: int):
    import torch
    from ase.data import atomic_numbers as symbol_to_z

    from .fast import (fuse_interactions, fuse_products, fuse_radial_mlps, kernel_ops, max_deviation,
                       restrict_elements)
    from .foundation import load_mace_model
    from .kernels import kernels_path, load_kernels
    from .lammps_module import MACEEdgeGradientModel

    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    # Rebuild in float64 whatever the target dtype, so fp32 weights are rounded once.
    work = load_mace_model(source, dtype="float64")
    all_numbers = [int(z) for z in work.atomic_numbers]
    restricted = False
    if config.elements is not None:
        wanted = sorted({symbol_to_z[e] for e in config.elements})
        missing = [e for e in config.elements if symbol_to_z[e] not in all_numbers]
        if missing:
            raise InputError(f"element(s) {' '.join(missing)} are not covered by {source}")
        if wanted != all_numbers:
            try:
                work = restrict_elements(work, wanted)
                restricted = True
            except InputError as err:
                warnings.warn(f"exporting all elements: {err}")
    use_kernels = config.kernels and load_kernels()
    if config.kernels and not use_kernels:
        warnings.warn(f"{kernels_path()} is not built: exporting the pure PyTorch optimised path "
                      "(slower on CPU); rebuild umlipft to get the compiled kernels")
    fused = fuse_interactions(work, kernels=use_kernels)
    fused_radial = fuse_radial_mlps(work) if use_kernels else 0
    fused_products = fuse_products(work, kernels=use_kernels)
    work = work.to(dtype).eval()
    wrapper = MACEEdgeGradientModel(work, head_index).eval()
    numbers = [int(z) for z in work.atomic_numbers]
    energy_dev, gradient_dev = max_deviation(reference_wrapper, wrapper, all_numbers, numbers,
                                             float(model.r_max), dtype)
    tolerance = CHECK_TOLERANCE[config.dtype]
    if not (energy_dev <= tolerance and gradient_dev <= tolerance):
        raise InputError(
            f"the optimised export differs from mace-torch by {gradient_dev:.3g} eV/A (edge gradients) "
            f"and {energy_dev:.3g} eV (node energies) on the probe structure, above {tolerance:g}; "
            "this model is not supported by the optimised path: export it with --reference"
        )
    return wrapper, {
        "optimized": True,
        "elements_restricted": restricted,
        "fused_interactions": fused,
        "fused_products": fused_products,
        "fused_radial_mlps": fused_radial,
        "kernels": kernel_ops(work),
        "check_max_node_energy_dev": energy_dev,
        "check_max_edge_gradient_dev": gradient_dev,
    }


def _layered_check(scripted, reason: str | None, config: ExportConfig) -> dict[str, Any]:
    """Check the scripted layer methods (several MPI ranks) against its forward (one rank) on
    the probe structure; a model they cannot reproduce is exported for one rank only, saying
    why. Scripted, because the layer methods pass mace-torch's LAMMPS hooks, which only stay
    inert when scripted (eagerly they would call LAMMPS' ML-IAP exchange)."""
    import torch

    from .fast import layered_deviation

    if reason is None:
        dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
        numbers = [int(z) for z in scripted.atomic_numbers]
        energy_dev, gradient_dev = layered_deviation(scripted, numbers, float(scripted.r_max), dtype)
        tolerance = CHECK_TOLERANCE[config.dtype]
        if not (energy_dev <= tolerance and gradient_dev <= tolerance):
            reason = (f"its layer-by-layer evaluation differs from the whole model by {gradient_dev:.3g} eV/A "
                      f"(edge gradients) and {energy_dev:.3g} eV on the probe structure")
    if reason is not None:
        warnings.warn(f"this export runs on one MPI rank only: {reason}")
        return {"layered": False, "layered_unsupported": reason}
    return {"layered": True, "layer_feature_dims": [int(d) for d in scripted.layer_dims()],
            "check_max_layered_edge_gradient_dev": gradient_dev,
            "check_max_layered_node_energy_dev": energy_dev}


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
    from .kernels import load_kernels, require_kernels

    load_kernels()  # optimised exports call torch.ops.umlipft.*, resolved at load time
    extra = {METADATA_NAME: ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        if "umlipft::" in str(err):
            require_kernels()
        raise InputError(f"{path} is not a TorchScript file: {err}") from None
    if not extra[METADATA_NAME]:
        raise InputError(f"{path} was not written by umlipft export; run: umlipft export MODEL -o {path}")
    metadata = json.loads(extra[METADATA_NAME])
    if metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not a umlipft LAMMPS export; run: umlipft export MODEL -o {path}")
    return metadata
