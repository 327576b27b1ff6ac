"""`caedfkd transfer`'s step split over devices gives the one-device step (on equal inputs)."""

import jax
import numpy as np
import pytest

from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.runtime import mesh as mesh_lib
from caedfkd_jax.transfer import data as data_lib
from caedfkd_jax.transfer import train as train_lib


def _tiny(seed: int = 0) -> data_lib.DenseDataset:
  rng = np.random.default_rng(seed)
  n, h, w = 8, 16, 16
  depth = rng.uniform(1, 5, (n, h, w, 1)).astype(np.float32)
  normal = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  return data_lib.DenseDataset(rng.uniform(0, 1, (n, h, w, 3)).astype(np.float32),
                               rng.integers(-1, 3, (n, h, w)).astype(np.int32), 3, depth, normal)


def test_two_devices_take_the_one_device_step():
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices (the suite simulates 8 CPU devices in conftest.py)")
  spec = bundle_lib.ModelSpec("resnet8", 3, 16)
  bundle = bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 1))
  data = _tiny()
  # finetune: gradients through the heads and the backbone; the linear heads compile fastest.
  config = train_lib.TransferConfig(protocol="finetune", head="linear", batch_size=8,
                                    eval_batch_size=8, learning_rate=1e-3, progress=False)
  states = []
  for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
    trainer = train_lib.Trainer(bundle, data, config, seed=0,
                                mesh=mesh_lib.make_mesh(devices))
    state, losses = trainer.step(trainer.initial_state, data.batch(np.arange(8)))
    first = (jax.device_get(state), float(losses["loss"]))
    _, losses = trainer.step(state, data.batch(np.arange(8)[::-1]))
    states.append((*first, float(losses["loss"])))
  (one, loss_one, next_one), (two, loss_two, next_two) = states
  assert np.isfinite(loss_one) and next_one != loss_one
  np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
  # The second step's loss reads every weight the first step moved: a gradient reduced over
  # half the batch, or not at all, would move many of them the wrong way.
  np.testing.assert_allclose(next_two, next_one, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(two.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # Adam's first step is lr * g / (|g| + eps): a gradient within rounding of 0 may come out with
  # either sign on either path, so a few elements may differ by up to 2 lr, and no more.
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                         zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params))])
  assert diff.max() <= 2 * config.learning_rate * 1.001
  assert np.mean(diff > 1e-5) < 1e-2, np.mean(diff > 1e-5)


def test_the_default_mesh_splits_both_batches_evenly():
  count = jax.local_device_count()
  assert train_lib.default_mesh(8, 8).size == np.gcd(8, count)
  assert train_lib.default_mesh(6, 4).size == np.gcd(2, count)
  assert train_lib.default_mesh(5, 8).size == 1
