r"""`caedfkd train` recipes for CIFAR-sized data (32 x 32): a teacher, or the data-accessible
student of the transfer tables.

  caedfkd train --config train_cifar:resnet34 --workdir runs/teacher_r34 \
      --config.data=PATH/cifar10            # or cifar-100-python, or tfds:cifar100

`:ARCH[,RECIPE]`, RECIPE one of (METHOD.md h, the zoo's `train_scratch.py` scripts):
- cosine (default): NAYER's default. SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128,
  200 epochs, cosine to 0.
- nayer_steps: the same, with the rate x0.2 at epochs 80, 120 and 160 instead.
- cmi_steps: CMI's. Batch 256, weight decay 1e-4, the rate x0.1 at epochs 120, 150 and 180.
Every recipe: random 4-pixel zero-padded crop + horizontal flip; 10% of the train split held out
(stratified) to choose the epoch kept, the test split only reported.
"""

from caedfkd_jax.config import train_defaults

RECIPES = ("cosine", "nayer_steps", "cmi_steps")


def get_config(arg: str = "resnet20"):
  arch, _, recipe = arg.partition(",")
  recipe = recipe or "cosine"
  if recipe not in RECIPES:
    raise ValueError(f"train_cifar:{arg}: the recipe {recipe!r} is not one of "
                     f"{', '.join(RECIPES)}; write train_cifar:ARCH[,RECIPE].")
  config = train_defaults.get_config()
  config.arch = arch or "resnet20"
  config.recipe = f"dfkd_zoo_{recipe}"
  if recipe == "nayer_steps":
    config.schedule, config.milestones, config.gamma = "steps", (80, 120, 160), 0.2
  elif recipe == "cmi_steps":
    config.schedule, config.milestones, config.gamma = "steps", (120, 150, 180), 0.1
    config.batch_size, config.weight_decay = 256, 1e-4
  return config
