"""The frames each iteration adds, as the coverage maps use them: naive subsets are written in
pool order by the real pool stage, so a subset's new frames are not the end of its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from umlipft.analysis.frames import frame_fingerprint
from umlipft.io import read_frames, write_frames
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.judge import iteration_datasets
from umlipft.workflows.state import WorkflowState
from umlipft.workflows.strategies import ModelInfo, StrategyResult, _pool_stage, universal


def test_new_frames_of_naive_subsets_in_pool_order(tmp_path: Path, aqueous_dir: Path) -> None:
    source = read_frames(aqueous_dir / "single_points" / "Finetuning__Periodic__U__dft.extxyz", index=":9")
    state = WorkflowState(tmp_path / "wf")
    labelled = []
    for j in range(3):  # three "trajectories" of three labelled frames each
        path = write_frames(state.root / f"naive/traj-{j:02d}/label/labelled.extxyz", source[3 * j:3 * j + 3])
        labelled.append(str(path.relative_to(state.root)))
    config = load_workflow_config(profile="quick", overrides={"iterations": 3, "frames_per_segment": 3,
                                                                   "naive_subsets": [3, 6], "seed": 5})
    pool = _pool_stage(state, config, labelled, deps=[])
    models = [universal(config)] + [ModelInfo(f"N-{n}pts", "unused.model", None, (subset,), n, f"naive/ft-{n:03d}")
                                    for n, subset in zip(pool["sizes"], pool["subsets"])]
    its = iteration_datasets(state, StrategyResult("naive", models, [], labelled))
    small, large = (read_frames(state.root / s) for s in pool["subsets"])
    small_ids = {frame_fingerprint(a) for a in small}
    expected = [frame_fingerprint(a) for a in large if frame_fingerprint(a) not in small_ids]
    assert [name for name, _, _ in its] == ["N-3pts", "N-6pts"]
    assert [frame_fingerprint(a) for a in its[1][2]] == expected and len(expected) == 3
    # The case that tail-of-file gets wrong: with this seed the new frames are not the last three.
    assert expected != [frame_fingerprint(a) for a in large[3:]]
    assert [frame_fingerprint(a) for a in its[0][2]] == [frame_fingerprint(a) for a in small]


@pytest.mark.slow  # 8 force calls of MACE-MP-0 small on 170 atoms
def test_independent_set_errors_binned_by_reference_energy(tmp_path: Path, aqueous_eval_frames_path: Path,
                                                           small_model_path: Path) -> None:
    """evaluation.independent: every model's residuals on a labelled set no strategy sampled, in
    equal-count bins of reference energy per atom (here U on 8 DFT frames of the aqueous system)."""
    import json

    import numpy as np

    from umlipft.workflows.judge import _Evaluators, _independent

    frames = read_frames(aqueous_eval_frames_path, index=":8")
    path = write_frames(tmp_path / "independent.extxyz", frames)
    config = load_workflow_config(profile="quick", overrides={"foundation": str(small_model_path),
                                                              "evaluation": {"independent": str(path)}})
    state = WorkflowState(tmp_path / "wf")
    results = {"periodic": StrategyResult("periodic", [universal(config)], [], [])}
    figures = tmp_path / "figures"
    from umlipft.analysis.plots import save_figure

    out = _independent(config, results, figures, save_figure, 0.0, _Evaluators(state, config))
    e_ref = np.array([a.info["REF_energy"] / len(a) for a in frames])
    assert out["n_frames"] == 8 and len(out["bins"]) == 2  # min(5, 8 // 4) equal-count bins
    np.testing.assert_allclose(out["energy_bins_eV_per_atom"], np.quantile(e_ref, [0.0, 0.5, 1.0]))
    assert [b["n_frames"] for b in out["bins"]] == [4, 4]
    u = out["models"]["U"]
    bin_means = [b["models"]["U"]["mean_meV_per_atom"] for b in out["bins"]]
    assert np.mean(bin_means) == pytest.approx(u["mean_meV_per_atom"], rel=1e-12)  # equal-sized bins
    assert u["force_rmse_eV_per_A"] > 0
    shown = json.loads((figures / "independent-errors.json").read_text())["data"]
    assert shown["bins"][0]["models"]["U"]["mean_meV_per_atom"] == bin_means[0]
