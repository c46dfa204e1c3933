#!/usr/bin/env python
"""Cost of the in-run extrapolation watch (``compute mace/q``) on an MD step.

One export with a watch (MACE-MP-0 small, optimised, float64 unless ``--dtype``; the watch fitted
on the study's naive 11-point set), the 170-atom aqueous frame, NVE. Measured side by side,
interleaved over ``--repeats`` rounds so that a shared machine's load hits every case alike:

- ``off``: no compute (the export's watch is never read);
- ``every10``: the halting statistic sampled every 10 steps (``fix ave/time 10 1 10 c_q``, as
  ``lammps_inputs/watch.in`` does with its default ``watch_every``);
- ``every1``: sampled every step.

Prints ms/step (median over rounds), the wall-time overheads against ``off`` (noisy on a shared
machine) and the watch's own cost: the time LAMMPS' timer puts in the fixes (where fix ave/time
invokes the compute) above ``off``'s, as a fraction of the step. ``--json OUT`` writes
``off_ms``, ``every1_ms``, ``every10_ms``, ``overhead_every1``, ``overhead_every10``,
``watch_cost_every1``, ``watch_cost_every10``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "mace-mp-0-small.model"
DEFAULT_FRAMES = SHARED / "data" / "aqueous-licl-cocl2" / "single_points" / "Evaluations__U__dft.extxyz"
DEFAULT_TRAIN = SHARED / "data" / "aqueous-licl-cocl2" / "training_sets" / \
    "Finetuning__Naive__Finetuned_Models__11pts__11pt_dataset.xyz"
ELEMENTS = ["Li", "Co", "Cl", "O", "H"]
LOOP_TIME = re.compile(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps")
# LAMMPS' timer: the fixes' share of the loop, where fix ave/time invokes the compute.
MODIFY_TIME = re.compile(r"^Modify\s+\|\s*([0-9.eE+-]+)", re.M)
CASES = {"off": "", "every10": "fix sample all ave/time 10 1 10 c_q", "every1": "fix sample all ave/time 1 1 1 c_q"}


def run(case: str, data: Path, model: Path, steps: int, workdir: Path) -> tuple[float, float]:
    """(ms per step, ms per step in fixes: the watch's own cost, read off LAMMPS' timer)."""
    from umlipft.lammps import lammps_environment, lmp_executable

    script = workdir / f"in.{case}"
    watch = ["compute q all mace/q", CASES[case]] if CASES[case] else []
    script.write_text("\n".join([
        "units metal", "atom_style atomic", f"read_data {data}", "pair_style mace",
        f"pair_coeff * * {model} {' '.join(ELEMENTS)}", *watch,
        "velocity all create 300 4928459", "fix nve all nve", "timestep 0.0005", "thermo 1000",
        "run 2", f"run {steps}", ""]))
    env = dict(lammps_environment(), OMP_NUM_THREADS="1")
    done = subprocess.run([str(lmp_executable()), "-in", str(script), "-log", "none"], cwd=workdir, env=env,
                          capture_output=True, text=True, check=False)
    loops = LOOP_TIME.findall(done.stdout)
    if done.returncode != 0 or len(loops) < 2:
        raise RuntimeError(f"lmp failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    seconds, nsteps = loops[-1]
    modify = float(MODIFY_TIME.findall(done.stdout)[-1])
    return 1000.0 * float(seconds) / int(nsteps), 1000.0 * modify / int(nsteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from ase.io import read

    from umlipft.lammps import write_lammps_data
    from umlipft.models.export import ExportConfig, export_lammps_model

    workdir = Path(tempfile.mkdtemp(prefix="watch-overhead-"))
    data = write_lammps_data(workdir / "start.data", read(DEFAULT_FRAMES, 0), ELEMENTS)
    model = export_lammps_model(ExportConfig(model=str(DEFAULT_MODEL), output=str(workdir / "watch.pt"),
                                             dtype=args.dtype, elements=("H", "Li", "O", "Cl", "Co"),
                                             watch=str(DEFAULT_TRAIN)))
    times: dict[str, list[float]] = {case: [] for case in CASES}
    fixes: dict[str, list[float]] = {case: [] for case in CASES}
    for round_ in range(args.repeats):
        for case in CASES:
            step, fix = run(case, data, model, args.steps, workdir)
            times[case].append(step)
            fixes[case].append(fix)
            print(f"  round {round_ + 1}: {case}: {step:.1f} ms/step, of which fixes {fix:.3f} ms", flush=True)
    result = {f"{case}_ms": statistics.median(values) for case, values in times.items()}
    result.update({f"{case}_fixes_ms": statistics.median(values) for case, values in fixes.items()})
    # Wall-time ratios carry the machine's noise; the timer's fix share is the watch's own cost.
    result["overhead_every1"] = result["every1_ms"] / result["off_ms"] - 1.0
    result["overhead_every10"] = result["every10_ms"] / result["off_ms"] - 1.0
    for case in ("every1", "every10"):
        result[f"watch_cost_{case}"] = (result[f"{case}_fixes_ms"] - result["off_fixes_ms"]) / result["off_ms"]
    result["dtype"] = args.dtype
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    result["uptime"] = uptime
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
