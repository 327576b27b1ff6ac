r"""CAE-DFKD on the paper's CIFAR pairs, with NAYER's schedule (METHOD.md d).

Pairs (CAE-DFKD Table II; teacher -> student): resnet34 -> resnet18,
vgg11 -> resnet18, wrn40_2 -> wrn16_1, wrn40_2 -> wrn40_1, wrn40_2 -> wrn16_2.
Teachers come from the DFKD zoo (Fast/CMI/NAYER `cifar{10,100}_{arch}.pth`):

  caedfkd convert cifar10_resnet34.pth --arch resnet34 --num-classes 10 --preset dfkd \
      --out teachers/cifar10_resnet34
  caedfkd distill --config configs/paper_cifar.py:cifar10,resnet34,resnet18 \
      --workdir runs/c10_r34_r18 --config.teacher=teachers/cifar10_resnet34 \
      --config.eval_data=PATH/cifar10

Expected (paper, official test set): CIFAR-10 95.09 / 92.74 / 92.21 / 94.89 / 94.36,
CIFAR-100 77.83 / 72.36 / 62.73 / 72.23 / 72.09 for the pairs in the order above.
Not yet reproduced here (no GPU in our sessions so far); see docs/results.md.
Run time: NAYER reports hours on one GPU for 120 epochs. The paper's CLIP table
(`--config.embeddings=PATH/cifar10_clip_vitb32.npy`) is its best language model;
the default is the shipped all-MiniLM-L6-v2 (SBERT) table.

CIFAR-100 (changed 2026-12-05, issue 31): every CNCL group holds all K classes, so 100
classes x 5 views made one group of 500 images, a round was that one group, and every KD batch
(one group) was exactly one round's output: one generator state, one noisy-layer draw. Now a
group holds 20 classes from the run's shuffled class cycle (`classes_per_group`): a round is 5
groups and still covers the 100 classes once, and a KD batch of 5 groups comes from up to 5
rounds. What changes besides: CNCL's negatives within a group are the 19 other classes of
that group (not 99), each noisy Linear (per_view) sees 20 rows, not 100, and a KD batch holds
about 67 distinct classes (5 random groups of 20), not all 100.

A fourth item picks an arm of the ablation ladder (caedfkd_jax/config/ladder.py: base,
cend, cend_cncl, gaussian, mixup, image_contrastive), e.g. `paper_cifar.py:cifar10,resnet34,resnet18,base`.
"""

from caedfkd_jax.config import defaults, ladder


def get_config(arg: str = "cifar10,resnet34,resnet18"):
  parts = arg.split(",")
  if len(parts) not in (3, 4):
    raise ValueError(f"{arg!r}: use DATASET,TEACHER,STUDENT[,ARM], e.g. cifar10,resnet34,resnet18 "
                     f"or cifar10,resnet34,resnet18,base (arms: {', '.join(ladder.ARMS)})")
  dataset, teacher_arch, student_arch = parts[:3]
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"dataset {dataset!r}: use cifar10 or cifar100")
  config = defaults.get_config()
  config.teacher_arch_expected = teacher_arch   # Checked against the teacher bundle.
  config.student_arch = student_arch
  config.embeddings = dataset
  if dataset == "cifar10":
    config.num_groups = 8            # 8 x 10 x 5 = 400 images per round (NAYER: 400).
    config.student.batch_groups = 10  # 500 per KD step (NAYER: 512).
    config.generator.steps = 30
    config.epochs = 120
  else:
    # A group of 20 of the 100 classes from the run's shuffled class cycle, so that a KD
    # batch of 5 groups draws from several rounds; 5 groups still cover the 100 classes once
    # a round (5 x 20 x 5 = 500 images).
    config.classes_per_group = 20
    config.num_groups = 5
    config.student.batch_groups = 5  # 500 per KD step.
    config.generator.steps = 40
    config.epochs = 220
  if len(parts) == 4:
    ladder.apply_arm(config, parts[3])
  return config
