r"""`caedfkd train` with torchvision's classic ImageNet recipe for ResNet-50 (not run here).

  caedfkd train --config train_imagenet_resnet50 --workdir runs/r50 --config.data=PATH

SGD 0.1 for a batch of 256 (momentum 0.9, weight decay 1e-4), 90 epochs, the rate x0.1 at epochs
30 and 60, RandomResizedCrop(scale 0.08-1) + flip at the input size, label smoothing off.

What stops it today: `train` holds the whole train split in host memory as uint8 of one size, as
`evaluate` reads it. ImageNet's 1.28 M images at 224 x 224 are about 190 GB, and its JPEGs must
first be resized to 224 x 224 (e.g. resize 256 + centre crop 224, offline). A streaming loader
for the ImageNet folders is part of the paper-scale work.
"""

from caedfkd_jax.config import train_defaults


def get_config():
  config = train_defaults.get_config()
  config.recipe = "torchvision_imagenet_steps"
  config.arch = "resnet50"
  config.epochs = 90
  config.batch_size = 256
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.schedule, config.milestones, config.gamma = "steps", (30, 60), 0.1
  config.augment = "resized_crop_flip"
  config.crop_scale = (0.08, 1.0)
  config.holdout_fraction = 0.01     # 12,800 images: enough to choose an epoch.
  config.test_split = "validation"
  config.checkpoint_every_minutes = 30.0
  return config
