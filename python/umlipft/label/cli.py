"""``umlipft label FRAMES --calculator cp2k|xtb|vasp|espresso``."""

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
        "in --config under cp2k:/xtb:/vasp:/espresso: sections.",
    )
    p.add_argument("frames", help="structures in any ASE format (extxyz from umlipft extract)")
    p.add_argument("--calculator", choices=("cp2k", "xtb", "vasp", "espresso"))
    p.add_argument("--config", help="YAML file with LabelConfig keys")
    p.add_argument("-o", "--output", help="labelled extxyz (default FRAMES-labelled.extxyz)")
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


def _label(args: argparse.Namespace) -> int:
    import sys

    from ..errors import ConfigError
    from .config import LabelConfig
    from .core import label_frames

    top = {k: getattr(args, k) for k in ("frames", "calculator", "output", "workdir", "processes",
                                         "threads_per_frame", "timeout_s", "retry_failed", "format")}
    if args.config:
        config = LabelConfig.from_yaml(args.config, **top)
    else:
        config = LabelConfig.from_dict({k: v for k, v in top.items() if v is not None},
                                       source="command line")
    code: dict = {"charge": args.charge, "multiplicity": args.multiplicity}
    if args.hubbard_u:
        if config.calculator == "xtb":
            raise ConfigError("--hubbard-u does not apply to xtb")
        values = dict(config.code_config().hubbard_u_eV)  # type: ignore[attr-defined]
        for item in args.hubbard_u:
            element, _, value = item.partition("=")
            try:
                values[element.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"--hubbard-u expects EL=U_eV such as Co=5.76, got {item!r}") from None
        code["hubbard_u_eV"] = values
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
