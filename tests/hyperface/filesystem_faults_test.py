"""Filesystem faults fail fast, in one line, with nothing checkpointed lost.

Read-only folders and a full disk are real: a tmpfs mounted read-only or
small (as root, as CI runs), or, for a user who is not root, chmod (which
root ignores). Where neither can be had the test is skipped with the reason.
"""

import contextlib
import json
import os
import subprocess

import pytest

from dplh_jax.hyperface import checkpoint
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import train
from dplh_jax.hyperface.cli import flags_util
from dplh_jax.hyperface.configs import tiny

pytestmark = pytest.mark.slow


def _mount_tmpfs(path, options):
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                         str(path)], capture_output=True, check=False)
  return done.returncode == 0


@contextlib.contextmanager
def _read_only(path):
  """``path`` as a read-only folder, for root too."""
  if _mount_tmpfs(path, 'size=64k,ro'):
    try:
      yield
    finally:
      subprocess.run(['umount', str(path)], check=True)
  elif os.geteuid() != 0:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, 0o755)
  else:
    pytest.skip('root without mount: no way to make a folder read-only')


def _config(data_dir, **overrides):
  config = tiny.get_config()
  config.data_dir = data_dir
  config.update(overrides)
  return config


def test_a_workdir_that_is_a_file_is_one_line(data_dir, tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('')
  with pytest.raises(ValueError, match=f'workdir {path} is a file, not a '
                     'folder: pass a folder'):
    train.train_and_evaluate(_config(data_dir), str(path))


@pytest.mark.parametrize('read_only', ['workdir', 'checkpoints'])
def test_a_read_only_workdir_fails_before_any_step(data_dir, tmp_path,
                                                    read_only):
  workdir = tmp_path / 'run'
  folder = workdir if read_only == 'workdir' else workdir / 'checkpoints'
  with _read_only(folder):
    with pytest.raises(ValueError, match=f'{folder} is not writable .*: pass '
                       'a folder you can write to'):
      train.train_and_evaluate(_config(data_dir), str(workdir))


def test_a_read_only_data_dir_without_the_dataset_names_it(tmp_path):
  data_dir = tmp_path / 'tfds'
  with _read_only(data_dir):
    with pytest.raises(ValueError, match=(
        f"config.data_dir {data_dir} is not writable .*: synthetic_faces/tiny "
        'is not prepared there')):
      data_loading.load_data(_config(str(data_dir)))


def test_aflw_without_its_files_says_which_files_go_where(tmp_path):
  manual = tmp_path / 'downloads' / 'manual'
  with pytest.raises(ValueError, match=(
      f'put aflw.sqlite at {manual}/aflw.sqlite and the images under '
      f'{manual}/flickr/')):
    data_loading.load_data(_config(str(tmp_path), dataset='aflw'))
  (manual / 'aflw.sqlite').parent.mkdir(parents=True)
  (manual / 'aflw.sqlite').write_bytes(b'')
  with pytest.raises(ValueError, match=f'{manual}/flickr/ is missing'):
    data_loading.load_data(_config(str(tmp_path), dataset='aflw'))


def test_a_full_disk_stops_at_the_failed_save_and_the_run_resumes(data_dir,
                                                                  tmp_path):
  # Room for the config, metrics and two checkpoints of the tiny model
  # (steps 0 and 2, about 380 KB each), not for a third (step 4).
  disk = tmp_path / 'disk'
  if not _mount_tmpfs(disk, 'size=900k'):
    pytest.skip('a full disk needs a small tmpfs, which needs root')
  workdir = str(disk / 'run')
  try:
    with pytest.raises(checkpoint.CheckpointNotSaved) as failed:
      train.train_and_evaluate(_config(data_dir), workdir)
    assert str(failed.value) == (
        f'could not write the step-4 checkpoint to {workdir}/checkpoints (no '
        'space left on device); the step-2 checkpoint is intact. Free space '
        'or make the folder writable, then re-run the same command to '
        'resume.')
    # Commands end on it in that one line.
    def train_as_a_command_would():
      raise failed.value
    with pytest.raises(SystemExit) as exited:
      flags_util.one_line_errors(train_as_a_command_would)
    assert exited.value.code == f'error: {failed.value}'
    assert not os.path.exists(os.path.join(workdir, 'privacy_report.json'))

    subprocess.run(['mount', '-o', 'remount,size=4m', str(disk)], check=True)
    result = train.train_and_evaluate(_config(data_dir), workdir)
    assert result['privacy']['steps'] == 4
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
        '2', '4']  # the half-written step 4 was cleaned up, then rewritten
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      steps = [json.loads(line)['step'] for line in f if '"train"' in line]
    assert steps == [1, 2, 3, 4]  # the dead run's steps 3, 4 replaced
  finally:
    subprocess.run(['umount', str(disk)], check=True)


def test_a_save_error_that_is_not_the_disk_is_not_blamed_on_it(tmp_path):
  saver = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  try:
    with pytest.raises(TypeError):  # not CheckpointNotSaved's disk advice
      saver.save(0, {'x': 1}, {'not json': object()})
  finally:
    saver.close()
