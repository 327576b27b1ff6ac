r"""CAE-DFKD on ImageNet-1K (224 x 224, 1,000 classes), R50 -> R50: the paper's Table IV tier.

The teacher is torchvision's pre-trained ResNet-50. NAYER's ImageNet path
(`datafree_kd.py`, `synthesis/nayer.py`) uses its 224-px generator (NLDeepGenerator: init
14 x 14, four upsamples; `Generator` picks it from 128 px up) and reads its classes off a
label list shuffled every epoch, one synthesis batch at a time. Here a group holds 20
classes from the run's shuffled class cycle (`classes_per_group`,
synthesis/class_cycle.py): a round of 2 groups is 200 images of 40 classes (NAYER's
generator default sbz=200), and 25 rounds cover the 1,000 classes once.

NAYER's ImageNet step counts, epochs and batch sizes are not in its released scripts; the
values below are [INFERRED] from its Tiny-ImageNet settings, sized for one 80 GB GPU:
- 40 generator steps, 4 rounds an epoch, 20 warm-up loops, 1,000 KD steps of 200 images;
- no flip in the generator loss's crop (NAYER's ImageNet crop has none; its separate
  jitter-and-flip is not reproduced);
- the bank holds 100,000 images (15 GB as uint8, the newest kept): the whole schedule's
  160,000 would be 24 GB on every device. The start-up check refuses a state above half
  of one device's memory (engine/train.py `check_state_fits`); a host-memory ring with
  prefetch was not built, because the device bank keeps KD sampling inside the jitted step
  and 15 GB leaves an 80 GB card room for two ResNet-50s at these batches.

  caedfkd convert resnet50-0676ba61.pth --arch resnet50 --num-classes 1000 \
      --preset torchvision --class-names PATH/imagenet --out teachers/imagenet_resnet50
  caedfkd embed --classes PATH/imagenet --out tables/imagenet_minilm.npy
  caedfkd distill --config configs/paper_imagenet.py --workdir runs/in1k_r50_r50 \
      --config.teacher=teachers/imagenet_resnet50 \
      --config.embeddings=tables/imagenet_minilm.npy \
      --config.eval_data=PATH/imagenet --config.eval_split=val

Not run at this scale here; docs/results.md has the CPU start-up measurements.
"""

from caedfkd_jax.config import defaults, ladder


def get_config(arm: str = ""):
  if arm and arm not in ladder.ARMS:
    raise ValueError(f"{arm!r}: use no argument (CAE-DFKD) or an ablation arm "
                     f"({', '.join(ladder.ARMS)}), e.g. paper_imagenet.py:base")
  config = defaults.get_config()
  config.teacher_arch_expected = "resnet50"
  config.student_arch = "resnet50"
  config.embeddings = ""                 # A 1,000-row table: `caedfkd embed --classes ROOT`.
  config.classes_per_group = 20          # 20 classes x 5 views = 100 images a group.
  config.num_groups = 2                  # 200 images a round, 40 classes.
  config.student.batch_groups = 2        # 200 images a KD step.
  config.generator.steps = 40
  config.generator.flip = False
  config.g_loops = 4
  config.warmup_g_loops = 20
  config.student.kd_steps = 1000
  config.student.steps_per_call = 50
  config.student.lr = 0.1
  config.bank_capacity = 100_000
  config.eval_batch_size = 250
  config.epochs = 120
  if arm:
    ladder.apply_arm(config, arm)
  return config
