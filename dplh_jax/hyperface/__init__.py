"""HyperFace multi-task face analysis trained with DP-SGD (the application).

Needs the ``faces`` extra (flax, tensorflow-datasets, orbax, ...). Built on
``dplh_jax.dp``; see docs/DESIGN.md for the data flow, model and losses.
"""
