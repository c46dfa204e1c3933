"""Bond-length distributions, coordination numbers and chemical events along trajectories.

All functions stream frames (any iterable of ``ase.Atoms``) and keep only O(pairs × bins) or
O(frames × centres) numbers; distances use the minimum image of periodic cells (ASE neighbour
lists).

Event definitions (documented contract, tested):
- bond formed / broken: an A–B pair (e.g. H–Cl) is bonded while d < cutoff. ``bond_formed`` is
  reported at the first frame of a bonded run of at least ``persistence_frames`` frames that
  follows a non-bonded state (the state at frame 0 is the reference, not an event).
- coordination change: for each centre atom (e.g. Co) and ligand element (Cl), the number of
  ligands within the cutoff; a new count that persists ``persistence_frames`` frames is an event
  at its first frame, labelled like ``CoCl3 -> CoCl4``.
- proton transfer: each H belongs to its nearest acceptor atom (O, N, Cl, ...) within
  ``proton_bond_A``; a persistent change of owner between two acceptors is a transfer
  (e.g. O → Cl when HCl forms from an acid or water).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from ase import Atoms


@dataclasses.dataclass(frozen=True)
class PairRule:
    """An element pair with a distance cutoff in Å; parsed from ``A-B:cutoff``."""

    a: str
    b: str
    cutoff_A: float

    @classmethod
    def parse(cls, text: str, default_cutoff_A: float | None = None) -> "PairRule":
        from ase.data import atomic_numbers

        spec, _, cutoff = str(text).partition(":")
        a, sep, b = spec.strip().partition("-")
        if not sep or a not in atomic_numbers or b not in atomic_numbers:
            raise InputError(f"pair {text!r} is not of the form A-B or A-B:CUTOFF with element symbols "
                             "(e.g. O-H:1.25)")
        if cutoff:
            try:
                value = float(cutoff)
            except ValueError:
                raise InputError(f"pair {text!r}: cutoff {cutoff!r} is not a number in Å") from None
        elif default_cutoff_A is not None:
            value = default_cutoff_A
        else:
            value = DEFAULT_BOND_CUTOFFS_A.get(frozenset((a, b)), 0.0)
            if not value:
                raise InputError(f"pair {text!r} has no default cutoff; give one, e.g. {spec}:2.0")
        if value <= 0:
            raise InputError(f"pair {text!r}: cutoff must be positive")
        return cls(a, b, value)

    @property
    def label(self) -> str:
        return f"{self.a}-{self.b}"

    def __str__(self) -> str:
        return f"{self.a}-{self.b}:{self.cutoff_A:g}"


# Upper ends of covalent bond-length distributions (Å): the first minimum of the pair's radial
# distribution in liquids, well below the hydrogen-bond distance (O···H ≈ 1.6-2.0 Å).
DEFAULT_BOND_CUTOFFS_A: dict[frozenset, float] = {
    frozenset(("O", "H")): 1.25, frozenset(("C", "O")): 1.6, frozenset(("H", "Cl")): 1.6,
    frozenset(("C", "H")): 1.3, frozenset(("C", "C")): 1.75, frozenset(("N", "H")): 1.3,
    frozenset(("C", "N")): 1.7,
}
DEFAULT_BOND_PAIRS = ("O-H:1.25", "C-O:1.6", "H-Cl:1.6")
# The study's coordination criteria (Co-Cl < 2.7 Å, Co-O < 2.6 Å) and HCl criterion (< 1.6 Å).
DEFAULT_COORDINATION = ("Co-Cl:2.7", "Co-O:2.6")
DEFAULT_EVENT_BONDS = ("H-Cl:1.6",)
DEFAULT_PROTON_ACCEPTORS = ("O", "N", "Cl", "S", "F")
# More simultaneous proton transfers than this in one frame are treated as an atom-order problem.
MAX_PLAUSIBLE_TRANSFERS = 5
MAX_PLAUSIBLE_TRANSFER_FRACTION = 0.1


def pair_distances(atoms: "Atoms", rule: PairRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, d) of every A–B pair closer than the cutoff, each pair once (i of A, j of B)."""
    from ase.neighborlist import neighbor_list

    symbols = np.asarray(atoms.get_chemical_symbols())
    if not ((symbols == rule.a).any() and (symbols == rule.b).any()):
        empty = np.zeros(0, dtype=int)
        return empty, empty, np.zeros(0)
    i, j, d = neighbor_list("ijd", atoms, {(rule.a, rule.b): rule.cutoff_A})
    keep = (symbols[i] == rule.a) & (symbols[j] == rule.b)
    if rule.a == rule.b:
        keep &= i < j
    return i[keep], j[keep], d[keep]


# ------------------------------------------------------------------ bond lengths
@dataclasses.dataclass
class BondDistribution:
    rule: PairRule
    edges: np.ndarray
    counts: np.ndarray
    n_frames: int = 0
    n_bonds: int = 0
    sum_d: float = 0.0
    sum_d2: float = 0.0
    min_d: float = float("inf")
    max_d: float = float("-inf")

    @property
    def mean_A(self) -> float:
        return self.sum_d / self.n_bonds if self.n_bonds else float("nan")

    @property
    def std_A(self) -> float:
        if self.n_bonds < 2:
            return float("nan")
        var = (self.sum_d2 - self.n_bonds * self.mean_A**2) / (self.n_bonds - 1)
        return float(np.sqrt(max(var, 0.0)))

    @property
    def density(self) -> np.ndarray:
        """Normalised histogram (1/Å), integrating to one."""
        total = self.counts.sum()
        widths = np.diff(self.edges)
        return self.counts / (total * widths) if total else np.zeros_like(widths)

    def to_dict(self) -> dict[str, Any]:
        return {"pair": self.rule.label, "cutoff_A": self.rule.cutoff_A, "n_frames": self.n_frames,
                "n_bonds": self.n_bonds, "bonds_per_frame": self.n_bonds / max(self.n_frames, 1),
                "mean_A": _finite(self.mean_A), "std_A": _finite(self.std_A),
                "min_A": _finite(self.min_d), "max_A": _finite(self.max_d),
                "edges_A": self.edges.tolist(), "counts": self.counts.tolist()}


def bond_length_distributions(frames: "Iterable[Atoms]", rules: Sequence[PairRule],
                              bin_width_A: float = 0.01) -> dict[str, BondDistribution]:
    """Histogram (fixed bins from 0 to each cutoff) and moments of the pair distances."""
    if bin_width_A <= 0:
        raise InputError("bin width must be positive")
    out = {}
    for rule in rules:
        n_bins = max(1, int(np.ceil(rule.cutoff_A / bin_width_A)))
        edges = np.linspace(0.0, n_bins * bin_width_A, n_bins + 1)
        out[rule.label] = BondDistribution(rule, edges, np.zeros(n_bins, dtype=np.int64))
    for atoms in frames:
        for rule in rules:
            dist = out[rule.label]
            _, _, d = pair_distances(atoms, rule)
            dist.n_frames += 1
            if d.size:
                dist.counts += np.histogram(d, bins=dist.edges)[0]
                dist.n_bonds += d.size
                dist.sum_d += float(d.sum())
                dist.sum_d2 += float((d**2).sum())
                dist.min_d = min(dist.min_d, float(d.min()))
                dist.max_d = max(dist.max_d, float(d.max()))
    return out


# ------------------------------------------------------------------ coordination
@dataclasses.dataclass
class CoordinationSeries:
    rules: list[PairRule]
    centres: np.ndarray  # atom indices of the centre atoms (union over rules, by rule)
    centre_rule: np.ndarray  # which rule each column belongs to
    counts: np.ndarray  # (n_frames, n_columns) ligand counts

    def column_labels(self, symbols: Sequence[str] | None = None) -> list[str]:
        return [f"{self.rules[r].a}{c}-{self.rules[r].b}" for c, r in zip(self.centres, self.centre_rule)]

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [str(r) for r in self.rules], "columns": self.column_labels(),
                "centres": self.centres.tolist(), "counts": self.counts.tolist()}


def coordination_counts(atoms: "Atoms", rule: PairRule) -> tuple[np.ndarray, np.ndarray]:
    """(centre indices, number of ligands of each) for one frame; ligands are rule.b atoms."""
    symbols = np.asarray(atoms.get_chemical_symbols())
    centres = np.flatnonzero(symbols == rule.a)
    i, _, _ = pair_distances(atoms, rule)
    counts = np.array([(i == c).sum() for c in centres], dtype=np.int64)
    return centres, counts


def coordination_series(frames: "Iterable[Atoms]", rules: Sequence[PairRule]) -> CoordinationSeries:
    rows: list[np.ndarray] = []
    centres = centre_rule = None
    for atoms in frames:
        cols, rule_of = [], []
        row = []
        for r, rule in enumerate(rules):
            c, n = coordination_counts(atoms, rule)
            cols.extend(c.tolist())
            rule_of.extend([r] * c.size)
            row.extend(n.tolist())
        if centres is None:
            centres, centre_rule = np.asarray(cols, dtype=int), np.asarray(rule_of, dtype=int)
        elif len(cols) != centres.size or np.any(np.asarray(cols) != centres):
            raise InputError("the centre atoms change between frames; coordination over time needs a "
                             "fixed atom order (LAMMPS: dump_modify sort id)")
        rows.append(np.asarray(row, dtype=np.int64))
    if centres is None:
        raise InputError("no frames to analyse")
    return CoordinationSeries(list(rules), centres, centre_rule,
                              np.vstack(rows) if rows else np.zeros((0, 0), dtype=np.int64))


# ------------------------------------------------------------------------- events
@dataclasses.dataclass(frozen=True)
class EventsConfig(DriverConfig):
    """Settings of ``umlipft analyze events`` (cutoffs in Å, as the study's criteria)."""

    bonds: tuple[str, ...] = DEFAULT_EVENT_BONDS
    coordination: tuple[str, ...] = DEFAULT_COORDINATION
    proton_acceptors: tuple[str, ...] = DEFAULT_PROTON_ACCEPTORS
    proton_bond_A: float = 1.6  # an H further than this from every acceptor has no owner
    proton_transfers: bool = True
    persistence_frames: int = 1  # >1 ignores flickers across a cutoff shorter than this
    frame_interval_ps: float | None = None

    def validate(self) -> None:
        if self.persistence_frames < 1:
            raise ConfigError("persistence_frames must be at least 1")
        if self.proton_bond_A <= 0:
            raise ConfigError("proton_bond_A must be positive")
        for spec in (*self.bonds, *self.coordination):
            PairRule.parse(spec)

    def bond_rules(self) -> list[PairRule]:
        return [PairRule.parse(s) for s in self.bonds]

    def coordination_rules(self) -> list[PairRule]:
        return [PairRule.parse(s) for s in self.coordination]


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # bond_formed | bond_broken | coordination_change | proton_transfer
    frame: int
    time: float | None  # ps, when the frame interval is known
    atoms: tuple[int, ...]
    label: str
    before: Any
    after: Any

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Persistent:
    """Per-key state with a persistence filter: a change counts once it lasted ``n`` frames."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.state: dict[Hashable, Any] = {}
        self.pending: dict[Hashable, tuple[Any, int, int]] = {}

    def update(self, key: Hashable, frame: int, value: Any, default: Any = None) -> tuple[int, Any, Any] | None:
        current = self.state.get(key, default)
        if value == current:
            self.pending.pop(key, None)
            return None
        candidate = self.pending.get(key)
        start, count = (candidate[1], candidate[2] + 1) if candidate and candidate[0] == value else (frame, 1)
        if count >= self.n:
            self.pending.pop(key, None)
            self.state[key] = value
            return start, current, value
        self.pending[key] = (value, start, count)
        return None


@dataclasses.dataclass
class EventsResult:
    events: list[Event]
    n_frames: int
    initial: dict[str, Any]  # the reference state at frame 0
    config: EventsConfig
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n_frames": self.n_frames, "initial": self.initial, "config": self.config.to_dict(),
                "warnings": self.warnings, "events": [e.to_dict() for e in self.events]}


def detect_events(frames: "Iterable[Atoms]", config: EventsConfig = EventsConfig()) -> EventsResult:
    """Bond formation/breaking, coordination changes and proton transfers with their frames."""
    config.validate()
    bond_rules, coord_rules = config.bond_rules(), config.coordination_rules()
    tracker = _Persistent(config.persistence_frames)
    events: list[Event] = []
    warnings: list[str] = []
    initial: dict[str, Any] = {}
    symbols: np.ndarray | None = None
    n_frames = 0

    def time_of(frame: int) -> float | None:
        return None if config.frame_interval_ps is None else frame * config.frame_interval_ps

    for frame, atoms in enumerate(frames):
        n_frames += 1
        now = np.asarray(atoms.get_chemical_symbols())
        if symbols is None:
            symbols = now
        elif now.size != symbols.size or np.any(now != symbols):
            raise InputError(f"frame {frame} has other atoms than frame 0; events need a fixed atom order "
                             "(LAMMPS: dump_modify sort id)")
        name = lambda k: f"{symbols[k]}{k}"  # noqa: E731 - atom label like Cl168

        for rule in bond_rules:
            i, j, d = pair_distances(atoms, rule)
            bonded = {(int(a), int(b)): float(x) for a, b, x in zip(i, j, d)}
            if frame == 0:
                initial[f"bonds {rule.label}"] = [[a, b] for a, b in bonded]
                for pair in bonded:
                    tracker.state[("bond", rule.label, pair)] = True
                continue
            keys = set(bonded) | {k[2] for k, v in tracker.state.items() if k[:2] == ("bond", rule.label) and v}
            keys |= {k[2] for k in tracker.pending if k[:2] == ("bond", rule.label)}
            for pair in sorted(keys):
                change = tracker.update(("bond", rule.label, pair), frame, pair in bonded, default=False)
                if change:
                    start, _, now_bonded = change
                    kind = "bond_formed" if now_bonded else "bond_broken"
                    dist = f" ({bonded[pair]:.2f} Å)" if pair in bonded else ""
                    events.append(Event(kind, start, time_of(start), pair,
                                        f"{rule.label} {'formed' if now_bonded else 'broken'}: "
                                        f"{name(pair[0])}-{name(pair[1])}{dist}", not now_bonded, now_bonded))

        for rule in coord_rules:
            centres, counts = coordination_counts(atoms, rule)
            for c, n in zip(centres.tolist(), counts.tolist()):
                key = ("coord", rule.label, c)
                if frame == 0:
                    tracker.state[key] = n
                    initial[f"coordination {name(c)}-{rule.b}"] = n
                    continue
                change = tracker.update(key, frame, n)
                if change:
                    start, before, after = change
                    events.append(Event("coordination_change", start, time_of(start), (c,),
                                        f"{rule.a}{rule.b}{before} -> {rule.a}{rule.b}{after} ({name(c)})",
                                        before, after))

        if config.proton_transfers:
            owners = proton_owners(atoms, config.proton_acceptors, config.proton_bond_A)
            transfers: list[Event] = []
            for h, owner in owners.items():
                key = ("proton", h)
                if frame == 0:
                    tracker.state[key] = owner
                    continue
                if owner is None:
                    continue  # an H between owners is not yet transferred
                change = tracker.update(key, frame, owner)
                if change:
                    start, before, after = change
                    if before is None:
                        continue  # an H that had no owner at frame 0 found one: not a transfer
                    transfers.append(Event("proton_transfer", start, time_of(start), (h, before, after),
                                           f"proton transfer: {name(h)} from {name(before)} to {name(after)}",
                                           before, after))
            n_owned = sum(o is not None for o in owners.values())
            if len(transfers) > max(MAX_PLAUSIBLE_TRANSFERS, MAX_PLAUSIBLE_TRANSFER_FRACTION * n_owned):
                # Real proton transfers are rare; most H changing owner at once means the atom order
                # changes between frames (unsorted dumps) or the frames are far apart in time.
                warnings.append(
                    f"frame {frame}: {len(transfers)} of {n_owned} H changed owner at once; the atom order "
                    "probably differs between frames (LAMMPS: dump_modify sort id) or frames are too far "
                    "apart. These proton transfers are not reported")
            else:
                events.extend(transfers)
        if frame == 0:
            initial["proton_owners"] = {"n_owned": sum(o is not None for o in owners.values())} \
                if config.proton_transfers else {}
    if n_frames == 0:
        raise InputError("no frames to analyse")
    events.sort(key=lambda e: (e.frame, e.kind, e.atoms))
    return EventsResult(events, n_frames, initial, config, warnings)


def proton_owners(atoms: "Atoms", acceptors: Sequence[str], max_distance_A: float) -> dict[int, int | None]:
    """Each H's nearest acceptor atom within ``max_distance_A`` (None if there is none)."""
    from ase.neighborlist import neighbor_list

    symbols = np.asarray(atoms.get_chemical_symbols())
    hydrogens = np.flatnonzero(symbols == "H")
    owners: dict[int, int | None] = {int(h): None for h in hydrogens}
    present = [a for a in acceptors if (symbols == a).any()]
    if not hydrogens.size or not present:
        return owners
    i, j, d = neighbor_list("ijd", atoms, {("H", a): max_distance_A for a in present})
    keep = (symbols[i] == "H") & np.isin(symbols[j], present)
    i, j, d = i[keep], j[keep], d[keep]
    order = np.lexsort((d, i))  # by H, then by distance: the first row of each H is its nearest
    i, j = i[order], j[order]
    first = np.ones(i.size, dtype=bool)
    first[1:] = i[1:] != i[:-1]
    for h, owner in zip(i[first], j[first]):
        owners[int(h)] = int(owner)
    return owners


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
