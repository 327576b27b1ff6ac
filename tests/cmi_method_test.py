"""CMI as a base method, and CAE-DFKD over CMI: a step's loss from its parts, the memory and
the head across rounds, and a run stopped midway that resumes to the uninterrupted result."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.config import checks
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.runtime.mesh import make_mesh
from caedfkd_jax.synthesis import augment, cmi_contrast, losses
from tiny_run import tiny_config

BATCH = 16


def cmi_config(teacher_dir, table_path, method="cmi"):
  config = tiny_config(teacher_dir, table_path, method)
  config.num_devices = 2    # Data-parallel still, at a quarter of 8 simulated devices' overhead.
  config.student.sampler = "uniform"
  if method == "cmi":     # CAE-DFKD over CMI makes num_groups CEND groups a round instead.
    config.cmi.synthesis_batch = BATCH
  config.cmi.memory_size, config.cmi.negatives, config.cmi.head_dim = 24, 8, 8
  return config


@pytest.fixture(scope="module")
def after_a_round(teacher_dir, table_path):
  """(setup, teacher variables, the first state, the state after one warm-up round)."""
  config = cmi_config(teacher_dir, table_path)
  teacher = bundle_lib.load_bundle(teacher_dir)
  setup = train.create_setup(config, teacher, embeddings.load_table(table_path))
  mesh = make_mesh(jax.devices("cpu")[:1])
  first = jax.device_get(train.create_state(setup, teacher.variables))
  fns = steps.make_step_fns(setup, mesh, fuse=False)
  state, _, outputs = fns["warmup_round"](jax.tree.map(jnp.copy, first), teacher.variables)
  return setup, teacher.variables, first, jax.device_get(state), outputs


def test_a_round_fills_bank_and_memory_and_trains_the_persistent_head(after_a_round):
  _, _, first, state, outputs = after_a_round
  c = state.method
  assert int(c.bank.size) == BATCH and int(c.memory.size) == BATCH and int(c.memory.next) == BATCH
  assert outputs["images"].shape == (BATCH, 32, 32, 3)
  assert np.abs(c.memory.features[:BATCH]).sum() > 0 and not c.memory.features[BATCH:].any()
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(c.head_params),
                                                jax.tree.leaves(first.method.head_params))]
  assert min(moved) > 0, "every head parameter learns during the round and is kept"


def test_a_step_computes_cmis_loss_from_its_parts(after_a_round):
  """gen/loss = bn * L_BN + ce * CE + adv * L_adv + cr * L_cr, each recomputed from the building
  blocks on the step's own draws; the memory's first round gives the negatives."""
  setup, teacher_vars, _, state, _ = after_a_round
  phase = setup.method.phases(setup, None)["round"]
  carry, ctx = jax.jit(phase.start)(state)
  _, metrics = jax.jit(phase.step)(carry, ctx, jnp.int32(0), state, teacher_vars)
  c = setup.config

  @jax.jit
  def by_hand(carry, ctx, state):
    rng_neg, rng_aug = jax.random.split(jax.random.fold_in(ctx.rng, 0))
    negatives = cmi_contrast.sample_negatives(state.method.memory, rng_neg, c.cmi.negatives)
    images = setup.generator.apply({"params": carry.trainables.generator}, carry.trainables.inputs)
    rng_global, rng_local = jax.random.split(rng_aug)
    x_global = normalize(augment.random_crop_flip(rng_global, images), setup.mean, setup.std)
    x_local = normalize(augment.random_resized_crop_flip(rng_local, images), setup.mean, setup.std)
    t_logits, global_f, bn_stats = cmi_contrast.teacher_instance_features(
        setup.teacher, teacher_vars, x_global)
    _, local_f, _ = cmi_contrast.teacher_instance_features(setup.teacher, teacher_vars, x_local)
    head = cmi_contrast.ContrastHead(features=c.cmi.head_dim)
    cr = lambda a, b: cmi_contrast.contrastive_loss(carry.head_params, head, a, b, *negatives,
                                                    c.cmi.cr_temperature)
    s_logits, _ = setup.student.apply(state.student, x_global, train=False)
    return {"gen/bn": losses.bn_statistics_loss(bn_stats, teacher_vars["batch_stats"]),
            "gen/ce": losses.cross_entropy(t_logits, ctx.batch.labels_B),
            "gen/adv": losses.adversarial_loss(t_logits, s_logits),
            "gen/cr": cr(local_f, global_f), "swapped_views": cr(global_f, local_f),
            "valid_negatives": negatives[2].sum()}

  ref = jax.device_get(by_hand(carry, ctx, state))
  assert ref["valid_negatives"] == c.cmi.negatives
  for name in ("gen/bn", "gen/ce", "gen/adv", "gen/cr"):
    np.testing.assert_allclose(metrics[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
  total = (c.loss.bn * ref["gen/bn"] + c.loss.ce * ref["gen/ce"] + c.loss.adv * ref["gen/adv"]
           + c.cmi.cr * ref["gen/cr"])
  np.testing.assert_allclose(metrics["gen/loss"], total, rtol=1e-4)
  assert abs(ref["swapped_views"] - ref["gen/cr"]) > 1e-3, "the check tells the views apart"


def test_learn_inputs_false_keeps_z_while_the_generator_learns(after_a_round):
  """`cmi.learn_inputs=False`: a round's Adam steps leave its inputs (CMI's z) as drawn and still
  train the generator; with True (CMI's) they move the inputs too."""
  import dataclasses
  setup, teacher_vars, _, state, _ = after_a_round
  assert setup.config.cmi.learn_inputs   # The default.
  moved = {}
  for learn in (True, False):
    config = setup.config.copy_and_resolve_references()
    config.cmi.learn_inputs = learn
    phase = setup.method.phases(dataclasses.replace(setup, config=config), None)["round"]
    carry, ctx = jax.jit(phase.start)(state)
    first = jax.device_get(carry.trainables)
    step = jax.jit(phase.step)
    for i in range(phase.num_steps):
      carry, _ = step(carry, ctx, jnp.int32(i), state, teacher_vars)
    last = jax.device_get(carry.trainables)
    moved[learn] = {
        "inputs": float(np.abs(last.inputs - first.inputs).max()),
        "generator": max(float(np.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(last.generator), jax.tree.leaves(first.generator)))}
  assert moved[False]["inputs"] == 0.0 and moved[False]["generator"] > 0, moved
  assert moved[True]["inputs"] > 0 and moved[True]["generator"] > 0, moved


def test_cmi_refuses_grouped_kd_batches_it_cannot_make(teacher_dir, table_path):
  config = cmi_config(teacher_dir, table_path)
  config.student.sampler = "groups"
  with pytest.raises(ValueError, match="cmi banks images without CNCL groups: use"):
    checks.validate_config(config, 1, 4)
  config = cmi_config(teacher_dir, table_path, "cae_dfkd_cmi")   # CEND's batches come in whole
  config.student.sampler = "groups"                               # groups.
  checks.validate_config(config, 1, 4)
  config.cmi.local_scale = (0.5, 0.25)
  with pytest.raises(ValueError, match="config.cmi.local_scale"):
    checks.validate_config(config, 1, 4)


def test_cae_dfkd_over_cmi_resumes_to_the_uninterrupted_run(teacher_dir, table_path, tmp_path):
  """Head, memory and bank are all in the checkpoint: stopped after 3 of 5 units (mid-epoch)
  and rerun, the run ends with the uninterrupted run's student and metrics, bit for bit (one
  machine)."""
  config = cmi_config(teacher_dir, table_path, "cae_dfkd_cmi")
  config.student.sampler, config.epochs = "groups", 2
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  config.max_units = 3
  assert train.train_and_evaluate(config, str(tmp_path / "split"))["stopped_early"]
  config.max_units = 0
  split = train.train_and_evaluate(config, str(tmp_path / "split"))
  a, b = (bundle_lib.load_bundle(r["student"]) for r in (whole, split))
  assert a.spec.extra["method"] == "cae_dfkd_cmi"
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(x, y)
  rows = lambda run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
  drop_time = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]
  assert drop_time(rows("whole")) == drop_time(rows("split"))
  assert "kd/cncl" in rows("whole")[-1] and "gen/cr" in rows("whole")[-1]


def test_fused_scans_compute_what_per_step_calls_compute(after_a_round):
  """Accelerators run a CMI round as one lax.scan: the same numbers as the CPU's per-step calls.
  (KD calls are bank_kd's, compared for NAYER in train_test.)"""
  setup, teacher_vars, _, state, _ = after_a_round
  mesh = make_mesh(jax.devices("cpu")[:1])
  outputs = {}
  for fuse in (False, True):
    fns = steps.make_step_fns(setup, mesh, fuse=fuse)
    after, metrics, out = fns["round"](jax.tree.map(jnp.copy, state), teacher_vars)
    outputs[fuse] = jax.device_get((metrics, out["images"], after.method.memory.features,
                                    after.method.head_params, after.method.head_opt_state))
  for a, b in zip(jax.tree.leaves(outputs[False]), jax.tree.leaves(outputs[True])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
