"""A run's released parameters: read from its workdir, or shared as a file.

What a DP run releases is its parameters (docs/DESIGN.md, Using a trained
model). Its checkpoints hold more: the optimizer state with the DP noise key,
which must never be published (whoever has it can regenerate the noise and
subtract it, which voids the guarantee), and the sampler state.
:func:`params_from_workdir` therefore restores only the ``params`` subtree of
the latest checkpoint (``averaged_params`` for a run that keeps a parameter
average, ``ema_decay`` > 0: post-processing of the DP iterates) by an Orbax
partial restore, so the optimizer state is never read; and
:func:`export_params` writes those params alone to one ``.npz``
with the model's config and the run's privacy report, minus what must not
or need not leave the workdir:

* the config without ``noise_seed`` and ``sampler_seed`` (a set noise seed is
  the noise key) and without ``data_dir`` (a local path);
* the report without ``non_finite_examples_dropped`` and its list of what
  the guarantee does not cover (computed from private data without noise).

The file holds plain arrays and one JSON string (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import workdir as workdir_lib

FORMAT = 'dplh-jax released params 1'
_META = '__meta__'
_PARAMS_PREFIX = 'params/'
PRIVATE_CONFIG_FIELDS = ('noise_seed', 'sampler_seed', 'data_dir')
PRIVATE_REPORT_FIELDS = ('non_finite_examples_dropped',
                         'not_covered_by_the_guarantee')


class ReleasedModel(NamedTuple):
  """Released params and what is public about them."""
  params: Any             # the model's variables, {'params': {...}}
  config: dict[str, Any]  # the run's config (PRIVATE_CONFIG_FIELDS removed)
  step: int               # the train step of these params
  privacy: dict[str, Any] | None  # privacy report; None: run not finished
  source: str             # the workdir or file they came from


def public_config(config: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in config.items() if k not in PRIVATE_CONFIG_FIELDS}


def public_report(report: dict[str, Any] | None) -> dict[str, Any] | None:
  if report is None:
    return None
  return {k: v for k, v in report.items() if k not in PRIVATE_REPORT_FIELDS}


def abstract_params(config: dict[str, Any]) -> Any:
  """The shapes and dtypes of the config's model variables (nothing run)."""
  model, _ = model_setup.build_model(ml_collections.ConfigDict(config))
  size = config['input_size']
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step (Orbax's temporary folders of a
  save in progress are not numbers, so they are skipped)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()
           and os.path.isdir(os.path.join(directory, name, 'state'))]
  return max(steps) if steps else None


class _QuietOrbax(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def released_subtree(config: dict[str, Any]) -> str:
  """The TrainState field a run releases: ``averaged_params`` when it keeps
  a parameter average (``config.ema_decay`` > 0: what it evaluates and
  exports, ``train_step.evaluated_params``), else ``params``."""
  return 'averaged_params' if config.get('ema_decay') else 'params'


def params_from_workdir(workdir: str) -> ReleasedModel:
  """The latest checkpoint's released params (``released_subtree``: the
  average, if the run keeps one), restored without the optimizer state.

  Raises:
    ValueError: a folder without ``config.json`` or without a checkpoint.
  """
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise ValueError(f'{workdir} holds no config.json: pass the --workdir of '
                     'a dplh-train run.')
  step = latest_step(workdir)
  if step is None:
    raise ValueError(f'{workdir} holds no checkpoint yet: wait for the run\'s '
                     'first checkpoint, or pass a finished run.')
  subtree = released_subtree(config)
  target = {subtree: abstract_params(config)}
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  quiet = _QuietOrbax()
  logging.getLogger('absl').addFilter(quiet)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), 'checkpoints', str(step),
                     'state'),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  finally:
    logging.getLogger('absl').removeFilter(quiet)
  report_path = os.path.join(workdir, 'privacy_report.json')
  report = None
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
  return ReleasedModel(jax.tree.map(jnp.asarray, restored[subtree]),
                       public_config(config), step, public_report(report),
                       workdir)


def _flatten(params: Any) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[_PARAMS_PREFIX + '/'.join(p.key for p in path)] = np.asarray(leaf)
  return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name[len(_PARAMS_PREFIX):].split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return tree


def export_params(workdir: str, path: str) -> ReleasedModel:
  """Writes the finished run's params alone to ``path`` (``.npz``).

  Raises:
    ValueError: the run has not finished (no ``privacy_report.json``), so
      its params are not yet the released ones.
  """
  released = params_from_workdir(workdir)
  if released.privacy is None:
    raise ValueError(f'{workdir} has no privacy_report.json: the run has not '
                     'finished; resume it (the same dplh-train command) and '
                     'export afterwards.')
  meta = {'format': FORMAT, 'config': released.config,
          'step': released.step, 'privacy': released.privacy}
  arrays = _flatten(released.params)
  arrays[_META] = np.array(json.dumps(meta, sort_keys=True))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    np.savez(f, **arrays)
  os.replace(path + '.tmp', path)
  return released._replace(source=path)


def read_params_file(path: str) -> ReleasedModel:
  """The params and public metadata of a file written by export_params.

  Raises:
    ValueError: not such a file, or params that do not fit its config.
  """
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except (ValueError, OSError) as error:
    raise ValueError(f'{path} is not a params file written by dplh-export '
                     f'({error}).') from error
  if _META not in arrays:
    raise ValueError(f'{path} is not a params file written by dplh-export '
                     f'(no {_META}).')
  meta = json.loads(str(arrays.pop(_META)))
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")!r}; this version '
                     f'reads {FORMAT!r}.')
  params = _unflatten(arrays)
  expected = abstract_params(meta['config'])
  shapes = jax.tree.map(lambda a: tuple(a.shape), params)
  if shapes != jax.tree.map(lambda a: tuple(a.shape), expected):
    raise ValueError(f'{path}: its params do not fit the model its config '
                     'describes; the file is damaged or was edited.')
  return ReleasedModel(params, meta['config'], meta['step'], meta['privacy'],
                       path)
