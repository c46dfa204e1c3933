"""Every numeric tolerance the tests use, in one place, with the reason for its size."""

# pair_style mace against mace-torch's ASE calculator, float64: both evaluate the same graph;
# differences are summation order only.
PLUGIN_FP64_ENERGY_EV = 1e-6
PLUGIN_FP64_FORCE_EV_A = 1e-6
PLUGIN_FP64_STRESS_EV_A3 = 1e-7
# One rank against two ranks: same model, different graph partition, summation order only.
PLUGIN_MPI_EV = 1e-8
# float32 export against mace-torch float32: same arithmetic precision, different reduction order.
PLUGIN_FP32_FORCE_EV_A = 1e-4
