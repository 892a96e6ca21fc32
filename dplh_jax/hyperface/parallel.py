"""Data-parallel DP training on JAX's SPMD engine: mesh, shardings, processes.

The step runs on a one-axis ``jax.sharding.Mesh`` (axis ``'data'``) over the
devices of every process (``jax.distributed``). The padded Poisson batch is
sharded along ``'data'``; parameters and optimizer state, the DP noise key
included, are replicated. Inside the jitted step, ``shard_map`` gives each
device its block of the batch: it computes the clipped sum of its images
(microbatched, its padding-only chunks skipped, as on one device), and a
``psum`` over ``'data'`` adds the devices' ``ClippedSum``s, which are
additive. Only then, outside the ``shard_map``, does ``dp_aggregate`` add
the noise: once, to the replicated global sum, from the one replicated key,
so every device computes the same noise and the same update. The released
update is the one-device mechanism, ``(sum_i clip_C(g_i) + N(0, (sigma
C)^2 I)) / expected_batch_size``, up to the float32 order of the sum
(docs/DESIGN.md, Privacy rules, rule 3).

Several processes: each process trains on its share of every Poisson sample
(``batch_selection.process_share``), padded to one shape
(``input_pipeline.local_slots``); the noise key and the sampler's seed are
drawn once, on process 0, and broadcast (``noise_keys.agreed_entropy``).
Only the main process (0) writes the report, metrics and ``config.json``;
checkpoints are saved and restored by all (Orbax coordinates them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from dplh_jax.dp import run_binding
from dplh_jax.hyperface import input_pipeline

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool = False) -> bool:
  """Joins a multi-process run with ``jax.distributed.initialize``.

  Must run before anything else uses JAX. With none of the values and not
  ``auto``, does nothing (one process). With ``auto``, JAX reads what is not
  given from the cluster's environment (Slurm, Open MPI, Kubernetes, Cloud
  TPU; ``JAX_COORDINATOR_ADDRESS`` too).

  Returns:
    Whether ``jax.distributed`` was initialized.

  Raises:
    ValueError: the values do not describe a run (one line, with the fix).
  """
  given = (coordinator_address, num_processes, process_id)
  if not auto and all(value is None for value in given):
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes}: must be at least 1.')
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'--process_id={process_id}: must be in [0, '
                     f'--num_processes={num_processes}).')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except (ValueError, RuntimeError) as error:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ValueError(
        f'jax.distributed.initialize failed ({first}); pass '
        '--coordinator_address=HOST:PORT --num_processes=N --process_id=I '
        'on every process, or --distributed on a cluster JAX detects.'
    ) from error
  return True


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's step executes.

  Attributes:
    mesh: the ``('data',)`` mesh over the data-parallel devices, or None for
      one device (the step then runs there as a plain ``jit``).
    num_processes: processes in the run.
    process_index: this process.
    local_shards: this process's devices in the mesh.
  """
  mesh: Mesh | None
  num_processes: int
  process_index: int
  local_shards: int

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.devices.size

  @property
  def is_main(self) -> bool:
    """Whether this process writes the report, metrics and config."""
    return self.process_index == 0

  @property
  def replicated(self) -> NamedSharding | jax.Device:
    if self.mesh is None:
      return jax.local_devices()[0]
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def batch_sharding(self) -> NamedSharding | jax.Device:
    if self.mesh is None:
      return jax.local_devices()[0]
    return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

  @property
  def batch_layout(self) -> input_pipeline.BatchLayout:
    return input_pipeline.BatchLayout(self.num_processes, self.process_index,
                                      self.local_shards)

  def describe(self) -> dict[str, int]:
    """What ``config.json`` and the privacy report record."""
    return {'num_devices': self.num_devices,
            'num_processes': self.num_processes}


def make_layout(num_devices: int = 0) -> Layout:
  """The data-parallel layout over ``num_devices`` devices.

  Args:
    num_devices: 0 for every device of every process; else the first
      ``num_devices`` local devices (one process only: with several, each
      process's devices all take part).

  Raises:
    ValueError: a count that is negative or more than there are, or a
      partial count with several processes.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  processes = jax.process_count()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'config.num_devices={num_devices}: this run has '
                     f'{len(devices)} devices; use 0 (all) or 1 to '
                     f'{len(devices)}.')
  if processes > 1 and num_devices not in (0, len(devices)):
    raise ValueError(f'config.num_devices={num_devices} with {processes} '
                     'processes: every device of every process trains; use '
                     f'0 or {len(devices)}.')
  per_process = collections.Counter(d.process_index for d in devices)
  if len(set(per_process.values())) > 1:
    raise ValueError(
        f'the processes have unequal device counts {dict(per_process)} '
        '(process: devices); every process must bring the same number, e.g. '
        'the same CUDA_VISIBLE_DEVICES count on every host.')
  devices = devices[:num_devices or len(devices)]
  index = jax.process_index()
  local = sum(d.process_index == index for d in devices)
  mesh = Mesh(np.array(devices), (DATA_AXIS,)) if len(devices) > 1 else None
  return Layout(mesh, processes, index, local)


def put_replicated(tree: Any, layout: Layout) -> Any:
  """``tree`` (the same values on every process) replicated on the mesh."""
  if layout.mesh is None:
    return jax.device_put(tree, layout.replicated)

  if layout.num_processes == 1:
    return jax.device_put(tree, layout.replicated)

  def put(leaf):
    if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
      # Wrapped under jit with the output sharding fixed: an eagerly
      # wrapped key differs from the step's output key in its signature,
      # which would give the step a second cache entry.
      wrap = _key_wrapper(jax.random.key_impl(leaf), layout.replicated)
      return wrap(put(jax.random.key_data(leaf)))
    # device_put cannot reach other processes' devices; this takes the
    # process's own copy of the value for each of its devices.
    return jax.make_array_from_process_local_data(layout.replicated,
                                                  np.asarray(leaf))
  return jax.tree.map(put, tree)


@functools.lru_cache(maxsize=8)
def _key_wrapper(impl, sharding):
  """One jitted ``wrap_key_data`` per key type and sharding (the train loop
  replicates a key every step)."""
  return jax.jit(functools.partial(jax.random.wrap_key_data, impl=impl),
                 out_shardings=sharding)


def global_batch(batch: dict[str, np.ndarray], layout: Layout) -> Any:
  """This process's part of the batch as its blocks of the global batch.

  Process ``p``'s part is rows ``[p L, (p + 1) L)`` of the global batch
  (the mesh lists devices by process), split over its devices in order.
  """
  if layout.mesh is None:
    return batch  # jit moves it to the device, as before
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          layout.batch_sharding, x,
          (x.shape[0] * layout.num_processes,) + x.shape[1:]), batch)


def local_copy(tree: Any) -> Any:
  """Each array's copy on this process's first device (for evaluation and
  logging: replicated values are whole on every device)."""
  def local(leaf):
    if isinstance(leaf, jax.Array) and not isinstance(
        leaf.sharding, jax.sharding.SingleDeviceSharding):
      return leaf.addressable_data(0)
    return leaf
  return jax.tree.map(local, tree)


def sharded_clipped_sum(clipped_sum: Callable[..., Any], mesh: Mesh
                        ) -> Callable[..., Any]:
  """``clipped_sum(params, batch, rng, is_padding_example=...)`` computed
  per device on its block of the batch, the ``ClippedSum``s summed.

  Guarantee: every image is in exactly one device's block, and the
  ``ClippedSum`` of a block is that block's clipped sum with its counts, so
  the ``psum`` is the clipped sum of the whole batch (to float32 order of
  the sum): its sensitivity to one image is still ``C``. No noise is added
  here: the caller adds it once to the result, which is replicated.
  The per-image ``aux`` comes back sharded like the batch.
  """
  data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

  def per_device(params, batch, rng, is_padding_example):
    clipped, aux = clipped_sum(params, batch, rng,
                               is_padding_example=is_padding_example)
    return jax.lax.psum(clipped, DATA_AXIS), aux

  # check_vma=False: with it, shard_map marks the replicated params as
  # varying (pvary) where they meet the device's data, and one-pass clipping
  # refuses parameters that reach their layer through any transformation.
  # Nothing here needs the check: the gradients are taken inside each
  # device's function, and the only collective is the psum.
  summed = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(whole, data, whole, data),
                         out_specs=(whole, data), check_vma=False)

  def call(params, batch, rng, *, is_padding_example):
    return summed(params, batch, rng, is_padding_example)
  return call


def fingerprint(value: Any) -> bytes:
  """A SHA-256 digest of ``value``: a JSON-able object, or a pytree of
  arrays (their paths, dtypes, shapes and bytes)."""
  digest = hashlib.sha256()
  if not any(isinstance(leaf, (jax.Array, np.ndarray))
             for leaf in jax.tree.leaves(value)):
    digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.digest()
  for path, leaf in jax.tree_util.tree_flatten_with_path(local_copy(value))[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)} {array.dtype} '
                  f'{array.shape}'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.digest()


def first_disagreement(digests: np.ndarray, names: list[str]
                       ) -> str | None:
  """The first of ``names`` whose digest differs between processes.

  Args:
    digests: (processes, len(names), 32) uint8, every process's digests.
    names: what each digest is of.
  """
  for k, name in enumerate(names):
    different = np.flatnonzero(np.any(digests[:, k] != digests[0, k], axis=1))
    if different.size:
      return (f'{name} differs between process 0 and process '
              f'{int(different[0])}')
  return None


def check_processes_agree(layout: Layout, **values: Any) -> None:
  """Refuses a multi-process run whose processes disagree on any of
  ``values`` (for example the config, the training set's size and the
  initial or restored parameters).

  Processes that disagree would each compute a different mechanism than the
  one accounted for (their shares of one Poisson sample would come from
  different datasets, or their replicas would drift apart). Every process
  must call it, with the same keywords.

  Raises:
    ValueError: one line naming the first value that differs.
  """
  if layout.num_processes == 1:
    return
  names = sorted(values)
  mine = np.stack([np.frombuffer(fingerprint(values[name]), np.uint8)
                   for name in names])
  digests = np.asarray(multihost_utils.process_allgather(mine))
  problem = first_disagreement(digests, names)
  if problem is not None:
    raise ValueError(f'{problem}: start every process with the same config, '
                     'data and code.')


def main_first(fn: Callable[[], Any], layout: Layout) -> Any:
  """``fn()`` on the main process, then on the others (for example, the
  main process prepares a dataset the others then only open)."""
  if layout.num_processes == 1:
    return fn()
  result = fn() if layout.is_main else None
  multihost_utils.sync_global_devices('dplh main_first')
  return result if layout.is_main else fn()


def any_process(flag: bool, layout: Layout) -> bool:
  """Whether ``flag`` is set on any process (every process must call)."""
  if layout.num_processes == 1:
    return flag
  flags = multihost_utils.process_allgather(np.int32(flag))
  return bool(np.any(flags))


class CompileCounter:
  """``with CompileCounter('train_step') as count:`` counts XLA compilations
  of the jitted function of that name in the block (``count.compiles``).

  ``jit``'s ``_cache_size()`` cannot tell: on a mesh it holds a second entry
  for a PRNG key argument once the key has come back from the step, without
  compiling anything again (JAX 0.10).
  """

  _EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self, function_name: str):
    self._name = f'jit({function_name})'
    self.compiles = 0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == self._EVENT and kwargs.get('fun_name') == self._name:
      self.compiles += 1

  def __enter__(self) -> 'CompileCounter':
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


class WorkdirLock(run_binding.WorkdirLock):
  """``run_binding.WorkdirLock`` for process ``process_index`` of a run:
  process 0 holds ``workdir/.lock``, process ``k`` ``workdir/.lock.k``, so
  the processes of one run share a workdir and a second run is refused."""

  def __init__(self, workdir: str, process_index: int = 0):
    super().__init__(workdir)
    if process_index:
      self.path = os.path.join(workdir, f'.lock.{process_index}')
