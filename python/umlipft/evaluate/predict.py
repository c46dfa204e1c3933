"""Energies, forces and stresses of a mace-torch model through its ASE calculator.

mace-torch's ``MACECalculator`` is the reference implementation of a model's predictions; the
LAMMPS export is checked against it elsewhere, so evaluating with it measures the model itself.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from ase import Atoms


@dataclasses.dataclass(frozen=True)
class Prediction:
    energy_eV: float
    forces_eV_per_A: np.ndarray
    stress_eV_per_A3: np.ndarray  # Voigt 6, ASE sign


def _first_bad(values: np.ndarray) -> str:
    flat = np.asarray(values, dtype=float).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat))
    if values.ndim == 2:  # forces: name the atom
        return f"{flat[bad[0]]} on atom {bad[0] // values.shape[1]}, {len(bad)} non-finite component(s)"
    return f"{flat[bad[0]]}" + (f", {len(bad)} non-finite component(s)" if flat.size > 1 else "")


@contextmanager
def _keep_default_dtype() -> Iterator[None]:
    # MACECalculator sets torch's global default dtype; callers (a workflow running several
    # stages in one process) must not inherit that side effect.
    import torch

    previous = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelEvaluator:
    """A loaded model, ready to predict frames; loading is the slow part, so load once."""

    def __init__(self, model: "str | Path", *, dtype: str = "float64", head: str | None = None,
                 device: str = "cpu", loaded: "torch.nn.Module | None" = None) -> None:
        """``model`` names the model (a file or a foundation name); ``loaded``, when given, is
        that model already loaded (e.g. by a caller that also reads its E0s), which saves a
        second load of a large file. It is cast to ``dtype`` (in place: pass a copy to keep it)."""
        from ..models.export import choose_head
        from ..models.foundation import _torch_dtype, load_mace_model, resolve_foundation_model

        self.path = resolve_foundation_model(model)
        self.dtype = dtype
        self.device = device
        if loaded is not None:
            self._model = loaded.to(_torch_dtype(dtype)).eval()
        else:
            self._model = load_mace_model(self.path, dtype=dtype)
        _, self.head = choose_head(self._model, head)
        self.atomic_numbers = frozenset(int(z) for z in self._model.atomic_numbers)
        self._calc = None

    def check_elements(self, frames: "Sequence[Atoms]", source: str) -> None:
        """InputError naming the first element the model does not know."""
        from ase.data import chemical_symbols

        for i, atoms in enumerate(frames):
            unknown = sorted(set(int(z) for z in atoms.numbers) - self.atomic_numbers)
            if unknown:
                names = ", ".join(chemical_symbols[z] for z in unknown)
                raise InputError(
                    f"{source}: frame {i} contains {names}, which model {self.path} was not trained "
                    f"on; it covers {len(self.atomic_numbers)} elements. Use a model that covers "
                    "every element of the frames"
                )

    def _require_finite(self, index: int, source: str | None, **values: np.ndarray) -> None:
        bad = {name: v for name, v in values.items() if not np.all(np.isfinite(v))}
        if not bad:
            return
        where = f"frame {index} of {source}" if source else f"frame {index}"
        what = "; ".join(f"{name} {_first_bad(v)}" for name, v in bad.items())
        raise InputError(
            f"model {self.path} predicts non-finite values for {where} ({what}): the model is broken "
            "(NaN or Inf weights, e.g. from a diverged fine-tune, or a damaged file). Use another model")

    def _calculator(self):
        if self._calc is None:
            import warnings

            from mace.calculators import MACECalculator

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # mace warns about torch.load and dtype casts
                self._calc = MACECalculator(models=self._model, device=self.device,
                                            default_dtype=self.dtype, head=self.head)
        return self._calc

    def predict(self, frames: "Sequence[Atoms]", progress: Callable[[int, int], None] | None = None,
                source: str | None = None) -> list[Prediction]:
        """Energy, forces and (periodic frames) stress of every frame. InputError naming the model,
        ``source`` (the frames' file) and the frame if the model predicts a NaN or Inf: such a
        model is broken (a diverged fine-tune, a damaged file), and no error metric of it means
        anything."""
        results: list[Prediction] = []
        with _keep_default_dtype():
            calc = self._calculator()
            for i, atoms in enumerate(frames):
                work = atoms.copy()  # never replace the caller's reference calculator
                work.calc = calc
                energy = float(work.get_potential_energy())
                forces = np.array(work.get_forces(), dtype=float)
                periodic = bool(work.pbc.all())
                stress = np.array(work.get_stress(voigt=True), dtype=float) if periodic else np.full(6, np.nan)
                self._require_finite(i, source, energy=np.array([energy]), forces=forces,
                                     stress=stress if periodic else np.zeros(6))
                results.append(Prediction(energy, forces, stress))
                if progress is not None:
                    progress(i + 1, len(frames))
        return results
