"""The TorchScript module that ``pair_style mace`` runs.

Two ways in, one model:

- ``forward`` (one MPI rank): positions, species, a directed edge list and per-edge periodic
  shifts in; the energy of the owned atoms, every node's energy and dE/d(edge vector) out.
  Ghost images are folded onto their owners through the shifts, so no node is evaluated twice.
- the layer methods (several ranks): ``embed``, ``edge_embedding``, one ``interaction_layer``
  call per message-passing layer. The plugin calls them in turn and exchanges node features
  (and, backwards, their gradients) with the neighbouring ranks between layers, so each rank
  needs ghosts within one cutoff only.

Forces, the global virial and per-atom virials follow from the edge gradients in C++ either way.
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
        self.layer_count: int = len(model.interactions)
        self.feature_dims: List[int] = layer_feature_dims(model)
        dtype = next(model.parameters()).dtype
        scale, shift = energy_scale_shift(model, head_index)
        self.register_buffer("energy_scale", torch.tensor(scale, dtype=dtype))
        self.register_buffer("energy_shift", torch.tensor(shift, dtype=dtype))

    def forward(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """positions [N,3]; species [N] indices into atomic_numbers; edge_index [2,E] (sender,
        receiver); shifts [E,3] so that edge vector = x[receiver] - x[sender] + shift; nodes
        0..n_local-1 are the atoms whose energy is counted.

        Returns the owned energy, every node's energy, dE/d(edge vector), and the owned nodes'
        features (every layer's product output side by side, as mace-torch's node_feats): the
        watch of ``compute mace/q`` reads them without a second pass."""
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
        node_feats = out["node_feats"]
        assert node_feats is not None
        return energy_local.detach(), node_energy.detach(), edge_gradient, node_feats[:n_local].detach()

    # ---------------------------------------------------------------- layer by layer
    # Several MPI ranks run the model one message-passing layer at a time (pair_style mace's
    # ghost mode): each layer updates the owned nodes from their neighbours, owned or ghost;
    # between layers LAMMPS copies the new owned features to the ghost images (forward
    # communication), and in the backward pass the gradients landing on ghost features go back
    # to their owners (reverse communication). The plugin drives autograd across these calls.
    # These methods mirror mace-torch's MACE/ScaleShiftMACE forward piece by piece; the export
    # checks them against forward() (layered_max_deviation).

    @torch.jit.export
    def layer_dims(self) -> List[int]:
        """Width of each layer's output node features (the features a ghost needs)."""
        return self.feature_dims

    @torch.jit.export
    def embed(self, species: torch.Tensor, n_local: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-hot attributes of every node, the first layer's input features of every node,
        and E0 + shift of the owned nodes (the constant part of their energies)."""
        dtype = self.energy_scale.dtype
        node_attrs = torch.nn.functional.one_hot(species, num_classes=self.atomic_numbers.shape[0]).to(dtype)
        heads = self.head.expand(n_local)
        local = torch.arange(n_local, device=species.device)
        node_e0 = self.model.atomic_energies_fn(node_attrs[:n_local])[local, heads]
        node_feats = self.model.node_embedding(node_attrs)
        return node_attrs, node_feats, node_e0 + self.energy_shift.to(dtype)

    @torch.jit.export
    def edge_embedding(self, vectors: torch.Tensor, node_attrs: torch.Tensor, edge_index: torch.Tensor,
                       n_local: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Spherical harmonics, radial features (and cutoff, if kept apart) of every edge, and
        the pair-repulsion energy of the owned nodes (zeros without one), unscaled."""
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        edge_attrs = self.model.spherical_harmonics(vectors)
        edge_feats, cutoff = self.model.radial_embedding(lengths, node_attrs, edge_index, self.model.atomic_numbers)
        if hasattr(self.model, "pair_repulsion"):
            pair = self.model.pair_repulsion_fn(lengths, node_attrs, edge_index, self.model.atomic_numbers)
            pair = pair[:n_local]
        else:
            pair = torch.zeros(n_local, dtype=vectors.dtype, device=vectors.device)
        return edge_attrs, edge_feats, cutoff, pair

    @torch.jit.export
    def interaction_layer(self, index: int, node_feats: torch.Tensor, node_attrs: torch.Tensor,
                          edge_attrs: torch.Tensor, edge_feats: torch.Tensor, cutoff: Optional[torch.Tensor],
                          edge_index: torch.Tensor, n_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` on owned receivers: (new owned node features, their scaled readout
        energies). ``node_feats`` holds every node, ghosts included."""
        out = node_feats[:n_local]
        energy = torch.zeros(n_local, dtype=node_feats.dtype, device=node_feats.device)
        heads = self.head.expand(n_local)
        local = torch.arange(n_local, device=node_feats.device)
        num_readouts = len(self.model.readouts)
        last = self.layer_count - 1
        for i, (interaction, product) in enumerate(zip(self.model.interactions, self.model.products)):
            if i == index:
                # mace-torch's own LAMMPS hooks, scripted: no exchange happens inside (the plugin
                # makes it), but the message is cut to the owned rows before the linear map, so
                # ghosts only pay for the maps that make their features.
                message, sc = interaction(node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
                                          edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                                          first_layer=(i == 0), lammps_class=self.head,
                                          lammps_natoms=(n_local, node_feats.shape[0] - n_local))
                if sc is not None:
                    sc = sc[:n_local]
                out = product(node_feats=message[:n_local], sc=sc, node_attrs=node_attrs[:n_local])
        for i, readout in enumerate(self.model.readouts):
            if (num_readouts == 1 and index == last) or (num_readouts > 1 and i == index):
                energy = readout(out, heads)[local, heads]
        return out, energy * self.energy_scale.to(energy.dtype)

    @torch.jit.export
    def scale_energy(self, energy: torch.Tensor) -> torch.Tensor:
        """The scale mace-torch applies to interaction energies (pair repulsion included)."""
        return energy * self.energy_scale.to(energy.dtype)


def layer_feature_dims(model: torch.nn.Module) -> List[int]:
    """Width of each interaction layer's output node features (what the product block writes)."""
    from e3nn import o3

    return [int(o3.Irreps(str(product.linear.irreps_out)).dim) for product in model.products]


def energy_scale_shift(model: torch.nn.Module, head_index: int) -> Tuple[float, float]:
    """mace-torch's affine map of the interaction energies for one head (1, 0 without one)."""
    block = getattr(model, "scale_shift", None)
    if block is None:
        return 1.0, 0.0
    scale = torch.atleast_1d(block.scale).double()
    shift = torch.atleast_1d(block.shift).double()
    pick = (lambda t: float(t[head_index]) if t.numel() > 1 else float(t[0]))
    return pick(scale), pick(shift)


def layered_support(model: torch.nn.Module) -> str | None:
    """Why the layer methods cannot reproduce this model's forward (None: they can)."""
    if not hasattr(model, "interactions") or not hasattr(model, "products"):
        return f"{type(model).__name__} is not a MACE message-passing model"
    if hasattr(model, "joint_embedding") or hasattr(model, "embedding_readout"):
        return "models with extra per-graph embeddings (charges, spins) are not supported across ranks"
    if type(model).__name__ not in ("MACE", "ScaleShiftMACE"):
        return f"{type(model).__name__} is not supported across ranks (MACE and ScaleShiftMACE are)"
    if len(model.readouts) not in (1, len(model.interactions)):
        return "the model has neither one readout nor one per layer"
    return None


def ghost_graph(edge_index: torch.Tensor, shifts: torch.Tensor, n_local: int):
    """The multi-rank layout of a periodic graph: every (atom, image) a sender is reached
    through becomes a ghost node with its owner's index, as LAMMPS' ghost atoms are.
    Returns (edge_index over owned + ghost nodes, owner of each ghost, shift of each ghost)."""
    sender, receiver = edge_index[0], edge_index[1]
    key = torch.cat([sender.unsqueeze(1).to(shifts.dtype), shifts], dim=1)
    moved = (shifts != 0).any(dim=1)
    unique, inverse = torch.unique(key[moved], dim=0, return_inverse=True)
    new_sender = sender.clone()
    new_sender[moved] = n_local + inverse
    owners = unique[:, 0].round().long()
    return torch.stack([new_sender, receiver]), owners, unique[:, 1:]


def layered_outputs(module, positions: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                    shifts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(node energies, edge gradients) of a periodic graph through the layer methods, with the
    periodic images as ghost nodes and the exchanges the plugin makes across ranks done here
    by copying owner rows forward and adding ghost gradients back: the multi-rank arithmetic
    on one process, for checking it against ``forward``."""
    n_local = positions.shape[0]
    edges, owners, ghost_shift = ghost_graph(edge_index, shifts, n_local)
    x = torch.cat([positions, positions[owners] - ghost_shift]) if owners.numel() else positions
    all_species = torch.cat([species, species[owners]])
    vectors = (x[edges[1]] - x[edges[0]]).detach().requires_grad_(True)
    attrs, feats, node_e0 = module.embed(all_species, n_local)
    edge_attrs, edge_feats, cutoff, pair = module.edge_embedding(vectors, attrs, edges, n_local)
    layer_inputs: List[torch.Tensor] = [feats]
    layer_outputs: List[torch.Tensor] = []
    layer_energies: List[torch.Tensor] = []
    count = len(module.layer_dims())
    for t in range(count):
        out, energy = module.interaction_layer(t, layer_inputs[t], attrs, edge_attrs, edge_feats, cutoff,
                                               edges, n_local)
        layer_outputs.append(out)
        layer_energies.append(energy)
        if t + 1 < count:
            owned = out.detach()
            layer_inputs.append(torch.cat([owned, owned[owners]]).requires_grad_(True))
    pair_energy = module.scale_energy(pair)
    node_energy = node_e0 + pair_energy + torch.stack(layer_energies).sum(0)
    edge_inputs = [edge_attrs, edge_feats] + ([cutoff] if cutoff is not None else [])
    edge_grads: List[Optional[torch.Tensor]] = [None] * len(edge_inputs)
    upstream: Optional[torch.Tensor] = None
    for t in reversed(range(count)):
        outputs = [layer_energies[t]] + ([layer_outputs[t]] if upstream is not None else [])
        grad_outputs = [torch.ones_like(layer_energies[t])] + ([upstream] if upstream is not None else [])
        inputs = edge_inputs + ([layer_inputs[t]] if t > 0 else [])
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        for k in range(len(edge_inputs)):
            if grads[k] is not None:
                edge_grads[k] = grads[k] if edge_grads[k] is None else edge_grads[k] + grads[k]
        if t > 0:
            g = grads[-1]
            if g is None:
                g = torch.zeros_like(layer_inputs[t])
            upstream = g[:n_local].index_add(0, owners, g[n_local:])
    outputs: List[torch.Tensor] = []
    grad_outputs: List[torch.Tensor] = []
    if pair_energy.requires_grad:
        outputs.append(pair_energy.sum())
        grad_outputs.append(torch.ones_like(outputs[0]))
    for tensor, grad in zip(edge_inputs, edge_grads):
        if grad is not None:
            outputs.append(tensor)
            grad_outputs.append(grad)
    edge_gradient = (torch.autograd.grad(outputs, [vectors], grad_outputs, allow_unused=True)[0]
                     if outputs else None)
    if edge_gradient is None:
        edge_gradient = torch.zeros_like(vectors)
    return node_energy.detach(), edge_gradient.detach()
