"""End to end with real LAMMPS, real xTB and real mace-torch fine-tuning, at the smallest sizes
that still exercise every stage: 2 iterations, a few dozen MD steps, 1 epoch.

- periodic, uninterrupted: the trajectory continues across models (positions modulo the cell,
  velocities), every stage ran once, the report exists;
- periodic, killed with SIGKILL while labelling and while fine-tuning, then rerun: no labelled
  frame is labelled again, no finished model is trained again, and report.json equals the
  uninterrupted run's;
- compare (naive + periodic) in the periodic run's directory: the periodic stages and the
  universal model's test are reused, naive runs and both are judged side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tolerances import WORKFLOW_REPORT_TOL, WORKFLOW_CONTINUITY_POSITION_A, WORKFLOW_CONTINUITY_VELOCITY
from umlipft.io import read_frames
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.runner import counts, run_workflow

from tiny_workflow import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory, small_model_path: Path) -> Path:
    path = tmp_path_factory.mktemp("wfcfg") / "tiny.yaml"
    path.write_text(TINY.format(model=small_model_path))
    return path


@pytest.fixture(scope="module")
def periodic_run(tmp_path_factory: pytest.TempPathFactory, tiny_yaml: Path):
    directory = tmp_path_factory.mktemp("wf") / "periodic"
    outcome = run_workflow(("periodic",), load_workflow_config(tiny_yaml), directory)
    return outcome


def _wrapped_delta(a: np.ndarray, b: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Shortest difference of positions modulo the cell (LAMMPS write_data wraps atoms)."""
    frac = np.linalg.solve(cell.T, (a - b).T).T
    frac -= np.round(frac)
    return frac @ cell


def test_periodic_continues_one_trajectory_across_models(periodic_run) -> None:
    root = periodic_run.directory
    assert periodic_run.finished and periodic_run.report_html.is_file()
    state = json.loads((root / "state.json").read_text())
    seg0, seg1 = state["stages"]["periodic/seg-00/md"]["result"], state["stages"]["periodic/seg-01/md"]["result"]
    final0 = read_frames(root / seg0["finals"][0])[-1]
    last0 = read_frames(root / seg0["trajectories"][0])[-1]
    first1 = read_frames(root / seg1["trajectories"][0])[0]
    cell = final0.cell.array
    np.testing.assert_allclose(first1.cell.array, cell, atol=1e-6)
    # The segment's final frame is its last dumped frame, and the next segment starts from it.
    for other in (last0, first1):
        delta = _wrapped_delta(other.positions, final0.positions, cell)
        assert np.abs(delta).max() < WORKFLOW_CONTINUITY_POSITION_A
    v_final = final0.get_velocities()
    np.testing.assert_allclose(first1.get_velocities(), v_final, rtol=0, atol=WORKFLOW_CONTINUITY_VELOCITY)
    np.testing.assert_allclose(last0.get_velocities(), v_final, rtol=0, atol=WORKFLOW_CONTINUITY_VELOCITY)
    assert float(np.abs(v_final).max()) > 0.0
    # Segment 1 ran with FT1 (its LAMMPS export), segment 0 with the universal model.
    cfg0 = json.loads((root / seg0["directories"][0] / "md-config.json").read_text())["config"]
    cfg1 = json.loads((root / seg1["directories"][0] / "md-config.json").read_text())["config"]
    assert cfg0["model"].endswith("export/U/U-lammps-float32.pt")
    assert cfg1["model"].endswith("export/FT1/FT1-lammps-float32.pt")
    # FT1's export carries a watch fitted on FT1's own training frames; U has no training data here.
    from umlipft.errors import InputError
    from umlipft.models.watch import read_watch

    assert read_watch(cfg1["model"])["training_file"].endswith("periodic/ft-01/model/data/train.extxyz")
    with pytest.raises(InputError, match="--watch"):
        read_watch(cfg0["model"])
    report = json.loads(periodic_run.report_json.read_text())
    assert set(report["self_consistent"]) == {"U", "FT1", "FT2"}
    assert report["long_runs"]["runs"]["FT2"]["n_frames"] >= 3
    assert {"FT1", "FT2"} <= set(report["finetune"])
    figures = {p.name for p in (periodic_run.report_json.parent / "figures").glob("*.png")}
    assert {"residuals-naive-periodic.png", "long-FT2-energy.png", "long-FT2-q.png",
            "coverage-per-iteration.png", "pca-map.png"} <= figures
    c = counts(root)
    assert all(n == 1 for n in c["trainings_finished"].values()) and len(c["trainings_finished"]) == 2
    assert all(max(a) == 1 for a in c["label_attempts"].values())


def _run_until(cmd: list[str], env: dict[str, str], condition, timeout_s: float = 900.0) -> None:
    """Start the workflow and SIGKILL its whole process group as soon as ``condition()`` holds."""
    process = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s:
            if condition():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return
            if process.poll() is not None:
                pytest.fail(f"the workflow ended (exit {process.returncode}) before the kill point")
            time.sleep(0.1)
        pytest.fail("the kill point was not reached in time")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_killed_periodic_run_resumes_without_redoing_work_and_ends_with_the_same_report(
        periodic_run, tiny_yaml: Path, tmp_path: Path) -> None:
    directory = tmp_path / "killed"
    cmd = [sys.executable, "-m", "umlipft.cli", "workflow", "periodic", "--config", str(tiny_yaml),
           "-o", str(directory)]
    env = dict(os.environ)
    label_work = directory / "periodic/seg-00/label/work"
    # 1: one frame of the first segment labelled, the second in progress.
    _run_until(cmd, env, lambda: (label_work / "frame_000000/result.extxyz").is_file())
    # 2: FT1 finished, the training of FT2 started.
    _run_until(cmd, env, lambda: (directory / "periodic/ft-02/model/mace/umlipft-train.log").is_file())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    c = counts(directory)
    # Frame 0 of segment 0 was labelled before the first kill and never again.
    assert c["label_attempts"]["periodic/seg-00/label"][0] == 1
    for stage, calls in c["labelled_by_call"].items():
        flat = [i for call in calls for i in call]
        assert len(flat) == len(set(flat)), f"{stage}: a frame was labelled twice: {calls}"
    assert c["trainings_finished"] == {"periodic/ft-01": 1, "periodic/ft-02": 1}
    assert c["training_runs"]["periodic/ft-01"] == 1  # FT1 never retrained after the second kill
    a = json.loads(periodic_run.report_json.read_text())
    b = json.loads((directory / "report-periodic/report.json").read_text())
    _assert_same(a, b, "report")


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= WORKFLOW_REPORT_TOL * max(1.0, abs(a)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_compare_reuses_the_periodic_stages_and_judges_naive_against_periodic(periodic_run, tiny_yaml: Path) -> None:
    root = periodic_run.directory
    before = json.loads((root / "state.json").read_text())
    outcome = run_workflow(("naive", "periodic"), load_workflow_config(tiny_yaml), root)
    after = json.loads((root / "state.json").read_text())
    for name, entry in before["stages"].items():  # nothing of the periodic run was redone
        assert after["stages"][name]["attempts"] == entry["attempts"]
        assert after["stages"][name]["fingerprint"] == entry["fingerprint"]
    report = json.loads(outcome.report_json.read_text())
    assert set(report["self_consistent"]) == {"U", "N-2pts", "N-4pts", "FT1", "FT2"}
    assert report["strategies"]["naive"]["models"][-1]["n_frames"] == 4
    cross = {(r["model"], r["frames"]) for r in report["long_runs"]["cross_evaluation"]}
    assert cross == {(m, f"{r} run") for m in ("N-4pts", "FT2") for r in ("N-4pts", "FT2")}
    assert set(report["coverage"]["per_iteration"]) == {"iteration 1", "iteration 2"}
    data = json.loads((outcome.report_json.parent / "figures/residuals-naive-periodic.json").read_text())["data"]
    assert set(data["naive"]) == {"U", "N-2pts", "N-4pts"} and set(data["periodic"]) == {"U", "FT1", "FT2"}
    assert "naive/md" in after["stages"] and len(after["stages"]["naive/md"]["result"]["trajectories"]) == 2


def test_control_and_adaptive_run_end_to_end_beside_periodic(periodic_run, tiny_yaml: Path) -> None:
    """The two strategies without another automated run: control (one trajectory with U, models
    on its first n labels) and adaptive (segments cut where Q leaves its limit), judged with
    periodic so the report says how many labels adaptive needed to reach periodic's error."""
    root = periodic_run.directory
    outcome = run_workflow(("control", "adaptive", "periodic"), load_workflow_config(tiny_yaml), root)
    assert outcome.finished and outcome.report_html.is_file()
    report = json.loads(outcome.report_json.read_text())
    assert {"NP-2", "NP-4", "AD1", "AD2"} <= set(report["self_consistent"])
    comparison = report["adaptive_vs_periodic"]
    assert comparison["periodic_labels"] == 4
    if comparison["adaptive_model"] is not None:
        assert comparison["adaptive_labels"] <= report["strategies"]["adaptive"]["models"][-1]["n_frames"]
    # the periodic stages were reused, not redone
    c = counts(root)
    assert all(n == 1 for n in c["trainings_finished"].values())


def test_compare_report_reads_in_a_browser(periodic_run, tiny_yaml: Path, tmp_path: Path) -> None:
    """The naive-vs-periodic report as a chemist opens it in a real (headless) browser: it starts
    with the verdict table, a row per model, and shows every figure of the report, decoded."""
    from browser import render

    outcome = run_workflow(("naive", "periodic"), load_workflow_config(tiny_yaml), periodic_run.directory)
    report = json.loads(outcome.report_json.read_text())
    models = ["U", "N-2pts", "N-4pts", "FT1", "FT2"]
    for name in models:
        entry = report["self_consistent"][name]
        assert entry["rmse_meV_per_atom"] >= 0 and entry["force_rmse_eV_per_A"] > 0
    assert [r["model"] for r in report["verdict"]["rows"]] == models
    page = render(outcome.report_html, screenshot=tmp_path / "report.png")
    figures = sorted(p.name for p in (outcome.report_html.parent / "figures").glob("*.png"))
    assert {"residuals-naive-periodic.png", "pca-map.png", "coverage-by-element.png", "coverage-within-strategy.png",
            "coverage-per-iteration.png", "bonds-OH-U-vs-FT1.png", "long-N-4pts-energy.png", "long-FT2-energy.png",
            "long-FT2-q.png"} <= set(figures)
    assert page.body.get("data-images-loaded") == "all", page.body
    assert sorted(e.attrs["alt"] + ".png" for e in page.all("img")) == figures  # each figure once
    assert page.all("h2")[0].text.strip() == "Verdict"
    table = page.first("table", **{"class": "verdict"})
    assert 0 < table < page.first("img")
    rows = [k for k in range(table, len(page.elements)) if page.elements[k].tag == "tr"][2:2 + len(models)]
    assert [page.elements[k + 1].text.strip().rstrip(" *") for k in rows] == models
    headline = page.elements[page.first("p", **{"class": "headline"})].text
    assert "N-4pts" in headline and "FT2" in headline and "meV/atom" in headline
    assert (tmp_path / "report.png").stat().st_size > 10_000
