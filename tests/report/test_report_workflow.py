"""The workflow report: the verdict (which final model is better, by how much, on what) and the
page that opens with it, laid out in the study's figure order and rendered by a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from browser import render
from umlipft.workflows.judge import verdict
from umlipft.workflows.strategies import ModelInfo, StrategyResult


def _results() -> dict[str, StrategyResult]:
    u = ModelInfo("U", "small", None, (), 0, None)
    naive = [u] + [ModelInfo(f"N-{n}pts", f"naive/ft-{n:03d}/m.model", "x.pt", ("s.extxyz",), n, f"naive/ft-{n:03d}")
                   for n in (2, 4)]
    periodic = [u] + [ModelInfo(f"FT{i}", f"periodic/ft-{i:02d}/m.model", "x.pt", ("l.extxyz",), 2 * i,
                                f"periodic/ft-{i:02d}") for i in (1, 2)]
    return {"naive": StrategyResult("naive", naive, [], []), "periodic": StrategyResult("periodic", periodic, [], [])}


RESIDUALS = {"U": [-16.0, -15.0, -17.5], "N-2pts": [-11.0, -10.0, -12.0], "N-4pts": [-10.5, -11.5, -9.0],
             "FT1": [-8.0, -7.0, -9.5], "FT2": [-5.0, -4.0, -6.5]}
FORCES = {"U": 0.31, "N-2pts": 0.22, "N-4pts": 0.21, "FT1": 0.2, "FT2": 0.17}


def _report() -> dict:
    sc = {}
    for name, r in RESIDUALS.items():
        r = np.asarray(r)
        sc[name] = {"mean_meV_per_atom": float(r.mean()), "rmse_meV_per_atom": float(np.sqrt(np.mean(r**2))),
                    "n_frames": r.size, "force_rmse_eV_per_A": FORCES[name],
                    "aligned_by_meV_per_atom": 40.0 if name == "U" else 0.0, "residuals_meV_per_atom": r.tolist()}
    long = {"cross_evaluation": [
        {"model": m, "frames": f"{f} run", "n_frames": 4, "energy_residual_mean_meV_per_atom": -3.0,
         "energy_residual_rmse_meV_per_atom": own if m == f else 20.0, "energy_residual_max_abs_meV_per_atom": 9.0,
         "force_rmse_eV_per_A": 0.2} for m in ("N-4pts", "FT2") for f, own in (("N-4pts", 10.5), ("FT2", 6.4))],
        "runs": {"N-4pts": {"events": [{"kind": "bond_formed", "frame": 3, "time": 3200.0,
                                        "label": "H-Cl formed: H150-Cl190 (1.31 Å)"}], "duration_ps": 9000.0},
                 "FT2": {"events": [], "duration_ps": 9000.0}}}
    return {"self_consistent": sc, "long_runs": long, "universal_offset_meV_per_atom": 40.0,
            "strategies": {"naive": {}, "periodic": {}}}


def test_verdict_names_the_better_final_model_by_how_much_and_on_what() -> None:
    report = _report()
    v = verdict(report, _results())
    assert [r["model"] for r in v["rows"]] == ["U", "N-2pts", "N-4pts", "FT1", "FT2"]
    rows = {r["model"]: r for r in v["rows"]}
    for name, r in RESIDUALS.items():
        assert rows[name]["sc_rmse_meV_per_atom"] == pytest.approx(np.sqrt(np.mean(np.square(r))))
        assert rows[name]["force_rmse_eV_per_A"] == FORCES[name]
    assert rows["U"]["aligned_by_meV_per_atom"] == 40.0 and rows["U"]["strategy"] == "universal"
    assert rows["N-4pts"]["events"] == ["H-Cl formed: H150-Cl190 (1.31 Å)"] and rows["FT2"]["events"] == []
    assert rows["FT1"]["events"] is None  # no long run
    assert rows["N-4pts"]["long_rmse_meV_per_atom"] == 10.5 and rows["FT2"]["long_rmse_meV_per_atom"] == 6.4
    (c,) = v["comparisons"]
    naive, periodic = report["self_consistent"]["N-4pts"], report["self_consistent"]["FT2"]
    assert (c["better"], c["worse"]) == ("FT2", "N-4pts")
    assert c["difference_meV_per_atom"] == pytest.approx(naive["rmse_meV_per_atom"] - periodic["rmse_meV_per_atom"])
    assert c["relative"] == pytest.approx(c["difference_meV_per_atom"] / naive["rmse_meV_per_atom"])
    text = v["headline"]
    assert text.startswith("Periodic (FT2) beats naive (N-4pts) on the self-consistent test")
    assert f"{periodic['rmse_meV_per_atom']:.2f} vs {naive['rmse_meV_per_atom']:.2f} meV/atom" in text
    assert "Long runs (FT2 vs N-4pts): 6.40 vs 10.50 meV/atom" in text and "indication, not a measurement" in text
    # One strategy: its last model against U.
    single = verdict(report, {"periodic": _results()["periodic"]})
    assert [(c["better"], c["worse"]) for c in single["comparisons"]] == [("FT2", "U")]
    assert "U is scored after subtracting its mean offset to the labeller (40.0 meV/atom)" in single["headline"]


def _folder(root: Path) -> Path:
    """A report folder as the judge writes it: figures from the real plotting functions and a
    report.json with the judge's verdict."""
    from umlipft.analysis import plots
    from umlipft.analysis.geometry import Event
    from umlipft.report import build_report

    figures = root / "figures"
    naive = {k: RESIDUALS[k] for k in ("U", "N-2pts", "N-4pts")}
    periodic = {k: RESIDUALS[k] for k in ("U", "FT1", "FT2")}
    plots.save_figure(*plots.plot_residuals(naive, periodic), figures / "residuals-naive-periodic.png", "Fig 2")
    t = np.linspace(0.0, 9000.0, 60)
    event = Event("bond_formed", 21, 3200.0, (150, 190), "H-Cl formed", False, True)
    plots.save_figure(*plots.plot_energy_trajectory(t, -800 + np.sin(t / 900), t[::6], -800 + np.sin(t[::6] / 900),
                                                    events=[event]), figures / "long-N-4pts-energy.png", "Fig 5")
    plots.save_figure(*plots.plot_control_chart(t, np.abs(np.sin(t / 500))[:, None], ["H150"], "Q", xlabel=None,
                                                events=[event]), figures / "long-N-4pts-q.png", "Q(t)")
    plots.save_figure(*plots.plot_control_chart(t, np.cos(t)[:, None] ** 2, ["O3"], "Q"), figures / "extra.png", "x")
    report = _report()
    report["verdict"] = verdict(report, _results())
    (root / "report.json").write_text(json.dumps(report))
    assert build_report(root) == root / "report.html"  # a workflow folder gets the workflow layout
    return root


def test_page_opens_with_the_verdict_table_then_the_figures_in_the_studys_order(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "report-naive-periodic")
    page = render(folder / "report.html", screenshot=tmp_path / "shot.png", height=2400)
    assert page.body.get("data-images-loaded") == "all", page.body
    assert int(page.body["data-images"]) == 4  # every figure of the folder, none twice
    headings = [e.text.strip() for e in page.all("h2")]
    assert headings[0] == "Verdict"
    # (no coverage figures in this folder: their sections are left out, not shown empty)
    assert headings[1:] == ["Self-consistent residuals per model (study Fig. 2)",
                            "Long runs: energies, cross-evaluation and events (study Fig. 5)",
                            "Q-residual of the event atoms", "Supplementary"]
    table = page.first("table", **{"class": "verdict"})
    assert 0 < table < page.first("img")
    rows = [k for k in range(table, len(page.elements)) if page.elements[k].tag == "tr"][2:7]
    first_cell = [page.elements[k + 1].text.strip() for k in rows]  # a row's next element is its first cell
    assert first_cell == ["U *", "N-2pts", "N-4pts", "FT1", "FT2"]  # *: U aligned to the labeller
    better = [k for k in rows if page.elements[k].attrs.get("class") == "better"]
    worse = [k for k in rows if page.elements[k].attrs.get("class") == "worse"]
    assert [page.elements[k + 1].text.strip() for k in better + worse] == ["FT2", "N-4pts"]
    assert "Periodic (FT2) beats naive (N-4pts)" in page.elements[page.first("p", **{"class": "headline"})].text
    imgs = [e.attrs["alt"] for e in page.all("img")]
    assert imgs == ["residuals-naive-periodic", "long-N-4pts-energy", "long-N-4pts-q", "extra"]
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
