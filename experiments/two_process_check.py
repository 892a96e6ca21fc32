"""Two processes on localhost (jax.distributed, CPU collectives) train the
tiny config to the same params and privacy report as one process.

  python experiments/two_process_check.py [--devices_per_process 2]

Runs ``dplh-train --config tiny`` (fixed noise and sampler seeds) three
times: as one process on one device, then as two processes of
``--devices_per_process`` fake CPU devices each, joined through
``--coordinator_address localhost:PORT --num_processes 2 --process_id I``.
It checks that the final checkpoint's params agree to float32
reduction-order tolerance, that the privacy reports are equal but for
``num_devices`` and ``num_processes``, that only process 0 wrote metrics and
config.json, and that two processes whose configs differ (one learning rate)
are both refused before a step, and prints one JSON line. Not in the test suite: three
cold-started training processes (two of them at once) take about two
minutes on 2 CPU cores, past the suite's budget (BENCHMARKS.md).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ATOL, RTOL = 1e-6, 1e-5  # float32 sums in another order, 4 Adam steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(data_dir: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, '-m', 'dplh_jax.hyperface.cli.train', '--config',
          'tiny', f'--config.data_dir={data_dir}', '--workdir', workdir,
          *extra]


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={devices}'))


def _final_params(workdir: str) -> dict[str, np.ndarray]:
  """The params of the latest checkpoint, as NumPy arrays by path."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                 if s.isdigit())
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  # The saved shardings name the devices of the run that wrote them; read
  # every array to the host instead.
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
      checkpointer.metadata(path).item_metadata.tree)
  state = checkpointer.restore(path, restore_args=restore_args)
  return {jax.tree_util.keystr(key): value for key, value in
          jax.tree_util.tree_flatten_with_path(state['params'])[0]}


def _report(workdir: str) -> dict:
  with open(os.path.join(workdir, 'privacy_report.json')) as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--compare_only', default=None, help='a folder of an '
                      'earlier check: compare its runs again, train nothing')
  args = parser.parse_args()
  root = args.compare_only or tempfile.mkdtemp(prefix='two_process_check_')
  data_dir = os.path.join(root, 'tfds')
  one, two = os.path.join(root, 'one'), os.path.join(root, 'two')
  if args.compare_only:
    outputs, seconds = None, (None, None)
  else:
    outputs, seconds = _train(data_dir, one, two, args.devices_per_process)
  refused = None if args.compare_only else _disagreeing_processes_refused(
      data_dir, os.path.join(root, 'disagree'), args.devices_per_process)
  _compare(one, two, outputs, seconds, args.devices_per_process, root,
           refused)


def _two_processes(data_dir, workdir, devices_per_process, extra=((), ())):
  """Runs the two processes of one run at once; their (returncode, stdout,
  stderr)."""
  port = _free_port()
  processes = [subprocess.Popen(
      _command(data_dir, workdir, f'--coordinator_address=localhost:{port}',
               '--num_processes=2', f'--process_id={index}', *extra[index]),
      env=_env(devices_per_process), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for index in range(2)]
  results = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=900)
    results.append((process.returncode, stdout, stderr))
  return results


def _disagreeing_processes_refused(data_dir, workdir, devices_per_process):
  """Whether both processes exit with the one-line refusal when process 1
  has another learning rate, and no step is trained."""
  results = _two_processes(data_dir, workdir, devices_per_process,
                           ((), ('--config.learning_rate=0.5',)))
  refused = all(code != 0 and 'config differs between process 0 and '
                'process 1' in stderr for code, _, stderr in results)
  trained = os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and (
      os.path.getsize(os.path.join(workdir, 'metrics.jsonl')) > 0)
  return refused and not trained


def _train(data_dir, one, two, devices_per_process):
  """The one-process run, then the two processes at once."""
  os.makedirs(data_dir)
  start = time.time()
  reference = subprocess.run(_command(data_dir, one), env=_env(1),
                             capture_output=True, text=True, check=False)
  if reference.returncode:
    sys.exit(f'error: the one-process run failed:\n{reference.stderr[-3000:]}')
  reference_seconds = time.time() - start
  # The dataset is prepared now: the two processes only open it.

  start = time.time()
  results = _two_processes(data_dir, two, devices_per_process)
  two_seconds = time.time() - start
  for index, (code, _, stderr) in enumerate(results):
    if code:
      sys.exit(f'error: process {index} failed:\n{stderr[-3000:]}')
  outputs = [(stdout, stderr) for _, stdout, stderr in results]
  return outputs, (reference_seconds, two_seconds)


def _compare(one, two, outputs, seconds, devices_per_process, root,
             refused):
  """Prints the checks as one JSON line; exits 1 if one fails."""
  params_one, params_two = _final_params(one), _final_params(two)
  differences = {name: float(np.max(np.abs(params_one[name]
                                           - params_two[name])))
                 for name in params_one}
  moved = max(float(np.max(np.abs(value))) for value in params_one.values())
  close = all(np.allclose(params_one[n], params_two[n], rtol=RTOL, atol=ATOL)
              for n in params_one)
  layout = ('num_devices', 'num_processes')
  report_one, report_two = _report(one), _report(two)
  same_report = ({k: v for k, v in report_one.items() if k not in layout}
                 == {k: v for k, v in report_two.items() if k not in layout})
  with open(os.path.join(two, 'config.json')) as f:
    run = json.load(f)['run']
  with open(os.path.join(two, 'metrics.jsonl')) as f:
    steps = [(line['step'], line['split']) for line in map(json.loads, f)]
  result = {
      'params_close': close,
      'max_abs_difference': max(differences.values()),
      'largest_param': moved,
      'same_privacy_report': same_report,
      'epsilon': report_two['epsilon'],
      'report_layout': {k: report_two[k] for k in layout},
      'config_json_layout': {k: run[k] for k in layout},
      'metric_lines_once': len(steps) == len(set(steps)) == 5,
      'summary_printed_by_process_0_only': None if outputs is None else (
          'privacy report:' in outputs[0][0]
          and 'privacy report:' not in outputs[1][0]),
      'disagreeing_processes_refused': refused,
      'lock_files': sorted(f for f in os.listdir(two)
                           if f.startswith('.lock')),
      'seconds_one_process': seconds[0] and round(seconds[0], 1),
      'seconds_two_processes': seconds[1] and round(seconds[1], 1),
      'folder': root,
  }
  print(json.dumps(result))
  ok = (close and same_report and result['metric_lines_once']
        and result['summary_printed_by_process_0_only'] is not False
        and refused is not False
        and result['report_layout'] == {
            'num_devices': 2 * devices_per_process, 'num_processes': 2})
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
