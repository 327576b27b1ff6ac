"""The fields of `caedfkd train`: supervised training of a zoo network on labelled images.

It makes teachers (and the data-accessible "Student" of the paper's transfer tables). The
defaults are the DFKD zoo's CIFAR recipe as NAYER's `train_scratch.py` runs it (SGD 0.1,
momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, cosine); `configs/train_cifar.py`
names that and the step-schedule recipes, `configs/train_imagenet_resnet50.py` the ImageNet
one. Importing this file imports no JAX, so `--help` answers at once.
"""

import ml_collections

SCHEDULES = ("cosine", "steps", "constant")

# Fields that steer one invocation, not what the run computes: free to change on a resume.
INVOCATION_FIELDS = frozenset({
    "data", "test_split", "time_budget_minutes", "checkpoint_every_minutes", "max_checkpoints",
    "max_units", "eval_batch_size", "compilation_cache_dir", "allow_config_change", "cpu_kernels",
    "num_devices", "distributed", "coordinator_address", "num_processes", "process_id"})


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.recipe = "dfkd_zoo_cosine"  # A label for the fields below, recorded in the bundle.
  config.arch = "resnet20"           # Any zoo network (`caedfkd_jax/models`).
  config.seed = 0

  # Data: any spec `caedfkd evaluate` reads (image folders, CIFAR python batches, tfds:NAME).
  config.data = ""                   # The data spec; its train split is trained on.
  config.train_split = "train"
  config.holdout_fraction = 0.1      # Part of the train split held out (stratified, by seed) to
                                     # pick the epoch kept; never the test split. 0: keep the last.
  config.test_split = "test"         # Scored after every epoch and at the end, reported only,
                                     # never used to choose; "" for none.
  config.mean = ()                   # Input normalisation; empty: the train images' channel
  config.std = ()                    # mean and std, computed once and stored in the bundle.

  # The recipe.
  config.epochs = 200
  config.batch_size = 128            # The global batch, split over the devices.
  config.learning_rate = 0.1
  config.momentum = 0.9              # SGD with momentum (PyTorch's: decay added to the gradient).
  config.nesterov = False
  config.weight_decay = 5e-4         # On every parameter, as torch.optim.SGD(weight_decay=...).
  config.schedule = "cosine"         # cosine (to 0 over all steps), steps (x gamma at each
                                     # milestone epoch), or constant.
  config.milestones = (80, 120, 160)  # Epochs where `steps` multiplies the rate by gamma.
  config.gamma = 0.2
  config.warmup_epochs = 0           # Linear warm-up from 0 over these epochs (large batches).
  config.label_smoothing = 0.0
  config.augment = "crop_flip"       # crop_flip (CIFAR), resized_crop_flip (ImageNet), flip, none.
  config.padding = 4                 # crop_flip's zero padding on each side.
  config.crop_scale = (0.08, 1.0)    # resized_crop_flip's area range.

  # Speed.
  config.compute_dtype = "auto"      # "auto": bfloat16 on GPUs/TPUs, float32 on CPUs.
  config.steps_per_call = 50         # Steps per compiled call on accelerators (one lax.scan);
                                     # also the unit a run can stop and checkpoint at.
  config.fuse_steps = ml_collections.config_dict.placeholder(bool)  # None: fused off CPUs only.
  config.cpu_kernels = "tuned"       # XLA:CPU kernels (caedfkd_jax/runtime/xla_cpu.py).
  config.compilation_cache_dir = "auto"  # Persistent XLA cache; "" turns it off.

  # Time, checkpoints, evaluation.
  config.time_budget_minutes = 0.0   # Wall time over all invocations of the run; 0: no limit.
  config.checkpoint_every_minutes = 10.0  # Also at every epoch's end.
  config.max_checkpoints = 2
  config.max_units = 0               # Stop after this many units in this invocation (tests).
  config.eval_batch_size = 500
  config.allow_config_change = False  # Let a resume continue with other values (recorded).

  # Devices: data-parallel over every device, as `caedfkd distill`.
  config.num_devices = 0             # The first N devices (one process); 0: every device.
  config.distributed = False         # Call jax.distributed.initialize() before any JAX work.
  config.coordinator_address = ""    # "HOST:PORT" of process 0; "": auto-detected.
  config.num_processes = ml_collections.config_dict.placeholder(int)
  config.process_id = ml_collections.config_dict.placeholder(int)
  return config
