"""The smallest workflow that still exercises every stage (2 iterations, a few dozen MD steps,
1 epoch), shared by the end-to-end and verified-resume tests; ``{model}`` is the foundation file.

The energy weight is mace-torch's 1, not the quick profile's 100: the killed-and-resumed run is
compared with the uninterrupted one to 1e-6 relative (WORKFLOW_REPORT_TOL), which holds with 1; with
100 the retrained FT2's float32 test run differed by 3e-4 relative (max |residual| 14.615 vs 14.620
meV/atom), a difference not yet explained (the fine-tune driver's own kill test finds bit-equal
weights)."""

TINY = """\
profile: quick
foundation: {model}
iterations: 2
frames_per_segment: 2
naive_subsets: [2, 4]
seed: 11
system: {{system: aqueous, n_water: 6}}
md: {{segment_steps: 20, dump_every: 5, thermo_every: 5, restart_every: 10, dtype: float32}}
label: {{calculator: xtb}}
finetune: {{epochs: 1, batch_size: 1, e0s: estimated, energy_weight: 1.0}}
evaluation: {{test_steps: 10, test_frames: 1, long_steps: 10, long_label_every: 5}}
analysis: {{soap_n_max: 3, soap_l_max: 2, components: 2, coverage_bins: 8}}
adaptive: {{watch_every: 5, watch_patience: 2}}
"""
