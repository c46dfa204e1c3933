"""``umlipft label FRAMES --calculator cp2k|xtb|vasp|espresso`` and
``umlipft label --isolated-atoms --elements H O ... --calculator CODE -o DIR``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "label",
        help="single points of frames with CP2K, xTB, VASP or Quantum ESPRESSO (restartable)",
        description="Write REF_energy, REF_forces and REF_stress (eV, eV/Å, eV/Å^3, ASE sign) "
        "for every frame. Each frame runs in its own directory under --workdir; failed frames "
        "are recorded (failed.json) and skipped; rerunning the same command resumes. Run frames "
        "in parallel with --processes N or 'mpiexec -n N umlipft label ...'. Code settings go "
        "in --config under cp2k:/xtb:/vasp:/espresso: sections. With --isolated-atoms: the "
        "energy of one neutral atom per element (ground-state multiplicity, --box-A cubic box) "
        "with the same code and settings, for a fine-tune's E0s (umlipft finetune "
        "--isolated-atoms-file DIR/isolated_atoms.extxyz); rerunning with the same settings "
        "recomputes nothing.",
    )
    p.add_argument("frames", nargs="?",
                   help="structures in any ASE format (extxyz from umlipft extract); with --isolated-atoms "
                   "optional: their elements are labelled")
    p.add_argument("--isolated-atoms", action="store_true", dest="isolated_atoms",
                   help="label isolated atoms of --elements (and of FRAMES' elements) into -o DIR")
    p.add_argument("--elements", nargs="+", metavar="EL", help="elements for --isolated-atoms, e.g. H O Co")
    p.add_argument("--box-A", type=float, dest="box_A",
                   help="cubic box edge for --isolated-atoms, Å (default 12)")
    p.add_argument("--calculator", choices=("cp2k", "xtb", "vasp", "espresso"))
    p.add_argument("--config", help="YAML file with LabelConfig keys")
    p.add_argument("-o", "--output", help="labelled extxyz (default FRAMES-labelled.extxyz); with "
                   "--isolated-atoms the output directory (default isolated-atoms)")
    p.add_argument("--workdir", help="per-frame directories (default OUTPUT-label/)")
    p.add_argument("--processes", type=int, help="frames at once on this machine (default 1)")
    p.add_argument("--threads-per-frame", type=int, dest="threads_per_frame")
    p.add_argument("--timeout-s", type=float, dest="timeout_s", help="per-frame time limit")
    p.add_argument("--retry-failed", action="store_true", default=None, dest="retry_failed",
                   help="run frames that failed before again")
    p.add_argument("--format", help="ASE format of FRAMES if its name does not tell")
    p.add_argument("--charge", type=int, help="total charge, e (default 0)")
    p.add_argument("--multiplicity", type=int, help="spin multiplicity (default: automatic, "
                   "high-spin Co(II))")
    p.add_argument("--hubbard-u", action="append", metavar="EL=U_eV", dest="hubbard_u",
                   help="+U on an element's d shell, e.g. Co=5.76 (cp2k, vasp, espresso)")
    p.set_defaults(func=_label)


def _hubbard(args: argparse.Namespace, calculator: str, current: dict[str, float]) -> dict[str, float] | None:
    from ..errors import ConfigError

    if not args.hubbard_u:
        return None
    if calculator == "xtb":
        raise ConfigError("--hubbard-u does not apply to xtb")
    values = dict(current)
    for item in args.hubbard_u:
        element, _, value = item.partition("=")
        try:
            values[element.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--hubbard-u expects EL=U_eV such as Co=5.76, got {item!r}") from None
    return values


def _isolated(args: argparse.Namespace) -> int:
    """--isolated-atoms: the settings of a labelling run (its YAML may name FRAMES, output and
    workdir; those keys are for frames and are ignored here) applied to isolated atoms."""
    import os

    from ..config import read_yaml_mapping
    from ..errors import ConfigError
    from ..io import read_frames
    from .isolated import IsolatedAtomsConfig, label_isolated_atoms

    for flag, value in (("--workdir", args.workdir), ("--charge", args.charge),
                        ("--multiplicity", args.multiplicity)):
        if value is not None:
            raise ConfigError(f"{flag} does not apply with --isolated-atoms: isolated atoms are neutral, "
                              "with their ground-state multiplicity, and -o DIR holds everything")
    values = read_yaml_mapping(args.config) if args.config else {}
    for key in ("frames", "output", "workdir", "format"):
        values.pop(key, None)
    top = {k: getattr(args, k) for k in ("calculator", "processes", "threads_per_frame", "timeout_s",
                                         "retry_failed", "box_A")}
    values.update({k: v for k, v in top.items() if v is not None})
    config = IsolatedAtomsConfig.from_dict(values, source=args.config or "command line")
    hubbard = _hubbard(args, config.calculator, getattr(config.code_config(), "hubbard_u_eV", {}))
    if hubbard is not None:
        config = config.replace(**{config.calculator: config.code_config().replace(hubbard_u_eV=hubbard)})
    elements = list(args.elements or [])
    if args.frames:
        elements += sorted({s for a in read_frames(args.frames, format=args.format)
                            for s in a.get_chemical_symbols()})
    if not elements:
        raise ConfigError("--isolated-atoms needs --elements EL ... or FRAMES to take the elements from")
    report = label_isolated_atoms(config, elements, args.output or "isolated-atoms")
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    if rank == "0":
        for el, energy in report.energies_eV.items():
            how = "reused" if el in report.reused else "computed"
            print(f"{el:>2}  multiplicity {report.multiplicities[el]}  E = {energy:.6f} eV  ({how}, "
                  f"{report.run_dirs[el]})")
        print(f"wrote {report.output} and {report.summary}")
    return 0


def _label(args: argparse.Namespace) -> int:
    import sys

    from ..errors import ConfigError
    from .config import LabelConfig
    from .core import label_frames

    if args.isolated_atoms:
        return _isolated(args)
    if args.frames is None:
        raise ConfigError("FRAMES is required (or --isolated-atoms --elements EL ...)")
    if args.elements or args.box_A is not None:
        raise ConfigError("--elements and --box-A apply only with --isolated-atoms")
    top = {k: getattr(args, k) for k in ("frames", "calculator", "output", "workdir", "processes",
                                         "threads_per_frame", "timeout_s", "retry_failed", "format")}
    if args.config:
        config = LabelConfig.from_yaml(args.config, **top)
    else:
        config = LabelConfig.from_dict({k: v for k, v in top.items() if v is not None},
                                       source="command line")
    code: dict = {"charge": args.charge, "multiplicity": args.multiplicity,
                  "hubbard_u_eV": _hubbard(args, config.calculator,
                                           getattr(config.code_config(), "hubbard_u_eV", {}))}
    if any(v is not None for v in code.values()):
        config = config.replace(**{config.calculator: config.code_config().replace(**code)})
    report = label_frames(config)
    import os

    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    if rank != "0":  # every rank holds the same report; one of them speaks
        return 0 if report.output is not None else 1
    for i, reason in report.failed.items():
        print(f"frame {i} failed: {reason}", file=sys.stderr)
    if report.output is not None:
        print(f"wrote {report.output}: {report.n_done} of {report.n_frames} frames labelled "
              f"({len(report.labelled)} now, {len(report.reused)} from before, "
              f"{len(report.failed)} failed)")
    return 0 if report.output is not None else 1
