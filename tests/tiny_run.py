"""The tiny run every engine test shares: 4 classes, resnet_tiny_a, seconds per epoch.

The teacher bundle and embedding table it needs are the `teacher_dir` and
`table_path` fixtures in conftest.py.
"""

from caedfkd_jax import default_config

NUM_CLASSES = 4


def tiny_config(teacher_dir, table_path):
  config = default_config.get_config()
  config.teacher = teacher_dir
  config.embeddings = table_path
  config.student_arch = "resnet_tiny_a"
  config.cend.num_sources = 1            # group = 4 classes x 2 views = 8 images
  config.num_groups = 2                  # 16 images per round
  config.generator.noise_dim = 8
  config.generator.ngf = 4
  config.generator.steps = 2
  config.warmup_g_loops = 2
  config.g_loops = 1
  config.student.batch_groups = 2
  config.student.kd_steps = 4
  config.student.steps_per_call = 2
  config.warmup_epochs = 1
  config.epochs = 3
  config.grid_images_per_class = 2
  config.eval_every_epochs = 1
  return config
