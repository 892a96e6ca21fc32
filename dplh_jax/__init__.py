"""dplh-jax: differentially private multi-task face learning in JAX."""
