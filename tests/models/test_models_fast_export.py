"""The optimised export (``umlipft export --elements ...``) against the plain mace-torch export.

Both go through pair_style mace on small structures: same energies, forces, stresses and
per-atom quantities to rounding, for MACE-MP-0 small and for a two-head fine-tuned-style model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sample_structures import cobalt_chloride_crystal, isolated_water_and_ion, triclinic_water_box

from umlipft.errors import ConfigError, InputError
from umlipft.lammps.singlepoint import lammps_single_point
from umlipft.models.export import ExportConfig, export_lammps_model, read_export_metadata

# Optimised against reference export, both float64: the same sums in another order.
FAST_FP64_FORCE_EV_A = 1e-8
FAST_FP64_ENERGY_EV = 1e-8
FAST_FP64_STRESS_EV_A3 = 1e-9
# float32: the bound against mace-torch float32 (1e-4 eV/Å on forces).
FAST_FP32_FORCE_EV_A = 1e-4
FAST_FP32_ENERGY_EV = 1e-3  # ~1e-7 relative of |E| ~ 1e2-1e3 eV in float32

ELEMENTS = ("H", "Li", "O", "Cl", "Co")


def mixed_box(seed: int = 3):
    """~24 atoms of H, Li, O, Cl, Co in a 7.5 Å periodic box (many edges, images as neighbours)."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    symbols = ["O", "H", "H"] * 5 + ["Li", "Cl", "Co", "Cl", "Cl", "Li", "H", "O"]
    box = 7.5
    positions: list = []
    while len(positions) < len(symbols):
        p = rng.uniform(0.0, box, 3)
        if all(np.linalg.norm((p - q) - box * np.round((p - q) / box)) > 1.7 for q in positions):
            positions.append(p)
    return Atoms(symbols=symbols, positions=positions, cell=[box, box, box], pbc=True)


@pytest.fixture(scope="module")
def exports(small_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast-export")
    cache = {}

    def get(dtype: str, fast: bool):
        key = (dtype, fast)
        if key not in cache:
            path = out / f"{'fast' if fast else 'ref'}-{dtype}.pt"
            cache[key] = export_lammps_model(ExportConfig(
                model=str(small_model_path), output=str(path), dtype=dtype,
                elements=ELEMENTS if fast else None, reference=not fast))
        return cache[key]

    return get


def compare(fast, ref, force_tol, energy_tol, stress_tol=None):
    assert abs(fast.energy - ref.energy) < energy_tol
    np.testing.assert_allclose(fast.forces, ref.forces, rtol=0, atol=force_tol)
    np.testing.assert_allclose(fast.energies, ref.energies, rtol=0, atol=energy_tol)
    if stress_tol is not None:
        np.testing.assert_allclose(fast.stress, ref.stress, rtol=0, atol=stress_tol)
        np.testing.assert_allclose(fast.virials, ref.virials, rtol=0, atol=stress_tol * 1e3)


# ----------------------------------------------------------------------------- units

def test_fused_convolution_equals_e3nn_tensor_product_and_scatter(small_model_path):
    from mace.tools.scatter import scatter_sum

    from umlipft.models.fast import FusedScalarConv
    from umlipft.models.foundation import load_mace_model

    model = load_mace_model(small_model_path, dtype="float64")
    conv_tp = model.interactions[0].conv_tp
    fused = FusedScalarConv(conv_tp)
    gen = torch.Generator().manual_seed(0)
    nodes, edges = 11, 70
    x = torch.randn(nodes, conv_tp.irreps_in1.dim, generator=gen, dtype=torch.float64)
    y = torch.randn(edges, conv_tp.irreps_in2.dim, generator=gen, dtype=torch.float64)
    w = torch.randn(edges, conv_tp.weight_numel, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, nodes - 1, (2, edges), generator=gen)  # node 10: no edges
    expected = scatter_sum(conv_tp(x[edge_index[0]], y, w), edge_index[1], dim=0, dim_size=nodes)
    got = fused(x, y, w, edge_index)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.count_nonzero(got[10]) == 0
    scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x, y, w, edge_index), expected, rtol=0, atol=1e-12)
    assert scripted(x, y[:0], w[:0], edge_index[:, :0]).abs().sum() == 0  # no edges at all


def test_restricted_and_fused_model_equals_full_model(small_model_path):
    from umlipft.models.fast import fuse_interactions, fuse_products, max_deviation, restrict_elements
    from umlipft.models.foundation import load_mace_model
    from umlipft.models.lammps_module import MACEEdgeGradientModel

    model = load_mace_model(small_model_path, dtype="float64")
    zs = [1, 3, 8, 17, 27]
    fast = restrict_elements(copy.deepcopy(model), zs)
    assert [int(z) for z in fast.atomic_numbers] == zs
    assert fast.products[0].symmetric_contractions.contractions[0].weights[0].shape[0] == 5
    assert fuse_interactions(fast) == 2
    assert fuse_products(fast) == 2
    e_dev, g_dev = max_deviation(MACEEdgeGradientModel(model, 0), MACEEdgeGradientModel(fast, 0),
                                 [int(z) for z in model.atomic_numbers], zs, 6.0, torch.float64)
    assert e_dev < 1e-10 and g_dev < 1e-10


@pytest.mark.parametrize("kernels,hidden", [(True, "16x0e"), (False, "16x0e"), (True, "8x0e+8x1o")],
                         ids=["kernel", "pure", "vector-features"])
def test_owned_rows_interactions_equal_mace_torch_on_the_owned_rows(kernels, hidden):
    """The interactions fuse_interactions puts in, given an MPI rank's graph (owned nodes, then
    ghosts that only send), give mace-torch's rows for the owned nodes, values and gradients,
    for both RealAgnostic blocks (first layer plain, second residual, as MACE-MP-0), with the
    fused convolution and with e3nn's (vector features entering the second layer)."""
    from e3nn import o3
    from mace import modules

    from umlipft.models.fast import OwnedRowsInteraction, OwnedRowsResidualInteraction, fuse_interactions
    from umlipft.models.kernels import load_kernels

    if kernels and not load_kernels():
        pytest.skip("libumlipft_kernels.so is not built")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=3, hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=np.zeros(3), avg_num_neighbors=6.0, atomic_numbers=[1, 8, 17], correlation=2,
            gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0, radial_MLP=[8, 8])
    finally:
        torch.set_default_dtype(previous)
    fused = copy.deepcopy(model)
    assert fuse_interactions(fused, kernels=kernels) == (2 if hidden == "16x0e" else 1)
    assert [type(i) for i in fused.interactions] == [OwnedRowsInteraction, OwnedRowsResidualInteraction]
    gen = torch.Generator().manual_seed(1)
    owned, ghosts, edges = 5, 9, 40
    nodes = owned + ghosts
    edge_index = torch.stack([torch.randint(0, nodes, (edges,), generator=gen),
                              torch.randint(0, owned, (edges,), generator=gen)])
    node_attrs = torch.nn.functional.one_hot(torch.randint(0, 3, (nodes,), generator=gen), 3).double()
    lengths = 1.0 + 3.5 * torch.rand(edges, 1, generator=gen, dtype=torch.float64)
    vectors = torch.nn.functional.normalize(torch.randn(edges, 3, generator=gen, dtype=torch.float64)) * lengths
    edge_attrs = model.spherical_harmonics(vectors)
    edge_feats, cutoff = model.radial_embedding(lengths, node_attrs, edge_index, model.atomic_numbers)
    for layer, (reference, candidate) in enumerate(zip(model.interactions, fused.interactions)):
        width = reference.linear_up.irreps_in.dim
        feats = torch.randn(nodes, width, generator=gen, dtype=torch.float64)
        ref_in, new_in = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        ref_message, ref_sc = reference(node_attrs=node_attrs, node_feats=ref_in, edge_attrs=edge_attrs,
                                        edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff)
        scripted = torch.jit.script(candidate)
        message, sc = scripted(node_attrs=node_attrs, node_feats=new_in, edge_attrs=edge_attrs,
                               edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                               lammps_class=torch.tensor([0]), lammps_natoms=(owned, ghosts))
        assert message.shape[0] == owned
        torch.testing.assert_close(message, ref_message[:owned], rtol=0, atol=1e-12)
        if layer == 0:
            assert sc is None and ref_sc is None
        else:
            assert sc.shape[0] == owned
            torch.testing.assert_close(sc, ref_sc[:owned], rtol=0, atol=1e-12)
        grad = torch.randn(message.shape, generator=gen, dtype=torch.float64)
        outputs = [message] + ([sc] if sc is not None else [])
        ref_outputs = [ref_message[:owned]] + ([ref_sc[:owned]] if ref_sc is not None else [])
        (have,) = torch.autograd.grad(outputs, [new_in], [grad] + ([torch.ones_like(sc)] if sc is not None else []))
        (want,) = torch.autograd.grad(ref_outputs, [ref_in],
                                      [grad] + ([torch.ones_like(ref_sc[:owned])] if ref_sc is not None else []))
        torch.testing.assert_close(have, want, rtol=0, atol=1e-12)
        # One rank (no lammps_class): every node is owned, mace-torch's forward unchanged.
        whole, _ = scripted(node_attrs=node_attrs, node_feats=feats, edge_attrs=edge_attrs, edge_feats=edge_feats,
                            edge_index=edge_index, cutoff=cutoff)
        torch.testing.assert_close(whole, ref_message.detach(), rtol=0, atol=1e-12)


def test_fused_symmetric_contraction_equals_mace_for_l1_output():
    """A product block with 0e+1o outputs (as in MACE-MP-0 medium's first layer)."""
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction

    from umlipft.models.fast import FusedSymmetricContraction

    torch.set_default_dtype(torch.float64)
    sc = SymmetricContraction(o3.Irreps("8x0e+8x1o+8x2e"), o3.Irreps("8x0e+8x1o"), correlation=3,
                              num_elements=3)
    fused = torch.jit.script(FusedSymmetricContraction(sc))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 0]), 3).double()
    expected = sc(x, y)
    got = fused(x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    g_expected, = torch.autograd.grad(expected.pow(2).sum(), x)
    g_got, = torch.autograd.grad(got.pow(2).sum(), x)
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-11)


def test_config_flags():
    with pytest.raises(ConfigError):
        ExportConfig(model="small", elements=("H",), reference=True).validate()
    with pytest.raises(ConfigError):
        ExportConfig(model="small", elements=("h2o",)).validate()
    assert ExportConfig(model="small", elements=("H",)).optimized
    assert not ExportConfig(model="small").optimized
    assert ExportConfig(model="small", optimize=True).optimized
    with pytest.raises(ConfigError, match="--no-kernels applies to optimised exports"):
        ExportConfig(model="small", reference=True, kernels=False).validate()


def test_cli_export_flags():
    import argparse

    from umlipft.models import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["export", "small", "--elements", "H", "O", "--dtype", "float32"])
    assert args.elements == ["H", "O"] and not args.reference and args.kernels
    assert not parser.parse_args(["export", "small", "--elements", "H", "--no-kernels"]).kernels
    args = parser.parse_args(["export", "small", "--reference"])
    assert args.reference and args.elements is None
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "small", "--reference", "--optimize"])


# ----------------------------------------------------------------------------- through the plugin

def test_metadata_of_optimised_export(exports):
    meta = read_export_metadata(exports("float64", True))
    assert meta["atomic_numbers"] == [1, 3, 8, 17, 27]
    assert meta["optimized"] and meta["elements_restricted"] and meta["fused_interactions"] == 2
    assert meta["fused_products"] == 2
    assert meta["check_max_edge_gradient_dev"] < 1e-9
    assert meta["model_class"] == "ScaleShiftMACE"
    assert meta["kernels"] == ["umlipft::linear", "umlipft::scalar_conv", "umlipft::symmetric_contraction"]
    assert meta["fused_radial_mlps"] == 2
    assert not read_export_metadata(exports("float64", False))["optimized"]


def test_pure_pytorch_optimised_export_equals_kernel_export(exports, small_model_path, tmp_path):
    pure = export_lammps_model(ExportConfig(model=str(small_model_path), output=str(tmp_path / "pure.pt"),
                                            dtype="float64", elements=ELEMENTS, kernels=False))
    assert read_export_metadata(pure)["kernels"] == []
    atoms = mixed_box(seed=11)
    with_kernels = lammps_single_point(atoms, exports("float64", True), list(ELEMENTS))
    without = lammps_single_point(atoms, pure, list(ELEMENTS))
    compare(with_kernels, without, FAST_FP64_FORCE_EV_A, FAST_FP64_ENERGY_EV, FAST_FP64_STRESS_EV_A3)


@pytest.mark.parametrize("build", [mixed_box, triclinic_water_box, cobalt_chloride_crystal, isolated_water_and_ion],
                         ids=["mixed-box", "triclinic-water", "CoCl2-small-cell", "isolated"])
def test_optimised_fp64_equals_reference_through_plugin(build, exports):
    atoms = build()
    elements = [e for e in ELEMENTS if e in set(atoms.get_chemical_symbols())]
    ref = lammps_single_point(atoms, exports("float64", False), elements)
    fast = lammps_single_point(atoms, exports("float64", True), elements)
    compare(fast, ref, FAST_FP64_FORCE_EV_A, FAST_FP64_ENERGY_EV, FAST_FP64_STRESS_EV_A3)


def test_optimised_ghost_graph_equals_reference(exports):
    atoms = mixed_box()
    ref = lammps_single_point(atoms, exports("float64", False), list(ELEMENTS), graph="owned")
    fast = lammps_single_point(atoms, exports("float64", True), list(ELEMENTS), graph="ghost")
    assert "layer by layer with halo exchange" in fast.log
    compare(fast, ref, FAST_FP64_FORCE_EV_A, FAST_FP64_ENERGY_EV, FAST_FP64_STRESS_EV_A3)


def test_optimised_fp32_equals_mace_torch_fp32(exports, small_model_path):
    from mace.calculators import MACECalculator

    atoms = mixed_box()
    fast = lammps_single_point(atoms, exports("float32", True), list(ELEMENTS))
    calc = MACECalculator(model_paths=str(small_model_path), device="cpu", default_dtype="float32")
    ref_atoms = atoms.copy()
    ref_atoms.calc = calc
    assert abs(fast.energy - ref_atoms.get_potential_energy()) < FAST_FP32_ENERGY_EV
    np.testing.assert_allclose(fast.forces, ref_atoms.get_forces(), rtol=0, atol=FAST_FP32_FORCE_EV_A)
    torch.set_default_dtype(torch.float64)  # MACECalculator changed it


def test_structure_element_outside_restricted_export_is_refused(small_model_path, tmp_path):
    path = export_lammps_model(ExportConfig(model=str(small_model_path), output=str(tmp_path / "ho.pt"),
                                            dtype="float64", elements=("H", "O")))
    assert read_export_metadata(path)["atomic_numbers"] == [1, 8]
    with pytest.raises(Exception, match="not covered"):
        lammps_single_point(mixed_box(), path, list(ELEMENTS))


def test_element_not_in_model_is_refused(small_model_path, tmp_path):
    with pytest.raises(InputError, match="not covered"):
        export_lammps_model(ExportConfig(model=str(small_model_path), output=str(tmp_path / "x.pt"),
                                         elements=("H", "Po")))


# ----------------------------------------------------------------------------- several heads

@pytest.fixture(scope="module")
def two_head_model(small_model_path, tmp_path_factory):
    """A fine-tuned-style model: 8 elements, heads pt_head and mine (different readouts, E0s)."""
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model
    from mace.tools.utils import AtomicNumberTable

    from umlipft.models.foundation import load_mace_model

    foundation = load_mace_model(small_model_path, dtype="float64")
    zs = [1, 3, 6, 8, 11, 17, 27, 29]
    index = [[int(z) for z in foundation.atomic_numbers].index(z) for z in zs]
    config = extract_config_mace_model(foundation)
    e0 = np.asarray(config["atomic_energies"]).reshape(-1)[index]
    config.update(atomic_numbers=zs, num_elements=len(zs), heads=["pt_head", "mine"],
                  atomic_energies=np.stack([e0, e0 + 0.1 * np.arange(len(zs))]),
                  atomic_inter_scale=[float(config["atomic_inter_scale"]), 0.9],
                  atomic_inter_shift=[float(config["atomic_inter_shift"]), -0.05])
    torch.set_default_dtype(torch.float64)
    model = type(foundation)(**config)
    load_foundations_elements(model, foundation, AtomicNumberTable(zs), load_readout=True,
                              use_shift=False, use_scale=False, max_L=0, default_dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for readout in model.readouts:
            for p in readout.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    path = tmp_path_factory.mktemp("two-head") / "two-head.model"
    torch.save(model.eval(), path)
    return path


@pytest.mark.parametrize("head", ["mine", "pt_head"])
def test_two_head_model_optimised_equals_reference(two_head_model, head, tmp_path):
    atoms = mixed_box()
    ref_path = export_lammps_model(ExportConfig(model=str(two_head_model), output=str(tmp_path / "r.pt"),
                                                dtype="float64", head=head, reference=True))
    fast_path = export_lammps_model(ExportConfig(model=str(two_head_model), output=str(tmp_path / "f.pt"),
                                                 dtype="float64", head=head, elements=ELEMENTS))
    meta = read_export_metadata(fast_path)
    assert meta["head"] == head and meta["heads"] == ["pt_head", "mine"]
    assert meta["atomic_numbers"] == [1, 3, 8, 17, 27]
    ref = lammps_single_point(atoms, ref_path, list(ELEMENTS))
    fast = lammps_single_point(atoms, fast_path, list(ELEMENTS))
    compare(fast, ref, FAST_FP64_FORCE_EV_A, FAST_FP64_ENERGY_EV, FAST_FP64_STRESS_EV_A3)


# ----------------------------------------------------------------------------- medium-like model

@pytest.fixture(scope="module")
def vector_feature_model(small_model_path, tmp_path_factory):
    """MACE-MP-0 medium's shape at toy width: hidden 16x0e+16x1o, so the second interaction's
    convolution sees vector features (not fused) and the first product has 0e+1o outputs."""
    from mace.tools.scripts_utils import extract_config_mace_model  # first: mace makes e3nn loadable
    from e3nn import o3

    from umlipft.models.foundation import load_mace_model

    foundation = load_mace_model(small_model_path, dtype="float64")
    zs = [1, 8, 17]
    index = [[int(z) for z in foundation.atomic_numbers].index(z) for z in zs]
    config = extract_config_mace_model(foundation)
    config.update(atomic_numbers=zs, num_elements=len(zs), hidden_irreps=o3.Irreps("16x0e+16x1o"),
                  atomic_energies=np.asarray(config["atomic_energies"]).reshape(-1)[index])
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(4)
    model = type(foundation)(**config)
    with torch.no_grad():  # mace starts some weights at zero: make every path count
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype))
    path = tmp_path_factory.mktemp("vector-features") / "vector-features.model"
    torch.save(model.eval(), path)
    return path


def test_model_with_vector_features_optimised_equals_reference(vector_feature_model, tmp_path):
    atoms = mixed_box()
    keep = [a.index for a in atoms if a.symbol in ("H", "O", "Cl")]
    atoms = atoms[keep]
    elements = ["H", "O", "Cl"]
    ref_path = export_lammps_model(ExportConfig(model=str(vector_feature_model), output=str(tmp_path / "r.pt"),
                                                dtype="float64", reference=True))
    fast_path = export_lammps_model(ExportConfig(model=str(vector_feature_model), output=str(tmp_path / "f.pt"),
                                                 dtype="float64", elements=tuple(elements)))
    meta = read_export_metadata(fast_path)
    assert meta["fused_interactions"] == 1  # the first layer only: the second has 1o inputs
    assert meta["fused_products"] == 2 and meta["fused_radial_mlps"] == 2
    assert "umlipft::symmetric_contraction" in meta["kernels"]
    ref = lammps_single_point(atoms, ref_path, elements)
    fast = lammps_single_point(atoms, fast_path, elements)
    compare(fast, ref, FAST_FP64_FORCE_EV_A, FAST_FP64_ENERGY_EV, FAST_FP64_STRESS_EV_A3)
