"""Judging the models as the study did, then the report.

- self-consistent test: every model runs a fresh trajectory from the common start structure;
  frames of its second half are labelled; residual (E_model - E_ref)/N from the model's own
  thermo output, per model, strategies side by side (naive vs periodic panels);
- long runs: the last model of each strategy continues its test trajectory; labelled every
  interval; each model is evaluated on every long run (cross-evaluation); events (H-Cl bonds,
  Co coordination) and Q(t) of the atoms involved, against the model's own training data;
- coverage maps in SOAP PC space of the strategies' datasets, per iteration and per element;
  O-H bond lengths of the data the universal model generated against FT1's;
- an independent labelled set (``evaluation.independent``): every model's errors binned by
  reference energy;
- the adaptive strategy per iteration: where the in-run watch stopped the segment, which atoms
  fired it, the labels used; and the labels adaptive needed to reach periodic's error;
- the verdict: per model the self-consistent residual, force RMSE, long-run residual, events and
  frames used, and which final model (naive or periodic) is better, by how much, on what.

Everything numeric goes to ``report-<strategies>/report.json`` (deterministic: no times, no
hosts), the figures to ``figures/``, and ``report.html`` lays them out in the study's order
(``umlipft.report.workflow``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..io import atomic_write_text
from .config import WorkflowConfig
from .stages import (absolute, elements_of, export_stage, extract_stage, label_stage, md_stage, rel,
                     window_selection)
from .state import Deferred, WorkflowState
from .strategies import ModelInfo, StrategyResult, _pca_for

REPORT_DIR = "report"


def _models(results: Mapping[str, StrategyResult]) -> list[ModelInfo]:
    seen: dict[str, ModelInfo] = {}
    for result in results.values():
        for m in result.models:
            seen.setdefault(m.name, m)
    return list(seen.values())


def judge(state: WorkflowState, config: WorkflowConfig, results: Mapping[str, StrategyResult]) -> dict[str, Any]:
    ev = config.evaluation
    md = config.md
    start0 = state.result("start/00")["structure"]
    elements = elements_of(absolute(state, start0))
    dump_ps = md.dump_every * md.timestep_fs / 1000.0
    test_ps = ev.test_steps * md.timestep_fs / 1000.0
    sc: dict[str, dict[str, Any]] = {}
    deps: list[str] = []

    def test(m: ModelInfo) -> tuple[str, dict[str, Any] | None, list[str]]:
        base = f"eval/sc/{m.name}"
        if not ev.self_consistent and not (ev.long_runs and _is_final(m, results)):
            return m.name, None, []
        deps: list[str] = []
        entry: dict[str, Any] = {}
        try:
            lammps = m.lammps_model or export_stage(state, config, m.name, config.foundation, elements)
            run = md_stage(state, config, f"{base}/md", model=lammps, steps=ev.test_steps,
                           seed=ev.seed, structures=[start0], deps=["start/00", f"export/{m.name}"],
                           elements=elements)
            entry.update(md=run, lammps=lammps)
            deps.append(f"{base}/md")
            if ev.self_consistent:
                ex = extract_stage(state, config, f"{base}/extract", trajectory=run["trajectories"][0],
                                   start_ps=test_ps / 2, **window_selection(config, test_ps / 2, ev.test_frames),
                                   seed=ev.seed, deps=[f"{base}/md"], tag={"test": "self-consistent", "model": m.name})
                entry["label"] = label_stage(state, config, f"{base}/label", frames=ex["frames"],
                                             deps=[f"{base}/extract"])
                deps.append(f"{base}/label")
        except Deferred:  # another batch job tests this model (what is finished is kept)
            pass
        return m.name, entry or None, deps

    models = _models(results)
    if config.parallel_stages > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=config.parallel_stages) as pool:
            tested = list(pool.map(test, models))
    else:
        tested = [test(m) for m in models]
    for name, entry, stage_deps in tested:
        if entry is not None:
            sc[name] = entry
            deps += stage_deps
    long: dict[str, dict[str, Any]] = {}
    if ev.long_runs:
        finals: dict[str, tuple[str, ModelInfo]] = {}
        for strategy, result in results.items():
            finals.setdefault(result.models[-1].name, (strategy, result.models[-1]))

        def long_run(item: tuple[str, tuple[str, ModelInfo]]) -> tuple[str, dict[str, Any]]:
            name, (strategy, m) = item
            base = f"eval/long/{name}"
            if name not in sc:  # its test MD is another batch job's and has not finished
                raise Deferred(f"eval/sc/{name}/md")
            run = md_stage(state, config, f"{base}/md", model=sc[name]["lammps"],
                           steps=ev.long_steps, seed=ev.seed, continue_from=sc[name]["md"]["directories"][0],
                           deps=[f"eval/sc/{name}/md"], elements=elements)
            every_ps = ev.long_label_every * md.timestep_fs / 1000.0
            ex = extract_stage(state, config, f"{base}/extract", trajectory=run["trajectories"][0],
                               start_ps=every_ps, stop_ps=None, count=None, every_ps=every_ps, seed=ev.seed,
                               time_offset_ps=test_ps, deps=[f"{base}/md"], tag={"test": "long", "model": name})
            lab = label_stage(state, config, f"{base}/label", frames=ex["frames"], deps=[f"{base}/extract"])
            return name, {"md": run, "label": lab, "strategy": strategy, "model": m}

        if config.parallel_stages > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=config.parallel_stages) as pool:
                done = list(pool.map(long_run, finals.items()))
        else:
            done = [long_run(item) for item in finals.items()]
        for name, entry in done:
            long[name] = entry
            deps += [f"eval/long/{name}/md", f"eval/long/{name}/label"]
    strategy_stages = [m.stage for r in results.values() for m in r.models if m.stage]
    inputs = {"strategies": sorted(results), "analysis": config.analysis.to_dict(),
              "evaluation": ev.to_dict(), "dump_ps": dump_ps}
    if ev.independent:
        from ..io import sha256_file

        inputs["independent_sha256"] = sha256_file(Path(ev.independent))
    return state.run(report_stage(results), inputs, lambda folder: _analyse(state, config, results, sc, long, folder),
                     deps=deps + strategy_stages)


def report_stage(results: Mapping[str, StrategyResult]) -> str:
    """``report-periodic``, ``report-naive-periodic``, ...: one report per set of strategies, so
    that a comparison can reuse the stages of single-strategy runs in the same directory."""
    return "report-" + "-".join(results)


def _is_final(m: ModelInfo, results: Mapping[str, StrategyResult]) -> bool:
    return any(r.models[-1].name == m.name for r in results.values())


# ----------------------------------------------------------------------------------- the analysis
def _analyse(state: WorkflowState, config: WorkflowConfig, results: Mapping[str, StrategyResult],
             sc: Mapping[str, Any], long: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    from ..analysis.plots import save_figure
    from ..report.workflow import build_workflow_report

    figures = folder / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    evaluators = _Evaluators(state, config)
    report: dict[str, Any] = {"setup": _setup(state, config, results),
                              "strategies": {k: v.to_dict() for k, v in results.items()}}
    offset = _universal_offset(state, config, results, evaluators)
    if offset is not None:
        report["universal_offset_meV_per_atom"] = offset
    report["self_consistent"] = _self_consistent(state, results, sc, figures, save_figure, offset or 0.0,
                                                 config.label.calculator, evaluators)
    if long:
        report["long_runs"] = _long_runs(state, config, long, figures, save_figure, evaluators)
    report["coverage"] = _coverage(state, config, results, figures, save_figure)
    bonds = _bonds_by_generator(state, results, figures, save_figure)
    if bonds:
        report["bond_lengths"] = bonds
    if config.evaluation.independent:
        report["independent"] = _independent(config, results, figures, save_figure, offset or 0.0, evaluators)
    if "adaptive" in results:
        report["adaptive"] = adaptive_iterations(results["adaptive"])
    if "adaptive" in results and "periodic" in results and report["self_consistent"]:
        report["adaptive_vs_periodic"] = _adaptive_labels(results, report["self_consistent"])
    report["finetune"] = {m.name: _ft_summary(state, m) for m in _models(results) if m.stage}
    report["verdict"] = verdict(report, results)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=1, sort_keys=True, default=_plain) + "\n")
    html = build_workflow_report(folder, title=f"umlipft workflow: {' vs '.join(results)}")
    return {"report_json": rel(state, folder / "report.json"), "report_html": rel(state, html)}


class _Evaluators:
    """One loaded model per name for the whole report (each load costs seconds)."""

    def __init__(self, state: WorkflowState, config: WorkflowConfig) -> None:
        self.state, self.config = state, config
        self._loaded: dict[str, Any] = {}

    def get(self, m: ModelInfo) -> Any:
        from ..evaluate.predict import ModelEvaluator

        if m.name not in self._loaded:
            path = str(absolute(self.state, m.model)) if m.stage else m.model
            self._loaded[m.name] = ModelEvaluator(path, dtype=self.config.evaluation.dtype)
        return self._loaded[m.name]


def _setup(state: WorkflowState, config: WorkflowConfig, results: Mapping[str, StrategyResult]) -> dict[str, Any]:
    """What was run, in the words a methods section needs (deterministic: no paths, no times)."""
    from ..io import read_frames

    md, ev = config.md, config.evaluation
    start = read_frames(absolute(state, state.result("start/00")["structure"]))[0]
    return {"profile": config.profile, "foundation": config.foundation, "reference": config.label.calculator,
            "system": config.system.system, "formula": start.get_chemical_formula(mode="hill"),
            "n_atoms": len(start), "strategies": list(results), "iterations": config.iterations,
            "frames_per_segment": config.frames_per_segment, "ensemble": md.ensemble,
            "temperature_K": md.temperature_K, "timestep_fs": md.timestep_fs,
            "segment_ps": md.segment_ps(), "test_ps": ev.test_steps * md.timestep_fs / 1000.0,
            "long_ps": ev.long_steps * md.timestep_fs / 1000.0 if ev.long_runs else None,
            "test_frames": ev.test_frames, "finetune_epochs": config.finetune.epochs,
            "align_universal_energy": ev.align_universal_energy}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _ft_summary(state: WorkflowState, m: ModelInfo) -> dict[str, Any]:
    r = state.result(m.stage) if m.stage else {}
    return {k: r.get(k) for k in ("n_train", "n_valid", "n_frames", "final_valid_rmse_e_meV_per_atom",
                                  "final_valid_rmse_f_meV_per_A", "e0_policy")}


def _universal_offset(state: WorkflowState, config: WorkflowConfig, results: Mapping[str, StrategyResult],
                      evaluators: _Evaluators) -> float | None:
    """Mean (E_U - E_ref)/N of the universal model on every labelled training frame, when its
    energies must be aligned to the labels' scale (see EvaluationSettings.align_universal_energy)."""
    mode = config.evaluation.align_universal_energy
    if mode == "no" or (mode == "auto" and config.label.calculator != "xtb"):
        return None
    from ..evaluate import evaluate_model
    from ..io import read_frames

    frames = [f for r in results.values() for path in r.labelled for f in read_frames(absolute(state, path))]
    if not frames:
        return None
    universal = next(m for r in results.values() for m in r.models if not m.stage)
    report = evaluate_model(evaluators.get(universal), frames, model_name="U")
    return report.summary.energy_residual_mean_meV_per_atom


def _self_consistent(state: WorkflowState, results: Mapping[str, StrategyResult], sc: Mapping[str, Any],
                     figures: Path, save_figure: Any, offset: float, calculator: str,
                     evaluators: _Evaluators) -> dict[str, Any]:
    from ..analysis.plots import plot_residuals
    from ..evaluate import evaluate_model, self_consistent_residual

    out: dict[str, Any] = {}
    reference = _reference_name(calculator)
    by_name = {m.name: m for m in _models(results)}
    for name, entry in sc.items():
        if "label" not in entry:
            continue
        labelled = absolute(state, entry["label"]["labelled"])
        rep = self_consistent_residual(absolute(state, entry["md"]["thermo"][0]), labelled)
        shift = offset if name == "U" else 0.0
        residuals = np.array([r.residual_meV_per_atom for r in rep.per_frame]) - shift
        # Energies come from the model's own MD (thermo); its forces on the labelled frames are not
        # in the dump, so the model evaluates them: a few frames per model.
        forces = evaluate_model(evaluators.get(by_name[name]), labelled, model_name=name).summary
        out[name] = {"mean_meV_per_atom": float(residuals.mean()),
                     "rmse_meV_per_atom": float(np.sqrt(np.mean(residuals**2))),
                     "max_abs_meV_per_atom": float(np.abs(residuals).max()),
                     "force_rmse_eV_per_A": forces.force_rmse_eV_per_A,
                     "force_rmse_per_element_eV_per_A": forces.force_rmse_per_element_eV_per_A,
                     "residuals_meV_per_atom": residuals.tolist(), "aligned_by_meV_per_atom": shift,
                     "steps": [r.step for r in rep.per_frame], "n_frames": rep.n_frames}
    if not out:
        return out

    def panel(strategy: str) -> dict[str, list[float]]:
        if strategy not in results:
            return {}
        return {m.name: out[m.name]["residuals_meV_per_atom"] for m in results[strategy].models if m.name in out}

    pairs = [("naive", "periodic"), ("control", "adaptive")]
    for left, right in pairs:
        if left not in results and right not in results:
            continue
        fig, data = plot_residuals(panel(left), panel(right),
                                   ylabel=f"(E_model − E_{reference})/N (meV/atom)")
        fig.axes[0].set_title(left)
        fig.axes[1].set_title(right)
        save_figure(fig, data, figures / f"residuals-{left}-{right}.png",
                    caption=f"Self-consistent test: (E_model - E_{reference})/N of frames from the second half of "
                            f"each model's own trajectory from the common start; {left} and {right} models "
                            "(dots: frames; bars: mean ± std)."
                            + (f" U is shown after removing its mean residual on the training frames "
                               f"({offset:.1f} meV/atom: the labels' theory has another energy zero)."
                               if offset else ""))
    return out


def _concatenate(state: WorkflowState, parts: list[tuple[str, float]], target: Path):
    """Frames of trajectory pieces (path, time offset ps) as one trajectory; each piece after the
    first starts with the previous piece's last frame, which is dropped."""
    from ..io import read_frames, write_frames

    frames = []
    for k, (path, offset) in enumerate(parts):
        piece = read_frames(absolute(state, path))
        for atoms in piece[1 if k else 0:]:
            atoms.info["run_time_ps"] = float(atoms.info.get("time_ps", 0.0)) + offset
            frames.append(atoms)
    write_frames(target, frames)
    return frames


def _long_runs(state: WorkflowState, config: WorkflowConfig, long: Mapping[str, Any], figures: Path,
               save_figure: Any, evaluators: _Evaluators) -> dict[str, Any]:
    from ..analysis import EventsConfig, QConfig, analyze_trajectory, detect_events
    from ..analysis.monitor import plot_tracked
    from ..analysis.plots import plot_energy_trajectory, plot_force_parity
    from ..evaluate import cross_evaluate
    from ..io import read_frames

    md, ev, a = config.md, config.evaluation, config.analysis
    dump_ps = md.dump_every * md.timestep_fs / 1000.0
    test_ps = ev.test_steps * md.timestep_fs / 1000.0
    reference = _reference_name(config.label.calculator)
    models = {name: evaluators.get(e["model"]) for name, e in long.items()}
    frame_sets = {f"{name} run": str(absolute(state, e["label"]["labelled"])) for name, e in long.items()}
    reports = cross_evaluate(models, frame_sets)
    out: dict[str, Any] = {"cross_evaluation": [
        {"model": r.model, "frames": r.frames, "n_frames": r.summary.n_frames,
         "energy_residual_mean_meV_per_atom": r.summary.energy_residual_mean_meV_per_atom,
         "energy_residual_rmse_meV_per_atom": r.summary.energy_residual_rmse_meV_per_atom,
         "energy_residual_max_abs_meV_per_atom": r.summary.energy_residual_max_abs_meV_per_atom,
         "force_rmse_eV_per_A": r.summary.force_rmse_eV_per_A,
         "force_rmse_per_element_eV_per_A": r.summary.force_rmse_per_element_eV_per_A,
         "per_frame_residual_meV_per_atom": [f.energy_residual_meV_per_atom for f in r.per_frame]}
        for r in reports], "runs": {}}
    for name, e in long.items():
        sc_md, run = state.result(f"eval/sc/{name}/md"), e["md"]
        full = state.stage_dir(f"eval/long/{name}") / "full-trajectory.extxyz"
        frames = _concatenate(state, [(sc_md["trajectories"][0], 0.0), (run["trajectories"][0], test_ps)], full)
        times_ps = np.array([f.info["run_time_ps"] for f in frames])
        labelled = read_frames(absolute(state, e["label"]["labelled"]))
        ref_t = np.array([f.info["run_time_ps"] for f in labelled])
        ref_e = np.array([f.info["REF_energy"] for f in labelled])
        cross = {f"{r.model} on these frames": (ref_t, np.array([p.energy_model_eV for p in r.per_frame]))
                 for r in reports if r.frames == f"{name} run"}
        md_e = np.array([f.info.get("md_energy", np.nan) for f in frames])
        events = detect_events(frames, EventsConfig(frame_interval_ps=dump_ps,
                                                    persistence_frames=a.events_persistence_frames))
        fig, data = plot_energy_trajectory(times_ps, md_e, ref_t, ref_e, cross, label=f"MD ({name})",
                                           reference=reference, events=events.events,
                                           title=f"Test and long run of {name}")
        save_figure(fig, data, figures / f"long-{name}-energy.png",
                    caption=f"Potential energy along the test and long runs of {name} (its own MD, grey), "
                            f"{reference} single points (black) and every final model evaluated on those "
                            f"frames (cross-evaluation, open markers); vertical lines: events "
                            f"({len(events.events)} found).")
        # Force parity of the model on its own long run.
        preds = models[name].predict(labelled)
        ref_f = np.vstack([f.arrays["REF_forces"] for f in labelled])
        pred_f = np.vstack([p.forces_eV_per_A for p in preds])
        symbols = [s for f in labelled for s in f.get_chemical_symbols()]
        fig, data = plot_force_parity(ref_f, pred_f, symbols, title=f"{name} on its long run")
        save_figure(fig, data, figures / f"long-{name}-force-parity.png",
                    caption=f"Force components of {name} against the reference on its long-run frames, per element.")
        # Q(t) of the atoms of the events, against the model's training data.
        entry: dict[str, Any] = {"n_frames": len(frames), "duration_ps": float(times_ps[-1]),
                                 "events": [ev_.to_dict() for ev_ in events.events], "event_warnings": events.warnings}
        m: ModelInfo = e["model"]
        if m.stage:
            pca = _pca_for(state, config, m)
            qdir = state.stage_dir(f"eval/long/{name}") / "q"
            # The atoms of the events (H, O, Cl of an HCl; the Co whose shell changes), else the
            # highest-Q atom of each element: see analysis.monitor.select_tracked_atoms.
            q = analyze_trajectory(pca, full, qdir, QConfig(alpha=a.alpha, k_sigma=a.k_sigma,
                                                              frame_interval_ps=dump_ps, n_track=a.n_track),
                                   events=events.events)
            track = q.summary["tracked_atoms"]
            why = ("involved in the events" if q.summary["tracked_because"] == "events"
                   else "with the largest Q of each element (no events)")
            fig, data = plot_tracked(q, "q", events.events, title=f"Q-residual along the run of {name}")
            save_figure(fig, data, figures / f"long-{name}-q.png",
                        caption=f"Q-residual of the atoms {why} along the test and long runs of {name}, against "
                                f"the SOAP PCA of its training data. Shaded: each atom's own mean ± {a.k_sigma:g}σ "
                                f"of Q(t) over the run (the study's band); dashed: the element's training-set "
                                f"limit at alpha = {a.alpha:g}; vertical lines: events.")
            entry["q"] = {"tracked_atoms": track, "tracked_because": q.summary["tracked_because"],
                          "tracked": q.summary["tracked"], "per_element": q.summary["per_element"],
                          "max_q_over_limit": [q.summary["atoms"]["max_q_over_limit"][i] for i in track]}
        out["runs"][name] = entry
    return out


def _features(pca: Any, frames_by_source: Mapping[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..analysis import compute_features

    feats = compute_features(frames_by_source, pca.descriptor())
    return pca.transform(feats.features, feats.symbols), feats.symbols, feats.source


def _coverage(state: WorkflowState, config: WorkflowConfig, results: Mapping[str, StrategyResult],
              figures: Path, save_figure: Any) -> dict[str, Any]:
    """Coverage maps in the SOAP PCA of the final datasets: the final datasets by element; per
    iteration within each strategy, the frames the iteration added against the earlier data
    (``within_strategy``); and, when both ran, naive vs periodic data per iteration
    (``per_iteration``; with one strategy ``per_iteration`` is the within-strategy comparison)."""
    from ..analysis import DescriptorPCA
    from ..analysis.coverage import coverage, coverage_by_element
    from ..analysis.plots import plot_coverage, plot_pca_map

    a = config.analysis
    iterations = {strategy: iteration_datasets(state, result) for strategy, result in results.items()}
    datasets = {strategy: [frames for _, frames, _ in its] for strategy, its in iterations.items()}
    fit = {f"{s} final": sets[-1] for s, sets in datasets.items() if sets and sets[-1]}
    if not fit:
        return {}
    from ..analysis.pca import PCAConfig

    pcfg = PCAConfig(components=a.components, r_cut_A=a.soap_r_cut_A, n_max=a.soap_n_max, l_max=a.soap_l_max,
                     sigma_A=a.soap_sigma_A)
    every = [f for frames in fit.values() for f in frames]
    descriptor = pcfg.make_descriptor(every)
    from ..analysis import compute_features

    feats = compute_features(fit, descriptor)
    pca = DescriptorPCA.fit(feats.features, feats.symbols, descriptor.settings(), a.components, seed=config.seed)
    pca.save(figures.parent / "pca")
    scores = pca.transform(feats.features, feats.symbols)
    fig, data = plot_pca_map(scores, feats.symbols, pca.explained_variance_ratio,
                             title="Training data of the final models (SOAP PCA)")
    save_figure(fig, data, figures / "pca-map.png",
                caption="PC1/PC2 of every atom of the final models' training data, by element; PCA fitted on their union.")
    out: dict[str, Any] = {"explained_variance_ratio": pca.explained_variance_ratio, "fitted_on": list(fit)}
    # Within each strategy: what each iteration's new frames reach that the earlier data did not.
    within: dict[str, Any] = {}
    for strategy, its in iterations.items():
        for i in range(1, len(its)):
            name, _, new = its[i]
            if not new:
                continue
            sa, _, _ = _features(pca, {"new": new})
            sb, _, _ = _features(pca, {"old": its[i - 1][1]})
            within[f"{strategy} {name} (+{len(new)} frames)"] = coverage(
                sa, sb, bins=a.coverage_bins, label_a="new frames", label_b="earlier data")
    if within:
        out["within_strategy"] = {k: v.to_dict() for k, v in within.items()}
    panels: dict[str, Any] = {}
    if "naive" in datasets and "periodic" in datasets:
        pairs = list(zip(datasets["naive"], datasets["periodic"]))
        for i, (nv, pe) in enumerate(pairs):
            sa, syma, _ = _features(pca, {"naive": nv})
            sb, symb, _ = _features(pca, {"periodic": pe})
            panels[f"iteration {i + 1}"] = coverage(sa, sb, bins=a.coverage_bins, label_a="naive", label_b="periodic")
        by_el = coverage_by_element(*_features(pca, {"n": datasets["naive"][-1]})[:2],
                                    *_features(pca, {"p": datasets["periodic"][-1]})[:2],
                                    bins=a.coverage_bins, label_a="naive", label_b="periodic")
        fig, data = plot_coverage(by_el)
        save_figure(fig, data, figures / "coverage-by-element.png",
                    caption="Final datasets per element: PC1/PC2 cells covered by naive only, periodic only, both.")
        out["by_element"] = {k: v.to_dict() for k, v in by_el.items()}
        if within:
            fig, data = plot_coverage(within)
            save_figure(fig, data, figures / "coverage-within-strategy.png",
                        caption="Per iteration within each strategy: PC1/PC2 cells reached by the frames the "
                                "iteration added (orange) and not by the earlier data (blue: earlier data only). "
                                "New frames are identified by content (positions, cell, elements), not by "
                                "their place in the file.")
    else:
        panels = within
    if panels:
        fig, data = plot_coverage(panels)
        save_figure(fig, data, figures / "coverage-per-iteration.png",
                    caption=("Naive vs periodic data per iteration" if panels is not within else
                             "Per iteration: the frames each iteration added against the earlier data")
                            + " in PC1/PC2 (grid cells; see umlipft.analysis.coverage for the definition).")
        out["per_iteration"] = {k: v.to_dict() for k, v in panels.items()}
    return out


def iteration_datasets(state: WorkflowState, result: StrategyResult) -> list[tuple[str, list, list]]:
    """Per fine-tuned model of a strategy, in order: (model name, its training frames, the frames
    that are new against the previous model's). New frames are found by content
    (:func:`umlipft.analysis.frames.new_frames`): naive subsets are written in pool order, so the
    frames a subset adds are spread through its file, not at its end."""
    from ..analysis.frames import drop_isolated_atoms, new_frames
    from ..io import read_frames

    out: list[tuple[str, list, list]] = []
    for m in result.models:
        if not m.stage:
            continue
        frames = drop_isolated_atoms([f for t in m.train for f in read_frames(absolute(state, t))])
        out.append((m.name, frames, new_frames(frames, out[-1][1]) if out else list(frames)))
    return out


# The atoms of a halting frame listed in the report, largest Q over the halting limit first.
MAX_FIRED_ATOMS = 12


def adaptive_iterations(result: StrategyResult) -> list[dict[str, Any]]:
    """Per adaptive iteration (segment): the model that ran it, how long it ran, whether the in-run
    watch stopped it and when (step of the segment, time on the trajectory), the atoms beyond their
    halting limit in the halting frame (LAMMPS IDs, elements, Q over the limit), the flagged frames,
    how its frames were chosen, the labels it added and the cumulative count of the model trained
    on them."""
    out: list[dict[str, Any]] = []
    total = 0
    models = [m.name for m in result.models]
    for i, seg in enumerate(result.segments):
        watch = seg.get("watch")
        labels = seg.get("labels")
        total += labels or 0
        entry: dict[str, Any] = {
            "iteration": i, "segment": seg["name"], "model": seg["model"], "steps": seg.get("steps"),
            "start_ps": seg["time_offset_ps"], "watched": watch is not None,
            "halted": bool(watch and watch["halted"]), "selection": seg.get("selection"),
            "labels": labels, "labels_cumulative": total,
            "labelled_steps": seg.get("labelled_steps"),
            "trained": models[i + 1] if i + 1 < len(models) else None}
        if watch is not None:
            fired = watch.get("fired_atoms") or []
            entry.update(
                watch_every=watch["every"], watch_patience=watch["patience"],
                halted_at_step=watch["halted_at_step"],
                # on the trajectory's clock (the segment's start plus the step's time in it)
                halted_at_ps=None if watch["halted_at_ps"] is None else seg["time_offset_ps"] + watch["halted_at_ps"],
                flagged_frames=watch["flagged_frames"], flagged_steps=watch["flagged_steps"],
                max_statistic=watch["max_statistic"], fired_at_step=watch.get("fired_at_step"),
                fired_atoms=fired[:MAX_FIRED_ATOMS], n_fired_atoms=len(fired))
        out.append(entry)
    return out


def _adaptive_labels(results: Mapping[str, StrategyResult], sc: Mapping[str, Any]) -> dict[str, Any]:
    """How many labels the adaptive strategy needed to reach the periodic workflow's error (the
    self-consistent energy RMSE of periodic's final model): its first model at or below it
    (``adaptive_model``/``adaptive_labels``, None when none reached it), against periodic's count;
    also adaptive's final model, its labels and error, whichever way it went."""
    target_model = results["periodic"].models[-1]
    target = sc.get(target_model.name, {}).get("rmse_meV_per_atom")
    final = results["adaptive"].models[-1]
    out: dict[str, Any] = {"periodic_model": target_model.name, "periodic_rmse_meV_per_atom": target,
                           "periodic_labels": target_model.n_frames, "adaptive_model": None, "adaptive_labels": None,
                           "adaptive_final_model": final.name, "adaptive_final_labels": final.n_frames,
                           "adaptive_final_rmse_meV_per_atom": sc.get(final.name, {}).get("rmse_meV_per_atom")}
    if target is None:
        return out
    for m in results["adaptive"].models[1:]:
        rmse = sc.get(m.name, {}).get("rmse_meV_per_atom")
        if rmse is not None and rmse <= target:
            out.update(adaptive_model=m.name, adaptive_labels=m.n_frames, adaptive_rmse_meV_per_atom=rmse)
            break
    return out


def _reference_name(calculator: str) -> str:
    return {"vasp": "VASP", "cp2k": "CP2K", "xtb": "xTB", "espresso": "QE"}.get(calculator, calculator)


# ---------------------------------------------------------------------------- bond lengths by generator
def _bonds_by_generator(state: WorkflowState, results: Mapping[str, StrategyResult], figures: Path,
                        save_figure: Any) -> dict[str, Any]:
    """O-H bond lengths of the labelled data the universal model generated against the data FT1
    generated (the study: U stretches O-H). Each frame's generator is the model of the trajectory
    piece it was extracted from (``source_file``), over every strategy of the report."""
    from ..analysis.geometry import PairRule, bond_length_distributions
    from ..analysis.plots import plot_bond_histograms
    from ..io import read_frames

    generator: dict[str, str] = {}
    for result in results.values():
        for seg in result.segments:
            generator[str(seg.get("trajectory"))] = str(seg.get("model"))
    by_model: dict[str, list] = {}
    for result in results.values():
        for path in result.labelled:
            for atoms in read_frames(absolute(state, path)):
                model = generator.get(str(atoms.info.get("source_file")))
                if model is not None:
                    by_model.setdefault(model, []).append(atoms)
    pick = [m for m in ("U", "FT1") if by_model.get(m)]
    if len(pick) < 2:
        return {}
    rule = PairRule.parse("O-H:1.25")
    dists = {f"{m} data ({len(by_model[m])} frames)": bond_length_distributions(by_model[m], [rule], 0.02)
             for m in pick}
    if not any(d[rule.label].n_bonds for d in dists.values()):
        return {}
    fig, data = plot_bond_histograms(dists)
    save_figure(fig, data, figures / "bonds-OH-U-vs-FT1.png",
                caption="O-H bond-length distributions (bonded: d < 1.25 Å) of the labelled frames generated "
                        "with the universal model U (every strategy's U trajectories) and with FT1 (periodic "
                        "segment 1); legend: mean bond length.")
    return {"pair": str(rule), "datasets": [{"name": name, **d[rule.label].to_dict()} for name, d in dists.items()]}


# ------------------------------------------------------------------------------ independent test set
def _independent(config: WorkflowConfig, results: Mapping[str, StrategyResult], figures: Path, save_figure: Any,
                 offset: float, evaluators: _Evaluators) -> dict[str, Any]:
    """Every model on ``evaluation.independent`` (labelled frames no strategy sampled), with errors
    binned by the frames' reference energy per atom (equal-count bins)."""
    from ..analysis.plots import plot_binned_errors
    from ..analysis.stats import quantile_bins
    from ..evaluate import evaluate_model
    from ..evaluate.driver import load_labelled_frames
    from ..io import reference_energy

    path = Path(str(config.evaluation.independent))
    frames = load_labelled_frames(path)
    e_ref = np.array([float(reference_energy(a)) / len(a) for a in frames])  # type: ignore[arg-type]
    edges = quantile_bins(e_ref, n_bins=max(1, min(5, len(frames) // 4)))
    residuals: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"file": path.name, "n_frames": len(frames), "energy_bins_eV_per_atom": edges.tolist(),
                           "models": {}}
    for m in _models(results):
        rep = evaluate_model(evaluators.get(m), frames, model_name=m.name)
        shift = offset if m.name == "U" else 0.0
        r = np.array([f.energy_residual_meV_per_atom for f in rep.per_frame]) - shift
        residuals[m.name] = r
        out["models"][m.name] = {"mean_meV_per_atom": float(r.mean()), "rmse_meV_per_atom": float(np.sqrt(np.mean(r**2))),
                                 "force_rmse_eV_per_A": rep.summary.force_rmse_eV_per_A,
                                 "aligned_by_meV_per_atom": shift}
    fig, data = plot_binned_errors(e_ref, residuals, edges, reference=_reference_name(config.label.calculator))
    out["bins"] = data["bins"]
    save_figure(fig, data, figures / "independent-errors.png",
                caption=f"Independent test set ({path.name}, {len(frames)} labelled frames no strategy sampled): "
                        "every model's (E_model - E_ref)/N, mean ± std per bin of reference energy per atom "
                        "(equal-count bins)." + (f" U after removing its mean offset to the labeller "
                                                  f"({offset:.1f} meV/atom)." if offset else ""))
    return out


# ----------------------------------------------------------------------------------------- verdict
def verdict(report: Mapping[str, Any], results: Mapping[str, StrategyResult]) -> dict[str, Any]:
    """The table the report opens with and its headline: per model the self-consistent residual,
    force RMSE, long-run residual (its own long run), events found and frames used; which final
    model is better (naive vs periodic when both ran, else the last model vs U), by how much, on
    what."""
    sc = report.get("self_consistent", {})
    long = report.get("long_runs", {})
    own_long = {c["model"]: c for c in long.get("cross_evaluation", []) if c["frames"] == f"{c['model']} run"}
    rows = []
    for strategy, result in results.items():
        for m in result.models:
            if any(r["model"] == m.name for r in rows):
                continue
            s = sc.get(m.name, {})
            run = long.get("runs", {}).get(m.name)
            rows.append({
                "model": m.name, "strategy": "universal" if not m.stage else strategy,
                "frames_used": m.n_frames,
                "sc_mean_meV_per_atom": s.get("mean_meV_per_atom"), "sc_rmse_meV_per_atom": s.get("rmse_meV_per_atom"),
                "sc_n_frames": s.get("n_frames"), "force_rmse_eV_per_A": s.get("force_rmse_eV_per_A"),
                "aligned_by_meV_per_atom": s.get("aligned_by_meV_per_atom") or 0.0,
                "long_rmse_meV_per_atom": own_long.get(m.name, {}).get("energy_residual_rmse_meV_per_atom"),
                "long_n_frames": own_long.get(m.name, {}).get("n_frames"),
                "events": None if run is None else [e["label"] for e in run["events"]],
                "final": m is result.models[-1]})
    pairs = []
    if "naive" in results and "periodic" in results:
        pairs.append(("naive", results["naive"].models[-1].name, "periodic", results["periodic"].models[-1].name))
    else:
        for strategy, result in results.items():
            if len(result.models) > 1:
                pairs.append(("universal", result.models[0].name, strategy, result.models[-1].name))
    comparisons = [c for c in (_compare(a, ma, b, mb, sc, own_long) for a, ma, b, mb in pairs) if c]
    return {"rows": rows, "comparisons": comparisons,
            "headline": " ".join(c["text"] for c in comparisons) or "No model has a self-consistent test yet."}


def _compare(left: str, left_model: str, right: str, right_model: str, sc: Mapping[str, Any],
             own_long: Mapping[str, Any]) -> dict[str, Any] | None:
    a, b = sc.get(left_model), sc.get(right_model)
    if not a or not b:
        return None
    ra, rb = a["rmse_meV_per_atom"], b["rmse_meV_per_atom"]
    better, worse = ((right, right_model, rb), (left, left_model, ra)) if rb <= ra else \
        ((left, left_model, ra), (right, right_model, rb))
    diff = worse[2] - better[2]
    rel = diff / worse[2] if worse[2] > 0 else 0.0
    n = min(a["n_frames"], b["n_frames"])
    text = (f"{better[0].capitalize()} ({better[1]}) beats {worse[0]} ({worse[1]}) on the self-consistent test: "
            f"energy RMSE {better[2]:.2f} vs {worse[2]:.2f} meV/atom, {diff:.2f} meV/atom ({100 * rel:.0f} %) lower, "
            f"on {a['n_frames']} and {b['n_frames']} frames of each model's own trajectory.")
    out: dict[str, Any] = {"better": better[1], "worse": worse[1], "metric": "self-consistent energy RMSE",
                           "better_meV_per_atom": better[2], "worse_meV_per_atom": worse[2],
                           "difference_meV_per_atom": diff, "relative": rel,
                           "n_frames": [a["n_frames"], b["n_frames"]]}
    pair = f"{better[1]} vs {worse[1]}"
    fa, fb = a.get("force_rmse_eV_per_A"), b.get("force_rmse_eV_per_A")
    if fa is not None and fb is not None:
        f_better, f_worse = (fb, fa) if better[1] == right_model else (fa, fb)
        text += f" Force RMSE ({pair}): {f_better:.3f} vs {f_worse:.3f} eV/Å."
    la, lb = own_long.get(left_model), own_long.get(right_model)
    if la and lb:
        l_better, l_worse = (lb, la) if better[1] == right_model else (la, lb)
        text += (f" Long runs ({pair}): {l_better['energy_residual_rmse_meV_per_atom']:.2f} vs "
                 f"{l_worse['energy_residual_rmse_meV_per_atom']:.2f} meV/atom on their own labelled frames.")
    shifted = [(name, s["aligned_by_meV_per_atom"]) for name, s in ((left_model, a), (right_model, b))
               if s.get("aligned_by_meV_per_atom")]
    for name, shift in shifted:
        text += f" {name} is scored after subtracting its mean offset to the labeller ({shift:.1f} meV/atom)."
    if n < 5:
        text += f" With {n} frames per model this is an indication, not a measurement (the study labels 11)."
    out["text"] = text
    return out
