"""CMI, Contrastive Model Inversion (IJCAI 2021), as a base method (METHOD.md b.3).

Per round (datafree/synthesis/contrastive.py of github.com/zju-vipa/CMI):
- a generator re-initialised from scratch (`generator.cmi_reset`) and a fresh batch of
  inputs, optimised together by a fresh Adam for `generator.steps` steps;
- L_G = bn * L_BN + ce * CE + adv * L_adv + cr * L_cr, where L_cr (cmi_contrast.py)
  asks a persistent head to match each image's local view (random resized crop) to its
  global view (padded crop) among the batch and a memory of past rounds' features;
- the lowest-loss step's images go to the bank, its features to the memory.
KD calls then distill from the bank (bank_kd.py), like NAYER's.

`make_method` builds a method on this base from the generator's inputs and whether
KD adds CNCL: CMI itself learns z ~ N(0, I) with random labels; CAE-DFKD over CMI
(cae_dfkd.py) feeds CEND's embeddings in place of z and adds CNCL, the paper's own
CMI-based ablation.

Where this follows CMI's code: the loss and its weights, the head (created once, its
own Adam at lr_g with default betas, never reset), the memory of the best step's
(local || global) features, the BN loss without NAYER's EMA, teacher and student in
eval mode, the global view for CE, BN and adv. Where not: the memory and negatives
are fixed-shape and masked (cmi_contrast.py); the local view's crop follows
torchvision, not kornia; the student's LR is a per-step cosine (CMI steps it per epoch).
"""

import functools
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods import bank_kd, nayer
from caedfkd_jax.methods.base import (Method, Phase, Setup, TrainState, check_positive, fold,
                                      hparam, student_optimizer, student_schedule,
                                      teacher_judgement)
from caedfkd_jax.runtime.mesh import constrain_batch
from caedfkd_jax.synthesis import (augment, cend, class_cycle, cmi_contrast,
                                   generator as generator_lib, losses, memory_bank)

PyTree = Any
GeneratorInputs = Callable[[Setup, dict, jax.Array], cend.GeneratorBatch]
# What the CMI base reads besides its own section: KD from the bank, the generator's shape and
# Adam, the loss weights, and the KD batch's size (student.batch_groups * K * (N + 1), so that
# CMI and CAE-DFKD over CMI distill on equal batches).
READS = (*bank_kd.READS, "student.batch_groups", "cend.num_sources", "generator.lr",
         "generator.b1", "generator.b2", "generator.ngf", "generator.steps", "loss.ce", "loss.bn",
         "loss.adv", "loss.bn_reduce", "cmi.learn_inputs", "cmi.cr", "cmi.cr_temperature",
         "cmi.memory_size", "cmi.negatives", "cmi.head_dim", "cmi.local_scale")
SWEEPABLE = ("loss.ce", "loss.bn", "loss.adv", "student.temperature")


def own_config() -> ml_collections.ConfigDict:
  """The `cmi` section (METHOD.md b.3); configs/cmi_cifar.py sets CMI's values for the shared
  generator and loss fields it also reads."""
  config = ml_collections.ConfigDict()
  config.cmi = ml_collections.ConfigDict()
  config.cmi.nz = 256                    # Width of CMI's z.
  config.cmi.synthesis_batch = 256       # Images per round on the CMI base (CAE-DFKD over CMI:
                                         # num_groups * K * (N + 1), as on NAYER's base).
  config.cmi.learn_inputs = True         # Adam optimises the inputs with G (CMI's z; over CMI,
                                         # CEND's embeddings in its place [INFERRED]).
  config.cmi.cr = 0.8                    # Weight of the contrastive term L_cr.
  config.cmi.cr_temperature = 0.2        # cmi_cifar10.sh (0.1 in its adversarial script).
  config.cmi.memory_size = 40960         # Past (local || global) features kept.
  config.cmi.negatives = 4096            # Cached rows drawn as negatives each step.
  config.cmi.head_dim = 256
  config.cmi.local_scale = (0.25, 1.0)   # The local view's random-resized-crop area range.
  return config


@struct.dataclass
class ContrastState:
  """What CMI keeps between rounds: the head and its Adam, the feature memory, the bank."""
  head_params: PyTree
  head_opt_state: PyTree
  memory: cmi_contrast.FeatureMemory
  bank: memory_bank.MemoryBank


def random_z_inputs(setup: Setup, hparams: dict, rng: jax.Array,
                    classes_GxC: jax.Array | None = None) -> cend.GeneratorBatch:
  """CMI's inputs: z ~ N(0, I) of width `cmi.nz` and labels uniform at random (sorted, as CMI)."""
  rng_z, rng_y = jax.random.split(rng)
  b = setup.synthesis_batch
  labels = jnp.sort(jax.random.randint(rng_y, (b,), 0, setup.num_classes)).astype(jnp.int32)
  zeros = jnp.zeros((b,), jnp.int32)   # No CNCL groups: every row its own anchor.
  return cend.GeneratorBatch(jax.random.normal(rng_z, (b, setup.config.cmi.nz)), labels,
                             zeros, zeros)


# --------------------------------------------------------------------------- #
# Generator round
# --------------------------------------------------------------------------- #


@struct.dataclass
class Trainables:
  """What a round's Adam optimises: the generator and (as CMI's z) its inputs."""
  generator: PyTree
  inputs: jax.Array


def generator_loss(trainables: Trainables, head_params: PyTree, setup: Setup,
                   teacher_vars: PyTree, student: PyTree, labels: jax.Array,
                   negatives: tuple[jax.Array, jax.Array, jax.Array], adv_on: jax.Array,
                   rng: jax.Array, mesh: Mesh | None = None,
                   hparams: dict[str, jax.Array] | None = None):
  """L_G = bn * L_BN + ce * CE + adv * L_adv + cr * L_cr. Returns (loss, aux)."""
  hp = functools.partial(hparam, setup, hparams or {})
  c = setup.config.cmi
  inputs = trainables.inputs if c.learn_inputs else jax.lax.stop_gradient(trainables.inputs)
  images = setup.generator.apply({"params": trainables.generator}, inputs)
  images = constrain_batch(images, mesh)
  rng_global, rng_local = jax.random.split(rng)
  x_global = normalize(augment.random_crop_flip(rng_global, images), setup.mean, setup.std)
  x_local = normalize(augment.random_resized_crop_flip(rng_local, images, scale=tuple(c.local_scale)),
                      setup.mean, setup.std)
  t_logits, global_f, bn_stats = cmi_contrast.teacher_instance_features(
      setup.teacher, teacher_vars, x_global)
  _, local_f, _ = cmi_contrast.teacher_instance_features(setup.teacher, teacher_vars, x_local)
  l_bn = losses.bn_statistics_loss(bn_stats, teacher_vars["batch_stats"],
                                   setup.config.loss.bn_reduce)
  l_ce = losses.cross_entropy(t_logits, labels)
  s_logits, _ = setup.student.apply(student, x_global, train=False)
  l_adv = losses.adversarial_loss(t_logits, s_logits)
  head = cmi_contrast.ContrastHead(features=c.head_dim)
  l_cr = cmi_contrast.contrastive_loss(head_params, head, local_f, global_f, *negatives,
                                       c.cr_temperature)
  loss = (hp("loss.bn") * l_bn + hp("loss.ce") * l_ce + hp("loss.adv") * adv_on * l_adv
          + c.cr * l_cr)
  metrics = {"gen/loss": loss, "gen/ce": l_ce, "gen/bn": l_bn, "gen/adv": l_adv, "gen/cr": l_cr}
  features = jax.lax.stop_gradient(jnp.concatenate([local_f, global_f], axis=-1))
  return loss, (images, features, metrics)


@struct.dataclass
class RoundCarry:
  trainables: Trainables
  opt_state: PyTree
  head_params: PyTree
  head_opt_state: PyTree
  best_loss: jax.Array
  best_images: jax.Array
  best_features: jax.Array   # B x 2D: (local || global) of the best step, for the memory.


@struct.dataclass
class RoundContext:
  batch: cend.GeneratorBatch
  adv_on: jax.Array
  rng: jax.Array


def head_optimizer(config) -> optax.GradientTransformation:
  """CMI's optimizer_head: Adam at lr_g with PyTorch's default betas, made once per run."""
  return optax.adam(config.generator.lr)


def start_round(state: TrainState, *, setup: Setup, inputs: GeneratorInputs, warmup: bool,
                mesh: Mesh | None = None) -> tuple[RoundCarry, RoundContext]:
  """A CMI round begins: a re-initialised generator, fresh inputs, a fresh Adam on both."""
  rng_init, rng_reset, rng_batch, rng_steps = jax.random.split(
      fold(state.rng, state.epoch, state.unit), 4)
  batch = constrain_batch(inputs(setup, state.hparams, rng_batch,
                                 nayer.round_classes(setup, state)), mesh)
  params = setup.generator.init(rng_init, batch.embeddings_BxD)["params"]
  trainables = Trainables(generator_lib.cmi_reset(params, rng_reset), batch.embeddings_BxD)
  c = state.method
  image_shape = (setup.synthesis_batch, *c.bank.images.shape[1:])
  carry = RoundCarry(trainables, setup.generator_tx.init(trainables), c.head_params,
                     c.head_opt_state, jnp.float32(jnp.inf), jnp.zeros(image_shape, jnp.float32),
                     jnp.zeros((setup.synthesis_batch, c.memory.features.shape[1]), jnp.float32))
  return carry, RoundContext(batch, jnp.float32(0.0 if warmup else 1.0), rng_steps)


def generator_step(carry: RoundCarry, ctx: RoundContext, step: jax.Array, state: TrainState,
                   teacher_vars: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """One Adam step of G and its inputs, one of the head; keeps the lowest-loss batch."""
  rng_neg, rng_aug = jax.random.split(jax.random.fold_in(ctx.rng, step))
  negatives = cmi_contrast.sample_negatives(state.method.memory, rng_neg,
                                            setup.config.cmi.negatives)
  grad_fn = jax.value_and_grad(generator_loss, argnums=(0, 1), has_aux=True)
  (loss, (images, features, metrics)), (grads, head_grads) = grad_fn(
      carry.trainables, carry.head_params, setup, teacher_vars, state.student,
      ctx.batch.labels_B, negatives, ctx.adv_on, rng_aug, mesh, state.hparams)
  updates, opt_state = setup.generator_tx.update(grads, carry.opt_state, carry.trainables)
  head_tx = head_optimizer(setup.config)
  head_updates, head_opt_state = head_tx.update(head_grads, carry.head_opt_state,
                                                carry.head_params)
  better = loss < carry.best_loss
  keep = lambda new, old: jnp.where(better, jax.lax.stop_gradient(new), old)
  carry = RoundCarry(
      trainables=optax.apply_updates(carry.trainables, updates), opt_state=opt_state,
      head_params=optax.apply_updates(carry.head_params, head_updates),
      head_opt_state=head_opt_state, best_loss=jnp.where(better, loss, carry.best_loss),
      best_images=keep(images, carry.best_images),
      best_features=keep(features, carry.best_features))
  return carry, metrics


def finish_round(state: TrainState, carry: RoundCarry, ctx: RoundContext, teacher_vars: PyTree,
                 *, setup: Setup):
  """Banks the best batch, adds its features to the memory, keeps the head."""
  c, batch = state.method, ctx.batch
  bank = memory_bank.add(c.bank, carry.best_images, batch.labels_B, batch.source_index_B,
                         batch.group_B)
  d = c.memory.feature_dim
  memory = cmi_contrast.add(c.memory, carry.best_features[:, :d], carry.best_features[:, d:])
  x = normalize(carry.best_images, setup.mean, setup.std)
  t_logits, _ = setup.teacher.apply(teacher_vars, x, train=False)
  low_conf_K, teacher_acc = teacher_judgement(t_logits, batch.labels_B, setup.num_classes,
                                              setup.config.low_confidence)
  state = state.replace(method=ContrastState(carry.head_params, carry.head_opt_state, memory, bank))
  return (state, {"gen/teacher_acc_on_best": teacher_acc},
          {"low_conf": low_conf_K, "images": carry.best_images})


# --------------------------------------------------------------------------- #
# The method
# --------------------------------------------------------------------------- #


def create_setup(base: Setup, *, grouped: bool) -> nayer.NayerSetup:
  """CMI's generator (no noisy layer; inputs straight to the projection) and its batch sizes."""
  config = base.config
  k = nayer.classes_per_group(config, base.num_classes) if grouped else base.num_classes
  schedule = student_schedule(config.student, bank_kd.total_kd_steps(config))
  views = k * (config.cend.num_sources + 1)
  g = config.generator
  return nayer.NayerSetup.extend(
      base, student_tx=student_optimizer(schedule, config.student), student_lr=schedule,
      generator=generator_lib.Generator(num_classes=k, img_size=base.image_size, ngf=g.ngf,
                                        dtype=base.dtype, noisy_input=False), group_classes=k,
      generator_tx=optax.adam(g.lr, b1=g.b1, b2=g.b2), **nayer.table_fields(base),
      group_size=views if grouped else 1,
      synthesis_batch=config.num_groups * views if grouped else config.cmi.synthesis_batch,
      # KD batches of batch_groups * K * (N + 1) images with or without groups, so the arms of
      # the CMI ablation distill on equal batches.
      kd_batch=config.student.batch_groups * views)


def init_state(setup: nayer.NayerSetup, teacher_vars: PyTree, rng: jax.Array) -> ContrastState:
  c, size = setup.config.cmi, setup.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  d = jax.eval_shape(lambda: cmi_contrast.teacher_instance_features(
      setup.teacher, teacher_vars, x)[1]).shape[-1]
  _, head_params = cmi_contrast.init_head(rng, d, c.head_dim)
  capacity = bank_kd.bank_capacity(setup.config, setup.synthesis_batch, setup.group_size)
  return ContrastState(head_params, head_optimizer(setup.config).init(head_params),
                       cmi_contrast.create(c.memory_size, d),
                       memory_bank.create_bank(capacity, (size, size, 3)))


def check_base(config, num_devices: int, num_classes: int, swept: Collection[str], *,
               grouped: bool) -> None:
  """The base's own checks: its section, its loss, its batches and the bank schedule."""
  c = config.cmi
  check_positive(config, "cmi", ("memory_size", "head_dim", "cr_temperature"))
  check_positive(config, "cmi", ("negatives", "cr"), strict=False)
  if not grouped:
    check_positive(config, "cmi", ("nz", "synthesis_batch"))
  low, high = tuple(c.local_scale)
  if not 0 < low <= high <= 1:
    raise ValueError(f"config.cmi.local_scale={tuple(c.local_scale)!r}: the local view's crop "
                     "area range (min, max) within (0, 1], e.g. (0.25, 1.0) as CMI.")
  if grouped:
    class_cycle.check_classes_per_group(config.classes_per_group, num_classes)
    bank_kd.check_grouped(config, num_devices, nayer.classes_per_group(config, num_classes),
                          swept, with_cncl=True)
    return
  if config.student.sampler != "uniform":
    raise ValueError("config.method=cmi banks images without CNCL groups: use "
                     "--config.student.sampler=uniform (CMI's pool sampling), or "
                     "--config.method=cae_dfkd_cmi for grouped CEND batches.")
  if c.synthesis_batch % num_devices:
    raise ValueError(f"config.cmi.synthesis_batch={c.synthesis_batch} is not divisible by the "
                     f"{num_devices} devices.")
  bank_kd.check_schedule(config, c.synthesis_batch, "cmi.synthesis_batch")
  kd = config.student.batch_groups * num_classes * (config.cend.num_sources + 1)
  bank_kd.check_divisible(num_devices, [("KD batch (student.batch_groups*K*(N+1))", kd)],
                          "student.batch_groups")


def make_method(name: str, summary: str, inputs: GeneratorInputs, with_cncl: bool,
                grouped: bool, *, reads: tuple[str, ...], sweepable: tuple[str, ...],
                check: Callable | None = None, **fields) -> Method:
  """A method on the CMI base, given its generator inputs and whether KD adds CNCL.

  `check(config, num_devices, num_classes, swept)` adds the inputs' own checks to the base's.
  """

  def phases(setup: nayer.NayerSetup, mesh: Mesh | None) -> dict[str, Phase]:
    return bank_kd.rounds_then_kd(setup, mesh, start_round=start_round,
                                  generator_step=generator_step, finish_round=finish_round,
                                  inputs=inputs, with_cncl=with_cncl,
                                  shows=bank_kd.ROUND_SHOWS[:4] + ("gen/cr",)
                                  + bank_kd.ROUND_SHOWS[4:])

  def check_config(config, num_devices: int, num_classes: int, swept: Collection[str]) -> None:
    if check is not None:
      check(config, num_devices, num_classes, swept)
    check_base(config, num_devices, num_classes, swept, grouped=grouped)

  return Method(
      name=name, summary=summary, reads=reads, sweepable=sweepable,
      create_setup=functools.partial(create_setup, grouped=grouped),
      init_state=init_state, phases=phases, epoch_plan=bank_kd.epoch_plan,
      latest_images=bank_kd.latest_images,
      epoch_scalars=lambda c: {"bank/size": c.bank.size, "memory/size": c.memory.size},
      finite_parts=lambda c: {"contrastive head": c.head_params,
                              "contrastive head optimiser state": c.head_opt_state},
      check_config=check_config, own_config=own_config, embeddings=grouped, **fields)


METHOD = make_method(
    "cmi", "CMI (IJCAI 2021): a generator re-initialised every round from learnt z, a "
    "contrastive head over the teacher's features of two views, a bank; KD by KL.",
    inputs=random_z_inputs, with_cncl=False, grouped=False,
    reads=READS + ("cmi.nz", "cmi.synthesis_batch"), sweepable=SWEEPABLE,
    quick={"student.sampler": "uniform", "cmi.synthesis_batch": 100, "cmi.memory_size": 2048,
           "cmi.negatives": 256})
