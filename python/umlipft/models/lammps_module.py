"""The TorchScript module that ``pair_style mace`` runs.

LAMMPS hands over positions, species, a directed edge list and per-edge periodic shifts; the
module returns the energy of the owned atoms, every node's energy, and dE/d(edge vector) for
every edge. Forces, the global virial and per-atom virials all follow from the edge gradients
in one pass in C++, for the owned-atom graph (ghost images folded onto their owners through
shifts) and for the ghost-shell graph used across MPI ranks alike.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from e3nn.util.jit import compile_mode


@compile_mode("script")
class MACEEdgeGradientModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, head_index: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("atomic_numbers", model.atomic_numbers.clone())
        self.register_buffer("r_max", model.r_max.clone())
        self.register_buffer("num_interactions", model.num_interactions.clone())
        self.register_buffer("head", torch.tensor([head_index], dtype=torch.long))
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def forward(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """positions [N,3]; species [N] indices into atomic_numbers; edge_index [2,E] (sender,
        receiver); shifts [E,3] so that edge vector = x[receiver] - x[sender] + shift; nodes
        0..n_local-1 are the atoms whose energy is counted."""
        num_nodes = positions.shape[0]
        shifts = shifts.detach().requires_grad_(True)
        node_attrs = torch.nn.functional.one_hot(
            species, num_classes=self.atomic_numbers.shape[0]
        ).to(positions.dtype)
        data: Dict[str, torch.Tensor] = {
            "positions": positions,
            "node_attrs": node_attrs,
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": torch.zeros_like(shifts),
            "cell": torch.zeros(3, 3, dtype=positions.dtype, device=positions.device),
            "batch": torch.zeros(num_nodes, dtype=torch.long, device=positions.device),
            "ptr": torch.tensor([0, num_nodes], dtype=torch.long, device=positions.device),
            "head": self.head,
        }
        out = self.model(
            data,
            training=False,
            compute_force=False,
            compute_virials=False,
            compute_stress=False,
            compute_displacement=False,
        )
        node_energy = out["node_energy"]
        assert node_energy is not None
        energy_local = node_energy[:n_local].sum()
        outputs: List[torch.Tensor] = [energy_local]
        inputs: List[torch.Tensor] = [shifts]
        grad_outputs: List[Optional[torch.Tensor]] = [torch.ones_like(energy_local)]
        edge_gradient = torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, allow_unused=True
        )[0]
        if edge_gradient is None:  # no edges, or no edge reaches an owned atom
            edge_gradient = torch.zeros_like(shifts)
        return energy_local.detach(), node_energy.detach(), edge_gradient
