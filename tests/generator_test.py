"""The generator against a float64 NumPy forward pass of NAYER's NLGenerator, plus its quirks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.synthesis import generator as generator_lib
from caedfkd_jax.synthesis.generator import (Generator, init_generator, NOISY_LAYER,
                                             reinit_noisy_layer)

K, D = 3, 5


def _setup(img_size=32, ngf=4, noise_dim=8, batch=2 * K, seed=0):
  gen = Generator(num_classes=K, img_size=img_size, noise_dim=noise_dim, ngf=ngf)
  params = init_generator(jax.random.key(seed), gen, batch, D)
  emb = jax.random.normal(jax.random.key(seed + 1), (batch, D))
  return gen, params, emb


# --------------------------- float64 reference ------------------------------ #

def _bn(x, p, eps=1e-5):
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)  # Biased variance, as PyTorch normalises in train mode.
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _conv3x3(x, kernel_HWIO, bias=None):
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(padded[:, i:i + h, j:j + w, :] @ kernel_HWIO[i, j] for i in range(3) for j in range(3))
  return out if bias is None else out + bias


def _lrelu(x):
  return np.where(x > 0, x, 0.2 * x)


def _reference_forward(params, emb, init, width, deep=False):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = _bn(np.asarray(emb, np.float64), p["embed_norm"])
  nl = p[NOISY_LAYER]
  # NAYER's loop: chunk i of K consecutive rows through Linear i.
  x = np.concatenate([x[i * K:(i + 1) * K] @ nl["kernel"][i] + nl["bias"][i]
                      for i in range(nl["kernel"].shape[0])])
  x = (x @ p["project"]["kernel"] + p["project"]["bias"]).reshape(-1, init, init, width)
  if not deep:
    x = _bn(x, p["project_norm"])
  i = 1
  while f"conv{i}" in p:
    if not (deep and i == 1):
      x = x.repeat(2, axis=1).repeat(2, axis=2)
    x = _lrelu(_bn(_conv3x3(x, p[f"conv{i}"]["kernel"]), p[f"norm{i}"]))
    i += 1
  x = _conv3x3(x, p["to_image"]["kernel"], p["to_image"]["bias"])
  return 1 / (1 + np.exp(-x))


def test_matches_float64_reference_32():
  gen, params, emb = _setup()
  # Non-trivial BN affine params, so a missing scale/bias would show.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(treedef, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  out = gen.apply({"params": params}, emb)
  chex.assert_shape(out, (2 * K, 32, 32, 3))
  np.testing.assert_allclose(out, _reference_forward(params, emb, init=8, width=8), atol=2e-5)


def test_matches_float64_reference_224_deep_layout():
  """224 px is NAYER's NLDeepGenerator: no BN after the projection, first conv at 14x14."""
  gen, params, emb = _setup(img_size=224, ngf=2, noise_dim=4, batch=K)
  assert "project_norm" not in params
  shapes = {name: params[name]["kernel"].shape for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
  assert shapes == {"conv1": (3, 3, 4, 4), "conv2": (3, 3, 4, 4), "conv3": (3, 3, 4, 2),
                    "conv4": (3, 3, 2, 2), "conv5": (3, 3, 2, 2)}
  assert params["project"]["kernel"].shape == (4, 4 * 14 * 14)
  out = gen.apply({"params": params}, emb)
  chex.assert_shape(out, (K, 224, 224, 3))
  np.testing.assert_allclose(out, _reference_forward(params, emb, init=14, width=4, deep=True),
                             atol=2e-5)


@pytest.mark.parametrize("img_size,init", [(32, 8), (64, 16)])
def test_shape_range_and_layout(img_size, init):
  gen, params, emb = _setup(img_size=img_size)
  assert gen.layout()[0] == init
  assert params["project"]["kernel"].shape == (8, 8 * init * init)
  out = gen.apply({"params": params}, emb)
  chex.assert_shape(out, (2 * K, img_size, img_size, 3))
  assert out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert float(out.std()) > 1e-3  # Not a constant image.


def test_params_only_and_sized_by_batch():
  gen, params, emb = _setup(batch=4 * K)
  variables = gen.init(jax.random.key(0), emb)
  assert set(variables) == {"params"}  # No batch_stats: always batch statistics.
  assert params[NOISY_LAYER]["kernel"].shape == (4, D, 8)
  assert params[NOISY_LAYER]["bias"].shape == (4, 8)
  with pytest.raises(ValueError, match=r"hold 4 noisy-layer Linears, but a batch of 6 embeddings "
                     r"in chunks of 3 rows \(one per class\) needs 2"):
    gen.apply({"params": params}, emb[:2 * K])
  with pytest.raises(ValueError, match=r"not a multiple of 3: .* of 3 rows \(one per class\)"):
    init_generator(jax.random.key(0), gen, 2 * K + 1, D)


def test_bad_image_size_is_rejected():
  with pytest.raises(ValueError, match="divisible by 2\\*\\*num_upsamples"):
    Generator(num_classes=K, img_size=30).layout()


def test_noisy_layer_applies_a_different_linear_per_chunk():
  gen, params, emb = _setup()
  out = gen.apply({"params": params}, emb)
  swap_rows = np.r_[K:2 * K, 0:K]
  # Swapping the two input chunks *and* the two Linears swaps the outputs: the
  # rest of the generator treats rows alike (batch statistics are row-order free).
  nl = params[NOISY_LAYER]
  swapped = {**params, NOISY_LAYER: {"kernel": nl["kernel"][::-1], "bias": nl["bias"][::-1]}}
  np.testing.assert_allclose(gen.apply({"params": swapped}, emb[swap_rows]), out[swap_rows], atol=1e-5)
  # Swapping the chunks alone sends each through the other Linear: different images.
  moved = gen.apply({"params": params}, emb[swap_rows])
  assert float(jnp.abs(moved - out[swap_rows]).max()) > 1e-2
  # Within a chunk the same Linear applies to every row: permuting rows inside
  # chunk 0 only permutes its outputs.
  perm = np.r_[[2, 0, 1], K:2 * K]
  np.testing.assert_allclose(gen.apply({"params": params}, emb[perm]), out[perm], atol=1e-5)


def test_noisy_layer_einsum_matches_per_chunk_linears():
  layer = generator_lib.NoisyLayer(num_classes=K, features=6)
  x = jax.random.normal(jax.random.key(3), (4 * K, D))
  v = layer.init(jax.random.key(4), x)
  kernel, bias = (np.asarray(v["params"][n], np.float64) for n in ("kernel", "bias"))
  ref = np.concatenate([np.asarray(x[i * K:(i + 1) * K], np.float64) @ kernel[i] + bias[i]
                        for i in range(4)])
  np.testing.assert_allclose(layer.apply(v, x), ref, atol=1e-5)


def test_fresh_noisy_layer_has_pytorch_default_init():
  """nn.Linear(D, F) default: U(+-1/sqrt(D)) for weights and biases, fan_in D per chunk."""
  gen = Generator(num_classes=K, noise_dim=64, ngf=2)
  nl = init_generator(jax.random.key(0), gen, 20 * K, 16)[NOISY_LAYER]
  bound = 1 / np.sqrt(16)
  for leaf, n in ((nl["kernel"], 20 * 16 * 64), (nl["bias"], 20 * 64)):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.95 * bound
    assert abs(leaf.std() - bound / np.sqrt(3)) < 5 / np.sqrt(n) * bound


def test_reinit_changes_only_the_noisy_layer_and_draws_standard_normal():
  gen = Generator(num_classes=K, noise_dim=64, ngf=2)
  params = init_generator(jax.random.key(0), gen, 20 * K, 16)
  rng = jax.random.key(42)
  new = reinit_noisy_layer(params, rng)
  kernel = new[NOISY_LAYER]["kernel"]
  np.testing.assert_array_equal(kernel, jax.random.normal(rng, (20, 16, 64)))
  np.testing.assert_array_equal(new[NOISY_LAYER]["bias"], np.zeros((20, 64)))
  k = np.asarray(kernel).ravel()  # 20480 draws: mean and std within ~5 standard errors.
  assert abs(k.mean()) < 0.035 and abs(k.std() - 1.0) < 0.03
  assert np.abs(k).max() > 3.0  # Gaussian tails; the uniform init stays below 0.25.
  for name in params:
    if name != NOISY_LAYER:
      chex.assert_trees_all_equal(new[name], params[name])
  # Pure: the input params are untouched, and a new rng gives a new draw.
  assert float(np.abs(params[NOISY_LAYER]["kernel"]).max()) <= 0.25
  other = reinit_noisy_layer(params, jax.random.key(43))[NOISY_LAYER]["kernel"]
  assert not np.allclose(other, kernel)


def test_batch_statistics_couple_the_rows():
  gen, params, emb = _setup()
  out = gen.apply({"params": params}, emb)
  # Change chunk 1 only: chunk 0's images change too, through every BatchNorm.
  changed = emb.at[K:].set(emb[K:] * 3.0 + 1.0)
  out2 = gen.apply({"params": params}, changed)
  assert float(jnp.abs(out2[:K] - out[:K]).max()) > 1e-3
  # The first BatchNorm normalises each feature over the batch, so a common
  # affine change of every embedding leaves every image unchanged.
  np.testing.assert_allclose(gen.apply({"params": params}, emb * 5.0 - 2.0), out, atol=1e-4)


def test_gradient_is_finite_and_reaches_every_param():
  gen, params, emb = _setup()
  target = jax.random.uniform(jax.random.key(9), (2 * K, 32, 32, 3))

  @jax.jit
  def loss(p):
    return jnp.mean(jnp.square(gen.apply({"params": p}, emb) - target))

  grads = jax.grad(loss)(params)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_equal_shapes(grads, params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_bfloat16_compute_keeps_float32_output():
  gen = Generator(num_classes=K, noise_dim=8, ngf=4, dtype=jnp.bfloat16)
  params = init_generator(jax.random.key(0), gen, 2 * K, D)
  out = gen.apply({"params": params}, jax.random.normal(jax.random.key(1), (2 * K, D)))
  ref_gen, _, _ = _setup()
  ref = ref_gen.apply({"params": params}, jax.random.normal(jax.random.key(1), (2 * K, D)))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05)


# ----------------- noisy-layer chunking: per_view / per_group ---------------- #

def _init(gen, batch, seed=0):
  """Random params of init_generator's shapes, the noisy layer ~ N(0, 1) as in every round.

  Drawn with NumPy from `jax.eval_shape`: compiling Flax's init costs seconds on CPU.
  """
  shapes = jax.eval_shape(lambda: init_generator(jax.random.key(0), gen, batch, D))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  kernel = jnp.asarray(rng.normal(size=params[NOISY_LAYER]["kernel"].shape), jnp.float32)
  return {**params, NOISY_LAYER: {**params[NOISY_LAYER], "kernel": kernel}}


def _noisy_and_images(gen, params, emb):
  """The noisy layer's output (captured) and the images, for one batch."""
  is_noisy = lambda module, method: isinstance(module, generator_lib.NoisyLayer)
  apply = jax.jit(lambda p, e: gen.apply({"params": p}, e, capture_intermediates=is_noisy,
                                         mutable=["intermediates"]))
  images, state = apply(params, emb)
  return np.asarray(state["intermediates"][NOISY_LAYER]["__call__"][0]), np.asarray(images)


def test_per_group_chunks_share_one_linear_per_cncl_group():
  from caedfkd_jax.synthesis import cend
  groups, sources = 2, 2
  views = sources + 1
  rows = generator_lib.noisy_chunk_rows("per_group", K, views)
  assert rows == K * views and generator_lib.noisy_chunk_rows("per_view", K, views) == K
  table = jax.random.normal(jax.random.key(5), (K, D))
  make_batch = jax.jit(lambda m: cend.build_generator_batch(jax.random.key(6), table, groups,
                                                            sources, magnitude=m))
  batch = make_batch(0.0)
  group_B, src_B = np.asarray(batch.group_B), np.asarray(batch.source_index_B)
  per_group = Generator(num_classes=K, img_size=8, noise_dim=8, ngf=4, noisy_chunk_rows=rows)
  params = _init(per_group, groups * rows)
  assert params[NOISY_LAYER]["kernel"].shape == (groups, D, 8)   # num_groups chunks, not B // K
  assert params[NOISY_LAYER]["bias"].shape == (groups, 8)
  noisy, images = _noisy_and_images(per_group, params, batch.embeddings_BxD)
  # Magnitude 0: an anchor and its N positives are one embedding through one Linear.
  by_view = lambda x: x.reshape(groups, views, K, *x.shape[1:])
  for x in (by_view(noisy), by_view(images)):
    np.testing.assert_allclose(x, np.broadcast_to(x[:, :1], x.shape), rtol=0, atol=1e-6)
    assert np.abs(x[0] - x[1]).max() > 1e-2          # groups still differ by projection
  # per_view (NAYER): B // K Linears, one per view, so even at magnitude 0 every positive
  # differs from its anchor.
  per_view = Generator(num_classes=K, img_size=8, noise_dim=8, ngf=4)
  params_v = _init(per_view, groups * rows)
  assert params_v[NOISY_LAYER]["kernel"].shape == (groups * views, D, 8)
  noisy_v, images_v = _noisy_and_images(per_view, params_v, batch.embeddings_BxD)
  assert np.abs(by_view(noisy_v)[:, 1:] - by_view(noisy_v)[:, :1]).max(axis=-1).min() > 1e-2
  assert np.abs(by_view(images_v)[:, 1:] - by_view(images_v)[:, :1]).max() > 1e-2
  # A hand computation: BatchNorm1d, then row b through Linear group_B[b] (kernel gathered per row).
  noisy_batch = make_batch(0.3)
  noisy, _ = _noisy_and_images(per_group, params, noisy_batch.embeddings_BxD)
  emb = np.asarray(noisy_batch.embeddings_BxD, np.float32)
  scale, shift = (np.asarray(params["embed_norm"][n]) for n in ("scale", "bias"))
  x = (emb - emb.mean(0)) / np.sqrt(emb.var(0) + 1e-5) * scale + shift
  kernel, bias = (np.asarray(params[NOISY_LAYER][n]) for n in ("kernel", "bias"))
  expected = np.einsum("bd,bdf->bf", x, kernel[group_B]) + bias[group_B]
  np.testing.assert_allclose(noisy, expected, rtol=1e-5, atol=1e-4)
  assert np.abs(by_view(noisy)[:, 1:] - by_view(noisy)[:, :1]).max() > 1e-2   # noise shows now
  assert src_B.reshape(groups, views, K)[0, :, 0].tolist() == list(range(views))


def test_noisy_chunk_errors_name_the_chunking():
  with pytest.raises(ValueError, match="Unknown noisy_chunks 'per_class'"):
    generator_lib.noisy_chunk_rows("per_class", K, 2)
  per_group = Generator(num_classes=K, img_size=8, noise_dim=8, ngf=4, noisy_chunk_rows=2 * K)
  with pytest.raises(ValueError, match=r"not a multiple of 6: .*\(one CNCL group: num_classes=3 "
                     r"x 2 views, noisy_chunks=per_group\)"):
    init_generator(jax.random.key(0), per_group, 3 * K, D)
  with pytest.raises(ValueError, match="chunks of 4 rows are not a multiple of num_classes=3"):
    init_generator(jax.random.key(0), Generator(num_classes=K, img_size=8, noisy_chunk_rows=4),
                   4 * K, D)
  # per_view params (4 Linears for 12 rows) do not fit a per_group generator (2 for 12 rows).
  params = _init(Generator(num_classes=K, img_size=8, noise_dim=8, ngf=4), 4 * K)
  with pytest.raises(ValueError, match=r"hold 4 noisy-layer Linears, but a batch of 12 "
                     r"embeddings in chunks of 6 rows .* needs 2"):
    per_group.apply({"params": params}, jnp.zeros((4 * K, D)))
