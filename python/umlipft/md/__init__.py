"""Molecular dynamics with LAMMPS and pair_style mace: single runs, continuations, MPI ensembles."""

from .config import MDConfig
from .run import ReplicaResult, prepare, run_md, run_md_mpi, run_replica

__all__ = ["MDConfig", "ReplicaResult", "prepare", "run_md", "run_md_mpi", "run_replica"]
