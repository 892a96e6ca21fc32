"""DP HyperFace (small) on synthetic faces from random weights, target epsilon
5 at 1e-5: the base recipe every other config overrides. ``make demo`` runs
it fine-tuned from a public model instead (demo.py).

Run:  dplh-train --config default \
          --workdir workdirs/default
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The demo configuration; every field is overridable as --config.x=..."""
  config = ml_collections.ConfigDict()

  # Data: a TFDS name 'dataset/builder_config'; data_dir '' = TFDS default.
  config.dataset = 'synthetic_faces/demo'
  config.data_dir = ''
  config.num_proposals = 4  # K proposals per image (one privacy unit)
  config.num_positives = 2
  # Augmentation multiplicity M (De et al. 2022): M augmented views (flip,
  # proposals) of each training image, M*K crops in its ONE clipped
  # gradient; costs compute, not privacy (augmentation_views.py). 1: off.
  config.augmentation_multiplicity = 1
  config.num_train_examples = -1  # -1: the whole train split

  # Model: HyperFace scaled for CPU (like models.HyperFaceConfig.small, at
  # 48 px: feature maps 22 -> 10 -> 4 -> 1).
  config.input_size = 48
  config.width_multiplier = 0.125
  config.conv1_kernel = 5
  config.conv1_stride = 2
  config.dropout_rate = 0.0
  # GroupNorm with this many groups after every convolution (None: none).
  # Per crop, so it mixes no images (unlike BatchNorm, never used under DP);
  # it must divide every layer's channel count.
  config.group_norm_groups = config_dict.placeholder(int)
  # What the heads read: 'shared' (HyperFace: one fc_full vector for all) or
  # 'cross_sec' (one squeeze-excitation channel gate per task on the fused
  # map, each head reading only its own gated features; cross_sec.py), with
  # or without the gate's cross-task term.
  config.task_features = 'shared'
  config.cross_task_gates = True
  # Weight of the de-correlation loss between the tasks' Cross-SEC channel
  # descriptors (losses.decorrelation_loss), inside each image's clipped
  # gradient; fixed, not learned. 0: off. Needs task_features='cross_sec'.
  config.decorrelation_weight = 0.0
  # Task weights: 'fixed' (HyperFace's 1, 5, 0.5, 5, 2) or 'uncertainty'
  # (DPLH Eq. 7: learned log sigma^2, inside the clip). In the short demo
  # run the learned weights grow like 1 / loss and hand the shared clip to
  # the small-loss regressions, starving gender (README, "Demo results",
  # has the measured runs). dplh_aflw.py uses the learned weights, as DPLH.
  config.task_weighting = 'fixed'
  # Where learned weights start: HyperFace's (1, 5, 0.5, 5, 2) or all equal.
  config.initial_task_weights = 'hyperface'
  # Learned weights only: keep each within this factor of its start (> 1;
  # a tanh bound, task_weighting.BoundedUncertaintyWeighting). 0: unbounded.
  config.task_weight_bound = 0.0
  # 'per_task': clip each image's gradient per group (trunk, each task's
  # head with its gates, the learned weights), C / sqrt(groups) each, total
  # C (clip_groups.py), so no task takes the whole clip. 'none': one clip.
  config.clip_groups = 'none'

  # Privacy. Give target_epsilon (sigma is calibrated for the planned steps),
  # noise_multiplier (epsilon is reported), or both (training stops at the
  # last step whose epsilon is within the target).
  config.dp = True
  config.privacy_unit = 'image'
  config.l2_norm_clip = 1.0
  config.target_epsilon = config_dict.placeholder(float)
  config.target_epsilon = 5.0
  config.noise_multiplier = config_dict.placeholder(float)
  config.delta = 1e-5
  config.accountant = 'pld'  # or 'rdp'

  # Optimization. q = expected_batch_size / num_train_examples. Epochs and
  # batch are the best setting found within the demo's 10-minute CPU budget
  # (README, "Demo results", has the tuning runs).
  config.expected_batch_size = 256
  config.num_epochs = 5.0
  # DP detection pre-training (DPLH 3.2.1) in the same run: this many epochs
  # of detection-only steps first, at the same q and sigma (calibrated over
  # all steps for target_epsilon), the other tasks' heads, log sigma^2 and
  # gates frozen; then num_epochs of the full multi-task loss. The report
  # lists both phases (detection_pretrain.py). 0: none.
  config.detection_pretrain_epochs = 0.0
  config.optimizer = 'adam'  # 'sgd', 'momentum' or 'adam'
  config.learning_rate = 3e-3
  config.momentum = 0.9
  # Learning-rate schedule, public (a function of the step count alone):
  # linear warm-up from 0 over warmup_steps, then 'constant' or 'cosine'
  # (decay to 0 at the last planned step).
  config.learning_rate_schedule = 'constant'
  config.warmup_steps = 0
  # Exponential moving average of the released params (0: off; e.g. 0.99):
  # post-processing of the DP release, so free. With it on, evaluation,
  # checkpoints' use and export read the average (train_step.averaged).
  config.ema_decay = 0.0
  # Start from a model trained on PUBLIC data (a dplh-train workdir or a
  # dplh-export file; '' = random init): free under DP only if it never saw
  # this run's data (public_init.py; e.g. the public_pretrain config).
  config.init_params_from = ''
  # Per-example clipping: 'one_pass' (one forward and backward for the whole
  # chunk, dplh_jax.dp.one_pass_clipping) or 'vmap' (jax.vmap(jax.grad)); same
  # clipped sum and guarantee; one-pass is the faster on CPU (BENCHMARKS.md).
  config.clipping = 'one_pass'
  # Images per chunk. None: the whole padded batch at once (fastest on CPU,
  # where loops run slower); set it to bound memory for large batches.
  config.microbatch_size = config_dict.placeholder(int)
  # Data-parallel devices: 0 = every device of every process (the batch is
  # sharded along a 'data' mesh axis, noise added once to the summed clipped
  # gradients); n = the first n devices of the one process. A resume may
  # change it (README, "Several devices and hosts").
  config.num_devices = 0

  # Randomness. Model init, dropout and proposals follow `seed`. The DP noise
  # and the Poisson sampler draw from OS entropy unless their seeds are set:
  # anyone who knows the noise seed can subtract the noise, so set it only
  # for tests and debugging (the privacy report says which was used).
  config.seed = 0
  config.noise_seed = config_dict.placeholder(int)
  config.sampler_seed = config_dict.placeholder(int)

  # Bookkeeping (in steps).
  config.log_every = 25
  config.eval_every = 0  # held-out evaluation every n steps; 0: at the end
  config.checkpoint_every = 50
  config.eval_batch_size = 64
  config.num_eval_examples = -1  # -1: the whole test split
  # After the final evaluation, HyperFace's image-level metrics (detection AP
  # over whole images, image_eval.py) on the first n test images, written to
  # workdir/image_eval.json; 0: off (dplh-evaluate does it on any workdir).
  config.image_eval_images = 0
  return config
