"""DiffDFKD (ICME 2025): teacher-guided latent diffusion fills the bank (METHOD.md b.6).

A synthesis round denoises one batch of Stable Diffusion latents for
`diffdfkd.steps` steps, prompted by "a realistic photo of {class}" under
classifier-free guidance. At each step (read against github.com/xhqi0109/DiffDFKD,
generate_images.py, a re-creation by the authors of their lost code):
  1. eps from the UNet, guided; x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);
  2. the VAE decodes x0_hat; the image is resized to the teacher's input;
  3. L = ce * CE(T(x), class) + bn * L_BN + adv * L_adv (-KL against the student,
     masked on agreement; off in the warm-up, as the code waits for
     `class_per_num_start` images per class);
  4. one gradient step on the latents, z <- z - latent_lr * dL/dz, through the UNet,
     x0_hat and the VAE as the paper says (`diffdfkd.grad_through_unet`; False holds
     the UNet's eps fixed, the nearest working reading of the code's no-grad cut,
     which as written leaves the loss without a path to z);
  5. every k steps (k = steps // 5) the latents of the batch are mixed
     (`diffdfkd.latent_mix`: cutmix, the paper; mixup; none, the code's default);
  6. eps again at the updated z (the code's second UNet call), then the DDPM step.
The final latents are decoded and banked; KD calls then distill from the bank
(bank_kd.py), as every bank-based method here, with t^2 KL.

Where this differs from the code, deliberately: every timestep of the schedule runs
steps 1-6 and the image banked is the decoded final latent (the code skips the
guided update at the last timestep and decodes x0_hat of a stale eps); a round makes
`diffdfkd.batch` images of one class (the code: batch 1), so that mixing has rows to
mix; the teacher's input is resized with JAX's antialiased bicubic (the code:
torchvision's); synthesis and KD alternate inside one run (the code generates its
images, then distills on all of them every 10 images per class).

Two behaviours of the code are switches, off by default (the paper's reading):
  * `diffdfkd.detach_teacher_in_adv`: the code's L_adv is -KL(T.detach() || S), masked
    (generate_images.py line 229, `kldiv(s_out, output.detach(), ...)`), so L_adv reaches z
    through the student's logits only. Off, its gradient also flows through the teacher's
    logits, as the paper's L_adv reads; on, they are constants in L_adv alone (CE and L_BN
    keep the teacher's gradient either way).
  * `diffdfkd.bank_intermediate_x0`: besides each final image, the code saves the decoded
    x0_hat of every (steps // 5)-th step but the last (generate_images.py lines 237-253,
    files named `..._s:{t}_...`): 4 per latent at 10, 50 or 70 steps, (steps - 1) // (steps
    // 5) in general. Its loader reads every file of a class folder (helper/dataset.py,
    ImageFolderDataset) and drops them only under distill's `--min_loss` (any name with an
    "s"), which script/distill/distill.sh does not set. On, a round banks them too: the
    image each such step's loss saw (before its update and the mix), decoded and resized as
    the finals, with the round's labels, after the round's finals; a round then banks
    batch x (snapshots + 1) images, and the bank's default capacity and the epoch grid
    (`latest_images`) count them.

The authors' scripts disagree with each other. script/generate_data/generate_data_domainNet.sh
generates CIFAR-10 with 10 steps, guidance 3, oh 1, bn 0, adv 0 (and DomainNet with 70 steps,
guidance 7, bn 0.1, adv 1); script/distill/distill.sh distills CIFAR-10 from a folder whose name
(options/generate_images_options.py's naming) records 50 steps (the option default), guidance
3, bn 0.1, oh 1, adv 0, from a wrn40_2 teacher. configs/diffdfkd_cifar.py takes the generation
script's 10 steps and guidance 3, the option defaults' loss weights (oh 1, bn 0.1, adv 1:
generate_images_options.py), and distill.sh's KD settings.

The Stable Diffusion weights come from a bundle made by `caedfkd convert-diffusion`
(diffusion/weights.py) and reach the units beside the teacher's (`frozen_vars`); the
state holds only the bank and the round count.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.sharding import Mesh

from caedfkd_jax.diffusion import latent_mix, scheduler
from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods import bank_kd
from caedfkd_jax.methods.base import (Method, Phase, Setup, TrainState, check_positive, fold,
                                      hparam, student_optimizer, student_schedule,
                                      teacher_judgement)
from caedfkd_jax.runtime.mesh import constrain_batch
from caedfkd_jax.runtime.platform import compute_dtype
from caedfkd_jax.synthesis import class_cycle, losses, memory_bank

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
  """The synthesizer (`Setup.generator`): the networks, the sampler and the prompts."""
  unet: Any                     # diffusion.unet.UNet
  vae: Any                      # diffusion.vae.VAEDecoder
  schedule: scheduler.DDPMSchedule
  scaling_factor: float         # The VAE's latent scale (0.18215 in SD v1.x).
  latent_channels: int
  latent_size: int
  image_size: int               # The teacher's input size, what the decoded images become.
  prompts: tuple[str, ...]      # One per class, from `diffdfkd.prompt`.


@struct.dataclass
class DiffusionState:
  bank: memory_bank.MemoryBank
  rounds: jax.Array   # int32: synthesis rounds done; picks the next round's class.


def class_prompts(template: str, class_names) -> tuple[str, ...]:
  if "{class}" not in template:
    raise ValueError(f"config.diffdfkd.prompt={template!r} has no {{class}} to fill, e.g. "
                     "'a realistic photo of {class}'.")
  return tuple(template.replace("{class}", name.replace("_", " ")) for name in class_names)


# --------------------------------------------------------------------------- #
# One guided denoising step
# --------------------------------------------------------------------------- #


def guided_noise(synth: LatentDiffusion, unet_params: PyTree, latents: jax.Array,
                 timestep: jax.Array, text_BxLxD: jax.Array, uncond_LxD: jax.Array,
                 scale: float) -> jax.Array:
  """Classifier-free guided eps: one UNet call on [unconditional; conditional] rows."""
  b = latents.shape[0]
  uncond = jnp.broadcast_to(uncond_LxD, (b, *uncond_LxD.shape))
  eps = synth.unet.apply({"params": unet_params}, jnp.concatenate([latents, latents]),
                         timestep, jnp.concatenate([uncond, text_BxLxD]))
  return scheduler.guided_eps(eps[:b], eps[b:], scale)


def decode_for_teacher(synth: LatentDiffusion, vae_params: PyTree, latents: jax.Array,
                       image_size: int) -> jax.Array:
  """Latents -> images in [0, 1] at the teacher's size (antialiased bicubic, clipped again:
  bicubic overshoots, and the bank holds [0, 1])."""
  shift = synth.vae.config.shift_factor or 0.0
  images = synth.vae.apply({"params": vae_params}, latents / synth.scaling_factor + shift)
  images01 = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  b, _, _, c = images01.shape
  resized = jax.image.resize(images01, (b, image_size, image_size, c), "bicubic", antialias=True)
  return jnp.clip(resized, 0.0, 1.0)


def x0_loss(x0: jax.Array, setup: Setup, frozen: PyTree, student: PyTree, labels: jax.Array,
            adv_on: jax.Array, hparams: dict, mesh: Mesh | None = None, keep_image: bool = False):
  """L_inv of a clean latent: ce * CE + bn * L_BN + adv * L_adv on its decoded image.

  Returns (loss, metrics), or (loss, (metrics, decoded image)) with `keep_image` (the
  x0_hat snapshots of `diffdfkd.bank_intermediate_x0`). With `diffdfkd.detach_teacher_in_adv`
  the teacher's logits are a constant inside L_adv only (the code's `output.detach()`).
  """
  hp = functools.partial(hparam, setup, hparams)
  images01 = decode_for_teacher(setup.generator, frozen["vae"], x0, setup.generator.image_size)
  x = normalize(constrain_batch(images01, mesh), setup.mean, setup.std)
  teacher_vars = frozen["teacher"]
  (t_logits, _), t_state = setup.teacher.apply(teacher_vars, x, train=False, mutable=["bn_stats"])
  l_bn = losses.bn_statistics_loss(t_state["bn_stats"], teacher_vars["batch_stats"],
                                   setup.config.loss.bn_reduce)
  l_ce = losses.cross_entropy(t_logits, labels)
  s_logits, _ = setup.student.apply(student, x, train=False)
  t_adv = (jax.lax.stop_gradient(t_logits) if setup.config.diffdfkd.detach_teacher_in_adv
           else t_logits)
  l_adv = losses.adversarial_loss(t_adv, s_logits)
  loss = hp("loss.ce") * l_ce + hp("loss.bn") * l_bn + hp("loss.adv") * adv_on * l_adv
  metrics = {"gen/loss": loss, "gen/ce": l_ce, "gen/bn": l_bn, "gen/adv": l_adv}
  return loss, ((metrics, images01) if keep_image else metrics)


def teacher_guidance_loss(latents: jax.Array, setup: Setup, frozen: PyTree, student: PyTree,
                          step: jax.Array, text_BxLxD: jax.Array, labels: jax.Array,
                          adv_on: jax.Array, hparams: dict, mesh: Mesh | None = None,
                          keep_image: bool = False):
  """`x0_loss` of the step's x0_hat, as a function of the latents x_t. Returns (loss, metrics),
  or (loss, (metrics, x0_hat's image)) with `keep_image`.

  With `diffdfkd.grad_through_unet` off, eps is a constant: dL/dx_t = dL/dx0 / sqrt(a_t).
  """
  synth, c = setup.generator, setup.config.diffdfkd
  timestep, alpha_bar, _, _ = synth.schedule.at(step)
  eps = guided_noise(synth, frozen["unet"], latents, timestep, text_BxLxD, frozen["uncond"],
                     c.guidance_scale)
  if not c.grad_through_unet:
    eps = jax.lax.stop_gradient(eps)
  x0 = scheduler.predict_x0(latents, eps, alpha_bar)
  return x0_loss(x0, setup, frozen, student, labels, adv_on, hparams, mesh, keep_image)


@struct.dataclass
class RoundContext:
  labels: jax.Array   # The round's class, per row.
  adv_on: jax.Array
  rng: jax.Array


@struct.dataclass
class SnapshotCarry:
  """A round's carry under `diffdfkd.bank_intermediate_x0` (otherwise the latents alone): the
  latents and the x0_hat images kept so far, S x B x H x W x 3 in step order."""
  latents: jax.Array
  snapshots: jax.Array


def snapshot_every(config) -> int:
  """The code's cadence for its intermediate images, steps // 5 (whatever `mix_every` says; at
  least 1: the code divides by zero under 5 steps)."""
  return max(config.diffdfkd.steps // 5, 1)


def snapshots_after(config, step: jax.Array) -> jax.Array:
  """Whether step `step`'s (0-based) x0_hat image is a snapshot: every `snapshot_every`-th
  step, not the last (generate_images.py saves it there, then mixes)."""
  done = step + 1
  return (done % snapshot_every(config) == 0) & (done != config.diffdfkd.steps)


def num_snapshots(config) -> int:
  """x0_hat snapshots a round banks beside its final images: 0 unless
  `diffdfkd.bank_intermediate_x0`; then (steps - 1) // (steps // 5), 4 at 10, 50 or 70 steps."""
  c = config.diffdfkd
  return (c.steps - 1) // snapshot_every(config) if c.bank_intermediate_x0 else 0


def images_per_round(config, batch: int) -> int:
  """Images a round of `batch` latents banks: the finals and any snapshots of each."""
  return batch * (1 + num_snapshots(config))


def round_labels(setup: Setup, rounds: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """One class per round (the code's generation call), or every row its own class: the
  classes in turn (`class_order` in_turn, the code) or read off the run's shuffled class
  cycle (`shuffled`, class_cycle.py; `rng` is the run's)."""
  b, k = setup.synthesis_batch, setup.num_classes
  one = setup.config.diffdfkd.one_class_per_round
  if setup.config.diffdfkd.class_order == "shuffled":
    cycle_rng = jax.random.fold_in(rng, class_cycle.CLASS_CYCLE)
    if one:
      return jnp.broadcast_to(class_cycle.cycle_classes(cycle_rng, rounds, 1, k), (b,))
    return class_cycle.cycle_classes(cycle_rng, rounds * b, b, k)
  if one:
    return jnp.full((b,), rounds % k, jnp.int32)
  return ((rounds * b + jnp.arange(b)) % k).astype(jnp.int32)


def start_round(state: TrainState, *, setup: Setup, warmup: bool, mesh: Mesh | None = None
                ) -> tuple[jax.Array, RoundContext]:
  """Fresh latents z_T ~ N(0, I) (DDPM's initial sigma is 1) for this round's class."""
  synth = setup.generator
  rng_z, rng_steps = jax.random.split(fold(state.rng, state.epoch, state.unit))
  shape = (setup.synthesis_batch, synth.latent_size, synth.latent_size, synth.latent_channels)
  latents = constrain_batch(jax.random.normal(rng_z, shape), mesh)
  labels = round_labels(setup, state.method.rounds, state.rng)
  ctx = RoundContext(labels, jnp.float32(0.0 if warmup else 1.0), rng_steps)
  num = num_snapshots(setup.config)
  if num:
    size = setup.generator.image_size
    return SnapshotCarry(latents, jnp.zeros((num, shape[0], size, size, 3), jnp.float32)), ctx
  return latents, ctx


def mixes_after(config, step: jax.Array) -> jax.Array:
  """Whether the latents are mixed after step `step` (0-based): every k-th, not after the last."""
  c = config.diffdfkd
  every = c.mix_every or max(c.steps // 5, 1)
  done = step + 1
  return (done % every == 0) & (done != c.steps)


def keep_snapshot(config, snapshots: jax.Array, image: jax.Array, step: jax.Array) -> jax.Array:
  """`image` (step `step`'s decoded x0_hat) written to its slot where `snapshots_after`."""
  slot = jnp.clip((step + 1) // snapshot_every(config) - 1, 0, snapshots.shape[0] - 1)
  kept = jnp.where(snapshots_after(config, step), image, snapshots[slot])
  return jax.lax.dynamic_update_index_in_dim(snapshots, kept, slot, 0)


def denoise_step(carry: jax.Array | SnapshotCarry, ctx: RoundContext, step: jax.Array,
                 state: TrainState, frozen: PyTree, *, setup: Setup, mesh: Mesh | None = None):
  """Steps 1-6 of the module docstring at timestep index `step` (and the x0_hat snapshot of
  `diffdfkd.bank_intermediate_x0`: the image the step's loss saw, before its update)."""
  synth, c = setup.generator, setup.config.diffdfkd
  snapshot = isinstance(carry, SnapshotCarry)
  latents = carry.latents if snapshot else carry
  rng_mix, rng_noise = jax.random.split(jax.random.fold_in(ctx.rng, step))
  text = frozen["text"][ctx.labels]
  loss_fn = (functools.partial(teacher_guidance_loss, keep_image=True) if snapshot
             else teacher_guidance_loss)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  grads, metrics = grad_fn(latents, setup, frozen, state.student, step, text, ctx.labels,
                           ctx.adv_on, state.hparams, mesh)
  if snapshot:
    metrics, image = metrics
    snapshots = keep_snapshot(setup.config, carry.snapshots, image, step)
  latents = latents - c.latent_lr * grads
  if c.latent_mix != "none":
    mixed = latent_mix.mix(c.latent_mix, rng_mix, latents, c.mix_alpha)
    latents = jnp.where(mixes_after(setup.config, step), mixed, latents)
  timestep = synth.schedule.at(step)[0]
  eps = guided_noise(synth, frozen["unet"], latents, timestep, text, frozen["uncond"],
                     c.guidance_scale)
  noise = jax.random.normal(rng_noise, latents.shape)
  latents = scheduler.ddpm_step(synth.schedule, step, latents, eps, noise)
  metrics = {**metrics, "gen/latent_grad_norm": jnp.sqrt(jnp.sum(grads ** 2))}
  latents = constrain_batch(latents, mesh)
  return (SnapshotCarry(latents, snapshots) if snapshot else latents), metrics


def finish_round(state: TrainState, carry: jax.Array | SnapshotCarry, ctx: RoundContext,
                 frozen: PyTree, *, setup: Setup):
  """Decodes the final latents and banks the images with the round's class; under
  `diffdfkd.bank_intermediate_x0` the round's x0_hat snapshots follow them, same labels."""
  snapshot = isinstance(carry, SnapshotCarry)
  images01 = decode_for_teacher(setup.generator, frozen["vae"],
                                carry.latents if snapshot else carry, setup.generator.image_size)
  banked, labels = images01, ctx.labels
  if snapshot:
    banked = jnp.concatenate([images01, carry.snapshots.reshape(-1, *images01.shape[1:])])
    labels = jnp.tile(ctx.labels, carry.snapshots.shape[0] + 1)
  zeros = jnp.zeros_like(labels)
  bank = memory_bank.add(state.method.bank, banked, labels, zeros, zeros)
  t_logits, _ = setup.teacher.apply(frozen["teacher"], normalize(images01, setup.mean, setup.std),
                                    train=False)
  low_conf_K, teacher_acc = teacher_judgement(t_logits, ctx.labels, setup.num_classes,
                                              setup.config.low_confidence)
  state = state.replace(method=DiffusionState(bank, state.method.rounds + 1))
  return (state, {"gen/teacher_acc_on_best": teacher_acc},
          {"low_conf": low_conf_K, "images": images01})


def on_teacher(phase: Phase) -> Phase:
  """A phase written for the teacher's variables, given the frozen dict instead."""
  return dataclasses.replace(
      phase,
      start=phase.start,
      step=lambda carry, ctx, i, state, frozen: phase.step(carry, ctx, i, state, frozen["teacher"]),
      finish=lambda state, carry, ctx, frozen: phase.finish(state, carry, ctx, frozen["teacher"]))


def phases(setup: "DiffusionSetup", mesh: Mesh | None) -> dict[str, Phase]:
  return {**bank_kd.round_phases(setup, mesh, start_round=start_round, step=denoise_step,
                                 finish=finish_round, num_steps=setup.config.diffdfkd.steps,
                                 label="synthesis round"),
          "kd": on_teacher(bank_kd.kd_phase(setup, mesh, with_cncl=False))}


# --------------------------------------------------------------------------- #
# Setup, state, frozen networks
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionSetup(bank_kd.BankSetup):
  generator: LatentDiffusion


def own_config() -> ml_collections.ConfigDict:
  """The `diffdfkd` section (METHOD.md b.6). Its loss weights are loss.ce / loss.bn / loss.adv
  (the code's oh / bn / adv); KD reads student.* with the batch below; the epoch plan is
  NAYER's (warm-up rounds without L_adv, then g_loops synthesis rounds and the KD calls).
  configs/diffdfkd_cifar.py sets the paper's CIFAR values."""
  config = ml_collections.ConfigDict()
  config.diffdfkd = ml_collections.ConfigDict()
  config.diffdfkd.weights = ""               # Bundle from `caedfkd convert-diffusion SD_DIR`.
  config.diffdfkd.prompt = "a realistic photo of {class}"
  config.diffdfkd.steps = 10                 # Denoising steps (CIFAR: 10; DomainNet: 70).
  config.diffdfkd.guidance_scale = 3.0       # Classifier-free guidance (CIFAR: 3; DomainNet: 7).
  config.diffdfkd.latent_size = 64           # Latent side: 64 -> 512-px images in SD v1.x.
  config.diffdfkd.batch = 10                 # Images per synthesis round (the code: 1).
  config.diffdfkd.one_class_per_round = True # A round is one class, the classes in turn (the
                                             # code); False: every row its own class in turn.
  config.diffdfkd.class_order = "in_turn"    # in_turn (the code: 0, 1, ..., K-1, again) or
                                             # shuffled (a fresh permutation each cycle).
  config.diffdfkd.latent_lr = 1.0            # z <- z - latent_lr * dL/dz (the code: 1).
  config.diffdfkd.grad_through_unet = True   # The paper; False: the UNet's eps held fixed.
  config.diffdfkd.detach_teacher_in_adv = False  # The paper: L_adv's gradient also flows
                                             # through the teacher's logits; True: they are
                                             # constants in L_adv (the code's .detach()).
  config.diffdfkd.bank_intermediate_x0 = False   # The paper: one final image per latent is
                                             # banked; True: also the x0_hat images the code
                                             # saves every steps // 5 steps (4 at 10 steps),
                                             # same labels, as its loader reads them.
  config.diffdfkd.latent_mix = "cutmix"      # cutmix (the paper), mixup, none (code default).
  config.diffdfkd.mix_every = 0              # Steps between mixes; 0: steps // 5 (the code).
  config.diffdfkd.mix_alpha = 1.0            # lam0 ~ Beta(a, a), lam ~ Beta(lam0, lam0) (code).
  config.diffdfkd.kd_batch = 256             # Bank images per KD step (the code: 256).
  config.diffdfkd.attention = "xla"          # UNet attention: xla (T x T logits per head) or
                                             # cudnn (fused flash attention; GPU, bf16; not yet
                                             # run on a GPU here).
  return config


def load_weights(config):
  from caedfkd_jax.diffusion import weights
  if not config.diffdfkd.weights:
    raise ValueError(
        "config.diffdfkd.weights is empty: DiffDFKD needs Stable Diffusion v1.x weights as a "
        "diffusion bundle. Convert a local diffusers folder with `caedfkd convert-diffusion "
        "SD_DIR --out BUNDLE` and pass --config.diffdfkd.weights=BUNDLE (docs/methods.md, "
        "'DiffDFKD and Stable Diffusion weights').")
  return weights.load_bundle(config.diffdfkd.weights)


def create_setup(base: Setup) -> DiffusionSetup:
  sd = load_weights(base.config)
  return make_setup(base, sd.config("unet"), sd.config("vae"), sd.scheduler_config)


def make_setup(base: Setup, unet_config, vae_config, scheduler_config: dict) -> DiffusionSetup:
  """The setup from the networks' configs (create_setup reads them from the bundle; the
  speed benchmark passes Stable Diffusion v1.x's own, with random weights)."""
  from caedfkd_jax.diffusion import unet as unet_lib, vae as vae_lib
  config, c = base.config, base.config.diffdfkd
  if not base.class_names:
    raise ValueError(f"The teacher bundle {config.teacher} has no class names, and DiffDFKD "
                     "prompts with them: convert the teacher again with --class-names FILE.")
  synth = LatentDiffusion(
      unet=unet_lib.UNet(unet_config, dtype=base.dtype,
                         attention=None if c.attention == "xla" else c.attention),
      vae=vae_lib.VAEDecoder(vae_config, dtype=base.dtype),
      schedule=scheduler.DDPMSchedule.create(scheduler_config, c.steps),
      scaling_factor=float(vae_config.scaling_factor),
      latent_channels=int(vae_config.latent_channels), latent_size=c.latent_size,
      image_size=base.image_size, prompts=class_prompts(c.prompt, base.class_names))
  schedule = student_schedule(config.student, bank_kd.total_kd_steps(config))
  return DiffusionSetup.extend(
      base, student_tx=student_optimizer(schedule, config.student), student_lr=schedule,
      generator=synth, synthesis_batch=c.batch, kd_batch=c.kd_batch)


def frozen_vars(setup: DiffusionSetup, teacher_vars: PyTree) -> dict[str, Any]:
  """The teacher, the UNet and VAE weights, and the prompts' text embeddings (computed once)."""
  from caedfkd_jax.models import clip_text
  sd = load_weights(setup.config)
  encoder = clip_text.CLIPTextEncoder(sd.config("text_encoder"))
  ids = clip_text.tokenize(sd.tokenizer_dir, ("",) + setup.generator.prompts)
  hidden = jax.jit(encoder.apply)({"params": sd.params("text_encoder")}, jnp.asarray(ids))
  hidden = np.asarray(hidden, np.float32)
  return {"teacher": teacher_vars, "unet": sd.params("unet"), "vae": sd.params("vae"),
          "uncond": hidden[0], "text": hidden[1:]}


def init_state(setup: DiffusionSetup, teacher_vars: PyTree, rng: jax.Array) -> DiffusionState:
  capacity = bank_kd.bank_capacity(setup.config,
                                   images_per_round(setup.config, setup.synthesis_batch))
  return DiffusionState(memory_bank.create_bank(capacity, (setup.image_size,) * 2 + (3,)),
                        jnp.int32(0))


def check_config(config, num_devices: int, num_classes: int, swept) -> None:
  c = config.diffdfkd
  check_positive(config, "diffdfkd", ("steps", "batch", "kd_batch", "latent_size", "mix_alpha"))
  if c.mix_every < 0:
    raise ValueError(f"config.diffdfkd.mix_every={c.mix_every} must be >= 0 (0: steps // 5).")
  if c.class_order not in ("in_turn", "shuffled"):
    raise ValueError(f"config.diffdfkd.class_order={c.class_order!r}: use in_turn (the code) or "
                     "shuffled (a fresh permutation of the classes each cycle).")
  if c.latent_mix not in latent_mix.MODES:
    raise ValueError(f"config.diffdfkd.latent_mix={c.latent_mix!r}: use one of "
                     f"{', '.join(latent_mix.MODES)}.")
  if c.attention not in ("xla", "cudnn"):
    raise ValueError(f"config.diffdfkd.attention={c.attention!r}: use xla (any platform) or "
                     "cudnn (GPUs, bfloat16).")
  if c.attention == "cudnn" and (jax.default_backend() != "gpu"
                                 or compute_dtype(config.compute_dtype) == jnp.float32):
    raise ValueError("config.diffdfkd.attention=cudnn (fused flash attention) needs a GPU and "
                     "16-bit compute (--config.compute_dtype=auto or bfloat16); use xla here.")
  if config.student.sampler != "uniform":
    raise ValueError("config.method=diffdfkd banks images without CNCL groups: use "
                     "--config.student.sampler=uniform.")
  for name in ("batch", "kd_batch"):
    if c[name] % num_devices:
      raise ValueError(f"config.diffdfkd.{name}={c[name]} is not divisible by the "
                       f"{num_devices} devices.")
  if num_snapshots(config):
    bank_kd.check_schedule(config, images_per_round(config, c.batch),
                           f"diffdfkd.batch x {1 + num_snapshots(config)} with "
                           "diffdfkd.bank_intermediate_x0")
  else:
    bank_kd.check_schedule(config, c.batch, "diffdfkd.batch")
  class_prompts(c.prompt, ["x"])


def latest_images(setup: DiffusionSetup, state: DiffusionState) -> tuple[jax.Array, jax.Array]:
  """The last K rounds' images (the epoch's grid): with one class a round, every class's latest
  (with `diffdfkd.bank_intermediate_x0` each round's finals come before its snapshots)."""
  n = min(setup.num_classes * images_per_round(setup.config, setup.synthesis_batch),
          state.bank.images.shape[0])
  images_u8, labels = memory_bank.latest(state.bank, n)
  return images_u8.astype(jnp.float32) / 255.0, labels


def bundle_fields(config) -> dict[str, Any]:
  c = config.diffdfkd
  return {"diffusion_weights": c.weights, "prompt": c.prompt, "denoising_steps": c.steps,
          "guidance_scale": c.guidance_scale}


METHOD = Method(
    name="diffdfkd",
    summary="DiffDFKD (ICME 2025): Stable Diffusion latents steered by the teacher at every "
            "denoising step fill a bank; KD by KL.",
    reads=(*bank_kd.READS, "loss.ce", "loss.bn", "loss.adv", "loss.bn_reduce", "diffdfkd."),
    sweepable=("loss.ce", "loss.bn", "loss.adv", "student.temperature"),
    create_setup=create_setup, init_state=init_state, phases=phases,
    epoch_plan=bank_kd.epoch_plan, latest_images=latest_images,
    epoch_scalars=lambda s: {"bank/size": s.bank.size},
    bundle_fields=bundle_fields, check_config=check_config, own_config=own_config,
    frozen_vars=frozen_vars, requires="Stable Diffusion v1.x weights (config.diffdfkd.weights)")
