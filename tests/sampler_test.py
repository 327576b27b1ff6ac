"""The KD batch sampler ("groups" | "uniform") and the ablation ladder's named configs.

The uniform sampler's loss is recomputed by hand from losses.py on the same draws
(same RNG), so a wrong row split, a KL over the CNCL rows or a CNCL over the
uniform rows shows as a number, not just a shape.
"""

import argparse
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.cli import demo
from caedfkd_jax.config import checks, defaults, fields as config_fields, ladder
from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods import bank_kd, nayer
from caedfkd_jax.methods.base import Setup, TrainState
from caedfkd_jax.synthesis import augment, losses, memory_bank
from tiny_run import NUM_CLASSES, tiny_config

GROUP = NUM_CLASSES * 2        # tiny_config: 4 classes x (1 source + anchor)
REPO = os.path.join(os.path.dirname(__file__), "..")


def _setup(teacher_dir, table_path, **student) -> Setup:
  config = tiny_config(teacher_dir, table_path)
  for name, value in student.items():
    config.student[name] = value
  return train.create_setup(config, bundle_lib.load_bundle(teacher_dir),
                            embeddings.load_table(table_path))


@pytest.fixture(scope="module")
def teacher_and_state(teacher_dir, table_path):
  """The teacher's variables and a state whose bank holds 4 whole groups of random images.

  Built from parts: `train.create_state` initialises a generator and a student eagerly
  (seconds on 2 cores) and the KD step needs neither. The student is the teacher (the
  tiny run distills resnet_tiny_a into itself) with its weights perturbed.
  """
  teacher = bundle_lib.load_bundle(teacher_dir).variables
  setup = _setup(teacher_dir, table_path)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype),
                        teacher["params"])
  bank = memory_bank.create_bank(4 * GROUP, (32, 32, 3))
  for _ in range(2):   # two synthesis batches of 2 groups, laid out as cend.build_generator_batch
    labels = np.tile(np.arange(NUM_CLASSES), 4)
    source = np.tile(np.repeat([0, 1], NUM_CLASSES), 2)
    group = np.repeat([0, 1], GROUP)
    bank = memory_bank.add(bank, jnp.asarray(rng.uniform(size=(16, 32, 32, 3)), jnp.float32),
                           jnp.asarray(labels), jnp.asarray(source), jnp.asarray(group))
  state = TrainState(
      epoch=jnp.int32(1), unit=jnp.int32(0), kd_step=jnp.int32(0),
      student={"params": params, "batch_stats": teacher["batch_stats"]},
      student_opt_state=setup.student_tx.init(params),
      method=nayer.SynthesisState(generator_params={}, bn_ema={}, bn_ema_valid=jnp.bool_(True),
                                  bank=bank),
      rng=jax.random.key(0))
  return teacher, state


def _student_step(setup, teacher_vars, state, rng, with_cncl=True):
  """Step 0 of a KD call whose key is `rng`: its metrics. The step folds 0 into `rng` first."""
  carry, _ = bank_kd.start_kd(state)
  return bank_kd.student_step(carry, rng, 0, state, teacher_vars, setup=setup,
                            with_cncl=with_cncl)[1]


def _kd_step(setup, teacher_vars, state, rng):
  step = jax.jit(lambda s, r: _student_step(setup, teacher_vars, s, r))
  return jax.device_get(step(state, rng))


def test_uniform_loss_is_kl_on_uniform_rows_plus_cncl_on_group_rows(teacher_dir, table_path,
                                                                    teacher_and_state):
  teacher_vars, state = teacher_and_state
  setup = _setup(teacher_dir, table_path, sampler="uniform", cncl_weight=0.5, cncl_groups=1)
  rng = jax.random.key(7)
  metrics = _kd_step(setup, teacher_vars, state, rng)

  drawn = {}
  def draw(bank, rng):
    batch, drawn["cncl_from"] = bank_kd.sample_kd_batch(bank, rng, setup=setup)
    return batch
  images = jax.eval_shape(draw, state.method.bank, rng)[0]
  assert drawn["cncl_from"] == 2 * GROUP and images.shape == (3 * GROUP, 32, 32, 3)

  @jax.jit
  def by_hand(rng):
    """The same draws: 2*8 uniform images, then 1 whole group of 8, one forward pass."""
    rng_sample, rng_aug = jax.random.split(jax.random.fold_in(rng, 0))   # step 0
    rng_uniform, rng_groups = jax.random.split(rng_sample)
    uniform = memory_bank.sample(state.method.bank, rng_uniform, 2 * GROUP)
    group = memory_bank.sample_groups(state.method.bank, rng_groups, 1, GROUP)
    images = jnp.concatenate([uniform[0], group[0]])
    x = normalize(augment.random_crop_flip(rng_aug, images), setup.mean, setup.std)
    t_logits, _ = setup.teacher.apply(teacher_vars, x, train=False)
    (s_logits, aux), _ = setup.student.apply(state.student, x, train=True, mutable=["batch_stats"])
    cfg, features = setup.config.student, aux["features"]
    kl = lambda rows: losses.kl_divergence(t_logits[rows], s_logits[rows], cfg.temperature)
    cncl = lambda f, b: losses.cncl_loss(f, b[1], b[2], cfg.cncl_temperature, group_B=b[3],
                                         form=cfg.cncl_form)
    both = [jnp.concatenate(parts) for parts in zip(uniform, group)]
    return {"kl": kl(slice(0, 16)), "cncl": cncl(features[16:], group),
            "kl_all_rows": kl(slice(None)), "cncl_all_rows": cncl(features, both),
            "group_labels": group[1]}

  ref = jax.device_get(by_hand(rng))
  assert sorted(ref["group_labels"].tolist()) == sorted(list(range(NUM_CLASSES)) * 2)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["kd/kl"], ref["kl"], **tol)
  np.testing.assert_allclose(metrics["kd/cncl"], ref["cncl"], **tol)
  np.testing.assert_allclose(metrics["kd/loss"], ref["kl"] + 0.5 * ref["cncl"], **tol)
  # The check can tell the rows apart: KL over all rows, or CNCL over all, is another number.
  assert abs(ref["kl_all_rows"] - ref["kl"]) > 1e-3 * abs(ref["kl"])
  assert abs(ref["cncl_all_rows"] - ref["cncl"]) > 1e-3


def test_uniform_without_cncl_draws_no_group_rows_unless_the_weight_is_swept(
    teacher_dir, table_path, teacher_and_state, monkeypatch):
  teacher_vars, state = teacher_and_state
  setup = _setup(teacher_dir, table_path, sampler="uniform", cncl_weight=0.0)
  rng = jax.random.key(3)
  bank = state.method.bank
  batch, cncl_from = bank_kd.sample_kd_batch(bank, rng, setup=setup)
  assert cncl_from is None and batch[0].shape[0] == 2 * GROUP
  # The step's traced program: the student sees the 16 uniform images alone, no CNCL term.
  seen, real_loss = [], bank_kd.student_loss
  def student_loss(params, batch_stats, setup, x, *args):
    seen.append(x.shape[0])
    return real_loss(params, batch_stats, setup, x, *args)
  monkeypatch.setattr(bank_kd, "student_loss", student_loss)
  metrics = jax.eval_shape(lambda s, r: _student_step(setup, teacher_vars, s, r), state, rng)
  assert seen == [2 * GROUP] and sorted(metrics) == ["kd/agreement", "kd/kl", "kd/loss"]
  # A swept weight is traced: the one program must hold the group rows for its other runs.
  batch, cncl_from = bank_kd.sample_kd_batch(bank, rng, setup=setup,
                                           swept=("student.cncl_weight",))
  assert cncl_from == 2 * GROUP and batch[0].shape[0] == 4 * GROUP  # cncl_groups None: 2 groups
  # "groups" draws exactly what it drew before the sampler was a choice.
  batch, cncl_from = bank_kd.sample_kd_batch(bank, rng, setup=_setup(teacher_dir, table_path))
  assert cncl_from == 0
  for got, want in zip(batch, memory_bank.sample_groups(bank, rng, 2, GROUP)):
    np.testing.assert_array_equal(got, want)
  # A method without CNCL (NAYER) draws the same groups with no CNCL row.
  assert bank_kd.sample_kd_batch(bank, rng, setup=_setup(teacher_dir, table_path),
                               with_cncl=False)[1] is None


def test_config_checks_name_a_bad_sampler_and_an_indivisible_cncl_sub_batch():
  config = defaults.get_config()
  config.student.sampler = "random"
  with pytest.raises(ValueError, match=r"config\.student\.sampler='random': use groups .* uniform"):
    checks.validate_config(config, 1, 10)
  config.student.sampler = "uniform"
  config.student.cncl_groups = 0
  with pytest.raises(ValueError, match=r"config\.student\.cncl_groups=0 must be positive"):
    checks.validate_config(config, 1, 10)
  # 100 devices: the synthesis and KD batches (2 groups, 100) divide, a sub-batch of 1 group
  # (50) does not...
  config.num_groups, config.student.batch_groups, config.student.cncl_groups = 2, 2, 1
  with pytest.raises(ValueError, match=r"CNCL sub-batch .* = 50 is not divisible by the 100"):
    checks.validate_config(config, 100, 10)
  # ... unless none is drawn (CNCL off and not swept); a swept weight draws it again.
  config.student.cncl_weight = 0.0
  checks.validate_config(config, 100, 10)
  config.sweep = "student.cncl_weight=0,0.5"
  with pytest.raises(ValueError, match="CNCL sub-batch"):
    checks.validate_config(config, 100, 10)


def _readme_ladder_rows() -> dict[str, str]:
  """The ladder table of docs/methods.md, "The ablation ladder" (moved there from the README)."""
  text = open(os.path.join(REPO, "docs", "methods.md")).read()
  section = text.split("\n## The ablation ladder\n", 1)[1].split("\n#", 1)[0]
  return {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", section, re.M)}


def test_ladder_arms_set_exactly_their_documented_fields():
  default = config_fields.flatten(defaults.get_config())
  rows = _readme_ladder_rows()
  assert sorted(rows) == sorted(ladder.ARMS)
  for arm, fields in ladder.ARMS.items():
    changed = config_fields.flatten(ladder.apply_arm(defaults.get_config(), arm))
    assert {k for k in default if changed[k] != default[k]} <= set(fields), arm
    for name, value in fields.items():
      assert changed[name] == value, (arm, name)
      shown = f"{value:g}" if isinstance(value, float) else str(value)
      assert f"{name}={shown}" in rows[arm], (arm, name)
  # The full method is today's defaults in NAYER's loop; the base differs in CEND, sampler, CNCL.
  assert all(default[k] == v for k, v in ladder.ARMS["cend_cncl"].items()
             if k not in ladder.NAYER_LOOP)


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_arguments_take_an_arm_and_an_unknown_one_names_the_arms():
  r56, paper = _config_module("cifar10_resnet56_resnet20"), _config_module("paper_cifar")
  for module, plain, with_arm in ((r56, "full", "full,base"), (r56, "cpu", "base"),
                                  (paper, "cifar100,wrn40_2,wrn16_1", "cifar100,wrn40_2,wrn16_1,base")):
    assert config_fields.flatten(module.get_config(with_arm)) == config_fields.flatten(ladder.apply_arm(module.get_config(plain),
                                                                        "base"))
  arms = r"base, cend, cend_cncl, mixup, image_contrastive, gaussian"
  for module, arg in ((r56, "cpu,nayer"), (paper, "cifar10,resnet34,resnet18,nayer")):
    with pytest.raises(ValueError, match=f"Unknown ablation arm 'nayer'; the arms are {arms}"):
      module.get_config(arg)
  with pytest.raises(ValueError, match=f"schedule 'nayer'.*{arms}"):
    r56.get_config("nayer")
  with pytest.raises(ValueError, match="Unknown ablation arm"):
    ladder.apply_arm(defaults.get_config(), "full")


def test_demo_records_an_arm_and_refuses_to_resume_with_another(tmp_path):
  args = lambda arm: argparse.Namespace(teacher_epochs=3, seed=0, fresh=False, arm=arm)
  demo.prepare_workdir(str(tmp_path), args("base"))
  demo.prepare_workdir(str(tmp_path), args("base"))     # same arm: resumes
  with pytest.raises(ValueError, match="--arm base -> cend_cncl"):
    demo.prepare_workdir(str(tmp_path), args(demo.FULL_METHOD))
