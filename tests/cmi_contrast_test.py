"""CMI's contrastive pieces against a PyTorch restatement of the authors' code, and invariants."""

import functools

import chex
import jax
import numpy as np
import pytest
import torch

from caedfkd_jax import models
from caedfkd_jax.io import convert, torch_zoo
from caedfkd_jax.models.layers import BN_INSTANCE_MEANS, BN_STATS
from caedfkd_jax.synthesis import cmi_contrast

D = 6
TEMPERATURE = 0.1


def _features(seed: int, rows: int, d: int = D) -> np.ndarray:
  # NumPy, not jax.random: every eager draw of a new shape would compile its own program.
  return np.random.RandomState(seed).randn(rows, d).astype(np.float32)


def _torch_cmi_loss(head_params, local, global_, cached_local, cached_global, temperature):
  """The authors' synthesize() step for L_cr, restated in float64 PyTorch (MLPHead + naive CE).

  Returns the loss and the gradients w.r.t. the local and global features and the head.
  """
  as_t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
  w1, b1 = as_t(head_params["fc1"]["kernel"]), as_t(head_params["fc1"]["bias"])
  w2, b2 = as_t(head_params["fc2"]["kernel"]), as_t(head_params["fc2"]["bias"])
  local_t, global_t = as_t(local), as_t(global_)

  def head(x):
    return torch.nn.functional.normalize(torch.relu(x @ w1 + b1) @ w2 + b2, dim=1, p=2)

  cached_local_t = torch.tensor(np.asarray(cached_local, np.float64))
  cached_global_t = torch.tensor(np.asarray(cached_global, np.float64))
  proj = head(torch.cat([local_t, cached_local_t, global_t, cached_global_t], dim=0))
  proj_local, proj_global = torch.chunk(proj, chunks=2, dim=0)
  logits = proj_local @ proj_global.detach().T / temperature
  loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)), reduction="none")
  n = local_t.shape[0]
  loss = loss[:n].mean() + loss[n:].mean() if len(cached_local) else loss.mean()
  loss.backward()
  loss = loss.item()
  grad_global = global_t.grad if global_t.grad is not None else torch.zeros_like(global_t)
  grads = {"fc1": {"kernel": w1.grad, "bias": b1.grad}, "fc2": {"kernel": w2.grad, "bias": b2.grad}}
  to_np = lambda t: t.detach().numpy()
  return loss, to_np(local_t.grad), to_np(grad_global), jax.tree.map(to_np, grads)


def _head(seed: int = 0, d: int = D, features: int = 8):
  return cmi_contrast.init_head(jax.random.key(seed), d, features)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(head, params, local, global_, mem_local, mem_global, mask):
  """The loss and its gradients w.r.t. (head params, local features, global features)."""
  loss_fn = lambda p, lo, gl: cmi_contrast.contrastive_loss(
      p, head, lo, gl, mem_local, mem_global, mask, TEMPERATURE)
  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(params, local, global_)


class ContrastiveLossTest(chex.TestCase):
  """B = 4 current rows throughout and 0, 5 or 9 cached rows: three compiled programs in all."""

  def test_matches_torch_restatement_of_cmi(self):
    head, params = _head()
    local, global_ = _features(1, 4), _features(2, 4)
    mem_local, mem_global = _features(3, 5), _features(4, 5)
    for n_cached in (5, 0):  # With cached rows, and CMI's empty-bank case.
      loss, (g_params, g_local, g_global) = _loss_and_grads(
          head, params, local, global_, mem_local[:n_cached], mem_global[:n_cached],
          np.ones((n_cached,), bool))
      ref_loss, ref_local, ref_global, ref_params = _torch_cmi_loss(
          params, local, global_, mem_local[:n_cached], mem_global[:n_cached], TEMPERATURE)
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
      np.testing.assert_allclose(g_local, ref_local, rtol=1e-4, atol=1e-6)
      # The global view's projection is detached, as in CMI: no gradient reaches it.
      np.testing.assert_array_equal(ref_global, 0.0)
      np.testing.assert_array_equal(g_global, 0.0)
      chex.assert_trees_all_close(g_params, ref_params, rtol=1e-4, atol=1e-6)
      assert float(np.abs(g_local).sum()) > 0

  def test_masked_cached_rows_change_nothing(self):
    head, params = _head(seed=3)
    local, global_ = _features(5, 4), _features(6, 4)
    mem_local, mem_global = _features(7, 5), _features(8, 5)
    valid = _loss_and_grads(head, params, local, global_, mem_local, mem_global, np.ones(5, bool))
    # Interleave 4 rows of large garbage, masked out, among the valid ones.
    junk_local, junk_global = 50 * _features(9, 4), 50 * _features(10, 4)
    order = np.array([0, 5, 1, 6, 7, 2, 3, 8, 4])  # < 5: valid rows, >= 5: junk
    padded_local = np.concatenate([mem_local, junk_local])[order]
    padded_global = np.concatenate([mem_global, junk_global])[order]
    masked = _loss_and_grads(head, params, local, global_, padded_local, padded_global,
                             order < 5)
    chex.assert_trees_all_close(masked, valid, rtol=1e-5, atol=1e-6)
    # All cached rows masked: the current-rows loss alone, as CMI with an empty bank.
    none = _loss_and_grads(head, params, local, global_, padded_local, padded_global,
                           np.zeros(9, bool))
    empty = _loss_and_grads(head, params, local, global_, np.zeros((0, D), np.float32),
                            np.zeros((0, D), np.float32), np.zeros(0, bool))
    chex.assert_trees_all_close(none, empty, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(none)

  def test_matching_views_give_a_lower_loss(self):
    """Meaning, not just arithmetic: views of the same instance score better than shuffled ones."""
    head, params = _head(seed=4)
    local = _features(11, 4)
    global_ = local + 0.01 * _features(12, 4)
    no_memory = np.zeros((0, D), np.float32)
    loss = lambda g: float(_loss_and_grads(head, params, local, g, no_memory, no_memory,
                                           np.zeros(0, bool))[0])
    assert loss(global_) < loss(global_[::-1])


def test_head_is_unit_norm_with_torch_default_init():
  head, params = _head()
  chex.assert_shape((params["fc1"]["kernel"], params["fc2"]["kernel"]), ((D, D), (D, 8)))
  for layer in ("fc1", "fc2"):  # U(+-1/sqrt(fan_in)), fan_in = D for both.
    for leaf in params[layer].values():
      assert 0.5 / np.sqrt(D) < float(np.abs(leaf).max()) <= 1 / np.sqrt(D)
  out = jax.jit(head.apply)({"params": params}, _features(13, 5))
  chex.assert_shape(out, (5, 8))
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
  # CMI's default head width, from shapes alone (nothing compiled).
  shapes = jax.eval_shape(cmi_contrast.ContrastHead().init, jax.random.key(0), np.zeros((1, 12)))
  chex.assert_shape(shapes["params"]["fc2"]["kernel"], (12, cmi_contrast.HEAD_DIM))
  assert cmi_contrast.HEAD_DIM == 256


class FeatureMemoryTest(chex.TestCase):

  def test_ring_wraps_and_keeps_the_newest(self):
    memory = cmi_contrast.create(5, 2)
    rows = np.arange(2, dtype=np.float32)[:, None].repeat(2, 1)  # Batch i: 10 i + 1 + row, local
    batches = [(rows + 10 * i + 1, rows + 10 * i + 2) for i in range(3)]
    add = jax.jit(cmi_contrast.add)
    sizes, nexts = [], []
    for lo, gl in batches:
      memory = add(memory, lo, gl)
      sizes.append(int(memory.size))
      nexts.append(int(memory.next))
    assert sizes == [2, 4, 5] and nexts == [2, 4, 1]
    # Writes at 0-1, 2-3, then 4 and 0 (wrapped): batch 2's second row overwrote slot 0.
    expected_local = np.array([22, 2, 11, 12, 21], np.float32)[:, None].repeat(2, 1)
    np.testing.assert_array_equal(memory.features[:, :2], expected_local)
    np.testing.assert_array_equal(memory.features[:, 2:], expected_local + 1)
    with pytest.raises(ValueError, match="does not fit"):
      cmi_contrast.add(memory, np.zeros((6, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="shape"):
      cmi_contrast.add(memory, np.zeros((2, 3)), np.zeros((2, 3)))

  def test_negatives_are_distinct_filled_rows_with_a_mask(self):
    memory = cmi_contrast.create(8, 1)
    stored = np.arange(1.0, 4.0, dtype=np.float32)[:, None]
    memory = jax.jit(cmi_contrast.add)(memory, stored, -stored)
    sample = jax.jit(cmi_contrast.sample_negatives, static_argnums=2)
    for n_neg in (2, 5, 12):  # Fewer than filled, more than filled, more than the capacity.
      lo, gl, mask = sample(memory, jax.random.key(n_neg), n_neg)
      chex.assert_shape((lo, gl, mask), ((n_neg, 1), (n_neg, 1), (n_neg,)))
      picked = np.asarray(lo[:, 0])[np.asarray(mask)]
      assert int(mask.sum()) == min(n_neg, 3)
      assert len(set(picked.tolist())) == len(picked) and set(picked.tolist()) <= {1.0, 2.0, 3.0}
      np.testing.assert_array_equal(gl[:, 0], -lo[:, 0])  # Halves stay paired.
      np.testing.assert_array_equal(lo[~np.asarray(mask)], 0.0)

  def test_negatives_from_a_full_memory_are_uniform_and_keyed(self):
    memory = cmi_contrast.create(10, 1)
    memory = jax.jit(cmi_contrast.add)(memory, np.arange(10.0, dtype=np.float32)[:, None],
                                       np.zeros((10, 1), np.float32))
    sample = jax.jit(cmi_contrast.sample_negatives, static_argnums=2)
    counts = np.zeros(10)
    for i in range(300):
      lo, _, mask = sample(memory, jax.random.key(i), 4)
      assert bool(mask.all())
      rows = np.asarray(lo[:, 0]).astype(int)
      assert len(set(rows.tolist())) == 4
      counts[rows] += 1
    np.testing.assert_allclose(counts / 1200, 0.1, atol=0.035)
    a, b = sample(memory, jax.random.key(7), 4), sample(memory, jax.random.key(7), 4)
    chex.assert_trees_all_equal(a, b)


def _tiny_teacher(arch: str = "resnet_tiny_a"):
  torch.manual_seed(0)
  ref = torch_zoo.build(arch, 10).eval()
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.num_features))
        m.running_var.copy_(0.5 + torch.rand(m.num_features))
  state_dict = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  return ref, models.create_model(arch, 10), convert.state_dict_to_variables(state_dict, arch, 10)


def _images(b: int = 3, size: int = 16) -> np.ndarray:
  return np.random.RandomState(0).randn(b, size, size, 3).astype(np.float32)


def test_instance_features_average_to_the_batch_bn_means():
  _, teacher, variables = _tiny_teacher()

  @jax.jit
  def run(variables, x):
    out = cmi_contrast.teacher_instance_features(teacher, variables, x)
    _, state = teacher.apply(variables, x, train=False, mutable=[BN_INSTANCE_MEANS])
    # Per layer, in feature order: (its instance means, the sown batch mean of its BN input).
    pairs = []
    for path, means in cmi_contrast.instance_mean_layers(state[BN_INSTANCE_MEANS]):
      node = out[2]
      for name in path:
        node = node[name]
      pairs.append((means, node["mean"]))
    plain = teacher.apply(variables, x, train=False, mutable=[BN_STATS])
    return out, pairs, plain

  (logits, features, bn_stats), pairs, ((plain_logits, _), plain_state) = run(
      variables, _images())
  channels = [leaf.shape[0] for leaf in jax.tree.leaves(variables["batch_stats"])[::2]]
  assert len(pairs) == len(channels) == 7
  chex.assert_shape(features, (3, sum(channels)))  # resnet_tiny_a: 4 + 4 + 4 + 8 + 8 + 16 + 16
  assert features.shape[1] == 60
  start = 0
  for means, batch_mean in pairs:
    c = means.shape[1]
    np.testing.assert_array_equal(features[:, start:start + c], means)
    np.testing.assert_allclose(means.mean(0), batch_mean, rtol=1e-5, atol=1e-6)
    start += c
  assert start == features.shape[1]
  # The extra collection changes nothing else, and is absent unless asked for.
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-6, atol=1e-6)
  assert set(plain_state) == {BN_STATS}
  chex.assert_trees_all_close(bn_stats, plain_state[BN_STATS], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet_tiny_a", "wrn_tiny"])
def test_instance_features_equal_cmi_hooks_on_the_torch_twin(arch):
  """CMI's InstanceMeanHook on every BatchNorm2d, concatenated in teacher.modules() order."""
  ref, teacher, variables = _tiny_teacher(arch)
  hooked = []
  for m in ref.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      hooked.append({})
      m.register_forward_hook(
          lambda _, inputs, __, store=hooked[-1]: store.update(mean=inputs[0].mean((2, 3))))
  x = _images()
  with torch.no_grad():
    ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  expected = torch.cat([h["mean"] for h in hooked], dim=1).numpy()
  features = jax.jit(
      lambda v, x: cmi_contrast.teacher_instance_features(teacher, v, x)[1])(variables, x)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
