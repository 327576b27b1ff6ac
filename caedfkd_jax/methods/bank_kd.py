"""KD from a bank of synthetic images (Eq. 6), and the epoch plan of the methods that bank.

NAYER, CAE-DFKD, CMI and DiffDFKD all distill from what their synthesis rounds banked: a KD
call is `student.steps_per_call` SGD steps, each on a batch drawn from the bank
(`sample_kd_batch`), under t^2 KL(T || S) and, for methods with CNCL, the CNCL
term on whole groups of one anchor and its diffused views. Their epochs are warm-up rounds,
then rounds and KD calls (`epoch_plan`); their shared checks are `check_schedule`.
"""

import dataclasses
import functools
import math
from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods.base import (LOW_CONFIDENCE, STUDENT_OPTIMIZER, Phase, Setup, TrainState,
                                      fold, hparam)
from caedfkd_jax.runtime.mesh import constrain_batch
from caedfkd_jax.synthesis import augment, losses, memory_bank

PyTree = Any

# What KD from the bank and the rounds-then-KD plan read (besides a method's synthesis).
READS = (*STUDENT_OPTIMIZER, "student.eta_min", "student.sampler", "student.kd_steps",
         "student.steps_per_call", "student.temperature", "student.mixup_alpha",
         "student.image_contrastive_weight", "student.image_contrastive_temperature",
         "warmup_epochs", "g_loops", "warmup_g_loops", "bank_capacity", "low_confidence")
KD_SHOWS = ("kd/kl", "kd/cncl", "kd/image_contrastive", "kd/agreement")
MIXUP, SECOND_VIEW = 1, 2   # Folded into a KD step's augmentation rng for their own draws.


@dataclasses.dataclass(frozen=True, kw_only=True)
class BankSetup(Setup):
  """A bank-based method's static sizes, besides the shared setup."""
  synthesis_batch: int      # Images a round banks together.
  group_size: int = 1       # Rows of one CNCL group, K * (N + 1); 1 where images are not grouped.
  kd_batch: int             # Images a KD step distills on (besides any CNCL sub-batch).


# --------------------------------------------------------------------------- #
# The epoch plan: warm-up rounds, then rounds and KD calls
# --------------------------------------------------------------------------- #


def epoch_plan(config, epoch: int) -> tuple[str, ...]:
  """An epoch's units: warm-up rounds only, then `g_loops` rounds and the KD calls."""
  if epoch < config.warmup_epochs:
    return ("warmup_round",) * config.warmup_g_loops
  kd_calls = config.student.kd_steps // config.student.steps_per_call
  return ("round",) * config.g_loops + ("kd",) * kd_calls


def rounds_before(config, epoch: jax.Array | int, unit: jax.Array | int) -> jax.Array:
  """Synthesis rounds of the run before round unit `unit` of `epoch` (`epoch_plan` puts an
  epoch's rounds first): where a round reads on in the class sequence (class_cycle.py)."""
  warm = jnp.minimum(epoch, config.warmup_epochs)
  return (warm * config.warmup_g_loops + (epoch - warm) * config.g_loops + unit).astype(jnp.int32)


def total_kd_steps(config) -> int:
  kd_calls = sum(epoch_plan(config, e).count("kd") for e in range(config.epochs))
  return kd_calls * config.student.steps_per_call


def bank_capacity(config, synthesis_batch: int, group_size: int = 1) -> int:
  """Images the bank holds: `bank_capacity`, or (0) every image the schedule makes; rounded up
  to whole CNCL groups, so that the bank's slots hold whole groups."""
  capacity = config.bank_capacity or synthesis_batch * sum(
      len(plan) - plan.count("kd") for plan in (epoch_plan(config, e) for e in range(config.epochs)))
  return math.ceil(capacity / group_size) * group_size


def check_schedule(config, synthesis_batch: int, what: str) -> None:
  """The plan and the bank: KD has images to draw and epochs to run. `what` names the
  synthesis batch's size in the config's terms, for the bank-capacity message."""
  s = config.student
  if s.sampler not in memory_bank.SAMPLERS:
    raise ValueError(f"config.student.sampler={s.sampler!r}: use groups (whole CNCL "
                     "groups) or uniform (NAYER's pool sampling).")
  if s.eta_min > s.lr:
    raise ValueError(f"config.student.eta_min={s.eta_min} exceeds config.student.lr={s.lr}: the "
                     "cosine floor must not be above its start.")
  if config.warmup_epochs * config.warmup_g_loops + config.g_loops == 0:
    raise ValueError("No generator round runs before the first KD step (warmup_epochs * "
                     "warmup_g_loops + g_loops = 0), so the student would learn from an empty "
                     "memory bank; raise warmup_g_loops or g_loops.")
  if config.bank_capacity and config.bank_capacity < synthesis_batch:
    raise ValueError(f"config.bank_capacity={config.bank_capacity} is smaller than one synthesis "
                     f"batch ({what} = {synthesis_batch} images); raise it to at least that, or "
                     "set 0 to keep every image the schedule makes.")
  if s.kd_steps % s.steps_per_call:
    raise ValueError(f"student.kd_steps={s.kd_steps} must be a multiple of "
                     f"student.steps_per_call={s.steps_per_call}")
  if config.epochs <= config.warmup_epochs:
    raise ValueError(f"epochs={config.epochs} leaves no KD epoch after "
                     f"warmup_epochs={config.warmup_epochs}")
  if s.mixup_alpha < 0 or s.image_contrastive_weight < 0 or s.image_contrastive_temperature <= 0:
    raise ValueError(f"config.student.mixup_alpha={s.mixup_alpha} and image_contrastive_weight="
                     f"{s.image_contrastive_weight} must be >= 0 (0: off), and "
                     f"image_contrastive_temperature={s.image_contrastive_temperature} > 0.")


def check_grouped(config, num_devices: int, group_classes: int, swept: Collection[str],
                  with_cncl: bool) -> None:
  """The schedule and the batches of a method that banks whole CEND groups of C * (N + 1) rows
  (NAYER's layout, also CAE-DFKD over CMI; C = K unless classes_per_group): each splits
  evenly over the devices."""
  group = group_classes * (config.cend.num_sources + 1)
  c = "K" if not config.get("classes_per_group") else "C"
  synthesis = config.num_groups * group
  check_schedule(config, synthesis, f"num_groups*{c}*(N+1)")
  cncl = cncl_subbatch_groups(config, swept) * group if with_cncl else 0
  cncl_on = with_cncl and (config.student.cncl_weight > 0 or "student.cncl_weight" in swept)
  if cncl_on and (config.student.mixup_alpha > 0 or config.student.image_contrastive_weight > 0):
    raise ValueError("config.student.mixup_alpha and image_contrastive_weight are Table I's "
                     "image-level baselines on the NAYER base, without CNCL: set "
                     "student.cncl_weight=0 (the ladder's mixup and image_contrastive arms do).")
  check_divisible(num_devices,
                  [(f"synthesis batch (num_groups*{c}*(N+1))", synthesis),
                   (f"KD batch (student.batch_groups*{c}*(N+1))",
                    config.student.batch_groups * group),
                   (f"CNCL sub-batch (student.cncl_groups*{c}*(N+1))", cncl)],
                  "num_groups / student.batch_groups / student.cncl_groups")


def check_divisible(num_devices: int, batches: Sequence[tuple[str, int]], fields: str) -> None:
  """Each (name, size) batch splits evenly over the devices; `fields` says what sets them."""
  for name, size in batches:
    if size % num_devices:
      raise ValueError(f"The {name} = {size} is not divisible by the {num_devices} devices; "
                       f"change {fields}.")



def student_loss(params: PyTree, batch_stats: PyTree, setup: Setup, x: jax.Array,
                 t_logits: jax.Array, labels: jax.Array, source_index: jax.Array,
                 group: jax.Array, hparams: dict[str, jax.Array] | None = None,
                 cncl_from: int | None = 0, second_view_from: int | None = None):
  """L_S = t^2 KL(T || S) + lambda * L_CNCL on the student's penultimate features
  (+ the image-level contrastive baseline, Table I).

  One forward pass over all of `x`, so BatchNorm's batch statistics cover every row.
  KL is taken on the first `len(t_logits)` rows (the rows the teacher saw), CNCL on
  rows `cncl_from:second_view_from` (None: no CNCL term and no "kd/cncl" metric). The
  "groups" sampler puts both on every row; see `sample_kd_batch` for "uniform". Rows
  `second_view_from:` (None: none) are second augmented views of the KL rows, for the
  image-level contrastive term (`losses.image_contrastive_loss`).
  """
  cfg = setup.config.student
  hp = functools.partial(hparam, setup, hparams or {})
  (s_logits, aux), new_vars = setup.student.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  num_kl = t_logits.shape[0]
  s_logits = s_logits[:num_kl]
  l_kl = losses.kl_divergence(t_logits, s_logits, hp("student.temperature"))
  loss, cncl = l_kl, {}
  if second_view_from is not None:
    features = aux["features"]
    l_image = losses.image_contrastive_loss(features[:num_kl], features[second_view_from:],
                                            cfg.image_contrastive_temperature)
    loss = loss + hp("student.image_contrastive_weight") * l_image
    cncl["kd/image_contrastive"] = l_image
  if cncl_from is not None:
    rows = slice(cncl_from, second_view_from)
    l_cncl = losses.cncl_loss(aux["features"][rows], labels[rows], source_index[rows],
                              hp("student.cncl_temperature"), group_B=group[rows],
                              same_group_positives=cfg.cncl_same_group, form=cfg.cncl_form)
    loss, cncl = loss + hp("student.cncl_weight") * l_cncl, {**cncl, "kd/cncl": l_cncl}
  agree = jnp.mean(jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
  metrics = {"kd/loss": loss, "kd/kl": l_kl, **cncl, "kd/agreement": agree}
  return loss, (new_vars["batch_stats"], metrics)


def cncl_subbatch_groups(config, swept: Collection[str] = ()) -> int:
  """Whole CNCL groups drawn beside a "uniform" KD batch (0: none).

  Decided in Python from the config, so a run without CNCL computes nothing for
  it. `swept` names the traced hyper-parameters (the state's `hparams` keys, or
  the config's sweep): a swept `student.cncl_weight` may be non-zero in some runs
  of the one program, so the sub-batch is then drawn whatever the config says.
  """
  s = config.student
  if s.sampler != "uniform" or (s.cncl_weight == 0 and "student.cncl_weight" not in swept):
    return 0
  return s.batch_groups if s.cncl_groups is None else s.cncl_groups


def sample_kd_batch(bank: memory_bank.MemoryBank, rng: jax.Array, *, setup: Setup,
                    with_cncl: bool = True, swept: Collection[str] = (),
                    mesh: Mesh | None = None):
  """A KD step's (images01, labels, source_index, group) and the first CNCL row.

  "groups" (`memory_bank.sample_groups`): `batch_groups` whole CNCL groups, each
  anchor with its positives; KL and CNCL both on every row (first CNCL row 0).

  "uniform" (`memory_bank.sample`): `batch_groups * K * (N + 1)` images drawn
  uniformly from the filled bank, all under KL: NAYER's pool sampling. NAYER
  (datafree/synthesis/nayer.py) rebuilds a DataLoader with shuffle=True over its
  PNG pool after every generator round and `sample()` takes its next batch: no
  image repeats within one pass over the pool, the pass's last batch is smaller,
  and the shuffle restarts every round. Here every draw is with replacement and
  full-sized: a batch of B from a pool of P holds about B^2 / 2P repeated pairs
  (1.6 for 500 from NAYER's 80k images after warm-up).

  With CNCL on (`cncl_subbatch_groups`), whole groups are drawn beside the uniform
  rows and appended after them: one student forward pass covers both (BatchNorm
  statistics over all rows), KL is taken on the uniform rows only and CNCL on the
  group rows only (first CNCL row = the uniform batch size). KL stays off the
  group rows so that switching CNCL on leaves the distillation itself as it was,
  the same number of KD images drawn the same way (only BN's batch statistics see
  the group rows), and the teacher need not run on them. Without CNCL rows (or
  `with_cncl` False: a method without CNCL) the first CNCL row is None.
  """
  cfg = setup.config.student
  if cfg.sampler == "groups":
    batch = memory_bank.sample_groups(bank, rng, cfg.batch_groups, setup.group_size)
    return constrain_batch(batch, mesh), (0 if with_cncl else None)
  rng_uniform, rng_groups = jax.random.split(rng)
  num_kl = setup.kd_batch
  batch = constrain_batch(memory_bank.sample(bank, rng_uniform, num_kl), mesh)
  num_groups = cncl_subbatch_groups(setup.config, swept) if with_cncl else 0
  if not num_groups:
    return batch, None
  groups = memory_bank.sample_groups(bank, rng_groups, num_groups, setup.group_size)
  groups = constrain_batch(groups, mesh)
  batch = tuple(jnp.concatenate(parts) for parts in zip(batch, groups))
  return constrain_batch(batch, mesh), num_kl


@struct.dataclass
class StudentCarry:
  """What changes during a KD call."""
  student: PyTree
  opt_state: PyTree
  kd_step: jax.Array


def start_kd(state: TrainState) -> tuple[StudentCarry, jax.Array]:
  return (StudentCarry(state.student, state.student_opt_state, state.kd_step),
          fold(state.rng, state.epoch, state.unit))


def student_step(carry: StudentCarry, rng: jax.Array, step: jax.Array, state: TrainState,
                 teacher_vars: PyTree, *, setup: Setup, with_cncl: bool,
                 mesh: Mesh | None = None):
  """One SGD step on a KD batch drawn from the bank (`sample_kd_batch`)."""
  rng_sample, rng_aug = jax.random.split(jax.random.fold_in(rng, step))
  (images, labels, source_index, group), cncl_from = sample_kd_batch(
      state.method.bank, rng_sample, setup=setup, with_cncl=with_cncl,
      swept=state.hparams.keys(), mesh=mesh)
  x = normalize(augment.random_crop_flip(rng_aug, images), setup.mean, setup.std)
  num_kl = cncl_from or x.shape[0]   # KL rows come first; "groups" has CNCL on every row (0).
  cfg = setup.config.student
  if cfg.mixup_alpha > 0:            # Table I's Mixup: the teacher labels the mixed images.
    x = x.at[:num_kl].set(augment.mixup(jax.random.fold_in(rng_aug, MIXUP), x[:num_kl],
                                        cfg.mixup_alpha))
  t_logits, _ = setup.teacher.apply(teacher_vars, x[:num_kl], train=False)
  second_view_from = None
  if cfg.image_contrastive_weight > 0:
    second_view_from = x.shape[0]    # Table I's image-level contrastive: a second view.
    view = augment.random_crop_flip(jax.random.fold_in(rng_aug, SECOND_VIEW), images[:num_kl])
    x = constrain_batch(jnp.concatenate([x, normalize(view, setup.mean, setup.std)]), mesh)
  grad_fn = jax.value_and_grad(student_loss, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(
      carry.student["params"], carry.student["batch_stats"], setup, x,
      jax.lax.stop_gradient(t_logits), labels, source_index, group, state.hparams, cncl_from,
      second_view_from)
  updates, opt_state = setup.student_tx.update(grads, carry.opt_state, carry.student["params"])
  params = optax.apply_updates(carry.student["params"], updates)
  return StudentCarry({"params": params, "batch_stats": batch_stats}, opt_state,
                      carry.kd_step + 1), metrics


def finish_kd(state: TrainState, carry: StudentCarry, rng: jax.Array, teacher_vars: PyTree):
  state = state.replace(student=carry.student, student_opt_state=carry.opt_state,
                        kd_step=carry.kd_step)
  return state, {}, {}


def kd_phase(setup: Setup, mesh: Mesh | None, with_cncl: bool) -> Phase:
  """A KD call: `student.steps_per_call` steps on bank batches (CNCL rows where `with_cncl`)."""
  return Phase(start=start_kd,
               step=functools.partial(student_step, setup=setup, with_cncl=with_cncl, mesh=mesh),
               finish=finish_kd, num_steps=setup.config.student.steps_per_call,
               label="KD call", trains_student=True, shows=KD_SHOWS)


ROUND_SHOWS = ("gen/loss", "gen/ce", "gen/bn", "gen/adv", "gen/teacher_acc_on_best",
               LOW_CONFIDENCE.mean_key)


def round_phases(setup: Setup, mesh: Mesh | None, *, start_round, step, finish, num_steps: int,
                 label: str = "generator round", shows: tuple[str, ...] = ROUND_SHOWS,
                 **start_kwargs) -> dict[str, Phase]:
  """Warm-up and regular synthesis rounds: one step and one finish (so each compiles once);
  `start_round(state, setup=, warmup=, mesh=, **start_kwargs)` begins either."""
  step = functools.partial(step, setup=setup, mesh=mesh)
  finish = functools.partial(finish, setup=setup)
  round_phase = lambda warmup: Phase(
      start=functools.partial(start_round, setup=setup, warmup=warmup, mesh=mesh, **start_kwargs),
      step=step, finish=finish, num_steps=num_steps, label=label, makes_images=True,
      shows=shows, per_class=(LOW_CONFIDENCE,))
  return {"warmup_round": round_phase(True), "round": round_phase(False)}


def rounds_then_kd(setup: Setup, mesh: Mesh | None, *, start_round, generator_step,
                   finish_round, inputs, with_cncl: bool,
                   shows: tuple[str, ...] = ROUND_SHOWS) -> dict[str, Phase]:
  """The units of a generator-based bank method: its rounds (`generator.steps` steps each) and
  KD calls, in the order `epoch_plan` gives."""
  return {**round_phases(setup, mesh, start_round=start_round, step=generator_step,
                         finish=finish_round, num_steps=setup.config.generator.steps,
                         shows=shows, inputs=inputs),
          "kd": kd_phase(setup, mesh, with_cncl)}


def latest_images(setup: Setup, method_state) -> tuple[jax.Array, jax.Array]:
  """The last round's banked batch in [0, 1] and its labels (the epoch's image grid)."""
  images_u8, labels = memory_bank.latest(method_state.bank, setup.synthesis_batch)
  return images_u8.astype(jnp.float32) / 255.0, labels
