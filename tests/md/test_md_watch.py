"""umlipft md with the extrapolation watch (watch_every; lammps_inputs/watch.in, compute mace/q).

A run the watch stopped is a finished run: its summary says where and which atoms fired it, its
outputs end at the halting step, and rerunning the command does not run it again, also when the
conversion after LAMMPS was interrupted (the restart files would run it on past the halt).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sample_structures import hcl_at

from umlipft.errors import ConfigError, InputError
from umlipft.io import read_frames, write_frames
from umlipft.md import MDConfig, run_md

ELEMENTS = ("H", "Li", "O", "Cl", "Co")


@pytest.fixture(scope="module")
def hcl_structure(tmp_path_factory, aqueous_dir: Path) -> tuple[Path, int]:
    """The study's failure: an H of the aqueous box moved to 1.3 Å of a Cl (HCl forms). Returns
    the file and the H's LAMMPS atom ID (1-based index)."""
    from ase.io import read

    atoms, h, _ = hcl_at(read(aqueous_dir / "single_points" / "Evaluations__U__dft.extxyz", 0))
    path = tmp_path_factory.mktemp("md-watch-start") / "hcl.extxyz"
    write_frames(path, [atoms])
    return path, h + 1


def watched(tmp_path: Path, structure: Path, model: Path, **changes) -> MDConfig:
    values = dict(output=str(tmp_path / "run"), structure=(str(structure),), model=str(model), ensemble="nvt",
                  steps=40, thermo_every=5, dump_every=5, restart_every=5, watch_every=5, watch_patience=2)
    values.update(changes)
    return MDConfig.from_dict(values)


def test_watch_needs_nvt_and_a_positive_patience() -> None:
    with pytest.raises(ConfigError, match="NVT only.*ensemble: nvt"):
        MDConfig.from_dict(dict(structure=("x.extxyz",), ensemble="npt", watch_every=10))
    with pytest.raises(ConfigError, match="watch_patience must be at least 1"):
        MDConfig.from_dict(dict(structure=("x.extxyz",), ensemble="nvt", watch_every=10, watch_patience=0))
    with pytest.raises(ConfigError, match="watch_every must be 0"):
        MDConfig.from_dict(dict(structure=("x.extxyz",), ensemble="nvt", watch_every=-1))


def _edited_export(source: Path, target: Path, edit) -> Path:
    """A copy of an export whose metadata and watch documents ``edit(metadata, watch)`` changed
    (the watch is dropped when it returns None for it)."""
    import torch

    from umlipft.models.kernels import load_kernels

    load_kernels()
    extra = {"umlipft.json": "", "umlipft_watch.json": ""}
    module = torch.jit.load(str(source), _extra_files=extra)
    metadata, watch = edit(json.loads(extra["umlipft.json"]), json.loads(extra["umlipft_watch.json"]))
    files = {"umlipft.json": json.dumps(metadata)}
    if watch is not None:
        files["umlipft_watch.json"] = json.dumps(watch)
    torch.jit.save(module, str(target), _extra_files=files)
    return target


@pytest.mark.slow
def test_a_model_without_a_watch_or_without_an_element_is_refused_before_lammps(
        tmp_path: Path, watched_export: Path, hcl_structure) -> None:
    structure, _ = hcl_structure
    plain = _edited_export(watched_export, tmp_path / "plain.pt", lambda m, w: ({**m, "watch": False}, None))
    with pytest.raises(InputError, match=r"carries none.*--watch TRAIN\.extxyz"):
        run_md(watched(tmp_path, structure, plain, output=str(tmp_path / "a")), progress=False)

    def without_co(metadata, watch):
        del watch["elements"]["Co"]
        return metadata, watch

    no_co = _edited_export(watched_export, tmp_path / "no-co.pt", without_co)
    with pytest.raises(InputError, match="fitted without Co"):
        run_md(watched(tmp_path, structure, no_co, output=str(tmp_path / "b")), progress=False)
    assert not list(tmp_path.glob("*/log.lammps.*"))  # LAMMPS never started


@pytest.mark.slow
def test_a_run_the_watch_stopped_is_finished_recorded_and_not_rerun(tmp_path: Path, watched_export: Path,
                                                                    hcl_structure) -> None:
    structure, h_id = hcl_structure
    config = watched(tmp_path, structure, watched_export)
    (result,) = run_md(config, progress=False)
    watch = result.watch
    assert watch is not None and watch["halted"], watch
    halt = watch["halted_at_step"]
    # patience 2 at checks every 5 steps: the earliest halt is step 10, and it stops before the end
    assert config.watch_every * config.watch_patience <= halt < config.steps and halt % config.watch_every == 0
    assert result.steps == halt and result.simulated_ps == pytest.approx(halt * config.timestep_ps)
    summary = json.loads((result.directory / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["results"]["watch"] == watch
    assert summary["results"]["steps"] == halt and summary["results"]["steps_requested"] == config.steps
    # outputs end at the halting step
    thermo = np.genfromtxt(result.thermo, delimiter=",", names=True)
    assert list(thermo["Step"]) == list(range(0, halt + 1, config.thermo_every))
    assert [f.info["step"] for f in read_frames(result.trajectory)] == list(range(0, halt + 1, config.dump_every))
    assert read_frames(result.final)[0].info["step"] == halt
    # the flagged frames: whole frames above the limit, the halting frame last, the H that was
    # placed at bonding distance of a Cl among the atoms that fired it
    flagged = read_frames(result.directory / "flagged.extxyz")
    assert len(flagged) == watch["flagged_frames"] >= config.watch_patience
    assert [int(a.info["step"]) for a in flagged] == watch["flagged_steps"]
    assert watch["flagged_steps"][-1] == halt == watch["fired_at_step"]
    for atoms in flagged:
        assert len(atoms) == 170 and atoms.arrays["watch_halt_ratio"].max() > 1.0
        assert atoms.info["watch_statistic"] == pytest.approx(atoms.arrays["watch_halt_ratio"].max())
    fired = watch["fired_atoms"]
    assert fired and all(a["halt_ratio"] > 1.0 for a in fired)
    assert watch["max_statistic"] >= fired[0]["halt_ratio"]
    last = flagged[-1]
    near = [a["id"] for a in fired if a["id"] == h_id
            or np.linalg.norm(last.get_distance(a["id"] - 1, h_id - 1, mic=True)) < 2.5]
    assert near, (h_id, fired)
    assert last.get_chemical_symbols()[fired[0]["id"] - 1] == fired[0]["element"]

    # Rerun: finished, nothing runs again (no new LAMMPS attempt), same result.
    logs = sorted(p.name for p in result.directory.glob("log.lammps.*"))
    mtime = result.trajectory.stat().st_mtime_ns
    (again,) = run_md(config, progress=False)
    assert again.steps == halt and again.watch == watch
    assert result.trajectory.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in result.directory.glob("log.lammps.*")) == logs

    # Interrupted after LAMMPS halted, before the summary: the rerun converts what LAMMPS wrote
    # instead of running again (from scratch or past the halt).
    before = {name: (result.directory / name).read_bytes() for name in ("trajectory.extxyz", "thermo.csv",
                                                                       "final.extxyz", "flagged.extxyz")}
    for name in ("summary.json", *before):
        (result.directory / name).unlink()
    (third,) = run_md(config, progress=False)
    assert third.steps == halt and third.watch == watch
    assert sorted(p.name for p in result.directory.glob("log.lammps.*")) == logs
    for name, content in before.items():
        assert (result.directory / name).read_bytes() == content, name
