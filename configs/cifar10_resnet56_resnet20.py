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

Full schedule on a GPU (NAYER's CIFAR-10 settings, 120 epochs):
  --config.num_groups=8 --config.generator.steps=30 --config.student.batch_groups=10
  --config.student.kd_steps=400 --config.warmup_epochs=20 --config.epochs=120
  --config.warmup_g_loops=10 --config.compute_dtype=bfloat16
"""

from caedfkd_jax import default_config


def get_config():
  config = default_config.get_config()
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
  return config
