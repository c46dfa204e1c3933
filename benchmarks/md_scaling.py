#!/usr/bin/env python
"""Strong scaling of ``pair_style mace`` over MPI ranks, and the ghost redundancy behind it.

Boxes are the shared 170-atom aqueous frame repeated (2x2x2 = 1,360 atoms; 4x4x4 = 10,880
for ``--large``). For each box, one run measures side by side, on the same optimised export
(MACE-MP-0 small, elements restricted, compiled kernels; float64 unless ``--dtype``):

- ``rank1_thread1``: 1 MPI rank x 1 torch thread (owned-atom graph);
- ``rank2_thread1``: 2 ranks x 1 thread (ghost graph, layer-by-layer halo exchange);
- ``rank1_thread2``: 1 rank x 2 threads;

each as ms/step of NVE (LAMMPS' "Loop time" after a warm-up run), plus the per-rank
redundancy pair_style mace logs (ghost nodes / owned nodes) on 2 ranks.

``--redundancy 8 16 64`` adds the redundancy table of the README: a box of about
``--redundancy-atoms`` atoms (default 100,000) on that many ranks, oversubscribed, ``run 0``
with a tiny random MACE (optimised export) of MACE-MP-0 small's cutoff (the counts depend on the cutoff and the
atoms, not the model's width, and a tiny model keeps 64 ranks within memory). Beside each
measured ratio, the ratio the previous design's shell (num_interactions x r_max + skin = 14 A
for MACE-MP-0 small) would have had is counted from the same decomposition: atoms (periodic
images included) within that distance of each rank's subdomain, against one cutoff.

``--json OUT`` writes ``atoms``, ``rank1_thread1_ms``, ``rank2_thread1_ms``,
``rank1_thread2_ms``, ``ghost_ratio_rank2`` (and the same with ``_large``), plus
``redundancy`` rows. ``uptime`` is recorded: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from md_throughput import (DEFAULT_FRAMES, DEFAULT_MODEL, LOOP_TIME, element_list, export,  # noqa: E402
                           load_average)

TIMESTEP_PS = 0.0005
NODES = re.compile(r"nodes per rank \(min/avg/max\) on (\d+) rank\(s\): owned (\S+), ghost (\S+), "
                   r"ghost/owned (\S+) \((\d+) owned in all\)")
GRID = re.compile(r"(\d+) by (\d+) by (\d+) MPI processor grid")


def repeated_frame(frames: Path, reps: tuple[int, int, int]):
    from ase.io import read

    atoms = read(frames, 0)
    atoms.calc = None
    return atoms.repeat(reps)


def lammps_input(data: Path, model: Path, elements: list[str], steps: int, warmup: int) -> str:
    lines = ["units metal", "atom_style atomic", f"read_data {data}", "pair_style mace",
             f"pair_coeff * * {model} {' '.join(elements)}"]
    if steps == 0:
        return "\n".join(lines + ["run 0", ""])
    return "\n".join(lines + [
        "velocity all create 300.0 4928459 mom yes rot no dist gaussian",
        "fix integrate all nve",
        f"timestep {TIMESTEP_PS}",
        "thermo 1000",
        f"run {warmup}",
        f"run {steps}",
        "",
    ])


def run_lammps(atoms, model: Path, ranks: int, threads: int, steps: int, warmup: int, workdir: Path) -> dict:
    from umlipft.lammps import lammps_environment, lmp_executable, write_lammps_data

    elements = element_list(atoms)
    run_dir = Path(tempfile.mkdtemp(prefix=f"np{ranks}x{threads}-", dir=workdir))
    data = run_dir / "structure.data"
    if not data.exists():
        write_lammps_data(data, atoms, elements)
    script = run_dir / "in.scaling"
    script.write_text(lammps_input(data, model, elements, steps, warmup))
    env = dict(lammps_environment())
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    command = [str(lmp_executable()), "-in", str(script), "-log", str(run_dir / "log.lammps"), "-screen", "none"]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + command
    done = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, check=False)
    log = (run_dir / "log.lammps").read_text() if (run_dir / "log.lammps").exists() else ""
    nodes = NODES.findall(log)
    if done.returncode != 0 or not nodes:
        raise RuntimeError(f"lmp failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n"
                           f"{log[-3000:]}")
    _, owned, ghost, ratio, total = nodes[-1]
    result = {"owned": owned, "ghost": ghost, "ghost_ratio": ratio, "atoms": int(total),
              "grid": [int(g) for g in GRID.search(log).groups()] if GRID.search(log) else [1, 1, 1]}
    loops = LOOP_TIME.findall(log)
    if steps:
        seconds, nsteps = loops[-1]
        result["ms_per_step"] = 1000.0 * float(seconds) / int(nsteps)
    return result


def avg(field: str) -> float:
    return float(field.split("/")[1])


def scaling(atoms, model: Path, steps: int, warmup: int, workdir: Path, suffix: str) -> dict:
    out: dict = {f"atoms{suffix}": len(atoms)}
    for ranks, threads in ((1, 1), (2, 1), (1, 2)):
        t0 = time.perf_counter()
        result = run_lammps(atoms, model, ranks, threads, steps, warmup, workdir)
        out[f"rank{ranks}_thread{threads}_ms{suffix}"] = result["ms_per_step"]
        if ranks == 2:
            out[f"ghost_ratio_rank2{suffix}"] = avg(result["ghost_ratio"])
        print(f"  {len(atoms)} atoms, {ranks} rank(s) x {threads} thread(s): {result['ms_per_step']:.0f} ms/step "
              f"(owned {result['owned']}, ghost {result['ghost']}, ghost/owned {result['ghost_ratio']}; "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    one = out[f"rank1_thread1_ms{suffix}"]
    print(f"  speed-up 2 ranks x 1 thread over 1 x 1: {one / out[f'rank2_thread1_ms{suffix}']:.2f}x; "
          f"1 rank x 2 threads over 1 x 1: {one / out[f'rank1_thread2_ms{suffix}']:.2f}x; "
          f"2 ranks x 1 thread over 1 rank x 2 threads: "
          f"{out[f'rank1_thread2_ms{suffix}'] / out[f'rank2_thread1_ms{suffix}']:.2f}x", flush=True)
    return out


# ----------------------------------------------------------------------------- redundancy

def tiny_export(r_max: float, num_interactions: int, elements: list[str], workdir: Path) -> Path:
    """A randomly initialised MACE with the cutoff and depth of the real one, 8 channels."""
    import numpy as np
    import torch
    from ase.data import atomic_numbers
    from mace import modules  # first: mace lets e3nn load its constants under torch's weights_only
    from e3nn import o3

    from umlipft.models.export import ExportConfig, export_lammps_model

    zs = sorted(atomic_numbers[e] for e in elements)
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=1,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=num_interactions, num_elements=len(zs), hidden_irreps=o3.Irreps("8x0e"),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.zeros(len(zs)), avg_num_neighbors=30.0,
        atomic_numbers=zs, correlation=2, gate=torch.nn.functional.silu, atomic_inter_scale=1.0,
        atomic_inter_shift=0.0, radial_MLP=[8, 8])
    path = workdir / "tiny.model"
    torch.save(model.float(), path)
    out = workdir / "tiny-fp32.pt"
    # The optimised export, as users run: fused convolution, no per-edge message tensors.
    export_lammps_model(ExportConfig(model=str(path), output=str(out), dtype="float32", elements=tuple(elements)))
    return out


def node_ratios(atoms, grid: list[int], cutoff: float) -> list[float]:
    """Per rank of LAMMPS' uniform brick grid (orthogonal box): atoms outside the subdomain,
    periodic images included, within ``cutoff`` of one of its atoms, over the atoms inside it:
    the ghost nodes a graph of that reach evaluates."""
    import numpy as np
    from scipy.spatial import cKDTree

    lengths = atoms.cell.lengths()
    positions = atoms.get_positions() % lengths
    images = np.concatenate([positions + np.array([i, j, k]) * lengths
                             for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    ratios = []
    for index in np.ndindex(*grid):
        lo = np.array(index) * lengths / grid
        hi = (np.array(index) + 1) * lengths / grid
        owned = positions[np.all((positions >= lo) & (positions < hi), axis=1)]
        gap = np.sqrt((np.maximum(lo - images, 0.0) ** 2 + np.maximum(images - hi, 0.0) ** 2).sum(1))
        candidates = images[(gap > 0.0) & (gap < cutoff)]
        distance, _ = cKDTree(owned).query(candidates, distance_upper_bound=cutoff)
        ratios.append(float(np.sum(distance < cutoff)) / max(len(owned), 1))
    return ratios


def brick_grid(ranks: int, lengths) -> list[int]:
    """LAMMPS' default brick grid for a box: the factorisation with the least surface."""
    import itertools

    best = None
    for px, py in itertools.product(range(1, ranks + 1), repeat=2):
        if ranks % (px * py):
            continue
        pz = ranks // (px * py)
        area = lengths[0] * lengths[1] / (px * py) + lengths[0] * lengths[2] / (px * pz) + \
            lengths[1] * lengths[2] / (py * pz)
        if best is None or area < best[0] - 1e-9:
            best = (area, [px, py, pz])
    return best[1]


def redundancy(frames: Path, target_atoms: int, rank_counts: list[int], workdir: Path,
               counted_only: list[int]) -> list[dict]:
    import numpy as np

    from umlipft.models.foundation import load_mace_model

    real = load_mace_model(DEFAULT_MODEL, dtype="float32")
    r_max, layers = float(real.r_max), int(real.num_interactions)
    base = repeated_frame(frames, (1, 1, 1))
    side = max(1, math.ceil((target_atoms / len(base)) ** (1 / 3)))  # at least target_atoms
    atoms = base.repeat((side, side, side))
    model = tiny_export(r_max, layers, element_list(atoms), workdir)
    skin = 1.0  # lammps_inputs' neighbor skin
    old_shell = layers * r_max + skin  # the ghost cutoff the previous design asked LAMMPS for
    rows = []
    for ranks in rank_counts + counted_only:
        t0 = time.perf_counter()
        if ranks in counted_only:  # too many ranks for this machine's memory: counted only
            result = {"grid": brick_grid(ranks, atoms.cell.lengths()), "owned": "", "ghost": "",
                      "ghost_ratio": "not run"}
            measured = None
        else:
            result = run_lammps(atoms, model, ranks, 1, 0, 0, workdir)
            measured = [float(v) for v in result["ghost_ratio"].split("/")]
        counted_one = node_ratios(atoms, result["grid"], r_max)
        counted_old = node_ratios(atoms, result["grid"], layers * r_max)
        row = {"ranks": ranks, "atoms": len(atoms), "grid": result["grid"],
               "owned_min_avg_max": result["owned"], "ghost_min_avg_max": result["ghost"],
               "ghost_ratio_min_avg_max": measured,
               "counted_ratio_one_cutoff_avg": float(np.mean(counted_one)),
               "counted_ratio_old_avg": float(np.mean(counted_old)),
               "counted_ratio_old_max": float(np.max(counted_old)),
               "old_reach_A": layers * r_max, "old_shell_A": old_shell}
        rows.append(row)
        print(f"  {len(atoms)} atoms on {ranks} ranks ({'x'.join(map(str, result['grid']))}): ghost/owned measured "
              f"{result['ghost_ratio']} (min/avg/max); counted beside it: one cutoff {row['counted_ratio_one_cutoff_avg']:.3f}, "
              f"previous design ({layers} x r_max = {layers * r_max:.0f} A reach) {row['counted_ratio_old_avg']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=Path, default=DEFAULT_FRAMES)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="also the 4x4x4 box (10,880 atoms)")
    parser.add_argument("--large-steps", type=int, default=2)
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--redundancy", type=int, nargs="*", default=[], metavar="RANKS")
    parser.add_argument("--redundancy-atoms", type=int, default=100_000)
    parser.add_argument("--redundancy-counted", type=int, nargs="*", default=[], metavar="RANKS",
                        help="rank counts whose ratios are only counted from the geometry, not run "
                             "(for a machine without the memory: 64 ranks on 123,930 atoms peak at ~17 GB)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="md-scaling-"))
    results: dict = {"uptime_before": load_average(), "dtype": args.dtype, "model": str(args.model),
                     "cpu_count": os.cpu_count()}
    frame = repeated_frame(args.frames, (1, 1, 1))
    if not args.skip_small or args.large:
        model = export(args.model, args.dtype, workdir, element_list(frame))
    if not args.skip_small:
        results.update(scaling(repeated_frame(args.frames, (2, 2, 2)), model, args.steps, args.warmup, workdir, ""))
    if args.large:
        results.update(scaling(repeated_frame(args.frames, (4, 4, 4)), model, args.large_steps, 1, workdir,
                               "_large"))
    if args.redundancy or args.redundancy_counted:
        results["redundancy"] = redundancy(args.frames, args.redundancy_atoms, args.redundancy, workdir,
                                           args.redundancy_counted)
    results["uptime_after"] = load_average()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
