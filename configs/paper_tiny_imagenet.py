r"""CAE-DFKD on Tiny-ImageNet (64 x 64, 200 classes), R34 -> R18: the paper's Table III tier.

NAYER's Tiny-ImageNet settings (METHOD.md b.1; its `synthesis/nayer.py` for the flip):
60 generator steps, 4 rounds an epoch, 20 warm-up loops, 1,000 KD steps an epoch, KD lr
0.1, and no flip in the generator loss's augmentation (`generator.flip=False`). CEND
cannot put all 200 classes x 5 views (1,000 images) in every group, so a group holds 10
classes from the run's shuffled class cycle (`classes_per_group`, synthesis/class_cycle.py):
a round of 5 groups is 250 images of 50 classes (NAYER: 200 images, one per class) and the
4 rounds of an epoch cover the 200 classes exactly once. KD batches are 5 whole groups, 250
images (NAYER: 256), drawn from any rounds.

Prepare the teacher and the class embeddings once (the table from the dataset's words.txt):

  caedfkd convert cifar_tiny_resnet34.pth --arch resnet34 --num-classes 200 --preset dfkd \
      --class-names PATH/tiny-imagenet-200 --out teachers/tiny_resnet34
  caedfkd embed --classes PATH/tiny-imagenet-200 --out tables/tiny_imagenet_minilm.npy
  caedfkd distill --config configs/paper_tiny_imagenet.py --workdir runs/tiny_r34_r18 \
      --config.teacher=teachers/tiny_resnet34 \
      --config.embeddings=tables/tiny_imagenet_minilm.npy \
      --config.eval_data=PATH/tiny-imagenet-200 --config.eval_split=val

An arm of the ablation ladder follows after a colon (`paper_tiny_imagenet.py:base`).
Epochs: NAYER's 120/220/320 tiers are not stated for Tiny-ImageNet; 220 here [INFERRED].
Not run at this scale here (no GPU in our sessions so far); docs/results.md has the
start-up measurements.
"""

from caedfkd_jax.config import defaults, ladder


def get_config(arm: str = ""):
  if arm and arm not in ladder.ARMS:
    raise ValueError(f"{arm!r}: use no argument (CAE-DFKD) or an ablation arm "
                     f"({', '.join(ladder.ARMS)}), e.g. paper_tiny_imagenet.py:base")
  config = defaults.get_config()
  config.teacher_arch_expected = "resnet34"
  config.student_arch = "resnet18"
  config.embeddings = ""                 # A 200-row table: `caedfkd embed --classes ROOT`.
  config.classes_per_group = 10          # 10 classes x 5 views = 50 images a group.
  config.num_groups = 5                  # 250 images a round, 50 classes.
  config.student.batch_groups = 5        # 250 images a KD step.
  config.generator.steps = 60
  config.generator.flip = False
  config.g_loops = 4
  config.warmup_g_loops = 20
  config.student.kd_steps = 1000
  config.student.lr = 0.1
  config.epochs = 220
  if arm:
    ladder.apply_arm(config, arm)
  return config
