"""A method of one's own in one file: plain Gaussian z into NAYER's generator, KD from the bank.

The proof that the seam holds (tests/toy_method_test.py): nothing else is edited for it to
run through `caedfkd distill`, resume, and show in `--help`. Importing this file (as a config
file does) registers the method; its own section `toy` holds the one field it adds.

  caedfkd distill --config tests/toy_method.py --workdir W \
      --config.teacher=TEACHER --config.embeddings=TABLE.npy
"""

import jax
import ml_collections

from caedfkd_jax.config import defaults
from caedfkd_jax.methods import nayer, registry
from caedfkd_jax.synthesis import cend

NAME = "toy_gaussian"


def own_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.toy = ml_collections.ConfigDict()
  config.toy.z_std = 1.0                 # Standard deviation of the generator's z.
  return config


def gaussian_inputs(setup, hparams: dict, rng: jax.Array,
                    classes_GxC: jax.Array | None = None) -> cend.GeneratorBatch:
  """z ~ N(0, toy.z_std^2), as wide as the embedding table, in NAYER's batch layout (the
  groups' classes `classes_GxC`, None: all K)."""
  c = setup.config
  batch = cend.build_generator_batch(rng, setup.table_KxD, c.num_groups, c.cend.num_sources,
                                     mode="gaussian", classes_GxC=classes_GxC)
  return batch.replace(embeddings_BxD=c.toy.z_std * batch.embeddings_BxD)


METHOD = registry.register(nayer.make_method(
    NAME, "Plain Gaussian z into NAYER's generator; KD from the bank (a test's toy).",
    inputs=gaussian_inputs, with_cncl=False, reads=nayer.READS + ("toy.",),
    own_config=own_config))


def get_config() -> ml_collections.ConfigDict:
  """The tiny run's sizes (tests/tiny_run.py) for this method."""
  config = defaults.get_config(NAME)
  config.student_arch = "resnet_tiny_a"
  config.epochs = 3
  config.warmup_epochs = 1
  config.cend.num_sources = 1            # groups of 4 classes x 2 views = 8 images
  config.num_groups = 2
  config.generator.noise_dim, config.generator.ngf, config.generator.steps = 8, 4, 2
  config.warmup_g_loops, config.g_loops = 2, 1
  config.student.batch_groups, config.student.kd_steps, config.student.steps_per_call = 2, 4, 2
  config.student.sampler = "uniform"
  config.grid_images_per_class = 2
  config.num_devices = 1
  config.toy.z_std = 0.5
  return config
