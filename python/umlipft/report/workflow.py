"""The workflow report a chemist reads first and can put in a paper's SI.

``report.html`` of a ``report-<strategies>`` folder, laid out from its ``report.json`` and
``figures/`` (written by :mod:`umlipft.workflows.judge`), in the study's order:

1. the verdict: one table, a row per model (self-consistent residual mean/RMSE/n, force RMSE,
   long-run residual, events, frames used), and the naive-vs-periodic headline above it;
2. residuals per model (the study's Fig. 2);
3. descriptor-space coverage of the two final datasets (Fig. 3);
4. coverage per iteration within each strategy and O-H bond lengths of U vs FT1 data (Fig. 4);
5. long runs: energies with reference points, cross-evaluation and event times (Fig. 5);
6. Q(t) of the atoms of the events;
7. the independent test set binned by reference energy (``evaluation.independent``);
8. the adaptive strategy per iteration: when the in-run watch stopped the segment, which atoms
   fired it, the labels used, and the labels adaptive needed to reach periodic's error;
9. supplementary: force parity, fine-tuning, and any other figure of the folder.

Only the standard library: reports are rebuilt on login nodes (``umlipft report DIR``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError
from ..io import atomic_write_text
from .html import REPORT_NAME, _e, _figure_html

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1150px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc;
       margin-top: 2em; } h3 { font-size: 1.0em; margin-bottom: 0.3em; }
p.setup { color: #444; font-size: 0.92em; margin-top: 0.2em; }
p.headline { font-size: 1.05em; background: #f3f7fb; border-left: 4px solid #0072B2; padding: 0.6em 0.9em; }
figure { margin: 0.8em 0 1.6em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0 0.6em 0; }
td, th { border: 1px solid #d4d4d4; padding: 3px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: center; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.better td { background: #e9f6ec; } tr.worse td { background: #fcefe9; }
table.verdict td:first-child { white-space: nowrap; }
p.note { font-size: 0.85em; color: #555; margin-top: 0.2em; }
nav ol { font-size: 0.9em; columns: 2; }
"""


def build_workflow_report(folder: str | Path, output: str | Path | None = None, title: str | None = None,
                          embed: bool = False) -> Path:
    """Write ``FOLDER/report.html`` (or ``output``) from ``FOLDER/report.json`` and its figures."""
    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise InputError(f"{folder} holds no report.json; it is not a workflow report folder")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    output = Path(output) if output else folder / REPORT_NAME
    figures = {p.name: p for p in sorted((folder / "figures").glob("*.png"))}
    used: set[str] = set()
    base = output.parent

    def fig(name: str) -> str:
        if name not in figures:
            return ""
        used.add(name)
        return _figure_html(figures[name], base, embed)

    def figs(names: Iterable[str]) -> str:
        return "".join(fig(n) for n in names)

    setup = report.get("setup", {})
    title = title or f"umlipft workflow: {' vs '.join(report.get('strategies', {}))}"
    sections: list[tuple[str, str, str]] = []  # (anchor, heading, body)

    residual_figs = [n for n in figures if n.startswith("residuals-")]
    sections.append(("fig2", "Self-consistent residuals per model (study Fig. 2)",
                     _p("Each model runs its own trajectory from the common start structure; frames of its second "
                        "half are labelled and the residual is the model's own MD energy minus the reference, per "
                        "atom.") + figs(residual_figs)))
    sections.append(("fig3", "Descriptor-space coverage of the final datasets (study Fig. 3)",
                     _p(_pca_sentence(report.get("coverage", {}))) + figs(["pca-map.png", "coverage-by-element.png"])))
    bonds = report.get("bond_lengths", {}).get("datasets", [])
    sections.append(("fig4", "Coverage per iteration and O-H bond lengths (study Fig. 4)",
                     figs(["coverage-within-strategy.png", "coverage-per-iteration.png"])
                     + (_bond_table(bonds) if bonds else "") + fig("bonds-OH-U-vs-FT1.png")))
    order = [r["model"] for r in report.get("verdict", {}).get("rows", [])]
    long = report.get("long_runs", {})
    runs = long.get("runs", {})
    if runs:
        body = ""
        for name, run in runs.items():
            body += f"<h3>{_e(name)}</h3>" + fig(f"long-{name}-energy.png") + _events_table(run)
        body += _cross_table(long.get("cross_evaluation", []))
        sections.append(("fig5", "Long runs: energies, cross-evaluation and events (study Fig. 5)", body))
        q_body = ""
        for name, run in runs.items():
            q_body += fig(f"long-{name}-q.png") + _tracked_table(name, run.get("q", {}))
        if q_body:
            sections.append(("q", "Q-residual of the event atoms", q_body))
    independent = report.get("independent")
    if independent:
        sections.append(("independent", "Independent test set, binned by reference energy",
                         fig("independent-errors.png") + _independent_table(independent, order)))
    adaptive = report.get("adaptive")
    if adaptive:
        sections.append(("adaptive", "Adaptive: the in-run extrapolation watch per iteration",
                         _adaptive_html(adaptive, report.get("adaptive_vs_periodic"))))
    supplementary = figs(sorted(n for n in figures if n.endswith("-force-parity.png")))
    supplementary += _finetune_table(report.get("finetune", {}), order)
    supplementary += figs(n for n in figures if n not in used)
    if supplementary:
        sections.append(("supplementary", "Supplementary", supplementary))

    # A section whose analysis did not run (no long runs, one strategy) is left out, not shown empty.
    sections = [s for s in sections if "<figure" in s[2] or "<table" in s[2]]
    parts = ["<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>", f"<p class='setup'>{_e(_setup_sentence(setup))}</p>",
             "<h2 id='verdict'>Verdict</h2>", _verdict_html(report)]
    parts.append("<nav><ol>" + "".join(f"<li><a href='#{a}'>{_e(h)}</a></li>" for a, h, _ in sections)
                 + "</ol></nav>")
    for anchor, heading, body in sections:
        parts.append(f"<h2 id='{anchor}'>{_e(heading)}</h2>{body}")

    parts.append("</body></html>\n")
    atomic_write_text(output, "\n".join(parts))
    return output


def is_workflow_report(folder: str | Path) -> bool:
    path = Path(folder) / "report.json"
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "verdict" in doc and "self_consistent" in doc


# ----------------------------------------------------------------------------------------- pieces
def _p(text: str) -> str:
    return f"<p>{_e(text)}</p>" if text else ""


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _time(ps: float | None) -> str:
    """A duration in the unit that fits it (the figures' rule: fs below 1 ps, ns from 1 ns)."""
    if ps is None:
        return "–"
    if abs(ps) < 1.0:
        return f"{ps * 1000:g} fs"
    if abs(ps) < 1000.0:
        return f"{ps:g} ps"
    return f"{ps / 1000:g} ns"


def _setup_sentence(setup: Mapping[str, Any]) -> str:
    if not setup:
        return ""
    text = (f"{setup.get('system', '')} box {setup.get('formula', '')} ({setup.get('n_atoms')} atoms); "
            f"foundation model {setup.get('foundation')}; reference labels: {setup.get('reference')}; "
            f"strategies: {', '.join(setup.get('strategies', []))}, {setup.get('iterations')} iterations of "
            f"{setup.get('frames_per_segment')} frames; {str(setup.get('ensemble', '')).upper()} "
            f"{_num(setup.get('temperature_K'), 0)} K, {setup.get('timestep_fs')} fs steps, segments of "
            f"{_time(setup.get('segment_ps'))}; self-consistent tests of {_time(setup.get('test_ps'))} "
            f"({setup.get('test_frames')} frames labelled from the second half)")
    if setup.get("long_ps"):
        text += f"; long runs continue the test for {_time(setup.get('long_ps'))}"
    return text + f"; profile {setup.get('profile')}."


def _verdict_html(report: Mapping[str, Any]) -> str:
    verdict = report.get("verdict", {})
    comparisons = verdict.get("comparisons", [])
    better = {c["better"] for c in comparisons}
    worse = {c["worse"] for c in comparisons}
    out = f"<p class='headline'>{_e(verdict.get('headline', ''))}</p>"
    header = ("<tr><th rowspan='2'>model</th><th rowspan='2'>strategy</th><th rowspan='2'>frames used</th>"
              "<th colspan='3'>self-consistent residual (meV/atom)</th><th rowspan='2'>force RMSE (eV/Å)</th>"
              "<th rowspan='2'>long-run residual RMSE (meV/atom)</th><th rowspan='2'>events found (long run)</th></tr>"
              "<tr><th>mean</th><th>RMSE</th><th>n</th></tr>")
    rows = []
    for row in verdict.get("rows", []):
        cls = " class='better'" if row["model"] in better else " class='worse'" if row["model"] in worse else ""
        name = _e(row["model"]) + (" *" if row.get("aligned_by_meV_per_atom") else "")
        if row.get("final") and row["strategy"] != "universal":
            name = f"<b>{name}</b>"
        events = row.get("events")
        events_text = "not run" if events is None else (f"{len(events)}: " + "; ".join(events) if events else "none")
        long_n = f" (n = {row['long_n_frames']})" if row.get("long_n_frames") else ""
        rows.append(f"<tr{cls}><td>{name}</td><td>{_e(row['strategy'])}</td>"
                    f"<td class='num'>{_num(row['frames_used'])}</td>"
                    f"<td class='num'>{_num(row['sc_mean_meV_per_atom'])}</td>"
                    f"<td class='num'>{_num(row['sc_rmse_meV_per_atom'])}</td>"
                    f"<td class='num'>{_num(row['sc_n_frames'])}</td>"
                    f"<td class='num'>{_num(row['force_rmse_eV_per_A'], 3)}</td>"
                    f"<td class='num'>{_num(row['long_rmse_meV_per_atom'])}{long_n}</td>"
                    f"<td>{_e(events_text)}</td></tr>")
    out += f"<table class='verdict'>{header}{''.join(rows)}</table>"
    notes = ["Bold: the final model of each strategy.",
             "Green and red rows: the better and the worse of the compared final models (lower self-consistent "
             "energy RMSE is better)." if comparisons else "",
             "Self-consistent residual: (E_model − E_ref)/N on frames of the second half of the model's own trajectory, "
             "E_model from its MD. Force RMSE: the model's forces on those labelled frames against the reference. "
             "Long-run residual: RMSE of (E_model − E_ref)/N on the labelled frames of the model's own long run."]
    offset = report.get("universal_offset_meV_per_atom")
    if offset is not None:
        notes.append(f"* U is scored after subtracting its mean offset to the labeller, {offset:.1f} meV/atom "
                     "(its mean residual on all labelled training frames; the reference theory has another "
                     "energy zero; evaluation.align_universal_energy).")
    return out + "".join(f"<p class='note'>{_e(n)}</p>" for n in notes if n)


def _pca_sentence(coverage: Mapping[str, Any]) -> str:
    evr = coverage.get("explained_variance_ratio")
    if not evr:
        return ""
    return (f"Per-atom SOAP descriptors, PCA fitted on the union of {' and '.join(coverage.get('fitted_on', []))} "
            f"(PC1 + PC2 explain {100 * sum(evr[:2]):.1f} %). Coverage: a PC1/PC2 grid cell is covered by a "
            "dataset when at least one of its atoms falls in it.")


def _bond_table(bonds: Sequence[Mapping[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_e(str(d.get('name')))}</td><td class='num'>{_num(d.get('n_bonds'))}</td>"
                   f"<td class='num'>{_num(d.get('mean_A'), 4)}</td><td class='num'>{_num(d.get('std_A'), 4)}</td>"
                   f"<td class='num'>{_num(d.get('max_A'), 3)}</td></tr>" for d in bonds)
    return ("<table><tr><th>O-H bonds of</th><th>n bonds</th><th>mean (Å)</th><th>std (Å)</th><th>max (Å)</th></tr>"
            f"{rows}</table>")


def _events_table(run: Mapping[str, Any]) -> str:
    events = run.get("events", [])
    if not events:
        return f"<p class='note'>No events in {_time(run.get('duration_ps'))} (H-Cl &lt; 1.6 Å, Co-Cl &lt; 2.7 Å, " \
               "Co-O &lt; 2.6 Å, proton owners).</p>"
    rows = "".join(f"<tr><td class='num'>{_time(e.get('time'))}</td><td class='num'>{e.get('frame')}</td>"
                   f"<td>{_e(str(e.get('kind')))}</td><td>{_e(str(e.get('label')))}</td></tr>" for e in events)
    return f"<table><tr><th>time</th><th>frame</th><th>event</th><th>what</th></tr>{rows}</table>"


def _cross_table(cross: Sequence[Mapping[str, Any]]) -> str:
    if not cross:
        return ""
    rows = "".join(f"<tr><td>{_e(c['model'])}</td><td>{_e(c['frames'])}</td><td class='num'>{c['n_frames']}</td>"
                   f"<td class='num'>{_num(c['energy_residual_mean_meV_per_atom'])}</td>"
                   f"<td class='num'>{_num(c['energy_residual_rmse_meV_per_atom'])}</td>"
                   f"<td class='num'>{_num(c['energy_residual_max_abs_meV_per_atom'])}</td>"
                   f"<td class='num'>{_num(c['force_rmse_eV_per_A'], 3)}</td></tr>" for c in cross)
    return ("<h3>Cross-evaluation on the long runs' labelled frames</h3><table><tr><th>model</th><th>frames of</th>"
            "<th>n</th><th>mean (meV/atom)</th><th>RMSE (meV/atom)</th><th>max |residual| (meV/atom)</th>"
            f"<th>force RMSE (eV/Å)</th></tr>{rows}</table>")


def _tracked_table(name: str, q: Mapping[str, Any]) -> str:
    tracked = q.get("tracked", {})
    if not tracked:
        return ""
    position = {atom: k for k, atom in enumerate(q.get("tracked_atoms", []))}
    tracked = dict(sorted(tracked.items(), key=lambda item: position.get(item[1].get("atom"), len(position))))
    rows = "".join(
        f"<tr><td>{_e(label)}</td><td class='num'>{_num((t.get('own_band') or {}).get('mean'), 4)}</td>"
        f"<td class='num'>{_num((t.get('own_band') or {}).get('high'), 4)}</td>"
        f"<td class='num'>{t.get('frames_above_own_band')}</td><td class='num'>{_num(t.get('q_limit'), 4)}</td>"
        f"<td class='num'>{t.get('frames_above_q_limit')}</td></tr>" for label, t in tracked.items())
    return (f"<table><caption>{_e(name)}: tracked atoms ({_e(str(q.get('tracked_because', '')))})</caption>"
            "<tr><th>atom</th><th>own mean Q</th><th>own mean + 2σ</th><th>frames above</th>"
            f"<th>training-set Q limit</th><th>frames above</th></tr>{rows}</table>")


def _independent_table(ind: Mapping[str, Any], order: Sequence[str]) -> str:
    models = ind.get("models", {})
    names = [n for n in order if n in models] + [n for n in models if n not in order]
    rows = "".join(f"<tr><td>{_e(name)}{' *' if models[name].get('aligned_by_meV_per_atom') else ''}</td>"
                   f"<td class='num'>{_num(models[name]['mean_meV_per_atom'])}</td>"
                   f"<td class='num'>{_num(models[name]['rmse_meV_per_atom'])}</td>"
                   f"<td class='num'>{_num(models[name]['force_rmse_eV_per_A'], 3)}</td></tr>" for name in names)
    return (f"<table><caption>{_e(str(ind.get('file')))}: {ind.get('n_frames')} frames</caption><tr><th>model</th>"
            "<th>mean (meV/atom)</th><th>RMSE (meV/atom)</th><th>force RMSE (eV/Å)</th></tr>" + rows + "</table>")


def _adaptive_html(iterations: Sequence[Mapping[str, Any]], versus: Mapping[str, Any] | None) -> str:
    """One row per adaptive iteration: the model that ran the segment, how long, where the watch
    stopped it and which atoms fired it, the flagged frames, the labels and the model they trained."""
    rows = []
    for it in iterations:
        if not it.get("watched"):
            fired_at = "not watched (U has no training data)"
        elif it.get("halted"):
            fired_at = (f"step {it.get('halted_at_step')} of the segment, {_time(it.get('halted_at_ps'))} "
                        "on the trajectory")
        else:
            fired_at = "did not fire: full segment, frames as periodic"
        fired = it.get("fired_atoms") or []
        atoms = ", ".join(f"{a['element']} {a['id']} ({a['halt_ratio']:.2f})" for a in fired)
        if it.get("n_fired_atoms", 0) > len(fired):
            atoms += f", … ({it['n_fired_atoms']} in all)"
        if fired and not it.get("halted"):
            atoms += f" (step {it.get('fired_at_step')}, last flagged frame)"
        steps = it.get("labelled_steps")
        chosen = {"watch": "flagged frames, then the frames before the stop",
                  "periodic": "the second half (periodic's selection)"}.get(str(it.get("selection")), "")
        rows.append(
            f"<tr><td class='num'>{it.get('iteration')}</td><td>{_e(str(it.get('model')))}</td>"
            f"<td class='num'>{_num(it.get('steps'))} (from {_time(it.get('start_ps'))})</td><td>{_e(fired_at)}</td>"
            f"<td>{_e(atoms or '–')}</td><td class='num'>{_num(it.get('flagged_frames'))}</td>"
            f"<td class='num'>{_num(it.get('max_statistic'))}</td>"
            f"<td>{_e(str(_num(it.get('labels'))))}: {_e(chosen)}"
            + (f" (steps {_e(', '.join(map(str, steps)))})" if steps else "") + "</td>"
            f"<td class='num'>{_num(it.get('labels_cumulative'))}</td><td>{_e(str(it.get('trained') or ''))}</td></tr>")
    table = ("<table><tr><th>iteration</th><th>ran with</th><th>steps (from)</th><th>the watch stopped it at</th>"
             "<th>atoms that fired it: element ID (Q / halting limit)</th><th>flagged frames</th>"
             "<th>max statistic</th><th>labels</th><th>labels in all</th><th>trained</th></tr>"
             + "".join(rows) + "</table>")
    notes = ["The watch (compute mace/q in LAMMPS) compares every atom's MACE node features with the running model's "
             "training data every watch_every steps; its statistic is the largest Q over the element's halting limit "
             "(Bonferroni over the atoms), so above 1 the model has left its data; the segment stops after "
             "watch_patience checks in a row above 1, and the SAME trajectory continues from there with the model "
             "fine-tuned on the new labels. Atom IDs are LAMMPS's (1-based order of the start structure)."]
    if versus:
        if versus.get("adaptive_model"):
            notes.append(f"Adaptive reached periodic's self-consistent energy RMSE "
                         f"({_num(versus.get('periodic_rmse_meV_per_atom'))} meV/atom, {versus.get('periodic_model')}, "
                         f"{versus.get('periodic_labels')} labels) with {versus.get('adaptive_model')}: "
                         f"{versus.get('adaptive_labels')} labels, {_num(versus.get('adaptive_rmse_meV_per_atom'))} "
                         "meV/atom.")
        else:
            notes.append(f"Adaptive did not reach periodic's self-consistent energy RMSE "
                         f"({_num(versus.get('periodic_rmse_meV_per_atom'))} meV/atom, {versus.get('periodic_model')}, "
                         f"{versus.get('periodic_labels')} labels): its final model {versus.get('adaptive_final_model')} "
                         f"has {_num(versus.get('adaptive_final_rmse_meV_per_atom'))} meV/atom with "
                         f"{versus.get('adaptive_final_labels')} labels.")
    return table + "".join(f"<p class='note'>{_e(n)}</p>" for n in notes)


def _finetune_table(ft: Mapping[str, Any], order: Sequence[str]) -> str:
    if not ft:
        return ""
    ft = {n: ft[n] for n in [n for n in order if n in ft] + [n for n in ft if n not in order]}
    rows = "".join(f"<tr><td>{_e(name)}</td><td class='num'>{_num(f.get('n_frames'))}</td>"
                   f"<td class='num'>{_num(f.get('n_train'))}</td><td class='num'>{_num(f.get('n_valid'))}</td>"
                   f"<td class='num'>{_num(f.get('final_valid_rmse_e_meV_per_atom'))}</td>"
                   f"<td class='num'>{_num(f.get('final_valid_rmse_f_meV_per_A'), 1)}</td>"
                   f"<td>{_e(str(f.get('e0_policy') or ''))}</td></tr>" for name, f in ft.items())
    return ("<h3>Fine-tuning</h3><table><tr><th>model</th><th>frames</th><th>train</th><th>valid</th>"
            "<th>valid E RMSE (meV/atom)</th><th>valid F RMSE (meV/Å)</th><th>E0s</th></tr>" + rows + "</table>")
