"""Run one or several strategies in a workflow directory, judge the models, write the report."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, StateError
from ..io import atomic_write_text
from ..lock import locks_workflow
from ..summary import RunSummary
from .config import STRATEGIES, WorkflowConfig
from .plan import check_plan
from .state import Deferred, WorkflowState, _Stop
from .strategies import STRATEGY_RUNNERS, StrategyResult

CONFIG_FILE = "workflow.yaml"
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class WorkflowOutcome:
    directory: Path
    strategies: tuple[str, ...]
    finished: bool  # False when stopped by --until
    report_json: Path | None
    report_html: Path | None
    wall_time_s: float


def _log(message: str) -> None:
    print(f"[umlipft workflow {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@locks_workflow  # one run per directory; parallel branch jobs (only) each hold their groups
def run_workflow(strategies: Sequence[str], config: WorkflowConfig, directory: str | Path, *,
                 from_stage: str | None = None, until: str | None = None, judge: bool = True,
                 log: Callable[[str], None] | None = _log, only: Sequence[str] | None = None) -> WorkflowOutcome:
    """Run ``strategies`` (in order) in ``directory`` and judge their models; resumable.
    ``only``: run no unfinished stage outside these groups (a batch job of one branch)."""
    from .judge import judge as judge_models

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}")
    directory = Path(directory).resolve()
    # The whole plan is checked before the first stage: a plan --check refuses creates nothing.
    plan = check_plan(strategies, config)
    plan.raise_if_problems()
    state = WorkflowState(directory, from_stage=from_stage, until=until, log=log, only=only)
    _record_config(state, config, strategies)
    atomic_write_text(directory / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))
    if log:
        log(f"E0 policy: {plan.e0_policy} ({plan.e0_reason}); {plan.finetune_mode}")
        for warning in plan.warnings:
            log(f"warning: {warning}")
    summary = RunSummary("workflow", config, seed=config.seed)
    results: dict[str, StrategyResult] = {}
    finished = False
    report: dict[str, Any] = {}
    blocked: str | None = None
    try:
        with summary.timed("strategies"):
            if config.parallel_stages > 1 and len(strategies) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=config.parallel_stages) as pool:
                    futures = {s: pool.submit(STRATEGY_RUNNERS[s], state, config) for s in strategies}
                    results = {s: futures[s].result() for s in strategies}
            else:
                for strategy in strategies:
                    results[strategy] = STRATEGY_RUNNERS[strategy](state, config)
        if judge:
            with summary.timed("judge"):
                report = judge_models(state, config, results)
        finished = True
    except _Stop as stop:
        blocked = stop.stage if isinstance(stop, Deferred) else None
        if log:
            log(f"stopped after stage {until} (--until)" if state.reached_until or not blocked
                else f"stopped at stage {blocked}: another job runs it (--only)")
    if only and until and not state.reached_until:
        raise StateError(f"--until {until} was not reached: stage {blocked or '(none)'} is not finished and "
                         f"belongs to another job (--only {' '.join(only)}); run the jobs it depends on first "
                         "(DIR/slurm/submit.sh submits them in order)")
    wall = time.perf_counter() - summary._t0
    summary.results = {"strategies": list(strategies), "finished": finished, "directory": str(directory),
                       "stages": {k: v.get("wall_s") for k, v in state.data["stages"].items()}, **report}
    summary.write(directory / "summary.json", status="finished" if finished else "partial")
    outcome = WorkflowOutcome(directory, tuple(strategies), finished,
                              directory / report["report_json"] if report else None,
                              directory / report["report_html"] if report else None, wall)
    if log and outcome.report_html:
        log(f"done in {wall:.0f} s; report: {outcome.report_html}")
    return outcome


def _record_config(state: WorkflowState, config: WorkflowConfig, strategies: Sequence[str]) -> None:
    """Keep the resolved configuration beside the state (what the stages were run with)."""
    import yaml

    values = config.to_dict()
    path = state.root / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump({"strategies": list(strategies), **values}, sort_keys=False))
    previous = state.data.get("profile")
    if previous and previous != config.profile:
        raise StateError(f"{state.root} holds a workflow of profile {previous}; this one is {config.profile}. "
                         "Choose another directory")
    if not previous:
        state.data["profile"] = config.profile
        state.save()


def counts(directory: str | Path) -> dict[str, Any]:
    """Labeller and trainer calls recorded in a workflow directory (for restart checks):
    per label stage, how often each frame was attempted (from the labeller's own per-frame
    records) and which frames each call labelled; per fine-tune, how many training runs started
    and how many trainings completed."""
    from ..label import attempts

    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    out: dict[str, Any] = {"label_attempts": {}, "labelled_by_call": {}, "training_runs": {}, "trainings_finished": {}}
    for name in state["stages"]:
        work = directory / name / "work"
        if name.endswith("/label") and work.is_dir():
            frames = sorted(p for p in work.glob("frame_*") if p.is_dir())
            out["label_attempts"][name] = [attempts(work, int(p.name.split("_")[1])) for p in frames]
        log = directory / name / "model" / "mace" / "umlipft-train.log"
        if log.is_file():
            out["training_runs"][name] = sum(1 for line in log.read_text().splitlines() if line.startswith("$ "))
    journal = directory / "journal.jsonl"
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9 while being written
                continue
            if event["event"] == "label_call":
                out["labelled_by_call"].setdefault(event["stage"], []).append(event["labelled"])
            elif event["event"] == "finetune_return" and not event["skipped"]:
                out["trainings_finished"][event["stage"]] = out["trainings_finished"].get(event["stage"], 0) + 1
    return out
