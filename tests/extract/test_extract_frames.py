"""umlipft extract: time windows, random and farthest-point selection, provenance, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from umlipft.errors import InputError
from umlipft.extract import ExtractConfig, extract_frames, parse_time_ns
from umlipft.io import read_frames

TIMESTEP_FS = 0.5
STEPS_PER_FRAME = 100_000  # 0.05 ns at 0.5 fs: a 1 ns trajectory has 21 frames


@pytest.fixture(scope="module")
def trajectory(aqueous_eval_frames_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 ns 'trajectory' of real aqueous frames carrying step numbers and MD energies."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    base = read_frames(aqueous_eval_frames_path)
    frames = []
    for k in range(21):
        atoms = base[k % len(base)].copy()
        atoms.info = {"step": k * STEPS_PER_FRAME}
        atoms.arrays.pop("REF_forces", None)
        atoms.calc = SinglePointCalculator(atoms, energy=-800.0 - k, forces=np.full((len(atoms), 3), 0.1 * k))
        frames.append(atoms)
    path = tmp_path_factory.mktemp("traj") / "md.extxyz"
    write(path, frames)
    return path


def test_window_every_takes_the_studys_eleven_frames_with_provenance(trajectory: Path) -> None:
    frames = extract_frames(ExtractConfig(trajectory=trajectory, start_ns=0.5, stop_ns=1.0, every_ns=0.05,
                                          timestep_fs=TIMESTEP_FS))
    assert [a.info["step"] for a in frames] == [k * STEPS_PER_FRAME for k in range(10, 21)]
    assert [a.info["source_index"] for a in frames] == list(range(10, 21))
    assert np.allclose([a.info["time_ps"] for a in frames], np.arange(500.0, 1000.1, 50.0))
    assert all(a.info["source_file"] == str(trajectory.resolve()) for a in frames)
    # the MD model's energy and forces are kept, but never as a reference label
    assert frames[0].info["md_energy"] == pytest.approx(-810.0)
    assert np.allclose(frames[0].arrays["md_forces"], 1.0)
    assert frames[0].calc is None and "energy" not in frames[0].info
    coarser = extract_frames(ExtractConfig(trajectory=trajectory, start_ns=0.5, stop_ns=1.0, every_ns=0.1,
                                           timestep_fs=TIMESTEP_FS))
    assert [a.info["source_index"] for a in coarser] == [10, 12, 14, 16, 18, 20]


def test_time_needs_a_timestep_when_frames_carry_steps(trajectory: Path) -> None:
    with pytest.raises(InputError, match="timestep"):
        extract_frames(ExtractConfig(trajectory=trajectory, start_ns=0.5))


def test_random_count_is_seeded_and_inside_the_window(trajectory: Path) -> None:
    def pick(seed: int) -> list[int]:
        cfg = ExtractConfig(trajectory=trajectory, start_ns=0.5, stop_ns=1.0, count=5, seed=seed,
                            timestep_fs=TIMESTEP_FS)
        return [a.info["source_index"] for a in extract_frames(cfg)]

    a, b, c = pick(1), pick(1), pick(2)
    assert a == b and a != c
    assert a == sorted(a) and len(set(a)) == 5 and all(10 <= i <= 20 for i in a)
    with pytest.raises(InputError, match="only 11"):
        extract_frames(ExtractConfig(trajectory=trajectory, start_ns=0.5, count=12, timestep_fs=TIMESTEP_FS))


def test_farthest_point_never_picks_a_duplicate(aqueous_eval_frames_path: Path, tmp_path: Path) -> None:
    """Eight copies of one structure and two others: three FPS picks must be the three
    distinct structures, whatever the order (a random pick of 3 would usually repeat)."""
    from ase.io import write

    base = read_frames(aqueous_eval_frames_path)
    frames = [base[0].copy() for _ in range(8)] + [base[1].copy(), base[2].copy()]
    order = [0, 1, 2, 8, 3, 4, 5, 9, 6, 7]  # distinct ones at positions 3 and 7
    traj = [frames[i] for i in order]
    for k, atoms in enumerate(traj):
        atoms.info = {"time_ps": 10.0 * k}
        atoms.arrays.pop("REF_forces", None)
    path = tmp_path / "dups.extxyz"
    write(path, traj)
    cfg = ExtractConfig(trajectory=path, count=3, method="fps", soap_n_max=3, soap_l_max=2)
    picked = extract_frames(cfg)
    indices = [a.info["source_index"] for a in picked]
    assert 3 in indices and 7 in indices
    assert len(set(indices) - {3, 7}) == 1
    assert sorted(a.info["fps_rank"] for a in picked) == [0, 1, 2]
    assert all(a.info["selection"] == "fps" for a in picked)


def test_cli_extract_with_unit_times(trajectory: Path, tmp_path: Path) -> None:
    from umlipft.cli import main

    out = tmp_path / "frames.extxyz"
    code = main(["extract", str(trajectory), "--start", "500ps", "--stop", "1.0ns", "--every", "0.05ns",
                 "--timestep-fs", "0.5", "-o", str(out)])
    assert code == 0
    frames = read_frames(out)
    assert len(frames) == 11 and frames[-1].info["source_index"] == 20
    assert (tmp_path / "frames.extxyz.summary.json").is_file()
    assert parse_time_ns("50000fs") == pytest.approx(0.05)
    with pytest.raises(InputError, match="unit"):
        parse_time_ns("0.5")


def test_bad_trajectories_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        extract_frames(ExtractConfig(trajectory=tmp_path / "missing.extxyz"))
    bad = tmp_path / "bad.extxyz"
    bad.write_text("3\nLattice=\"5 0 0 0 5 0 0 0 5\" Properties=species:S:1:pos:R:3\nO 0 0 0\nH 1 0\n")
    with pytest.raises(InputError, match="cannot read"):
        extract_frames(ExtractConfig(trajectory=bad, dump_interval_ps=1.0))
