#!/usr/bin/env python
"""MD throughput of MACE-MP-0 small: the LAMMPS plugin against mace-torch's ASE calculator.

One run measures, side by side and with the same thread count, on the 170-atom aqueous frame:

- ``plugin_fp64`` / ``plugin_fp32``: real MD steps (fix nve, 0.5 fs) through ``lmp`` with
  ``pair_style mace`` and the plain mace-torch export (``umlipft export --reference``), timed
  by LAMMPS' "Loop time" of ``run N`` after a warm-up run (setup and first JIT calls excluded);
- ``plugin_fp64_nodeepbind``: the same with ``UMLIPFT_NO_DEEPBIND=1`` (libtorch's float64
  GEMMs bound to liblammps' reference dgemm_);
- ``plugin_fast_fp64`` / ``plugin_fast_fp32``: the optimised export (elements restricted to
  the structure's, fused interaction, compiled ``umlipft::scalar_conv`` kernel), when this
  umlipft has it; ``plugin_fast_nokernels_*``: the same export with ``--no-kernels`` (pure
  PyTorch); ``plugin_fast_*_nomalloc``: with ``UMLIPFT_NO_MALLOC_TUNING=1`` (glibc's default
  mmap/trim behaviour, every large tensor page-faulted in again each step);
- ``ase_fp64`` / ``ase_fp32``: ASE VelocityVerlet with ``MACECalculator`` (warm steps);
  ``ase_*_tuned``: the same in a child process with the plugin's malloc setting applied through
  ``GLIBC_TUNABLES`` (what mace-torch gains from it alone, for a fair reading of the ratios);
- ``bare_*``: the exported TorchScript module's forward+backward called from Python on the
  same owned-atom graph the plugin builds (no MD, no LAMMPS), in a child process with the
  plugin's malloc setting (``GLIBC_TUNABLES``), so plugin/bare is the cost of LAMMPS itself.

Prints ms/step, ns/day at 0.5 fs and ratios; ``--json OUT`` writes the numbers (keys
``<path>_ms``). ``--sizes 50 500 1500`` adds a size scan (the 170-atom cell repeated; ~50 is
a non-periodic cluster cut from it). ``uptime`` is recorded: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "mace-mp-0-small.model"
DEFAULT_FRAMES = SHARED / "data" / "aqueous-licl-cocl2" / "single_points" / "Evaluations__U__dft.extxyz"
TIMESTEP_FS = 0.5
WARMUP_STEPS = 2


def ns_per_day(ms_per_step: float) -> float:
    return TIMESTEP_FS * 1e-6 * (86400e3 / ms_per_step)


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- structures

def structure(frames: Path, natoms: int | None):
    """Frame 0 (170 atoms); larger sizes repeat the cell, ~50 is a cluster around the centre."""
    import numpy as np
    from ase.io import read

    atoms = read(frames, 0)
    atoms.calc = None
    if natoms is None or natoms == len(atoms):
        return atoms
    if natoms > len(atoms):
        import itertools

        # The repetition closest to natoms, as compact as possible (170 -> 510, 1530).
        reps = min(itertools.product(range(1, 6), repeat=3),
                   key=lambda r: (abs(len(atoms) * r[0] * r[1] * r[2] - natoms), max(r) - min(r), r[::-1]))
        return atoms.repeat(reps)
    # Smaller: the natoms atoms nearest the cell centre (minimum image), as an isolated cluster.
    centre = atoms.cell.sum(axis=0) / 2
    d = atoms.get_positions() - centre
    frac = np.linalg.solve(atoms.cell.T, d.T).T
    frac -= np.round(frac)
    d = frac @ atoms.cell
    keep = np.argsort(np.linalg.norm(d, axis=1))[:natoms]
    cluster = atoms[keep]
    cluster.set_positions(d[keep] + 15.0)
    cluster.set_cell([30.0 + np.ptp(d[keep][:, k]) for k in range(3)])
    cluster.pbc = False
    return cluster


def element_list(atoms) -> list[str]:
    from ase.data import atomic_numbers

    return sorted(set(atoms.get_chemical_symbols()), key=lambda s: atomic_numbers[s])


# ----------------------------------------------------------------------------- exports

def export_supports_fast() -> bool:
    import dataclasses

    from umlipft.models.export import ExportConfig

    return "elements" in {f.name for f in dataclasses.fields(ExportConfig)}


def export(model: Path, dtype: str, workdir: Path, elements: list[str] | None, kernels: bool = True) -> Path:
    import dataclasses

    from umlipft.models.export import ExportConfig, export_lammps_model

    tag = "fast-" + "".join(elements) if elements else "reference"
    if elements and not kernels:
        tag += "-nokernels"
    out = workdir / f"{model.stem}-{tag}-{dtype}.pt"
    if out.is_file():
        return out
    kwargs = {"model": str(model), "output": str(out), "dtype": dtype}
    if export_supports_fast():
        kwargs["elements"] = tuple(elements) if elements else None
        kwargs["reference"] = not elements
    if elements and "kernels" in {f.name for f in dataclasses.fields(ExportConfig)}:
        kwargs["kernels"] = kernels
    t0 = time.perf_counter()
    export_lammps_model(ExportConfig(**kwargs))
    print(f"  exported {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- timers

LOOP_TIME = re.compile(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps")
CPU_USE = re.compile(r"([0-9.]+)% CPU use with")


def time_plugin(atoms, model_pt: Path, steps: int, threads: int, workdir: Path,
                extra_env: dict[str, str] | None = None) -> float:
    from umlipft.lammps.data import write_lammps_data

    elements = element_list(atoms)
    run_dir = Path(tempfile.mkdtemp(prefix="lmp-", dir=workdir))
    data = write_lammps_data(run_dir / "structure.data", atoms, elements)
    boundary = " ".join("p" if p else "f" for p in atoms.pbc)
    script = run_dir / "in.bench"
    script.write_text("\n".join([
        "units metal",
        "atom_style atomic",
        "atom_modify map array",
        f"boundary {boundary}",
        f"read_data {data}",
        "pair_style mace",
        f"pair_coeff * * {model_pt} {' '.join(elements)}",
        "velocity all create 300.0 4928459 mom yes rot no dist gaussian",
        "fix integrate all nve",
        f"timestep {TIMESTEP_FS / 1000}",
        "thermo_style custom step temp pe etotal",
        "thermo 1000",
        f"run {WARMUP_STEPS}",
        f"run {steps}",
        "",
    ]))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.pop("UMLIPFT_NO_DEEPBIND", None)
    env.pop("UMLIPFT_NO_MALLOC_TUNING", None)
    env.update(extra_env or {})
    lmp = Path(sys.executable).parent / "lmp"
    log = run_dir / "log.lammps"
    proc = subprocess.run([str(lmp), "-in", str(script), "-log", str(log), "-screen", "none"],
                          cwd=run_dir, env=env, capture_output=True, text=True, check=False)
    text = log.read_text() if log.exists() else ""
    loops = LOOP_TIME.findall(text)
    if proc.returncode != 0 or len(loops) < 2:
        raise RuntimeError(f"lmp failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}\n{text[-2000:]}")
    seconds, nsteps = loops[-1]
    cpu = CPU_USE.findall(text)
    if cpu:  # LAMMPS' CPU use of the timed run: well under 100% x threads means a shared CPU
        print(f"    (lmp: {cpu[-1]}% CPU use with {threads} torch thread(s))", flush=True)
    return 1000.0 * float(seconds) / int(nsteps)


def time_ase(atoms, model: Path, dtype: str, steps: int) -> float:
    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype=dtype)
    a = atoms.copy()
    a.calc = calc
    MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(4928459))
    dyn = VelocityVerlet(a, timestep=TIMESTEP_FS * units.fs)
    dyn.run(WARMUP_STEPS)
    t0 = time.perf_counter()
    dyn.run(steps)
    return 1000.0 * (time.perf_counter() - t0) / steps


# glibc settings equivalent to the plugin's mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1).
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"


def in_child(call: str, threads: int) -> float:
    """Evaluate ``mt.<call>`` (a timer returning ms) in a fresh process started with MALLOC_TUNABLES."""
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"torch.set_num_threads({threads}); import md_throughput as mt; print(mt.{call})")
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {call} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def time_ase_child(frames: Path, model: Path, dtype: str, steps: int, threads: int) -> float:
    """time_ase with the plugin's malloc setting."""
    return in_child(f"time_ase(mt.structure(mt.Path({str(frames)!r}), None), mt.Path({str(model)!r}), "
                    f"{dtype!r}, {steps})", threads)


def time_bare_child(frames: Path, model_pt: Path, steps: int, threads: int) -> float:
    """time_bare with the plugin's malloc setting (as the plugin runs)."""
    return in_child(f"time_bare(mt.structure(mt.Path({str(frames)!r}), None), mt.Path({str(model_pt)!r}), "
                    f"{steps})", threads)


def owned_graph(atoms, r_max: float):
    """The graph pair_style mace builds on one rank: owned atoms, periodic images as shifts."""
    from mace.data.neighborhood import get_neighborhood

    edge_index, shifts, _unit_shifts, _cell = get_neighborhood(
        positions=atoms.get_positions(), cutoff=r_max, pbc=tuple(bool(p) for p in atoms.pbc),
        cell=atoms.get_cell().array)
    return edge_index, shifts


def time_bare(atoms, model_pt: Path, steps: int) -> float:
    import numpy as np
    import torch

    from umlipft.models.export import read_export_metadata

    meta = read_export_metadata(model_pt)
    dtype = {"float32": torch.float32, "float64": torch.float64}[meta["dtype"]]
    module = torch.jit.load(str(model_pt), map_location="cpu")
    torch._C._set_graph_executor_optimize(False)  # as the plugin runs it
    z_index = {z: k for k, z in enumerate(meta["atomic_numbers"])}
    edge_index, shifts = owned_graph(atoms, meta["r_max"])
    positions = torch.tensor(atoms.get_positions(), dtype=dtype)
    species = torch.tensor([z_index[int(z)] for z in atoms.numbers], dtype=torch.long)
    edges = torch.tensor(np.ascontiguousarray(edge_index), dtype=torch.long)
    shifts_t = torch.tensor(shifts, dtype=dtype)
    n = len(atoms)
    for _ in range(WARMUP_STEPS):
        module(positions, species, edges, shifts_t, n)
    t0 = time.perf_counter()
    for _ in range(steps):
        module(positions, species, edges, shifts_t, n)
    return 1000.0 * (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=4, help="timed MD steps per path (170 atoms)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every path")
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="extra system sizes for the scan (e.g. 50 500 1500), optimised "
                        "and reference plugin paths only")
    parser.add_argument("--scan-paths", nargs="+",
                        default=["plugin_fast_fp32", "plugin_fast_fp64", "plugin_fp32", "plugin_fp64"],
                        help="plugin paths timed in the size scan")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat the 170-atom table (median) and each size-scan point (minimum)")
    parser.add_argument("--paths", nargs="*", help="only these paths (e.g. plugin_fast_fp32 ase_fp32)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=Path, default=DEFAULT_FRAMES)
    parser.add_argument("--workdir", type=Path, help="keep exports and LAMMPS runs here")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="umlipft-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()

    atoms = structure(args.frames, None)
    elements = element_list(atoms)
    fast = export_supports_fast()
    print(f"{len(atoms)} atoms ({' '.join(elements)}), {args.threads} thread(s), "
          f"{args.steps} timed steps per path after {WARMUP_STEPS} warm-up steps")
    print(f"load before: {load_average()}", flush=True)

    exports: dict[tuple[str, bool], Path] = {}

    def exported(dtype: str, optimised: bool, kernels: bool = True) -> Path:
        if (dtype, optimised, kernels) not in exports:
            exports[(dtype, optimised, kernels)] = export(args.model, dtype, workdir,
                                                          elements if optimised else None, kernels)
        return exports[(dtype, optimised, kernels)]

    steps = args.steps
    paths = {
        "plugin_fp64": lambda: time_plugin(atoms, exported("float64", False), steps, args.threads, workdir),
        "plugin_fp32": lambda: time_plugin(atoms, exported("float32", False), steps, args.threads, workdir),
        "plugin_fp64_nodeepbind": lambda: time_plugin(atoms, exported("float64", False), steps, args.threads,
                                                      workdir, {"UMLIPFT_NO_DEEPBIND": "1"}),
        "ase_fp64": lambda: time_ase(atoms, args.model, "float64", steps),
        "ase_fp32": lambda: time_ase(atoms, args.model, "float32", steps),
        "ase_fp64_tuned": lambda: time_ase_child(args.frames, args.model, "float64", steps, args.threads),
        "ase_fp32_tuned": lambda: time_ase_child(args.frames, args.model, "float32", steps, args.threads),
        "bare_fp64": lambda: time_bare_child(args.frames, exported("float64", False), steps, args.threads),
        "bare_fp32": lambda: time_bare_child(args.frames, exported("float32", False), steps, args.threads),
    }
    if fast:
        paths.update({
            "plugin_fast_fp64": lambda: time_plugin(atoms, exported("float64", True), steps, args.threads, workdir),
            "plugin_fast_fp32": lambda: time_plugin(atoms, exported("float32", True), steps, args.threads, workdir),
            "plugin_fast_fp64_nomalloc": lambda: time_plugin(atoms, exported("float64", True), steps, args.threads,
                                                             workdir, {"UMLIPFT_NO_MALLOC_TUNING": "1"}),
            "plugin_fast_fp32_nomalloc": lambda: time_plugin(atoms, exported("float32", True), steps, args.threads,
                                                             workdir, {"UMLIPFT_NO_MALLOC_TUNING": "1"}),
            "plugin_fast_nokernels_fp64": lambda: time_plugin(atoms, exported("float64", True, False), steps,
                                                              args.threads, workdir),
            "plugin_fast_nokernels_fp32": lambda: time_plugin(atoms, exported("float32", True, False), steps,
                                                              args.threads, workdir),
            "bare_fast_fp64": lambda: time_bare_child(args.frames, exported("float64", True), steps, args.threads),
            "bare_fast_fp32": lambda: time_bare_child(args.frames, exported("float32", True), steps, args.threads),
        })
    if args.paths:
        unknown = set(args.paths) - set(paths)
        if unknown:
            parser.error(f"unknown paths {sorted(unknown)}; known: {sorted(paths)}")
        paths = {k: v for k, v in paths.items() if k in args.paths}

    samples: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.repeat):
        for name, timer in paths.items():
            ms = timer()
            samples[name].append(ms)
            print(f"  [{rep + 1}/{args.repeat}] {name:24s} {ms:10.1f} ms/step", flush=True)
    results: dict[str, object] = {f"{k}_ms": statistics.median(v) for k, v in samples.items()}

    print_table(results)

    scan: dict[str, dict[str, float]] = {}
    for natoms in args.sizes:
        system = structure(args.frames, natoms)
        n_steps = max(2, round(args.steps * 170 / len(system)))
        row: dict[str, float] = {"atoms": len(system), "steps": n_steps}
        which = [("plugin_fp32", False, "float32"), ("plugin_fp64", False, "float64")]
        if fast:
            which = [("plugin_fast_fp32", True, "float32"), ("plugin_fast_fp64", True, "float64")] + which
        for name, optimised, dtype in which:
            if name not in args.scan_paths:
                continue
            ms = min(time_plugin(system, exported(dtype, optimised), n_steps, args.threads, workdir)
                     for _ in range(args.repeat))
            row[f"{name}_ms"] = ms
            print(f"  size {len(system):5d} ({'pbc' if system.pbc.any() else 'cluster'}) "
                  f"{name:18s} {ms:10.1f} ms/step ({n_steps} steps)", flush=True)
        scan[str(len(system))] = row
    if scan:
        print_scan(scan)
        results["size_scan"] = scan

    results.update({
        "samples_ms": samples,
        "atoms": len(atoms),
        "threads": args.threads,
        "steps": args.steps,
        "timestep_fs": TIMESTEP_FS,
        "load_after": load_average(),
        "torch_version": torch.__version__,
    })
    print(f"load after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_table(results: dict[str, object]) -> None:
    print()
    print(f"{'path':28s} {'ms/step':>10s} {'ns/day':>9s} {'vs ASE':>8s} {'vs ASE tuned':>13s} {'plugin/bare':>12s}"
          "   (ratios against the same dtype)")
    for key, ms in results.items():
        if not key.endswith("_ms"):
            continue
        name = key[:-3]
        dtype = "fp32" if "fp32" in name else "fp64"
        cells = []
        for reference in (f"ase_{dtype}_ms", f"ase_{dtype}_tuned_ms"):
            ase = results.get(reference)
            cells.append(f"{ase / ms:.2f}x" if ase and not name.startswith("ase_") else "")
        bare_key = (name.replace("plugin_", "bare_").replace("_nodeepbind", "").replace("_nomalloc", "")
                    + "_ms")
        ratio = ""
        if name.startswith("plugin_") and bare_key in results:
            ratio = f"{ms / results[bare_key]:.2f}"
        print(f"{name:28s} {ms:10.1f} {ns_per_day(ms):9.4f} {cells[0]:>8s} {cells[1]:>13s} {ratio:>12s}")
    print()


def print_scan(scan: dict[str, dict[str, float]]) -> None:
    names = sorted({k for row in scan.values() for k in row if k.endswith("_ms")})
    print(f"{'atoms':>6s} " + " ".join(f"{n[:-3]:>18s}" for n in names) + "   (ms/step; us/atom/step)")
    for row in scan.values():
        cells = []
        for n in names:
            ms = row.get(n)
            cells.append(f"{ms:9.1f} ({1000 * ms / row['atoms']:5.0f})" if ms else f"{'-':>18s}")
        print(f"{int(row['atoms']):6d} " + " ".join(cells))
    print()


if __name__ == "__main__":
    sys.exit(main())
