"""The extrapolation watch stored in a LAMMPS export: a PCA of the model's own invariant node
features on its training frames, with per-element Q-residual limits.

``umlipft export MODEL --watch TRAIN.extxyz`` fits it and stores it as the JSON extra file
``umlipft_watch.json`` of the TorchScript export; the plugin's ``compute mace/q`` reads it and
evaluates it on the node features of the step's force call. This module is the contract's Python
side: :func:`fit_watch` writes it and :func:`evaluate_watch` / :func:`watch_q` are the reference
evaluation the C++ compute must reproduce.

What is fitted is exactly what ``umlipft analyze pca --descriptor mace`` fits with its defaults
(the steps of :func:`umlipft.analysis.pca.fit_pca_files`): the 0e columns of every interaction
layer's product output (:class:`umlipft.analysis.descriptors.MaceDescriptor`, float64),
concatenated over layers, isolated-atom frames left out, ``PCAConfig().components`` components,
the default grouping (global: one PCA of all atoms), and the per-element limits of
:meth:`DescriptorPCA.limits`, as ``umlipft analyze q`` uses them. Under a global PCA an element's
residuals are not centred, so that limit is Liu-Tang-Zhang's (a non-central quadratic form);
Jackson-Mudholkar's is the per-element PCA's (``q_limit_method`` says which).

Per atom i of element e, with the group's mean μ, components P (k rows) and variances λ:

    c = x - μ;  t = P c;  Q = ||c - Pᵀ t||²;  T² = Σ_j t_j² / λ_j;  Q/limit = Q / q_limit_e(α)

The halting statistic (see :data:`HALT_EXPLANATION`) allows for the number of atoms N watched:
each atom's Q is compared with its element's limit at the per-atom probability
:data:`HALT_FRAME_ALPHA` / N (Bonferroni), so that a frame like the training frames exceeds it
with probability about HALT_FRAME_ALPHA whatever its size, while one atom far outside the data
still does. That limit comes from the empirical tail of the element's training Q (an exponential
above its top 5 %), not from the Gaussian moment limits of ``analyze q``: on MACE features those
are exceeded by 4-6 % of the training H and O atoms at α = 1 % (measured on the aqueous data; the
features are not Gaussian), and at α/N their tail fired on half or more of the training frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ase import Atoms

    from ..analysis.descriptors import MaceDescriptor
    from ..analysis.pca import DescriptorPCA

WATCH_FILE = "umlipft_watch.json"
WATCH_FORMAT = "umlipft-mace-watch"
WATCH_VERSION = 1
DEFAULT_ALPHA = 0.01
# False-alarm probability of the halting statistic per frame (per check): Bonferroni over the N
# atoms gives each atom a/N. Measured on the shared aqueous data (benchmarks/watch_vs_soap.py:
# MACE-MP-0 small, PCA of the naive and periodic 44-frame sets, 193 in-distribution frames, 88
# training and 105 independent): 1e-2 fired on 8 frames and 1e-3 on 3 (the tail is fitted
# in-sample and independent MD frames reach further), 1e-4 on none (largest statistic 0.92),
# while a box compressed to 0.85 and an H placed 1.3 Å from a Cl gave 2.6-7.7. A long run
# checks ~1e4 nearly independent frames per ns.
HALT_FRAME_ALPHA = 1e-4
# The exponential tail of each element's training Q: its largest 5 %, at least 10 atoms.
TAIL_FRACTION = 0.05
MIN_TAIL_ATOMS = 10

HALT_EXPLANATION = (
    "Per atom i of element e (the symbol of its type): x = the 0e columns of each interaction layer's "
    "product output (layers[l].columns of that layer's feature_dim values), concatenated in layer order "
    "(n_features values); g = groups['all'] if grouping is 'global', else groups[e]; c = x - g.mean; "
    "t_j = sum_f g.components[j][f] * c[f] (j < n_components); r = c - sum_j t_j * g.components[j]; "
    "Q = sum_f r[f]^2 (the residual itself, not |c|^2 - |t|^2, which cancels); "
    "T2 = sum_j t_j^2 / g.explained_variance[j]; Q/limit = Q / elements[e].q_limit (the per-atom limit at "
    "alpha of 'umlipft analyze q'; on MACE features it is exceeded by several % of the training atoms of "
    "some elements, so it is a per-atom indicator, not the halting rule). "
    "Halting statistic: N = the number of atoms watched (the compute's group, summed over all MPI ranks); "
    "a = halt.frame_alpha / N (Bonferroni over the atoms); with tail = elements[e].halt_tail, "
    "L_e = tail.threshold + tail.scale * max(0, ln(tail.probability / a)) (the exponential tail of the "
    "element's training Q: P(Q > L_e) = a); statistic = max over the watched atoms of Q / L_e, reduced "
    "with MPI_MAX over ranks. It exceeds 1 on a frame like the training frames with probability about "
    "frame_alpha, and whenever one atom's Q is beyond its element's training tail at a; halt when it "
    "exceeds halt.limit (1) for watch_patience consecutive checks. Atoms of an element absent from "
    "'elements' cannot be judged: refuse such a simulation at init. The watch was fitted on the model "
    "file's features in feature_dtype (float64); a float32 export's features differ by rounding."
)


@dataclasses.dataclass(frozen=True)
class WatchEvaluation:
    """Per frame: per-atom Q, Q / limit (the limit at alpha), T², and the halting statistic."""

    symbols: list[np.ndarray]
    q: list[np.ndarray]
    q_over_limit: list[np.ndarray]
    t2: list[np.ndarray]
    halt: np.ndarray  # per frame: max over atoms of Q / L_e(frame_alpha / N)
    halt_atom: np.ndarray  # per frame: the atom that gives it


# ------------------------------------------------------------------------------------- fitting
def fit_watch(model: str | Path, training_file: str | Path, *, n_components: int | None = None,
              alpha: float = DEFAULT_ALPHA, covered_numbers: Sequence[int] | None = None,
              batch_frames: int | None = None) -> dict[str, Any]:
    """Fit the watch of ``model`` on ``training_file`` (``umlipft export --watch``).

    ``covered_numbers``: the atomic numbers the exported model handles (an element-restricted
    export covers fewer than the model file); every element of the training frames must be
    among them. Raises InputError naming the file when it cannot be read, holds no frame with
    an environment, holds NaN/Inf, or holds elements the model does not cover.
    """
    from ..analysis.pca import DescriptorPCA, PCAConfig, compute_features
    from ..io import read_frames, sha256_file
    from .foundation import resolve_foundation_model

    defaults = PCAConfig()
    n_components = defaults.components if n_components is None else int(n_components)
    _check_alpha(alpha)
    path = resolve_foundation_model(model).resolve()
    training_file = Path(training_file)
    frames = _training_frames(training_file, read_frames)
    found = {int(z) for atoms in frames for z in atoms.numbers}
    if covered_numbers is not None:  # checked before the model is loaded: a wrong file fails at once
        _check_covered(training_file, found, covered_numbers)
    # analyze pca's fitting (fit_pca_files) with its defaults, step by step: the descriptor is
    # needed afterwards for the layer layout, and loading a model twice costs seconds.
    config = defaults.replace(descriptor="mace", model=str(path), components=n_components,
                              **({"batch_frames": batch_frames} if batch_frames else {}))
    config.validate()
    descriptor = config.make_descriptor(frames)
    _check_covered(training_file, found, descriptor.model.atomic_numbers)  # type: ignore[attr-defined]
    feats = compute_features({str(training_file): frames}, descriptor, config.batch_frames)
    try:
        pca = DescriptorPCA.fit(feats.features, feats.symbols, descriptor.settings(), config.components,
                                config.per_element, config.svd_solver, config.max_atoms_per_group, config.seed,
                                {"fit_sources": {str(training_file): len(frames)}})
    except InputError as err:
        raise InputError(f"--watch {training_file}: {err}") from None
    watch = build_watch(pca, descriptor, alpha, feats.features, feats.symbols)  # type: ignore[arg-type]
    watch.update({"training_file": str(training_file), "training_sha256": sha256_file(training_file),
                  "model": str(path), "model_sha256": descriptor.config.model_sha256})  # type: ignore[attr-defined]
    return watch


def _check_covered(training_file: Path, found: set[int], covered_numbers: Sequence[int]) -> None:
    from ase.data import chemical_symbols

    covered = {int(z) for z in covered_numbers}
    if found - covered:
        names = " ".join(chemical_symbols[z] for z in sorted(found - covered))
        have = " ".join(chemical_symbols[z] for z in sorted(covered))
        raise InputError(f"--watch {training_file}: its frames hold {names}, which the exported model does not "
                         f"cover (it covers {have}); fit the watch on the model's own training data")


def _training_frames(path: Path, read_frames) -> "list[Atoms]":
    from ..analysis.frames import drop_isolated_atoms

    try:
        frames = read_frames(path)
    except InputError as err:
        message = str(err)
        raise InputError(f"--watch: {message}" if str(path) in message else f"--watch {path}: {message}") from None
    kept = drop_isolated_atoms(frames)
    if not kept:
        raise InputError(f"--watch {path} holds no frame with atomic environments (only isolated atoms); "
                         "give the model's training frames")
    return kept


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise InputError(f"the watch's alpha (per-atom false-alarm probability) must be between 0 and 1, "
                         f"got {alpha}")


def layer_columns(descriptor: "MaceDescriptor") -> list[dict[str, Any]]:
    """Per interaction layer: its product output's width and the indices of its 0e columns, as
    :class:`MaceDescriptor` selects them (checked against the descriptor's own selection)."""
    from e3nn import o3

    layers, flat, offset = [], [], 0
    use = len(descriptor.model.products) if descriptor.config.layers == -1 else descriptor.config.layers
    for i, product in enumerate(descriptor.model.products):
        irreps = o3.Irreps(str(product.linear.irreps_out))
        columns = [c for (_, ir), piece in zip(irreps, irreps.slices()) if ir.l == 0 and ir.p == 1
                   for c in range(piece.start, piece.stop)] if i < use else []
        layers.append({"feature_dim": int(irreps.dim), "columns": columns})
        flat.extend(offset + c for c in columns)
        offset += irreps.dim
    if flat != [int(c) for c in descriptor._columns]:  # noqa: SLF001 - the contract must match it
        raise InputError("the watch's layer columns differ from the MACE descriptor's; this model's "
                         "layout is not supported by the watch")
    return layers


def build_watch(pca: "DescriptorPCA", descriptor: "MaceDescriptor", alpha: float,
                features: np.ndarray, symbols: np.ndarray) -> dict[str, Any]:
    """The watch document (without the file and hash keys) from a fitted PCA of MACE features.

    ``features``/``symbols``: the atoms the PCA was fitted on; their Q gives each element's
    training statistics (as ``pca.limits``) and the tail the halting statistic extrapolates."""
    from ase.data import atomic_numbers

    _check_alpha(alpha)
    layers = layer_columns(descriptor)
    limits = pca.limits(alpha)
    symbols = np.asarray(symbols)
    ev = pca.evaluate(features, symbols)
    elements: dict[str, Any] = {}
    for element in sorted(set(symbols.tolist()), key=lambda s: atomic_numbers[s]):
        q = ev.q[symbols == element]
        if element not in limits or q.size < 2:
            raise InputError(f"the training frames hold {q.size} atom(s) of {element}: too few for its Q "
                             "statistics; fit the watch on more frames with this element")
        lim = limits[element]
        tail = exponential_tail(q)
        if not (lim.q_limit > 0 and tail_limit(tail, HALT_FRAME_ALPHA) > 0):
            raise InputError(f"the Q of every training atom of {element} is zero: the {pca.n_components} "
                             "components reproduce its features exactly; use fewer --watch-components")
        elements[element] = {
            "atomic_number": int(atomic_numbers[element]),
            "q_limit": float(lim.q_limit), "q_limit_method": lim.q_limit_method,
            "q_mean": float(lim.q_mean), "q_std": float(lim.q_std),
            "t2_limit": float(lim.t2_limit), "t2_mean": float(lim.t2_mean), "t2_std": float(lim.t2_std),
            "theta": [float(t) for t in pca.training_stats[element]["theta"]],
            "q_train_max": float(np.max(q)),
            "halt_tail": tail,
            "n_train_atoms": int(q.size),
        }
    groups = {name: {"mean": [float(v) for v in g.mean],
                     "components": [[float(v) for v in row] for row in g.components],
                     "explained_variance": [float(v) for v in g.explained_variance],
                     "n_train_atoms": int(g.n_samples)} for name, g in pca.groups.items()}
    return {
        "format": WATCH_FORMAT,
        "version": WATCH_VERSION,
        "grouping": "per-element" if pca.per_element else "global",
        "alpha": float(alpha),
        "n_components": int(pca.n_components),
        "layers": layers,
        "n_features": int(sum(len(layer["columns"]) for layer in layers)),
        "feature_dtype": descriptor.config.dtype,
        "groups": groups,
        "elements": elements,
        "halt": {"statistic": "max over the watched atoms of Q / (threshold + scale * ln(probability * N / "
                              "frame_alpha)), per element's halt_tail, N the number of atoms watched",
                 "limit": 1.0, "frame_alpha": HALT_FRAME_ALPHA, "tail_fraction": TAIL_FRACTION,
                 "min_tail_atoms": MIN_TAIL_ATOMS, "explanation": HALT_EXPLANATION},
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio],
    }


def exponential_tail(q: np.ndarray) -> dict[str, float]:
    """The upper tail of an element's training Q as an exponential (peaks over a threshold).

    The k largest of n values, k = max(MIN_TAIL_ATOMS, TAIL_FRACTION n) (at most n - 1), lie
    above the threshold u (the next value); P(Q > u) = k/n, and above u the excess is taken as
    exponential with the mean excess of those k as its scale (its maximum-likelihood estimate).
    The quantile at a per-atom probability a < k/n is then u + scale ln((k/n) / a)."""
    q = np.sort(np.asarray(q, dtype=np.float64))
    n = q.size
    k = min(max(MIN_TAIL_ATOMS, math.ceil(TAIL_FRACTION * n)), n - 1)
    threshold = float(q[n - k - 1])
    return {"threshold": threshold, "probability": k / n, "scale": float(np.mean(q[n - k:] - threshold)),
            "n_tail": int(k)}


def tail_limit(tail: Mapping[str, float], frame_alpha: float, n_atoms: int = 1) -> float:
    """The halting limit of one element for a frame of ``n_atoms`` watched atoms: the Q its
    training tail exceeds with per-atom probability a = frame_alpha / n_atoms (Bonferroni)."""
    a = frame_alpha / max(int(n_atoms), 1)
    return float(tail["threshold"]) + float(tail["scale"]) * max(0.0, math.log(float(tail["probability"]) / a))


# ----------------------------------------------------------------------------------- reading
def read_watch(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The watch of an export (``.pt``), of a ``umlipft_watch.json`` file, or a document."""
    if isinstance(source, Mapping):
        doc = dict(source)
        where = "the watch document"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist")
        if zipfile.is_zipfile(path):
            doc = _watch_from_export(path)
        else:
            try:
                doc = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputError(f"{path} is neither a umlipft export nor a watch JSON file: {err}") from None
    if doc.get("format") != WATCH_FORMAT or doc.get("version") != WATCH_VERSION:
        raise InputError(f"{where} is not a umlipft MACE watch of version {WATCH_VERSION}")
    return doc


def _watch_from_export(path: Path) -> dict[str, Any]:
    # TorchScript files are zip archives with extra files under <archive>/extra/: read the JSON
    # without loading (and deserialising) the model.
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{WATCH_FILE}")]
        if not names:
            raise InputError(f"{path} carries no extrapolation watch; export it with: umlipft export MODEL "
                             f"--watch TRAIN.extxyz -o {path.name}")
        return json.loads(archive.read(names[0]).decode())


# -------------------------------------------------------------------------------- evaluation
def evaluate_watch(watch: Mapping[str, Any], features: Sequence[np.ndarray],
                   symbols: Sequence[Sequence[str]]) -> WatchEvaluation:
    """Q, Q/limit, T² and the halting statistic of frames from their MACE features, using only
    the watch document (the arithmetic of :data:`HALT_EXPLANATION`; every atom of a frame is
    watched)."""
    groups = {name: (np.asarray(g["mean"], dtype=np.float64), np.asarray(g["components"], dtype=np.float64),
                     np.asarray(g["explained_variance"], dtype=np.float64)) for name, g in watch["groups"].items()}
    elements = watch["elements"]
    frame_alpha = float(watch["halt"]["frame_alpha"])
    global_group = watch["grouping"] == "global"
    out_q, out_ratio, out_t2, out_sym, halt, halt_atom = [], [], [], [], [], []
    for x, sym in zip(features, symbols):
        x = np.asarray(x, dtype=np.float64)
        sym = np.asarray(sym)
        unknown = sorted(set(sym.tolist()) - set(elements))
        if unknown:
            raise InputError(f"the watch was fitted for {', '.join(elements)}; it cannot judge {', '.join(unknown)}")
        if x.shape != (sym.size, int(watch["n_features"])):
            raise InputError(f"features of shape {x.shape} do not fit the watch's {watch['n_features']} columns")
        q = np.empty(sym.size)
        t2 = np.empty(sym.size)
        limit = np.empty(sym.size)
        halt_limit = np.empty(sym.size)
        for element in set(sym.tolist()):
            rows = np.flatnonzero(sym == element)
            mean, comps, var = groups["all" if global_group else element]
            centred = x[rows] - mean
            scores = centred @ comps.T
            residual = centred - scores @ comps
            q[rows] = np.einsum("ij,ij->i", residual, residual)
            t2[rows] = np.sum(scores**2 / var, axis=1)
            limit[rows] = float(elements[element]["q_limit"])
            halt_limit[rows] = tail_limit(elements[element]["halt_tail"], frame_alpha, sym.size)
        stat = q / halt_limit
        out_q.append(q)
        out_t2.append(t2)
        out_ratio.append(q / limit)
        out_sym.append(sym)
        halt.append(float(np.max(stat)) if stat.size else 0.0)
        halt_atom.append(int(np.argmax(stat)) if stat.size else -1)
    return WatchEvaluation(out_sym, out_q, out_ratio, out_t2, np.asarray(halt), np.asarray(halt_atom))


def watch_q(export_or_watch: str | Path | Mapping[str, Any], frames: "str | Path | Sequence[Atoms]",
            model: str | Path | None = None, batch_frames: int = 4) -> WatchEvaluation:
    """Reference evaluation of a watch on frames: per-atom Q, Q/limit, T² (and the halting
    statistic), with the MACE features computed by :class:`MaceDescriptor` from the model the
    watch was fitted with (``model``: that model's file if it moved; its hash is checked)."""
    from ..analysis.descriptors import MaceDescriptor, MaceSettings
    from ..analysis.frames import batched

    watch = read_watch(export_or_watch)
    if isinstance(frames, (str, Path)):
        from ..io import read_frames

        frames = read_frames(frames)
    descriptor = MaceDescriptor(MaceSettings(model=str(model or watch["model"]),
                                             dtype=watch.get("feature_dtype", "float64"),
                                             model_sha256=watch["model_sha256"]))
    features: list[np.ndarray] = []
    for batch in batched(list(frames), batch_frames):
        features.extend(descriptor.compute(batch))
    return evaluate_watch(watch, features, [a.get_chemical_symbols() for a in frames])
