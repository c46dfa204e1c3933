"""Fine-tuning of MACE foundation models with mace-torch's own training, E0 trap guarded."""

from .driver import EpochProgress, FinetuneConfig, FinetuneResult, finetune, mace_arguments
from .e0 import E0_POLICIES, E0Decision, decide_e0s, foundation_e0s, isolated_atom_energies

__all__ = [
    "E0Decision",
    "E0_POLICIES",
    "EpochProgress",
    "FinetuneConfig",
    "FinetuneResult",
    "decide_e0s",
    "finetune",
    "foundation_e0s",
    "isolated_atom_energies",
    "mace_arguments",
]
