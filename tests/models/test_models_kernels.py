"""The compiled ``umlipft::scalar_conv`` kernel against e3nn + scatter and its own PyTorch twin.

Every instruction-set build this CPU can run is checked (each in its own process: the build is
chosen once per process), with channel counts that do and do not fill whole vectors, edges in
any order, atoms without neighbours, and first derivatives by finite differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from umlipft.models.kernels import load_kernels

pytestmark = pytest.mark.skipif(not load_kernels(), reason="libumlipft_kernels.so is not built")

# The same sums in another order, float64.
KERNEL_FP64_REL = 1e-12


def scalar_tp(channels: int, lmax: int):
    """An e3nn 'uvu' tensor product Cx0e x Y(lmax) -> C x (0e + 1o + ...), external weights, as MACE."""
    from mace.modules.irreps_tools import tp_out_irreps_with_instructions  # first: mace makes e3nn loadable
    from e3nn import o3

    irreps_in = o3.Irreps(f"{channels}x0e")
    sh = o3.Irreps.spherical_harmonics(lmax)
    target = o3.Irreps(" + ".join(f"{channels}x{ir}" for _, ir in sh))
    irreps_mid, instructions = tp_out_irreps_with_instructions(irreps_in, sh, target)
    torch.set_default_dtype(torch.float64)
    return o3.TensorProduct(irreps_in, sh, irreps_mid, instructions=instructions, shared_weights=False,
                            internal_weights=False)


def random_graph(tp, nodes: int, edges: int, seed: int, sorted_receivers: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, tp.irreps_in1.dim, generator=gen, dtype=torch.float64)
    y = torch.randn(edges, tp.irreps_in2.dim, generator=gen, dtype=torch.float64)
    w = torch.randn(edges, tp.weight_numel, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, nodes - 1, (2, edges), generator=gen)  # the last node: no edges
    if sorted_receivers:
        edge_index = edge_index[:, torch.argsort(edge_index[1], stable=True)]
    return x, y, w, edge_index


@pytest.mark.parametrize("channels,lmax", [(16, 3), (20, 1), (7, 2)], ids=["C16-l3", "C20-l1", "C7-l2"])
@pytest.mark.parametrize("sorted_receivers", [True, False], ids=["grouped", "shuffled"])
def test_kernel_equals_e3nn_and_scatter_values_and_gradients(channels, lmax, sorted_receivers):
    from mace.tools.scatter import scatter_sum

    from umlipft.models.fast import FusedScalarConv, KernelScalarConv

    tp = scalar_tp(channels, lmax)
    kernel = torch.jit.script(KernelScalarConv(tp))
    pure = FusedScalarConv(tp)
    x, y, w, edge_index = random_graph(tp, nodes=9, edges=60, seed=channels, sorted_receivers=sorted_receivers)
    inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    expected = scatter_sum(tp(inputs[0][edge_index[0]], inputs[1], inputs[2]), edge_index[1], dim=0, dim_size=9)
    got_inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    got = kernel(got_inputs[0], got_inputs[1], got_inputs[2], edge_index)
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=KERNEL_FP64_REL * scale)
    torch.testing.assert_close(pure(x, y, w, edge_index), expected, rtol=0, atol=KERNEL_FP64_REL * scale)
    assert torch.count_nonzero(got[8]) == 0
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad(expected, inputs, grad_out)
    have = torch.autograd.grad(got, got_inputs, grad_out)
    for name, a, b in zip(("node_feats", "sh", "weights"), have, want):
        torch.testing.assert_close(a, b, rtol=0, atol=KERNEL_FP64_REL * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("conv_class", ["KernelScalarConv", "FusedScalarConv"])
def test_owned_receivers_get_the_rows_and_gradients_of_the_full_convolution(conv_class):
    """num_receivers (an MPI rank's owned atoms; the ghosts after them only send): the rows and
    every gradient of the full convolution, nothing computed for the others."""
    from umlipft.models import fast

    tp = scalar_tp(12, 2)
    conv = torch.jit.script(getattr(fast, conv_class)(tp))
    nodes, owned = 10, 4
    x, y, w, edge_index = random_graph(tp, nodes=nodes, edges=50, seed=8, sorted_receivers=False)
    edge_index[1] = edge_index[1] % owned
    full_inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    full = conv(full_inputs[0], full_inputs[1], full_inputs[2], edge_index)
    assert torch.count_nonzero(full[owned:]) == 0
    inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    got = conv(inputs[0], inputs[1], inputs[2], edge_index, owned)
    assert got.shape == (owned, full.shape[1])
    torch.testing.assert_close(got, full[:owned], rtol=0, atol=KERNEL_FP64_REL * float(full.detach().abs().max()))
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.autograd.grad(full[:owned], full_inputs, grad_out)
    have = torch.autograd.grad(got, inputs, grad_out)
    for name, a, b in zip(("node_feats", "sh", "weights"), have, want):
        torch.testing.assert_close(a, b, rtol=0, atol=KERNEL_FP64_REL * float(b.abs().max()), msg=name)


def test_kernel_first_derivatives_by_finite_differences():
    tp = scalar_tp(5, 1)
    from umlipft.models.fast import KernelScalarConv

    conv = KernelScalarConv(tp)
    x, y, w, edge_index = random_graph(tp, nodes=4, edges=12, seed=3, sorted_receivers=False)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, y, w))
    assert torch.autograd.gradcheck(lambda a, b, c: conv(a, b, c, edge_index), inputs, eps=1e-6, atol=1e-7)


def test_kernel_float32_matches_float64():
    from umlipft.models.fast import KernelScalarConv

    tp = scalar_tp(32, 3)
    conv = KernelScalarConv(tp)
    x, y, w, edge_index = random_graph(tp, nodes=12, edges=150, seed=4, sorted_receivers=True)
    ref = conv(x, y, w, edge_index)
    got = KernelScalarConv(tp).float()(x.float(), y.float(), w.float(), edge_index)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_no_edges_gives_zero_messages():
    from umlipft.models.fast import KernelScalarConv

    tp = scalar_tp(16, 2)
    conv = KernelScalarConv(tp)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    out = conv(x, torch.zeros(0, 9, dtype=torch.float64), torch.zeros(0, tp.weight_numel, dtype=torch.float64),
               torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (3, 16 * 9) and out.abs().sum() == 0
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() == 0


def test_second_derivative_is_refused_with_the_way_out():
    from umlipft.models.fast import KernelScalarConv

    tp = scalar_tp(4, 1)
    x, y, w, edge_index = random_graph(tp, nodes=3, edges=6, seed=5, sorted_receivers=True)
    w.requires_grad_(True)
    out = KernelScalarConv(tp)(x, y, w, edge_index)
    # Training on forces differentiates the forces again: it needs create_graph=True.
    with pytest.raises(RuntimeError, match="first derivatives only.*--reference"):
        torch.autograd.grad(out.square().sum(), w, create_graph=True)
    (g,) = torch.autograd.grad(out.square().sum(), w)  # forces alone are fine
    assert torch.isfinite(g).all()


def test_bad_edge_index_names_the_problem():
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(2, 8, dtype=torch.float64)
    y = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="receiver index 7 out of range for 3 receiving nodes"):
        torch.ops.umlipft.scalar_conv(x, w, y, torch.tensor([0, 1]), torch.tensor([1, 7]), [0, 1], [1, 3], [0, 1])
    with pytest.raises(RuntimeError, match="receiver index 1 out of range for 1 receiving nodes"):
        torch.ops.umlipft.scalar_conv(x, w, y, torch.tensor([0, 2]), torch.tensor([0, 1]), [0, 1], [1, 3], [0, 1], 1)
    with pytest.raises(RuntimeError, match="num_receivers 4 is more than the 3 nodes"):
        torch.ops.umlipft.scalar_conv(x, w, y, torch.tensor([0, 1]), torch.tensor([1, 2]), [0, 1], [1, 3], [0, 1], 4)
    with pytest.raises(RuntimeError, match="weights hold 2 blocks of channels for 1 paths"):
        torch.ops.umlipft.scalar_conv(x, w, y, torch.tensor([0, 1]), torch.tensor([1, 2]), [0], [1], [0])


# ----------------------------------------------------------------------------- instruction sets

CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_models_kernels import scalar_tp, random_graph, mace_contraction
    from umlipft.models.kernels import load_kernels
    from umlipft.models.fast import KernelScalarConv, KernelSymmetricContraction
    load_kernels()
    out = {{"isa": torch.ops.umlipft.kernel_isa()}}
    for channels, lmax in ((128, 3), (20, 1)):
        tp = scalar_tp(channels, lmax)
        x, y, w, edge_index = random_graph(tp, nodes=10, edges=90, seed=channels, sorted_receivers=False)
        ins = [t.clone().requires_grad_(True) for t in (x, y, w)]
        o = KernelScalarConv(tp)(ins[0], ins[1], ins[2], edge_index)
        grads = torch.autograd.grad(o, ins, torch.ones_like(o))
        out[str(channels)] = [o.tolist()] + [g.tolist() for g in grads]
    sc = KernelSymmetricContraction(mace_contraction(3, "8x0e+8x1o"))
    x = torch.randn(9, 8, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.one_hot(torch.arange(9) % 3, 3).double()
    o = sc(x, y)
    out["product"] = [o.tolist(), torch.autograd.grad(o, x, torch.ones_like(o))[0].tolist()]
    print(json.dumps(out))
""")


def run_isa(isa: str) -> dict:
    env = dict(os.environ, UMLIPFT_KERNEL_ISA=isa)
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD.format(tests=tests)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_instruction_set_build_gives_the_same_numbers():
    results = {isa: run_isa(isa) for isa in ("generic", "avx2", "avx512")}
    assert "error" not in results["generic"], results["generic"]
    usable = {isa: r for isa, r in results.items() if "error" not in r}
    for isa, r in results.items():
        if "error" in r:  # only a CPU without it (or a non-x86 build) may refuse, with the reason
            assert "supports up to" in r["error"], r["error"]
        else:
            assert r["isa"] == isa
    reference = usable["generic"]
    for isa, r in usable.items():
        for channels in ("128", "20", "product"):
            for a, b in zip(r[channels], reference[channels]):
                ta, tb = torch.tensor(a), torch.tensor(b)
                torch.testing.assert_close(ta, tb, rtol=0, atol=KERNEL_FP64_REL * float(tb.abs().max()),
                                           msg=f"{isa} vs generic, {channels} channels")


def test_unknown_instruction_set_request_says_what_is_allowed():
    r = run_isa("sse9")
    assert "error" in r and "UMLIPFT_KERNEL_ISA='sse9' is not one of generic, avx2, avx512" in r["error"]


# ----------------------------------------------------------------------------- radial MLP

@pytest.mark.parametrize("dtype,rel", [(torch.float64, KERNEL_FP64_REL), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_folded_radial_mlp_equals_e3nn_values_and_input_gradient(small_model_path, dtype, rel):
    from umlipft.models.fast import FusedRadialMLP, folded_radial_weights
    from umlipft.models.foundation import load_mace_model

    fc = load_mace_model(small_model_path, dtype="float64").interactions[1].conv_tp_weights
    fused = torch.jit.script(FusedRadialMLP([w.to(dtype) for w in folded_radial_weights(fc)]))
    fc = fc.to(dtype)
    x = torch.randn(300, fc[0].weight.shape[0], generator=torch.Generator().manual_seed(2), dtype=dtype)
    x_ref, x_new = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, got = fc(x_ref), fused(x_new)
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * float(expected.detach().abs().max()))
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    (g_ref,) = torch.autograd.grad(expected, x_ref, grad_out)
    (g_new,) = torch.autograd.grad(got, x_new, grad_out)
    torch.testing.assert_close(g_new, g_ref, rtol=0, atol=rel * float(g_ref.abs().max()))


def test_frozen_linear_refuses_trainable_weights_and_second_derivatives():
    w = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="frozen"):
        torch.ops.umlipft.linear(x, w.clone().requires_grad_(True), w.t().contiguous())
    out = torch.ops.umlipft.linear(x, w, w.t().contiguous())
    torch.testing.assert_close(out, x @ w)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert torch.autograd.gradcheck(lambda a: torch.ops.umlipft.linear(a, w, w.t().contiguous()), (x,))


def test_radial_mlp_that_is_not_silu_layers_is_left_alone():
    from e3nn import nn

    from umlipft.models.fast import folded_radial_weights

    assert folded_radial_weights(nn.FullyConnectedNet([4, 8, 3], torch.tanh)) is None
    assert folded_radial_weights(torch.nn.Linear(4, 3)) is None


# ----------------------------------------------------------------------------- product basis

def mace_contraction(correlation: int, irreps_out: str, channels: int = 8, elements: int = 3):
    from mace.modules.symmetric_contraction import SymmetricContraction  # first: mace makes e3nn loadable
    from e3nn import o3

    torch.set_default_dtype(torch.float64)
    sc = SymmetricContraction(o3.Irreps(f"{channels}x0e+{channels}x1o+{channels}x2e"), o3.Irreps(irreps_out),
                              correlation=correlation, num_elements=elements)
    gen = torch.Generator().manual_seed(correlation)
    with torch.no_grad():  # mace initialises some weights at zero: make every path count
        for p in sc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return sc


@pytest.mark.parametrize("correlation,irreps_out", [(3, "8x0e+8x1o"), (3, "8x0e"), (2, "8x0e+8x1o"), (1, "8x1o")],
                         ids=["corr3-0e1o", "corr3-0e", "corr2-0e1o", "corr1-1o"])
@pytest.mark.parametrize("species_order", ["shuffled", "grouped"])
def test_kernel_symmetric_contraction_equals_mace_values_and_gradient(correlation, irreps_out, species_order):
    from umlipft.models.fast import KernelSymmetricContraction

    sc = mace_contraction(correlation, irreps_out)
    kernel = torch.jit.script(KernelSymmetricContraction(sc))
    gen = torch.Generator().manual_seed(7)
    species = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2])   # every element
    if species_order == "grouped":  # the kernel's no-permutation path
        species = torch.sort(species).values
    y = torch.nn.functional.one_hot(species, 3).double()
    x = torch.randn(len(species), 8, 9, generator=gen, dtype=torch.float64)
    x_ref, x_new = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, got = sc(x_ref, y), kernel(x_new, y)
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=KERNEL_FP64_REL * scale)
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(expected, x_ref, grad_out)
    (g_new,) = torch.autograd.grad(got, x_new, grad_out)
    torch.testing.assert_close(g_new, g_ref, rtol=0, atol=KERNEL_FP64_REL * float(g_ref.abs().max()))


def test_kernel_symmetric_contraction_of_mace_mp0_small_and_finite_differences(small_model_path):
    from umlipft.models.fast import KernelSymmetricContraction, restrict_elements
    from umlipft.models.foundation import load_mace_model

    model = restrict_elements(load_mace_model(small_model_path, dtype="float64"), [1, 8, 17])
    sc = model.products[0].symmetric_contractions
    kernel = KernelSymmetricContraction(sc)
    gen = torch.Generator().manual_seed(8)
    species = torch.tensor([2, 0, 1, 1, 0])
    y = torch.nn.functional.one_hot(species, 3).double()
    x = torch.randn(5, 128, 16, generator=gen, dtype=torch.float64)
    expected = sc(x, y).detach()
    torch.testing.assert_close(kernel(x, y), expected, rtol=0,
                               atol=KERNEL_FP64_REL * float(expected.detach().abs().max()))
    small = x[:2, :4].clone().requires_grad_(True)  # a slice of channels keeps gradcheck quick

    def contraction_of_slice(part):
        full = x[:2].clone()
        full[:, :4] = part
        return kernel(full, y[:2])

    assert torch.autograd.gradcheck(contraction_of_slice, (small,), eps=1e-6, atol=1e-6)


def test_symmetric_contraction_species_out_of_range_is_refused():
    from umlipft.models.fast import KernelSymmetricContraction

    kernel = KernelSymmetricContraction(mace_contraction(2, "8x0e"))
    x = torch.randn(2, 8, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="species 5 out of range for 3 elements"):
        torch.ops.umlipft.symmetric_contraction(x, torch.tensor([0, 5]), kernel.kernel_packed, kernel.kernel_spec)


def test_malformed_spec_or_paths_are_refused_before_the_loops_index_scratch():
    """Shape relations the loops rely on (issue 13): each malformed spec would index past a
    buffer (scratch, packed or the output) if it reached the kernel."""
    from umlipft.models.fast import KernelSymmetricContraction

    kernel = KernelSymmetricContraction(mace_contraction(3, "8x0e"))
    spec, packed = list(kernel.kernel_spec), kernel.kernel_packed
    x = torch.randn(2, 8, 9, dtype=torch.float64)
    species = torch.tensor([0, 2])
    assert torch.ops.umlipft.symmetric_contraction(x, species, packed, spec).shape == (2, 8)
    corr, d_out, r0, r1 = spec[3:7]
    assert corr == 3 and r0 == 9 * r1  # the relation the middle stage's scratch indexing assumes
    bigger_r1 = spec[:6] + [r1 + 1] + spec[7:]
    with pytest.raises(RuntimeError, match=r"contraction 0 \(correlation 3\) has R0=.*R1 = dim_out \* L"):
        torch.ops.umlipft.symmetric_contraction(x, species, packed, bigger_r1)
    negative_offset = spec[:7] + [-8] + spec[8:]
    with pytest.raises(RuntimeError, match="contraction 0 does not fit the packed tensors"):
        torch.ops.umlipft.symmetric_contraction(x, species, packed, negative_offset)
    huge_r0 = spec[:5] + [2**61] + spec[6:]  # C*L*R0 would wrap around in int64
    with pytest.raises(RuntimeError, match="contraction 0"):
        torch.ops.umlipft.symmetric_contraction(x, species, packed, huge_r0)
    with pytest.raises(RuntimeError, match="packed must be 2-D with the dtype of x"):
        torch.ops.umlipft.symmetric_contraction(x, species, packed.float(), spec)

    # scalar_conv: a node's output is C * (rows of sh) values; paths leaving a row out would
    # make the kernel write past the end of the output
    xs = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)
    y = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="paths cover 1 of the 4 spherical-harmonic rows"):
        torch.ops.umlipft.scalar_conv(xs, w, y, torch.tensor([0, 1]), torch.tensor([1, 2]), [0], [1], [0])
    with pytest.raises(RuntimeError, match="sender and receiver must be 1-D"):
        torch.ops.umlipft.scalar_conv(xs, w, y, torch.tensor([[0, 1]]), torch.tensor([[1, 2]]), [0], [4], [0])
