"""Mixing latents within a synthesis batch, DiffDFKD's diversity trick (its `customer_aug`).

Every k denoising steps the code replaces each latent's box (CutMix) or the whole
latent (Mixup) with a blend from another row of the batch, chosen by a random
permutation. Its mixing ratio is drawn twice: lam0 ~ Beta(alpha, alpha) (alpha = 1),
then lam ~ Beta(lam0, lam0) (`customer_aug_data` passes lam0 on as the alpha of
`cutmix`/`mixup_data`); we draw it the same way. CutMix's box: a centre uniform over
the latent, sides W sqrt(1 - lam) and H sqrt(1 - lam), clipped to the latent and
rounded half to even, as `np.round`.
"""

import jax
import jax.numpy as jnp

MODES = ("none", "cutmix", "mixup")


def mixing_ratio(rng: jax.Array, alpha: float = 1.0) -> jax.Array:
  """lam ~ Beta(lam0, lam0) with lam0 ~ Beta(alpha, alpha): the code's two draws."""
  rng_outer, rng_inner = jax.random.split(rng)
  lam0 = jax.random.beta(rng_outer, alpha, alpha)
  return jax.random.beta(rng_inner, lam0, lam0)


def cutmix_box(lam: jax.Array, cx: jax.Array, cy: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(y0, y1, x0, x1) of the pasted box: centre (cx, cy), area fraction about 1 - lam."""
  w, h = width * jnp.sqrt(1.0 - lam), height * jnp.sqrt(1.0 - lam)
  x0 = jnp.round(jnp.maximum(cx - w / 2, 0.0))
  x1 = jnp.round(jnp.minimum(cx + w / 2, float(width)))
  y0 = jnp.round(jnp.maximum(cy - h / 2, 0.0))
  y1 = jnp.round(jnp.minimum(cy + h / 2, float(height)))
  return y0, y1, x0, x1


def cutmix(rng: jax.Array, latents_BxHxWxC: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Each row's box replaced by the same box of row perm[i] (one box for the batch, as the code)."""
  rng_lam, rng_x, rng_y, rng_perm = jax.random.split(rng, 4)
  _, height, width, _ = latents_BxHxWxC.shape
  lam = mixing_ratio(rng_lam, alpha)
  cx = jax.random.uniform(rng_x, (), minval=0.0, maxval=width)
  cy = jax.random.uniform(rng_y, (), minval=0.0, maxval=height)
  y0, y1, x0, x1 = cutmix_box(lam, cx, cy, height, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  shuffled = latents_BxHxWxC[jax.random.permutation(rng_perm, latents_BxHxWxC.shape[0])]
  return jnp.where(inside[None, :, :, None], shuffled, latents_BxHxWxC)


def mixup(rng: jax.Array, latents_BxHxWxC: jax.Array, alpha: float = 1.0) -> jax.Array:
  """lam * x + (1 - lam) * x[perm]."""
  rng_lam, rng_perm = jax.random.split(rng)
  lam = mixing_ratio(rng_lam, alpha)
  shuffled = latents_BxHxWxC[jax.random.permutation(rng_perm, latents_BxHxWxC.shape[0])]
  return lam * latents_BxHxWxC + (1.0 - lam) * shuffled


def mix(mode: str, rng: jax.Array, latents: jax.Array, alpha: float = 1.0) -> jax.Array:
  if mode == "none":
    return latents
  if mode == "cutmix":
    return cutmix(rng, latents, alpha)
  if mode == "mixup":
    return mixup(rng, latents, alpha)
  raise ValueError(f"latent mix {mode!r}: use one of {', '.join(MODES)}.")
