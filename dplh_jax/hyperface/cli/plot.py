"""``dplh-plot``: training curves of one or more workdirs, as PNG.

  dplh-plot workdirs/default --out plots/
  dplh-plot workdirs/sweep/* --out plots/sweep/

Reads each workdir's ``metrics.jsonl`` (and ``privacy_report.json`` or
``config.json`` for its label) and writes to --out ``train_loss.png``
(per-task train loss against the step), ``epsilon.png`` (epsilon spent),
``eval_vs_step.png`` and ``eval_vs_epsilon.png`` (held-out metrics), one line
per workdir (see ``dplh_jax.hyperface.run_plots``). Prints the paths written.
A run still training can be plotted: it shows what it has logged so far.
"""

from absl import app
from absl import flags

from dplh_jax.hyperface import run_plots
from dplh_jax.hyperface.cli import flags_util

_OUT = flags.DEFINE_string('out', None, 'Folder for the PNGs (created if '
                           'missing; files of the same name are replaced).',
                           required=True)
_DPI = flags.DEFINE_integer('dpi', 100, 'Resolution of the PNGs.')


def main(argv):
  workdirs = list(argv[1:])
  if not workdirs:
    raise app.UsageError('pass one or more workdirs: dplh-plot WORKDIR '
                         '[WORKDIR...] --out DIR')

  def plot():
    for path in run_plots.save_plots(workdirs, _OUT.value, _DPI.value):
      print(path)

  flags_util.one_line_errors(plot)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
