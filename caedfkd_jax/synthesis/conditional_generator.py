"""CPSC-DFKD's class-conditional generator (GeneratorD, METHOD.md b.5) as a Flax module.

Linear(nz -> 2ngf * init * init), init = img_size // 4 -> CBN -> [upsample x2,
conv3x3 2ngf, CBN, LeakyReLU 0.2] -> [upsample x2, conv3x3 ngf, CBN, LeakyReLU]
-> conv3x3 to `channels` -> tanh -> CBN. CBN is categorical conditional
BatchNorm: a non-affine BN (eps 1e-3) then a per-class scale and shift looked
up from two embedding tables (initialised to ones and zeros).

The last CBN comes *after* the tanh, so images leave already standardised per
channel, like a teacher's normalised input: feed them to the teacher as they
are and never apply the dataset's mean/std on top. Only de-normalise to look
at them.

The authors keep the generator in train mode while distilling, so every CBN
normalises with its batch's statistics. Their BN also tracks running averages
(momentum 0.1), which only their eval-mode image dumps read; here they live in
an optional "batch_stats" collection, updated when it is mutable and read with
`train=False`. Training needs the params alone.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import torch_default_bias_init, torch_default_kernel_init

BATCH_STATS = "batch_stats"


class CategoricalConditionalBatchNorm(nn.Module):
  """Non-affine BatchNorm, then gamma[y] * x_hat + beta[y] from (num_classes, C) tables.

  Params `class_scale` / `class_bias` are the authors' `weights.weight` /
  `biases.weight` embeddings. Statistics are over every axis but the last, in
  float32, with the biased variance; the running variance takes the unbiased
  one, as PyTorch's does (flax momentum 0.9 is PyTorch's 0.1).
  """
  num_classes: int
  epsilon: float = 1e-3
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, labels_B: jax.Array, train: bool = True) -> jax.Array:
    features = x.shape[-1]
    scale_KxC = self.param("class_scale", nn.initializers.ones, (self.num_classes, features))
    bias_KxC = self.param("class_bias", nn.initializers.zeros, (self.num_classes, features))
    # Running stats exist only where init made them or the caller lets us write them.
    track = self.has_variable(BATCH_STATS, "mean") or self.is_mutable_collection(BATCH_STATS)
    if track:
      ra_mean = self.variable(BATCH_STATS, "mean", jnp.zeros, (features,), jnp.float32)
      ra_var = self.variable(BATCH_STATS, "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      if track and self.is_mutable_collection(BATCH_STATS) and not self.is_initializing():
        n = x.size // features
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * var * n / max(n - 1, 1))
    else:
      if not track:
        raise ValueError("train=False normalises with running statistics, but these variables "
                         "have no 'batch_stats': pass the whole dict from "
                         "init_conditional_generator, not only its params.")
      mean, var = ra_mean.value, ra_var.value
    x_hat = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    bshape = (-1,) + (1,) * (x.ndim - 2) + (features,)
    gamma = scale_KxC[labels_B].reshape(bshape)
    beta = bias_KxC[labels_B].reshape(bshape)
    return (gamma * x_hat + beta).astype(x.dtype)


def _upsample2x(x_BxHxWxC: jax.Array) -> jax.Array:
  """Nearest-neighbour x2, PyTorch's F.interpolate(scale_factor=2) default."""
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


class ConditionalGenerator(nn.Module):
  """`apply(variables, z_BxNz, labels_B)` -> B x img x img x channels, in normalised space.

  Output is NOT in [0, 1] or [-1, 1]: the final CBN follows the tanh (see the
  module docstring). Convs are 3x3, padding 1, with bias (PyTorch's default),
  and every layer uses PyTorch's default init, as the authors never re-init.
  The projection is reshaped channel-major, as PyTorch's `view(B, C, H, W)`,
  so a converted GeneratorD state_dict gives the same images.
  """
  num_classes: int
  img_size: int = 32
  nz: int = 256
  ngf: int = 64
  channels: int = 3
  epsilon: float = 1e-3   # The authors' CBN eps (PyTorch's BN default is 1e-5).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BxNz: jax.Array, labels_B: jax.Array, train: bool = True) -> jax.Array:
    if self.img_size % 4:
      raise ValueError(f"img_size={self.img_size}: GeneratorD upsamples twice from "
                       "img_size // 4, so it must be divisible by 4.")
    init, width = self.img_size // 4, 2 * self.ngf
    cbn = lambda name: CategoricalConditionalBatchNorm(self.num_classes, self.epsilon, name=name)
    conv = lambda features, fan_in, name: nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(9 * fan_in), dtype=self.dtype, name=name)

    z = z_BxNz.reshape(z_BxNz.shape[0], -1).astype(jnp.float32)  # Accepts (B, nz, 1, 1) too.
    x = nn.Dense(width * init * init, kernel_init=torch_default_kernel_init,
                 bias_init=torch_default_bias_init(z.shape[-1]), dtype=self.dtype,
                 name="project")(z)
    x = x.reshape(-1, width, init, init).transpose(0, 2, 3, 1)
    x = cbn("norm0")(x, labels_B, train)
    x = conv(width, width, "conv1")(_upsample2x(x))
    x = nn.leaky_relu(cbn("norm1")(x, labels_B, train), 0.2)
    x = conv(self.ngf, width, "conv2")(_upsample2x(x))
    x = nn.leaky_relu(cbn("norm2")(x, labels_B, train), 0.2)
    x = jnp.tanh(conv(self.channels, self.ngf, "to_image")(x).astype(jnp.float32))
    return cbn("norm_out")(x, labels_B, train).astype(jnp.float32)


def init_conditional_generator(rng: jax.Array, module: ConditionalGenerator, batch: int,
                               nz: int | None = None) -> dict:
  """Fresh {"params", "batch_stats"}; training applies {"params": ...} alone.

  Unlike NAYER's generator the params do not depend on `batch`; it only sizes
  the dummy input. `nz` defaults to `module.nz`.
  """
  nz = module.nz if nz is None else nz
  # Jitted: eager init compiles every initialiser op by op, several times slower.
  return dict(jax.jit(module.init)(rng, jnp.zeros((batch, nz), jnp.float32),
                                   jnp.zeros((batch,), jnp.int32)))


def sample_inputs(rng: jax.Array, batch: int, nz: int,
                  num_classes: int) -> tuple[jax.Array, jax.Array]:
  """CPSC's per-step draw: z ~ N(0, I) of size nz, labels uniform over the classes."""
  z_rng, y_rng = jax.random.split(rng)
  z_BxNz = jax.random.normal(z_rng, (batch, nz), jnp.float32)
  labels_B = jax.random.randint(y_rng, (batch,), 0, num_classes, jnp.int32)
  return z_BxNz, labels_B
