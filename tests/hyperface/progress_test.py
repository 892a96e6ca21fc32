"""Progress lines: the ETA leaves out the first step's compilation."""

from dplh_jax.hyperface import progress


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_eta_is_measured_after_the_first_step_and_total_comes_first():
  clock = _Clock()
  run = progress.Progress(num_steps=200, start_step=10, clock=clock)
  clock.now = 30.0  # step 11 compiles for 30 s
  run.step_done(11)
  losses = {'train_loss_gender': 0.5, 'train_loss_total': 2.0, 'other': 1.0}
  assert run.line(11, None, losses) == (
      'step 11/200 [0:30 elapsed, ETA --] total=2.000 gender=0.500')
  for step in range(12, 52):
    run.step_done(step)
  clock.now = 110.0
  # 40 steps in the 80 s after the first: 0.5 steps/s, 149 steps left.
  assert run.line(51, 1.5, losses) == (
      'step 51/200 [1:50 elapsed, ETA 4:58, 0.50 steps/s] eps=1.500 '
      'total=2.000 gender=0.500')
