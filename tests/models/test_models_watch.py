"""The extrapolation watch of an export (issue 15, Python side): fitted like ``analyze pca
--descriptor mace``, evaluated from its JSON alone like ``analyze q``, and a halting statistic
that stays quiet on the aqueous data and fires on structures outside it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sample_structures import hcl_at

from umlipft.cli import main
from umlipft.errors import ConfigError, InputError
from umlipft.io import read_frames, sha256_file, write_frames
from umlipft.models.export import ExportConfig
from umlipft.models.watch import (HALT_FRAME_ALPHA, WATCH_FILE, exponential_tail, fit_watch, read_watch,
                                  tail_limit, watch_q)

NAIVE_11 = "Finetuning__Naive__Finetuned_Models__11pts__11pt_dataset.xyz"


@pytest.fixture(scope="module")
def naive11_path(aqueous_dir: Path) -> Path:
    return aqueous_dir / "training_sets" / NAIVE_11


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, naive11_path: Path, aqueous_eval_frames_path: Path):
    """(training file: 3 frames + the set's isolated atoms, frames to judge: 2 independent frames)."""
    root = tmp_path_factory.mktemp("watch-sets")
    frames = read_frames(naive11_path)
    train = write_frames(root / "train.extxyz", [a for a in frames if len(a) > 1][:3]
                         + [a for a in frames if len(a) == 1])
    judge = write_frames(root / "judge.extxyz", read_frames(aqueous_eval_frames_path, index=":2"))
    return Path(train), Path(judge)


# ----------------------------------------------------------------------------- configuration
def test_export_watch_defaults_are_analyze_defaults() -> None:
    from umlipft.analysis.monitor import QConfig
    from umlipft.analysis.pca import PCAConfig

    config = ExportConfig()
    assert config.watch is None
    assert config.watch_components == PCAConfig().components
    assert config.watch_alpha == QConfig().alpha


@pytest.mark.parametrize("values, key", [({"watch_components": 0}, "--watch-components"),
                                         ({"watch_alpha": 0.0}, "--watch-alpha"),
                                         ({"watch_alpha": 1.0}, "--watch-alpha"),
                                         ({"watch": " "}, "--watch")])
def test_bad_watch_settings_are_config_errors(values, key) -> None:
    with pytest.raises(ConfigError, match=key):
        ExportConfig.from_dict({"model": "small", **values})


def test_watch_options_without_watch_are_refused(tmp_path: Path, capsys) -> None:
    assert main(["export", "small", "--watch-alpha", "0.05", "-o", str(tmp_path / "x.pt")]) != 0
    assert "give --watch" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_exponential_tail_recovers_an_exponential_quantile() -> None:
    # Exp(1): P(Q > q) = e^-q, so the quantile at a is -ln a. A wrong threshold, scale or
    # probability misses it by far more than the sampling error (~2 % at n = 10^5).
    q = np.random.default_rng(0).exponential(1.0, 100_000)
    tail = exponential_tail(q)
    assert tail["probability"] == pytest.approx(0.05) and tail["n_tail"] == 5000
    for a in (1e-3, 1e-4, 1e-6):
        assert tail_limit(tail, a) == pytest.approx(-math.log(a), rel=0.03)
    # Bonferroni: N atoms at frame probability a is one atom at a/N.
    assert tail_limit(tail, 1e-2, 170) == pytest.approx(tail_limit(tail, 1e-2 / 170))


# ------------------------------------------------------------------------------------ errors
def test_watch_file_errors_name_the_file(tmp_path: Path, small_model_path: Path, naive11_path: Path,
                                         aqueous_eval_frames_path: Path) -> None:
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    bad = read_frames(aqueous_eval_frames_path, index=":1")[0]
    text = aqueous_eval_frames_path.read_text().splitlines()
    nan = tmp_path / "nan.extxyz"
    lines = text[: 2 + len(bad)]
    fields = lines[2].split()
    fields[1] = "nan"
    nan.write_text("\n".join(lines[:2] + [" ".join(fields)] + lines[3:]) + "\n")
    isolated = write_frames(tmp_path / "isolated.extxyz", [a for a in read_frames(naive11_path) if len(a) == 1])
    for path, reason in ((empty, "empty"), (nan, "NaN|nan"), (Path(isolated), "isolated atoms"),
                         (tmp_path / "missing.extxyz", "does not exist")):
        with pytest.raises(InputError, match=reason) as err:
            fit_watch(small_model_path, path, covered_numbers=[1, 3, 8, 17, 27])
        assert str(path) in str(err.value) and "--watch" in str(err.value)
    # Elements the exported model does not cover: refused before any MACE evaluation.
    with pytest.raises(InputError, match="Li Cl Co, which the exported model does not cover") as err:
        fit_watch(small_model_path, aqueous_eval_frames_path, covered_numbers=[1, 8])
    assert str(aqueous_eval_frames_path) in str(err.value)


def test_export_refuses_a_watch_outside_its_elements(tmp_path: Path, small_model_path: Path,
                                                     aqueous_eval_frames_path: Path, capsys) -> None:
    out = tmp_path / "ho.pt"
    assert main(["export", str(small_model_path), "--elements", "H", "O", "--watch",
                 str(aqueous_eval_frames_path), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert str(aqueous_eval_frames_path) in err and "does not cover" in err and not out.exists()


def test_reading_a_watch_from_files_without_one(tmp_path: Path) -> None:
    import zipfile

    plain = tmp_path / "plain.pt"
    with zipfile.ZipFile(plain, "w") as archive:  # the layout torch.jit.save writes
        archive.writestr("plain/extra/umlipft.json", "{}")
    with pytest.raises(InputError, match="--watch"):
        read_watch(plain)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "umlipft-pca"}))
    with pytest.raises(InputError, match="not a umlipft MACE watch"):
        read_watch(other)


# ------------------------------------------------------------------- the contract, end to end
@pytest.mark.slow
def test_export_stores_the_watch_contract(tmp_path: Path, small_model_path: Path, small_sets) -> None:
    from umlipft.models import read_export_metadata

    train, _ = small_sets
    out = tmp_path / "watched.pt"
    # The export MD uses (element-restricted and optimised); the watch is fitted on the full model.
    assert main(["export", str(small_model_path), "--elements", "Li", "Co", "Cl", "O", "H", "--watch", str(train),
                 "--watch-components", "4", "--watch-alpha", "0.05", "-o", str(out)]) == 0
    meta = read_export_metadata(out)
    assert meta["watch"] is True and meta["watch_file"] == WATCH_FILE == "umlipft_watch.json"
    watch = read_watch(out)
    assert watch["format"] == "umlipft-mace-watch" and watch["version"] == 1
    assert watch["grouping"] == "global" and watch["alpha"] == 0.05 and watch["n_components"] == 4
    # MACE-MP-0 small: two interaction layers, each product output 128x0e.
    assert [(layer["feature_dim"], layer["columns"]) for layer in watch["layers"]] == [(128, list(range(128)))] * 2
    assert watch["n_features"] == 256
    group = watch["groups"]["all"]
    assert len(group["mean"]) == 256 and len(group["explained_variance"]) == 4
    assert len(group["components"]) == 4 and all(len(row) == 256 for row in group["components"])
    rows = np.asarray(group["components"])
    np.testing.assert_allclose(rows @ rows.T, np.eye(4), atol=1e-10)  # rows are the principal axes
    assert list(watch["elements"]) == ["H", "Li", "O", "Cl", "Co"]
    assert sum(e["n_train_atoms"] for e in watch["elements"].values()) == 3 * 170  # isolated atoms dropped
    for element in watch["elements"].values():
        assert element["q_limit"] > 0 and element["q_std"] > 0 and element["t2_limit"] > 0
        assert set(element["halt_tail"]) == {"threshold", "probability", "scale", "n_tail"}
    assert watch["halt"]["frame_alpha"] == HALT_FRAME_ALPHA and "MPI_MAX" in watch["halt"]["explanation"]
    assert watch["training_sha256"] == sha256_file(train)
    assert watch["model_sha256"] == sha256_file(small_model_path)


@pytest.mark.slow
def test_watch_q_equals_analyze_q(tmp_path: Path, small_model_path: Path, small_sets) -> None:
    from tolerances import WATCH_VS_ANALYZE_Q_REL

    train, judge = small_sets
    pca_dir, q_dir = tmp_path / "pca", tmp_path / "q"
    assert main(["analyze", "pca", "--fit", str(train), "--descriptor", "mace", "--model", str(small_model_path),
                 "-o", str(pca_dir)]) == 0
    assert main(["analyze", "q", "--pca", str(pca_dir), str(judge), "-o", str(q_dir)]) == 0
    summary = json.loads((q_dir / "q_results.json").read_text())
    q_ref, t2_ref = np.load(q_dir / "q.npy"), np.load(q_dir / "t2.npy")
    symbols = np.asarray(summary["symbols"])
    limit_ref = np.asarray([summary["limits"][s]["q_limit"] for s in symbols])

    watch = fit_watch(small_model_path, train)  # analyze's defaults: 5 components, alpha 0.01, global
    # Evaluated from the JSON file (what the C++ compute reads); floats survive the round trip.
    path = tmp_path / WATCH_FILE
    path.write_text(json.dumps(watch))
    assert read_watch(path) == watch
    result = watch_q(path, judge)
    assert watch["alpha"] == summary["alpha"] and watch["grouping"] == "global"
    assert np.all(q_ref > 0)
    for k in range(q_ref.shape[0]):
        assert list(result.symbols[k]) == list(symbols)
        np.testing.assert_allclose(result.q[k], q_ref[k], rtol=WATCH_VS_ANALYZE_Q_REL, atol=0)
        np.testing.assert_allclose(result.t2[k], t2_ref[k], rtol=WATCH_VS_ANALYZE_Q_REL, atol=0)
        np.testing.assert_allclose(result.q_over_limit[k], q_ref[k] / limit_ref, rtol=WATCH_VS_ANALYZE_Q_REL,
                                   atol=0)


# --------------------------------------------------------------------------- halting statistic
@pytest.mark.slow
def test_halt_is_quiet_on_the_data_and_fires_outside_it(small_model_path: Path, naive11_path: Path,
                                                        aqueous_eval_frames_path: Path) -> None:
    watch = fit_watch(small_model_path, naive11_path)
    n_atoms = 170
    # The training frames: every atom's Q is at most its element's training maximum.
    for symbol, element in watch["elements"].items():
        assert element["q_train_max"] / tail_limit(element["halt_tail"], HALT_FRAME_ALPHA, n_atoms) < 1.0, symbol
    # Independent frames of the same system (another trajectory, U's self-consistent test).
    independent = read_frames(aqueous_eval_frames_path, index=":4")
    compressed = independent[0].copy()
    compressed.set_cell(compressed.cell * 0.85, scale_atoms=True)
    hcl, h, cl = hcl_at(independent[1], 1.3)
    result = watch_q(watch, [*independent, compressed, hcl])
    quiet, alarm = result.halt[:4], result.halt[4:]
    assert np.all(quiet < 1.0), quiet
    # ... where the per-atom limit at alpha = 0.01 is exceeded by several atoms of a frame, which
    # is why the halting statistic allows for the number of atoms.
    assert max(int(np.sum(r > 1.0)) for r in result.q_over_limit[:4]) >= 2
    assert np.all(alarm > 1.0), alarm
    # The H-Cl pair is what fires: the atom of the statistic is the moved H or within 2 Å of it.
    atom = int(result.halt_atom[5])
    assert atom == h or hcl.get_distance(atom, h, mic=True) < 2.0, (atom, h, cl)


def test_workflow_exports_fit_the_watch_on_each_finetune_data() -> None:
    from umlipft.workflows.config import WorkflowConfig
    from umlipft.workflows.stages import export_config, finetune_watch_data

    config = WorkflowConfig()
    ft = {"model": "periodic/ft-01/model/FT1.model"}  # a finetune stage's result
    watch = finetune_watch_data(config, ft)
    assert watch == "periodic/ft-01/model/data/train.extxyz"  # what umlipft finetune trained on
    assert export_config(config, "FT1.model", "FT1.pt", ["H", "O"], watch).watch == watch
    off = config.replace(finetune=config.finetune.replace(export_watch=False))
    assert finetune_watch_data(off, ft) is None
    assert export_config(off, "FT1.model", "FT1.pt", ["H", "O"], None).watch is None
