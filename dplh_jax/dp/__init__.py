"""The DP-SGD core: depends on jax, optax, numpy, scipy and dp-accounting only.

Modules (one concern each): ``dp_transform`` (the optax clip-and-noise
transform), ``clipped_sum`` (``ClippedSum``), ``clip_plan`` (flat, per-group
or adaptive clipping of each example), ``group_clipping`` (per-group clip
norms), ``adaptive_clipping`` (a private quantile moves C), ``clip_norms`` (norms that neither underflow nor
overflow, the clipping rule), ``per_example`` (vmap per-example gradients,
microbatching), ``one_pass_clipping`` (ghost / book-keeping clipping of Flax
models; needs flax; ``one_pass_probe`` checks what it can handle),
``batch_selection`` (Poisson sampling, padding), ``batch_iterator``
(padded batches with their mask for the planned steps), ``private_setup``
(``make_private``: transform, sampler and plan in one call),
``private_state`` (its state: only planned, in-order updates released),
``accounting`` (dp-accounting on top), ``privacy_plan`` (sigma and steps
within a budget), ``privacy_report`` (the report and its recomputation),
``noise_keys`` (secret keys, seed provenance), ``run_binding`` (a workdir
bound to its config and counters, one process at a time), ``audit``
(one-run epsilon lower bounds), ``gradient_canaries`` (the white-box
one-run audit of the mechanism with gradient canaries),
``gradient_canary_simulation`` (that audit run on the aggregation alone, with
the hook for broken variants),
``sensitivity_audit`` (an attacker's check of
sensitivity C on random Flax models; needs flax).

Nothing here imports the face application (``dplh_jax.hyperface``).
"""
