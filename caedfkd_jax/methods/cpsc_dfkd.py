"""CPSC-DFKD (Pattern Recognition 2023, METHOD.md b.5): a class-conditional generator, no bank.

Per epoch, `cpsc.epoch_itrs` iterations of two units (CPSC_DFKD.py's `train`):
- "round" (the name train.py saves an epoch's image grid for): `cpsc.g_steps`
  generator steps. Each draws fresh z ~ N(0, I) and labels
  uniform over the classes, and minimises
  -KL(T || S) - alpha * IKD + beta * BN + gamma * SupCon([f_S, f_T], y) + eta * CE(T, y)
  (`cpsc_losses.cpsc_generator_loss`); the student is fixed, its BN in train mode (the code's).
- "kd": `cpsc.s_steps` student steps, each on a fresh batch of the generator's
  output: KL(T || S) + alpha * IKD + eta * CE(S, y) (`cpsc_losses.cpsc_student_loss`).
The generator (conditional_generator.py) emits images already in the teacher's
normalised space: they go to both networks as they are, unaugmented, as in the code.

Where the authors' code and the paper part, `config.cpsc` holds a switch whose
default is the code's (the README run's numbers are the code's):
`ce_on_probabilities`, `reset_generator_adam_every_step`,
`student_bn_train_in_generator_steps`, and the IKD forms `generator_ikd` /
`student_ikd` (configs/cpsc_cifar.py sets the code's CIFAR-10 forms). Not
restated: the code's Adam also holds z, which it then discards (no effect), and
its MultiStepLR on the generator acts on an optimiser the loop never uses (so the
generator's LR is constant here too). Autocast (fp16) is `compute_dtype` here
("auto": bfloat16 on accelerators).

Students whose pooled feature is narrower than the teacher's (WRN-16-1/40-1 under a
WRN-40-2) need `cpsc.adapter`: a head from the student's L2-normalised feature to
the teacher's width (models/adapter.py). As in the code it is random and never
trained (under PyTorch >= 2.0; see adapter.py); it lives in the state so that a
resumed run keeps it.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.methods import bank_kd, cpsc_losses
from caedfkd_jax.methods.base import (LOW_CONFIDENCE, STUDENT_OPTIMIZER, Method, Phase, Setup,
                                      TrainState, check_positive, fold, student_optimizer,
                                      teacher_judgement)
from caedfkd_jax.models.adapter import ADAPTER_HEADS, FeatureAdapter
from caedfkd_jax.runtime.mesh import constrain_batch
from caedfkd_jax.synthesis import conditional_generator as cgen, losses

PyTree = Any
ADAPTERS = ("none",) + ADAPTER_HEADS
GRID_KEY = 12345   # Fixed key of the epoch grid's z: the same inputs every epoch, so the grids
                   # show how the generator's output for them changes.


@struct.dataclass
class CPSCState:
  """What CPSC keeps between units besides the student."""
  generator_params: PyTree
  generator_opt_state: PyTree   # Adam's moments; None where Adam restarts every step (code).
  adapter_params: PyTree        # The fixed random student-feature head; None without one.


# --------------------------------------------------------------------------- #
# Pieces both units use
# --------------------------------------------------------------------------- #


def draw(setup: Setup, rng: jax.Array, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """One step's z (B x nz) and labels (B), sharded over "data"; fresh every step (code)."""
  c = setup.config.cpsc
  return constrain_batch(cgen.sample_inputs(rng, c.batch_size, c.nz, setup.num_classes), mesh)


def l2_normalize(x_BxD: jax.Array, eps: float = 1e-12) -> jax.Array:
  """PyTorch's F.normalize: the authors' models return features normalised so (SupCon's input)."""
  x = x_BxD.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def feature_width(model, image_size: int) -> int:
  """Width of a zoo model's pooled feature, from shapes alone (nothing is computed)."""
  def features(x):
    return model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)[1]["features"]
  return jax.eval_shape(features, jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                       jnp.float32)).shape[-1]


def adapter_module(setup: Setup) -> FeatureAdapter | None:
  """The student-feature head (`cpsc.adapter`), sized to the teacher's feature; None for "none"."""
  head = setup.config.cpsc.adapter
  if head == "none":
    return None
  return FeatureAdapter(feature_width(setup.teacher, setup.image_size), head)


def student_features(setup: Setup, features_BxD: jax.Array, adapter_params: PyTree) -> jax.Array:
  """The student's SupCon view: normalised, then through the head if any (not renormalised)."""
  f = l2_normalize(features_BxD)
  adapter = adapter_module(setup)
  return f if adapter is None else adapter.apply({"params": adapter_params}, f)


def student_lr_schedule(config) -> optax.Schedule:
  """CPSC's student LR, a function of the student step, constant within an epoch.

  GradualWarmupScheduler(multiplier=1, total_epoch=W) over CosineAnnealingLR(T_max=
  epochs, eta_min=0), stepped at the start of each 1-based epoch e: lr * e / W for
  e <= W, then lr * (1 + cos(pi * (e - W) / epochs)) / 2. (At e = W + 1 the code reads
  the cosine's recursive form once, within 1e-4 of this.)
  """
  c = config.cpsc
  steps_per_epoch, lr, warm = c.epoch_itrs * c.s_steps, config.student.lr, c.lr_warmup_epochs

  def schedule(kd_step):
    e = jnp.asarray(kd_step) // steps_per_epoch + 1
    warmup = lr * e / max(warm, 1)
    cosine = lr * 0.5 * (1 + jnp.cos(jnp.pi * (e - warm) / config.epochs))
    return jnp.where(e <= warm, warmup, cosine).astype(jnp.float32)
  return schedule


# --------------------------------------------------------------------------- #
# Generator round: `cpsc.g_steps` steps (CPSC_DFKD.py:55-96)
# --------------------------------------------------------------------------- #


def generator_loss(params: PyTree, setup: Setup, teacher_vars: PyTree, student: PyTree,
                   adapter_params: PyTree, z_BxNz: jax.Array, labels_B: jax.Array,
                   mesh: Mesh | None = None):
  """L_G on one fresh batch. Returns (loss, (student batch_stats, teacher logits, metrics)).

  The student (parameters fixed) runs in train mode where the code does: it then
  normalises with this batch's statistics, and its running averages move.
  """
  c = setup.config.cpsc
  x = constrain_batch(setup.generator.apply({"params": params}, z_BxNz, labels_B), mesh)
  (t_logits, t_aux), t_state = setup.teacher.apply(teacher_vars, x, train=False,
                                                   mutable=["bn_stats"])
  bn = losses.bn_statistics_loss(t_state["bn_stats"], teacher_vars["batch_stats"], "sum")
  if c.student_bn_train_in_generator_steps:
    (s_logits, s_aux), new = setup.student.apply(student, x, train=True, mutable=["batch_stats"])
    batch_stats = new["batch_stats"]
  else:
    s_logits, s_aux = setup.student.apply(student, x, train=False)
    batch_stats = student["batch_stats"]
  loss, terms = cpsc_losses.cpsc_generator_loss(
      t_logits, s_logits, l2_normalize(t_aux["features"]),
      student_features(setup, s_aux["features"], adapter_params), labels_B, bn,
      alpha=c.alpha, beta=c.beta, gamma=c.gamma, eta=c.eta, ikd_form=c.generator_ikd,
      ce_form="probabilities" if c.ce_on_probabilities else "logits", temperature=c.temperature)
  metrics = {"gen/loss": loss, **{f"gen/{k}": v for k, v in terms.items()}}
  return loss, (batch_stats, jax.lax.stop_gradient(t_logits), metrics)


@struct.dataclass
class RoundCarry:
  """What changes during a generator round."""
  params: PyTree
  opt_state: PyTree             # None where Adam restarts every step.
  student_batch_stats: PyTree
  last_t_logits: jax.Array      # B x K: the teacher on the round's last batch (its summary).
  last_labels: jax.Array


def start_round(state: TrainState, *, setup: Setup) -> tuple[RoundCarry, jax.Array]:
  c = setup.config.cpsc
  carry = RoundCarry(state.method.generator_params, state.method.generator_opt_state,
                     state.student["batch_stats"],
                     jnp.zeros((c.batch_size, setup.num_classes), jnp.float32),
                     jnp.zeros((c.batch_size,), jnp.int32))
  return carry, fold(state.rng, state.epoch, state.unit)


def generator_step(carry: RoundCarry, rng: jax.Array, step: jax.Array, state: TrainState,
                   teacher_vars: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """One Adam step of G on fresh (z, y); a new Adam each time where the code makes one."""
  z, labels = draw(setup, jax.random.fold_in(rng, step), mesh)
  student = {"params": state.student["params"], "batch_stats": carry.student_batch_stats}
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (batch_stats, t_logits, metrics)), grads = grad_fn(
      carry.params, setup, teacher_vars, student, state.method.adapter_params, z, labels, mesh)
  opt_state = (setup.generator_tx.init(carry.params) if carry.opt_state is None
               else carry.opt_state)
  updates, opt_state = setup.generator_tx.update(grads, opt_state, carry.params)
  return RoundCarry(
      params=optax.apply_updates(carry.params, updates),
      opt_state=None if carry.opt_state is None else opt_state,
      student_batch_stats=batch_stats, last_t_logits=t_logits, last_labels=labels), metrics


def finish_round(state: TrainState, carry: RoundCarry, rng: jax.Array, teacher_vars: PyTree, *,
                 setup: Setup):
  """Writes G (and the student's moved BN averages) back. Returns the teacher's accuracy on
  the last batch and, per class, the share of it the teacher is unsure about ("low_conf")."""
  low_conf_K, accuracy = teacher_judgement(carry.last_t_logits, carry.last_labels,
                                           setup.num_classes, setup.config.low_confidence)
  state = state.replace(
      student={**state.student, "batch_stats": carry.student_batch_stats},
      method=state.method.replace(generator_params=carry.params,
                                  generator_opt_state=carry.opt_state))
  return state, {"gen/teacher_acc": accuracy}, {"low_conf": low_conf_K}


# --------------------------------------------------------------------------- #
# Student round: `cpsc.s_steps` steps (CPSC_DFKD.py:97-128)
# --------------------------------------------------------------------------- #


def student_loss(params: PyTree, batch_stats: PyTree, setup: Setup, x: jax.Array,
                 t_logits: jax.Array, labels_B: jax.Array):
  """L_S = KL(T || S) + alpha * IKD + eta * CE(S, y). Returns (loss, (batch_stats, metrics))."""
  c = setup.config.cpsc
  (s_logits, _), new = setup.student.apply({"params": params, "batch_stats": batch_stats}, x,
                                           train=True, mutable=["batch_stats"])
  loss, terms = cpsc_losses.cpsc_student_loss(
      t_logits, s_logits, labels_B, alpha=c.alpha, eta=c.eta, ikd_form=c.student_ikd,
      ce_form="probabilities" if c.ce_on_probabilities else "logits")
  agree = jnp.mean(jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
  metrics = {"kd/loss": loss, **{f"kd/{k}": v for k, v in terms.items()}, "kd/agreement": agree}
  return loss, (new["batch_stats"], metrics)


def student_step(carry: bank_kd.StudentCarry, rng: jax.Array, step: jax.Array,
                 state: TrainState, teacher_vars: PyTree, *, setup: Setup,
                 mesh: Mesh | None = None):
  """One SGD step of the student on a fresh batch of the (fixed) generator's output."""
  z, labels = draw(setup, jax.random.fold_in(rng, step), mesh)
  x = jax.lax.stop_gradient(setup.generator.apply(
      {"params": state.method.generator_params}, z, labels))
  x = constrain_batch(x, mesh)
  t_logits, _ = setup.teacher.apply(teacher_vars, x, train=False)
  grad_fn = jax.value_and_grad(student_loss, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(
      carry.student["params"], carry.student["batch_stats"], setup, x,
      jax.lax.stop_gradient(t_logits), labels)
  updates, opt_state = setup.student_tx.update(grads, carry.opt_state, carry.student["params"])
  params = optax.apply_updates(carry.student["params"], updates)
  return bank_kd.StudentCarry({"params": params, "batch_stats": batch_stats}, opt_state,
                              carry.kd_step + 1), metrics


# --------------------------------------------------------------------------- #
# The method: setup, state, units, schedule, checks
# --------------------------------------------------------------------------- #


def epoch_plan(config, epoch: int) -> tuple[str, ...]:
  """Every epoch alike: `epoch_itrs` x (a generator round, a student round)."""
  return ("round", "kd") * config.cpsc.epoch_itrs


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPSCSetup(Setup):
  generator: cgen.ConditionalGenerator
  generator_tx: optax.GradientTransformation


def create_setup(base: Setup) -> CPSCSetup:
  config, c = base.config, base.config.cpsc
  t_width = feature_width(base.teacher, base.image_size)
  s_width = feature_width(base.student, base.image_size)
  if s_width != t_width and c.adapter == "none":
    raise ValueError(
        f"CPSC's SupCon pairs student and teacher features, but the {config.student_arch} "
        f"student's are {s_width}-d and the {base.teacher_arch} teacher's {t_width}-d: set "
        "--config.cpsc.adapter=mlp (the authors' head for WRN-16-1/40-1 students).")
  schedule = student_lr_schedule(config)
  return CPSCSetup.extend(
      base, student_tx=student_optimizer(schedule, config.student), student_lr=schedule,
      generator=cgen.ConditionalGenerator(num_classes=base.num_classes, img_size=base.image_size,
                                          nz=c.nz, ngf=c.ngf, dtype=base.dtype),
      generator_tx=optax.adam(c.generator_lr, b1=c.generator_b1, b2=c.generator_b2))


def init_state(setup: CPSCSetup, teacher_vars: PyTree, rng: jax.Array) -> CPSCState:
  rng_g, rng_a = jax.random.split(rng)
  params = cgen.init_conditional_generator(rng_g, setup.generator, 2)["params"]
  adapter = adapter_module(setup)
  adapter_params = None
  if adapter is not None:
    width = feature_width(setup.student, setup.image_size)
    adapter_params = adapter.init(rng_a, jnp.zeros((1, width), jnp.float32))["params"]
  opt_state = (None if setup.config.cpsc.reset_generator_adam_every_step
               else setup.generator_tx.init(params))
  return CPSCState(params, opt_state, adapter_params)


def latest_images(setup: Setup, synth: CPSCState) -> tuple[jax.Array, jax.Array]:
  """The epoch grid: G's current output for `grid_images_per_class` fixed z per class, in [0, 1].

  CPSC keeps no images, so the grid is regenerated (in train mode, as the code's
  steps run G) from a fixed key; de-normalised with the teacher's mean and std.
  """
  per_class = max(setup.config.grid_images_per_class, 1)
  labels = jnp.repeat(jnp.arange(setup.num_classes, dtype=jnp.int32), per_class)
  z = jax.random.normal(jax.random.key(GRID_KEY), (labels.shape[0], setup.config.cpsc.nz))
  x = setup.generator.apply({"params": synth.generator_params}, z, labels)
  images = x * jnp.asarray(setup.std) + jnp.asarray(setup.mean)
  return jnp.clip(images, 0.0, 1.0), labels


def phases(setup: Setup, mesh: Mesh | None) -> dict[str, Phase]:
  c = setup.config.cpsc
  return {
      "round": Phase(start=functools.partial(start_round, setup=setup),
                     step=functools.partial(generator_step, setup=setup, mesh=mesh),
                     finish=functools.partial(finish_round, setup=setup), num_steps=c.g_steps,
                     label="generator round", makes_images=True, per_class=(LOW_CONFIDENCE,),
                     shows=("gen/loss", "gen/ce", "gen/bn", "gen/teacher_acc",
                            LOW_CONFIDENCE.mean_key)),
      "kd": Phase(start=bank_kd.start_kd,
                  step=functools.partial(student_step, setup=setup, mesh=mesh),
                  finish=bank_kd.finish_kd, num_steps=c.s_steps, label="student round",
                  trains_student=True, shows=("kd/kl", "kd/ikd", "kd/agreement"))}


def own_config() -> ml_collections.ConfigDict:
  """The `cpsc` section (METHOD.md b.5): the authors' README run (CPSC_DFKD.py at 1c6ade1);
  configs/cpsc_cifar.py sets the rest. CPSC also reads student.lr/momentum/weight_decay."""
  config = ml_collections.ConfigDict()
  config.cpsc = ml_collections.ConfigDict()
  config.cpsc.epoch_itrs = 50            # (generator, student) iterations per epoch.
  config.cpsc.g_steps = 6                # Generator steps per iteration (README; code default 1).
  config.cpsc.s_steps = 5                # Student steps per iteration.
  config.cpsc.batch_size = 512           # Fresh z and labels per step, generator and student.
  config.cpsc.nz = 256                   # Width of z.
  config.cpsc.ngf = 64                   # GeneratorD's width.
  config.cpsc.generator_lr = 1e-3        # Adam, betas (generator_b1, generator_b2).
  config.cpsc.generator_b1 = 0.5
  config.cpsc.generator_b2 = 0.999
  config.cpsc.alpha = 5.0                # IKD (logit discrepancy) weight.
  config.cpsc.beta = 1.0                 # Teacher BN-statistics weight (summed over layers).
  config.cpsc.gamma = 0.7                # SupCon weight, [student, teacher] features as 2 views.
  config.cpsc.eta = 0.7                  # CE-to-the-sampled-label weight.
  config.cpsc.temperature = 0.07         # SupCon's tau.
  config.cpsc.generator_ikd = "mse"      # losses.IKD_FORMS. Code: "log_mse" on CIFAR-10 (set by
  config.cpsc.student_ikd = "mse"        # configs/cpsc_cifar.py), "mse" elsewhere, as the paper;
                                         # the student's CIFAR-10 form is "log_l2".
  config.cpsc.ce_on_probabilities = True # Code: CE(softmax(logits), y), softmax twice; the paper's
                                         # CE on logits is False.
  config.cpsc.reset_generator_adam_every_step = True  # Code: a new Adam at every generator
                                         # step (its first, sign-like step each time); False:
                                         # one Adam for the whole run.
  config.cpsc.student_bn_train_in_generator_steps = True  # Code: the student stays in train
                                         # mode: batch statistics, running averages updated on
                                         # the generator's batches too. False: eval mode there.
  config.cpsc.adapter = "none"           # Student-feature head to the teacher's width for
                                         # SupCon: "none", "mlp" (code, WRN-16-1/40-1 students)
                                         # or "linear"; fixed random, never trained (as the code).
  config.cpsc.lr_warmup_epochs = 10      # Student LR: lr * e / W for epochs e = 1..W, then
                                         # cosine to 0 over `epochs`, stepped per epoch (code).

  return config


def check_config(config, num_devices: int, num_classes: int, swept) -> None:
  """CPSC's own fields; the teacher-dependent adapter check is in `create_setup`."""
  c = config.cpsc
  check_positive(config, "cpsc", ("epoch_itrs", "g_steps", "s_steps", "batch_size", "nz", "ngf",
                                  "generator_lr", "temperature"))
  check_positive(config, "cpsc", ("alpha", "beta", "gamma", "eta", "lr_warmup_epochs"),
                 strict=False)
  for name in ("generator_b1", "generator_b2"):
    if not 0 <= c[name] < 1:
      raise ValueError(f"config.cpsc.{name}={c[name]!r} must lie in [0, 1).")
  for name in ("generator_ikd", "student_ikd"):
    if c[name] not in cpsc_losses.IKD_FORMS:
      raise ValueError(f"config.cpsc.{name}={c[name]!r}: use one of "
                       f"{', '.join(cpsc_losses.IKD_FORMS)} (the code: log_mse for the generator "
                       "and log_l2 for the student on CIFAR-10, mse elsewhere).")
  if c.adapter not in ADAPTERS:
    raise ValueError(f"config.cpsc.adapter={c.adapter!r}: use one of {', '.join(ADAPTERS)}.")
  if c.batch_size % num_devices:
    raise ValueError(f"config.cpsc.batch_size={c.batch_size} is not divisible by the "
                     f"{num_devices} devices.")


def bundle_fields(config) -> dict:
  return {"cpsc": config.cpsc.to_dict()}


METHOD = Method(
    name="cpsc_dfkd",
    summary="CPSC-DFKD (PR 2023): a class-conditional generator against the student (KL, logit "
            "discrepancy) with BN, CE and student-teacher SupCon terms; no bank.",
    reads=(*STUDENT_OPTIMIZER, "low_confidence", "cpsc."),
    create_setup=create_setup, init_state=init_state, phases=phases, epoch_plan=epoch_plan,
    latest_images=latest_images, epoch_scalars=lambda synth: {},
    finite_parts=lambda synth: {"generator params": synth.generator_params,
                                "generator optimiser state": synth.generator_opt_state},
    bundle_fields=bundle_fields, check_config=check_config, own_config=own_config,
    # Its own loop's sizes, 100 images a step; the code's 10-class IKD forms.
    quick={"cpsc.batch_size": 100, "cpsc.epoch_itrs": 10, "cpsc.g_steps": 2,
           "cpsc.lr_warmup_epochs": 1, "cpsc.generator_ikd": "log_mse",
           "cpsc.student_ikd": "log_l2"})
