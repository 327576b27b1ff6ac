"""CPSC's conditional generator and feature adapter against short PyTorch restatements of the authors' modules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.synthesis.conditional_generator import (
  ConditionalGenerator,
  init_conditional_generator,
  sample_inputs,
)
from caedfkd_jax.models.adapter import FeatureAdapter

K, NZ, NGF, IMG, B = 3, 8, 4, 8, 6
NORMS = ("norm0", "norm1", "norm2", "norm_out")


@functools.cache
def _setup():
  """One init for the whole file: compiling it costs more than every forward here."""
  gen = ConditionalGenerator(num_classes=K, img_size=IMG, nz=NZ, ngf=NGF)
  variables = init_conditional_generator(jax.random.key(0), gen, B, NZ)
  z, y = sample_inputs(jax.random.key(1), B, NZ, K)
  return gen, variables, z, y


def _perturb_tables(params, seed=0, scale=0.5):
  """Class tables away from the authors' ones/zeros init, so the labels matter."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda a: a, params)
  for name in NORMS:
    t = out[name]
    t["class_scale"] = t["class_scale"] + scale * rng.standard_normal(t["class_scale"].shape)
    t["class_bias"] = t["class_bias"] + scale * rng.standard_normal(t["class_bias"].shape)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


# ----------------------- PyTorch restatement (GeneratorD) ---------------------- #

def _torch_generator(params):
  """network/gan.py GeneratorD with network/conditional_batchnorm.py's CBN, our params copied in."""
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional

  class CBN(nn.BatchNorm2d):  # Non-affine BN, eps 1e-3, momentum 0.1, then per-class affine.
    def __init__(self, c):
      super().__init__(c, eps=1e-3, momentum=0.1, affine=False)
      self.weights, self.biases = nn.Embedding(K, c), nn.Embedding(K, c)

    def forward(self, x, y):
      return self.weights(y)[:, :, None, None] * super().forward(x) + self.biases(y)[:, :, None, None]

  class GeneratorD(nn.Module):
    def __init__(self):
      super().__init__()
      self.s = IMG // 4
      self.l1 = nn.Linear(NZ, 2 * NGF * self.s ** 2)
      self.n0, self.n1, self.n2, self.n3 = CBN(2 * NGF), CBN(2 * NGF), CBN(NGF), CBN(3)
      self.c1 = nn.Conv2d(2 * NGF, 2 * NGF, 3, 1, 1)
      self.c2 = nn.Conv2d(2 * NGF, NGF, 3, 1, 1)
      self.c3 = nn.Conv2d(NGF, 3, 3, 1, 1)

    def forward(self, z, y):
      x = self.l1(z.view(z.shape[0], -1)).view(z.shape[0], -1, self.s, self.s)
      x = F.interpolate(self.n0(x, y), scale_factor=2)
      x = F.leaky_relu(self.n1(self.c1(x), y), 0.2)
      x = F.interpolate(x, scale_factor=2)
      x = F.leaky_relu(self.n2(self.c2(x), y), 0.2)
      return self.n3(torch.tanh(self.c3(x)), y)

  g = GeneratorD().double()
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  with torch.no_grad():
    g.l1.weight.copy_(t(params["project"]["kernel"]).T)
    g.l1.bias.copy_(t(params["project"]["bias"]))
    for conv, name in ((g.c1, "conv1"), (g.c2, "conv2"), (g.c3, "to_image")):
      conv.weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
      conv.bias.copy_(t(params[name]["bias"]))
    for norm, name in zip((g.n0, g.n1, g.n2, g.n3), NORMS):
      norm.weights.weight.copy_(t(params[name]["class_scale"]))
      norm.biases.weight.copy_(t(params[name]["class_bias"]))
  return torch, g


def _nhwc(torch_out):
  return torch_out.detach().numpy().transpose(0, 2, 3, 1)


def test_matches_pytorch_generator_d_in_train_mode():
  gen, variables, z, y = _setup()
  params = _perturb_tables(variables["params"])
  torch, g = _torch_generator(params)
  out = gen.apply({"params": params}, z, y)
  chex.assert_shape(out, (B, IMG, IMG, 3))
  ref = g.train()(torch.tensor(np.asarray(z, np.float64)).view(B, NZ, 1, 1),
                  torch.tensor(np.asarray(y, np.int64)))
  np.testing.assert_allclose(out, _nhwc(ref), rtol=1e-4, atol=1e-4)


def test_running_stats_and_eval_mode_match_pytorch():
  gen, variables, z, y = _setup()
  params = _perturb_tables(variables["params"])
  torch, g = _torch_generator(params)
  stats = variables["batch_stats"]
  g.train()
  for step in range(2):
    zs, ys = sample_inputs(jax.random.key(10 + step), B, NZ, K)
    _, updates = gen.apply({"params": params, "batch_stats": stats}, zs, ys,
                           mutable=["batch_stats"])
    stats = updates["batch_stats"]
    g(torch.tensor(np.asarray(zs, np.float64)), torch.tensor(np.asarray(ys, np.int64)))
  for norm, name in zip((g.n0, g.n1, g.n2, g.n3), NORMS):
    np.testing.assert_allclose(stats[name]["mean"], norm.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[name]["var"], norm.running_var.numpy(), rtol=1e-4, atol=1e-5)
  out = gen.apply({"params": params, "batch_stats": stats}, z, y, train=False)
  ref = g.eval()(torch.tensor(np.asarray(z, np.float64)), torch.tensor(np.asarray(y, np.int64)))
  np.testing.assert_allclose(out, _nhwc(ref), rtol=1e-4, atol=1e-4)


def test_eval_mode_without_running_stats_says_what_to_pass():
  gen, variables, z, y = _setup()
  with pytest.raises(ValueError, match="batch_stats"):
    gen.apply({"params": variables["params"]}, z, y, train=False)


def test_labels_condition_the_output_once_the_tables_differ():
  gen, variables, z, _ = _setup()
  y_a = jnp.array([0, 1, 2, 0, 1, 2])
  y_b = jnp.array([1, 2, 0, 2, 0, 1])
  fresh = variables["params"]
  # The authors' tables start at ones/zeros: no class effect until they learn.
  np.testing.assert_allclose(gen.apply({"params": fresh}, z, y_a),
                             gen.apply({"params": fresh}, z, y_b), atol=1e-6)
  params = _perturb_tables(fresh)
  diff = jnp.abs(gen.apply({"params": params}, z, y_a) - gen.apply({"params": params}, z, y_b))
  assert float(diff.min(axis=(1, 2, 3)).max()) > 0 and float(diff.mean()) > 0.05


def test_last_cbn_follows_tanh_so_output_is_standardised_not_bounded():
  gen, variables, z, y = _setup()
  params = variables["params"]
  out = gen.apply({"params": params}, z, y)
  # Fresh tables: the final CBN standardises each channel over the batch.
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=1e-4)
  assert float(out.std((0, 1, 2)).min()) > 0.9
  big = jax.tree.map(lambda a: a, params)
  big["norm_out"] = {"class_scale": 10.0 * params["norm_out"]["class_scale"],
                     "class_bias": params["norm_out"]["class_bias"] + 3.0}
  out_big = gen.apply({"params": big}, z, y)
  assert float(jnp.abs(out_big).max()) > 5.0  # A tanh last could never leave [-1, 1].
  np.testing.assert_allclose(out_big, 10.0 * out + 3.0, rtol=1e-4, atol=1e-4)


def test_gradients_are_finite_for_params_and_z():
  gen, variables, z, y = _setup()
  loss = lambda p, z: jnp.mean(jnp.square(gen.apply({"params": p}, z, y) - 0.3))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(_perturb_tables(variables["params"]), z)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[0]["project"]["kernel"]).sum()) > 0


def test_params_do_not_depend_on_batch_and_z_may_be_nchw():
  gen, variables, _, _ = _setup()
  z, y = sample_inputs(jax.random.key(3), 2 * B, NZ, K)
  out = gen.apply({"params": variables["params"]}, z.reshape(2 * B, NZ, 1, 1), y)
  chex.assert_shape(out, (2 * B, IMG, IMG, 3))
  chex.assert_tree_all_finite(out)


def test_sample_inputs_draws_normal_z_and_uniform_labels():
  z, y = sample_inputs(jax.random.key(0), 3000, NZ, 10)
  chex.assert_shape((z, y), ((3000, NZ), (3000,)))
  assert y.dtype == jnp.int32 and int(y.min()) == 0 and int(y.max()) == 9
  counts = np.bincount(np.asarray(y), minlength=10)
  assert counts.min() > 240 and counts.max() < 360
  assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02


def test_image_size_must_allow_two_upsamples():
  gen = ConditionalGenerator(num_classes=K, img_size=10, nz=NZ, ngf=NGF)
  with pytest.raises(ValueError, match="divisible by 4"):
    init_conditional_generator(jax.random.key(0), gen, B)


# ------------------------------ feature adapter ------------------------------- #

@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_adapter_matches_pytorch_wrn_adapter_head(head):
  torch = pytest.importorskip("torch")
  adapter = FeatureAdapter(features_out=7, head=head)
  x = jax.random.normal(jax.random.key(0), (4, 5))
  params = adapter.init(jax.random.key(1), x)["params"]
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  if head == "mlp":
    chex.assert_shape((params["fc1"]["kernel"], params["fc2"]["kernel"]), ((5, 5), (5, 7)))
    ref = torch.relu(t(x) @ t(params["fc1"]["kernel"]) + t(params["fc1"]["bias"]))
    ref = ref @ t(params["fc2"]["kernel"]) + t(params["fc2"]["bias"])
  else:
    ref = t(x) @ t(params["fc"]["kernel"]) + t(params["fc"]["bias"])
  np.testing.assert_allclose(adapter.apply({"params": params}, x), ref.numpy(), rtol=1e-5, atol=1e-6)
  bound = 1 / np.sqrt(5)  # PyTorch's default Linear init.
  assert float(jnp.abs(params["fc2" if head == "mlp" else "fc"]["kernel"]).max()) <= bound


def test_adapter_names_a_bad_head():
  with pytest.raises(ValueError, match="mlp"):
    FeatureAdapter(features_out=3, head="conv").init(jax.random.key(0), jnp.zeros((2, 4)))
