"""NAYER (CVPR 2024) as a base method: label embeddings through a noisy layer, a bank, KD by KL.

METHOD.md b.1 and a.7. Per epoch: generator rounds, then KD calls on the bank.
- A round: a new noisy layer, one batch of generator inputs, `generator.steps` Adam
  steps on L_G = ce * CE + bn * L_BN (with NAYER's BN-stat EMA) + adv * L_adv (off in
  the warm-up); the batch with the lowest loss goes to the bank.
- A KD call: `student.steps_per_call` SGD steps on batches drawn from the bank (bank_kd.py).
- A whole new generator every `generator.life_epochs` (NAYER's g_life).
`make_method` builds a method on this base from two plug-ins: what the generator
is fed, and whether the student loss adds CNCL. CAE-DFKD (cae_dfkd.py) is this base
with CEND inputs and CNCL; NAYER itself feeds the clean embeddings and adds nothing.
"""

import dataclasses
import functools
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods import bank_kd
from caedfkd_jax.methods.base import (Method, Phase, Setup, TrainState, fold, hparam,
                                      student_optimizer, student_schedule, teacher_judgement)
from caedfkd_jax.runtime.mesh import constrain_batch
from caedfkd_jax.synthesis import (augment, cend, class_cycle, generator as generator_lib, losses,
                                   memory_bank)

PyTree = Any
# What the NAYER base reads besides KD from the bank: its generator, its loss, the embedding
# table and the batch layout (num_groups groups of K * (N + 1) rows, clean views on NAYER).
READS = (*bank_kd.READS, "embeddings", "num_groups", "classes_per_group", "cend.num_sources",
         "student.batch_groups", "student_train_mode_in_rounds", "generator.", "loss.")
SWEEPABLE = ("loss.ce", "loss.bn", "loss.adv", "loss.bn_momentum", "student.temperature")
# Given (setup, the run's swept hparams, rng, the groups' classes: G x C, or None for all K in
# label order), the generator's inputs for one round.
GeneratorInputs = Callable[[Setup, dict, jax.Array, jax.Array | None], cend.GeneratorBatch]
RENEW = 2**31 - 1   # Folded into the rng for the generator's own draws (init and renewal).


@struct.dataclass
class SynthesisState:
  """What NAYER keeps between units besides the student."""
  generator_params: PyTree
  bn_ema: PyTree            # EMA of the teacher's BN input stats (NAYER's momentum).
  bn_ema_valid: jax.Array   # bool: bn_ema holds a value yet.
  bank: memory_bank.MemoryBank


# --------------------------------------------------------------------------- #
# Generator inputs (the plug-in CEND replaces)
# --------------------------------------------------------------------------- #


def clean_inputs(setup: Setup, hparams: dict, rng: jax.Array,
                 classes_GxC: jax.Array | None = None) -> cend.GeneratorBatch:
  """NAYER's inputs: every row is its class's clean label embedding (one per (group, view))."""
  cfg = setup.config
  return cend.build_generator_batch(rng, setup.table_KxD, cfg.num_groups, cfg.cend.num_sources,
                                    0.0, mode="clean", classes_GxC=classes_GxC)


def round_classes(setup: "NayerSetup", state: TrainState) -> jax.Array | None:
  """The classes of this round's groups (`class_cycle.group_classes`), or None where every
  group holds all K (`classes_per_group` 0 or K: today's layout, bit for bit)."""
  if setup.group_classes == setup.num_classes:
    return None
  index = bank_kd.rounds_before(setup.config, state.epoch, state.unit)
  return class_cycle.group_classes(jax.random.fold_in(state.rng, class_cycle.CLASS_CYCLE),
                                   index, setup.config.num_groups, setup.group_classes,
                                   setup.num_classes)


# --------------------------------------------------------------------------- #
# Generator round (Eq. 5)
# --------------------------------------------------------------------------- #


def student_logits(setup: Setup, student: PyTree, x: jax.Array,
                   train_mode: jax.Array | None) -> tuple[jax.Array, PyTree]:
  """The student's logits for L_adv and its batch statistics after them.

  `train_mode` None: eval mode, no statistics returned (the paper's reading). Else a traced
  bool: where true, NAYER's `student.train()` (its round loop leaves the student in train
  mode after a round): BatchNorm normalises with the batch's statistics and updates its
  running ones, as every forward pass of a PyTorch module in train mode does.
  """
  if train_mode is None:
    return setup.student.apply(student, x, train=False)[0], None

  def train(_):
    (logits, _), updated = setup.student.apply(student, x, train=True, mutable=["batch_stats"])
    return logits, updated["batch_stats"]

  def evaluate(_):
    return setup.student.apply(student, x, train=False)[0], student["batch_stats"]

  return jax.lax.cond(train_mode, train, evaluate, None)


def generator_loss(params: PyTree, setup: Setup, teacher_vars: PyTree, student: PyTree,
                   batch: cend.GeneratorBatch, bn_ema: PyTree, bn_ema_valid: jax.Array,
                   adv_on: jax.Array, rng: jax.Array, mesh: Mesh | None = None,
                   hparams: dict[str, jax.Array] | None = None,
                   student_train: jax.Array | None = None):
  """L_G = ce * CE(T(A(G(e))), y) + bn * L_BN + adv * L_adv. Returns (loss, aux).

  `student_train`: see `student_logits`; NAYER runs the student only where L_adv is on.
  """
  hp = functools.partial(hparam, setup, hparams or {})
  images = setup.generator.apply({"params": params}, batch.embeddings_BxD)
  images = constrain_batch(images, mesh)
  x = normalize(augment.random_crop_flip(rng, images, flip=setup.config.generator.flip),
                setup.mean, setup.std)
  (t_logits, _), t_state = setup.teacher.apply(teacher_vars, x, train=False, mutable=["bn_stats"])
  bn_stats = t_state["bn_stats"]
  blended = jax.tree.map(
      lambda cur, ema: jnp.where(bn_ema_valid, losses.blend_bn_statistics(cur, ema, hp("loss.bn_momentum")), cur),
      bn_stats, bn_ema)
  l_bn = losses.bn_statistics_loss(blended, teacher_vars["batch_stats"],
                                   setup.config.loss.bn_reduce)
  l_ce = losses.cross_entropy(t_logits, batch.labels_B)
  train_mode = (None if student_train is None
                else student_train & (adv_on > 0) & (hp("loss.adv") > 0))
  s_logits, student_stats = student_logits(setup, student, x, train_mode)
  l_adv = losses.adversarial_loss(t_logits, s_logits)
  loss = hp("loss.ce") * l_ce + hp("loss.bn") * l_bn + hp("loss.adv") * adv_on * l_adv
  metrics = {"gen/loss": loss, "gen/ce": l_ce, "gen/bn": l_bn, "gen/adv": l_adv}
  return loss, (images, jax.lax.stop_gradient(bn_stats), metrics,
                jax.lax.stop_gradient(student_stats))


@struct.dataclass
class RoundCarry:
  """What changes during a generator round."""
  params: PyTree
  opt_state: PyTree
  best_loss: jax.Array
  best_images: jax.Array
  last_bn_stats: PyTree
  student_batch_stats: PyTree   # The student's running statistics as the round moves them
                                # (student_train_mode_in_rounds; None where it is off).


@struct.dataclass
class RoundContext:
  """What a round fixes at its start: the generator's inputs, the adversarial switch and
  (student_train_mode_in_rounds) whether the student runs in train mode."""
  batch: cend.GeneratorBatch
  adv_on: jax.Array
  rng: jax.Array
  student_train: jax.Array | None = None


def start_round(state: TrainState, *, setup: Setup, inputs: GeneratorInputs, warmup: bool,
                mesh: Mesh | None = None) -> tuple[RoundCarry, RoundContext]:
  """A NAYER round begins: new noisy layer, one batch of inputs, a fresh Adam."""
  rng_noisy, rng_batch, rng_steps = jax.random.split(fold(state.rng, state.epoch, state.unit), 3)
  params = state.method.generator_params
  if setup.config.generator.reinit_noisy_layer:
    params = generator_lib.reinit_noisy_layer(params, rng_noisy)
  batch = constrain_batch(inputs(setup, state.hparams, rng_batch, round_classes(setup, state)),
                          mesh)
  image_shape = (setup.synthesis_batch, *state.method.bank.images.shape[1:])
  # NAYER's round loop calls student.eval() when an epoch's synthesis starts and
  # student.train() after each round: an epoch's rounds after its first see a training student.
  student_train = (state.unit > 0 if setup.config.get("student_train_mode_in_rounds")
                   and not warmup else None)
  carry = RoundCarry(params, setup.generator_tx.init(params), jnp.float32(jnp.inf),
                     jnp.zeros(image_shape, jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.method.bn_ema),
                     None if student_train is None else state.student["batch_stats"])
  return carry, RoundContext(batch, jnp.float32(0.0 if warmup else 1.0), rng_steps,
                             student_train)


def generator_step(carry: RoundCarry, ctx: RoundContext, step: jax.Array, state: TrainState,
                   teacher_vars: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """One Adam step of G (Eq. 5); keeps the batch with the lowest loss seen this round."""
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  student = (state.student if carry.student_batch_stats is None
             else {**state.student, "batch_stats": carry.student_batch_stats})
  (loss, (images, bn_stats, metrics, student_stats)), grads = grad_fn(
      carry.params, setup, teacher_vars, student, ctx.batch, state.method.bn_ema,
      state.method.bn_ema_valid, ctx.adv_on, jax.random.fold_in(ctx.rng, step), mesh,
      state.hparams, ctx.student_train)
  updates, opt_state = setup.generator_tx.update(grads, carry.opt_state, carry.params)
  better = loss < carry.best_loss
  carry = RoundCarry(
      params=optax.apply_updates(carry.params, updates), opt_state=opt_state,
      best_loss=jnp.where(better, loss, carry.best_loss),
      best_images=jnp.where(better, jax.lax.stop_gradient(images), carry.best_images),
      last_bn_stats=bn_stats,
      student_batch_stats=None if carry.student_batch_stats is None else student_stats)
  return carry, metrics


def finish_round(state: TrainState, carry: RoundCarry, ctx: RoundContext, teacher_vars: PyTree,
                 *, setup: Setup):
  """Banks the round's best batch and updates the BN-stat EMA with its last step.

  Returns (state, {"gen/teacher_acc_on_best"}, {"low_conf": share of each class's
  images the teacher is unsure about (Figure 2a), "images": the banked batch}).
  """
  synth = state.method
  m = hparam(setup, state.hparams, "loss.bn_momentum")
  bn_ema = jax.tree.map(
      lambda ema, last: jnp.where(synth.bn_ema_valid, m * ema + (1 - m) * last, last),
      synth.bn_ema, carry.last_bn_stats)
  batch = ctx.batch
  bank = memory_bank.add(synth.bank, carry.best_images, batch.labels_B, batch.source_index_B,
                         batch.group_B)
  x = normalize(carry.best_images, setup.mean, setup.std)
  t_logits, _ = setup.teacher.apply(teacher_vars, x, train=False)
  low_conf_K, teacher_acc = teacher_judgement(t_logits, batch.labels_B, setup.num_classes,
                                              setup.config.low_confidence)
  state = state.replace(method=SynthesisState(carry.params, bn_ema, jnp.bool_(True), bank))
  if ctx.student_train is not None:   # NAYER's training student moved its running statistics.
    state = state.replace(student={**state.student, "batch_stats": carry.student_batch_stats})
  return (state, {"gen/teacher_acc_on_best": teacher_acc},
          {"low_conf": low_conf_K, "images": carry.best_images})


# --------------------------------------------------------------------------- #
# The method: setup, state, units, schedule
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, kw_only=True)
class NayerSetup(bank_kd.BankSetup):
  """The NAYER base's static parts (the CMI base's too, with its own generator)."""
  generator: Any            # synthesis.generator.Generator (the noisy-layer NLGenerator)
  generator_tx: optax.GradientTransformation
  table_KxD: jax.Array | None = None     # The class embeddings (None: the method reads none).
  noise_scale_D: jax.Array | None = None  # cend.noise_scale(table, cend.magnitude_scale), for
                                          # inputs that read it; None: magnitudes in table units.
  group_classes: int = 0    # C: the classes of one CNCL group (K unless classes_per_group).


def renews_generator(config, epoch: int) -> bool:
  """Whether a whole new generator starts `epoch`: NAYER's g_life schedule.

  NAYER re-creates it where `(epoch - warmup) % g_life == 0 or epoch % g_life == 0`
  (datafree/synthesis/nayer.py), so also when the warm-up ends. Epoch 0's
  generator is the run's first one.
  """
  life, warmup = config.generator.life_epochs, config.warmup_epochs
  return epoch > 0 and ((epoch - warmup) % life == 0 or epoch % life == 0)


def table_fields(base: Setup) -> dict[str, Any]:
  """The embedding table, and CEND's noise scale where the method reads it (NayerSetup's)."""
  if base.table is None:
    return {}
  vectors = base.table.vectors
  scaled = base.method.reads_field("cend.magnitude_scale")
  return {"table_KxD": jnp.asarray(vectors, jnp.float32),
          "noise_scale_D": (cend.noise_scale(vectors, base.config.cend.magnitude_scale)
                            if scaled else None)}


def classes_per_group(config, num_classes: int) -> int:
  """C: `classes_per_group`, or K where it is 0."""
  return config.get("classes_per_group", 0) or num_classes


def create_setup(base: Setup) -> NayerSetup:
  config = base.config
  schedule = student_schedule(config.student, bank_kd.total_kd_steps(config))
  c = classes_per_group(config, base.num_classes)
  group_size = c * (config.cend.num_sources + 1)   # C anchors, C*N views.
  g = config.generator
  return NayerSetup.extend(
      base, student_tx=student_optimizer(schedule, config.student), student_lr=schedule,
      generator=generator_lib.Generator(
          num_classes=c, img_size=base.image_size,
          noise_dim=g.noise_dim, ngf=g.ngf, dtype=base.dtype,
          noisy_chunk_rows=generator_lib.noisy_chunk_rows(
              g.noisy_chunks, c, config.cend.num_sources + 1)), group_classes=c,
      generator_tx=optax.adam(g.lr, b1=g.b1, b2=g.b2), **table_fields(base),
      synthesis_batch=config.num_groups * group_size, group_size=group_size,
      kd_batch=config.student.batch_groups * group_size)


def new_generator_params(setup: NayerSetup, rng: jax.Array) -> PyTree:
  return generator_lib.init_generator(rng, setup.generator, setup.synthesis_batch,
                                      setup.table_KxD.shape[1])


def init_state(setup: NayerSetup, teacher_vars: PyTree, rng: jax.Array) -> SynthesisState:
  capacity = bank_kd.bank_capacity(setup.config, setup.synthesis_batch, setup.group_size)
  return SynthesisState(
      generator_params=new_generator_params(setup, rng),
      bn_ema=jax.tree.map(jnp.zeros_like, teacher_vars["batch_stats"]),
      bn_ema_valid=jnp.bool_(False),
      bank=memory_bank.create_bank(capacity, (setup.image_size, setup.image_size, 3)))


def renewed_generator(setup: NayerSetup, state: TrainState) -> TrainState:
  """A whole new generator, where `renews_generator` says (NAYER's g_life)."""
  params = new_generator_params(setup, fold(state.rng, state.epoch, RENEW))
  return state.replace(method=state.method.replace(generator_params=params))


def check_base(config, num_devices: int, num_classes: int, swept: Collection[str], *,
               method: Method) -> None:
  """The base's own checks: the generator, its loss, the batch layout and the bank schedule."""
  noisy_chunks = config.generator.noisy_chunks
  if noisy_chunks not in generator_lib.NOISY_CHUNKS:
    raise ValueError(f"config.generator.noisy_chunks={noisy_chunks!r}: use per_view (NAYER: one "
                     "noisy Linear per K rows) or per_group (one per CNCL group of K*(N+1) rows).")
  # Clean views of one group through one shared Linear are N+1 copies of one image per class:
  # per_view's images at 1/(N+1) of the diversity, for the same compute. Refused.
  # cend.magnitude=0 (or a zero in cend.magnitudes) makes such copies too, but is allowed: it is
  # the end point of a magnitude sweep.
  clean = not method.reads_field("cend.mode") or config.cend.mode == "clean"
  if noisy_chunks == "per_group" and clean:
    raise ValueError("config.generator.noisy_chunks='per_group' with config.cend.mode='clean' "
                     "would send each group's N+1 identical clean views through one Linear: "
                     "N+1 identical images per class and group. Use "
                     "--config.generator.noisy_chunks=per_view for clean embeddings (NAYER), or "
                     "cend.mode=cend.")
  class_cycle.check_classes_per_group(config.classes_per_group, num_classes)
  bank_kd.check_grouped(config, num_devices, classes_per_group(config, num_classes), swept,
                        with_cncl=method.reads_field("student.cncl_weight"))


def make_method(name: str, summary: str, inputs: GeneratorInputs, with_cncl: bool, *,
                reads: tuple[str, ...] = READS, sweepable: tuple[str, ...] = SWEEPABLE,
                check: Callable | None = None,
                bundle_fields: Callable[[Any], dict] = lambda config: {}, **fields) -> Method:
  """A method on the NAYER base, given its generator inputs and whether it adds CNCL.

  `check(config, num_devices, num_classes, swept)` adds the inputs' own checks to the base's.
  """

  def phases(setup: NayerSetup, mesh: Mesh | None) -> dict[str, Phase]:
    return bank_kd.rounds_then_kd(setup, mesh, start_round=start_round,
                                  generator_step=generator_step, finish_round=finish_round,
                                  inputs=inputs, with_cncl=with_cncl)

  def check_config(config, num_devices: int, num_classes: int, swept: Collection[str]) -> None:
    if check is not None:
      check(config, num_devices, num_classes, swept)
    check_base(config, num_devices, num_classes, swept, method=method)

  method = Method(
      name=name, summary=summary, reads=reads, create_setup=create_setup,
      init_state=init_state, phases=phases, epoch_plan=bank_kd.epoch_plan,
      latest_images=bank_kd.latest_images,
      epoch_scalars=lambda synth: {"bank/size": synth.bank.size},
      finite_parts=lambda synth: {"generator params": synth.generator_params,
                                  "teacher BN-statistics EMA": synth.bn_ema},
      bundle_fields=bundle_fields, check_config=check_config, sweepable=sweepable,
      embeddings=True, renews=renews_generator, renew=renewed_generator, **fields)
  return method


METHOD = make_method(
    "nayer", "NAYER (CVPR 2024): clean label embeddings through a noisy-layer generator; a bank; "
    "KD by KL.", inputs=clean_inputs, with_cncl=False)
