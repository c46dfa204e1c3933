"""Bond lengths, coordination numbers and event detection on real aqueous frames, with planted
H-Cl and Co-Cl changes at known frames."""

from __future__ import annotations

import numpy as np
import pytest

from umlipft.analysis.geometry import (EventsConfig, PairRule, bond_length_distributions,
                                       coordination_series, detect_events, proton_owners)
from umlipft.errors import InputError

CUTOFFS = {("Co", "Cl"): 2.7, ("Co", "O"): 2.6, ("H", "Cl"): 1.6}
MARGIN_A = 0.05  # every checked distance of the base frame is this far from a cutoff
RATTLE_A = 0.005  # thermal-noise stand-in for the "unperturbed" frame


def _index(atoms, element):
    return np.flatnonzero(np.asarray(atoms.get_chemical_symbols()) == element)


def _mic_vector(atoms, i, j):
    return atoms.get_distance(i, j, mic=True, vector=True)


@pytest.fixture(scope="module")
def base(test_frame):
    """Frame 0 of naive trajectory 1 (Li1 Co1 Cl3 O55 H110), checked to sit clear of every cutoff."""
    atoms = test_frame.copy()
    co = _index(atoms, "Co")[0]
    for (a, b), cutoff in CUTOFFS.items():
        centre = _index(atoms, a)
        for c in centre:
            d = atoms.get_distances(c, _index(atoms, b), mic=True)
            assert np.all(np.abs(d - cutoff) > MARGIN_A), f"{a}-{b} distance too close to the cutoff"
    owners_d = atoms.get_all_distances(mic=True)[_index(atoms, "H")][:, np.concatenate(
        [_index(atoms, "O"), _index(atoms, "Cl")])]
    two = np.sort(owners_d, axis=1)[:, :2]
    assert np.all(two[:, 1] - two[:, 0] > 2 * MARGIN_A)  # each H's owner is unambiguous
    assert (atoms.get_distances(co, _index(atoms, "Cl"), mic=True) < 2.7).sum() == 1  # CoCl1
    return atoms


def _rattled(atoms, seed):
    out = atoms.copy()
    out.positions += np.random.default_rng(seed).normal(0.0, RATTLE_A, out.positions.shape)
    return out


def _plant_cocl(atoms):
    """Put the nearest non-bonded Cl at 2.30 Å from Co (CoCl1 -> CoCl2), in the first direction
    (of a fixed spherical grid) where it comes no closer than 1.9 Å to any other atom, so that no
    other bond or owner changes with it."""
    out = atoms.copy()
    co = _index(out, "Co")[0]
    cl = _index(out, "Cl")
    target = cl[np.argsort(out.get_distances(co, cl, mic=True))[1]]
    others = np.delete(np.arange(len(out)), [target, co])
    k = np.arange(200) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / 200), np.pi * (1 + 5**0.5) * k
    for u in np.column_stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)]):
        out.positions[target] = out.positions[co] + 2.30 * u
        if out.get_distances(target, others, mic=True).min() > 1.9:
            return out, co, target
    raise AssertionError("no free site 2.3 Å from Co")


def _plant_hcl(atoms):
    """Move the H closest to a Cl (a hydrogen bond) to 1.28 Å from it: covalent HCl."""
    out = atoms.copy()
    cl = _index(out, "Cl")
    h = _index(out, "H")
    dist = out.get_all_distances(mic=True)[np.ix_(cl, h)]
    ci, hi = np.unravel_index(np.argmin(dist), dist.shape)
    c, hh = int(cl[ci]), int(h[hi])
    owner_before = proton_owners(out, ["O", "Cl"], 1.6)[hh]
    v = _mic_vector(out, c, hh)
    out.positions[hh] = out.positions[c] + 1.28 * v / np.linalg.norm(v)
    return out, hh, c, owner_before


def test_planted_hcl_found_at_its_frame_and_nothing_else(base):
    planted, h, cl, owner = _plant_hcl(base)
    frames = [base, _rattled(base, 1), planted, _rattled(planted, 2)]
    result = detect_events(frames, EventsConfig(frame_interval_ps=0.5))
    assert [e.frame for e in result.events] == [2, 2]
    formed = [e for e in result.events if e.kind == "bond_formed"]
    assert len(formed) == 1 and formed[0].atoms == (h, cl) and formed[0].time == pytest.approx(1.0)
    assert "H-Cl formed" in formed[0].label
    transfer = [e for e in result.events if e.kind == "proton_transfer"]
    assert len(transfer) == 1 and transfer[0].atoms == (h, owner, cl)
    assert not result.warnings


def test_planted_coordination_change_found_at_its_frame(base):
    planted, co, cl = _plant_cocl(base)
    frames = [base, _rattled(base, 3), _rattled(base, 4), planted, _rattled(planted, 5)]
    result = detect_events(frames, EventsConfig())
    assert len(result.events) == 1
    event = result.events[0]
    assert (event.kind, event.frame, event.atoms, event.before, event.after) == (
        "coordination_change", 3, (co,), 1, 2)
    assert event.label == f"CoCl1 -> CoCl2 (Co{co})"
    series = coordination_series(frames, [PairRule.parse("Co-Cl:2.7")])
    assert series.counts[:, 0].tolist() == [1, 1, 1, 2, 2]


def test_unperturbed_frames_give_no_events(base):
    frames = [base] + [_rattled(base, s) for s in range(4)]
    assert detect_events(frames).events == []


def test_persistence_filters_a_one_frame_flicker(base):
    planted, _, _ = _plant_cocl(base)
    flicker = [base, planted, base, base, planted, planted, planted]
    assert [e.frame for e in detect_events(flicker, EventsConfig(proton_transfers=False)).events] == [1, 2, 4]
    persistent = detect_events(flicker, EventsConfig(persistence_frames=2, proton_transfers=False)).events
    assert [(e.frame, e.before, e.after) for e in persistent] == [(4, 1, 2)]


def test_real_trajectory_coordination_change_matches_distances(naive1_path):
    """Naive trajectory 1 really goes CoCl1 -> CoCl2: the event frame is where the direct Co-Cl
    distance count first changes."""
    from umlipft.io import read_frames

    frames = read_frames(naive1_path)
    counts = []
    for atoms in frames:
        co = _index(atoms, "Co")[0]
        counts.append(int((atoms.get_distances(co, _index(atoms, "Cl"), mic=True) < 2.7).sum()))
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert changes  # the data hold a real change
    result = detect_events(frames, EventsConfig(coordination=("Co-Cl:2.7",), bonds=()))
    coord = [e for e in result.events if e.kind == "coordination_change"]
    assert [e.frame for e in coord] == changes
    assert [(e.before, e.after) for e in coord] == [(counts[i - 1], counts[i]) for i in changes]
    # The labelled frames do not keep atom order between snapshots, so most H "change owner"
    # at every frame: reported as a warning, not as hundreds of proton transfers.
    assert result.warnings and not [e for e in result.events if e.kind == "proton_transfer"]


def test_bond_distribution_matches_direct_distances(fit_frames):
    rule = PairRule.parse("O-H:1.25")
    dist = bond_length_distributions(fit_frames, [rule], bin_width_A=0.01)["O-H"]
    direct = []
    for atoms in fit_frames:
        d = atoms.get_all_distances(mic=True)[np.ix_(_index(atoms, "O"), _index(atoms, "H"))]
        direct.extend(d[d < 1.25].tolist())
    direct = np.asarray(direct)
    assert dist.n_bonds == direct.size == 110 * len(fit_frames)  # every H of water has one O
    assert dist.mean_A == pytest.approx(direct.mean(), rel=1e-12)
    assert dist.std_A == pytest.approx(direct.std(ddof=1), rel=1e-9)
    assert dist.counts.tolist() == np.histogram(direct, bins=dist.edges)[0].tolist()
    assert np.sum(dist.density * np.diff(dist.edges)) == pytest.approx(1.0)


def test_pair_rules_parse_and_explain():
    assert PairRule.parse("Co-Cl:2.7") == PairRule("Co", "Cl", 2.7)
    assert PairRule.parse("O-H").cutoff_A == 1.25
    for bad in ("OH", "O-Xx:1", "O-H:abc", "Co-Li"):
        with pytest.raises(InputError):
            PairRule.parse(bad)


def test_changing_atom_order_is_refused(base):
    other = base[::-1]
    with pytest.raises(InputError, match="atom order"):
        detect_events([base, other])


# ------------------------------------------------------------------ tracked atoms
def test_tracked_atoms_are_the_atoms_of_the_events_not_the_lowest_indices(base):
    from umlipft.analysis.monitor import select_tracked_atoms

    hcl, h, cl, owner = _plant_hcl(base)
    hcl_events = detect_events([base, _rattled(base, 1), hcl, _rattled(hcl, 2)]).events
    cocl, co, _ = _plant_cocl(base)
    co_events = detect_events([base, _rattled(base, 3), cocl]).events
    symbols = base.get_chemical_symbols()
    q = np.zeros(len(base))  # the events decide, not Q
    assert symbols[h] == "H" and symbols[owner] == "O" and symbols[cl] == "Cl"
    # The H, the O it left and the Cl it bonds to, in that order (by index it would be H, Cl, O:
    # these frames list Li0, Co1, H, Cl 112-114, O).
    assert select_tracked_atoms(symbols, q, hcl_events, n_max=5) == ([h, owner, cl], "events")
    assert cl < owner
    # A coordination change tracks the Co; a bond event outranks it under a tight cap.
    assert select_tracked_atoms(symbols, q, co_events, n_max=5) == ([co], "events")
    both = list(co_events) + list(hcl_events)
    assert select_tracked_atoms(symbols, q, both, n_max=4) == ([h, owner, cl, co], "events")
    # (the lowest indices of the event atoms would have been Co1 and the H)
    assert select_tracked_atoms(symbols, q, both, n_max=2) == ([h, owner], "events")
    assert select_tracked_atoms(symbols, q, both, n_max=0) == ([], "none")


def test_without_events_the_highest_q_atom_of_each_element_is_tracked():
    from umlipft.analysis.monitor import select_tracked_atoms

    symbols = ["O", "H", "H", "Co", "O", "H", "Cl", "Na"]
    max_q = np.array([1.0, 0.5, 0.2, 3.0, 4.0, 0.9, 0.1, np.nan])  # Na: no PCA for it
    # by atomic number: H (atom 5), O (atom 4), Cl (6), Co (3); Na has no finite Q
    assert select_tracked_atoms(symbols, max_q) == ([5, 4, 6, 3], "highest Q per element")


def test_analyze_trajectory_tracks_the_event_atoms(base, global_pca, tmp_path):
    from umlipft.analysis.monitor import QConfig, analyze_trajectory
    from umlipft.io import write_frames

    hcl, h, cl, owner = _plant_hcl(base)
    frames = [base, _rattled(base, 1), hcl]
    path = write_frames(tmp_path / "traj.extxyz", frames)
    events = detect_events(frames, EventsConfig(frame_interval_ps=0.5)).events
    result = analyze_trajectory(global_pca, path, tmp_path / "q", QConfig(frame_interval_ps=0.5), events=events)
    assert result.summary["tracked_atoms"] == [h, owner, cl]
    assert result.summary["tracked_because"] == "events"
    assert set(result.summary["tracked"]) == {f"H{h}", f"O{owner}", f"Cl{cl}"}
