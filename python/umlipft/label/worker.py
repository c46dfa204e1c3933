"""Label one frame in its own directory: ``python -m umlipft.label.worker FRAME_DIR PARENT_PID``.

Runs in a fresh process per frame so that a crash, a hang (the parent kills the process
group on timeout) or a leaked thread pool in one code cannot take the run down. Writes
``result.extxyz`` atomically on success, or ``status.json`` with the reason on failure.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

RESULT = "result.extxyz"
STATUS = "status.json"
TASK = "task.json"
INPUT = "input.extxyz"
ATTEMPTS = "attempts.log"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the labelling process dies (a killed job must not
    leave orphans that finish frames behind a rerun's back)."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def label_one(frame_dir: Path) -> None:
    import numpy as np
    from ase.io import read

    from ..io import REF_ENERGY_KEY, REF_FORCES_KEY, REF_STRESS_KEY
    from .core import _write_extxyz
    from .calculators import cp2k_check_output, make_calculator, prepare_atoms, wants_stress
    from .config import CODE_CONFIGS

    task = json.loads((frame_dir / TASK).read_text())
    name = task["calculator"]
    cfg = CODE_CONFIGS[name].from_dict(task["config"], source=str(frame_dir / TASK))

    atoms = read(frame_dir / INPUT, format="extxyz", parallel=False)
    prepared = prepare_atoms(name, cfg, atoms)
    calc = make_calculator(name, cfg, prepared, frame_dir)
    prepared.calc = calc
    periodic = wants_stress(atoms)
    try:
        energy = float(prepared.get_potential_energy())
        forces = np.array(prepared.get_forces(), dtype=float)
        stress = np.array(prepared.get_stress(voigt=False), dtype=float) if periodic else None
        if name == "cp2k":
            cp2k_check_output(frame_dir)
    finally:
        close = getattr(calc, "close", None)
        if callable(close):
            close()
    if not np.isfinite(energy) or not np.isfinite(forces).all() or (
            stress is not None and not np.isfinite(stress).all()):
        raise RuntimeError(f"{name} returned non-finite energy, forces or stress")

    out = atoms.copy()
    out.calc = None
    for key in (REF_ENERGY_KEY, REF_STRESS_KEY):
        out.info.pop(key, None)
    out.info[REF_ENERGY_KEY] = energy
    out.arrays[REF_FORCES_KEY] = forces
    if stress is not None:
        # 9 numbers, row-major 3x3, eV/Å^3, ASE sign: the layout of the shared DFT data
        out.info[REF_STRESS_KEY] = stress.reshape(9)
    out.info["label_calculator"] = name
    _write_extxyz(frame_dir / RESULT, [out])


def main(argv: list[str]) -> int:
    frame_dir = Path(argv[0]).resolve()
    if len(argv) > 1:
        _die_with_parent(int(argv[1]))
    with open(frame_dir / ATTEMPTS, "a") as fh:
        fh.write(f"{time.time():.3f} pid={os.getpid()} host={socket.gethostname()} "
                 f"rank={os.environ.get('UMLIPFT_LABEL_RANK', '0')}\n")
    t0 = time.perf_counter()
    try:
        label_one(frame_dir)
    except Exception as err:  # any failure of the code is this frame's, recorded and skipped
        from ..io import atomic_write_text

        reason = f"{type(err).__name__}: {err}".strip()
        atomic_write_text(frame_dir / STATUS, json.dumps({
            "status": "failed", "reason": reason, "wall_s": time.perf_counter() - t0,
        }) + "\n")
        print(f"frame failed: {reason}", file=sys.stderr)
        return 3
    from ..io import atomic_write_text, sha256_file

    atomic_write_text(frame_dir / STATUS, json.dumps({
        "status": "done", "wall_s": time.perf_counter() - t0,
        "rank": int(os.environ.get("UMLIPFT_LABEL_RANK", "0")),
        "result_sha256": sha256_file(frame_dir / RESULT),  # a resume trusts exactly this file
    }) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
