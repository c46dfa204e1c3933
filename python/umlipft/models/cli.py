"""``umlipft export`` and ``umlipft models``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a mace-torch model for pair_style mace",
        description="Convert a mace-torch model (a file, or a foundation name such as 'small' "
        "installed with 'umlipft models add') into the TorchScript file pair_style mace loads.",
    )
    export.add_argument("model", help="mace-torch .model file or foundation name (small, medium, ...)")
    export.add_argument("-o", "--output", help="output file (default: MODEL-lammps-DTYPE.pt)")
    export.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    export.add_argument("--head", help="head to export from a multi-head model")
    export.add_argument(
        "--elements", nargs="+", metavar="EL",
        help="elements the simulation uses (e.g. H O Cl Co Li): export a model restricted to them "
        "with the optimised convolution (much faster on CPU, same results to rounding)")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument(
        "--reference", action="store_true",
        help="export the plain mace-torch model with all its elements (for checking)")
    mode.add_argument(
        "--optimize", action="store_true",
        help="use the optimised convolution even without --elements (all elements kept)")
    export.add_argument(
        "--no-kernels", dest="kernels", action="store_false",
        help="optimised export without umlipft's compiled CPU kernels (pure PyTorch; for checking)")
    export.add_argument(
        "--watch", metavar="TRAIN.extxyz",
        help="store an extrapolation watch fitted on these training frames: a PCA of the model's own "
        "invariant node features with per-element Q-residual limits, read by compute mace/q")
    export.add_argument("--watch-components", type=int, metavar="K",
                        help="principal components of the watch (default 5, as umlipft analyze pca)")
    export.add_argument("--watch-alpha", type=float, metavar="A",
                        help="per-atom false-alarm probability of the watch's Q limits (default 0.01)")
    export.set_defaults(func=_export)

    models = subparsers.add_parser("models", help="manage offline foundation models")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="install a local model file under a foundation name (for nodes without internet)",
    )
    add.add_argument("path", help="the model file, e.g. 2023-12-10-mace-128-L0_energy_epoch-249.model")
    add.add_argument("--as", dest="name", required=True, help="foundation name, e.g. small or medium")
    add.set_defaults(func=_add)
    listing = actions.add_parser("list", help="show foundation names and whether they resolve here")
    listing.set_defaults(func=_list)


def _export(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .export import ExportConfig, export_lammps_model

    if not args.watch and (args.watch_components is not None or args.watch_alpha is not None):
        raise ConfigError("--watch-components and --watch-alpha set up the watch: give --watch TRAIN.extxyz too")
    watch = {k: v for k, v in (("watch_components", args.watch_components), ("watch_alpha", args.watch_alpha))
             if v is not None}
    config = ExportConfig(model=args.model, output=args.output or "", dtype=args.dtype, head=args.head,
                          elements=tuple(args.elements) if args.elements else None,
                          reference=args.reference, optimize=True if args.optimize else None,
                          kernels=args.kernels, watch=args.watch, **watch)
    config.validate()
    path = export_lammps_model(config)
    print(f"wrote {path}" + (f" with a watch fitted on {config.watch}" if config.watch else ""))
    return 0


def _add(args: argparse.Namespace) -> int:
    from .foundation import add_foundation_model

    target = add_foundation_model(args.path, args.name)
    print(f"installed {args.path} as {args.name!r}: {target}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .foundation import FOUNDATION_NAMES, cached_path

    for name in FOUNDATION_NAMES:
        path = cached_path(name)
        print(f"{name:14s} {'available' if path.is_file() else 'missing  '} {path}")
    return 0
