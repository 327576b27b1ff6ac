"""CPSC-DFKD behind the method seam: its steps compute its losses, and its runs log, resume and
fuse like every method's."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from caedfkd_jax.config import checks
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.methods import cpsc_dfkd, cpsc_losses
from caedfkd_jax.runtime.mesh import make_mesh
from caedfkd_jax.synthesis import losses
from caedfkd_jax.synthesis.conditional_generator import sample_inputs
from tiny_run import tiny_config

SIZES = {"batch_size": 8, "nz": 8, "ngf": 4, "epoch_itrs": 2, "g_steps": 2, "s_steps": 2,
         "lr_warmup_epochs": 1}


def cpsc_config(teacher_dir, table_path):
  """The tiny run as CPSC: 1 epoch of 2 x (2 generator steps, 2 student steps) on 8 images,
  with the code's CIFAR-10 IKD forms and a WRN student whose 64-d features need the adapter
  (the teacher's are 16-d). Every test uses this one config, so compiled steps are shared."""
  config = tiny_config(teacher_dir, table_path, "cpsc_dfkd")
  config.num_devices = 2    # Data-parallel still, at a quarter of 8 simulated devices' overhead.
  config.student_arch = "wrn_tiny"
  config.epochs = 1
  config.cpsc.update({**SIZES, "generator_ikd": "log_mse", "student_ikd": "log_l2",
                      "adapter": "mlp"})
  return config


@pytest.fixture(scope="module")
def full_run(teacher_dir, table_path, tmp_path_factory):
  """The uninterrupted tiny run, shared by the run and resume tests."""
  workdir = tmp_path_factory.mktemp("cpsc_full")
  return train.train_and_evaluate(cpsc_config(teacher_dir, table_path), str(workdir)), workdir


@pytest.fixture(scope="module")
def start(teacher_dir, table_path, full_run):
  """(setup, teacher variables, first state) of `cpsc_config`. After `full_run`, whose
  eager ops (the student's init) are then compiled already: 10 s less on 2 cores."""
  teacher = bundle_lib.load_bundle(teacher_dir)
  setup = train.create_setup(cpsc_config(teacher_dir, table_path), teacher,
                             embeddings.load_table(table_path))
  teacher_vars = {k: teacher.variables[k] for k in ("params", "batch_stats")}
  return setup, teacher_vars, jax.device_get(train.create_state(setup, teacher_vars))


def _normalized(f):
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def _compared_leaves(tree):
  """Leaves, less the biases of G's conv1/conv2: a conditional BN follows each, so their
  gradient is rounding noise, and Adam's first step turns noise into +-lr (here and in the
  authors' code alike). Any two code paths may disagree on them."""
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if not (jax.tree_util.keystr(path).endswith("['bias']")
                  and ("'conv1'" in jax.tree_util.keystr(path)
                       or "'conv2'" in jax.tree_util.keystr(path)))]


def test_a_tiny_run_logs_its_losses_and_records_its_method(full_run):
  result, workdir = full_run
  assert result["epoch"] == 1 and not result["stopped_early"]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1]
  for key in ("gen/loss", "gen/supcon", "gen/bn", "gen/teacher_acc", "kd/kl", "kd/ikd", "kd/ce",
              "gen/low_confidence_share"):
    assert np.isfinite(rows[-1][key]), key
  assert os.listdir(workdir / "samples") == ["epoch_0001.png"]
  # The epoch's own LR: the one-epoch warm-up's lr * 1/1 (the next epoch's would be the cosine's 0).
  assert rows[-1]["student/lr"] == pytest.approx(0.1)
  extra = bundle_lib.load_bundle(result["student"]).spec.extra
  assert extra["method"] == "cpsc_dfkd" and extra["cpsc"]["adapter"] == "mlp"


def test_a_stopped_run_resumes_to_the_uninterrupted_student(teacher_dir, table_path, full_run,
                                                            tmp_path):
  """Stopped mid-epoch after a generator round, then rerun: the same student (the adapter and
  G's None optimiser state went through the checkpoint)."""
  result, _ = full_run
  config = cpsc_config(teacher_dir, table_path)
  config.max_units = 3
  assert train.train_and_evaluate(config, str(tmp_path))["stopped_early"]
  config.max_units = 0
  resumed = train.train_and_evaluate(config, str(tmp_path))
  a = bundle_lib.load_bundle(result["student"]).variables
  b = bundle_lib.load_bundle(resumed["student"]).variables
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert resumed["kd/kl"] == pytest.approx(result["kd/kl"], rel=1e-5)


@pytest.fixture(scope="module")
def units(start):
  """One generator round, then one student round, from `start` on the runs' mesh (whose
  per-step programs `full_run` compiled): {fuse: host outputs}, step by step and lax.scan."""
  setup, tv, state = start
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  tv = jax.device_put(tv, replicated)
  outputs = {}
  for fuse in (False, True):
    fns = steps.make_step_fns(setup, mesh, fuse=fuse)
    fresh = jax.device_put(jax.tree.map(jnp.copy, state), replicated)   # The units donate it.
    after_round, gen_metrics, round_out = fns["round"](fresh, tv)
    kept = jax.tree.map(jnp.copy, after_round)
    after_kd, kd_metrics, _ = fns["kd"](after_round, tv)
    outputs[fuse] = jax.device_get({"after_round": kept, "gen": gen_metrics, "after_kd": after_kd,
                                    "kd": kd_metrics, "low_conf": round_out["low_conf"]})
  return outputs


def test_a_generator_round_and_a_student_step_compute_the_cpsc_losses(start, units,
                                                                      teacher_dir, table_path):
  """By hand, from the same draws: both steps' L_G, each a sign-like step of an Adam made
  afresh (the code's), the student's BN averages moved by G's batches, and L_S; with
  CIFAR-10's log IKD forms and the adapter. On one device; the units ran on the runs' mesh."""
  setup, tv, state = start
  c, synth = setup.config.cpsc, state.method
  adapter = cpsc_dfkd.adapter_module(setup)
  weights = dict(alpha=c.alpha, beta=c.beta, gamma=c.gamma, eta=c.eta)

  def draws(unit, step):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.rng, 0), unit), step)
    return sample_inputs(rng, c.batch_size, c.nz, 4)

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def generator_loss(params, student, z, y):
    x = setup.generator.apply({"params": params}, z, y)
    (t_logits, t_aux), t_state = setup.teacher.apply(tv, x, train=False, mutable=["bn_stats"])
    (s_logits, s_aux), new = setup.student.apply(student, x, train=True, mutable=["batch_stats"])
    f_s = adapter.apply({"params": synth.adapter_params}, _normalized(s_aux["features"]))
    bn = losses.bn_statistics_loss(t_state["bn_stats"], tv["batch_stats"], "sum")
    loss, _ = cpsc_losses.cpsc_generator_loss(
        t_logits, s_logits, _normalized(t_aux["features"]), f_s, y, bn, **weights,
        ikd_form="log_mse", ce_form="probabilities", temperature=0.07)
    return loss, new["batch_stats"]

  params, student = synth.generator_params, state.student
  for step in range(c.g_steps):
    (loss, batch_stats), grads = generator_loss(params, student, *draws(0, step))
    np.testing.assert_allclose(units[False]["gen"]["gen/loss"][step], loss, rtol=1e-5)
    params = jax.tree.map(lambda p, g: p - 1e-3 * g / (jnp.abs(g) + 1e-8), params, grads)
    student = {**student, "batch_stats": batch_stats}
  after_round = units[False]["after_round"]
  assert after_round.method.generator_opt_state is None
  for a, b in zip(_compared_leaves(after_round.method.generator_params), _compared_leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(after_round.student), jax.tree.leaves(student)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  @jax.jit
  def student_loss(generator_params, student, z, y):
    x = setup.generator.apply({"params": generator_params}, z, y)
    t_logits, _ = setup.teacher.apply(tv, x, train=False)
    (s_logits, _), _ = setup.student.apply(student, x, train=True, mutable=["batch_stats"])
    return cpsc_losses.cpsc_student_loss(t_logits, s_logits, y, alpha=c.alpha, eta=c.eta,
                                    ikd_form="log_l2", ce_form="probabilities")[0]
  np.testing.assert_allclose(  # The student round is unit 1, with the round's G and BN averages.
      units[False]["kd"]["kd/loss"][0],
      student_loss(after_round.method.generator_params, after_round.student, *draws(1, 0)),
      rtol=1e-5)
  assert set(units[False]["gen"]) == {"gen/loss", "gen/kl", "gen/ikd", "gen/bn", "gen/supcon",
                                      "gen/ce", "gen/teacher_acc"}

  config = cpsc_config(teacher_dir, table_path)
  config.cpsc.adapter = "none"                           # Widths differ: the head is required.
  with pytest.raises(ValueError, match="student's are 64-d and the resnet_tiny_a teacher's 16-d"):
    train.create_setup(config, bundle_lib.load_bundle(teacher_dir),
                       embeddings.load_table(table_path))


def test_fused_scans_compute_what_per_step_calls_compute(units):
  a, b = units[False], units[True]
  assert int(a["after_kd"].unit) == int(b["after_kd"].unit) == 2
  assert int(a["after_kd"].kd_step) == int(b["after_kd"].kd_step) == 2
  for x, y in zip(jax.tree.leaves((a["gen"], a["kd"], a["low_conf"])),
                  jax.tree.leaves((b["gen"], b["kd"], b["low_conf"]))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # The student's momentum is its summed gradients, whose float rounding differs more.
  for name, atol in (("student", 1e-6), ("student_opt_state", 1e-5), ("method", 1e-6)):
    for x, y in zip(_compared_leaves(getattr(a["after_kd"], name)),
                    _compared_leaves(getattr(b["after_kd"], name))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)


def test_student_bn_in_eval_mode_in_generator_steps_keeps_its_averages(start, units):
  """`cpsc.student_bn_train_in_generator_steps=False`: a generator round leaves the student's BN
  running averages as they were; True (the code's, `units`) moves them. G learns either way, and
  the student's params are the KD round's alone."""
  import dataclasses
  setup, tv, state = start
  assert setup.config.cpsc.student_bn_train_in_generator_steps   # The default.
  config = setup.config.copy_and_resolve_references()
  config.cpsc.student_bn_train_in_generator_steps = False
  phase = setup.method.phases(dataclasses.replace(setup, config=config), None)["round"]
  carry, rng = jax.jit(phase.start)(state)
  step = jax.jit(phase.step)
  for i in range(phase.num_steps):
    carry, _ = step(carry, rng, jnp.int32(i), state, tv)
  eval_mode = jax.device_get(jax.jit(phase.finish)(state, carry, rng, tv)[0])
  train_mode = units[False]["after_round"]
  moved = lambda a, b: max(float(np.abs(x - y).max())
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(eval_mode.student["batch_stats"], state.student["batch_stats"]) == 0.0
  assert moved(train_mode.student["batch_stats"], state.student["batch_stats"]) > 1e-4
  for after in (eval_mode, train_mode):
    assert moved(after.student["params"], state.student["params"]) == 0.0
    assert moved(after.method.generator_params, state.method.generator_params) > 0


def test_a_persistent_generator_adam_is_made_carried_and_kept(start):
  """`reset_generator_adam_every_step=False`: init_state makes Adam's state, a round carries
  it through its steps and writes it back (shapes only: traced, not compiled)."""
  import dataclasses
  setup, tv, state = start
  config = setup.config.copy_and_resolve_references()
  config.cpsc.reset_generator_adam_every_step = False
  setup = dataclasses.replace(setup, config=config)
  synth = jax.eval_shape(lambda: cpsc_dfkd.init_state(setup, tv, state.rng))
  assert jax.tree.structure(synth.generator_opt_state) == jax.tree.structure(
      setup.generator_tx.init(state.method.generator_params))
  state = state.replace(method=state.method.replace(
      generator_opt_state=setup.generator_tx.init(state.method.generator_params)))
  phase = setup.method.phases(setup, None)["round"]

  def unit(state):
    carry, ctx = phase.start(state)
    for i in range(phase.num_steps):
      carry, _ = phase.step(carry, ctx, jnp.int32(i), state, tv)
    return phase.finish(state, carry, ctx, tv)[0]
  after = jax.eval_shape(unit, state)
  assert jax.tree.structure(after.method) == jax.tree.structure(state.method)


def test_configs_and_refusals(teacher_dir, table_path):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "cpsc_cifar.py")
  spec = importlib.util.spec_from_file_location("cpsc_cifar", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c10, c100 = module.get_config(), module.get_config("cifar100,wrn40_2,wrn16_1")
  assert (c10.cpsc.generator_ikd, c10.cpsc.student_ikd) == ("log_mse", "log_l2")
  assert (c100.cpsc.generator_ikd, c100.cpsc.adapter) == ("mse", "mlp")
  assert c10.cpsc.batch_size == 512 and c10.epochs == 600 and c10.cpsc.g_steps == 6
  cpu = module.get_config("cpu")
  assert cpu.student_arch == "resnet20" and cpu.teacher_arch_expected == "resnet56"
  for config in (c10, c100, cpu):
    checks.validate_config(config, 1, 10)
  schedule = cpsc_dfkd.student_lr_schedule(c10)   # 250 student steps an epoch.
  assert [round(float(schedule(e * 250)), 6) for e in (0, 9)] == [0.01, 0.1]
  assert float(schedule(10 * 250)) == pytest.approx(0.05 * (1 + np.cos(np.pi / 600)))

  config = cpsc_config(teacher_dir, table_path)
  for field, value, match in (("warmup_epochs", 1, "warmup_epochs is set to 1, but method cpsc_dfkd does not"),
                              ("cpsc.batch_size", 6, "not divisible by the 4 devices"),
                              ("cpsc.student_ikd", "l1", "cpsc.student_ikd='l1'"),
                              ("cpsc.adapter", "big", "cpsc.adapter='big'"),
                              ("sweep", "loss.bn=1,2", "varies loss.bn, which method cpsc_dfkd")):
    bad = config.copy_and_resolve_references()
    *section, name = field.split(".")
    (bad[section[0]] if section else bad)[name] = value
    with pytest.raises(ValueError, match=match):
      checks.validate_config(bad, 4, 4)
