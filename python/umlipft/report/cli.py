"""``umlipft report RUN_DIR``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="collect a run directory's figures and summaries into one HTML page",
        description="Write RUN_DIR/report.html with every figure (PNG/SVG, captions from their .json "
        "sidecars) and every run summary found under RUN_DIR. A workflow's report folder "
        "(report-<strategies>, with report.json) gets the workflow layout: the verdict table first, then "
        "the study's figures in the study's order.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("-o", "--output", help="HTML file (default RUN_DIR/report.html)")
    report.add_argument("--title")
    report.add_argument("--embed", action="store_true", help="embed images: one portable file")
    report.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from .html import build_report

    path = build_report(args.run_dir, args.output, args.title, args.embed)
    print(f"wrote {path}")
    return 0
