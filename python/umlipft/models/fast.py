"""Faster exports of mace-torch models for ``pair_style mace``, exact to rounding.

Rewrites of a loaded mace-torch model, all checked numerically against the original at export
time (:func:`max_deviation`):

1. :func:`restrict_elements` rebuilds the model for a subset of its elements with mace-torch's
   own fine-tuning machinery (``extract_config_mace_model`` + ``load_foundations_elements``,
   the path ``--foundation_filter_elements`` takes). The symmetric contraction, skip tensor
   product and node embedding of MACE-MP-0 are contracted against the one-hot element vector;
   with 5 columns instead of 89 that work almost vanishes. Only the weight columns of absent
   elements are dropped (plus e3nn's fan-in normalisation, which mace-torch compensates), so
   every number the model computes for the kept elements is the same up to rounding.

2. :func:`fuse_interactions` replaces, in every interaction whose node features entering the
   convolution are scalars only (every layer of MACE-MP-0 small, the first layer of any MACE),
   e3nn's per-edge tensor product followed by ``scatter_sum``: :class:`FusedScalarConv` lays
   edges out per receiving atom and sums over neighbours with one batched matrix product;
   :class:`KernelScalarConv` calls the compiled ``umlipft::scalar_conv`` op on CPU. Neither
   materialises the edges x channels x (lmax+1)^2 message mace-torch builds. It plugs into
   mace-torch's ``conv_fusion`` hook. mace-torch's two RealAgnostic interaction blocks become
   subclasses (:class:`OwnedRowsResidualInteraction`) that, across MPI ranks, compute the skip
   connection and the message for the owned atoms only, not for the ghosts that only send.

3. :func:`fuse_products` contracts the symmetric product with per-element tensors folded at
   export (:class:`FusedSymmetricContraction`, or the compiled op through
   :class:`KernelSymmetricContraction`).

4. :func:`fuse_radial_mlps` folds e3nn's normalisation constants of the radial MLPs into their
   weights and runs the products through ``umlipft::linear`` (oneDNN for float32).

The compiled ops (``plugin/mace_kernels*.cpp``) have first derivatives only: these models are
for MD (forces, virials), not for training.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from e3nn.util.jit import compile_mode
from mace.modules.blocks import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
from mace.tools.scatter import scatter_sum

from ..errors import InputError


# ----------------------------------------------------------------------------- elements

def restrict_elements(model: torch.nn.Module, atomic_numbers: Sequence[int]) -> torch.nn.Module:
    """A copy of ``model`` covering only ``atomic_numbers`` (sorted), same dtype, eval mode."""
    import numpy as np
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model
    from mace.tools.utils import AtomicNumberTable

    zs = sorted({int(z) for z in atomic_numbers})
    have = [int(z) for z in model.atomic_numbers]
    missing = [z for z in zs if z not in have]
    if missing:
        from ase.data import chemical_symbols

        raise InputError(
            f"element(s) {' '.join(chemical_symbols[z] for z in missing)} are not covered by the "
            f"model, which covers: {' '.join(chemical_symbols[z] for z in have)}"
        )
    if zs == have:
        return model
    config = extract_config_mace_model(model)
    if "error" in config:
        raise InputError(f"cannot restrict the elements of a {type(model).__name__}: {config['error']}; "
                         "export it with --reference")
    dtype = next(model.parameters()).dtype
    index = [have.index(z) for z in zs]
    config["atomic_numbers"] = zs
    config["num_elements"] = len(zs)
    config["atomic_energies"] = np.asarray(config["atomic_energies"])[..., index]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        subset = type(model)(**config)
        # Scale and shift come from the config already; readouts are copied below as they are,
        # whatever the number of heads (load_foundations_elements assumes a one-head source).
        load_foundations_elements(subset, model, AtomicNumberTable(zs), load_readout=False,
                                  use_shift=False, use_scale=False,
                                  max_L=config["hidden_irreps"].lmax, default_dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    target = subset.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("readouts.") and name in target and target[name].shape == value.shape:
            target[name].copy_(value)
    for attr in ("heads",):
        if hasattr(model, attr):
            setattr(subset, attr, copy.deepcopy(getattr(model, attr)))
    return subset.to(dtype).eval()


# ----------------------------------------------------------------------------- convolution

@compile_mode("script")
class FusedScalarConv(torch.nn.Module):
    """conv_tp + scatter_sum of an interaction with scalar node features, as batched matmuls.

    Called through mace-torch's conv-fusion hook as ``(node_feats, edge_attrs, tp_weights,
    edge_index) -> message [nodes, irreps_out.dim]``; with ``num_receivers`` (the interactions
    of :func:`fuse_interactions` pass it) only the first ``num_receivers`` nodes receive and
    get a row. Every path of the tensor product is
    ``out[c, m] = alpha_p * w[e, p, c] * x[sender, c] * Y[e, m]`` (m in the block of path p's
    spherical harmonic); ``alpha_p`` and the output layout are read off the e3nn module.
    """

    def __init__(self, conv_tp: torch.nn.Module) -> None:
        super().__init__()
        spec = scalar_conv_spec(conv_tp)
        if spec is None:
            raise ValueError("conv_tp is not a scalar-input 'uvu' tensor product")
        self.channels: int = spec["channels"]
        self.num_paths: int = len(spec["paths"])
        self.sh_dim: int = spec["sh_dim"]
        self.out_dim: int = spec["out_dim"]
        # Per path, in output order: first row of Y, number of rows, weight block, output start.
        self.path_sh_start: List[int] = [p["sh_start"] for p in spec["paths"]]
        self.path_sh_dim: List[int] = [p["sh_dim"] for p in spec["paths"]]
        self.path_weight_block: List[int] = [p["weight_block"] for p in spec["paths"]]
        self.path_out_start: List[int] = [p["out_start"] for p in spec["paths"]]
        # alpha_p folded into one column scale of Y, shape [sh_dim] per path, as a buffer.
        scale = torch.zeros(self.num_paths, self.sh_dim, dtype=torch.float64)
        for k, p in enumerate(spec["paths"]):
            scale[k, p["sh_start"]:p["sh_start"] + p["sh_dim"]] = p["alpha"]
        self.register_buffer("sh_scale", scale.sum(0).to(torch.get_default_dtype()))
        if len(set(self.path_sh_start)) != self.num_paths:
            raise ValueError("two paths share a spherical-harmonic block")

    def forward(self, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
                edge_index: torch.Tensor, num_receivers: int = -1) -> torch.Tensor:
        return self.batched_matmul_conv(node_feats, edge_attrs, tp_weights, edge_index, num_receivers)

    def batched_matmul_conv(self, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
                            edge_index: torch.Tensor, num_receivers: int = -1) -> torch.Tensor:
        sender = edge_index[0]
        receiver = edge_index[1]
        num_receiving = node_feats.shape[0] if num_receivers < 0 else num_receivers
        num_edges = sender.shape[0]
        C = self.channels
        P = self.num_paths
        # h[e, p, c] = w[e, p, c] * x[sender(e), c]
        h = tp_weights.view(num_edges, P, C) * node_feats.index_select(0, sender).unsqueeze(1)
        y = edge_attrs * self.sh_scale.to(edge_attrs.dtype)
        # Edges of each receiver in consecutive slots 0..count-1 of a [nodes, K] grid.
        counts = torch.bincount(receiver, minlength=num_receiving)
        K = int(counts.max().item()) if num_edges > 0 else 0
        order = torch.argsort(receiver, stable=True)
        recv_sorted = receiver.index_select(0, order)
        offsets = torch.cumsum(counts, 0) - counts
        slot = torch.arange(num_edges, device=receiver.device) - offsets.index_select(0, recv_sorted)
        # Grid position of every edge in its original order (no permutation of edge tensors).
        flat = torch.empty_like(order).index_copy_(0, order, recv_sorted * K + slot)
        # In place into fresh zeros: no extra copy of the padded tensors.
        hp = torch.zeros(num_receiving * K, P * C, dtype=h.dtype, device=h.device).index_copy_(
            0, flat, h.reshape(num_edges, P * C)).view(num_receiving, K, P * C)
        yp = torch.zeros(num_receiving * K, self.sh_dim, dtype=y.dtype, device=y.device).index_copy_(
            0, flat, y).view(num_receiving, K, self.sh_dim)
        # Per path: [nodes, d, K] @ [nodes, K, C] on strided views. unbind (not slicing) keeps
        # the backward to one stacked gradient instead of one zero-filled copy per path.
        yt = yp.transpose(1, 2)
        h_paths = torch.unbind(hp.view(num_receiving, K, P, C), dim=2)
        blocks: List[torch.Tensor] = []
        for k in range(P):
            s = self.path_sh_start[k]
            d = self.path_sh_dim[k]
            b = self.path_weight_block[k]
            block = torch.bmm(yt[:, s:s + d, :], h_paths[b])                   # [nodes, d, C]
            blocks.append(block.transpose(1, 2).reshape(num_receiving, C * d))
        return torch.cat(blocks, dim=1)


@compile_mode("script")
class KernelScalarConv(FusedScalarConv):
    """FusedScalarConv through the compiled ``umlipft::scalar_conv`` op on CPU.

    The op accumulates each receiver's messages in a cache-resident buffer and streams the
    per-edge weights once in forward and once in backward; on other devices (GPUs) the batched
    matmul path of FusedScalarConv runs. The library must be loaded (:func:`load_kernels`)
    before this module is built, scripted or loaded.
    """

    def forward(self, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
                edge_index: torch.Tensor, num_receivers: int = -1) -> torch.Tensor:
        if node_feats.device.type != "cpu":
            return self.batched_matmul_conv(node_feats, edge_attrs, tp_weights, edge_index, num_receivers)
        y = edge_attrs * self.sh_scale.to(edge_attrs.dtype)
        edges = edge_index.to(torch.long)
        return torch.ops.umlipft.scalar_conv(node_feats, tp_weights, y, edges[0], edges[1],
                                             self.path_sh_start, self.path_sh_dim, self.path_weight_block,
                                             num_receivers)


# ----------------------------------------------------------------------------- interactions
# mace-torch's interaction blocks, with the work of the rows that only send cut. Across MPI
# ranks (pair_style mace's layer-by-layer mode) a rank's graph holds its owned atoms first and
# then ghosts, about 1-3 ghosts per owned atom; the ghosts only send. mace-torch computes the
# skip connection and the convolution's output for every node and truncates afterwards
# (truncate_ghosts), which on two ranks costs several percent of a step. These subclasses give
# the same numbers on the owned rows and never compute the others. The owned count is
# mace-torch's own LAMMPS argument (lammps_natoms[0], read when lammps_class is given); on one
# rank every node is owned and the arithmetic is the parent's. handle_lammps is left out: it is
# a no-op when scripted, and pair_style mace makes the exchange itself.

class OwnedRowsMessage:
    """The message of the owned rows, shared by both blocks (their forward signatures differ)."""

    def owned_message(self, node_feats: torch.Tensor, edge_attrs: torch.Tensor, edge_feats: torch.Tensor,
                      edge_index: torch.Tensor, cutoff: Optional[torch.Tensor], owned: int) -> torch.Tensor:
        node_feats = self.linear_up(node_feats)
        tp_weights = self.conv_tp_weights(edge_feats)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
        if hasattr(self, "conv_fusion"):  # resolved when scripted: only one branch is compiled
            message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index, owned)
        else:
            edge_messages = self.conv_tp(node_feats[edge_index[0]], edge_attrs, tp_weights)
            message = scatter_sum(src=edge_messages, index=edge_index[1], dim=0, dim_size=owned)
        return self.linear(message) / self.avg_num_neighbors


@compile_mode("script")
class OwnedRowsInteraction(OwnedRowsMessage, RealAgnosticInteractionBlock):
    def forward(self, node_attrs: torch.Tensor, node_feats: torch.Tensor, edge_attrs: torch.Tensor,
                edge_feats: torch.Tensor, edge_index: torch.Tensor, cutoff: Optional[torch.Tensor] = None,
                lammps_natoms: Tuple[int, int] = (0, 0), lammps_class: Optional[Any] = None,
                first_layer: bool = False) -> Tuple[torch.Tensor, None]:
        owned = lammps_natoms[0] if lammps_class is not None else node_feats.shape[0]
        message = self.owned_message(node_feats, edge_attrs, edge_feats, edge_index, cutoff, owned)
        return self.reshape(self.skip_tp(message, node_attrs[:owned])), None


@compile_mode("script")
class OwnedRowsResidualInteraction(OwnedRowsMessage, RealAgnosticResidualInteractionBlock):
    def forward(self, node_attrs: torch.Tensor, node_feats: torch.Tensor, edge_attrs: torch.Tensor,
                edge_feats: torch.Tensor, edge_index: torch.Tensor, cutoff: Optional[torch.Tensor] = None,
                lammps_class: Optional[Any] = None, lammps_natoms: Tuple[int, int] = (0, 0),
                first_layer: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        owned = lammps_natoms[0] if lammps_class is not None else node_feats.shape[0]
        sc = self.skip_tp(node_feats[:owned], node_attrs[:owned])
        message = self.owned_message(node_feats, edge_attrs, edge_feats, edge_index, cutoff, owned)
        return self.reshape(message), sc


OWNED_ROWS_CLASSES = {RealAgnosticInteractionBlock: OwnedRowsInteraction,
                      RealAgnosticResidualInteractionBlock: OwnedRowsResidualInteraction}


def scalar_conv_spec(conv_tp: torch.nn.Module) -> Dict | None:
    """Structure of an e3nn TensorProduct Cx0e x (sh) -> C x (...) with 'uvu' paths, or None."""
    from e3nn import o3

    irreps_in1 = getattr(conv_tp, "irreps_in1", None)
    irreps_in2 = getattr(conv_tp, "irreps_in2", None)
    irreps_out = getattr(conv_tp, "irreps_out", None)
    instructions = getattr(conv_tp, "instructions", None)
    if not isinstance(conv_tp, o3.TensorProduct) or instructions is None:
        return None
    if len(irreps_in1) != 1 or irreps_in1[0].ir != o3.Irrep("0e"):
        return None
    if getattr(conv_tp, "shared_weights", True) or getattr(conv_tp, "internal_weights", True):
        return None
    channels = irreps_in1[0].mul
    in2_slices = irreps_in2.slices()
    out_slices = irreps_out.slices()
    used_out = set()
    paths = []
    weight_offset = 0
    for k, ins in enumerate(instructions):
        if ins.connection_mode != "uvu" or not ins.has_weight or ins.i_in1 != 0:
            return None
        mul2, ir2 = irreps_in2[ins.i_in2]
        mul_out, ir_out = irreps_out[ins.i_out]
        if mul2 != 1 or mul_out != channels or ir_out != ir2 or ins.i_out in used_out:
            return None
        if tuple(ins.path_shape) != (channels, 1):
            return None
        used_out.add(ins.i_out)
        paths.append({
            "k": k, "sh_start": in2_slices[ins.i_in2].start, "sh_dim": ir2.dim,
            "weight_block": weight_offset // channels, "out_start": out_slices[ins.i_out].start,
        })
        weight_offset += channels
    if weight_offset != conv_tp.weight_numel or len(used_out) != len(irreps_out):
        return None
    # alpha_p, measured on the module itself: x = 1, w = 1, Y = unit vector at the block's row.
    dtype = torch.float64
    probe = copy.deepcopy(conv_tp).to(dtype)
    x = torch.ones(1, channels, dtype=dtype)
    w = torch.ones(1, conv_tp.weight_numel, dtype=dtype)
    for p in paths:
        for m in range(p["sh_dim"]):
            y = torch.zeros(1, irreps_in2.dim, dtype=dtype)
            y[0, p["sh_start"] + m] = 1.0
            out = probe(x, y, w)[0]
            d = p["sh_dim"]
            block = out[p["out_start"]:p["out_start"] + channels * d].view(channels, d)
            expected = torch.zeros(channels, d, dtype=dtype)
            expected[:, m] = block[0, m]
            if not torch.allclose(block, expected, rtol=0, atol=1e-14 * abs(float(block[0, m]))):
                return None  # not of the assumed form
            alpha = float(block[0, m])
            if m == 0:
                p["alpha"] = alpha
            elif abs(alpha - p["alpha"]) > 1e-14 * abs(alpha):
                return None
        if p["alpha"] == 0.0:
            return None
    # Output order must be the order of the output irreps (contiguous blocks).
    paths.sort(key=lambda p: p["out_start"])
    start = 0
    for p in paths:
        if p["out_start"] != start:
            return None
        start += channels * p["sh_dim"]
    return {"channels": channels, "paths": paths, "sh_dim": irreps_in2.dim, "out_dim": irreps_out.dim}


# ----------------------------------------------------------------------------- radial MLP

@compile_mode("script")
class FrozenLinearLayer(torch.nn.Module):
    """x @ weight (then SiLU unless last) through ``umlipft::linear``: oneDNN's GEMM for float32."""

    def __init__(self, weight: torch.Tensor, silu: bool) -> None:
        super().__init__()
        self.silu = silu
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("weight_t", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            z = torch.ops.umlipft.linear(x, self.weight, self.weight_t)
        else:
            z = x @ self.weight
        if self.silu:
            return torch.nn.functional.silu(z)
        return z


@compile_mode("script")
class FusedRadialMLP(torch.nn.Module):
    """e3nn's FullyConnectedNet of SiLU layers with its normalisation constants folded into the weights.

    Layer k of e3nn computes ``c_k * silu(x @ W_k / n_k)``; the constant ``c_k`` is moved into the
    next layer's weights, so each layer is one product and one SiLU (the radial MLPs of MACE).
    """

    def __init__(self, weights: List[torch.Tensor]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [FrozenLinearLayer(w, silu=k < len(weights) - 1) for k, w in enumerate(weights)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def folded_radial_weights(fc: torch.nn.Module) -> List[torch.Tensor] | None:
    """The folded float64 weights of an e3nn FullyConnectedNet of SiLU layers, or None."""
    import math

    if type(fc).__name__ != "FullyConnectedNet":
        return None
    layers = list(fc)
    weights: List[torch.Tensor] = []
    carry = 1.0  # output constant of the previous layer, folded into this one
    for k, layer in enumerate(layers):
        if type(layer).__name__ != "_Layer" or not hasattr(layer, "weight"):
            return None
        last = k == len(layers) - 1
        act = layer.act
        if last:
            if act is not None:
                return None
            norm = math.sqrt(layer.h_in * layer.var_in / layer.var_out)
            weights.append(layer.weight.detach().double() * (carry / norm))
            break
        if act is None or type(act).__name__ != "normalize2mom" or act.f is not torch.nn.functional.silu:
            return None
        weights.append(layer.weight.detach().double() * (carry / math.sqrt(layer.h_in * layer.var_in)))
        carry = (1.0 if act._is_id else float(act.cst)) * math.sqrt(layer.var_out)
    return weights


def fuse_radial_mlps(model: torch.nn.Module) -> int:
    """Swap every e3nn radial MLP of the interactions for FusedRadialMLP (needs the kernels)."""
    fused = 0
    for interaction in getattr(model, "interactions", []):
        fc = getattr(interaction, "conv_tp_weights", None)
        weights = folded_radial_weights(fc) if fc is not None else None
        if weights is None:
            continue
        dtype = next(fc.parameters()).dtype
        candidate = FusedRadialMLP([w.to(dtype) for w in weights])
        if not _same_radial_mlp(fc, candidate):
            continue
        interaction.conv_tp_weights = candidate
        fused += 1
    return fused


def _same_radial_mlp(original: torch.nn.Module, fast: torch.nn.Module) -> bool:
    x = torch.randn(37, original[0].weight.shape[0], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    return _agree_in_float64(original, fast, (x,))


def _agree_in_float64(original: torch.nn.Module, fast: torch.nn.Module, inputs: tuple) -> bool:
    """Both modules, as float64 copies, give the same output on ``inputs`` to 1e-12 relative."""
    reference = copy.deepcopy(original).double()
    candidate = copy.deepcopy(fast).double()
    with torch.no_grad():
        expected = reference(*inputs)
        got = candidate(*inputs)
    scale = float(expected.abs().max()) + 1e-300
    return got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-12 * scale


# ----------------------------------------------------------------------------- product basis

# Largest per-element product tensor (entries, all elements) precomputed for one contraction.
MAX_PRODUCT_TENSOR = 1 << 24


@compile_mode("script")
class FusedSymmetricContraction(torch.nn.Module):
    """mace-torch's SymmetricContraction for one-hot element attributes, per element group.

    mace-torch contracts U_nu (the coupling tensors) with the weights of every element and the
    one-hot attributes on every call, materialising [nodes, channels, ell^correlation] tensors.
    Here T_nu[e] = sum_k U_nu[..., k] W_nu[e, k, :] is folded once at export time (constants),
    and the nodes of each element are contracted with their own T by batched matmuls:
    out = ((T_3 x + T_2) x + T_1) x, the same recursion as mace-torch.
    """

    def __init__(self, symmetric_contraction: torch.nn.Module) -> None:
        super().__init__()
        self.num_ell: int = 0
        self.channels: int = 0
        self.num_elements: int = 0
        self.out_dims: List[int] = []
        self.correlations: List[int] = []
        # T_nu[e] for every (contraction, nu), flattened side by side in one buffer per element
        # (a buffer, so .to(dtype) converts it); offsets and row counts locate each one.
        self.t_offsets: List[int] = []
        self.t_rows: List[int] = []
        tensors: List[torch.Tensor] = []
        offset = 0
        for contraction in symmetric_contraction.contractions:
            corr = int(contraction.correlation)
            u_max = contraction.U_tensors(corr)
            weights = [contraction.weights_max] + list(contraction.weights)   # nu = corr, ..., 1
            num_el, _, channels = weights[0].shape
            num_ell = int(u_max.shape[-2])
            dim_out = int(u_max.numel() // (num_ell ** corr * u_max.shape[-1]))
            self.num_ell, self.channels, self.num_elements = num_ell, int(channels), int(num_el)
            self.out_dims.append(dim_out)
            self.correlations.append(corr)
            for i, nu in enumerate(range(corr, 0, -1)):
                u = contraction.U_tensors(nu).detach().double()
                rows = dim_out * num_ell ** (nu - 1)
                u = u.reshape(rows, num_ell, u.shape[-1])                       # [R, ell, k]
                w = weights[i].detach().double()                                 # [e, k, c]
                # T[e, c, ell, R]: the contracted (last) index first, as the right factor of bmm.
                t = torch.einsum("rik,ekc->ecir", u, w).reshape(num_el, -1)
                tensors.append(t)
                self.t_offsets.append(offset)
                self.t_rows.append(rows)
                offset += t.shape[1]
        self.register_buffer("packed", torch.cat(tensors, dim=1).to(torch.get_default_dtype()).contiguous())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.batched_contraction(x, y)

    def batched_contraction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        num_nodes = x.shape[0]
        C = self.channels
        L = self.num_ell
        species = torch.argmax(y, dim=1)
        packed = self.packed.to(x.dtype)
        outs: List[torch.Tensor] = []
        k0 = 0
        for j in range(len(self.correlations)):
            corr = self.correlations[j]
            dim_out = self.out_dims[j]
            result = torch.zeros(num_nodes, C * dim_out, dtype=x.dtype, device=x.device)
            for e in range(self.num_elements):
                index = torch.nonzero(species == e).squeeze(1)
                n = index.shape[0]
                if n == 0:
                    continue
                xe = x.index_select(0, index).transpose(0, 1)                   # [C, n, ell]
                out = torch.zeros(0, dtype=x.dtype, device=x.device)
                for i in range(corr):
                    rows = self.t_rows[k0 + i]
                    start = self.t_offsets[k0 + i]
                    t = packed[e, start:start + C * L * rows].view(C, L, rows)  # [C, ell, R]
                    if i == 0:
                        out = torch.bmm(xe, t)                                   # [C, n, R]
                    else:
                        c_tensor = out + t.transpose(1, 2).reshape(C, 1, rows * L)
                        out = (c_tensor.view(C, n, rows, L) * xe.unsqueeze(2)).sum(-1)
                # out: [C, n, dim_out] -> [n, C * dim_out] (channel-major, as e3nn)
                result = result.index_copy(0, index, out.transpose(0, 1).reshape(n, C * dim_out))
            outs.append(result)
            k0 += corr
        return torch.cat(outs, dim=-1)


@compile_mode("script")
class KernelSymmetricContraction(FusedSymmetricContraction):
    """FusedSymmetricContraction through the compiled ``umlipft::symmetric_contraction`` op on CPU.

    The op walks (element, channel) pairs, keeping that pair's folded tensors in cache over all
    nodes of the element, and recomputes the per-node intermediates in its backward instead of
    storing [nodes, channels, ell^2] tensors. Correlation 1-3 (every MACE foundation model);
    the stage-0 tensor of correlation 3 is stored with its output laid out for the middle stage.
    """

    def __init__(self, symmetric_contraction: torch.nn.Module) -> None:
        super().__init__(symmetric_contraction)
        C, L, E = self.channels, self.num_ell, self.num_elements
        packed = self.packed.double()
        pieces: List[torch.Tensor] = []
        spec: List[int] = [C, L, len(self.correlations)]
        offset = 0
        out_col = 0
        k0 = 0
        for j, corr in enumerate(self.correlations):
            if corr > 3:
                raise ValueError(f"correlation {corr} is not supported by the kernel")
            D = self.out_dims[j]
            ts = []
            for i in range(corr):
                rows = self.t_rows[k0 + i]
                start = self.t_offsets[k0 + i]
                ts.append(packed[:, start:start + C * L * rows].reshape(E, C, L, rows))
            r0 = ts[0].shape[-1]
            r1 = ts[1].shape[-1] if corr == 3 else 0
            if corr == 3:  # stage-0 output index r1*L + l1 -> l1*R1 + r1
                t0 = ts[0].reshape(E, C, L, r1, L).transpose(3, 4)
                kernel_ts = [t0, ts[1], ts[2].transpose(2, 3)]
            elif corr == 2:
                kernel_ts = [ts[0], ts[1].transpose(2, 3)]
            else:
                kernel_ts = [ts[0]]
            offsets = [0, 0, 0]
            for i, t in enumerate(kernel_ts):
                flat = t.reshape(E, -1)
                offsets[i] = offset
                pieces.append(flat)
                offset += flat.shape[1]
            spec += [corr, D, r0, r1, offsets[0], offsets[1], offsets[2], out_col]
            out_col += C * D
            k0 += corr
        self.kernel_spec: List[int] = spec
        self.register_buffer("kernel_packed", torch.cat(pieces, dim=1).to(self.packed.dtype).contiguous())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.batched_contraction(x, y)
        species = torch.argmax(y, dim=1)
        return torch.ops.umlipft.symmetric_contraction(x, species, self.kernel_packed.to(x.dtype), self.kernel_spec)


def fuse_products(model: torch.nn.Module, kernels: bool = False) -> int:
    """Swap eligible SymmetricContractions for FusedSymmetricContraction (KernelSymmetricContraction
    with ``kernels`` where the correlation allows); in place."""
    fused = 0
    for product in getattr(model, "products", []):
        sc = getattr(product, "symmetric_contractions", None)
        if sc is None or type(sc).__name__ != "SymmetricContraction":
            continue
        try:
            correlations = [int(c.correlation) for c in sc.contractions]
            sizes = [c.weights_max.shape[0] * c.weights_max.shape[2]
                     * c.U_tensors(corr).numel() // c.U_tensors(corr).shape[-1]
                     for c, corr in zip(sc.contractions, correlations)]
        except (AttributeError, TypeError):
            continue
        if max(sizes) > MAX_PRODUCT_TENSOR:
            continue
        dtype = sc.contractions[0].weights_max.dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            use_kernel = kernels and max(correlations) <= 3
            fast = KernelSymmetricContraction(sc) if use_kernel else FusedSymmetricContraction(sc)
        finally:
            torch.set_default_dtype(previous)
        if not _same_contraction(sc, fast):
            continue
        product.symmetric_contractions = fast
        fused += 1
    return fused


def _same_contraction(original: torch.nn.Module, fast: torch.nn.Module) -> bool:
    """Both modules agree on random features and one-hot attributes (float64 probe)."""
    gen = torch.Generator().manual_seed(5)
    nodes = 3 * fast.num_elements + 1
    x = torch.randn(nodes, fast.channels, fast.num_ell, generator=gen, dtype=torch.float64)
    species = torch.arange(nodes) % fast.num_elements
    y = torch.nn.functional.one_hot(species, fast.num_elements).double()
    return _agree_in_float64(original, fast, (x, y))


def fuse_interactions(model: torch.nn.Module, kernels: bool = False) -> int:
    """Swap the convolution of every eligible interaction for FusedScalarConv (KernelScalarConv
    with ``kernels``, which needs :func:`load_kernels`), and the interaction itself for its
    owned-rows subclass where there is one (:data:`OWNED_ROWS_CLASSES`); in place."""
    conv_class = KernelScalarConv if kernels else FusedScalarConv
    fused = 0
    for interaction in getattr(model, "interactions", []):
        if hasattr(interaction, "conv_fusion"):
            continue  # another library's fused convolution (cuequivariance, openequivariance)
        if hasattr(interaction, "conv_tp") and scalar_conv_spec(interaction.conv_tp) is not None:
            dtype = next(interaction.parameters()).dtype
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                interaction.conv_tp = conv_class(interaction.conv_tp)
            finally:
                torch.set_default_dtype(previous)
            interaction.conv_fusion = "umlipft"
            fused += 1
        # e3nn's convolution too (vector features): its scatter then only makes the owned rows.
        owned_rows_class = OWNED_ROWS_CLASSES.get(type(interaction))
        if owned_rows_class is not None:
            interaction.__class__ = owned_rows_class
    return fused


# ----------------------------------------------------------------------------- checking

KERNEL_OPS = {
    "KernelScalarConv": "umlipft::scalar_conv",
    "FrozenLinearLayer": "umlipft::linear",
    "KernelSymmetricContraction": "umlipft::symmetric_contraction",
}


def kernel_ops(model: torch.nn.Module) -> List[str]:
    """The compiled ops a rewritten model calls (recorded in the export's metadata)."""
    return sorted({KERNEL_OPS[type(m).__name__] for m in model.modules() if type(m).__name__ in KERNEL_OPS})


def probe_structure(atomic_numbers: Sequence[int], r_max: float, seed: int = 7):
    """A small periodic structure holding every element, dense enough for many edges."""
    import numpy as np
    from ase import Atoms

    rng = np.random.default_rng(seed)
    zs = list(atomic_numbers)
    numbers = (zs * (1 + 16 // max(1, len(zs))))[: max(16, len(zs))]
    box = 7.0
    positions: list = []
    while len(positions) < len(numbers):
        p = rng.uniform(0.0, box, 3)
        if all(np.linalg.norm((p - q) - box * np.round((p - q) / box)) > 1.6 for q in positions):
            positions.append(p)
    return Atoms(numbers=numbers, positions=positions, cell=[box] * 3, pbc=True)


def probe_graph(atoms, atomic_numbers: Sequence[int], r_max: float, dtype):
    """(positions, species, edge_index, shifts) of a periodic structure, as the wrapper takes them."""
    import numpy as np
    from mace.data.neighborhood import get_neighborhood

    edge_index, shifts, _, _ = get_neighborhood(positions=atoms.get_positions(), cutoff=r_max,
                                                pbc=(True, True, True), cell=atoms.get_cell().array)
    index = {int(z): k for k, z in enumerate(atomic_numbers)}
    return (torch.tensor(atoms.get_positions(), dtype=dtype),
            torch.tensor([index[int(z)] for z in atoms.numbers], dtype=torch.long),
            torch.tensor(np.ascontiguousarray(edge_index), dtype=torch.long),
            torch.tensor(shifts, dtype=dtype))


def edge_outputs(wrapper: torch.nn.Module, atoms, atomic_numbers: Sequence[int], r_max: float, dtype):
    """(node energies, edge gradients) of an (unscripted or scripted) MACEEdgeGradientModel."""
    positions, species, edges, shifts = probe_graph(atoms, atomic_numbers, r_max, dtype)
    _, node_energy, grad, _ = wrapper(positions, species, edges, shifts, len(atoms))
    return node_energy.detach().double(), grad.detach().double()


def max_deviation(reference: torch.nn.Module, candidate: torch.nn.Module, ref_numbers: Sequence[int],
                  cand_numbers: Sequence[int], r_max: float, dtype) -> tuple[float, float]:
    """Largest |difference| of node energies (eV) and edge gradients (eV/Å) on a probe structure."""
    atoms = probe_structure(cand_numbers, r_max)
    e_ref, g_ref = edge_outputs(reference, atoms, ref_numbers, r_max, dtype)
    e_new, g_new = edge_outputs(candidate, atoms, cand_numbers, r_max, dtype)
    return float((e_ref - e_new).abs().max()), float((g_ref - g_new).abs().max())


def layered_deviation(wrapper: torch.nn.Module, atomic_numbers: Sequence[int], r_max: float, dtype) -> tuple[float, float]:
    """Largest |difference| of node energies (eV) and edge gradients (eV/Å) between ``forward``
    and the layer-by-layer path the plugin runs across MPI ranks, on the probe structure with
    its periodic images as ghost nodes (see :func:`umlipft.models.lammps_module.layered_outputs`)."""
    from .lammps_module import layered_outputs

    # At most 8 elements, spread over the table: the probe box holds 16 atoms.
    numbers = list(atomic_numbers)
    sample = [numbers[round(k * (len(numbers) - 1) / 7)] for k in range(8)] if len(numbers) > 8 else numbers
    atoms = probe_structure(sorted(set(sample)), r_max)
    positions, species, edges, shifts_t = probe_graph(atoms, atomic_numbers, r_max, dtype)
    _, node_energy, gradient, _ = wrapper(positions, species, edges, shifts_t, len(atoms))
    layered_energy, layered_gradient = layered_outputs(wrapper, positions, species, edges, shifts_t)
    return (float((node_energy.double() - layered_energy.double()).abs().max()),
            float((gradient.double() - layered_gradient.double()).abs().max()))
