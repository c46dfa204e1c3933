"""``umlipft analyze pca|q|coverage|bonds|coordination|events``: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="descriptor-space and chemistry analyses of datasets and trajectories",
        description="PCA of per-atom descriptors (SOAP or MACE features), Q-residual/T² monitoring, "
        "coverage maps, bond lengths, coordination numbers and chemical events.")
    actions = analyze.add_subparsers(dest="analyze_command", metavar="ANALYSIS", required=True)

    pca = actions.add_parser("pca", help="fit a PCA of per-atom descriptors on reference datasets")
    pca.add_argument("--fit", nargs="+", required=True, metavar="FILE", help="reference datasets (any ASE format)")
    pca.add_argument("--descriptor", choices=("soap", "mace"), help="default soap")
    pca.add_argument("--model", help="mace-torch model file or foundation name (for --descriptor mace)")
    pca.add_argument("--components", type=int, help="number of principal components (default 5)")
    pca.add_argument("--per-element", action="store_true", default=None, help="one PCA per element")
    pca.add_argument("--max-atoms-per-group", type=int, help="random subsample per PCA to bound memory")
    pca.add_argument("--seed", type=int)
    pca.add_argument("--config", help="YAML file with PCAConfig keys (flags override it)")
    pca.add_argument("--index", default=":", help="frames of each file to use, ASE syntax (default all)")
    pca.add_argument("-o", "--output", required=True, metavar="PCA_DIR")
    pca.add_argument("--json", metavar="OUT.json", help="write explained variance and settings here too")
    pca.set_defaults(func=_pca)

    q = actions.add_parser("q", help="per-atom Q-residual and T² of a trajectory against a fitted PCA")
    q.add_argument("--pca", required=True, metavar="PCA_DIR")
    q.add_argument("frames", metavar="FRAMES")
    q.add_argument("-o", "--output", required=True, metavar="OUT")
    q.add_argument("--alpha", type=float, help="false-alarm probability of the limits (default 0.01)")
    q.add_argument("--k-sigma", type=float, help="empirical band width (default 2)")
    q.add_argument("--batch-frames", type=int, help="frames per descriptor batch (default 4)")
    q.add_argument("--frame-interval-ps", type=float, help="time between frames; else frame numbers")
    q.add_argument("--model", help="path of the MACE model if it moved since the PCA was fitted")
    q.add_argument("--track", type=int, nargs="+",
                   help="atom indices to plot (default: the atoms of --events, else the highest-Q atom of "
                   "each element)")
    q.add_argument("--n-track", type=int, help="at most this many event atoms (default 5)")
    q.add_argument("--events", metavar="EVENTS.json",
                   help="events from 'analyze events --json': marked on the plots, their atoms tracked")
    _frame_options(q)
    q.add_argument("--config", help="YAML file with QConfig keys")
    q.add_argument("--json", metavar="OUT.json", help="copy of the results summary")
    q.set_defaults(func=_q)

    cov = actions.add_parser("coverage", help="PC1/PC2 coverage maps and 'A not in B' regions")
    cov.add_argument("--pca", required=True, metavar="PCA_DIR")
    cov.add_argument("--a", nargs="+", required=True, metavar="FILE", help="dataset(s) A")
    cov.add_argument("--b", nargs="+", required=True, metavar="FILE", help="dataset(s) B")
    cov.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("A", "B"))
    cov.add_argument("--per-iteration", action="store_true",
                     help="compare A[i] with B[i] pairwise (same number of files) instead of the unions")
    cov.add_argument("--cumulative", action="store_true", help="with --per-iteration: union of files 0..i")
    cov.add_argument("--by-element", action="store_true", help="a coverage per element (union only)")
    cov.add_argument("--bins", type=int, default=50)
    cov.add_argument("--min-count", type=int, default=1)
    cov.add_argument("--model", help="path of the MACE model if it moved")
    cov.add_argument("-o", "--output", required=True, metavar="OUT")
    cov.add_argument("--json", metavar="OUT.json")
    cov.set_defaults(func=_coverage)

    bonds = actions.add_parser("bonds", help="bond-length distributions of element pairs")
    bonds.add_argument("frames", nargs="+", metavar="FRAMES", help="one or more files (one line each)")
    bonds.add_argument("--pair", action="append", metavar="A-B[:CUTOFF]",
                       help="pair and cutoff in Å (repeat); default O-H:1.25 C-O:1.6 H-Cl:1.6")
    bonds.add_argument("--bin-width", type=float, default=0.01, help="histogram bin in Å")
    _common_outputs(bonds)
    bonds.set_defaults(func=_bonds)

    coord = actions.add_parser("coordination", help="coordination numbers over time")
    coord.add_argument("frames", metavar="FRAMES")
    coord.add_argument("--rule", action="append", metavar="CENTRE-LIGAND[:CUTOFF]",
                       help="repeatable; default Co-Cl:2.7 Co-O:2.6 (the study's criteria)")
    coord.add_argument("--frame-interval-ps", type=float)
    _common_outputs(coord)
    coord.set_defaults(func=_coordination)

    events = actions.add_parser("events", help="H-Cl formation, coordination changes, proton transfers")
    events.add_argument("frames", metavar="FRAMES")
    events.add_argument("--bond", action="append", metavar="A-B[:CUTOFF]", help="default H-Cl:1.6")
    events.add_argument("--coordination", action="append", metavar="CENTRE-LIGAND[:CUTOFF]",
                        help="default Co-Cl:2.7 Co-O:2.6")
    events.add_argument("--no-proton-transfers", action="store_true")
    events.add_argument("--persistence-frames", type=int, help="frames a change must last (default 1)")
    events.add_argument("--frame-interval-ps", type=float)
    events.add_argument("--config", help="YAML file with EventsConfig keys")
    _common_outputs(events)
    events.set_defaults(func=_events)

    from ..lock import locks_output

    for name, parser in (("pca", pca), ("q", q), ("coverage", cov), ("bonds", bonds),
                         ("coordination", coord), ("events", events)):  # one run per -o DIR
        locked = locks_output(f"analyze {name}", lambda args: args.output)
        parser.set_defaults(func=locked(parser.get_default("func")))


def _frame_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="frames to use, ASE syntax, e.g. '::10' (default all)")
    parser.add_argument("--format", help="ASE format if not guessed from the name (e.g. lammps-dump-text)")


def _common_outputs(parser: argparse.ArgumentParser) -> None:
    _frame_options(parser)
    parser.add_argument("-o", "--output", metavar="DIR", help="write figure, data and run summary here")
    parser.add_argument("--json", metavar="OUT.json", help="write the numbers as JSON")


def _write_json(path: str | Path, data: Any) -> None:
    from ..io import atomic_write_text
    from .plots import _jsonable

    atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def _finish(summary: Any, output: str | None, status: str = "finished") -> None:
    if output:
        summary.write(Path(output) / "summary.json", status)


# ----------------------------------------------------------------------------- pca
def _pca(args: argparse.Namespace) -> int:
    from ..summary import RunSummary
    from .pca import PCAConfig, fit_pca_files
    from .plots import plot_pca_map, save_figure

    overrides = {"descriptor": args.descriptor, "model": args.model, "components": args.components,
                 "per_element": args.per_element, "max_atoms_per_group": args.max_atoms_per_group,
                 "seed": args.seed}
    config = PCAConfig.from_yaml(args.config, **overrides) if args.config else PCAConfig().replace(**overrides)
    out = Path(args.output)
    summary = RunSummary("analyze pca", config, seed=config.seed)
    with summary.timed("fit_s"):
        model, feats = fit_pca_files(args.fit, config, index=args.index)
    model.save(out)
    with summary.timed("figure_s"):
        scores = model.transform(feats.features, feats.symbols)
        fig, data = plot_pca_map(scores, feats.symbols, model.explained_variance_ratio,
                                 title=f"{config.descriptor.upper()} PCA of the fitting data")
        save_figure(fig, data, out / "pca_map.png",
                    caption=f"PC1/PC2 of every atom of {', '.join(Path(p).name for p in args.fit)}, by element.")
    result = {"explained_variance_ratio": model.explained_variance_ratio,
              "pc1_pc2_explained": sum(model.explained_variance_ratio[:2]),
              "n_components": model.n_components, "per_element": model.per_element,
              "descriptor": model.descriptor_settings, "n_features": model.n_features,
              "n_atoms": int(feats.symbols.size), "fit": [str(p) for p in args.fit],
              "groups": {k: {"explained_variance_ratio": g.explained_variance_ratio.tolist(),
                             "n_samples": g.n_samples} for k, g in model.groups.items()},
              "skipped": model.skipped, "pca_dir": str(out)}
    if args.json:
        _write_json(args.json, result)
    summary.results = result
    _finish(summary, args.output)
    evr = ", ".join(f"{v:.3f}" for v in model.explained_variance_ratio)
    print(f"PCA ({config.descriptor}, {model.n_features} features, {feats.symbols.size} atoms) -> {out}")
    print(f"explained variance ratio: {evr} (PC1+PC2 {100 * result['pc1_pc2_explained']:.1f} %)")
    for element, reason in model.skipped.items():
        print(f"warning: no PCA for {element}: {reason}")
    return 0


# ------------------------------------------------------------------------------- q
def _q(args: argparse.Namespace) -> int:
    from ..summary import RunSummary
    from .monitor import QConfig, analyze_trajectory, plot_tracked
    from .pca import DescriptorPCA
    from .plots import save_figure

    overrides = {"alpha": args.alpha, "k_sigma": args.k_sigma, "batch_frames": args.batch_frames,
                 "frame_interval_ps": args.frame_interval_ps, "model": args.model,
                 "track": tuple(args.track) if args.track else None, "n_track": args.n_track,
                 "index": args.index, "format": args.format}
    config = QConfig.from_yaml(args.config, **overrides) if args.config else QConfig().replace(**overrides)
    pca = DescriptorPCA.load(args.pca)
    summary = RunSummary("analyze q", config)
    events = _load_events(args.events) if args.events else []
    with summary.timed("analysis_s"):
        result = analyze_trajectory(pca, args.frames, args.output, config, events=events)
    for key, name, ylabel in (("q", "q_timeseries.png", "Q-residual"), ("t2", "t2_timeseries.png", "Hotelling T²")):
        fig, data = plot_tracked(result, key, events)
        save_figure(fig, data, Path(args.output) / name,
                    caption=f"{ylabel} of the tracked atoms of {Path(args.frames).name} "
                    f"({result.summary['tracked_because']}). Shaded: each atom's own mean ± {config.k_sigma:g}σ "
                    f"over the trajectory (the study's band); dashed: its element's training-set limit at "
                    f"alpha = {config.alpha:g}.")
    summary.results = {k: result.summary[k] for k in ("n_frames", "n_atoms", "per_element", "tracked_atoms",
                                                      "tracked_because", "tracked", "elements_without_pca")}
    if args.json:
        _write_json(args.json, result.summary)
    _finish(summary, args.output)
    print(f"{result.summary['n_frames']} frames x {result.summary['n_atoms']} atoms -> {args.output}")
    for element, info in result.summary["per_element"].items():
        print(f"  {element:2s}: Q above limit {100 * info['q_flag_fraction']:.2f} % of atom-frames, "
              f"T² above limit {100 * info['t2_flag_fraction']:.2f} %, max Q {info['max_q']:.4g}")
    return 0


def _load_events(path: str) -> list:
    from ..errors import InputError
    from .geometry import Event

    try:
        doc = json.loads(Path(path).read_text())
        return [Event(**{**e, "atoms": tuple(e["atoms"])}) for e in doc["events"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not an events file from 'umlipft analyze events --json': {err}") from None


# ------------------------------------------------------------------------ coverage
def _coverage(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import InputError
    from ..io import read_frames
    from ..summary import RunSummary
    from .coverage import coverage, coverage_by_element
    from .pca import DescriptorPCA, compute_features
    from .plots import plot_coverage, save_figure

    pca = DescriptorPCA.load(args.pca)
    descriptor = pca.descriptor(args.model)
    summary = RunSummary("analyze coverage", {k: v for k, v in vars(args).items() if k != "func"})
    out = Path(args.output)

    def scores_of(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from .frames import drop_isolated_atoms

        feats = compute_features({p: drop_isolated_atoms(read_frames(p)) for p in paths}, descriptor)
        return pca.transform(feats.features, feats.symbols), feats.symbols

    label_a, label_b = args.labels
    panels = {}
    with summary.timed("coverage_s"):
        if args.per_iteration:
            if len(args.a) != len(args.b):
                raise InputError(f"--per-iteration pairs files: got {len(args.a)} for A and {len(args.b)} for B")
            cache = {p: scores_of([p]) for p in dict.fromkeys([*args.a, *args.b])}
            for i in range(len(args.a)):
                pick_a = args.a[:i + 1] if args.cumulative else [args.a[i]]
                pick_b = args.b[:i + 1] if args.cumulative else [args.b[i]]
                sa = np.vstack([cache[p][0] for p in pick_a])
                sb = np.vstack([cache[p][0] for p in pick_b])
                panels[f"iteration {i + 1}"] = coverage(sa, sb, args.bins, args.min_count, label_a, label_b)
        else:
            sa, ya = scores_of(args.a)
            sb, yb = scores_of(args.b)
            if args.by_element:
                panels = coverage_by_element(sa, ya, sb, yb, bins=args.bins, min_count=args.min_count,
                                             label_a=label_a, label_b=label_b)
            else:
                panels = {"all atoms": coverage(sa, sb, args.bins, args.min_count, label_a, label_b)}
    fig, data = plot_coverage(panels)
    save_figure(fig, data, out / "coverage.png",
                caption=f"Cells of PC1/PC2 covered by {label_a} only (orange), {label_b} only (blue) and "
                f"both (grey); {args.bins}x{args.bins} grid, covered = at least {args.min_count} atom(s).")
    result = {name: cov.to_dict() for name, cov in panels.items()}
    summary.results = result
    if args.json:
        _write_json(args.json, result)
    _finish(summary, args.output)
    for name, info in result.items():
        print(f"{name}: {100 * info['fraction_atoms_a_not_in_b']:.1f} % of {label_a} atoms not in {label_b} "
              f"({info['cells_a_not_in_b']} cells); {100 * info['fraction_atoms_b_not_in_a']:.1f} % of "
              f"{label_b} not in {label_a}")
    return 0


# ----------------------------------------------------------------- bonds & chemistry
def _bonds(args: argparse.Namespace) -> int:
    from ..summary import RunSummary
    from .frames import iter_frames
    from .geometry import DEFAULT_BOND_PAIRS, PairRule, bond_length_distributions
    from .plots import plot_bond_histograms, save_figure

    rules = [PairRule.parse(p) for p in (args.pair or DEFAULT_BOND_PAIRS)]
    summary = RunSummary("analyze bonds", {"pairs": [str(r) for r in rules], "bin_width_A": args.bin_width,
                                           "frames": args.frames})
    datasets = {}
    with summary.timed("bonds_s"):
        for path in args.frames:
            name = Path(path).stem
            datasets[name if name not in datasets else path] = bond_length_distributions(
                iter_frames(path, index=args.index or ":", format=args.format), rules, args.bin_width)
    result = {name: {pair: d.to_dict() for pair, d in dists.items()} for name, dists in datasets.items()}
    print(f"{'dataset':32s} {'pair':6s} {'frames':>6s} {'bonds/frame':>11s} {'mean Å':>8s} {'std Å':>7s} "
          f"{'min Å':>6s} {'max Å':>6s}")
    for name, dists in result.items():
        for pair, d in dists.items():
            print(f"{name[:32]:32s} {pair:6s} {d['n_frames']:6d} {d['bonds_per_frame']:11.2f} "
                  f"{_fmt(d['mean_A'], 8, 4)} {_fmt(d['std_A'], 7, 4)} {_fmt(d['min_A'], 6, 3)} {_fmt(d['max_A'], 6, 3)}")
    if args.output:
        fig, data = plot_bond_histograms(datasets)
        save_figure(fig, data, Path(args.output) / "bond_lengths.png",
                    caption="Normalised bond-length distributions; legend gives each dataset's mean.")
        summary.results = result
        _finish(summary, args.output)
    if args.json:
        _write_json(args.json, result)
    return 0


def _coordination(args: argparse.Namespace) -> int:
    from ..summary import RunSummary
    from .frames import frame_times, iter_frames, time_label
    from .geometry import DEFAULT_COORDINATION, PairRule, coordination_series
    from .plots import plot_coordination, save_figure

    rules = [PairRule.parse(p) for p in (args.rule or DEFAULT_COORDINATION)]
    summary = RunSummary("analyze coordination", {"rules": [str(r) for r in rules], "frames": args.frames})
    with summary.timed("coordination_s"):
        series = coordination_series(iter_frames(args.frames, index=args.index or ":", format=args.format),
                                     rules)
    times = frame_times(series.counts.shape[0], args.frame_interval_ps)
    labels = series.column_labels()
    print(f"{time_label(args.frame_interval_ps):>10s} " + " ".join(f"{l:>10s}" for l in labels))
    for t, row in zip(times, series.counts):
        print(f"{t:10.4g} " + " ".join(f"{n:10d}" for n in row))
    result = {"times": times.tolist(), "time_unit": "ps" if args.frame_interval_ps else "frame",
              **series.to_dict()}
    if args.output:
        fig, data = plot_coordination(times, series, None if args.frame_interval_ps else "frame")
        save_figure(fig, data, Path(args.output) / "coordination.png",
                    caption="Ligands within the cutoff of each centre atom: " + ", ".join(str(r) for r in rules) + " Å.")
        summary.results = result
        _finish(summary, args.output)
    if args.json:
        _write_json(args.json, result)
    return 0


def _events(args: argparse.Namespace) -> int:
    from ..summary import RunSummary
    from .frames import iter_frames
    from .geometry import EventsConfig, detect_events

    overrides: dict[str, Any] = {"bonds": tuple(args.bond) if args.bond else None,
                                 "coordination": tuple(args.coordination) if args.coordination else None,
                                 "proton_transfers": False if args.no_proton_transfers else None,
                                 "persistence_frames": args.persistence_frames,
                                 "frame_interval_ps": args.frame_interval_ps}
    config = EventsConfig.from_yaml(args.config, **overrides) if args.config else EventsConfig().replace(**overrides)
    summary = RunSummary("analyze events", config)
    with summary.timed("events_s"):
        result = detect_events(iter_frames(args.frames, index=args.index or ":", format=args.format), config)
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"{result.n_frames} frames, {len(result.events)} event(s)")
    for e in result.events:
        when = f"{e.time:.4g} ps" if e.time is not None else ""
        print(f"  frame {e.frame:6d} {when:>12s}  {e.kind:20s} {e.label}")
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.output:
        _write_json(Path(args.output) / "events.json", result.to_dict())
        summary.results = {"n_frames": result.n_frames, "n_events": len(result.events),
                           "kinds": sorted({e.kind for e in result.events})}
        _finish(summary, args.output)
    return 0


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"
