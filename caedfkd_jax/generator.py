"""NAYER's generator (NLGenerator / NLDeepGenerator) as a pure Flax function: embeddings in, images out.

BN1d over the embeddings -> a chunked "noisy layer" (one Linear per chunk of K
rows, re-drawn from N(0, 1) every round) -> Linear to init x init x 2ngf ->
upsample/conv/BN/LeakyReLU stages -> 3x3 conv -> sigmoid. The generator always
normalises with its batch statistics (NAYER keeps it in train mode), so it has
params only and no running statistics.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import torch_default_bias_init, torch_default_kernel_init

NOISY_LAYER = "noisy_layer"


class BatchStatNorm(nn.Module):
  """BatchNorm that always uses batch statistics (over every axis but the last)."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = x32.mean(axes)
    var = jnp.square(x32 - mean).mean(axes)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class NoisyLayer(nn.Module):
  """B // K separate Linear(D -> noise_dim) layers; chunk i of K rows goes through layer i."""
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    b, d = x_BxD.shape
    if b % self.num_classes:
      raise ValueError(f"Generator batch {b} is not a multiple of the {self.num_classes} classes: "
                       "every chunk of K rows must hold each class once.")
    chunks = b // self.num_classes
    kernel = self.param("kernel", nn.initializers.normal(1.0), (chunks, d, self.features))
    bias = self.param("bias", nn.initializers.zeros, (chunks, self.features))
    x = x_BxD.reshape(chunks, self.num_classes, d)
    return (jnp.einsum("nkd,ndf->nkf", x, kernel) + bias[:, None]).reshape(b, self.features)


class Generator(nn.Module):
  """`apply({"params": p}, embeddings_BxD)` -> images in [0, 1], B x img x img x channels.

  The noisy layer's size depends on the synthesis batch (B // K chunks), so
  params are made for one batch size.
  """
  num_classes: int
  img_size: int = 32
  noise_dim: int = 1000
  ngf: int = 64
  channels: int = 3
  dtype: Any = jnp.float32

  @property
  def num_upsamples(self) -> int:
    # NAYER: init = img // 4 with two upsamples (32, 64); 224 starts at 14 with four.
    return 4 if self.img_size >= 128 else 2

  @nn.compact
  def __call__(self, embeddings_BxD: jax.Array) -> jax.Array:
    init = self.img_size // 2**self.num_upsamples
    if init * 2**self.num_upsamples != self.img_size:
      raise ValueError(f"img_size {self.img_size} is not divisible by {2**self.num_upsamples}.")
    x = BatchStatNorm(name="embed_norm")(embeddings_BxD.astype(jnp.float32))
    x = NoisyLayer(self.num_classes, self.noise_dim, name=NOISY_LAYER)(x)
    width = 2 * self.ngf
    x = nn.Dense(width * init * init, kernel_init=torch_default_kernel_init,
                 bias_init=torch_default_bias_init(self.noise_dim), dtype=self.dtype, name="project")(x)
    x = x.reshape(-1, init, init, width)
    x = BatchStatNorm(name="norm0")(x)
    channels = [width] * (self.num_upsamples - 1) + [self.ngf]
    for i, c in enumerate(channels):
      b, h, w, ch = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, ch), "nearest")
      x = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=torch_default_kernel_init, dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = nn.leaky_relu(BatchStatNorm(name=f"norm{i + 1}")(x), 0.2)
    x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(9 * self.ngf), dtype=self.dtype, name="to_image")(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


def init_generator(rng: jax.Array, generator: Generator, batch_size: int, embed_dim: int):
  """Fresh params for a synthesis batch of `batch_size` embeddings of size `embed_dim`."""
  return generator.init(rng, jnp.zeros((batch_size, embed_dim), jnp.float32))["params"]


def reinit_noisy_layer(params, rng: jax.Array):
  """NAYER's per-round reset: noisy-layer weights ~ N(0, 1), biases 0; the rest untouched."""
  layer = params[NOISY_LAYER]
  new = {"kernel": jax.random.normal(rng, layer["kernel"].shape, layer["kernel"].dtype),
         "bias": jnp.zeros_like(layer["bias"])}
  return {**params, NOISY_LAYER: new}
