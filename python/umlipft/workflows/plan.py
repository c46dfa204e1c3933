"""The plan of a workflow, checked before anything runs (``umlipft workflow ... --check``).

Two layers, both run before the first stage of every workflow run and by ``--check``:

- :func:`stage_config_problems` builds every stage's configuration (build, md, extract, label,
  fine-tune, export, evaluate) with the stages' own builders in :mod:`.stages` and the drivers'
  own config classes, so a value the stage would refuse after a day of MD is refused first, with
  the driver's message and range. It needs no files and no programs (it runs at every load).
- :func:`check_plan` adds what depends on this machine: the foundation resolves offline, the
  start structures exist, Packmol and the labeller are usable (program, basis and
  pseudopotential files, VASP/QE commands), the E0 policy fits the labeller, the replay file
  exists. It returns the resolved plan (stages, counts, lengths, labeller, E0 policy and why) and
  every problem at once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import DriverConfig
from ..errors import ConfigError, InputError, PlanError
from .config import WorkflowConfig

# Placeholders for the paths a stage only knows once it runs; no check here opens them.
_ROOT = "/workflow"
_START = f"{_ROOT}/start/00/start.extxyz"
_PREVIOUS = f"{_ROOT}/periodic/seg-00/md"
_TRAJECTORY = f"{_ROOT}/periodic/seg-00/md/md/trajectory.extxyz"


def _defaults(cls: type[DriverConfig]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _probe(cls: type[DriverConfig], values: Mapping[str, Any], names: Mapping[str, str] | str,
           fixed: Sequence[str] = ()) -> list[str]:
    """Build ``cls`` from ``values`` as the stage will; while the driver refuses, find the key
    whose default makes that refusal go away, report the refusal under the workflow key it comes
    from (``names``: stage key -> workflow key, or a section prefix), reset that key and build
    again, so that each bad value gets its own message. ``fixed`` keys are the stage's own
    (paths, names) and never the culprit."""
    defaults = {k: _plain(v) for k, v in _defaults(cls).items()}
    work = dict(values)
    out: list[str] = []
    for _ in range(len(work) + 1):
        try:
            cls.from_dict(work)
            return out
        except ConfigError as err:
            message = str(err)
        culprit = None
        for key, value in work.items():
            if key in fixed or key not in defaults or value == defaults[key]:
                continue
            try:
                cls.from_dict({**work, key: defaults[key]})
                culprit = key
            except ConfigError as err:
                culprit = key if str(err) != message else None
            if culprit:
                break
        if culprit is None:
            out.append(message)
            return out
        name = names.get(culprit, culprit) if isinstance(names, Mapping) else f"{names}.{culprit}"
        out.append(name + message[len(culprit):] if message.startswith(culprit + " ") else f"{name}: {message}")
        work[culprit] = defaults[culprit]
    return out


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, DriverConfig) else value


def stage_config_problems(config: WorkflowConfig) -> list[str]:
    """Every stage configuration the workflow will build, built now (see the module doc)."""
    from ..build import BuildConfig
    from ..evaluate.driver import EvaluateConfig
    from ..extract import ExtractConfig
    from ..finetune import FinetuneConfig
    from ..label import LabelConfig
    from ..md import MDConfig
    from ..models.export import ExportConfig
    from . import stages

    out: list[str] = []
    md, ev = config.md, config.evaluation
    if not config.system.structures:
        out += _probe(BuildConfig, stages.build_values(config, 0), "system")
    md_names = {key: f"md.{key}" for key in MDConfig.field_names()}
    md_names.update(velocities="md.segment_velocities", steps="md.segment_steps")
    output = f"{_ROOT}/md"
    runs = [
        (md_names, stages.md_values(config, output, model=config.foundation, steps=md.segment_steps, seed=md.seed,
                                    structures=[_START])),
        (md_names, stages.md_values(config, output, model=config.foundation, steps=md.segment_steps, seed=md.seed,
                                    continue_from=_PREVIOUS)),
        ({**md_names, "steps": "evaluation.test_steps", "seed": "evaluation.seed"},
         stages.md_values(config, output, model=config.foundation, steps=ev.test_steps, seed=ev.seed,
                          structures=[_START])),
    ]
    if ev.long_runs:
        runs.append(({**md_names, "steps": "evaluation.long_steps", "seed": "evaluation.seed"},
                     stages.md_values(config, output, model=config.foundation, steps=ev.long_steps, seed=ev.seed,
                                      continue_from=_PREVIOUS)))
    # the adaptive strategy's watched segments (umlipft md --watch-every; NVT)
    runs.append(({**md_names, "watch_every": "adaptive.watch_every", "watch_patience": "adaptive.watch_patience"},
                 stages.md_values(config, output, model=config.foundation, steps=md.segment_steps, seed=md.seed,
                                  continue_from=_PREVIOUS, watch=(config.adaptive.watch_every,
                                                                  config.adaptive.watch_patience))))
    for names, values in runs:
        # a watched run's NVT is the stage's own choice, never the culprit of a refusal
        own = ("ensemble",) if values.get("watch_every") else ()
        out += _probe(MDConfig, values, names, fixed=("output", "structure", "continue_from", "model", "elements",
                                                      "replicas", *own))
    segment_ps = md.segment_ps()
    test_ps = ev.test_steps * md.timestep_fs / 1000.0
    window_names = {"count": "frames_per_segment", "every_ns": "frames_per_segment", "start_ns": "md.segment_steps",
                    "stop_ns": "md.segment_steps", "method": "selection", "seed": "seed",
                    **{k: f"analysis.{k}" for k in ("soap_r_cut_A", "soap_n_max", "soap_l_max", "soap_sigma_A")}}
    for names, window, count, seed in (
            (window_names, segment_ps / 2, config.frames_per_segment, config.seed),
            ({**window_names, "count": "evaluation.test_frames", "every_ns": "evaluation.test_frames",
              "start_ns": "evaluation.test_steps", "stop_ns": "evaluation.test_steps", "seed": "evaluation.seed"},
             test_ps / 2, ev.test_frames, ev.seed)):
        values = stages.extract_values(config, _TRAJECTORY, start_ps=window,
                                       **stages.window_selection(config, window, count), seed=seed)
        out += _probe(ExtractConfig, values, names, fixed=("trajectory",))
    out += _probe(LabelConfig, stages.label_values(config, f"{_ROOT}/frames.extxyz", f"{_ROOT}/labelled.extxyz",
                                                    f"{_ROOT}/work"), "label",
                  fixed=("frames", "output", "workdir"))
    ft_names = {key: f"finetune.{key}" for key in FinetuneConfig.field_names()}
    ft_names.update(export_dtype="md.dtype", foundation="foundation")
    out += _probe(FinetuneConfig, stages.finetune_values(config, f"{_ROOT}/train.extxyz", config.foundation,
                                                         f"{_ROOT}/model", "FT1"), ft_names,
                  fixed=("train_file", "foundation", "output_dir", "name"))
    out += _probe(ExportConfig, stages.export_values(config, config.foundation, f"{_ROOT}/U.pt", None),
                  {"dtype": "md.dtype"}, fixed=("model", "output"))
    out += _probe(EvaluateConfig, {"models": [config.foundation], "frames": [f"{_ROOT}/labelled.extxyz"],
                                   "dtype": ev.dtype}, "evaluation", fixed=("models", "frames"))
    return list(dict.fromkeys(out))  # the same bad value refused by several stages: said once


# -------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Plan:
    """What a workflow will do, and whether it can, on this machine."""

    strategies: tuple[str, ...]
    config: WorkflowConfig
    elements: tuple[str, ...] = ()
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    e0_policy: str | None = None
    e0_reason: str = ""
    e0_isolated_atoms: bool = False
    finetune_mode: str = ""
    foundation_file: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise PlanError(self.problems)

    def text(self) -> str:
        return "\n".join(describe(self))

    def to_dict(self) -> dict[str, Any]:
        return {"strategies": list(self.strategies), "elements": list(self.elements), "problems": self.problems,
                "warnings": self.warnings, "e0_policy": self.e0_policy, "e0_reason": self.e0_reason,
                "e0_isolated_atoms": self.e0_isolated_atoms,
                "finetune_mode": self.finetune_mode, "foundation_file": self.foundation_file,
                "stages": stage_counts(self.strategies, self.config)}


def plan_elements(config: WorkflowConfig) -> tuple[tuple[str, ...], list[str]]:
    """Elements of the start structures (read) or of the box Packmol will build (from the
    molecule templates, without packing), and the problems found on the way."""
    from ..build.core import species_counts
    from ..build.molecules import template
    from ..md.run import default_elements, read_start_structure

    problems: list[str] = []
    frames = []
    for k, path in enumerate(config.system.structures):
        if not Path(path).is_file():
            problems.append(f"system.structures[{k}]: {path} does not exist")
            continue
        try:
            frames.append(read_start_structure(path))
        except InputError as err:
            problems.append(f"system.structures[{k}]: {err}")
    if not config.system.structures:
        from . import stages

        try:
            build = stages.build_config(config, 0)
        except ConfigError:
            return (), problems  # reported by the configuration check
        frames = [template(name) for name in species_counts(build)]
    if not frames:
        return (), problems
    return tuple(default_elements(frames)), problems


def _structures_needed(strategies: Sequence[str], config: WorkflowConfig) -> int:
    return config.iterations if "naive" in strategies else 1


def check_plan(strategies: Sequence[str], config: WorkflowConfig) -> Plan:
    """The plan and every problem this machine has with it (see the module doc)."""
    import shutil

    plan = Plan(tuple(strategies), config)
    try:
        config.validate()
    except PlanError as err:
        plan.problems += err.problems
    elements, problems = plan_elements(config)
    plan.elements = elements
    plan.problems += problems
    plan.problems += _foundation_problems(plan, config)
    if len(config.system.structures) < _structures_needed(strategies, config):
        from ..build.core import find_packmol

        try:
            find_packmol()
        except InputError as err:
            plan.problems.append(f"system: {err}")
    if elements:
        plan.problems += _labeller_problems(config, elements)
    _e0_policy(plan, config)
    ft = config.finetune
    if ft.replay_file:
        if not Path(ft.replay_file).is_file():
            plan.problems.append(f"finetune.replay_file: {ft.replay_file} does not exist; give the replay frames "
                                 "(labelled at the foundation's level of theory) or remove the key for plain "
                                 "fine-tuning")
        plan.finetune_mode = (f"multi-head replay (mace-torch), new frames weighted {ft.new_frames_weight:g}, "
                              f"replay frames {ft.replay_file}")
    else:
        plan.finetune_mode = "plain fine-tuning of every weight (no finetune.replay_file configured)"
    if "adaptive" in strategies and not ft.export_watch:
        plan.problems.append("finetune.export_watch is false, but the adaptive strategy runs every segment after "
                             "the first with the extrapolation watch of its model's export; set it to true (the "
                             "default) or leave adaptive out")
    plan.warnings += _warnings(strategies, config, elements)
    return plan


def _foundation_problems(plan: Plan, config: WorkflowConfig) -> list[str]:
    from ..models.foundation import FOUNDATION_NAMES, resolve_foundation_model

    try:
        plan.foundation_file = str(resolve_foundation_model(config.foundation))
    except InputError as err:
        message = f"foundation: {err}"
        if config.foundation in FOUNDATION_NAMES:
            message += (f". (On a connected machine mace-torch downloads it; compute nodes and this check never do. "
                        f"`umlipft models list` shows what is installed.)")
        return [message]
    return []


def _labeller_problems(config: WorkflowConfig, elements: Sequence[str]) -> list[str]:
    from ..label import calculators

    lab = config.label
    name = lab.calculator
    checks = {"cp2k": lambda: calculators.cp2k_preflight(lab.cp2k, elements),
              "xtb": lambda: calculators.xtb_preflight(lab.xtb, elements),
              "vasp": lambda: calculators.vasp_preflight(lab.vasp, elements),
              "espresso": lambda: calculators.espresso_preflight(lab.espresso, elements)}
    if name not in checks:
        return []  # an unknown labeller is reported by the configuration check
    try:
        checks[name]()
    except InputError as err:
        return [f"label ({name}): {err}"]
    return []


def _e0_policy(plan: Plan, config: WorkflowConfig) -> None:
    """The E0 policy the fine-tunes will use and why (``auto``: the labeller's default), and
    whether it fits the labeller: refused before any MD when it cannot give a sane start."""
    from ..finetune import e0

    policy = config.finetune.e0s
    calculator = config.label.calculator
    if calculator not in e0.LABELLERS or policy not in e0.E0_POLICIES:
        return  # reported by the configuration check
    if policy == "auto":
        plan.e0_policy, plan.e0_reason = e0.default_e0_policy(calculator)
    else:
        plan.e0_policy, plan.e0_reason = policy, "set in the configuration (finetune.e0s)"
    plan.e0_isolated_atoms = e0.e0_policy_needs_isolated_atoms(policy, calculator)
    plan.problems += [f"finetune.e0s: {p}" for p in e0.check_e0_policy(plan.e0_policy, calculator)]


def _warnings(strategies: Sequence[str], config: WorkflowConfig, elements: Sequence[str]) -> list[str]:
    from ..md.config import timestep_warning

    out = []
    md = config.md
    warning = timestep_warning(md.timestep_fs, elements)
    if warning:
        out.append(f"md: {warning}")
    if config.selection == "stride" and config.frames_per_segment > 1:
        intervals = md.segment_steps // 2 // md.dump_every
        if intervals % (config.frames_per_segment - 1):
            out.append(f"selection: stride: {config.frames_per_segment} frames over {intervals} dump intervals is "
                       "not an even stride; the frames nearest each stride point are taken")
    if "adaptive" in strategies and md.ensemble != "nvt":
        out.append(f"adaptive: the watched segments (1 and later) run NVT (lammps_inputs/watch.in has no barostat) "
                   f"in the box the previous segment ended with; md.ensemble {md.ensemble} applies to segment 0 and "
                   "to the tests")
    cores = os.cpu_count() or 1
    if config.parallel_stages * max(1, config.label.processes) > 2 * cores:
        out.append(f"parallel_stages x label.processes = {config.parallel_stages * config.label.processes} on "
                   f"{cores} cores: the runs will compete for them")
    if config.finetune.device == "cpu" and config.finetune.epochs * config.iterations * config.frames_per_segment > 20000:
        out.append("finetune.device: cpu for a study-sized fine-tune: expect days; use cuda on a GPU node")
    return out


# ---------------------------------------------------------------------------------- description
def stage_counts(strategies: Sequence[str], config: WorkflowConfig) -> dict[str, Any]:
    """Stages and their sizes, per strategy and for the judging."""
    md, ev = config.md, config.evaluation
    out: dict[str, Any] = {}
    for strategy in strategies:
        if strategy in ("periodic", "control", "adaptive"):
            # adaptive: at most (a segment the watch stops is shorter and may give fewer frames)
            out[strategy] = {"md_runs": config.iterations, "md_steps": config.iterations * md.segment_steps,
                             "labels": config.iterations * config.frames_per_segment,
                             "finetunes": config.iterations}
        elif strategy == "naive":
            out[strategy] = {"md_runs": config.iterations, "md_steps": config.iterations * md.segment_steps,
                             "labels": config.iterations * config.frames_per_segment,
                             "finetunes": len(config.subsets())}
    n_models = 1 + sum(v["finetunes"] for v in out.values())
    out["judge"] = {"self_consistent_runs": n_models if ev.self_consistent else 0,
                    "self_consistent_labels": n_models * ev.test_frames if ev.self_consistent else 0,
                    "long_runs": len(out) if ev.long_runs else 0,
                    "long_run_labels": (len(out) * (ev.long_steps // ev.long_label_every)) if ev.long_runs else 0}
    return out


def _time(steps: int, timestep_fs: float) -> str:
    fs = steps * timestep_fs
    for unit, scale in (("ns", 1e6), ("ps", 1e3)):
        if fs >= scale:
            return f"{fs / scale:g} {unit}"
    return f"{fs:g} fs"


# What each E0 policy predicts for the first fine-tune's starting model, before any label
# exists; each fine-tune then computes it on its own frames (see umlipft.finetune.e0).
EXPECTED_START_ERROR = {
    "foundation": "the foundation's own error on this chemistry (a few to tens of meV/atom for labels on its "
                  "training scale)",
    "isolated-atoms-fitted": "the residual of a per-element least-squares fit on the training frames: near 0 "
                             "meV/atom for one composition",
    "estimated": "the residual of a per-element least-squares fit on the training frames: near 0 meV/atom for "
                 "one composition",
    "isolated-atoms": "eV per atom (MACE-MP's E0s are fitted values, not isolated-atom energies)",
}


def describe(plan: Plan) -> list[str]:
    config = plan.config
    md, ev, ft = config.md, config.evaluation, config.finetune
    seg = _time(md.segment_steps, md.timestep_fs)
    lines = [f"plan: {' + '.join(plan.strategies)} (profile {config.profile})",
             f"  foundation U: {config.foundation}" + (f" ({plan.foundation_file})" if plan.foundation_file else ""),
             f"  elements: {' '.join(plan.elements) or '?'}",
             f"  MD: {md.ensemble.upper()} {md.temperature_K:g} K, {md.timestep_fs:g} fs, {md.dtype}; segments of "
             f"{md.segment_steps} steps ({seg}), dump every {md.dump_every} steps; continued segments "
             f"{'draw new velocities at ' + format(md.temperature_K, 'g') + ' K' if md.segment_velocities == 'create' else 'keep their velocities'}",
             f"  frames: {config.frames_per_segment} per segment from its second half, "
             + (f"on a fixed stride of {_time(md.segment_steps // 2 // max(1, config.frames_per_segment - 1), md.timestep_fs)}"
                if config.selection == "stride" else f"chosen by {config.selection} (seed {config.seed})"),
             f"  labeller: {config.label.calculator} ({config.label.processes} frame(s) at a time)",
             f"  E0 policy: {plan.e0_policy} — {plan.e0_reason}",
             f"  predicted starting error: {EXPECTED_START_ERROR.get(plan.e0_policy or '', 'decided from the data')}",
             "  E0s: " + ("the labeller's isolated-atom energies of every element, computed once (stage "
                          "e0/isolated-atoms) and shared by every fine-tune; " if plan.e0_isolated_atoms else "")
             + "each fine-tune predicts its starting error under every E0 policy from its labelled frames "
             "before training, refuses a start above finetune max_start_error_meV_per_atom, and records it "
             "in its summary",
             f"  fine-tuning: {plan.finetune_mode}; {ft.epochs} epochs, batch {ft.batch_size}, "
             f"start from {ft.start_from}, on {ft.device}"]
    counts = stage_counts(plan.strategies, config)
    for strategy in plan.strategies:
        c = counts[strategy]
        if strategy == "naive":
            lines.append(f"  naive: {config.iterations} independent trajectories of {seg}; {c['labels']} labels pooled; "
                         f"fine-tunes on subsets {', '.join(map(str, config.subsets()))} -> "
                         f"{', '.join(f'N-{n}pts' for n in config.subsets())}")
        elif strategy == "adaptive":
            ad = config.adaptive
            lines.append(f"  adaptive: one trajectory, {config.iterations} segments of at most {seg}: segment 0 as "
                         f"periodic's, then each with the latest model's extrapolation watch (NVT, checked every "
                         f"{ad.watch_every} steps, stopped after {ad.watch_patience} checks in a row outside its "
                         f"data); at most {c['labels']} labels (flagged frames and those before the stop, or "
                         f"periodic's frames where the watch did not fire); {c['finetunes']} fine-tunes (AD1 ...)")
        else:
            prefix = {"periodic": "FT", "control": "NP-"}[strategy]
            lines.append(f"  {strategy}: one trajectory, {config.iterations} segments of {seg} "
                         f"({_time(c['md_steps'], md.timestep_fs)} in all); {c['labels']} labels; "
                         f"{c['finetunes']} fine-tunes ({prefix}1 ...)")
    j = counts["judge"]
    if ev.self_consistent:
        lines.append(f"  judge: {j['self_consistent_runs']} self-consistent runs of {_time(ev.test_steps, md.timestep_fs)}, "
                     f"{ev.test_frames} frames each ({j['self_consistent_labels']} labels)")
    if ev.long_runs:
        lines.append(f"  long runs: {j['long_runs']} x {_time(ev.long_steps, md.timestep_fs)} more, labelled every "
                     f"{_time(ev.long_label_every, md.timestep_fs)} ({j['long_run_labels']} labels)")
    total_labels = sum(v.get("labels", 0) for k, v in counts.items() if k != "judge") + \
        j["self_consistent_labels"] + j["long_run_labels"]
    lines.append(f"  in all: {total_labels} reference labels")
    for w in plan.warnings:
        lines.append(f"  warning: {w}")
    if plan.problems:
        lines.append(f"{len(plan.problems)} problem(s):")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("plan OK")
    return lines
