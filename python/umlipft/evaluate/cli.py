"""``umlipft evaluate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="errors of models on labelled frames; cross-evaluation; self-consistent MD residual",
        description="Evaluate every --model on every FRAMES file (energy residual (E_model-E_ref)/N "
        "in meV/atom, force RMSE overall and per element, stress RMSE) and, with --md-log, the "
        "self-consistent residual (PotEng of the MD at each labelled step - E_ref)/N. Models and "
        "frames may be given as NAME=PATH. Writes evaluation.json, evaluation.csv, per-frame CSVs.",
    )
    parser.add_argument("frames", nargs="*", help="labelled frames (extxyz with REF_energy/REF_forces or energy/forces)")
    parser.add_argument("--model", dest="models", action="append",
                        help="mace-torch .model file or foundation name; repeat for cross-evaluation")
    parser.add_argument("--md-log", help="thermo log of the MD run the frames were labelled from")
    parser.add_argument("-o", "--output-dir", help="output directory (default: evaluation)")
    parser.add_argument("--config", help="YAML file with EvaluateConfig keys; flags override it")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="evaluation precision (default float64)")
    parser.add_argument("--head", help="head of a multi-head model (default: the fine-tuned one)")
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument("--energy-key", help="info key of reference energies (default REF_energy, falls back to energy)")
    parser.add_argument("--forces-key", help="arrays key of reference forces (default REF_forces)")
    parser.add_argument("--stress-key", help="info key of reference stress (default REF_stress)")
    parser.add_argument("--step-key", help="info key holding each frame's MD step (default step)")
    parser.add_argument("--dump-every-steps", type=int,
                        help="steps between dumps, for frames that only carry a dump index in 'source' (default 1000)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .driver import EvaluateConfig, evaluate

    overrides = {
        "models": tuple(args.models) if args.models else None,
        "frames": tuple(args.frames) if args.frames else None,
        "md_log": args.md_log, "output_dir": args.output_dir, "dtype": args.dtype, "head": args.head,
        "device": args.device, "energy_key": args.energy_key, "forces_key": args.forces_key,
        "stress_key": args.stress_key, "step_key": args.step_key, "dump_every_steps": args.dump_every_steps,
    }
    if args.config:
        config = EvaluateConfig.from_yaml(args.config, **overrides)
    else:
        config = EvaluateConfig.from_dict({k: v for k, v in overrides.items() if v is not None},
                                          source="command line")
    result = evaluate(config, progress=True)
    for r in result.reports:
        s = r.summary
        stress = f"{s.stress_rmse_eV_per_A3 * 1000:.3f} meV/Å³" if s.stress_rmse_eV_per_A3 is not None else "n/a"
        print(f"{r.model} on {r.frames} ({s.n_frames} frames): energy residual mean "
              f"{s.energy_residual_mean_meV_per_atom:+.2f}, RMSE {s.energy_residual_rmse_meV_per_atom:.2f} meV/atom; "
              f"force RMSE {s.force_rmse_eV_per_A:.4f} eV/Å; stress RMSE {stress}")
        per_el = ", ".join(f"{el} {v:.4f}" for el, v in s.force_rmse_per_element_eV_per_A.items())
        print(f"  force RMSE per element (eV/Å): {per_el}")
    if result.self_consistent:
        sc = result.self_consistent
        print(f"self-consistent residual ({sc.n_frames} frames): mean {sc.residual_mean_meV_per_atom:+.2f}, "
              f"RMSE {sc.residual_rmse_meV_per_atom:.2f} meV/atom")
    print(f"wrote {result.json_path}" + (f" and {result.csv_path}" if result.csv_path else ""))
    return 0
