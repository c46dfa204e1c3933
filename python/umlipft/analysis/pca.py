"""PCA of per-atom descriptors, global or per element, with Q-residual, Hotelling T² and limits.

Fitting uses scikit-learn; every projection after that (of the fitting data, of new frames, after
a save/load round trip) is the same few numpy lines on the stored mean and loadings, so a saved
model projects bit-for-bit as the one in memory did.

Definitions, per atom with descriptor x, PCA mean μ and the first k loadings P (d×k):
    t  = (x − μ) P                         scores
    Q  = ||x − μ − (x − μ) P Pᵀ||²         squared prediction error (the study's Q-residual)
    T² = Σ_j t_j² / λ_j                    Hotelling's T², λ_j the variance of component j (ddof=1)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..config import DriverConfig
from ..errors import ConfigError, InputError
from ..io import atomic_path, atomic_write_text
from .stats import (QLimit, empirical_band, hotelling_t2_limit, jackson_mudholkar_limit, liu_tang_zhang_limit,
                    quadratic_form_moments)

if TYPE_CHECKING:
    from ase import Atoms

    from .descriptors import Descriptor

FORMAT_VERSION = 1
GLOBAL = "all"  # group name of a global PCA
MODEL_JSON = "pca.json"
MODEL_NPZ = "pca.npz"


@dataclasses.dataclass(frozen=True)
class PCAConfig(DriverConfig):
    """Settings of ``umlipft analyze pca``; SOAP keys apply to --descriptor soap, layers to mace."""

    descriptor: str = "soap"
    model: str | None = None
    components: int = 5
    per_element: bool = False
    svd_solver: str = "auto"
    max_atoms_per_group: int | None = None  # random subsample (seeded) to bound the fitting memory
    seed: int = 0
    species: tuple[str, ...] = ()  # SOAP species; empty: the elements of the fitting data
    r_cut_A: float = 5.0
    n_max: int = 8
    l_max: int = 6
    sigma_A: float = 0.375
    periodic: bool = True
    layers: int = -1
    batch_frames: int = 4

    def validate(self) -> None:
        if self.descriptor not in ("soap", "mace"):
            raise ConfigError(f"descriptor must be soap or mace, got {self.descriptor!r}")
        if self.descriptor == "mace" and not self.model:
            raise ConfigError("the mace descriptor needs a model (--model FILE or a foundation name)")
        if self.components < 1:
            raise ConfigError(f"components must be at least 1, got {self.components}")
        if self.svd_solver not in ("auto", "full", "covariance_eigh", "arpack", "randomized"):
            raise ConfigError(f"unknown svd_solver {self.svd_solver!r}")
        if self.max_atoms_per_group is not None and self.max_atoms_per_group <= self.components:
            raise ConfigError("max_atoms_per_group must exceed the number of components")
        if self.batch_frames < 1:
            raise ConfigError("batch_frames must be at least 1")

    def make_descriptor(self, frames: "Sequence[Atoms]") -> "Descriptor":
        from .descriptors import make_descriptor

        if self.descriptor == "soap":
            return make_descriptor("soap", frames, species=self.species or None, r_cut_A=self.r_cut_A,
                                   n_max=self.n_max, l_max=self.l_max, sigma_A=self.sigma_A,
                                   periodic=self.periodic)
        return make_descriptor("mace", frames, model=self.model, layers=self.layers)


@dataclasses.dataclass
class PCAGroup:
    """One fitted PCA: the whole system (``all``) or one element."""

    name: str
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), orthonormal rows
    explained_variance: np.ndarray  # (k,), ddof=1
    explained_variance_ratio: np.ndarray  # (k,)
    total_variance: float
    theta: tuple[float, ...]  # θ1..θ4: Σ λ^i over the discarded eigenvalues (from the residuals)
    n_samples: int

    def residuals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, residual vectors) of rows of x."""
        centred = x - self.mean
        scores = centred @ self.components.T
        # The residual itself, not ||r||² − ||t||²: the difference of two large numbers loses the
        # small Q of well-described atoms to cancellation.
        return scores, centred - scores @ self.components

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, residual = self.residuals(x)
        q = np.einsum("ij,ij->i", residual, residual)
        t2 = np.sum(scores**2 / self.explained_variance, axis=1)
        return scores, q, t2


@dataclasses.dataclass(frozen=True)
class ElementLimits:
    element: str
    group: str
    q_limit: float
    q_limit_method: str
    t2_limit: float
    q_mean: float
    q_std: float
    q_band_low: float
    q_band_high: float
    t2_mean: float
    t2_std: float
    t2_band_high: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Evaluation:
    """Per-atom results for a set of atoms (NaN where the atom's element has no PCA)."""

    symbols: np.ndarray
    scores: np.ndarray  # (n, k)
    q: np.ndarray
    t2: np.ndarray


class DescriptorPCA:
    """A fitted PCA (global or per element) plus the descriptor settings it needs."""

    def __init__(self, descriptor_settings: Mapping[str, Any], n_components: int, per_element: bool,
                 groups: Mapping[str, PCAGroup], training_stats: Mapping[str, Mapping[str, float]],
                 skipped: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self.descriptor_settings = dict(descriptor_settings)
        self.n_components = int(n_components)
        self.per_element = bool(per_element)
        self.groups = dict(groups)
        self.training_stats = {k: dict(v) for k, v in training_stats.items()}
        self.skipped = dict(skipped or {})
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, features: np.ndarray, symbols: Sequence[str], descriptor_settings: Mapping[str, Any],
            n_components: int = 5, per_element: bool = False, svd_solver: str = "auto",
            max_atoms_per_group: int | None = None, seed: int = 0,
            meta: Mapping[str, Any] | None = None) -> "DescriptorPCA":
        """Fit on stacked per-atom features (n_atoms_total × d) with their element symbols."""
        from sklearn.decomposition import PCA

        features = np.asarray(features, dtype=np.float64)
        symbols = np.asarray(symbols)
        if features.ndim != 2 or features.shape[0] != symbols.shape[0]:
            raise InputError(f"features {features.shape} and symbols {symbols.shape} do not match")
        if not np.isfinite(features).all():
            raise InputError("descriptors contain NaN or infinity; check the frames (overlapping atoms?)")
        rng = np.random.default_rng(seed)
        members: dict[str, np.ndarray] = {}
        if per_element:
            for element in _ordered_elements(symbols):
                members[element] = np.flatnonzero(symbols == element)
        else:
            members[GLOBAL] = np.arange(symbols.size)
        groups: dict[str, PCAGroup] = {}
        skipped: dict[str, str] = {}
        for name, rows in members.items():
            if max_atoms_per_group is not None and rows.size > max_atoms_per_group:
                rows = np.sort(rng.choice(rows, size=max_atoms_per_group, replace=False))
            k = n_components
            if rows.size <= k or k > features.shape[1]:
                skipped[name] = (f"{rows.size} atoms and {features.shape[1]} features cannot support "
                                 f"{k} components; fit on more frames")
                continue
            x = features[rows]
            solver = svd_solver
            if solver == "auto":
                # ARPACK (Lanczos on the centred data) gives the top k to machine precision at the
                # cost of a few hundred matrix-vector products; scikit-learn's own "auto" picks the
                # randomized solver here, whose trailing components are only good to ~1e-6, and a
                # full SVD of 10^4 atoms × 5,740 SOAP features would take minutes.
                solver = "arpack" if k < min(x.shape) else "full"
            pca = PCA(n_components=k, svd_solver=solver, random_state=seed).fit(x)
            total = float(np.sum(np.var(x, axis=0, ddof=1)))
            group = PCAGroup(
                name=name, mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64),
                explained_variance=pca.explained_variance_.astype(np.float64),
                explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
                total_variance=total, theta=(0.0, 0.0, 0.0, 0.0), n_samples=int(rows.size))
            group.theta = quadratic_form_moments(group.residuals(x)[1])
            groups[name] = group
        if not groups:
            raise InputError("no PCA could be fitted: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        model = cls(descriptor_settings, n_components, per_element, groups, {}, skipped, meta)
        # Per element: mean and spread of the element's training-set Q and T² (a training-set band;
        # the study's band is each tracked atom's own Q(t) over the trajectory, see monitor.own_band),
        # and the moments of the element's residuals that give it its own Q limit (also under a
        # global PCA).
        for element in _ordered_elements(symbols):
            name = model.group_of(element)
            rows = np.flatnonzero(symbols == element)
            if name is None or rows.size < 2:
                continue
            group = model.groups[name]
            scores, residual = group.residuals(features[rows])
            q = np.einsum("ij,ij->i", residual, residual)
            t2 = np.sum(scores**2 / group.explained_variance, axis=1)
            q_mean, q_std, _, _ = empirical_band(q, 0.0)
            t2_mean, t2_std, _, _ = empirical_band(t2, 0.0)
            model.training_stats[element] = {"q_mean": q_mean, "q_std": q_std, "t2_mean": t2_mean,
                                             "t2_std": t2_std, "n_atoms": int(rows.size),
                                             "theta": list(quadratic_form_moments(residual))}
            del residual
        return model

    # --------------------------------------------------------------- projection
    def group_of(self, element: str) -> str | None:
        name = element if self.per_element else GLOBAL
        return name if name in self.groups else None

    def evaluate(self, features: np.ndarray, symbols: Sequence[str]) -> Evaluation:
        features = np.asarray(features, dtype=np.float64)
        symbols = np.asarray(symbols)
        n = symbols.size
        width = self.n_features
        if features.shape != (n, width):
            raise InputError(f"expected descriptors of shape ({n}, {width}), got {features.shape}; "
                             "were they computed with this PCA's descriptor settings?")
        scores = np.full((n, self.n_components), np.nan)
        q = np.full(n, np.nan)
        t2 = np.full(n, np.nan)
        if self.per_element:
            selections = [(self.groups[e], np.flatnonzero(symbols == e)) for e in _ordered_elements(symbols)
                          if e in self.groups]
        else:
            selections = [(self.groups[GLOBAL], np.arange(n))]
        for group, rows in selections:
            if rows.size:
                scores[rows], q[rows], t2[rows] = group.evaluate(features[rows])
        return Evaluation(symbols=symbols, scores=scores, q=q, t2=t2)

    def transform(self, features: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
        return self.evaluate(features, symbols).scores

    @property
    def n_features(self) -> int:
        return int(next(iter(self.groups.values())).mean.size)

    def descriptor(self, model_override: str | None = None) -> "Descriptor":
        from .descriptors import descriptor_from_settings

        return descriptor_from_settings(self.descriptor_settings, model_override)

    # ------------------------------------------------------------------- limits
    def limits(self, alpha: float = 0.01, k_sigma: float = 2.0) -> dict[str, ElementLimits]:
        """Per element: a Q limit from the element's own training residuals, the F-distribution
        T² limit of the PCA the element is projected with, and the training-set band (mean ± kσ
        of the element's training Q; not the study's band, which is drawn from the tracked atom's
        own Q(t) over the trajectory).

        The Q limit is Jackson-Mudholkar's when the element has its own PCA (``per_element``:
        its residuals are centred, JM's setting). Under a global PCA an element's residuals have a
        non-zero mean; its limit is then Liu-Tang-Zhang's for non-central quadratic forms, and
        ``global_q_limit`` (JM of the whole fitted population) is the textbook single limit.
        The T² limit of a global PCA is the global Gaussian's: per-element T² limits need
        ``per_element=True``."""
        out: dict[str, ElementLimits] = {}
        for element, stats in self.training_stats.items():
            group = self.group_of(element)
            if group is None:
                continue
            q_limit: QLimit = (jackson_mudholkar_limit(stats["theta"], alpha) if self.per_element
                               else liu_tang_zhang_limit(stats["theta"], alpha))
            t2_limit = hotelling_t2_limit(self.n_components, self.groups[group].n_samples, alpha)
            _, _, q_lo, q_hi = _band(stats["q_mean"], stats["q_std"], k_sigma)
            _, _, _, t2_hi = _band(stats["t2_mean"], stats["t2_std"], k_sigma)
            out[element] = ElementLimits(
                element=element, group=group, q_limit=q_limit.value, q_limit_method=q_limit.method,
                t2_limit=t2_limit, q_mean=stats["q_mean"], q_std=stats["q_std"], q_band_low=q_lo,
                q_band_high=q_hi, t2_mean=stats["t2_mean"], t2_std=stats["t2_std"], t2_band_high=t2_hi)
        return out

    def global_q_limit(self, alpha: float = 0.01) -> QLimit:
        """Jackson-Mudholkar limit of a global PCA over all the atoms it was fitted on."""
        if self.per_element:
            raise InputError("a per-element PCA has no global Q limit; use limits() per element")
        return jackson_mudholkar_limit(self.groups[GLOBAL].theta, alpha)

    # --------------------------------------------------------------- reporting
    @property
    def explained_variance_ratio(self) -> list[float]:
        """Global PCA: sklearn's ratios. Per element: the pooled ratio Σ_e λ_e,j / Σ_e total_e,
        each element weighted by its number of fitted atoms (the share of all within-element
        variance that the j-th component of each element's PCA explains)."""
        if not self.per_element:
            return [float(v) for v in self.groups[GLOBAL].explained_variance_ratio]
        weights = {n: g.n_samples for n, g in self.groups.items()}
        total = sum(weights[n] * g.total_variance for n, g in self.groups.items())
        pooled = sum(weights[n] * g.explained_variance for n, g in self.groups.items())
        return [float(v) for v in np.asarray(pooled) / total]

    def summary(self) -> dict[str, Any]:
        return {
            "descriptor": self.descriptor_settings,
            "n_components": self.n_components,
            "per_element": self.per_element,
            "n_features": self.n_features,
            "explained_variance_ratio": self.explained_variance_ratio,
            "groups": {name: {"n_samples": g.n_samples,
                              "explained_variance": g.explained_variance.tolist(),
                              "explained_variance_ratio": g.explained_variance_ratio.tolist(),
                              "total_variance": g.total_variance,
                              "theta": list(g.theta)} for name, g in self.groups.items()},
            "training_stats": self.training_stats,
            "skipped": self.skipped,
            "meta": self.meta,
        }

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``pca.json`` (settings, statistics) and ``pca.npz`` (arrays; no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for name, g in self.groups.items():
            arrays[f"{name}/mean"] = g.mean
            arrays[f"{name}/components"] = g.components
            arrays[f"{name}/explained_variance"] = g.explained_variance
            arrays[f"{name}/explained_variance_ratio"] = g.explained_variance_ratio
        with atomic_path(directory / MODEL_NPZ) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
        document = {"format": "umlipft-pca", "format_version": FORMAT_VERSION, **self.summary()}
        atomic_write_text(directory / MODEL_JSON, json.dumps(document, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "DescriptorPCA":
        directory = Path(directory)
        meta_path, npz_path = directory / MODEL_JSON, directory / MODEL_NPZ
        if not meta_path.is_file() or not npz_path.is_file():
            raise InputError(f"{directory} is not a PCA directory (needs {MODEL_JSON} and {MODEL_NPZ}); "
                             "create one with: umlipft analyze pca --fit DATA.xyz -o DIR")
        try:
            doc = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{meta_path} is not valid JSON: {err}") from None
        if doc.get("format") != "umlipft-pca" or doc.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{meta_path} is not a umlipft PCA of format version {FORMAT_VERSION}")
        groups: dict[str, PCAGroup] = {}
        with np.load(npz_path, allow_pickle=False) as data:
            for name, info in doc["groups"].items():
                try:
                    groups[name] = PCAGroup(
                        name=name, mean=data[f"{name}/mean"], components=data[f"{name}/components"],
                        explained_variance=data[f"{name}/explained_variance"],
                        explained_variance_ratio=data[f"{name}/explained_variance_ratio"],
                        total_variance=float(info["total_variance"]),
                        theta=tuple(float(t) for t in info["theta"]),  # type: ignore[arg-type]
                        n_samples=int(info["n_samples"]))
                except KeyError as err:
                    raise InputError(f"{npz_path} lacks array {err}; the PCA directory is incomplete") from None
        return cls(doc["descriptor"], doc["n_components"], doc["per_element"], groups,
                   doc["training_stats"], doc.get("skipped"), doc.get("meta"))


def _band(mean: float, std: float, k_sigma: float) -> tuple[float, float, float, float]:
    return mean, std, mean - k_sigma * std, mean + k_sigma * std


def _ordered_elements(symbols: Iterable[str]) -> list[str]:
    from ase.data import atomic_numbers

    return sorted(set(str(s) for s in symbols), key=lambda s: atomic_numbers.get(s, 0))


# ------------------------------------------------------------------ file-level API
@dataclasses.dataclass
class FeatureSet:
    """Stacked descriptors of several files, with where each row came from."""

    features: np.ndarray
    symbols: np.ndarray
    source: np.ndarray  # index into ``sources`` per row
    frame: np.ndarray  # frame index within its source per row
    sources: list[str]


def compute_features(frames_by_source: Mapping[str, "Sequence[Atoms]"], descriptor: "Descriptor",
                     batch_frames: int = 4) -> FeatureSet:
    """Descriptors of every atom of every frame, filled into one preallocated array."""
    from .frames import batched

    total = sum(len(atoms) for frames in frames_by_source.values() for atoms in frames)
    features = np.empty((total, descriptor.n_features), dtype=np.float64)
    symbols, source, frame = [], [], []
    row = 0
    for s, (name, frames) in enumerate(frames_by_source.items()):
        index = 0
        for batch in batched(frames, batch_frames):
            for atoms, x in zip(batch, descriptor.compute(batch)):
                features[row:row + len(atoms)] = x
                row += len(atoms)
                symbols.extend(atoms.get_chemical_symbols())
                source.extend([s] * len(atoms))
                frame.extend([index] * len(atoms))
                index += 1
    return FeatureSet(features, np.asarray(symbols), np.asarray(source), np.asarray(frame),
                      list(frames_by_source))


def fit_pca_files(paths: Sequence[str | Path], config: PCAConfig,
                  index: str = ":") -> tuple[DescriptorPCA, FeatureSet]:
    """Read the reference datasets, compute descriptors and fit; returns the model and features."""
    from ..io import read_frames

    config.validate()
    if not paths:
        raise InputError("give at least one dataset to fit the PCA on")
    from .frames import drop_isolated_atoms

    frames_by_source = {str(p): drop_isolated_atoms(read_frames(p, index=index)) for p in paths}
    empty = [p for p, frames in frames_by_source.items() if not frames]
    if empty:
        raise InputError(f"{', '.join(empty)} hold(s) only isolated-atom frames; nothing to fit on")
    every = [a for frames in frames_by_source.values() for a in frames]
    descriptor = config.make_descriptor(every)
    feats = compute_features(frames_by_source, descriptor, config.batch_frames)
    meta = {"fit_sources": {str(p): len(f) for p, f in frames_by_source.items()}}
    model = DescriptorPCA.fit(feats.features, feats.symbols, descriptor.settings(), config.components,
                              config.per_element, config.svd_solver, config.max_atoms_per_group,
                              config.seed, meta)
    return model, feats
