"""The DP core works without the face application's packages installed.

A subprocess makes flax, TFDS, TensorBoard, Orbax, Pillow, ml_collections
and matplotlib unimportable, then imports every core module (all but the two
that clip Flax models) and runs a DP step; ``dplh_jax.hyperface`` must not
be imported on the way.
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys
    BLOCKED = ('flax', 'tensorflow_datasets', 'tensorflow', 'tensorboard',
               'orbax', 'PIL', 'ml_collections', 'matplotlib')

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
          raise ModuleNotFoundError(f'blocked for this test: {name}')

    sys.meta_path.insert(0, Block())
    import jax, jax.numpy as jnp, numpy as np, optax
    import dplh_jax
    from dplh_jax.dp import (accounting, audit, batch_iterator,
                             batch_selection, clip_norms, dp_transform,
                             gradient_canaries, gradient_canary_simulation,
                             noise_keys, per_example, privacy_plan,
                             privacy_report, private_setup, run_binding)
    assert not any(m.startswith('dplh_jax.hyperface') for m in sys.modules)

    loss = lambda p, x: jnp.sum((p['w'] @ x - 1.0) ** 2)
    params = {'w': jnp.zeros((2, 3))}
    sampler = dplh_jax.PoissonSampler(20, 5, seed=0)
    data = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    batch = dplh_jax.gather_padded(data, sampler.sample())
    tx = dplh_jax.dpsgd(0.1, 1.0, 1.0, 5, key=0)
    state = tx.init(params)
    clipped = dplh_jax.clipped_grad_sum(loss, 1.0)(
        params, batch.data, is_padding_example=batch.is_padding_example)
    updates, state = tx.update(clipped, state, params)
    params = optax.apply_updates(params, updates)
    accountant = dplh_jax.PrivacyAccountant('rdp')
    accountant.compose(1.0, sampler.sampling_prob, 1)
    assert int(dplh_jax.dp_state(state).num_updates) == 1
    print('epsilon', accountant.epsilon(1e-5))
''')


def test_core_imports_and_runs_a_dp_step_without_the_application():
  out = subprocess.run([sys.executable, '-c', _SCRIPT], capture_output=True,
                       text=True, env=os.environ | {'JAX_PLATFORMS': 'cpu'},
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith('epsilon ')
