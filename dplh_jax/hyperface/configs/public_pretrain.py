"""The default model trained without DP on public data: synthetic faces
rendered from another seed (``synthetic_faces/demo_public``), sharing no
image with the private ``synthetic_faces/demo``. A DP run starts from it with
``--config.init_params_from=WORKDIR`` at no privacy cost (public_init.py)."""

import ml_collections

from dplh_jax.hyperface.configs import nonprivate


def get_config() -> ml_collections.ConfigDict:
  config = nonprivate.get_config()
  config.dataset = 'synthetic_faces/demo_public'
  return config
