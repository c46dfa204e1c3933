"""``umlipft workflow``: the study's data-generation strategies end to end, one command each."""

from __future__ import annotations

import argparse

COMMANDS = {
    "periodic": ("periodic",),
    "naive": ("naive",),
    "control": ("control",),
    "adaptive": ("adaptive",),
    "compare": ("naive", "periodic"),
    "quick": ("naive", "periodic"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "workflow",
        help="run a fine-tuning strategy end to end (MD, extract, label, fine-tune, export, MD) and judge it",
        description="Run the study's strategies end to end in a workflow directory, judge the models "
        "(self-consistent residuals, long runs with cross-evaluation, events and Q(t), coverage maps) "
        "and write DIR/report/report.html. Rerunning the same command resumes after any interruption. "
        "'quick' is 'compare --profile quick': the naive-vs-periodic comparison on a small aqueous "
        "CoCl2 box with xTB labels, minutes on a laptop.",
    )
    parser.add_argument("strategy", choices=list(COMMANDS),
                        help="periodic | naive | control | adaptive | compare (naive + periodic) | quick")
    parser.add_argument("--config", help="workflow YAML (see examples/workflow-quick.yaml, workflow-study.yaml)")
    parser.add_argument("--profile", choices=("quick", "study"), help="defaults to start from (default: the "
                        "config's 'profile', else quick)")
    parser.add_argument("-o", "--output", help="workflow directory (default workflow-STRATEGY)")
    parser.add_argument("--strategies", nargs="+", help="for compare: the strategies to run and judge together")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE",
                        help="redo STAGE (e.g. periodic/seg-01/label, report) and every stage after it")
    parser.add_argument("--until", metavar="STAGE", help="stop after STAGE (stage-by-stage batch jobs)")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help="with --until, for batch jobs of parallel "
                        "branches: run no unfinished stage outside these groups (other jobs run them)")
    parser.add_argument("--no-judge", action="store_true", help="run the strategies only; no evaluation or report")
    parser.add_argument("--slurm", action="store_true",
                        help="write Slurm batch scripts for every stage into DIR/slurm and exit")
    parser.add_argument("--stages", action="store_true", help="list the stages and their status, then exit")
    parser.add_argument("--check", action="store_true",
                        help="check the whole plan (every stage's settings, the foundation, the labeller and its "
                        "files, the E0 policy) and print it, then exit: 0 if it can run, 2 with one message per "
                        "problem otherwise. Every run makes the same check before its first stage")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..errors import ConfigError, PlanError
    from .config import load_workflow_config

    profile = args.profile or ("quick" if args.strategy == "quick" else None)
    try:
        config = load_workflow_config(args.config, profile=profile)
    except PlanError:
        raise
    except ConfigError as err:  # a malformed file or key is a problem of the plan too: exit 2
        raise PlanError([str(err)]) from err
    strategies = tuple(args.strategies) if args.strategies and args.strategy == "compare" else COMMANDS[args.strategy]
    output = Path(args.output or f"workflow-{args.strategy}")
    if args.check:
        from .plan import check_plan

        plan = check_plan(strategies, config)
        print(plan.text())
        plan.raise_if_problems()
        return 0
    if args.stages:
        state_file = output / "state.json"
        if not state_file.is_file():
            print(f"{output}: no workflow state yet")
            return 0
        data = json.loads(state_file.read_text())
        for name in data["order"]:
            entry = data["stages"][name]
            print(f"{entry['status']:8s} {entry.get('wall_s', 0) or 0:9.1f} s  {name}")
        return 0
    if args.slurm:
        from .plan import check_plan
        from .slurm import write_slurm_scripts

        check_plan(strategies, config).raise_if_problems()

        submit = write_slurm_scripts(args.strategy, strategies, config, output, config_path=args.config,
                                     judge=not args.no_judge)
        print(f"wrote the batch scripts; submit them all with: bash {submit}")
        return 0
    from .runner import run_workflow

    outcome = run_workflow(strategies, config, output, from_stage=args.from_stage, until=args.until,
                           judge=not args.no_judge, only=args.only)
    if outcome.finished and outcome.report_html:
        print(f"report: {outcome.report_html}")
        print(f"numbers: {outcome.report_json}")
    elif not outcome.finished:
        print(f"stopped after {args.until}; rerun without --until to go on", file=sys.stderr)
    print(f"wall time: {outcome.wall_time_s:.0f} s")
    return 0
