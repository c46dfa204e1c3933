"""``umlipft extract TRAJ``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="pick frames from an MD trajectory (time window, random, farthest-point)",
        description="Select frames by time (e.g. --start 0.5ns --stop 1.0ns --every 0.05ns), "
        "then optionally --count N of them at random (--seed) or by farthest-point sampling in "
        "SOAP space (--method fps). Each frame keeps source_file, source_index, step and "
        "time_ps in its info. Flags override --config.",
    )
    p.add_argument("trajectory", help="trajectory in any ASE format (extxyz from umlipft md)")
    p.add_argument("-o", "--output", help="output extxyz (default TRAJ-frames.extxyz)")
    p.add_argument("--config", help="YAML file with ExtractConfig keys")
    p.add_argument("--start", help="window start with unit, e.g. 0.5ns or 500ps")
    p.add_argument("--stop", help="window end with unit (default: end of trajectory)")
    p.add_argument("--every", help="take the frame nearest every this interval, e.g. 0.05ns")
    p.add_argument("--count", type=int, help="pick this many frames from the window")
    p.add_argument("--method", choices=("random", "fps"), help="how --count picks (default random)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timestep-fs", type=float, dest="timestep_fs",
                   help="MD timestep, to turn a frame's 'step' into time")
    p.add_argument("--dump-interval-ps", type=float, dest="dump_interval_ps",
                   help="time between frames when they carry neither time nor step")
    p.add_argument("--format", help="ASE format of TRAJ if its name does not tell")
    p.set_defaults(func=_extract)


def _extract(args: argparse.Namespace) -> int:
    from .core import ExtractConfig, parse_time_ns, run_extract

    overrides = {
        "trajectory": args.trajectory,
        "output": args.output,
        "start_ns": parse_time_ns(args.start) if args.start else None,
        "stop_ns": parse_time_ns(args.stop) if args.stop else None,
        "every_ns": parse_time_ns(args.every) if args.every else None,
        "count": args.count,
        "method": args.method,
        "seed": args.seed,
        "timestep_fs": args.timestep_fs,
        "dump_interval_ps": args.dump_interval_ps,
        "format": args.format,
    }
    config = ExtractConfig.from_command_line(args.config, overrides)
    path = run_extract(config)
    print(f"wrote {path}")
    return 0
