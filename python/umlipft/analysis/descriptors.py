"""Per-atom descriptors: DScribe SOAP (the study's settings) and MACE's own invariant node features.

A descriptor is built from a plain settings dict, which is stored beside a fitted PCA so that a
later run (or another program) computes exactly the same features for new frames.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from ase import Atoms


class Descriptor(Protocol):
    """Maps frames to per-atom feature matrices of a fixed width."""

    kind: str

    @property
    def n_features(self) -> int: ...

    def compute(self, frames: "Sequence[Atoms]") -> list[np.ndarray]:
        """One float64 array of shape (n_atoms, n_features) per frame."""

    def settings(self) -> dict[str, Any]:
        """A JSON-able dict that :func:`descriptor_from_settings` turns back into this descriptor."""


def species_of(frames: "Iterable[Atoms]") -> tuple[str, ...]:
    """Elements present in the frames, ordered by atomic number (DScribe's own order)."""
    from ase.data import atomic_numbers

    found: set[str] = set()
    for atoms in frames:
        found.update(atoms.get_chemical_symbols())
    return tuple(sorted(found, key=lambda s: atomic_numbers[s]))


@dataclasses.dataclass(frozen=True)
class SoapSettings(DriverConfig):
    """SOAP of the study: r_cut 5 Å, n_max 8, l_max 6, σ 0.375 Å, periodic; species from the data."""

    species: tuple[str, ...] = ()
    r_cut_A: float = 5.0
    n_max: int = 8
    l_max: int = 6
    sigma_A: float = 0.375
    periodic: bool = True

    def validate(self) -> None:
        from ase.data import atomic_numbers

        unknown = [s for s in self.species if s not in atomic_numbers]
        if unknown:
            raise ConfigError(f"SOAP species {unknown} are not element symbols")
        if self.r_cut_A <= 1.0:
            raise ConfigError(f"SOAP r_cut_A must exceed 1 Å (DScribe's minimum), got {self.r_cut_A}")
        if self.n_max < 1 or self.l_max < 0:
            raise ConfigError(f"SOAP needs n_max >= 1 and l_max >= 0, got {self.n_max}, {self.l_max}")
        if self.sigma_A <= 0:
            raise ConfigError(f"SOAP sigma_A must be positive, got {self.sigma_A}")


class SoapDescriptor:
    """DScribe SOAP, one row per atom (the "inner" crossover, no averaging, GTO radial basis)."""

    kind = "soap"

    def __init__(self, settings: SoapSettings) -> None:
        from dscribe.descriptors import SOAP

        if not settings.species:
            raise InputError("SOAP needs its species list; use species_of(frames) on the fitting data")
        settings.validate()
        self.config = settings
        self._soap = SOAP(
            species=list(settings.species),
            r_cut=settings.r_cut_A,
            n_max=settings.n_max,
            l_max=settings.l_max,
            sigma=settings.sigma_A,
            periodic=settings.periodic,
        )

    @property
    def n_features(self) -> int:
        return int(self._soap.get_number_of_features())

    def compute(self, frames: "Sequence[Atoms]") -> list[np.ndarray]:
        out = []
        for atoms in frames:
            self._check(atoms)
            # One frame per call (n_jobs=1): DScribe's multi-frame call allocates the whole batch
            # again inside, and the machines this runs on are often shared.
            out.append(np.asarray(self._soap.create(atoms), dtype=np.float64).reshape(len(atoms), -1))
        return out

    def _check(self, atoms: "Atoms") -> None:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(self.config.species))
        if missing:
            raise InputError(
                f"frame holds {', '.join(missing)}, which the SOAP species list "
                f"({', '.join(self.config.species)}) lacks; refit the PCA on data with these elements"
            )
        if self.config.periodic and (not atoms.pbc.all() or atoms.cell.rank < 3):
            raise InputError(
                "SOAP is set periodic but a frame has no full 3-D cell; give periodic frames or fit "
                "with periodic=False"
            )

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.config.to_dict()}


@dataclasses.dataclass(frozen=True)
class MaceSettings(DriverConfig):
    """Invariant (scalar) node features of a mace-torch model, from the first ``layers`` layers."""

    model: str = "small"
    layers: int = -1  # -1: every interaction layer, as mace-torch's get_descriptors
    dtype: str = "float64"
    head: str | None = None
    model_sha256: str = ""  # filled when the model is resolved; checked when a saved PCA is loaded

    def validate(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"MACE dtype must be float32 or float64, got {self.dtype!r}")
        if self.layers == 0 or self.layers < -1:
            raise ConfigError(f"MACE layers must be -1 (all) or a positive count, got {self.layers}")


class MaceDescriptor:
    """What a MACE model itself sees: the scalar channels of its node features, layer by layer.

    Evaluated without forces (one forward pass), several frames per graph batch.
    """

    kind = "mace"

    def __init__(self, settings: MaceSettings) -> None:
        import torch

        from ..models.foundation import load_mace_model, resolve_foundation_model

        settings.validate()
        path = resolve_foundation_model(settings.model)
        from ..io import sha256_file

        digest = sha256_file(path)
        if settings.model_sha256 and settings.model_sha256 != digest:
            raise InputError(
                f"model {path} is not the model this PCA was fitted with (sha256 {digest[:12]}... "
                f"!= {settings.model_sha256[:12]}...); MACE features of another model are not comparable. "
                "Give the original model with --model or refit the PCA"
            )
        self.config = dataclasses.replace(settings, model_sha256=digest)
        self._dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
        self.model = load_mace_model(path, dtype=settings.dtype)
        if not hasattr(self.model, "products"):
            raise InputError(f"{path} is not a MACE-architecture model; only MACE node features are supported")
        heads = list(getattr(self.model, "heads", None) or ["Default"])
        if settings.head is not None and settings.head not in heads:
            raise InputError(f"model has heads {heads}, not {settings.head!r}")
        self._heads = heads
        self._head = settings.head or heads[0]
        self._columns = self._invariant_columns(settings.layers)

    def _invariant_columns(self, layers: int) -> np.ndarray:
        """Column indices of the 0e channels in ``node_feats`` (layers are concatenated there)."""
        from e3nn import o3

        columns: list[int] = []
        offset = 0
        n_layers = len(self.model.products)
        use = n_layers if layers == -1 else layers
        if use > n_layers:
            raise InputError(f"the model has {n_layers} interaction layers, not {use}")
        for i, product in enumerate(self.model.products):
            irreps = o3.Irreps(str(product.linear.irreps_out))
            for (mul, ir), piece in zip(irreps, irreps.slices()):
                if i < use and ir.l == 0 and ir.p == 1:
                    columns.extend(range(offset + piece.start, offset + piece.stop))
            offset += irreps.dim
        return np.asarray(columns, dtype=np.int64)

    @property
    def n_features(self) -> int:
        return int(self._columns.size)

    def compute(self, frames: "Sequence[Atoms]") -> list[np.ndarray]:
        import torch
        from mace import data as mace_data
        from mace.tools import AtomicNumberTable, torch_geometric

        if not frames:
            return []
        z_table = AtomicNumberTable([int(z) for z in self.model.atomic_numbers])
        allowed = set(z_table.zs)
        graphs = []
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype)  # AtomicData takes the default dtype
        try:
            for atoms in frames:
                bad = sorted(set(int(z) for z in atoms.numbers) - allowed)
                if bad:
                    raise InputError(f"the MACE model does not know atomic numbers {bad}")
                config = mace_data.config_from_atoms(atoms, head_name=self._head)
                graphs.append(mace_data.AtomicData.from_config(
                    config, z_table=z_table, cutoff=float(self.model.r_max), heads=self._heads))
            batch = torch_geometric.batch.Batch.from_data_list(graphs)
            # compute_force=False: a forward pass only, about a third of a force call.
            output = self.model(batch.to_dict(), training=False, compute_force=False)
        finally:
            torch.set_default_dtype(previous)
        feats = output["node_feats"].detach().cpu().numpy().astype(np.float64)[:, self._columns]
        splits = np.cumsum([len(atoms) for atoms in frames])[:-1]
        return list(np.split(feats, splits))

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.config.to_dict()}


def descriptor_from_settings(settings: Mapping[str, Any], model_override: str | None = None) -> Descriptor:
    """Rebuild the descriptor a PCA was fitted with (optionally pointing at a moved model file)."""
    values = dict(settings)
    kind = values.pop("kind", None)
    if kind == "soap":
        return SoapDescriptor(SoapSettings.from_dict(values, source="SOAP settings"))
    if kind == "mace":
        if model_override:
            values["model"] = str(model_override)
        return MaceDescriptor(MaceSettings.from_dict(values, source="MACE descriptor settings"))
    raise InputError(f"unknown descriptor kind {kind!r}; expected 'soap' or 'mace'")


def make_descriptor(kind: str, frames: "Sequence[Atoms]" = (), model: str | None = None,
                    **overrides: Any) -> Descriptor:
    """Descriptor of the given kind with defaults; SOAP takes its species from ``frames``."""
    if kind == "soap":
        values = {k: v for k, v in overrides.items() if v is not None}
        values.setdefault("species", species_of(frames))
        return SoapDescriptor(SoapSettings.from_dict(values, source="SOAP settings"))
    if kind == "mace":
        if not model:
            raise InputError("--descriptor mace needs --model (a .model file or a foundation name)")
        values = {k: v for k, v in overrides.items() if v is not None}
        return MaceDescriptor(MaceSettings.from_dict({"model": str(model), **values}, source="MACE settings"))
    raise InputError(f"unknown descriptor {kind!r}; choose soap or mace")
