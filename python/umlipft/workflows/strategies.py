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
    """Periodic, but driven by the in-run extrapolation watch. Segment 0 (U, which has no training
    data to watch) is periodic's. Every later segment continues the SAME trajectory (positions,
    velocities, box: ``continue_from`` the previous segment's run, halted or not) with the latest
    model ADn, whose LAMMPS export carries a watch fitted on ADn's own training frames; it runs
    with the watch (``adaptive.watch_every``/``watch_patience``; NVT, as watch.in is, in the box the
    previous segment ended with) until the watch fires or ``md.segment_steps`` are done.

    Frames labelled when the watch fired (stage ``seg-NN/select``, :func:`_halt_frames_stage`):
    the frames the watch flagged (whole frames where the statistic exceeded 1, the halting frame
    among them), newest first, then the segment's dumped frames before the halt, newest first,
    skipping steps already taken and step 0 (the previous segment's last state), up to
    ``frames_per_segment`` in all. When the watch never fires in a segment, the segment ran its
    full length and its frames are chosen as periodic chooses them (``seg-NN/extract``: the
    second half, ``selection``). ADn+1 is then fine-tuned on every frame labelled so far."""
    start0, elements, md_model, deps_md = _single_trajectory_start(state, config)
    md = config.md
    ad = config.adaptive
    models = [universal(config)]
    labelled: list[str] = []
    segments: list[dict[str, Any]] = []
    previous_md: str | None = None
    time_ps = 0.0
    for i in range(config.iterations):
        seg = f"adaptive/seg-{i:02d}"
        watch = (ad.watch_every, ad.watch_patience) if i > 0 else None
        run = md_stage(state, config, f"{seg}/md", model=md_model, steps=md.segment_steps, seed=md.seed,
                       structures=[start0] if previous_md is None else (), continue_from=previous_md,
                       deps=deps_md, elements=elements, watch=watch)
        record = _segment_record(seg, models[-1].name, run, time_ps)
        seen = run["watch"][0] if watch else None
        steps_run = seen["steps_run"] if seen else md.segment_steps
        record["steps"] = steps_run
        if seen is not None and seen["halted"]:
            record["watch"] = seen
            select = f"{seg}/select"
            frames = _halt_frames_stage(state, config, select, run, iteration=i, time_offset_ps=time_ps)
        else:
            if seen is not None:
                record["watch"] = seen  # it never fired: this segment is periodic's
            select = f"{seg}/extract"
            frames = extract_stage(state, config, select, trajectory=run["trajectories"][0],
                                   start_ps=md.segment_ps() / 2, **_segment_frames(config),
                                   seed=config.seed + i, time_offset_ps=time_ps, deps=[f"{seg}/md"],
                                   tag={"strategy": "adaptive", "iteration": i})
        record["selection"] = "watch" if select.endswith("/select") else "periodic"
        segments.append(record)
        lab = label_stage(state, config, f"{seg}/label", frames=frames["frames"], deps=[select])
        record.update(labels=lab["n_labelled"], labelled_steps=frames["steps"])
        labelled.append(lab["labelled"])
        models.append(_finetune_and_export(state, config, "adaptive", i, f"AD{i + 1}", labelled, models, elements))
        md_model = models[-1].lammps_model
        deps_md = [f"{seg}/md", f"export/AD{i + 1}"]
        previous_md = run["directories"][0]
        time_ps += steps_run * md.timestep_fs / 1000.0
    return StrategyResult("adaptive", models, segments, labelled)


def _halt_frames_stage(state: WorkflowState, config: WorkflowConfig, name: str, run: dict[str, Any], *,
                       iteration: int, time_offset_ps: float) -> dict[str, Any]:
    """The frames of a segment the watch stopped that are labelled (see :func:`run_adaptive`):
    flagged frames newest first, then dumped frames before the halt newest first, no step twice,
    no step 0, at most ``frames_per_segment``, written in step order. Flagged frames keep their
    per-atom Q columns (``watch_halt_ratio`` ...)."""
    trajectory, flagged = run["trajectories"][0], run["flagged"][0]
    inputs = {"trajectory": trajectory, "flagged": flagged, "n": config.frames_per_segment,
              "time_offset_ps": time_offset_ps, "iteration": iteration}

    def stage(folder: Path) -> dict[str, Any]:
        from ..io import read_frames, write_frames

        halt = run["watch"][0]["halted_at_step"]
        chosen: dict[int, Any] = {}
        sources = [(a, "watch-flagged") for a in reversed(_frames_or_none(absolute(state, flagged)))]
        sources += [(a, "before-halt") for a in reversed(read_frames(absolute(state, trajectory)))]
        for atoms, how in sources:
            step = int(atoms.info["step"])
            if len(chosen) >= config.frames_per_segment:
                break
            if step == 0 or step > halt or step in chosen:
                continue
            atoms = atoms.copy()
            atoms.calc = None
            atoms.info.update({"source_file": trajectory, "selection": how, "strategy": "adaptive",
                               "iteration": iteration, "run_time_ps": float(atoms.info["time_ps"]) + time_offset_ps})
            chosen[step] = atoms
        if not chosen:
            raise InputError(f"{name}: the watch stopped the segment at step {halt} but it holds no frame "
                             "after its start to label; dump more often (md.dump_every)")
        steps = sorted(chosen)
        path = write_frames(folder / "frames.extxyz", [chosen[s] for s in steps])
        return {"frames": rel(state, path), "n_frames": len(steps), "steps": steps,
                "selections": [chosen[s].info["selection"] for s in steps], "halted_at_step": halt,
                "sha256": sha256_file(path)}

    return state.run(name, inputs, stage, deps=[name.rsplit("/", 1)[0] + "/md"])


def _frames_or_none(path: Path) -> list:
    from ..io import read_frames

    return read_frames(path) if path.stat().st_size else []


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


STRATEGY_RUNNERS = {"periodic": run_periodic, "naive": run_naive, "control": run_control, "adaptive": run_adaptive}
