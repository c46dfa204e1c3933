"""The README's reliability table from a real run of the kill -9 trials.

    .venv/bin/python scripts/fault_injection_table.py            # run the trials, then print the table
    .venv/bin/python scripts/fault_injection_table.py --all      # every test of those files (--durations)
    .venv/bin/python scripts/fault_injection_table.py --no-run   # the table of the last run

The trials (tests/reliability/test_kill_*.py, ``-k kill_9``) write their tallies to
``$UMLIPFT_FAULT_INJECTION_JSON``; this script points it at benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / "results" / "fault_injection.json"
KINDS = ("md", "label", "finetune", "workflow")
TESTS = [f"tests/reliability/test_kill_{kind}.py" for kind in KINDS]


def run(path: Path, everything: bool = False) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    env = dict(os.environ, UMLIPFT_FAULT_INJECTION_JSON=str(path))
    t0 = time.monotonic()
    select = ["--durations=0"] if everything else ["-k", "kill_9"]
    done = subprocess.run([sys.executable, "-m", "pytest", *TESTS, *select, "-q", "-s", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["_run"] = {"pytest_exit": done.returncode, "wall_s": round(time.monotonic() - t0, 1),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg()}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return done.returncode


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = ["| stage kind | trials | survived | frames lost | silent wrong results | finished work redone | "
            "orphans | uninterrupted run / chain (s) |", "|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        t = data.get(kind)
        if t is None:
            rows.append(f"| {kind} | not run | | | | | | |")
            continue
        rows.append(f"| {kind} | {t['trials']} | {t['survived']} | {t['frames_lost']} | {t['silent_wrong']} | "
                    f"{t['repeated_work']} | {t['orphans']} | {t['reference_s']:.0f} / {t['chain_s']:.0f} |")
    meta = data.get("_run", {})
    if meta:
        rows.append("")
        rows.append(f"(run {meta['date']}, pytest exit {meta['pytest_exit']}, {meta['wall_s']:.0f} s, "
                    f"load average {meta['load_average'][0]:.1f})")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=DEFAULT, help=f"tallies (default {DEFAULT.relative_to(ROOT)})")
    parser.add_argument("--no-run", action="store_true", help="print the table of the tallies already there")
    parser.add_argument("--all", action="store_true", help="run every test of the trial files, not only the trials")
    args = parser.parse_args()
    code = 0 if args.no_run else run(args.json, args.all)
    print(table(args.json))
    return code


if __name__ == "__main__":
    sys.exit(main())
