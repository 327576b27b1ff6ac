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

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.synthesis import augment, cend, generator as generator_lib, losses, memory_bank
from caedfkd_jax import models
from caedfkd_jax.io.bundle import Bundle, normalize
from caedfkd_jax.io.embeddings import EmbeddingTable, check_table_matches_classes
from caedfkd_jax.methods import bank_kd
from caedfkd_jax.methods.base import Method, fold, teacher_judgement
from caedfkd_jax.engine.steps import (Phase, Setup, TrainState, constrain_batch, hparam,
                               student_optimizer, student_schedule)

PyTree = Any
# Given (setup, the run's swept hparams, rng), the generator's inputs for one round.
GeneratorInputs = Callable[[Setup, dict, jax.Array], cend.GeneratorBatch]
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


def clean_inputs(setup: Setup, hparams: dict, rng: jax.Array) -> cend.GeneratorBatch:
  """NAYER's inputs: every row is its class's clean label embedding (one per (group, view))."""
  cfg = setup.config
  return cend.build_generator_batch(rng, setup.table_KxD, cfg.num_groups, cfg.cend.num_sources,
                                    0.0, mode="clean")


# --------------------------------------------------------------------------- #
# Generator round (Eq. 5)
# --------------------------------------------------------------------------- #


def generator_loss(params: PyTree, setup: Setup, teacher_vars: PyTree, student: PyTree,
                   batch: cend.GeneratorBatch, bn_ema: PyTree, bn_ema_valid: jax.Array,
                   adv_on: jax.Array, rng: jax.Array, mesh: Mesh | None = None,
                   hparams: dict[str, jax.Array] | None = None):
  """L_G = ce * CE(T(A(G(e))), y) + bn * L_BN + adv * L_adv. Returns (loss, aux)."""
  hp = functools.partial(hparam, setup, hparams or {})
  images = setup.generator.apply({"params": params}, batch.embeddings_BxD)
  images = constrain_batch(images, mesh)
  x = normalize(augment.random_crop_flip(rng, images), setup.mean, setup.std)
  (t_logits, _), t_state = setup.teacher.apply(teacher_vars, x, train=False, mutable=["bn_stats"])
  bn_stats = t_state["bn_stats"]
  blended = jax.tree.map(
      lambda cur, ema: jnp.where(bn_ema_valid, losses.blend_bn_statistics(cur, ema, hp("loss.bn_momentum")), cur),
      bn_stats, bn_ema)
  l_bn = losses.bn_statistics_loss(blended, teacher_vars["batch_stats"],
                                   setup.config.loss.bn_reduce)
  l_ce = losses.cross_entropy(t_logits, batch.labels_B)
  s_logits, _ = setup.student.apply(student, x, train=False)
  l_adv = losses.adversarial_loss(t_logits, s_logits)
  loss = hp("loss.ce") * l_ce + hp("loss.bn") * l_bn + hp("loss.adv") * adv_on * l_adv
  metrics = {"gen/loss": loss, "gen/ce": l_ce, "gen/bn": l_bn, "gen/adv": l_adv}
  return loss, (images, jax.lax.stop_gradient(bn_stats), metrics)


@struct.dataclass
class RoundCarry:
  """What changes during a generator round."""
  params: PyTree
  opt_state: PyTree
  best_loss: jax.Array
  best_images: jax.Array
  last_bn_stats: PyTree


@struct.dataclass
class RoundContext:
  """What a round fixes at its start: the generator's inputs and the adversarial switch."""
  batch: cend.GeneratorBatch
  adv_on: jax.Array
  rng: jax.Array


def start_round(state: TrainState, *, setup: Setup, inputs: GeneratorInputs, warmup: bool,
                mesh: Mesh | None = None) -> tuple[RoundCarry, RoundContext]:
  """A NAYER round begins: new noisy layer, one batch of inputs, a fresh Adam."""
  rng_noisy, rng_batch, rng_steps = jax.random.split(fold(state.rng, state.epoch, state.unit), 3)
  params = state.method.generator_params
  if setup.config.generator.reinit_noisy_layer:
    params = generator_lib.reinit_noisy_layer(params, rng_noisy)
  batch = constrain_batch(inputs(setup, state.hparams, rng_batch), mesh)
  image_shape = (setup.synthesis_batch, *state.method.bank.images.shape[1:])
  carry = RoundCarry(params, setup.generator_tx.init(params), jnp.float32(jnp.inf),
                     jnp.zeros(image_shape, jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.method.bn_ema))
  return carry, RoundContext(batch, jnp.float32(0.0 if warmup else 1.0), rng_steps)


def generator_step(carry: RoundCarry, ctx: RoundContext, step: jax.Array, state: TrainState,
                   teacher_vars: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """One Adam step of G (Eq. 5); keeps the batch with the lowest loss seen this round."""
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (loss, (images, bn_stats, metrics)), grads = grad_fn(
      carry.params, setup, teacher_vars, state.student, ctx.batch, state.method.bn_ema,
      state.method.bn_ema_valid, ctx.adv_on, jax.random.fold_in(ctx.rng, step), mesh,
      state.hparams)
  updates, opt_state = setup.generator_tx.update(grads, carry.opt_state, carry.params)
  better = loss < carry.best_loss
  carry = RoundCarry(
      params=optax.apply_updates(carry.params, updates), opt_state=opt_state,
      best_loss=jnp.where(better, loss, carry.best_loss),
      best_images=jnp.where(better, jax.lax.stop_gradient(images), carry.best_images),
      last_bn_stats=bn_stats)
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
  return (state, {"gen/teacher_acc_on_best": teacher_acc},
          {"low_conf": low_conf_K, "images": carry.best_images})


# --------------------------------------------------------------------------- #
# The method: setup, state, units, schedule
# --------------------------------------------------------------------------- #


def epoch_plan(config, epoch: int) -> tuple[str, ...]:
  """An epoch's units: warm-up rounds only, then `g_loops` rounds and the KD calls."""
  if epoch < config.warmup_epochs:
    return ("warmup_round",) * config.warmup_g_loops
  kd_calls = config.student.kd_steps // config.student.steps_per_call
  return ("round",) * config.g_loops + ("kd",) * kd_calls


def renews_generator(config, epoch: int) -> bool:
  """Whether a whole new generator starts `epoch`: NAYER's g_life schedule.

  NAYER re-creates it where `(epoch - warmup) % g_life == 0 or epoch % g_life == 0`
  (datafree/synthesis/nayer.py), so also when the warm-up ends. Epoch 0's
  generator is the run's first one.
  """
  life, warmup = config.generator.life_epochs, config.warmup_epochs
  return epoch > 0 and ((epoch - warmup) % life == 0 or epoch % life == 0)


def total_kd_steps(config) -> int:
  kd_calls = sum(epoch_plan(config, e).count("kd") for e in range(config.epochs))
  return kd_calls * config.student.steps_per_call


def default_bank_capacity(config, synthesis_batch: int) -> int:
  rounds = sum(len(epoch_plan(config, e)) - epoch_plan(config, e).count("kd")
               for e in range(config.epochs))
  return rounds * synthesis_batch


def create_setup(config, teacher: Bundle, table: EmbeddingTable, *, method: Method) -> Setup:
  from caedfkd_jax.engine.train import compute_dtype   # The dtype rule is the launcher's.
  dtype = compute_dtype(config.compute_dtype)
  num_classes = teacher.spec.num_classes
  if table.vectors.shape[0] != num_classes:
    raise ValueError(
        f"The embedding table {config.embeddings!r} has {table.vectors.shape[0]} classes but the "
        f"teacher has {num_classes}; make a table for the teacher's classes with `caedfkd embed`.")
  check_table_matches_classes(table, teacher.spec.class_names, config.embeddings)
  if config.student_arch not in models.ARCHS:
    raise ValueError(f"Unknown student_arch {config.student_arch!r}. Known archs: "
                     f"{', '.join(sorted(models.ARCHS))}.")
  schedule = student_schedule(config.student, total_kd_steps(config))
  group_size = num_classes * (config.cend.num_sources + 1)   # A CEND group: K anchors, K*N views.
  g = config.generator
  return Setup(
      teacher=models.create_model(teacher.spec.arch, num_classes, dtype),
      student=models.create_model(config.student_arch, num_classes, dtype),
      generator=generator_lib.Generator(
          num_classes=num_classes, img_size=teacher.spec.image_size,
          noise_dim=g.noise_dim, ngf=g.ngf, dtype=dtype,
          noisy_chunk_rows=generator_lib.noisy_chunk_rows(
              g.noisy_chunks, num_classes, config.cend.num_sources + 1)),
      table_KxD=jnp.asarray(table.vectors, jnp.float32),
      mean=tuple(teacher.spec.mean), std=tuple(teacher.spec.std),
      student_tx=student_optimizer(schedule, config.student),
      generator_tx=optax.adam(g.lr, b1=g.b1, b2=g.b2), config=config,
      noise_scale_D=cend.noise_scale(table.vectors, config.cend.magnitude_scale),
      method=method, student_lr=schedule, num_classes=num_classes, group_size=group_size,
      synthesis_batch=config.num_groups * group_size,
      kd_batch=config.student.batch_groups * group_size)


def new_generator_params(setup: Setup, rng: jax.Array) -> PyTree:
  return generator_lib.init_generator(rng, setup.generator, setup.synthesis_batch,
                                      setup.table_KxD.shape[1])


def init_state(setup: Setup, teacher_vars: PyTree, rng: jax.Array,
               image_size: int) -> SynthesisState:
  config = setup.config
  capacity = config.bank_capacity or default_bank_capacity(config, setup.synthesis_batch)
  capacity = math.ceil(capacity / setup.group_size) * setup.group_size
  return SynthesisState(
      generator_params=new_generator_params(setup, rng),
      bn_ema=jax.tree.map(jnp.zeros_like, teacher_vars["batch_stats"]),
      bn_ema_valid=jnp.bool_(False),
      bank=memory_bank.create_bank(capacity, (image_size, image_size, 3)))


def renewed_generator(setup: Setup, state: TrainState) -> TrainState:
  """A whole new generator, where `renews_generator` says (NAYER's g_life)."""
  params = new_generator_params(setup, fold(state.rng, state.epoch, RENEW))
  return state.replace(method=state.method.replace(generator_params=params))


def make_method(name: str, summary: str, inputs: GeneratorInputs, with_cncl: bool,
                bundle_fields: Callable[[Any], dict] = lambda config: {},
                ignores: tuple[str, ...] = ()) -> Method:
  """A method on the NAYER base, given its generator inputs and whether it adds CNCL."""

  def phases(setup: Setup, mesh: Mesh | None) -> dict[str, Phase]:
    return bank_kd.rounds_then_kd(setup, mesh, start_round=start_round,
                                  generator_step=generator_step, finish_round=finish_round,
                                  inputs=inputs, with_cncl=with_cncl)

  method = Method(  # create_setup records `method` in the Setup it makes.
      name=name, summary=summary,
      create_setup=lambda config, teacher, table: create_setup(config, teacher, table,
                                                               method=method),
      init_state=init_state, phases=phases, epoch_plan=epoch_plan,
      unit_labels=bank_kd.UNIT_LABELS,
      latest_images=bank_kd.latest_images,
      epoch_scalars=lambda synth: {"bank/size": synth.bank.size},
      finite_parts=lambda synth: {"generator params": synth.generator_params,
                                  "teacher BN-statistics EMA": synth.bn_ema},
      bundle_fields=bundle_fields, ignores=ignores, renews=renews_generator,
      renew=renewed_generator)
  return method


METHOD = make_method(
    "nayer", "NAYER (CVPR 2024): clean label embeddings through a noisy-layer generator; a bank; "
    "KD by KL.", inputs=clean_inputs, with_cncl=False,
    ignores=("cend.mode", "cend.magnitude", "cend.magnitudes", "cend.magnitude_scale",
             "cend.sources", "student.cncl_"))
