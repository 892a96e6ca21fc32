"""``dplh-export``: a finished run's params alone, in one file to share.

  dplh-export --workdir workdirs/default --out model.npz

The file holds the params, the model's config without its seeds and data
path, and the privacy report without what the guarantee does not cover;
no optimizer state, no noise key, no sampler state (see ``export``).
``dplh-analyze --params`` and ``dplh-evaluate`` read it.
"""

from absl import flags

from dplh_jax.hyperface import export
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished dplh-train '
                               'workdir.', required=True)
_OUT = flags.DEFINE_string('out', None, 'The .npz file to write.',
                           required=True)


def main(argv):
  flags_util.start(argv, config=True)

  def write():
    released = export.export_params(_WORKDIR.value, _OUT.value)
    privacy = released.privacy
    what = (f'epsilon={privacy["epsilon"]:.3f}, delta={privacy["delta"]}'
            if privacy.get('dp') else 'non-private')
    print(f'{_OUT.value}: params of step {released.step} ({what}); no '
          'optimizer state, no noise key.')

  flags_util.one_line_errors(write)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
