r"""CAE-DFKD from the real akamaster ResNet-56 (CIFAR-10) into a ResNet-20.

Sized for 2 CPU cores: real progress in 20 minutes. Prepare the teacher once:

  caedfkd convert ../shared/data/teachers/akamaster-cifar10/resnet56-4bfd9763.th \
      --arch resnet56 --num-classes 10 --preset akamaster --out teachers/resnet56
  caedfkd distill --config configs/cifar10_resnet56_resnet20.py --workdir runs/r56_r20 \
      --config.teacher=teachers/resnet56 --config.time_budget_minutes=20
  caedfkd evaluate --model runs/r56_r20/student --data ../shared/data/cifar10

Smaller than the paper's schedule: 100 synthetic images per round (2 CNCL groups
of 10 classes x 5 views), 20 generator steps, 100-image KD batches, 60 KD steps
per epoch, 1 warm-up epoch of 5 rounds, 16 epochs (about 20 minutes on 2 cores). The teacher scores 83.20% on the JPEG test set;
measured student accuracy is in docs/results.md.

Full schedule on a GPU (NAYER's CIFAR-10 settings and the paper's batch sizes,
120 epochs; bf16 and fused steps are the GPU defaults):

  caedfkd distill --config configs/cifar10_resnet56_resnet20.py:full --workdir runs/r56_r20_full \
      --config.teacher=teachers/resnet56 --config.eval_data=../shared/data/cifar10

An arm of the ablation ladder (caedfkd_jax/config/ladder.py: base, cend, cend_cncl,
gaussian, and Table I's mixup and image_contrastive) follows the schedule after a comma, e.g. `:cpu,base` or `:full,cend`;
`:base` alone is `:cpu,base`.
"""

from caedfkd_jax.config import defaults, ladder


def get_config(arg: str = "cpu"):
  schedule, _, arm = arg.partition(",")
  if schedule in ladder.ARMS and not arm:   # ":base" is ":cpu,base".
    schedule, arm = "cpu", schedule
  if schedule not in ("cpu", "full"):
    raise ValueError(f"schedule {schedule!r}: use cpu (20 minutes on 2 cores) or full (NAYER's), "
                     f"optionally followed by an ablation arm ({', '.join(ladder.ARMS)}), "
                     "e.g. cpu,base")
  config = defaults.get_config()
  config.teacher_arch_expected = "resnet56"
  # Models
  config.student_arch = "resnet20"
  config.embeddings = "cifar10"
  # Synthesis: 2 x 10 x 5 = 100 images per round.
  config.num_groups = 2
  config.generator.steps = 20
  config.warmup_g_loops = 5
  config.g_loops = 1
  config.generator.life_epochs = 10
  # Student: 100-image batches, 60 steps per epoch.
  config.student.batch_groups = 2
  config.student.kd_steps = 60
  config.student.steps_per_call = 20
  # Schedule: the cosine runs over `epochs`; the time budget usually ends it first.
  config.warmup_epochs = 1
  config.epochs = 16
  config.checkpoint_every_minutes = 5.0
  config.eval_every_epochs = 1
  if schedule == "full":  # Back to the defaults: NAYER's CIFAR-10 schedule, 400 images a round.
    nayer = defaults.get_config()
    for name in ("num_groups", "g_loops", "warmup_g_loops", "warmup_epochs", "epochs"):
      config[name] = nayer[name]
    for name in ("steps", "life_epochs"):
      config.generator[name] = nayer.generator[name]
    for name in ("batch_groups", "kd_steps", "steps_per_call"):
      config.student[name] = nayer.student[name]
  if arm:
    ladder.apply_arm(config, arm)
  return config
