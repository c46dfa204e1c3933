#!/usr/bin/env python
"""Fine-tuning epoch time: mace-torch training with and without umlipft's malloc setting.

The fused kernels of the optimised export serve MD only (first derivatives; training on forces
differentiates twice), so what fine-tuning shares with the MD speed-up is the allocator: glibc
maps every large tensor afresh and returns freed heap each step, and the training subprocess
page-faults its working set in again every batch. ``umlipft finetune`` starts mace-torch with
``GLIBC_TUNABLES`` set as ``pair_style mace`` does with mallopt; this runs the same small
fine-tune twice, side by side, with the setting and with ``UMLIPFT_NO_MALLOC_TUNING=1``.

    python benchmarks/finetune_epoch.py [--epochs 3] [--frames 10] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "mace-mp-0-small.model"
DEFAULT_TRAIN = (SHARED / "data" / "aqueous-licl-cocl2" / "training_sets"
                 / "Finetuning__Naive__Finetuned_Models__11pts__11pt_dataset.xyz")


def run(train: Path, model: Path, workdir: Path, epochs: int, dtype: str, tuned: bool) -> list[float]:
    from umlipft.finetune.driver import FinetuneConfig, finetune

    if tuned:
        os.environ.pop("UMLIPFT_NO_MALLOC_TUNING", None)
    else:
        os.environ["UMLIPFT_NO_MALLOC_TUNING"] = "1"
    out = workdir / ("tuned" if tuned else "default")
    result = finetune(FinetuneConfig(train_file=str(train), foundation=str(model), output_dir=str(out),
                                     epochs=epochs, dtype=dtype, export=False, valid_fraction=0.2))
    return list(result.epoch_times_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.pop("GLIBC_TUNABLES", None)
    workdir = Path(tempfile.mkdtemp(prefix="umlipft-ft-bench-"))
    times = {}
    for tuned in (False, True):
        name = "with_malloc_setting" if tuned else "glibc_default"
        times[name] = run(args.train, args.model, workdir, args.epochs, args.dtype, tuned)
        print(f"  {name:22s} epochs (s): {' '.join(f'{t:.1f}' for t in times[name])}", flush=True)
    # The first epoch includes mace-torch's start-up evaluation: later epochs are the steady state.
    steady = {k: statistics.median(v[1:] or v) for k, v in times.items()}
    ratio = steady["glibc_default"] / steady["with_malloc_setting"]
    print(f"\nsteady epoch: glibc default {steady['glibc_default']:.1f} s, with the setting "
          f"{steady['with_malloc_setting']:.1f} s: {ratio:.2f}x ({args.dtype}, {args.threads} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps({"epoch_times_s": times, "steady_epoch_s": steady,
                                               "speedup": ratio, "dtype": args.dtype,
                                               "threads": args.threads}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
