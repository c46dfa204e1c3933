"""The data-generation strategies of the study (periodic, naive, control) and the adaptive one.

Each returns a :class:`StrategyResult`: its models in order (name, mace-torch file, LAMMPS
export, the labelled files it was trained on) and the trajectories that produced the data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .config import WorkflowConfig
from .stages import (absolute, elements_of, export_stage, extract_stage, finetune_stage, finetune_watch_data,
                     label_stage, md_stage, rel, start_stage, window_selection)
from ..io import sha256_file
from .state import Deferred, WorkflowState

UNIVERSAL = "U"
NAIVE_SEED_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    model: str  # mace-torch file (relative to the workflow directory) or foundation name
    lammps_model: str | None
    train: tuple[str, ...]  # labelled files it was fine-tuned on
    n_frames: int
    stage: str | None  # the finetune stage (None for the universal model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StrategyResult:
    strategy: str
    models: list[ModelInfo]
    # The trajectory pieces that produced the data, with the time at which each starts (ps).
    segments: list[dict[str, Any]]
    labelled: list[str]  # labelled files in order (iteration by iteration)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "models": [m.to_dict() for m in self.models],
                "segments": self.segments, "labelled": self.labelled}


def universal(config: WorkflowConfig) -> ModelInfo:
    return ModelInfo(UNIVERSAL, config.foundation, None, (), 0, None)


def _start_model(config: WorkflowConfig, models: list[ModelInfo]) -> str:
    if config.finetune.start_from == "previous" and len(models) > 1:
        return models[-1].model
    return config.foundation


def _segment_frames(config: WorkflowConfig) -> dict[str, Any]:
    """Which frames of a segment's second half are labelled (``selection``)."""
    return window_selection(config, config.md.segment_ps() / 2, config.frames_per_segment)


def _segment_record(name: str, model: str, run: dict[str, Any], time_offset_ps: float) -> dict[str, Any]:
    return {"name": name, "model": model, "directory": run["directories"][0], "trajectory": run["trajectories"][0],
            "thermo": run["thermo"][0], "final": run["finals"][0], "time_offset_ps": time_offset_ps}


def _single_trajectory_start(state: WorkflowState,
                             config: WorkflowConfig) -> tuple[str, tuple[str, ...], str, list[str]]:
    """Start structure, its elements, the universal model's LAMMPS export and the first segment's
    dependencies, for the strategies that follow one trajectory (periodic, control, adaptive)."""
    start = start_stage(state, config, 1)
    start0 = start["structures"][0]
    elements = elements_of(absolute(state, start0))
    md_model = export_stage(state, config, UNIVERSAL, config.foundation, elements)
    return start0, elements, md_model, start["stages"][:1] + [f"export/{UNIVERSAL}"]


def _finetune_and_export(state: WorkflowState, config: WorkflowConfig, strategy: str, i: int, name: str,
                         labelled: list[str], models: list[ModelInfo], elements: Sequence[str]) -> ModelInfo:
    """Fine-tune on every frame labelled so far (segments 0..i) and export for LAMMPS."""
    ft_stage = f"{strategy}/ft-{i + 1:02d}"
    deps_ft = [f"{strategy}/seg-{k:02d}/label" for k in range(i + 1)]
    if models[-1].stage:
        deps_ft.append(models[-1].stage)
    ft = finetune_stage(state, config, ft_stage, model_name=name, train=list(labelled),
                        start_model=_start_model(config, models), deps=deps_ft)
    lammps = export_stage(state, config, name, ft["model"], elements, deps=[ft_stage],
                          watch=finetune_watch_data(config, ft))
    return ModelInfo(name, ft["model"], lammps, tuple(labelled), ft["n_frames"], ft_stage)


# ----------------------------------------------------------------------------- periodic / control
def run_periodic(state: WorkflowState, config: WorkflowConfig, *, strategy: str = "periodic") -> StrategyResult:
    """One trajectory in segments; after each, label frames of its second half, fine-tune on the
    cumulative set and continue the SAME trajectory (positions, velocities, box) with the new
    model. ``strategy='control'``: the same, but the trajectory continues with the universal
    model, and model NP-n is trained on the first n labelled frames."""
    feedback = strategy == "periodic"
    start0, elements, md_model, deps_md = _single_trajectory_start(state, config)
    md = config.md
    models = [universal(config)]
    labelled: list[str] = []
    segments: list[dict[str, Any]] = []
    previous_md: str | None = None
    n_total = 0
    for i in range(config.iterations):
        seg = f"{strategy}/seg-{i:02d}"
        run = md_stage(state, config, f"{seg}/md", model=md_model, steps=md.segment_steps, seed=md.seed,
                       structures=[start0] if previous_md is None else (), continue_from=previous_md,
                       deps=deps_md, elements=elements)
        offset = i * md.segment_ps()
        segments.append(_segment_record(seg, models[-1].name if feedback else UNIVERSAL, run, offset))
        ex = extract_stage(state, config, f"{seg}/extract", trajectory=run["trajectories"][0],
                           start_ps=md.segment_ps() / 2, **_segment_frames(config),
                           seed=config.seed + i, time_offset_ps=offset, deps=[f"{seg}/md"],
                           tag={"strategy": strategy, "iteration": i})
        lab = label_stage(state, config, f"{seg}/label", frames=ex["frames"], deps=[f"{seg}/extract"])
        labelled.append(lab["labelled"])
        n_total += lab["n_labelled"]
        name = f"FT{i + 1}" if feedback else f"NP-{n_total}"
        models.append(_finetune_and_export(state, config, strategy, i, name, labelled, models, elements))
        if feedback:
            md_model = models[-1].lammps_model
            deps_md = [f"{seg}/md", f"export/{name}"]
        else:
            deps_md = [f"{seg}/md"]
        previous_md = run["directories"][0]
    return StrategyResult(strategy, models, segments, labelled)


def run_control(state: WorkflowState, config: WorkflowConfig) -> StrategyResult:
    return run_periodic(state, config, strategy="control")


# ------------------------------------------------------------------------------------------ naive
def run_naive(state: WorkflowState, config: WorkflowConfig) -> StrategyResult:
    """K independent trajectories with the universal model from different start structures
    (one LAMMPS run with K replicas: ``mpiexec`` ensembles in the study profile); frames from
    each second half, pooled; the universal model fine-tuned once per subset size on nested
    random subsets of the pool (N-10pts ... N-50pts in the study)."""
    k = config.iterations
    start = start_stage(state, config, k)
    elements = elements_of(absolute(state, start["structures"][0]))
    md = config.md
    u_model = export_stage(state, config, UNIVERSAL, config.foundation, elements)
    # Its own velocity seeds: replica 0 starts where the periodic trajectory starts, and with the
    # same seed the two would be one trajectory twice instead of independent samples.
    run = md_stage(state, config, "naive/md", model=u_model, steps=md.segment_steps, seed=md.seed + NAIVE_SEED_OFFSET,
                   structures=start["structures"], deps=start["stages"] + [f"export/{UNIVERSAL}"], elements=elements)
    labelled: list[str] = []
    segments: list[dict[str, Any]] = []
    for j in range(k):
        name = f"naive/traj-{j:02d}"
        segments.append({"name": name, "model": UNIVERSAL, "directory": run["directories"][j],
                         "trajectory": run["trajectories"][j], "thermo": run["thermo"][j],
                         "final": run["finals"][j], "time_offset_ps": 0.0})
        try:
            ex = extract_stage(state, config, f"{name}/extract", trajectory=run["trajectories"][j],
                               start_ps=md.segment_ps() / 2, **_segment_frames(config),
                               seed=config.seed + 1000 + j, deps=["naive/md"],
                               tag={"strategy": "naive", "iteration": j})
            lab = label_stage(state, config, f"{name}/label", frames=ex["frames"], deps=[f"{name}/extract"])
        except Deferred:  # another batch job labels this trajectory (the pool stage waits for it)
            continue
        labelled.append(lab["labelled"])
    pool = _pool_stage(state, config, labelled, [f"naive/traj-{j:02d}/label" for j in range(k)])
    models = [universal(config)]
    for n, subset in zip(pool["sizes"], pool["subsets"]):
        ft_stage = f"naive/ft-{n:03d}"
        deps = ["naive/pool"] + ([models[-1].stage] if models[-1].stage and config.finetune.start_from == "previous" else [])
        try:
            ft = finetune_stage(state, config, ft_stage, model_name=f"N-{n}pts", train=[subset],
                                start_model=_start_model(config, models), deps=deps)
            lammps = export_stage(state, config, f"N-{n}pts", ft["model"], elements, deps=[ft_stage],
                                  watch=finetune_watch_data(config, ft))
        except Deferred:  # another batch job fine-tunes this subset; only from U are they independent
            if config.finetune.start_from == "previous":
                raise
            continue
        models.append(ModelInfo(f"N-{n}pts", ft["model"], lammps, (subset,), ft["n_frames"], ft_stage))
    return StrategyResult("naive", models, segments, labelled)


def _pool_stage(state: WorkflowState, config: WorkflowConfig, labelled: list[str], deps: list[str]) -> dict[str, Any]:
    inputs = {"labelled": labelled, "subsets": list(config.subsets()), "seed": config.seed}

    def run(folder: Path) -> dict[str, Any]:
        import numpy as np

        from ..io import read_frames, write_frames

        pool = [a for f in labelled for a in read_frames(absolute(state, f))]
        write_frames(folder / "pool.extxyz", pool)
        order = np.random.default_rng(config.seed).permutation(len(pool))
        sizes, subsets = [], []
        for n in config.subsets():
            if n > len(pool):
                state.log(f"naive: subset of {n} frames asked, the pool holds {len(pool)} (failed labels); using {len(pool)}")
                n = len(pool)
            if sizes and n == sizes[-1]:
                continue
            path = write_frames(folder / f"subset-{n:03d}.extxyz", [pool[i] for i in sorted(order[:n])])
            sizes.append(n)
            subsets.append(rel(state, path))
        return {"pool": rel(state, folder / "pool.extxyz"), "n_pool": len(pool), "sizes": sizes,
                "subsets": subsets, "sha256": [sha256_file(absolute(state, s)) for s in subsets]}

    return state.run("naive/pool", inputs, run, deps=deps)


# --------------------------------------------------------------------------------------- adaptive
def run_adaptive(state: WorkflowState, config: WorkflowConfig) -> StrategyResult:
    """Periodic, but each segment (after the first) runs in chunks and ends early when a frame
    leaves the current training data (more than ``adaptive.max_fraction_outside`` of its atoms
    above their Q, or T², control limit of a PCA fitted on the training frames); the frames
    furthest outside are labelled. The first segment, with no training data yet, is periodic's."""
    start0, elements, md_model, deps_md = _single_trajectory_start(state, config)
    md = config.md
    ad = config.adaptive
    models = [universal(config)]
    labelled: list[str] = []
    segments: list[dict[str, Any]] = []
    previous_md: str | None = None
    time_ps = 0.0
    chunks_per_segment = md.segment_steps // ad.chunk_steps
    for i in range(config.iterations):
        seg = f"adaptive/seg-{i:02d}"
        if i == 0:
            run = md_stage(state, config, f"{seg}/md", model=md_model, steps=md.segment_steps, seed=md.seed,
                           structures=[start0], deps=deps_md, elements=elements)
            segments.append(_segment_record(seg, UNIVERSAL, run, 0.0))
            ex = extract_stage(state, config, f"{seg}/extract", trajectory=run["trajectories"][0],
                               start_ps=md.segment_ps() / 2, **_segment_frames(config),
                               seed=config.seed, deps=[f"{seg}/md"], tag={"strategy": "adaptive", "iteration": 0})
            previous_md, last_dep = run["directories"][0], f"{seg}/md"
            time_ps = md.segment_ps()
            select_stage = f"{seg}/extract"
            frames = ex["frames"]
        else:
            pieces: list[str] = []
            chunk_deps = deps_md
            for c in range(chunks_per_segment):
                chunk = f"{seg}/chunk-{c:02d}"
                run = md_stage(state, config, f"{chunk}/md", model=md_model, steps=ad.chunk_steps, seed=md.seed,
                               continue_from=previous_md, deps=chunk_deps, elements=elements)
                segments.append(_segment_record(chunk, models[-1].name, run, time_ps))
                time_ps += ad.chunk_steps * md.timestep_fs / 1000.0
                pieces.append(f"{chunk}/md")
                previous_md, chunk_deps = run["directories"][0], [f"{chunk}/md"]
                check = _monitor_stage(state, config, f"{chunk}/monitor", models[-1], run["trajectories"][0],
                                       deps=[f"{chunk}/md"])
                if check["outside"]:
                    break
            last_dep = pieces[-1]
            select_stage = f"{seg}/select"
            frames = _select_outside_stage(state, config, select_stage, pieces, i)["frames"]
        lab = label_stage(state, config, f"{seg}/label", frames=frames, deps=[select_stage])
        labelled.append(lab["labelled"])
        models.append(_finetune_and_export(state, config, "adaptive", i, f"AD{i + 1}", labelled, models, elements))
        md_model = models[-1].lammps_model
        deps_md = [last_dep, f"export/AD{i + 1}"]
    return StrategyResult("adaptive", models, segments, labelled)


def _pca_for(state: WorkflowState, config: WorkflowConfig, model: ModelInfo):
    """SOAP PCA of a model's training frames, fitted once and saved beside its fine-tune."""
    from ..analysis import DescriptorPCA
    from ..analysis.pca import PCAConfig, fit_pca_files

    assert model.stage is not None
    folder = state.stage_dir(model.stage) / "pca"
    if (folder / "pca.json").is_file():
        return DescriptorPCA.load(folder)
    a = config.analysis
    pca, _ = fit_pca_files([absolute(state, t) for t in model.train],
                           PCAConfig(components=a.components, r_cut_A=a.soap_r_cut_A, n_max=a.soap_n_max,
                                     l_max=a.soap_l_max, sigma_A=a.soap_sigma_A, per_element=False))
    pca.save(folder)
    return pca


def _monitor_stage(state: WorkflowState, config: WorkflowConfig, name: str, model: ModelInfo, trajectory: str,
                   deps: list[str]) -> dict[str, Any]:
    ad = config.adaptive
    inputs = {"trajectory": trajectory, "model": model.name, "adaptive": ad.to_dict(),
              "analysis": config.analysis.to_dict()}

    def run(folder: Path) -> dict[str, Any]:
        import numpy as np

        from ..analysis import QConfig, analyze_trajectory

        pca = _pca_for(state, config, model)
        a = config.analysis
        result = analyze_trajectory(pca, absolute(state, trajectory), folder,
                                    QConfig(alpha=a.alpha, k_sigma=a.k_sigma, n_track=0))
        q, t2 = result.load(mmap=False)
        limits = pca.limits(a.alpha, a.k_sigma)
        symbols = np.asarray(_symbols(absolute(state, trajectory)))
        lim = np.array([getattr(limits[s], "q_limit" if ad.statistic == "q" else "t2_limit")
                        if s in limits else np.inf for s in symbols])
        values = q if ad.statistic == "q" else t2
        ratio = values / lim
        frac = (ratio > 1.0).mean(axis=1)
        np.save(folder / "ratio.npy", ratio)
        return {"fraction_outside": [float(f) for f in frac], "max_ratio": [float(r) for r in ratio.max(axis=1)],
                "outside": bool((frac > ad.max_fraction_outside).any())}

    return state.run(name, inputs, run, deps=deps)


def _symbols(path: Path) -> list[str]:
    from ..io import read_frames

    return read_frames(path, index=0)[0].get_chemical_symbols()


def _select_outside_stage(state: WorkflowState, config: WorkflowConfig, name: str, pieces: list[str],
                          iteration: int) -> dict[str, Any]:
    """The ``frames_per_segment`` frames of this segment whose atoms lie furthest outside the
    training data (largest mean Q/limit over the atoms), each chunk's first frame excluded (it
    repeats the previous chunk's last)."""

    def run(folder: Path) -> dict[str, Any]:
        import numpy as np

        from ..io import read_frames, write_frames

        candidates = []
        for piece in pieces:
            chunk = piece.removesuffix("/md")
            traj = state.result(piece)["trajectories"][0]
            ratio = np.load(state.stage_dir(f"{chunk}/monitor") / "ratio.npy")
            frames = read_frames(absolute(state, traj))
            for j in range(1, len(frames)):
                candidates.append((float(np.mean(np.minimum(ratio[j], 1e6))), piece, j, frames[j], traj))
        if not candidates:
            raise InputError(f"{name}: the segment produced no frames to choose from")
        candidates.sort(key=lambda c: -c[0])
        chosen = candidates[:config.frames_per_segment]
        out = []
        for score, piece, j, atoms, traj in chosen:
            atoms = atoms.copy()
            atoms.calc = None
            atoms.info.update({"source_file": traj, "source_index": j, "selection": "q-outside",
                               "mean_q_ratio": score, "strategy": "adaptive", "iteration": iteration})
            out.append(atoms)
        path = write_frames(folder / "frames.extxyz", out)
        return {"frames": rel(state, path), "n_frames": len(out), "scores": [c[0] for c in chosen],
                "sha256": sha256_file(path)}

    return state.run(name, {"pieces": pieces, "n": config.frames_per_segment}, run,
                     deps=[*pieces, *[p.removesuffix("/md") + "/monitor" for p in pieces]])


STRATEGY_RUNNERS = {"periodic": run_periodic, "naive": run_naive, "control": run_control, "adaptive": run_adaptive}
