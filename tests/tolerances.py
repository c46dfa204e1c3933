"""Every numeric tolerance the tests use, in one place, with the reason for its size."""

# pair_style mace against mace-torch's ASE calculator, float64: both evaluate the same graph;
# differences are summation order only.
PLUGIN_FP64_ENERGY_EV = 1e-6
PLUGIN_FP64_FORCE_EV_A = 1e-6
PLUGIN_FP64_STRESS_EV_A3 = 1e-7
# One rank against two ranks: same model, different graph partition, summation order only.
PLUGIN_MPI_EV = 1e-8
# Several ranks (layer-by-layer halo exchange) against one rank, float64.
PLUGIN_HALO_EV = 1e-8
PLUGIN_HALO_POSITION_A = 1e-6  # first 50 MD steps
PLUGIN_HALO_DRIFT_EV_PER_ATOM = 1e-6  # |drift(N ranks) - drift(1 rank)| over 200 steps
# The same in float32: ~1e-7 relative rounding of sums in another order; |E| of the 170-atom
# frame is ~1e3 eV, atom energies ~5 eV, forces and per-atom virials ~1-10 eV(/A).
PLUGIN_HALO_FP32 = {"energy": 1e-3, "virial": 1e-3, "forces": 1e-4, "atom_energy": 1e-4, "atom_virial": 1e-4}
# float32 export against mace-torch float32: same arithmetic precision, different reduction order.
PLUGIN_FP32_FORCE_EV_A = 1e-4
# Evaluation against the reference figures for MACE-MP-0 small, fp64, on the 9 aqueous
# Evaluations__U frames: the figures are quoted to 2 (energy, meV/atom) and 3 (force, eV/Å)
# decimals, so agreement is to half a unit of the last quoted digit.
EVAL_REFERENCE_ENERGY_MEV_PER_ATOM = 0.005
EVAL_REFERENCE_FORCE_EV_A = 0.0005
# Two models that differ only in one E0 give energies that differ by exactly n_el * dE0; fp64
# evaluation noise is far below this (summation order only).
EVAL_E0_SHIFT_MEV_PER_ATOM = 1e-6
# Starting model of a fine-tune with the foundation's E0s: its energy error on the aqueous
# frames is that of MACE-MP-0 itself (about 1-3 meV/atom); the E0 trap would make it ~3600.
FINETUNE_MAX_START_ERROR_MEV_PER_ATOM = 10.0
# NVE, 0.5 fs, 200 steps (100 fs) of the CoCl2 crystal at 300 K in fp64: velocity Verlet's
# bounded fluctuation stays well below this; a force that is not -dE/dx drifts far more.
PLUGIN_NVE_DRIFT_EV_PER_ATOM = 2e-5  # measured 1.5e-6
# --- analysis (issue 4) ---
# Q/T² against a direct numpy eigendecomposition: with the default (ARPACK) or full solver both
# are the same decomposition up to rounding (1e-9 leaves room for 5,740-term sums).
PCA_DIRECT_REL = 1e-9
# scikit-learn's randomized solver (svd_solver="randomized"): 7 power iterations leave the trailing
# kept components of the SOAP spectrum off by ~1e-6 relative (measured 1.5e-6). A wrong mean,
# scaling or component changes Q or T² by more than 1e-2.
PCA_RANDOMIZED_REL = 1e-4
# Control-limit false-alarm rates on samples of the fitted Gaussian: JM and Liu-Tang-Zhang are
# moment approximations, accurate to roughly 10-20 % of alpha in the tail; allowed: 25 % of alpha
# plus 4 binomial standard deviations of the sample. A limit built from the wrong eigenvalues
# (e.g. kept instead of discarded, or a missing mean term) misses by factors, not percents.
CONTROL_LIMIT_REL = 0.25
CONTROL_LIMIT_BINOMIAL_SIGMAS = 4.0
# --- workflows (issue 5) ---
# Continuing a trajectory: LAMMPS writes the final data file and the dump at full precision
# (%.12g / write_data's %g of 16 digits); positions are compared modulo the cell after
# write_data wrapped them, velocities directly (Å/fs in ASE units, ~1e-2 at 300 K).
WORKFLOW_CONTINUITY_POSITION_A = 1e-6
WORKFLOW_CONTINUITY_VELOCITY = 1e-8
# A killed and resumed workflow against an uninterrupted one: the same seeds, the same
# single-threaded LAMMPS and a training restarted from epoch 0 give the same numbers up to the
# reduction order of multi-threaded xTB and torch (~1e-12 relative); float32 MD rounds such
# differences into the trajectory, and 10-20 steps later they show at ~1e-6 relative (measured
# 1.0e-6 on a long-run residual). A redone label, a resumed (not restarted) training or another
# seed changes the residuals in the first or second digit.
WORKFLOW_REPORT_TOL = 1e-4  # relative, absolute below 1
# --- finetune/evaluate, float32 (issue 3) ---
# Two models that differ only in one E0, evaluated in float32: each ~-825 eV total carries the
# rounding of float32 sums (ulp 6e-5 eV, a few ulps over 170 atoms: ~1e-3 meV/atom). The shift
# under test is 0.05 eV per H, about 32 meV/atom; a wrong pairing or count misses by >10.
EVAL_E0_SHIFT_FP32_MEV_PER_ATOM = 0.01
# The same force network in float32, evaluated twice (two models differing only in an E0):
# forces agree to float32 reduction-order noise (measured 8e-8 relative on a force RMSE of
# 0.05 eV/Å; threaded sums are not bitwise reproducible). A changed force field moves it by >1e-3.
EVAL_FP32_FORCE_RMSE_REL = 1e-5
# --- LAMMPS from Python (issue 12) ---
# ASE's LAMMPSlib against lmp, same fp64 export, same plugin, same frame: positions reach LAMMPS
# as doubles either way (scatter vs a %.17g data file), so only reduction order can differ
# (measured on the 170-atom aqueous frame: energy 0, forces 1.1e-13, stress 8e-17). A wrong type
# map or positions truncated to 1e-6 Å miss by orders of magnitude more.
LAMMPSLIB_VS_LMP_ENERGY_EV = 1e-9
LAMMPSLIB_VS_LMP_FORCE_EV_A = 1e-10
LAMMPSLIB_VS_LMP_STRESS_EV_A3 = 1e-12
# --- plan check (issue 11) ---
# A refused plan must come back before anything runs: the bound for the bad values,
# measured 0.6-1.5 s here (CLI start, config load, every stage's config built, preflights).
PLAN_CHECK_MAX_S = 20.0
# The study-shaped CP2K workflow's first fine-tune starts from the labeller's isolated-atom E0s
# plus a fitted per-element term: its predicted starting error is that fit's residual over two
# frames of one composition (~0); with the foundation's E0s it would be ~1e5 meV/atom.
CP2K_STUDY_MAX_START_ERROR_MEV_PER_ATOM = 50.0
# --- finetune reliability (issue 13) ---
# umlipft finetune against mace_run_train by hand, same data, split, settings and seed, float32:
# the same mace-torch code on the same batches; torch's threaded CPU sums are not bitwise
# reproducible from run to run (the initial validation loss of one model on one frame came out
# 0.0267606098, ...6117 and ...6135 in three runs), and two epochs at lr 0.005 grow that to
# 7e-6 relative (measured, 5 aqueous frames). Another validation frame changes the initial
# errors entirely; another frame order or optimiser setting moves them by percents (the issue's
# 9.66 vs 8.55 meV/atom).
FINETUNE_PARITY_REL = 1e-4
# A killed fine-tune trained again from epoch 0 against an uninterrupted one, float64, same
# seed and data: the same computation in another process (measured: identical weights, 0.0).
# Resuming from mace-torch's checkpoint instead (epoch 1 of 3, 4 tiny frames) left weights 0.019
# apart and the validation energy RMSE at 60 instead of 50 meV/atom.
FINETUNE_RESTART_WEIGHT_ABS = 1e-9
# --- fault injection (issue 13): kill -9 at random moments, rerun, compare with an uninterrupted run ---
# xTB (tblite, one thread) on the same frame in another worker process: the same arithmetic in
# the same order (measured: identical labels, 0.0). A frame labelled from another structure or
# with other settings differs by eV and tenths of eV/Å.
LABEL_RESUME_ENERGY_EV = 1e-9
LABEL_RESUME_FORCE_EV_A = 1e-9
# --- extrapolation watch (issue 15) ---
# watch_q (Q, Q/limit, T² from the export's JSON) against `umlipft analyze q --descriptor mace`:
# the same float64 features and the same PCA arithmetic, read back from JSON (repr round-trips
# exactly); only summation order can differ. A wrong mean, component or limit misses by >1e-3.
WATCH_VS_ANALYZE_Q_REL = 1e-6
WATCH_LAMMPS_VS_ANALYZE_Q_REL = 1e-6  # compute mace/q (float64 export) against analyze q
# LAMMPS resumed from its own restart file (positions, velocities and the thermostat's state in
# full precision) against the uninterrupted run, float64, one thread: measured identical thermo,
# trajectory and final frame (0.0); allowed: the reduction-order noise of another thread count.
# A resume from an older restart file or another seed moves T by kelvins and atoms by 1e-3 Å.
MD_RESUME_THERMO_REL = 1e-6
MD_RESUME_POSITION_A = 1e-8
# The final model of a fine-tune killed ten times and rerun against the uninterrupted one's, on
# its training frames, float64: the same training in another process (measured: identical
# weights, so identical predictions, 0.0); a resumed instead of restarted training moves them by
# 1e-3 eV and more (FINETUNE_RESTART_WEIGHT_ABS).
FINETUNE_KILL_PREDICTION_EV = 1e-8
