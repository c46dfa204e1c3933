#!/usr/bin/env python
"""Profile one forward+backward of an exported model on the 170-atom aqueous frame.

Prints the top operators and the share of time in matrix products (mm/bmm/addmm and oneDNN's
linear: dense arithmetic), umlipft's fused kernels (forward ops and their backward nodes: the
convolution and product-basis arithmetic, fused with their gathers and scatters), elementwise
and copy/fill/index work (memory-bound) and the rest.

    python benchmarks/profile_export.py MODEL.pt [--threads 1] [--calls 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::baddbmm", "mkldnn::_linear_pointwise"}
DATA = {"aten::copy_", "aten::fill_", "aten::index_select", "aten::index_copy", "aten::index_copy_",
        "aten::scatter_add_", "aten::gather", "aten::cat", "aten::index", "aten::index_put_",
        "aten::zero_", "aten::clone", "aten::contiguous", "aten::nonzero", "aten::sort",
        "aten::argsort", "aten::bincount", "aten::index_add_"}
ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::neg", "aten::silu",
               "aten::silu_backward", "aten::sum", "aten::pow", "aten::sin", "aten::cos", "aten::mul_",
               "aten::where", "aten::masked_fill_", "aten::linalg_vector_norm", "aten::sqrt", "aten::div_",
               "aten::reciprocal", "aten::exp", "aten::sigmoid", "aten::rsub", "aten::lt", "aten::ge"}


def is_kernel_backward(key: str) -> bool:
    """The autograd node of a umlipft kernel (its backward pass)."""
    return key.startswith("torch::autograd::CppNode<") and ("ScalarConv" in key or "SymmetricContraction" in key)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import md_throughput as mt
    from umlipft.models.export import read_export_metadata
    from umlipft.models.kernels import load_kernels

    load_kernels()

    torch.set_num_threads(args.threads)
    torch._C._set_graph_executor_optimize(False)
    meta = read_export_metadata(args.model)
    dtype = {"float32": torch.float32, "float64": torch.float64}[meta["dtype"]]
    module = torch.jit.load(args.model)
    atoms = mt.structure(mt.DEFAULT_FRAMES, None)
    z_index = {z: k for k, z in enumerate(meta["atomic_numbers"])}
    edge_index, shifts = mt.owned_graph(atoms, meta["r_max"])
    inputs = (torch.tensor(atoms.get_positions(), dtype=dtype),
              torch.tensor([z_index[int(z)] for z in atoms.numbers]),
              torch.tensor(np.ascontiguousarray(edge_index)), torch.tensor(shifts, dtype=dtype), len(atoms))
    for _ in range(2):
        module(*inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            module(*inputs)
    events = [e for e in prof.key_averages()
              if e.key.startswith(("aten::", "mkldnn::", "umlipft::")) or is_kernel_backward(e.key)]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    shares = {"matmul (arithmetic)": 0.0, "fused kernels": 0.0, "elementwise": 0.0, "copy/fill/index/cat": 0.0,
              "other": 0.0}
    for e in events:
        t = e.self_cpu_time_total
        if e.key.startswith("umlipft::") or is_kernel_backward(e.key):
            shares["fused kernels"] += t
        elif e.key in MATMUL:
            shares["matmul (arithmetic)"] += t
        elif e.key in ELEMENTWISE:
            shares["elementwise"] += t
        elif e.key in DATA:
            shares["copy/fill/index/cat"] += t
        else:
            shares["other"] += t
    shares["other"] += total - sum(shares.values())
    print(f"{args.model}: {meta['dtype']}, {len(meta['atomic_numbers'])} elements, optimized="
          f"{meta.get('optimized', False)}, {args.threads} thread(s), {len(atoms)} atoms, "
          f"{edge_index.shape[1]} edges")
    print(f"ms per call (profiled): {total / 1000 / args.calls:.1f}")
    for k, v in shares.items():
        print(f"  {k:22s} {100 * v / total:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
