"""DDPM sampling (diffusion/scheduler.py) against diffusers' DDPMScheduler, and the formulas by hand."""

import numpy as np
import pytest

from caedfkd_jax.diffusion import scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 7), ("leading", 1)])
def test_steps_match_diffusers(spacing, steps):
  config = {**scheduler.SD_V1, "timestep_spacing": spacing}
  ours = scheduler.DDPMSchedule.create(config, steps)
  theirs = diffusers.DDPMScheduler(**config)
  theirs.set_timesteps(steps)
  np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  for i, t in enumerate(theirs.timesteps):
    eps = rng.standard_normal(sample.shape).astype(np.float32)
    generator = torch.Generator().manual_seed(i)
    out = theirs.step(torch.from_numpy(eps), t, torch.from_numpy(sample), generator=generator)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(i)).numpy()
    x0 = scheduler.predict_x0(sample, eps, ours.alpha_bar[i])
    prev = scheduler.ddpm_step(ours, i, sample, eps, noise)
    np.testing.assert_allclose(x0, out.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prev, out.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
    sample = np.array(prev)


def test_sd_v1_ten_steps_by_hand():
  s = scheduler.DDPMSchedule.create(scheduler.SD_V1, 10)
  np.testing.assert_array_equal(s.timesteps, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  alpha_bar = np.cumprod(1 - betas)
  np.testing.assert_allclose(s.alpha_bar, alpha_bar[s.timesteps], rtol=1e-5)
  np.testing.assert_allclose(s.alpha_bar_prev[:-1], alpha_bar[s.timesteps[1:]], rtol=1e-5)
  assert s.alpha_bar_prev[-1] == 1.0
  # The last step lands on x0_hat: no sample term, no noise worth the name.
  x, eps = np.full((1, 2), 0.3, np.float32), np.full((1, 2), -0.2, np.float32)
  last = scheduler.ddpm_step(s, 9, x, eps, np.ones_like(x))
  np.testing.assert_allclose(last, scheduler.predict_x0(x, eps, s.alpha_bar[9]), atol=1e-6)


def test_x0_and_guidance_formulas_by_hand():
  x0 = scheduler.predict_x0(np.float32(1.0), np.float32(0.5), np.float32(0.64))
  np.testing.assert_allclose(x0, (1.0 - 0.6 * 0.5) / 0.8, rtol=1e-6)
  eps = scheduler.guided_eps(np.float32(1.0), np.float32(2.0), 3.0)
  np.testing.assert_allclose(eps, 1.0 + 3.0 * (2.0 - 1.0))


def test_unsupported_config_names_the_field():
  with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
    scheduler.DDPMSchedule.create({**scheduler.SD_V1, "prediction_type": "v_prediction"}, 10)
  with pytest.raises(ValueError, match="inference steps"):
    scheduler.DDPMSchedule.create(scheduler.SD_V1, 0)
