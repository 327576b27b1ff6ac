"""The two CAE-DFKD updates as pure functions: a generator round and KD steps.

`generator_step` (Eq. 5) and `student_step` (Eq. 6) are pure. On accelerators a
round scans `generator_step` over g_steps and a KD call scans `student_step`, so
each phase is one compiled call; on CPUs each step is its own compiled call
(`resolve_fuse`). `make_step_fns` jits them over a ("data",) mesh:
the state is replicated and every batch is sharded along "data", so BatchNorm
statistics and losses cover the global batch whatever the device count.
"""

import dataclasses
import functools
from typing import Any, Callable, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from caedfkd_jax import augment, cend, generator as generator_lib, losses, memory_bank, xla_cpu
from caedfkd_jax.bundle import normalize

PyTree = Any


@struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  epoch: jax.Array          # int32: current epoch.
  unit: jax.Array           # int32: next unit (generator round or KD call) inside the epoch.
  kd_step: jax.Array        # int32: KD steps taken so far (drives the LR schedule).
  generator_params: PyTree
  student: PyTree           # {"params", "batch_stats"}
  student_opt_state: PyTree
  bn_ema: PyTree            # EMA of the teacher's BN input stats (NAYER's momentum).
  bn_ema_valid: jax.Array   # bool: bn_ema holds a value yet.
  bank: memory_bank.MemoryBank
  rng: jax.Array            # Base key; every use folds in (epoch, unit, step).
  hparams: dict[str, jax.Array] = struct.field(default_factory=dict)  # Swept values (SWEEPABLE).


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static side of a run: networks, tables, optimisers, hyper-parameters."""
  teacher: nn.Module
  student: nn.Module
  generator: nn.Module
  table_KxD: jax.Array
  mean: tuple[float, ...]
  std: tuple[float, ...]
  student_tx: optax.GradientTransformation
  generator_tx: optax.GradientTransformation
  config: Any               # ml_collections.ConfigDict (frozen view).
  noise_scale_D: jax.Array | None = None  # cend.noise_scale(table, config.cend.magnitude_scale),
                            # made once by train.create_setup; None: magnitudes in table units.

  @property
  def num_classes(self) -> int:
    return int(self.table_KxD.shape[0])

  @property
  def group_size(self) -> int:
    return self.num_classes * (self.config.cend.num_sources + 1)

  @property
  def synthesis_batch(self) -> int:
    return self.config.num_groups * self.group_size


# Float hyper-parameters that one program can sweep (`runs.py`): the step functions read them
# through `hparam`, traced from the state's `hparams` when a run carries them, else as constants
# from the config. Learning rates and shapes live in the optimisers and arrays and cannot be swept.
SWEEPABLE = ("loss.ce", "loss.bn", "loss.adv", "loss.bn_momentum", "cend.magnitude",
             "student.temperature", "student.cncl_weight", "student.cncl_temperature")


def hparam(setup: Setup, hparams: dict[str, jax.Array], name: str):
  """The value of config field `name` ("section.field") for this run."""
  if name in hparams:
    return hparams[name]
  section, field = name.split(".")
  return setup.config[section][field]


def _constrain_batch(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """Shards the leading (batch) axis over "data": the data-parallel split."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


# --------------------------------------------------------------------------- #
# Generator (Eq. 5)
# --------------------------------------------------------------------------- #


def generator_loss(params: PyTree, setup: Setup, teacher_vars: PyTree, student: PyTree,
                   batch: cend.GeneratorBatch, bn_ema: PyTree, bn_ema_valid: jax.Array,
                   adv_on: jax.Array, rng: jax.Array, mesh: Mesh | None = None,
                   hparams: dict[str, jax.Array] | None = None):
  """L_G = ce * CE(T(A(G(e))), y) + bn * L_BN + adv * L_adv. Returns (loss, aux)."""
  hp = functools.partial(hparam, setup, hparams or {})
  images = setup.generator.apply({"params": params}, batch.embeddings_BxD)
  images = _constrain_batch(images, mesh)
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
  """What a round fixes at its start: the CEND batch and the adversarial switch."""
  batch: cend.GeneratorBatch
  adv_on: jax.Array
  rng: jax.Array


def start_round(state: TrainState, *, setup: Setup, warmup: bool,
                mesh: Mesh | None = None) -> tuple[RoundCarry, RoundContext]:
  """A NAYER round begins: new noisy layer, one CEND batch, a fresh Adam."""
  cfg = setup.config
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.epoch), state.unit)
  rng_noisy, rng_batch, rng_steps = jax.random.split(rng, 3)
  params = state.generator_params
  if cfg.generator.reinit_noisy_layer:
    params = generator_lib.reinit_noisy_layer(params, rng_noisy)
  magnitude = (tuple(cfg.cend.magnitudes) if cfg.cend.magnitudes is not None   # Per source.
               else hparam(setup, state.hparams, "cend.magnitude"))
  batch = cend.build_generator_batch(
      rng_batch, setup.table_KxD, cfg.num_groups, cfg.cend.num_sources, magnitude,
      mode=cfg.cend.mode, sources=cfg.cend.sources, scale_D=setup.noise_scale_D)
  batch = _constrain_batch(batch, mesh)
  image_shape = (setup.synthesis_batch, *state.bank.images.shape[1:])
  carry = RoundCarry(params, setup.generator_tx.init(params), jnp.float32(jnp.inf),
                     jnp.zeros(image_shape, jnp.float32), jax.tree.map(jnp.zeros_like, state.bn_ema))
  return carry, RoundContext(batch, jnp.float32(0.0 if warmup else 1.0), rng_steps)


def generator_step(carry: RoundCarry, ctx: RoundContext, step: jax.Array, state: TrainState,
                   teacher_vars: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """One Adam step of G (Eq. 5); keeps the batch with the lowest loss seen this round."""
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (loss, (images, bn_stats, metrics)), grads = grad_fn(
      carry.params, setup, teacher_vars, state.student, ctx.batch, state.bn_ema,
      state.bn_ema_valid, ctx.adv_on, jax.random.fold_in(ctx.rng, step), mesh, state.hparams)
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

  Returns (state, per-class low-confidence share, teacher accuracy on the best batch).
  """
  m = hparam(setup, state.hparams, "loss.bn_momentum")
  bn_ema = jax.tree.map(
      lambda ema, last: jnp.where(state.bn_ema_valid, m * ema + (1 - m) * last, last),
      state.bn_ema, carry.last_bn_stats)
  batch = ctx.batch
  bank = memory_bank.add(state.bank, carry.best_images, batch.labels_B, batch.source_index_B,
                         batch.group_B)
  # Figure 2a: share of each class's images the teacher is unsure about.
  x = normalize(carry.best_images, setup.mean, setup.std)
  t_logits, _ = setup.teacher.apply(teacher_vars, x, train=False)
  confident = jnp.max(jax.nn.softmax(t_logits), axis=-1) >= setup.config.low_confidence
  onehot = jax.nn.one_hot(batch.labels_B, setup.num_classes)
  low_conf_K = jnp.sum(onehot * (~confident)[:, None], 0) / jnp.maximum(jnp.sum(onehot, 0), 1)
  teacher_acc = jnp.mean(jnp.argmax(t_logits, -1) == batch.labels_B)
  state = state.replace(generator_params=carry.params, bn_ema=bn_ema,
                        bn_ema_valid=jnp.bool_(True), bank=bank, unit=state.unit + 1)
  return state, low_conf_K, teacher_acc


def generator_round(state: TrainState, teacher_vars: PyTree, *, setup: Setup, warmup: bool,
                    mesh: Mesh | None = None):
  """A whole round fused in one lax.scan (for accelerators; see `make_step_fns`).

  Returns (state, per-step metrics, low-confidence share per class, best images).
  """
  carry, ctx = start_round(state, setup=setup, warmup=warmup, mesh=mesh)
  def body(carry, step):
    return generator_step(carry, ctx, step, state, teacher_vars, setup=setup, mesh=mesh)
  carry, metrics = jax.lax.scan(body, carry, jnp.arange(setup.config.generator.steps))
  best_images = carry.best_images
  state, low_conf_K, teacher_acc = finish_round(state, carry, ctx, teacher_vars, setup=setup)
  metrics["gen/teacher_acc_on_best"] = jnp.broadcast_to(teacher_acc, metrics["gen/loss"].shape)
  return state, metrics, low_conf_K, best_images


# --------------------------------------------------------------------------- #
# Student (Eq. 6)
# --------------------------------------------------------------------------- #


def student_loss(params: PyTree, batch_stats: PyTree, setup: Setup, x: jax.Array,
                 t_logits: jax.Array, labels: jax.Array, source_index: jax.Array,
                 group: jax.Array, hparams: dict[str, jax.Array] | None = None,
                 cncl_from: int | None = 0):
  """L_S = t^2 KL(T || S) + lambda * L_CNCL on the student's penultimate features.

  One forward pass over all of `x`, so BatchNorm's batch statistics cover every row.
  KL is taken on the first `len(t_logits)` rows (the rows the teacher saw), CNCL on
  rows `cncl_from:` (None: no CNCL term and no "kd/cncl" metric). The "groups"
  sampler puts both on every row; see `sample_kd_batch` for "uniform".
  """
  cfg = setup.config.student
  hp = functools.partial(hparam, setup, hparams or {})
  (s_logits, aux), new_vars = setup.student.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  s_logits = s_logits[:t_logits.shape[0]]
  l_kl = losses.kl_divergence(t_logits, s_logits, hp("student.temperature"))
  loss, cncl = l_kl, {}
  if cncl_from is not None:
    rows = slice(cncl_from, None)
    l_cncl = losses.cncl_loss(aux["features"][rows], labels[rows], source_index[rows],
                              hp("student.cncl_temperature"), group_B=group[rows],
                              same_group_positives=cfg.cncl_same_group, form=cfg.cncl_form)
    loss, cncl = l_kl + hp("student.cncl_weight") * l_cncl, {"kd/cncl": l_cncl}
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
                    swept: Collection[str] = (), mesh: Mesh | None = None):
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
  the group rows), and the teacher need not run on them. Without CNCL rows the
  first CNCL row is None.
  """
  cfg = setup.config.student
  if cfg.sampler == "groups":
    batch = memory_bank.sample_groups(bank, rng, cfg.batch_groups, setup.group_size)
    return _constrain_batch(batch, mesh), 0
  rng_uniform, rng_groups = jax.random.split(rng)
  num_kl = cfg.batch_groups * setup.group_size
  batch = _constrain_batch(memory_bank.sample(bank, rng_uniform, num_kl), mesh)
  num_groups = cncl_subbatch_groups(setup.config, swept)
  if not num_groups:
    return batch, None
  groups = memory_bank.sample_groups(bank, rng_groups, num_groups, setup.group_size)
  groups = _constrain_batch(groups, mesh)
  batch = tuple(jnp.concatenate(parts) for parts in zip(batch, groups))
  return _constrain_batch(batch, mesh), num_kl


def student_step(state: TrainState, rng: jax.Array, *, setup: Setup, teacher_vars: PyTree,
                 mesh: Mesh | None = None):
  """One SGD step on a KD batch drawn from the memory bank (`sample_kd_batch`)."""
  rng_sample, rng_aug = jax.random.split(rng)
  (images, labels, source_index, group), cncl_from = sample_kd_batch(
      state.bank, rng_sample, setup=setup, swept=state.hparams.keys(), mesh=mesh)
  x = normalize(augment.random_crop_flip(rng_aug, images), setup.mean, setup.std)
  num_kl = cncl_from or x.shape[0]   # KL rows come first; "groups" has CNCL on every row (0).
  t_logits, _ = setup.teacher.apply(teacher_vars, x[:num_kl], train=False)
  grad_fn = jax.value_and_grad(student_loss, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(
      state.student["params"], state.student["batch_stats"], setup, x,
      jax.lax.stop_gradient(t_logits), labels, source_index, group, state.hparams, cncl_from)
  updates, opt_state = setup.student_tx.update(grads, state.student_opt_state, state.student["params"])
  params = optax.apply_updates(state.student["params"], updates)
  state = state.replace(student={"params": params, "batch_stats": batch_stats},
                        student_opt_state=opt_state, kd_step=state.kd_step + 1)
  return state, metrics


def kd_rng(state: TrainState) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.epoch), state.unit)


def student_steps(state: TrainState, teacher_vars: PyTree, *, setup: Setup, num_steps: int,
                  mesh: Mesh | None = None):
  """`num_steps` KD steps fused in one lax.scan. Returns (state, per-step metrics)."""
  rng = kd_rng(state)
  def body(state, step):
    return student_step(state, jax.random.fold_in(rng, step), setup=setup,
                        teacher_vars=teacher_vars, mesh=mesh)
  state, metrics = jax.lax.scan(body, state, jnp.arange(num_steps))
  return state.replace(unit=state.unit + 1), metrics


# --------------------------------------------------------------------------- #
# Compilation over a mesh
# --------------------------------------------------------------------------- #


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def resolve_fuse(config, fuse: bool | None = None, platform: str | None = None) -> bool:
  """Whether a round / KD call is one lax.scan: `fuse`, else `config.fuse_steps`, else by platform.

  Unset (None) means fused on accelerators and per-step calls on CPUs, where
  XLA runs convolutions inside a while loop about 100x slower (measured).
  `platform` defaults to JAX's default backend.
  """
  if fuse is None:
    fuse = config.fuse_steps
  if fuse is None:
    fuse = (platform or jax.default_backend()) != "cpu"
  return bool(fuse)


def make_step_fns(setup: Setup, mesh: Mesh, fuse: bool | None = None,
                  over_runs: Callable | None = None, vmapped_runs: bool = False
                  ) -> dict[str, Callable]:
  """Jitted phases over `mesh`: state and teacher replicated, batches sharded, state donated.

  Fused (see `resolve_fuse`), a generator round and a KD call are each one
  compiled lax.scan: the fewest dispatches, the accelerator choice. Otherwise
  every step is its own compiled call driven from Python, the CPU choice.
  Either way each phase compiles once: shapes, dtypes and shardings of the
  state never change between calls. `over_runs(fn, in_axes)`, when given, maps
  each piece over a leading run axis of the state (`runs.over_runs`);
  `vmapped_runs` says that it does so with `jax.vmap`.
  """
  replicated = NamedSharding(mesh, P())
  cfg = setup.config
  platform = mesh.devices.flat[0].platform
  fused = resolve_fuse(cfg, fuse, platform=platform)
  # XLA:CPU's kernels (xla_cpu.py; accelerators ignore the choice). YNNPACK's elementwise
  # fusions only in the unfused, unvmapped student step: they slowed the generator round.
  kernels = functools.partial(xla_cpu.jit, choice=cfg.get("cpu_kernels", "tuned"),
                              platform=platform)
  plain_jit = functools.partial(kernels, elementwise=False)
  jit = functools.partial(plain_jit, donate_argnums=(0,))
  student_jit = functools.partial(kernels, elementwise=not (fused or vmapped_runs),
                                  donate_argnums=(0,))
  per_run = over_runs or (lambda fn, in_axes: fn)
  if fused:
    rounds = {
        warm: jit(
            per_run(functools.partial(generator_round, setup=setup, warmup=warm, mesh=mesh),
                    (0, None)),
            in_shardings=(replicated, replicated))
        for warm in (True, False)}
    kd = student_jit(
        per_run(functools.partial(student_steps, setup=setup,
                                  num_steps=cfg.student.steps_per_call, mesh=mesh), (0, None)),
        in_shardings=(replicated, replicated))
    return {"warmup_round": rounds[True], "round": rounds[False], "kd": kd}

  start = {warm: plain_jit(per_run(
               functools.partial(start_round, setup=setup, warmup=warm, mesh=mesh), (0,)))
           for warm in (True, False)}
  g_step = jit(per_run(
      functools.partial(generator_step, setup=setup, mesh=mesh), (0, 0, None, 0, None)))
  finish = jit(per_run(
      functools.partial(finish_round, setup=setup), (0, 0, 0, None)))

  def kd_step(state, i, teacher_vars):
    return student_step(state, jax.random.fold_in(kd_rng(state), i), setup=setup,
                        teacher_vars=teacher_vars, mesh=mesh)
  s_step = student_jit(per_run(kd_step, (0, None, None)))
  # Per-step metrics stack on the last axis: (steps,), or (runs, steps) as the fused scans give.
  stack_steps = lambda metrics: jax.tree.map(lambda *xs: jnp.stack(xs, axis=-1), *metrics)

  def stepped_round(warm):
    def run(state, teacher_vars):
      carry, ctx = start[warm](state)
      metrics = []
      for i in range(cfg.generator.steps):
        carry, m = g_step(carry, ctx, jnp.int32(i), state, teacher_vars)
        metrics.append(m)
      best_images = jnp.copy(carry.best_images)
      state, low_conf_K, teacher_acc = finish(state, carry, ctx, teacher_vars)
      metrics = stack_steps(metrics)
      metrics["gen/teacher_acc_on_best"] = jnp.broadcast_to(teacher_acc[..., None],
                                                            metrics["gen/loss"].shape)
      return state, metrics, low_conf_K, best_images
    return run

  def stepped_kd(state, teacher_vars):
    metrics = []
    for i in range(cfg.student.steps_per_call):
      state, m = s_step(state, jnp.int32(i), teacher_vars)
      metrics.append(m)
    return state.replace(unit=state.unit + 1), stack_steps(metrics)

  return {"warmup_round": stepped_round(True), "round": stepped_round(False), "kd": stepped_kd}
