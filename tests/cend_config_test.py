"""CEND's and the noisy layer's config switches: checked, read from the command line, and
carried into a generator round (cend.magnitudes, cend.magnitude_scale, generator.noisy_chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.cli import distill, main
from caedfkd_jax.config import checks, defaults, fields
from caedfkd_jax.engine import runs, train
from caedfkd_jax.io import bundle as bundle_lib, class_names, embeddings
from caedfkd_jax.methods import nayer
from caedfkd_jax.methods.base import TrainState
from caedfkd_jax.synthesis import memory_bank
from caedfkd_jax.synthesis.generator import NOISY_LAYER
from tiny_run import NUM_CLASSES, tiny_config


def _validate(config):
  checks.validate_config(config, 1, 10)


@pytest.mark.parametrize("field, value, message", [
    ("cend.magnitudes", (0.1, 0.2), r"config.cend.magnitudes=\(0.1, 0.2\) has 2 values but "
                                    r"config.cend.num_sources=4; give one M_n per source"),
    ("cend.magnitudes", (0.1, -0.2, 0.1, 0.1), r"magnitudes=\(0.1, -0.2, 0.1, 0.1\): every M_n "
                                               "must be a number >= 0"),
    ("cend.magnitudes", (0.1, "x", 0.1, 0.1), "every M_n must be a number >= 0"),
    ("cend.magnitude_scale", "log", "config.cend.magnitude_scale='log': use absolute"),
    ("generator.noisy_chunks", "per_class", "config.generator.noisy_chunks='per_class': use "
                                            "per_view"),
    ("cend.sources", ("gaussian", "uniform"), r"config.cend.sources=\('gaussian', 'uniform'\) "
                                              "names 2 sources but config.cend.num_sources=4"),
    ("cend.sources", ("gaussian", "uniform", "laplace", "cauchy"), r"unknown \['cauchy'\]"),
])
def test_bad_cend_switches_are_refused_naming_them(field, value, message):
  config = fields.set_fields(defaults.get_config(), {field: value})
  with pytest.raises(ValueError, match=message):
    _validate(config)


def test_per_group_refuses_clean_embeddings_and_takes_the_rest():
  config = defaults.get_config()
  config.generator.noisy_chunks = "per_group"
  for mode in ("cend", "gaussian"):
    config.cend.mode = mode
    _validate(config)
  config.cend.magnitudes = (0.0, 0.1, 0.2, 0.0)   # zeros (copies of the anchor) are allowed
  config.cend.magnitude_scale = "relative"
  _validate(config)
  config.cend.mode = "clean"
  with pytest.raises(ValueError, match="noisy_chunks='per_group' with config.cend.mode='clean' .*"
                     "identical images.* --config.generator.noisy_chunks=per_view"):
    _validate(config)


def test_switches_from_the_command_line(tmp_path, monkeypatch):
  seen = {}
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda config, workdir: seen.update(config=config) or
                      {"student": "s", "stopped_early": False})
  assert main.main(["distill", "--config", "cifar10_resnet56_resnet20", "--workdir",
                    str(tmp_path), "--config.cend.magnitudes=(0.1,0.2,0.05,0.1)",
                    "--config.cend.magnitude_scale=relative",
                    "--config.generator.noisy_chunks=per_group"]) == 0
  config = seen["config"]
  assert config.cend.magnitudes == (0.1, 0.2, 0.05, 0.1)
  assert (config.cend.magnitude_scale, config.generator.noisy_chunks) == ("relative", "per_group")
  _validate(config)
  assert "cend.magnitudes = None" in distill.help_text()


def test_magnitudes_and_a_magnitude_sweep_are_refused_together():
  config = defaults.get_config()
  config.sweep = "cend.magnitude=0.05,0.2"
  assert len(runs.plan_runs(config)) == 2
  _validate(config)
  config.cend.magnitudes = (0.1, 0.2, 0.05, 0.1)
  with pytest.raises(ValueError, match=r"sweeps cend.magnitude, but config.cend.magnitudes="
                     r"\(0.1, 0.2, 0.05, 0.1\) sets every source's magnitude"):
    _validate(config)


def _round_batch(config, teacher, table, hparams=None):
  """The setup, and the CEND batch and params a generator round starts from.

  The state holds only what `nayer.start_round` reads; the generator's params are random
  NumPy draws of `nayer.new_generator_params`' shapes (compiling Flax's init costs seconds).
  """
  setup = train.create_setup(config, teacher, table)
  shapes = jax.eval_shape(lambda: nayer.new_generator_params(setup, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
  state = TrainState(
      epoch=jnp.int32(0), unit=jnp.int32(0), kd_step=jnp.int32(0), student={},
      student_opt_state={},
      method=nayer.SynthesisState(params, bn_ema={}, bn_ema_valid=jnp.bool_(False),
                                  bank=memory_bank.create_bank(1, (32, 32, 3))),
      rng=jax.random.key(0), hparams=hparams or {})
  carry, ctx = setup.method.phases(setup, None)["warmup_round"].start(state)
  return setup, ctx.batch, carry.params


def test_a_round_gets_the_magnitudes_scale_and_chunks_of_its_config():
  names = [f"c{k}" for k in range(NUM_CLASSES)]
  spec = bundle_lib.ModelSpec("resnet_tiny_a", NUM_CLASSES, class_names=names)
  teacher = bundle_lib.Bundle(spec, {})
  rng = np.random.default_rng(0)
  table = embeddings.EmbeddingTable(rng.normal(size=(NUM_CLASSES, 16)) * rng.uniform(0, 2, 16),
                                    names)
  config = tiny_config("unused", "unused")   # teacher and table are given here
  config.cend.num_sources = 2
  config.cend.magnitudes = (0.0, 0.3)
  setup, absolute, params = _round_batch(config, teacher, table)
  assert setup.noise_scale_D is None
  assert params[NOISY_LAYER]["kernel"].shape == (config.num_groups * 3, 16, 8)   # per_view: B // K
  src = np.asarray(absolute.source_index_B)
  emb = lambda b, n: np.asarray(b.embeddings_BxD)[src == n]
  np.testing.assert_array_equal(emb(absolute, 1), emb(absolute, 0))   # source 1: M = 0
  offset = emb(absolute, 2) - emb(absolute, 0)
  assert 0.2 < offset.std() < 0.4                                      # source 2: M = 0.3
  # Relative: the same draw times the table's per-dimension spread across classes.
  config.cend.magnitude_scale = "relative"
  setup, relative, _ = _round_batch(config, teacher, table)
  spread = table.vectors.std(axis=0)
  np.testing.assert_allclose(setup.noise_scale_D, spread, rtol=1e-5)
  np.testing.assert_allclose(emb(relative, 2) - emb(relative, 0), offset * spread,
                             rtol=1e-4, atol=5e-6)   # float32 rounding of table + offset
  # Unset magnitudes: the (swept, traced) cend.magnitude serves every source.
  config.cend.magnitudes = None
  _, swept, _ = _round_batch(config, teacher, table, {"cend.magnitude": jnp.float32(0.0)})
  np.testing.assert_array_equal(emb(swept, 2), emb(swept, 0))
  # per_group: one noisy Linear per CNCL group (2 groups), so params and checkpoints change shape.
  config.generator.noisy_chunks = "per_group"
  setup = train.create_setup(config, teacher, table)
  params = jax.eval_shape(lambda: nayer.new_generator_params(setup, jax.random.key(0)))
  assert setup.generator.noisy_chunk_rows == setup.group_size == 3 * NUM_CLASSES
  assert params[NOISY_LAYER]["kernel"].shape == (config.num_groups, 16, 8)
  assert params[NOISY_LAYER]["bias"].shape == (config.num_groups, 8)


def test_nayer_clip_table_from_the_command_line(embeddings_dir, tmp_path, monkeypatch):
  """--config.embeddings=PATH.npy: NAYER's own CLIP ViT-B/32 table, read with its JSON and
  checked against the teacher's class names."""
  seen = {}
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda config, workdir: seen.update(config=config) or
                      {"student": "s", "stopped_early": False})
  path = str(embeddings_dir / "cifar10_clip_vitb32.npy")
  assert main.main(["distill", "--config", "cifar10_resnet56_resnet20", "--workdir",
                    str(tmp_path), f"--config.embeddings={path}",
                    "--config.cend.magnitude_scale=relative"]) == 0
  config = seen["config"]
  table = embeddings.load_table(config.embeddings)
  assert table.vectors.shape == (10, 512) and table.classes == class_names.CIFAR10
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, class_names=class_names.CIFAR10)
  setup = train.create_setup(config, bundle_lib.Bundle(spec, {}), table)
  assert setup.table_KxD.shape == (10, 512)
  # Relative magnitude on this table: about 0.16 per dimension on average (METHOD.md a.1).
  assert 0.14 < float(jnp.mean(setup.noise_scale_D)) < 0.18
  spec.class_names = list(reversed(class_names.CIFAR10))
  with pytest.raises(ValueError, match="does not match the teacher's classes"):
    train.create_setup(config, bundle_lib.Bundle(spec, {}), table)
