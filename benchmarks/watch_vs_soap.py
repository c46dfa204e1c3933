"""MACE-feature Q (the export's watch) against the study's SOAP Q, on the shared aqueous data.

Two cases, each a model and the frames its PCAs are fitted on:

1. ``foundation``: MACE-MP-0 small, both PCAs fitted on the study's fitting set for this system,
   the union of the naive and the periodic 44-frame training sets (the aqueous analogue of the
   study's two 50-structure sets); judged: those 88 frames (in-sample) and the independent frames:
   the self-consistent test frames of every model (``Evaluations__*``, fresh 1-ns trajectories of
   U, FT1-FT4 and N-11..44pts) and the frames labelled from FT4's own segment
   (``Finetuning__Periodic__FT4__dft``), none fitted on. The foundation never trained on any of
   them, so its force error has no reason to follow a distance from this fitting set.
2. ``finetuned`` (``--finetune-dir``): MACE-MP-0 small fine-tuned with ``umlipft finetune`` on the
   periodic FT2 set (22 frames, 6 epochs, float32), and the watch its export carries (fitted by
   umlipft on the frames it trained on); judged: those frames and frames it never saw (the
   independent frames above, the naive trajectories' 44, the frames of FT2's and FT3's
   segments, its validation split).
   Here the watch and the force error belong to the same model, the question the watch is for.

Both PCAs are fitted as ``umlipft analyze pca`` fits them with its defaults (global, 5
components), isolated atoms left out: MACE's own 0e node features (float64) and the study's SOAP
(DScribe, r_cut 5 Å, n_max 8, l_max 6, σ 0.375 Å) with ``analyze q``'s per-element limits. The
shared data hold no long-run trajectories (only thermo logs), so there are no long-run frames.

Reported per case:
1. per element, Spearman's rank correlation of per-atom MACE Q and SOAP Q;
2. whether both flag the same frames: frames with any atom over its per-atom limit (alpha 0.01),
   the top 10 % of frames by the largest Q/limit (Jaccard indices), the Spearman correlation of
   the per-frame largest Q/limit, and the watch's halting statistic;
3. whether frames with higher Q have higher force errors: Spearman of the per-frame max and mean
   Q (and Q/limit) against the per-frame force RMSE of the case's model against DFT (mace-torch's
   calculator through ``umlipft.evaluate``; float64, the fine-tune float32 as it was trained),
   also partial on the box volume (SOAP Q rises with density), and per atom, per element, Q
   against the force error's norm.

    nice .venv/bin/python benchmarks/watch_vs_soap.py --finetune-dir /tmp/ftw/ft2 --cache /tmp/wvs \
        --json benchmarks/results/watch_vs_soap.json [--per-frame frames.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from sample_structures import hcl_at  # noqa: E402  (the tests' HCl probe: one definition of it)
DATA = ROOT.parent / "shared" / "data" / "aqueous-licl-cocl2"
MODEL = ROOT.parent / "shared" / "models" / "mace-mp-0-small.model"
FIT = ["training_sets/Finetuning__Naive__Finetuned_Models__44pts__44pt_dataset.xyz",
       "training_sets/Finetuning__Periodic__FT4__model__ft_dataset.xyz"]
INDEPENDENT = sorted(f"single_points/{p.name}" for p in (DATA / "single_points").glob("Evaluations__*.extxyz")) + [
    "single_points/Finetuning__Periodic__FT4__dft.extxyz"]
ELEMENTS = ("H", "Li", "O", "Cl", "Co")
# The fine-tuned case: trained on the periodic workflow's FT2 set (segments U and FT1); the frames
# labelled from the later segments were not trained on.
FT2_SET = "training_sets/Finetuning__Periodic__FT2__model__ft_dataset.xyz"
LATER_PERIODIC = ["single_points/Finetuning__Periodic__FT2__dft.extxyz",
                  "single_points/Finetuning__Periodic__FT3__dft.extxyz"]


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    union = int(np.sum(a | b))
    return float(np.sum(a & b) / union) if union else None


def cached(cache: Path | None, name: str, compute):
    """Arrays of one expensive step, kept in ``cache`` between runs of this script."""
    if cache is None:
        return compute()
    path = cache / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    out = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


HALT_ALPHAS = (1e-2, 1e-3, 1e-4)


def halt_at(watch: dict[str, Any], q: np.ndarray, symbols: np.ndarray, frame_alpha: float) -> float:
    """The halting statistic of one frame with another per-frame false-alarm probability."""
    from umlipft.models.watch import tail_limit

    limits = {e: tail_limit(watch["elements"][e]["halt_tail"], frame_alpha, len(symbols)) for e in set(symbols)}
    return float(np.max(q / np.asarray([limits[e] for e in symbols])))


def rank_residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ranks of y with the linear trend on the ranks of x removed (for a partial Spearman)."""
    from scipy.stats import rankdata

    ry, rx = rankdata(y), rankdata(x)
    design = np.c_[rx, np.ones_like(rx)]
    return ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]


def partial_spearman(a, b, given) -> float | None:
    a, b, given = (np.asarray(v, dtype=float) for v in (a, b, given))
    if a.size < 4:
        return None
    return float(np.corrcoef(rank_residual(a, given), rank_residual(b, given))[0, 1])


def run_case(label: str, model: str, fit: list[Path], judged: list[Path], alpha: float, cache: Path | None,
             watch_doc: dict[str, Any] | None = None, force_dtype: str = "float64") -> dict[str, Any]:
    """One model and its fitting set: MACE-feature watch, SOAP PCA, force errors, comparisons.

    ``watch_doc``: the watch stored in the model's export (fitted on ``fit`` by umlipft itself);
    otherwise it is fitted here the same way (``build_watch`` on analyze pca's defaults)."""
    from umlipft.analysis.descriptors import MaceDescriptor, MaceSettings
    from umlipft.analysis.frames import drop_isolated_atoms
    from umlipft.analysis.pca import DescriptorPCA, PCAConfig, compute_features
    from umlipft.evaluate.predict import ModelEvaluator
    from umlipft.io import read_frames, reference_forces
    from umlipft.models.watch import build_watch, evaluate_watch

    from umlipft.io import sha256_file

    t0 = time.perf_counter()
    label = f"{label}-{sha256_file(model)[:12]}"  # cached arrays belong to this model file
    names = list(dict.fromkeys([*fit, *judged]))
    frames = {p: drop_isolated_atoms(read_frames(p)) for p in names}
    defaults = PCAConfig()
    key = lambda kind, p: f"{label}-{kind}-{p.stem}"  # noqa: E731

    # --- MACE features of this model: the watch ---------------------------------------------
    mace = MaceDescriptor(MaceSettings(model=model))
    feats = {p: cached(cache, key("mace", p), lambda f=f: {
        "x": compute_features({"f": f}, mace, defaults.batch_frames).features})["x"] for p, f in frames.items()}
    if watch_doc is None:
        fit_x = np.vstack([feats[p] for p in fit])
        fit_sym = np.concatenate([a.get_chemical_symbols() for p in fit for a in frames[p]])
        pca = DescriptorPCA.fit(fit_x, fit_sym, mace.settings(), defaults.components, defaults.per_element,
                                defaults.svd_solver, defaults.max_atoms_per_group, defaults.seed)
        watch_doc = build_watch(pca, mace, alpha, fit_x, fit_sym)
    mace_eval = {p: evaluate_watch(watch_doc, np.split(feats[p], np.cumsum([len(a) for a in f])[:-1]),
                                   [a.get_chemical_symbols() for a in f]) for p, f in frames.items()}
    t_mace = time.perf_counter() - t0

    # --- SOAP: the study's descriptor with analyze's defaults, fitted on the same frames ----
    soap_config = PCAConfig(descriptor="soap")
    soap = soap_config.make_descriptor([a for p in fit for a in frames[p]])

    def soap_q() -> dict[str, np.ndarray]:
        x = compute_features({str(p): frames[p] for p in fit}, soap, soap_config.batch_frames)
        model_ = DescriptorPCA.fit(x.features, x.symbols, soap.settings(), soap_config.components,
                                   soap_config.per_element, soap_config.svd_solver,
                                   soap_config.max_atoms_per_group, soap_config.seed)
        del x
        limits = model_.limits(alpha)
        out = {"limits": np.asarray([limits[e].q_limit for e in ELEMENTS])}
        for p, f in frames.items():
            out[f"q-{p.stem}"] = np.concatenate([model_.evaluate(x, a.get_chemical_symbols()).q
                                                 for a, x in zip(f, soap.compute(f))])
        return out

    soap_data = cached(cache, f"{label}-soap-q", soap_q)
    soap_limit = dict(zip(ELEMENTS, soap_data["limits"]))
    t_soap = time.perf_counter() - t0 - t_mace

    # --- this model's force errors against DFT --------------------------------------------
    evaluator = ModelEvaluator(model, dtype=force_dtype)

    def force_errors(f) -> dict[str, np.ndarray]:
        return {"norm": np.concatenate([
            np.linalg.norm(p.forces_eV_per_A - np.asarray(reference_forces(a), dtype=float), axis=1)
            for a, p in zip(f, evaluator.predict(f))])}

    ferr = {p: cached(cache, key("force", p), lambda f=f: force_errors(f))["norm"] for p, f in frames.items()}
    t_force = time.perf_counter() - t0 - t_mace - t_soap

    # --- per-frame and per-atom tables ------------------------------------------------------
    rows: list[dict[str, Any]] = []
    columns = ("set", "symbol", "mace_q", "soap_q", "mace_ratio", "soap_ratio", "force_error")
    atoms_table: dict[str, list] = {k: [] for k in columns}
    for p, fr in frames.items():
        kind = "training" if p in fit else "independent"
        offsets = np.cumsum([0] + [len(a) for a in fr])
        soap_all = soap_data[f"q-{p.stem}"]
        ev = mace_eval[p]
        for k, atoms in enumerate(fr):
            sym = np.asarray(atoms.get_chemical_symbols())
            sq = soap_all[offsets[k]:offsets[k + 1]]
            sratio = sq / np.asarray([soap_limit[s] for s in sym])
            fe = ferr[p][offsets[k]:offsets[k + 1]]
            rows.append({"set": kind, "file": p.name, "frame": k, "volume_A3": float(atoms.get_volume()),
                         "mace_max_ratio": float(ev.q_over_limit[k].max()), "soap_max_ratio": float(sratio.max()),
                         "mace_mean_q": float(ev.q[k].mean()), "soap_mean_q": float(sq.mean()),
                         "mace_max_q": float(ev.q[k].max()), "soap_max_q": float(sq.max()),
                         "mace_over": int(np.sum(ev.q_over_limit[k] > 1)), "soap_over": int(np.sum(sratio > 1)),
                         "halt": float(ev.halt[k]), "halt_atom_symbol": str(sym[int(ev.halt_atom[k])]),
                         "force_rmse": float(np.sqrt(np.mean(fe**2) / 3.0)),
                         **{f"halt_at_{fa:g}": halt_at(watch_doc, ev.q[k], sym, fa) for fa in HALT_ALPHAS}})
            for name, values in zip(columns, ([kind] * len(sym), sym, ev.q[k], sq, ev.q_over_limit[k], sratio, fe)):
                atoms_table[name].extend(values)
    at = {k: np.asarray(v) for k, v in atoms_table.items()}

    result: dict[str, Any] = {
        "model": model, "fit": [str(p) for p in fit], "judged": [str(p) for p in judged], "force_dtype": force_dtype,
        "n_frames": {"training": sum(r["set"] == "training" for r in rows),
                     "independent": sum(r["set"] == "independent" for r in rows)},
        "watch_halt_frame_alpha": watch_doc["halt"]["frame_alpha"],
        "q_limit_in_sample_exceedance": {}, "spearman_atoms": {}, "frames": {}, "force_error": {},
        "timings_s": {"mace": t_mace, "soap": t_soap, "forces": t_force}}
    train = at["set"] == "training"
    for e in ELEMENTS:
        m = train & (at["symbol"] == e)
        result["q_limit_in_sample_exceedance"][e] = {"mace": float(np.mean(at["mace_ratio"][m] > 1)),
                                                     "soap": float(np.mean(at["soap_ratio"][m] > 1))}
    for subset in ("training", "independent", "all"):
        sel = np.ones(at["set"].size, bool) if subset == "all" else at["set"] == subset
        result["spearman_atoms"][subset] = {
            e: spearman(at["mace_q"][sel & (at["symbol"] == e)], at["soap_q"][sel & (at["symbol"] == e)])
            for e in ELEMENTS}
        fr = [r for r in rows if subset == "all" or r["set"] == subset]
        mr = np.asarray([r["mace_max_ratio"] for r in fr])
        sr = np.asarray([r["soap_max_ratio"] for r in fr])
        any_m, any_s = mr > 1, sr > 1
        top = max(1, int(round(0.1 * len(fr))))
        top_m = np.zeros(len(fr), bool)
        top_m[np.argsort(-mr)[:top]] = True
        top_s = np.zeros(len(fr), bool)
        top_s[np.argsort(-sr)[:top]] = True
        halt = np.asarray([r["halt"] for r in fr])
        result["frames"][subset] = {
            "n": len(fr),
            "any_atom_over_limit": {"mace": int(any_m.sum()), "soap": int(any_s.sum()),
                                    "both": int((any_m & any_s).sum()), "jaccard": jaccard(any_m, any_s)},
            "atoms_over_limit_per_frame": {"mace": float(np.mean([r["mace_over"] for r in fr])),
                                           "soap": float(np.mean([r["soap_over"] for r in fr]))},
            "top10pct": {"n": top, "both": int((top_m & top_s).sum()), "jaccard": jaccard(top_m, top_s)},
            "spearman_max_ratio": spearman(mr, sr),
            "watch_halt_fired": int(np.sum(halt > 1.0)), "watch_halt_max": float(halt.max()),
            "watch_halt_fired_at_frame_alpha": {f"{fa:g}": int(sum(r[f"halt_at_{fa:g}"] > 1.0 for r in fr))
                                                for fa in HALT_ALPHAS},
            "watch_halt_fired_by_file": {name: n for name in sorted({r["file"] for r in fr})
                                         if (n := sum(r["halt"] > 1.0 for r in fr if r["file"] == name))},
            "watch_halt_fired_by_element": {e: n for e in ELEMENTS
                                            if (n := sum(r["halt"] > 1.0 and r["halt_atom_symbol"] == e for r in fr))},
            "force_rmse_fired_vs_quiet": [float(np.mean([r["force_rmse"] for r in fr if r["halt"] > 1.0]))
                                          if np.any(halt > 1.0) else None,
                                          float(np.mean([r["force_rmse"] for r in fr if r["halt"] <= 1.0]))],
        }
        force = np.asarray([r["force_rmse"] for r in fr])
        volume = np.asarray([r["volume_A3"] for r in fr])
        keys = ("mace_max_q", "mace_mean_q", "mace_max_ratio", "halt", "soap_max_q", "soap_mean_q", "soap_max_ratio")
        result["force_error"][subset] = {
            "force_rmse_eV_A": {"mean": float(force.mean()), "min": float(force.min()), "max": float(force.max())},
            "spearman_frame": {k: spearman([r[k] for r in fr], force) for k in keys},
            "spearman_volume": {k: spearman([r[k] for r in fr], volume) for k in (*keys, "force_rmse")},
            "partial_spearman_frame_given_volume": {k: partial_spearman([r[k] for r in fr], force, volume)
                                                    for k in keys},
            "spearman_atom_q_vs_force_error": {
                e: {"mace": spearman(at["mace_q"][sel & (at["symbol"] == e)], at["force_error"][sel & (at["symbol"] == e)]),
                    "soap": spearman(at["soap_q"][sel & (at["symbol"] == e)], at["force_error"][sel & (at["symbol"] == e)])}
                for e in ELEMENTS},
        }
    # --- structures clearly outside the data: the halting statistic must fire ---------------
    outside, labels = outside_frames(DATA / "single_points" / "Evaluations__U__dft.extxyz")
    x = cached(cache, f"{label}-mace-outside", lambda: {"x": np.vstack(mace.compute(outside))})["x"]
    ev = evaluate_watch(watch_doc, np.split(x, len(outside)), [a.get_chemical_symbols() for a in outside])
    result["outside"] = [{"structure": lab, "halt": float(h), "halt_atom": int(i),
                          "halt_atom_symbol": outside[k].get_chemical_symbols()[int(i)]}
                         for k, (lab, h, i) in enumerate(zip(labels, ev.halt, ev.halt_atom))]
    result["per_frame"] = rows
    return result


def outside_frames(path: Path) -> tuple[list, list[str]]:
    """Two frames of ``path``, each compressed to 0.85 of its edge, and each with the H nearest
    to a Cl moved to 1.3 Å of it (an HCl molecule, the bond of the study's event)."""
    from umlipft.io import read_frames

    out, labels = [], []
    for k, base in enumerate(read_frames(path, index=":2")):
        squeezed = base.copy()
        squeezed.set_cell(squeezed.cell * 0.85, scale_atoms=True)
        moved, h, cl = hcl_at(base, 1.3)
        out += [squeezed, moved]
        labels += [f"{path.name}[{k}] compressed to 0.85", f"{path.name}[{k}] H{h} at 1.3 A of Cl{cl}"]
    return out, labels


def finetuned_model(directory: Path, train: Path, epochs: int) -> tuple[Path, Path, dict[str, Any]]:
    """A fine-tune of MACE-MP-0 small on ``train`` with umlipft finetune (float32, batches of 2;
    restartable: a finished one in ``directory`` is reused), and the watch its export carries."""
    from umlipft.finetune import FinetuneConfig, finetune
    from umlipft.models.watch import read_watch

    result = finetune(FinetuneConfig(train_file=str(train), foundation=str(MODEL), output_dir=str(directory),
                                     name="FTw", epochs=epochs, batch_size=2, dtype="float32"))
    assert result.lammps_model_path is not None
    watch = read_watch(result.lammps_model_path)
    return result.model_path, Path(watch["training_file"]), watch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--per-frame", metavar="OUT.json", help="write every frame's numbers here")
    parser.add_argument("--cache", help="keep MACE features, SOAP Q and predicted forces here between runs")
    parser.add_argument("--finetune-dir", help="also fine-tune MACE-MP-0 small on the periodic FT2 set here "
                        "(umlipft finetune, float32; reused when finished) and judge its own watch")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    args = parser.parse_args(argv)
    cache = Path(args.cache) if args.cache else None
    cases: dict[str, Any] = {}
    cases["foundation"] = run_case("foundation", str(MODEL), [DATA / p for p in FIT],
                                   [DATA / p for p in INDEPENDENT], args.alpha, cache)
    report("MACE-MP-0 small, PCA fitted on the naive and periodic 44-frame sets", cases["foundation"])
    if args.finetune_dir:
        model, train, watch = finetuned_model(Path(args.finetune_dir), DATA / FT2_SET, args.finetune_epochs)
        # The fine-tuned model's own watch (fitted by umlipft finetune on the frames it trained on);
        # judged: frames it never saw: the independent frames, the naive trajectories' frames, the
        # periodic frames labelled after FT2 set's (FT2's and FT3's segments), its validation split.
        judged = ([DATA / p for p in [*INDEPENDENT, FIT[0], *LATER_PERIODIC]]
                  + [train.parent / "valid.extxyz"])
        # Forces in float32, the precision it was trained in (a third of float64's time here).
        cases["finetuned"] = run_case("finetuned", str(model), [train], judged, args.alpha, cache, watch,
                                      force_dtype="float32")
        cases["finetuned"]["epochs"] = args.finetune_epochs
        report(f"MACE-MP-0 small fine-tuned on the periodic FT2 set ({args.finetune_epochs} epochs), "
               "its export's own watch", cases["finetuned"])
    result = {"alpha": args.alpha, "long_runs": "none: the shared data hold thermo logs only, no trajectories",
              "cases": cases}
    rows = {name: case.pop("per_frame") for name, case in cases.items()}
    for path, doc in ((args.json, result), (args.per_frame, rows)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _f(v: float | None, digits: int = 2) -> str:
    return "  n/a" if v is None else f"{v:+.{digits}f}"


def report(title: str, r: dict[str, Any]) -> None:
    print(f"== {title}")
    print(f"frames: {r['n_frames']}; timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()))
    print("in-sample fraction of atoms over the per-atom limit (alpha 0.01):")
    for e, v in r["q_limit_in_sample_exceedance"].items():
        print(f"  {e:2s} MACE {100 * v['mace']:5.1f} %   SOAP {100 * v['soap']:5.1f} %")
    print("Spearman per element, per-atom MACE Q vs SOAP Q:")
    for subset, per in r["spearman_atoms"].items():
        print(f"  {subset:11s} " + "  ".join(f"{e} {_f(v)}" for e, v in per.items()))
    print("frames flagged:")
    for subset, f in r["frames"].items():
        a, t = f["any_atom_over_limit"], f["top10pct"]
        print(f"  {subset:11s} n={f['n']:3d} any-atom-over: MACE {a['mace']} SOAP {a['soap']} both {a['both']} "
              f"(Jaccard {_f(a['jaccard'])}); atoms over/frame MACE {f['atoms_over_limit_per_frame']['mace']:.1f} "
              f"SOAP {f['atoms_over_limit_per_frame']['soap']:.1f}; top 10 % ({t['n']}): both {t['both']} "
              f"(Jaccard {_f(t['jaccard'])}); Spearman max Q/limit {_f(f['spearman_max_ratio'])}; "
              f"watch halt fired {f['watch_halt_fired']} (max {f['watch_halt_max']:.2f}; at frame alpha "
              + ", ".join(f"{k}: {v}" for k, v in f["watch_halt_fired_at_frame_alpha"].items()) + ")")
    print("outside the data: " + "; ".join(f"{o['structure']}: halt {o['halt']:.2f} ({o['halt_atom_symbol']}"
                                          f"{o['halt_atom']})" for o in r["outside"]))
    for subset, f in r["frames"].items():
        if f["watch_halt_fired"]:
            print(f"  {subset}: halt fired on {f['watch_halt_fired_by_file']}, by {f['watch_halt_fired_by_element']}; "
                  f"force RMSE of those frames {f['force_rmse_fired_vs_quiet'][0]:.3f} eV/A, of the others "
                  f"{f['force_rmse_fired_vs_quiet'][1]:.3f}")
    print("Spearman with the per-frame force RMSE of the case's model:")
    for subset, f in r["force_error"].items():
        s = f["spearman_frame"]
        print(f"  {subset:11s} RMSE {f['force_rmse_eV_A']['mean']:.3f} eV/A; " +
              "  ".join(f"{k} {_f(v)}" for k, v in s.items()))
    print("partial Spearman given the box volume (denser boxes: higher SOAP Q):")
    for subset, f in r["force_error"].items():
        print(f"  {subset:11s} " + "  ".join(f"{k} {_f(v)}" for k, v in f["partial_spearman_frame_given_volume"].items()))
    print("Spearman per atom, Q vs |force error| (all frames):")
    for e, v in r["force_error"]["all"]["spearman_atom_q_vs_force_error"].items():
        print(f"  {e:2s} MACE {_f(v['mace'])}  SOAP {_f(v['soap'])}")


if __name__ == "__main__":
    sys.exit(main())
