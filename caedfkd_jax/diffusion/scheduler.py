"""The DDPM sampler DiffDFKD denoises with, as arrays a jitted loop indexes by step.

DiffDFKD's code builds diffusers' `DDPMScheduler` from Stable Diffusion's
`scheduler/scheduler_config.json` and calls `set_timesteps(n)`. `DDPMSchedule.create`
precomputes what its `step` reads at each of the n timesteps (alpha-bar of the step and
of the one after it, the posterior variance), so that step i of a `lax.scan` or a
jitted call is a gather and a few multiply-adds. Same formulas as diffusers (tested
against it): epsilon prediction, "fixed_small" variance, no sample clipping.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED = {"beta_schedule": ("linear", "scaled_linear"), "prediction_type": ("epsilon",),
             "variance_type": ("fixed_small",), "timestep_spacing": ("leading", "trailing"),
             "clip_sample": (False,), "thresholding": (False,)}

# Stable Diffusion v1.x's scheduler_config.json, the fields DDPM reads.
SD_V1 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False}


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
  """n inference steps of DDPM. Arrays are float32 numpy, indexed by step 0..n-1."""
  timesteps: np.ndarray        # int32 [n], descending (e.g. 901, 801, ..., 1 for n=10).
  alpha_bar: np.ndarray        # [n] cumulative alpha at each timestep.
  alpha_bar_prev: np.ndarray   # [n] at the next timestep (1.0 after the last).
  variance: np.ndarray         # [n] posterior variance ("fixed_small", clamped at 1e-20).

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @classmethod
  def create(cls, config: Mapping[str, Any], num_steps: int) -> "DDPMSchedule":
    """From a diffusers scheduler config (any scheduler class's JSON: DDPM reads these fields)."""
    c = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "steps_offset": 0, "prediction_type": "epsilon",
         "variance_type": "fixed_small", "timestep_spacing": "leading", "clip_sample": True,
         "thresholding": False, **{k: v for k, v in config.items() if v is not None}}
    for key, allowed in SUPPORTED.items():
      if c[key] not in allowed:
        raise ValueError(f"Scheduler config {key}={c[key]!r} is not supported; DiffDFKD's DDPM "
                         f"sampler here takes {key} in {allowed} (Stable Diffusion v1.x's config).")
    if config.get("trained_betas") is not None:
      raise ValueError("Scheduler config trained_betas is not supported; give beta_start/beta_end.")
    total = int(c["num_train_timesteps"])
    if not 0 < num_steps <= total:
      raise ValueError(f"num_steps={num_steps}: the inference steps must be in 1..{total}.")
    if c["beta_schedule"] == "linear":
      betas = np.linspace(c["beta_start"], c["beta_end"], total, dtype=np.float32)
    else:
      betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, total,
                          dtype=np.float32) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    if c["timestep_spacing"] == "leading":
      ratio = total // num_steps
      timesteps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + c["steps_offset"]
    else:   # trailing
      timesteps = np.round(np.arange(total, 0, -total / num_steps)).astype(np.int64) - 1
    alpha_bar = alphas_cumprod[timesteps]
    alpha_bar_prev = np.concatenate([alphas_cumprod[timesteps[1:]], np.ones(1, np.float32)])
    current_beta = 1.0 - alpha_bar / alpha_bar_prev
    variance = np.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * current_beta, 1e-20)
    variance = np.where(timesteps > 0, variance, 0.0)   # diffusers adds no noise at t = 0.
    return cls(timesteps.astype(np.int32), alpha_bar.astype(np.float32),
               alpha_bar_prev.astype(np.float32), variance.astype(np.float32))

  def at(self, step: jax.Array) -> tuple[jax.Array, ...]:
    """(timestep, alpha_bar, alpha_bar_prev, variance) of step `step` (may be traced)."""
    return tuple(jnp.asarray(a)[step] for a in
                 (self.timesteps, self.alpha_bar, self.alpha_bar_prev, self.variance))


def predict_x0(sample: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar): the clean latent the step implies."""
  return (sample - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def ddpm_step(schedule: DDPMSchedule, step: jax.Array, sample: jax.Array, eps: jax.Array,
              noise: jax.Array) -> jax.Array:
  """x_{t_prev} from x_t: the posterior mean given x0_hat, plus sqrt(variance) * `noise`."""
  _, alpha_bar, alpha_bar_prev, variance = schedule.at(step)
  x0 = predict_x0(sample, eps, alpha_bar)
  current_alpha = alpha_bar / alpha_bar_prev
  x0_coeff = jnp.sqrt(alpha_bar_prev) * (1.0 - current_alpha) / (1.0 - alpha_bar)
  sample_coeff = jnp.sqrt(current_alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
  return x0_coeff * x0 + sample_coeff * sample + jnp.sqrt(variance) * noise


def guided_eps(eps_uncond: jax.Array, eps_text: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance: eps_u + s (eps_c - eps_u)."""
  return eps_uncond + scale * (eps_text - eps_uncond)
