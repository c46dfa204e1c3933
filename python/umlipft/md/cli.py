"""``umlipft md``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "md",
        help="run NVT/NPT molecular dynamics in LAMMPS with pair_style mace",
        description="Run LAMMPS MD with pair_style mace from the packaged lammps_inputs. "
        "Under 'mpiexec -n K umlipft md --replicas K' the K replicas run at once on split MPI "
        "communicators; without MPI they run one after another. Rerunning the same command "
        "resumes a killed run (with --restart-every) and skips finished replicas.",
    )
    parser.add_argument("structure", nargs="*", help="start structure(s), any format ASE reads (one per replica allowed)")
    parser.add_argument("--config", help="YAML file with MDConfig keys; flags override it")
    parser.add_argument("-o", "--output", help="run directory (default md-run)")
    parser.add_argument("--continue-from", dest="continue_from", help="previous run directory: continue from its last frame with velocities and box")
    parser.add_argument("--model", help="exported .pt, mace-torch .model, or foundation name (default small)")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="dtype when the model needs exporting")
    parser.add_argument("--elements", nargs="+", help="element of each atom type, in order (default: sorted by Z)")
    parser.add_argument("--ensemble", choices=("nvt", "npt"))
    parser.add_argument("--temperature-K", dest="temperature_K", type=float)
    parser.add_argument("--pressure-bar", dest="pressure_bar", type=float)
    parser.add_argument("--timestep-fs", dest="timestep_fs", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--thermo-every", dest="thermo_every", type=int)
    parser.add_argument("--dump-every", dest="dump_every", type=int)
    parser.add_argument("--restart-every", dest="restart_every", type=int, help="write restart files every N steps (0: off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--min-distance-A", dest="min_distance_A", type=float,
                        help="refuse atoms closer than this at the start (default 0.5; 0: off)")
    parser.add_argument("--max-force-eV-A", dest="max_force_eV_A", type=float,
                        help="watchdog: stop when a force exceeds this (default 50; 0: off)")
    parser.add_argument("--watchdog-temperature-factor", dest="watchdog_temperature_factor", type=float,
                        help="watchdog: stop above this multiple of --temperature-K (default 10; 0: off)")
    parser.add_argument("--watch-every", dest="watch_every", type=int,
                        help="extrapolation watch (NVT, model exported with --watch): check every N steps, "
                             "keep flagged frames, stop when the model left its data (default 0: off)")
    parser.add_argument("--watch-patience", dest="watch_patience", type=int,
                        help="stop after this many consecutive checks outside the data (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    from .config import MDConfig
    from .run import run_md, run_md_mpi

    overrides = {key: getattr(args, key) for key in (
        "output", "continue_from", "model", "dtype", "ensemble", "temperature_K", "pressure_bar",
        "timestep_fs", "steps", "thermo_every", "dump_every", "restart_every", "seed", "replicas",
        "min_distance_A", "max_force_eV_A", "watchdog_temperature_factor", "watch_every", "watch_patience")}
    if args.structure:
        overrides["structure"] = tuple(args.structure)
    if args.elements:
        overrides["elements"] = tuple(args.elements)
    config = MDConfig.from_command_line(args.config, overrides)
    under_mpi = any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))
    if under_mpi:
        results = run_md_mpi(config)
    else:
        results = run_md(config, progress=not args.no_progress)
    for result in results:
        print(f"{result.directory}: {result.steps} steps, {result.simulated_ps:.3f} ps, "
              f"{result.ns_per_day:.4f} ns/day -> {result.trajectory}")
        if result.watch and result.watch["halted"]:
            atoms = ", ".join(f"{a['element']}{a['id']}" for a in result.watch["fired_atoms"][:8])
            print(f"  the extrapolation watch stopped the run at step {result.watch['halted_at_step']} "
                  f"(atoms beyond the training data: {atoms or 'none'}); flagged frames: "
                  f"{result.directory / 'flagged.extxyz'}")
    return 0
