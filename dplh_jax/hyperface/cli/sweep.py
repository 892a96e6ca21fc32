"""``dplh-sweep``: privacy-utility sweep: DP runs at several budgets and seeds, and non-private.

  dplh-sweep --config default \
      --config.num_epochs=1 --config.expected_batch_size=64 \
      --epsilons=10,5,1,0.7 --seeds=0,1 --outdir workdirs/sweep \
      --results_dir experiments/results/sweep

One run per (budget, seed), and a non-private run per seed, each in its own
workdir under --outdir (see ``sweep_lib``). Re-running the same command skips
finished runs and resumes an interrupted one. Writes to --results_dir
(default: --outdir) ``runs.csv`` (one row per run: budget, seed, epsilon
spent, sigma, q, steps, every held-out metric), ``curves.csv`` (held-out
metrics during training, by epoch), ``summary.md`` (mean and spread over seeds
per budget and metric) and three PNGs: each metric against epsilon, and
accuracy / error curves against epoch per budget. These files are small; the
workdirs (checkpoints) are not.
"""

from absl import flags
from ml_collections import config_flags

from dplh_jax.hyperface import configs
from dplh_jax.hyperface import sweep_lib
from dplh_jax.hyperface.cli import flags_util

_DEFAULT_CONFIG = configs.resolve('default')

config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                'Base config file (get_config()); every run '
                                'overrides its budget and seeds.',
                                lock_config=True)
_EPSILONS = flags.DEFINE_list('epsilons', ['10', '5', '1', '0.7'],
                              "Target epsilons, at the config's delta.")
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'],
                           'Seeds; one run per budget and seed.')
_NONPRIVATE = flags.DEFINE_boolean(
    'nonprivate', True, 'Also run the non-private baseline for each seed.')
_OUTDIR = flags.DEFINE_string('outdir', None, 'One workdir per run goes here.',
                              required=True)
_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', '', 'Where the CSVs, table and plots go; default --outdir.')
_EVALS_PER_EPOCH = flags.DEFINE_float(
    'evals_per_epoch', 4.0, 'Held-out evaluations per epoch during training, '
    "for the curves (sets config.eval_every); 0 keeps the config's.")
_SEEDED_NOISE = flags.DEFINE_boolean(
    'seeded_noise', True, 'Seed the DP noise and the Poisson sampler from the '
    'sweep seed, so runs are reproducible. Such a noise seed is not secret '
    '(the privacy report says so): fine for experiments, not for releasing a '
    'model. False: OS entropy.')
_SPREAD = flags.DEFINE_enum('spread', 'std', ['std', 'minmax'],
                            'Spread over seeds in the table and plots.')


def main(argv):
  flags_util.start(argv, flags.FLAGS.config)

  def sweep_and_report():
    runs, curves = sweep_lib.run_sweep(
        flags.FLAGS.config, sweep_lib.parse_epsilons(_EPSILONS.value),
        sweep_lib.parse_seeds(_SEEDS.value), _OUTDIR.value,
        nonprivate=_NONPRIVATE.value, evals_per_epoch=_EVALS_PER_EPOCH.value,
        seeded_noise=_SEEDED_NOISE.value)
    paths = sweep_lib.write_results(
        runs, curves, _RESULTS_DIR.value or _OUTDIR.value, _SPREAD.value)
    with open(paths[2]) as f:
      print(f.read())
    print('Wrote ' + ', '.join(paths))

  flags_util.one_line_errors(sweep_and_report)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
