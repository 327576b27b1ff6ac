"""The transfer loop (transfer/model.py, transfer/train.py): the frozen protocol leaves the backbone
bit-identical, the optimiser is torch's Adam with L2 and StepLR, epoch orders, the bundle's weights
reach the backbone, an interrupted seed resumes exactly, and a segmentation head learns from
features that carry the class but not from random ones."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.io import data as data_io
from caedfkd_jax.runtime import mesh as mesh_lib
from caedfkd_jax.transfer import data as data_lib
from caedfkd_jax.transfer import heads, losses, metrics
from caedfkd_jax.transfer import model as model_lib
from caedfkd_jax.transfer import train as train_lib

ARCH = "resnet_tiny_a"   # The smallest CIFAR ResNet: stages at strides 1, 2, 4.
SIZE = 16
NUM_CLASSES = 3


def _dataset(count: int, seed: int) -> data_lib.DenseDataset:
  """Random NYUv2-like examples: images in [0, 1], labels with some -1, depth > 0, unit normals."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (count, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(-1, NUM_CLASSES, (count, SIZE, SIZE)).astype(np.int32)
  depth = rng.uniform(0.5, 5.0, (count, SIZE, SIZE, 1)).astype(np.float32)
  normal = rng.normal(size=(count, SIZE, SIZE, 3))
  normal = (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)
  return data_lib.DenseDataset(images, labels, NUM_CLASSES, depth, normal)


def _numpy(tree):
  """A host copy that no donated buffer can alias."""
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _flat(tree):
  return traverse_util.flatten_dict(tree)


@pytest.fixture(scope="module")
def bundle():
  spec = bundle_lib.ModelSpec(ARCH, 10, 32)
  variables = bundle_lib.init_variables(spec, 1)
  # Non-default running statistics, so that "the bundle's" is told apart from "fresh".
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.25, variables["batch_stats"])
  # Host arrays, as load_bundle gives them (see test_a_trainer_leaves_the_bundles_arrays_alone).
  return bundle_lib.Bundle(spec, _numpy(variables))


@pytest.fixture(scope="module")
def splits():
  return _dataset(16, 0), _dataset(8, 1)


@pytest.fixture(scope="module")
def one_device():
  return mesh_lib.make_mesh(jax.devices()[:1])


FINETUNE = train_lib.TransferConfig(   # Augmented, so that the exact resume covers its draws.
    protocol="finetune", head="linear", epochs=2, augment=True,
    batch_size=4, eval_batch_size=4, lr_halve_every=1, learning_rate=1e-3, progress=False)


# ---------------------------------------------------------------------------
# Protocols.


def test_frozen_protocol_leaves_the_backbone_bit_identical_and_trains_the_heads(
    bundle, splits, one_device):
  train, _ = splits
  config = train_lib.TransferConfig(protocol="frozen", epochs=1, batch_size=4, eval_batch_size=4,
                                    learning_rate=1e-2, progress=False)
  trainer = train_lib.Trainer(bundle, train, config, seed=0, mesh=one_device)
  assert trainer.spec.head == "linear" and trainer.tasks == data_lib.TASKS
  before = _numpy(trainer.initial_state)
  state = trainer.initial_state
  for idx in train_lib.epoch_order(0, 0, len(train), trainer.batch)[:3]:
    state, terms = trainer.step(state, train.batch(idx))
    assert set(terms) == {"loss", *data_lib.TASKS} and np.isfinite(float(terms["loss"]))
  after = _numpy(state)
  assert int(after.step) == 3
  for collection in ("params", "batch_stats"):
    b = _flat(getattr(before, collection)[model_lib.BACKBONE])
    a = _flat(getattr(after, collection)[model_lib.BACKBONE])
    assert b.keys() == a.keys() and b
    for path in b:
      np.testing.assert_array_equal(a[path], b[path], err_msg=f"{collection} {path}")
  for task in data_lib.TASKS:
    head = f"head_{task}"
    b, a = _flat(before.params[head]), _flat(after.params[head])
    assert not np.array_equal(a[("classifier", "kernel")], b[("classifier", "kernel")]), task
    # The probe's BN runs in train mode: its running statistics move.
    assert not np.array_equal(after.batch_stats[head]["bn"]["mean"],
                              before.batch_stats[head]["bn"]["mean"]), task


def test_a_trainer_leaves_the_bundles_arrays_alone(bundle, splits, one_device):
  train, _ = splits
  on_device = bundle_lib.Bundle(bundle.spec, jax.tree.map(jnp.asarray, bundle.variables))
  config = train_lib.TransferConfig(protocol="frozen", epochs=1, batch_size=4, eval_batch_size=4,
                                    learning_rate=1e-2, progress=False)
  trainer = train_lib.Trainer(on_device, train, config, seed=0, mesh=one_device)
  trainer.step(trainer.initial_state, train.batch(np.arange(4)))
  deleted = [p for p, v in _flat(on_device.variables["params"]).items() if v.is_deleted()]
  assert not deleted, deleted


def test_finetune_protocol_trains_the_backbone(finetune_run):
  initial, final = finetune_run["initial"], finetune_run["final"]
  b, a = _flat(initial.params[model_lib.BACKBONE]), _flat(final.params[model_lib.BACKBONE])
  changed = [p for p in b if not np.array_equal(a[p], b[p])]
  assert len(changed) == len(b), sorted(set(b) - set(changed))
  # Train-mode BatchNorm in the backbone: its running statistics move too.
  bs_b = _flat(initial.batch_stats[model_lib.BACKBONE])
  bs_a = _flat(final.batch_stats[model_lib.BACKBONE])
  assert any(not np.array_equal(bs_a[p], bs_b[p]) for p in bs_b)


# ---------------------------------------------------------------------------
# The optimiser.


def _torch_adam_reference(params, grads_per_step, lr, wd, halve_every_steps, b1=0.9, b2=0.999,
                          eps=1e-8):
  """torch.optim.Adam(lr, weight_decay=wd) with StepLR(step_size=1 epoch, gamma=0.5), float64."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_per_step, start=1):
    lr_t = lr * 0.5 ** ((t - 1) // halve_every_steps)
    for k, value in p.items():
      g = grads[k].astype(np.float64) + wd * value
      m[k] = b1 * m[k] + (1 - b1) * g
      v2[k] = b2 * v2[k] + (1 - b2) * g * g
      denom = np.sqrt(v2[k]) / np.sqrt(1 - b2 ** t) + eps
      p[k] = value - lr_t / (1 - b1 ** t) * m[k] / denom
  return p


@pytest.mark.parametrize("protocol", ["finetune", "frozen"])
def test_make_optimizer_is_torch_adam_with_l2_and_step_lr(protocol):
  rng = np.random.default_rng(0)
  params = {model_lib.BACKBONE: {"w": rng.normal(size=(3, 2)).astype(np.float32)},
            "head_segmentation": {"w": rng.normal(size=(4,)).astype(np.float32),
                                  "b": rng.normal(size=(2,)).astype(np.float32)}}
  steps_per_epoch, steps = 2, 5
  config = train_lib.TransferConfig(protocol=protocol, learning_rate=0.1, weight_decay=0.3,
                                    lr_halve_every=1)
  tx = train_lib.make_optimizer(config, steps_per_epoch, params)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
           for _ in range(steps)]
  state, current = tx.init(params), jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = tx.update(g, state, current)
    current = optax.apply_updates(current, updates)
  got = {"/".join(k): np.asarray(v) for k, v in _flat(current).items()}
  flat_params = {"/".join(k): v for k, v in _flat(params).items()}
  flat_grads = [{"/".join(k): v for k, v in _flat(g).items()} for g in grads]
  want = _torch_adam_reference(flat_params, flat_grads, 0.1, 0.3, steps_per_epoch)
  assert got.keys() == want.keys()
  for k, value in got.items():
    if protocol == "frozen" and k.startswith(model_lib.BACKBONE):
      np.testing.assert_array_equal(value, flat_params[k], err_msg=k)   # No update at all.
    else:
      np.testing.assert_allclose(value, want[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The halving matters: a constant learning rate lands elsewhere.
  constant = _torch_adam_reference(flat_params, flat_grads, 0.1, 0.3, 10 ** 9)
  k = "head_segmentation/w"
  assert np.max(np.abs(constant[k] - want[k])) > 1e-3
  # ... and so does the L2 term.
  no_wd = _torch_adam_reference(flat_params, flat_grads, 0.1, 0.0, steps_per_epoch)
  assert np.max(np.abs(no_wd[k] - want[k])) > 1e-4


def test_learning_rate_halves_every_lr_halve_every_epochs():
  """With a constant gradient Adam's step is lr (bias-corrected m / sqrt(v) = 1): the update
  sizes read the schedule off directly."""
  params = {"head_depth": {"w": np.zeros((1,), np.float32)}}
  config = train_lib.TransferConfig(learning_rate=0.1, weight_decay=0.0, lr_halve_every=1)
  tx = train_lib.make_optimizer(config, 2, params)
  state, sizes = tx.init(params), []
  for _ in range(5):
    updates, state = tx.update({"head_depth": {"w": np.ones((1,), np.float32)}}, state, params)
    sizes.append(-float(updates["head_depth"]["w"][0]))
  np.testing.assert_allclose(sizes, [0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-4)
  constant = train_lib.make_optimizer(dataclasses.replace(config, lr_halve_every=0), 2, params)
  state = constant.init(params)
  for _ in range(5):
    updates, state = constant.update({"head_depth": {"w": np.ones((1,), np.float32)}}, state,
                                     params)
  np.testing.assert_allclose(-float(updates["head_depth"]["w"][0]), 0.1, rtol=1e-4)


# ---------------------------------------------------------------------------
# Epoch orders.


def test_epoch_order_is_a_reproducible_drop_last_permutation():
  a = train_lib.epoch_order(3, 0, 10, 4)
  np.testing.assert_array_equal(a, train_lib.epoch_order(3, 0, 10, 4))
  assert a.shape == (2, 4) and a.dtype.kind == "i"
  assert len(set(a.ravel().tolist())) == 8 and set(a.ravel().tolist()) <= set(range(10))
  assert not np.array_equal(a, train_lib.epoch_order(3, 1, 10, 4))
  assert not np.array_equal(a, train_lib.epoch_order(4, 0, 10, 4))
  full = train_lib.epoch_order(0, 5, 12, 4)
  assert full.shape == (3, 4) and sorted(full.ravel().tolist()) == list(range(12))
  assert train_lib.epoch_order(0, 0, 3, 4).shape == (0, 4)   # Fewer examples than a batch.
  # Over many epochs every index is drawn and none twice within one.
  seen = set()
  for epoch in range(20):
    order = train_lib.epoch_order(7, epoch, 10, 3).ravel()
    assert len(set(order.tolist())) == len(order) == 9
    seen |= set(order.tolist())
  assert seen == set(range(10))


def test_the_shared_epoch_order_keeps_each_trainers_recorded_orders():
  # io.data.epoch_order replaced two copies; the batches of every recorded run must not move:
  # the transfer study's (salted) and `caedfkd train`'s (unsalted) permutations, as first written.
  for seed, epoch, n, batch in [(0, 0, 200, 8), (2, 7, 200, 8), (1, 3, 45000, 128)]:
    steps = n // batch
    transfer = np.random.default_rng([seed, epoch, n, 27]).permutation(n)[:steps * batch]
    np.testing.assert_array_equal(train_lib.epoch_order(seed, epoch, n, batch).ravel(), transfer)
    supervised = np.random.default_rng([seed, epoch]).permutation(n)[:steps * batch]
    np.testing.assert_array_equal(data_io.epoch_order(seed, epoch, n, batch).ravel(), supervised)


# ---------------------------------------------------------------------------
# init_variables.


@pytest.fixture(scope="module")
def dense_model():
  spec = model_lib.DenseSpec(ARCH, ("segmentation", "depth"), NUM_CLASSES, "linear", 8, (1, 2, 3))
  return model_lib.build(spec)


def test_init_variables_copies_the_bundles_backbone(bundle, dense_model):
  variables = model_lib.init_variables(dense_model, bundle, (SIZE, SIZE), jax.random.key(0))
  assert set(variables["params"]) == {model_lib.BACKBONE, "head_segmentation", "head_depth"}
  for collection in ("params", "batch_stats"):
    got = _flat(variables[collection][model_lib.BACKBONE])
    saved = _flat(bundle.variables[collection])
    if collection == "params":   # The classifier: no head reads it, so it stays fresh.
      assert got.pop(("linear", "kernel")).shape == (16, 1) and got.pop(("linear", "bias"))
    assert len(got) > 10
    for path, value in got.items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[path]), err_msg=str(path))
  fresh = model_lib.init_variables(dense_model, bundle, (SIZE, SIZE), jax.random.key(0),
                                   random_backbone=True)
  got = _flat(fresh["params"][model_lib.BACKBONE])
  saved = _flat(bundle.variables["params"])
  kernels = [p for p in got if p[-1] == "kernel" and p[0] != "linear"]
  assert kernels and all(not np.array_equal(got[p], saved[p]) for p in kernels)
  stats = _flat(fresh["batch_stats"][model_lib.BACKBONE])
  assert all(not np.array_equal(v, _flat(bundle.variables["batch_stats"])[p])
             for p, v in stats.items())
  # The heads are the same either way: one key, one initialisation.
  np.testing.assert_array_equal(fresh["params"]["head_depth"]["classifier"]["kernel"],
                                variables["params"]["head_depth"]["classifier"]["kernel"])


def test_init_variables_refuses_a_bundle_of_the_wrong_shape(bundle, dense_model):
  params = _flat(bundle.variables["params"])
  params[("layer2_0", "conv1", "kernel")] = np.zeros((3, 3, 4, 5), np.float32)
  wrong = bundle_lib.Bundle(bundle.spec, {"params": traverse_util.unflatten_dict(params),
                                          "batch_stats": bundle.variables["batch_stats"]})
  with pytest.raises(ValueError) as info:
    model_lib.init_variables(dense_model, wrong, (SIZE, SIZE), jax.random.key(0))
  message = str(info.value)
  assert "params layer2_0/conv1/kernel" in message and "(3, 3, 4, 5)" in message, message
  assert "(3, 3, 4, 8)" in message and "\n" not in message
  stats = _flat(bundle.variables["batch_stats"])
  del stats[("layer3_0", "bn2", "var")]
  missing = bundle_lib.Bundle(bundle.spec, {"params": bundle.variables["params"],
                                            "batch_stats": traverse_util.unflatten_dict(stats)})
  with pytest.raises(ValueError, match="batch_stats layer3_0/bn2/var is missing"):
    model_lib.init_variables(dense_model, missing, (SIZE, SIZE), jax.random.key(0))


# ---------------------------------------------------------------------------
# Resuming a seed.


class StopAfter:
  """A StopRequest that turns on after fit_seed has checked it `steps` times (once a step)."""

  def __init__(self, steps: int):
    self.left, self.signal_name = steps, None

  @property
  def requested(self) -> bool:
    self.left -= 1
    if self.left <= 0:
      self.signal_name = "the test"
    return self.signal_name is not None


def _final_state(folder: str, abstract):
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(folder), train_lib.CHECKPOINTS))
  try:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return step, _numpy(restored["state"])
  finally:
    manager.close()


@pytest.fixture(scope="module")
def finetune_run(bundle, splits, one_device, tmp_path_factory):
  """One uninterrupted finetune seed: its folder, result, initial and final states."""
  train, val = splits
  trainer = train_lib.Trainer(bundle, train, FINETUNE, seed=0, mesh=one_device)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.initial_state)
  initial = _numpy(trainer.initial_state)
  folder = str(tmp_path_factory.mktemp("uninterrupted") / "seed_0")
  result = train_lib.fit_seed(trainer, train, val, folder, {"run": "a"}, log=lambda _: None)
  step, final = _final_state(folder, abstract)
  return {"folder": folder, "result": result, "initial": initial, "final": final, "step": step,
          "abstract": abstract, "total": trainer.total_steps}


def test_a_stopped_seed_resumes_exactly(bundle, splits, one_device, finetune_run, tmp_path):
  train, val = splits
  want = finetune_run["result"]
  assert finetune_run["total"] == 8 and want["steps"] == 8 and finetune_run["step"] == 8
  folder = str(tmp_path / "seed_0")
  logs = []
  stop_at = 5   # In the last epoch: its loss sums are checkpointed half-way.
  trainer = train_lib.Trainer(bundle, train, FINETUNE, seed=0, mesh=one_device)
  assert train_lib.fit_seed(trainer, train, val, folder, {"run": "a"}, StopAfter(stop_at),
                            log=logs.append) is None
  assert not os.path.exists(os.path.join(folder, train_lib.RESULT))
  assert "stopped by the test at step 5 of 8" in logs[-1], logs
  step, _ = _final_state(folder, finetune_run["abstract"])
  assert step == stop_at
  trainer = train_lib.Trainer(bundle, train, FINETUNE, seed=0, mesh=one_device)
  got = train_lib.fit_seed(trainer, train, val, folder, {"run": "a"}, log=logs.append)
  assert any("resumed at step 5 of 8" in line for line in logs), logs
  step, final = _final_state(folder, finetune_run["abstract"])
  assert step == 8 and got["steps"] == 8
  want_leaves = _flat({"params": finetune_run["final"].params,
                       "batch_stats": finetune_run["final"].batch_stats})
  got_leaves = _flat({"params": final.params, "batch_stats": final.batch_stats})
  assert want_leaves.keys() == got_leaves.keys()
  for path in want_leaves:
    np.testing.assert_allclose(got_leaves[path], want_leaves[path], rtol=1e-6, atol=1e-6,
                               err_msg=str(path))
  for task in data_lib.TASKS:
    assert got[task].keys() == want[task].keys()
    for metric, value in want[task].items():
      np.testing.assert_allclose(got[task][metric], value, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{task} {metric}")
  assert got["last_epoch_losses"].keys() == want["last_epoch_losses"].keys() == {
      "loss", *data_lib.TASKS}
  for k, v in want["last_epoch_losses"].items():
    np.testing.assert_allclose(got["last_epoch_losses"][k], v, rtol=1e-6, err_msg=k)
  with open(os.path.join(folder, train_lib.RESULT)) as f:
    assert json.load(f)["steps"] == 8
  assert os.path.isfile(os.path.join(folder, "predictions.png"))
  # A finished seed is read back, not retrained.
  logs.clear()
  assert train_lib.fit_seed(trainer, train, val, folder, {"run": "a"}, log=logs.append) == got
  assert not logs


def test_resume_with_other_settings_is_refused(tmp_path):
  folder = str(tmp_path)
  with open(os.path.join(folder, "settings.json"), "w") as f:
    json.dump({"learning_rate": 1e-4, "seed": 0}, f)
  train_lib.check_resume(folder, {"learning_rate": 1e-4, "seed": 0})
  with pytest.raises(ValueError, match=r"learning_rate: 0.0001 -> 0.001\)"):
    train_lib.check_resume(folder, {"learning_rate": 1e-3, "seed": 0})


# ---------------------------------------------------------------------------
# A segmentation head on features that carry the class vs random features.


HEAD_CLASSES = 4
HEAD_HW = 16


def _label_maps(rng, count):
  """Blocky label maps: a 4 x 4 grid of random classes, each cell 4 x 4 pixels; a few ignored."""
  grid = rng.integers(0, HEAD_CLASSES, (count, 4, 4))
  labels = np.repeat(np.repeat(grid, 4, axis=1), 4, axis=2).astype(np.int32)
  labels[rng.uniform(size=labels.shape) < 0.05] = -1
  return labels


def _stages(rng, labels, carry: bool):
  """Two stages (16x16x8 and 8x8x8): a noisy one-hot of the label map (at each stage's size) in
  the first channels when `carry`, pure noise of the same shape otherwise."""
  out = []
  for stride in (1, 2):
    lab = labels[:, ::stride, ::stride]
    noise = rng.normal(0, 0.6, (*lab.shape, 8)).astype(np.float32)
    if carry:
      one_hot = np.eye(HEAD_CLASSES, 8, dtype=np.float32)[np.maximum(lab, 0)]
      noise = noise + 1.5 * one_hot
    out.append(jnp.asarray(noise))
  return tuple(out)


def _train_and_score(head, carry: bool, steps: int = 60) -> float:
  rng = np.random.default_rng(0)
  train_labels, test_labels = _label_maps(rng, 8), _label_maps(rng, 8)
  train_stages = _stages(rng, train_labels, carry)
  test_stages = _stages(rng, test_labels, carry)
  key = jax.random.key(0)
  variables = head.init({"params": key, "dropout": key}, train_stages, (HEAD_HW, HEAD_HW), False)
  params, stats = variables["params"], variables["batch_stats"]
  step = _head_step(head)
  opt = HEAD_TX.init(params)
  labels = jnp.asarray(train_labels)
  for i in range(steps):
    params, stats, opt, loss = step(params, stats, opt, train_stages, labels,
                                    jax.random.fold_in(key, i))
  assert np.isfinite(float(loss))
  logits = head.apply({"params": params, "batch_stats": stats}, test_stages, (HEAD_HW, HEAD_HW),
                      False)
  metric = metrics.SegmentationMetric(HEAD_CLASSES)
  metric.update(np.asarray(logits), test_labels)
  return metric.result()["miou"]


HEAD_TX = optax.adam(1e-2)
_HEAD_STEPS = {}


def _head_step(head):
  """One compiled Adam step a head, shared by the informative and the random features."""
  if head not in _HEAD_STEPS:
    @jax.jit
    def step(params, stats, opt, stages, labels, rng):
      def loss_fn(p):
        logits, new = head.apply({"params": p, "batch_stats": stats}, stages, (HEAD_HW, HEAD_HW),
                                 True, mutable=["batch_stats"], rngs={"dropout": rng})
        return losses.segmentation_loss(logits, labels), new["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = HEAD_TX.update(grads, opt, params)
      return optax.apply_updates(params, updates), stats, opt, loss
    _HEAD_STEPS[head] = step
  return _HEAD_STEPS[head]


@pytest.mark.parametrize("head", [
    heads.LinearProbeHead(HEAD_CLASSES),
    heads.DeepLabV3Head(HEAD_CLASSES, rates=(1, 2, 3), features=8),
], ids=["linear", "deeplabv3"])
def test_segmentation_head_learns_from_features_that_carry_the_class(head):
  informed = _train_and_score(head, carry=True)
  random = _train_and_score(head, carry=False)
  assert informed > 0.6, (informed, random)
  assert informed > 2 * random and informed - random > 0.3, (informed, random)
