"""Peak memory and speed of ``analyze_trajectory`` (SOAP of the study, PCA, per-atom Q/T²) on a
synthetic 200-atom trajectory, for several lengths: a flat peak shows the analysis is bounded
by the batch, not by the trajectory.

The trajectory: frame 0 of the aqueous data (170 atoms) plus 10 water molecules (30 atoms) at
random free sites = 200 atoms (H130 O65 Li Co Cl3); each frame is that structure with Gaussian
displacements (0.1 Å), written as extxyz. Each length runs in a fresh process and reports its
VmHWM (peak resident memory of the whole Python process with numpy, DScribe, scikit-learn) from
/proc/self/status; not ru_maxrss, which Linux carries over exec from the forking parent.

    PYTHONPATH=python .venv/bin/python benchmarks/analysis_memory.py --frames 100 1000 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aqueous-licl-cocl2"


def build_frame(seed: int = 0):
    from ase import Atoms
    from ase.io import read

    atoms = read(SHARED / "single_points" / "Finetuning__Periodic__U__dft.extxyz", index=0)
    atoms.calc = None
    for key in list(atoms.arrays):
        if key not in ("numbers", "positions"):
            del atoms.arrays[key]
    atoms.info = {}
    rng = np.random.default_rng(seed)
    water = np.array([[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])
    while len(atoms) < 200:
        site = rng.random(3) @ atoms.cell.array
        trial = Atoms("OH2", positions=water + site)
        probe = atoms + trial
        dist = probe.get_all_distances(mic=True)[-3:, :-3]
        if dist.min() > 1.6:
            atoms += trial
    return atoms


def write_trajectory(path: Path, n_frames: int, base) -> None:
    from ase.io import write

    rng = np.random.default_rng(1)
    with open(path, "w") as handle:
        for _ in range(n_frames):
            frame = base.copy()
            frame.positions += rng.normal(0.0, 0.1, frame.positions.shape)
            write(handle, frame, format="extxyz")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(args: argparse.Namespace) -> None:
    from umlipft.analysis.monitor import QConfig, analyze_trajectory
    from umlipft.analysis.pca import DescriptorPCA

    pca = DescriptorPCA.load(args.pca)
    start_rss = peak_rss_mib()
    t0 = time.perf_counter()
    result = analyze_trajectory(pca, args.traj, args.out, QConfig(batch_frames=args.batch_frames))
    wall = time.perf_counter() - t0
    print(json.dumps({"frames": result.summary["n_frames"], "atoms": result.summary["n_atoms"],
                      "wall_s": wall, "s_per_frame": wall / result.summary["n_frames"],
                      "rss_before_analysis_MiB": start_rss, "peak_rss_MiB": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--batch-frames", type=int, default=4)
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pca", help=argparse.SUPPRESS)
    parser.add_argument("--traj", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from umlipft.analysis.descriptors import make_descriptor
    from umlipft.analysis.pca import DescriptorPCA

    work = Path(args.workdir or tempfile.mkdtemp(prefix="umlipft-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    base = build_frame()
    fit = [base.copy() for _ in range(3)]
    rng = np.random.default_rng(2)
    for f in fit:
        f.positions += rng.normal(0.0, 0.1, f.positions.shape)
    descriptor = make_descriptor("soap", fit)
    x = np.vstack(descriptor.compute(fit))
    symbols = np.concatenate([f.get_chemical_symbols() for f in fit])
    DescriptorPCA.fit(x, symbols, descriptor.settings(), 5).save(work / "pca")
    rows = []
    for n in args.frames:
        traj = work / f"traj_{n}.extxyz"
        if not traj.exists():
            write_trajectory(traj, n, base)
        out = subprocess.run([sys.executable, __file__, "--child", "--pca", str(work / "pca"), "--traj", str(traj),
                              "--out", str(work / f"q_{n}"), "--batch-frames", str(args.batch_frames)],
                             check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["trajectory_MiB"] = traj.stat().st_size / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
    per_frame = rows[-1]["s_per_frame"]
    peaks = ", ".join("{}: {:.0f} MiB".format(r["frames"], r["peak_rss_MiB"]) for r in rows)
    print(f"descriptor width {descriptor.n_features}; extrapolated 10,000 frames: "
          f"{10000 * per_frame / 60:.1f} min at {per_frame:.3f} s/frame; peak RSS by length {peaks}")


if __name__ == "__main__":
    main()
