"""``umlipft finetune``."""

from __future__ import annotations

import argparse

from .e0 import E0_POLICIES, LABELLERS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a MACE foundation model with mace-torch and export it for LAMMPS",
        description="Fine-tune all weights of a foundation model (naive), or with --replay FILE "
        "mace-torch's multi-head replay fine-tuning, then export the model for pair_style mace. "
        "E0s (--e0s) default to auto: the foundation's fitted values for VASP labels, the labeller's "
        "own isolated-atom energies plus a fitted correction for CP2K, xTB or Quantum ESPRESSO "
        "labels (--isolated-atoms-file, from 'umlipft label --isolated-atoms'), decided from the "
        "data when the labeller is unknown; the summary records the choice and why. Isolated-atom "
        "frames are never trained on. Rerunning the same command does nothing when the fine-tune "
        "finished and trains an interrupted one again from epoch 1 (same seed, same model). A "
        "diverged training (non-finite loss) stops with an error and writes no model.",
    )
    parser.add_argument("--foundation", help="foundation model: a name (small, ...) or a .model file (default small)")
    parser.add_argument("--train", dest="train_file", help="labelled training frames (extxyz)")
    parser.add_argument("--valid", dest="valid_file", help="labelled validation frames (default: split from --train)")
    parser.add_argument("--replay", dest="replay_file",
                        help="replay frames at the foundation's level of theory: enables multi-head replay fine-tuning")
    parser.add_argument("-o", "--output-dir", help="output directory (default finetune)")
    parser.add_argument("--config", help="YAML file with FinetuneConfig keys; flags override it")
    parser.add_argument("--name", help="model name: OUT/NAME.model and OUT/NAME-lammps-DTYPE.pt (default finetuned)")
    parser.add_argument("--e0s", choices=E0_POLICIES,
                        help="per-element reference energies: auto (default, per labeller), the foundation's, "
                        "the labeller's isolated-atom energies plus a fitted correction (isolated-atoms-fitted), "
                        "mace-torch's least-squares estimate, or the isolated-atom energies alone")
    parser.add_argument("--isolated-atoms-file", dest="isolated_atoms_file",
                        help="IsolatedAtom frames with the labeller's isolated-atom energies "
                        "(umlipft label --isolated-atoms writes DIR/isolated_atoms.extxyz)")
    parser.add_argument("--labeller", choices=LABELLERS,
                        help="code of the reference labels, for --e0s auto (default: the frames' "
                        "label_calculator, written by umlipft label)")
    parser.add_argument("--accept-large-start-error", action="store_true", default=None,
                        help="train even if the starting model's energy error exceeds --max-start-error")
    parser.add_argument("--max-start-error", dest="max_start_error_meV_per_atom", type=float,
                        help="largest acceptable starting energy RMSE, meV/atom (default 100)")
    parser.add_argument("--epochs", type=int, help="epochs (default 100)")
    parser.add_argument("--batch-size", type=int, help="frames per batch (default 4)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3 naive, 1e-4 replay)")
    parser.add_argument("--energy-weight", type=float)
    parser.add_argument("--forces-weight", type=float)
    parser.add_argument("--stress-weight", type=float)
    parser.add_argument("--new-frames-weight", type=float, help="weight of the new frames in replay mode (default 10)")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="training precision (default float64)")
    parser.add_argument("--export-dtype", choices=("float32", "float64"), help="precision of the LAMMPS export (default float64)")
    parser.add_argument("--no-export", dest="export", action="store_false", default=None)
    parser.add_argument("--no-export-watch", dest="export_watch", action="store_false", default=None,
                        help="export without the extrapolation watch (by default it is fitted on the training frames)")
    parser.add_argument("--mace-plots", dest="mace_plots", action="store_true", default=None,
                        help="let mace-torch plot the fit after training (evaluates every frame once more)")
    parser.add_argument("--resume-from-checkpoint", dest="resume_from_checkpoint", action="store_true", default=None,
                        help="continue an interrupted fine-tune from mace-torch's checkpoint (cheaper, but the "
                        "model differs from an uninterrupted run's; default: train it again from epoch 1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument("--energy-key")
    parser.add_argument("--forces-key")
    parser.add_argument("--stress-key")
    parser.set_defaults(func=_run)


_KEYS = ("foundation", "train_file", "valid_file", "replay_file", "output_dir", "name", "e0s",
         "isolated_atoms_file", "labeller",
         "accept_large_start_error", "max_start_error_meV_per_atom", "epochs", "batch_size", "lr",
         "energy_weight", "forces_weight", "stress_weight", "new_frames_weight", "dtype",
         "export_dtype", "export", "export_watch", "mace_plots", "seed", "device", "resume_from_checkpoint",
         "energy_key", "forces_key", "stress_key")


def _run(args: argparse.Namespace) -> int:
    from .driver import FinetuneConfig, finetune

    overrides = {key: getattr(args, key) for key in _KEYS}
    if args.config:
        config = FinetuneConfig.from_yaml(args.config, **overrides)
    else:
        config = FinetuneConfig.from_dict({k: v for k, v in overrides.items() if v is not None},
                                          source="command line")
    result = finetune(config, log_progress=True)
    if result.skipped:
        print(f"{result.output_dir} already holds this finished fine-tune; nothing to do")
    e0 = result.e0
    print(f"E0s: {e0['policy']} (predicted starting error {e0['chosen_start_rmse_meV_per_atom']:.1f} meV/atom; "
          f"{e0['isolated_atom_frames_dropped']} isolated-atom frames not trained on)")
    if e0.get("reason"):
        print(f"  why: {e0['reason']}")
    table = ", ".join(f"{p} {v['rmse_meV_per_atom']:.1f}" for p, v in e0.get("start_errors", {}).items())
    if table:
        print(f"  predicted starting error by policy (meV/atom): {table}")
    print(result.describe_validation())
    print(f"wrote {result.model_path}" + (f" and {result.lammps_model_path}" if result.lammps_model_path else ""))
    return 0
