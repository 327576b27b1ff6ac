"""NAYER's generator (NLGenerator / NLDeepGenerator) as a pure Flax function: embeddings in, images out.

BN1d over the embeddings -> a chunked "noisy layer" (one Linear per chunk of K
rows, re-drawn from N(0, 1) every round) -> Linear to init x init x 2ngf ->
upsample/conv/BN/LeakyReLU stages -> 3x3 conv -> sigmoid. NAYER keeps its
generator in train mode, so every BatchNorm here normalises with the batch's
statistics: the generator has params only, no running statistics.

The noisy layer holds B // K Linears, so a set of params is made for one
synthesis batch size B (see `init_generator`). `noisy_chunk_rows` can widen the
chunks to whole CNCL groups of K * (N + 1) rows ("per_group"): an anchor and its
diffused copies then share one projection and differ only by CEND's noise,
where NAYER's chunks of K ("per_view") give each view its own random projection.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import torch_default_bias_init, torch_default_kernel_init

NOISY_LAYER = "noisy_layer"
NOISY_CHUNKS = ("per_view", "per_group")


def noisy_chunk_rows(noisy_chunks: str, num_classes: int, num_views: int) -> int:
  """Rows per noisy Linear: K ("per_view", NAYER) or a CNCL group, K * (N + 1) ("per_group")."""
  if noisy_chunks == "per_view":
    return num_classes
  if noisy_chunks == "per_group":
    return num_classes * num_views
  raise ValueError(f"Unknown noisy_chunks {noisy_chunks!r}; choose from {NOISY_CHUNKS}.")


class BatchStatNorm(nn.Module):
  """BatchNorm in train mode: batch mean and biased variance over every axis but the last.

  Learnable scale/bias like PyTorch's BatchNorm1d/2d; no running averages are
  kept because NAYER's generator never runs in eval mode.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = x32.mean(axes)
    var = jnp.square(x32 - mean).mean(axes)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class NoisyLayer(nn.Module):
  """B // R separate Linear(D -> features) layers; chunk i (rows iR..iR+R-1) goes through layer i.

  R is `chunk_rows` (None: `num_classes`, NAYER's chunks of one row per class).
  Stored as one (B // R, D, features) kernel and applied with one batched
  einsum. Initialised like NAYER's freshly built nn.Linear layers (PyTorch
  default); `reinit_noisy_layer` then redraws it from N(0, 1) every round.
  """
  num_classes: int
  features: int
  chunk_rows: int | None = None

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    b, d = x_BxD.shape
    k = self.num_classes
    r = k if self.chunk_rows is None else self.chunk_rows
    what = ("one per class" if r == k else
            f"one CNCL group: num_classes={k} x {r // k} views, noisy_chunks=per_group")
    if r % k:
      raise ValueError(f"Noisy-layer chunks of {r} rows are not a multiple of num_classes={k}: "
                       "each chunk must hold whole views (each class once per view).")
    if b % r:
      raise ValueError(f"Generator batch of {b} embeddings is not a multiple of {r}: the noisy "
                       f"layer feeds chunks of {r} rows ({what}) to separate Linears; use a "
                       f"synthesis batch that is a multiple of {r}.")
    chunks = b // r
    if self.has_variable("params", "kernel"):
      made_for = self.get_variable("params", "kernel").shape[0]
      if made_for != chunks:
        raise ValueError(f"These generator params hold {made_for} noisy-layer Linears, but a batch "
                         f"of {b} embeddings in chunks of {r} rows ({what}) needs {chunks}: they "
                         "were made for another synthesis batch or noisy_chunks; make new ones "
                         f"with init_generator(..., batch_size={b}, ...) for this generator.")
    # fan_in is D alone: the leading chunk axis indexes separate layers.
    kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", batch_axis=(0,))
    kernel = self.param("kernel", kernel_init, (chunks, d, self.features))
    bias = self.param("bias", torch_default_bias_init(d), (chunks, self.features))
    x_NxRxD = x_BxD.reshape(chunks, r, d)
    out_NxRxF = jnp.einsum("nrd,ndf->nrf", x_NxRxD, kernel) + bias[:, None]
    return out_NxRxF.reshape(b, self.features)


class Generator(nn.Module):
  """`apply({"params": p}, embeddings_BxD)` -> images in [0, 1], B x img_size x img_size x channels.

  Two layouts, chosen by `num_upsamples` (None: 2 below 128 px, 4 from 128 px):
  - 2 upsamples, NAYER's NLGenerator (32 and 64 px): project to init = img/4,
    BN, then [upsample, conv 2ngf, BN, LReLU], [upsample, conv ngf, BN, LReLU].
  - more, NAYER's NLDeepGenerator (224 px, init 14): project to init = img/16
    without BN, [conv 2ngf, BN, LReLU] at init, then per upsample [upsample,
    conv, BN, LReLU] with 2ngf, ngf, ngf, ngf channels.
  Both end in a biased 3x3 conv to `channels` and a sigmoid. Convs are 3x3,
  padding 1, bias-free; LeakyReLU slope 0.2; nearest-neighbour upsampling.
  B must be the batch size the params were made for (a multiple of
  `num_classes`, and of `noisy_chunk_rows` where set).
  """
  num_classes: int
  img_size: int = 32
  noise_dim: int = 1000
  ngf: int = 64
  channels: int = 3
  dtype: Any = jnp.float32
  num_upsamples: int | None = None
  noisy_chunk_rows: int | None = None   # Rows per noisy-layer Linear (`noisy_chunk_rows()`);
                                        # None: num_classes (NAYER).
  noisy_input: bool = True  # NAYER's BN1d + noisy layer in front; False: the inputs go straight
                            # to the projection, Fast/CMI's Generator(nz) (`cmi_reset`).

  def layout(self) -> tuple[int, bool, tuple[tuple[bool, int], ...]]:
    """(init size, BN after the projection?, conv stages as (upsample first?, out channels))."""
    ups = self.num_upsamples if self.num_upsamples is not None else (4 if self.img_size >= 128 else 2)
    if ups < 1 or self.img_size % 2**ups:
      raise ValueError(f"img_size={self.img_size} with num_upsamples={ups}: the image size must be "
                       f"divisible by 2**num_upsamples (NAYER: 32/64 px with 2, 224 px with 4).")
    up_stages = ((True, 2 * self.ngf),) + ((True, self.ngf),) * (ups - 1)
    deep = ups > 2
    stages = ((False, 2 * self.ngf),) + up_stages if deep else up_stages
    return self.img_size // 2**ups, not deep, stages

  @nn.compact
  def __call__(self, embeddings_BxD: jax.Array) -> jax.Array:
    init, project_norm, stages = self.layout()
    width = 2 * self.ngf
    x = embeddings_BxD.astype(jnp.float32)
    if self.noisy_input:
      x = BatchStatNorm(name="embed_norm")(x)
      x = NoisyLayer(self.num_classes, self.noise_dim, self.noisy_chunk_rows, name=NOISY_LAYER)(x)
    x = nn.Dense(width * init * init, kernel_init=torch_default_kernel_init,
                 bias_init=torch_default_bias_init(x.shape[-1]), dtype=self.dtype,
                 name="project")(x)
    x = x.reshape(-1, init, init, width)
    if project_norm:
      x = BatchStatNorm(name="project_norm")(x)
    for i, (upsample, features) in enumerate(stages, start=1):
      if upsample:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=torch_default_kernel_init, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.leaky_relu(BatchStatNorm(name=f"norm{i}")(x), 0.2)
    x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(9 * stages[-1][1]), dtype=self.dtype,
                name="to_image")(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


def init_generator(rng: jax.Array, generator: Generator, batch_size: int, embed_dim: int):
  """Fresh params for synthesis batches of `batch_size` embeddings of size `embed_dim`.

  The noisy layer gets batch_size // generator.noisy_chunk_rows Linears
  (num_classes where unset), so the params only fit that batch size and chunking.
  """
  return generator.init(rng, jnp.zeros((batch_size, embed_dim), jnp.float32))["params"]


def cmi_reset(params, rng: jax.Array):
  """CMI's per-round `reset_model`: Linear/conv weights ~ N(0, 0.02), their biases 0, BatchNorm
  scales ~ N(1, 0.02), BN biases 0. Every leaf is redrawn, so the old values do not matter."""
  flat = flax.traverse_util.flatten_dict(params)
  keys = jax.random.split(rng, len(flat))
  def redraw(path, value, key):
    if path[-1] == "bias":
      return jnp.zeros_like(value)
    mean = 1.0 if path[-1] == "scale" else 0.0
    return mean + 0.02 * jax.random.normal(key, value.shape, value.dtype)
  return flax.traverse_util.unflatten_dict(
      {path: redraw(path, value, key) for (path, value), key in zip(sorted(flat.items()), keys)})


def reinit_noisy_layer(params, rng: jax.Array):
  """NAYER's per-round reset: noisy-layer weights ~ N(0, 1), biases 0; the rest untouched."""
  layer = params[NOISY_LAYER]
  new = {"kernel": jax.random.normal(rng, layer["kernel"].shape, layer["kernel"].dtype),
         "bias": jnp.zeros_like(layer["bias"])}
  return {**params, NOISY_LAYER: new}
