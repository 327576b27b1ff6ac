"""`config.cpu_kernels`: the tuned XLA:CPU kernels compute what XLA's default ones compute.

Both paths are held against a float64 run of the same network on equal inputs: the tuned
one must be no further from it than XLA's default (with slack for rounding that differs by
CPU), so a kernel choice that changed the maths would fail here, while one that only sums
in another order passes on any machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax import models
from caedfkd_jax.config import checks, defaults
from caedfkd_jax.runtime import xla_cpu

needs_switch = pytest.mark.skipif(
    xla_cpu.compiler_options("tuned", "cpu") is None,
    reason="this jaxlib has no YNNPACK fusion switch, so 'tuned' is XLA's default here")


def test_choices_are_checked_and_accelerators_untouched():
  with pytest.raises(ValueError, match="cpu_kernels='fast'.*tuned"):
    xla_cpu.compiler_options("fast", "cpu")
  assert xla_cpu.compiler_options("tuned", "gpu") is None
  assert xla_cpu.compiler_options("xla_default", "cpu") is None
  config = defaults.get_config()
  config.cpu_kernels = "fast"
  with pytest.raises(ValueError, match="config.cpu_kernels='fast'"):
    checks.validate_config(config, 1, 10)


def _grads(arch: str, dtype, choice: str | None, batch: int = 6):
  """(train-mode weight gradients, eval-mode input gradient) of a weighted logit sum."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 32, 32, 3))
  weights = rng.standard_normal((batch, 10))
  model32 = models.create_model(arch, 10, jnp.float32)
  variables = model32.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  model = models.create_model(arch, 10, dtype)
  params, batch_stats = cast(variables["params"]), cast(variables["batch_stats"])
  x, weights = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)

  def train_loss(p):
    (logits, _), _ = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
    return (logits * weights).sum()

  def input_loss(images):
    return (model.apply({"params": params, "batch_stats": batch_stats}, images)[0] * weights).sum()

  options = None if choice is None else xla_cpu.compiler_options(choice, "cpu")
  weight_grads = jax.jit(jax.grad(train_loss), compiler_options=options)(params)
  input_grad = jax.jit(jax.grad(input_loss), compiler_options=options)(x)
  return jax.device_get((weight_grads, input_grad))


def _distance(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


@needs_switch
@pytest.mark.parametrize("arch", ["resnet8", "wrn_tiny"])
def test_tuned_gradients_are_as_exact_as_xla_defaults(arch):
  with jax.enable_x64(True):
    exact = _grads(arch, jnp.float64, None)
  tuned, default = _grads(arch, jnp.float32, "tuned"), _grads(arch, jnp.float32, "xla_default")
  for name, t, d, e in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(tuned),
                           jax.tree.leaves(default), jax.tree.leaves(exact)):
    scale = float(np.linalg.norm(e)) + 1e-12
    # No further from float64 than XLA's default, and both within float32 rounding of it.
    assert _distance(t, e) <= 2 * _distance(d, e) + 1e-6 * scale, jax.tree_util.keystr(name[0])
    assert _distance(t, e) <= 1e-4 * scale, jax.tree_util.keystr(name[0])


@needs_switch
def test_the_choice_reaches_the_compiler():
  """The two choices compile to different programs (else the test above proves nothing)."""
  model = models.create_model("resnet8", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  x = jnp.zeros((2, 32, 32, 3))

  def loss(p):
    (logits, _), _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
    return logits.sum()

  texts = {choice: xla_cpu.jit(jax.grad(loss), choice=choice, platform="cpu").lower(
      variables["params"]).compile().as_text() for choice in xla_cpu.CHOICES}
  assert texts["tuned"] != texts["xla_default"]
