"""``umlipft build aqueous|des``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build",
        help="pack a start structure (aqueous LiCl+CoCl2 or ChCl:citric acid DES) with Packmol",
        description="Pack the study's systems at a target density with no overlaps. Counts and "
        "density default to the study's (aqueous: 55 H2O + LiCl + CoCl2, 1.0 g/cm3; des: "
        "3 ChCl + 6 citric acid + LiCl + CoCl2, 1.2 g/cm3). Flags override --config.",
    )
    p.add_argument("system", choices=("aqueous", "des"))
    p.add_argument("-o", "--output", help="output structure (.extxyz, POSCAR/.vasp, .data); "
                   "default SYSTEM-seedSEED.extxyz")
    p.add_argument("--config", help="YAML file with BuildConfig keys")
    p.add_argument("--seed", type=int)
    p.add_argument("--density-g-cm3", type=float, dest="density_g_cm3")
    p.add_argument("--n-water", type=int, dest="n_water")
    p.add_argument("--n-choline-chloride", type=int, dest="n_choline_chloride")
    p.add_argument("--n-citric-acid", type=int, dest="n_citric_acid")
    p.add_argument("--n-licl", type=int, dest="n_licl")
    p.add_argument("--n-cocl2", type=int, dest="n_cocl2")
    p.add_argument("--tolerance-A", type=float, dest="tolerance_A",
                   help="minimum distance between molecules, Å (default 2.0)")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from .core import BuildConfig, run_build

    overrides = {k: getattr(args, k) for k in ("seed", "density_g_cm3", "n_water", "n_choline_chloride",
                                               "n_citric_acid", "n_licl", "n_cocl2", "tolerance_A",
                                               "output")}
    overrides["system"] = args.system
    config = BuildConfig.from_command_line(args.config, overrides)
    path = run_build(config)
    print(f"wrote {path}")
    return 0
