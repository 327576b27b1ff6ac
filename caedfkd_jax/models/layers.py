"""Layers shared by the model zoo: PyTorch-compatible conv/linear/BatchNorm.

`BatchNorm` is the one piece of our own: DFKD's BN-statistics loss needs the
batch mean and variance of every BatchNorm *input*, also when the teacher runs
on its running averages. Each layer sows them into the `bn_stats` collection,
mirroring the layout of `batch_stats`, so the loss is a `jax.tree.map` over the
two trees. Sowing is free when `bn_stats` is not mutable (XLA drops the work).

CMI's contrastive features are the *per-instance* means (over H, W) of the same
BN inputs; they go into a second collection, `bn_instance_means`, and only when
a caller makes it mutable (`cmi_contrast.teacher_instance_features`), so every
other caller traces exactly the graph it traced before.

`BasicBlock` is the residual block of both ResNet families: the DFKD zoo's
(option-B shortcut, `resnet.py`) and akamaster's CIFAR ResNets (option-A
shortcut, `resnet_cifar.py`); only the shortcut differs.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_STATS = "bn_stats"
BN_INSTANCE_MEANS = "bn_instance_means"

# PyTorch's default init for Linear/Conv is kaiming_uniform(a=sqrt(5)), i.e.
# U(+-1/sqrt(fan_in)) for weights and biases. The zoos re-init convs with
# kaiming_normal (fan_out for torchvision/DFKD, fan_in for akamaster).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """U(+-1/sqrt(fan_in)), PyTorch's default bias init."""
  bound = 1.0 / jnp.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def conv3x3(features: int, stride: int = 1, use_bias: bool = False,
            dtype: Any = jnp.float32, name: str | None = None,
            dilation: int = 1) -> nn.Conv:
  """3x3 conv with PyTorch's explicit padding (= dilation; 'SAME' differs at stride 2).

  Dilation changes no parameter, so dilated backbones load undilated weights.
  """
  return nn.Conv(features, (3, 3), strides=(stride, stride),
                 padding=((dilation, dilation), (dilation, dilation)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias,
                 kernel_init=conv_init, dtype=dtype, name=name)


def conv1x1(features: int, stride: int = 1, dtype: Any = jnp.float32,
            name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID",
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def refuse_output_stride(net: nn.Module, allowed: Sequence[int]) -> None:
  """One-line error when `net.output_stride` (None: the net's own) is not one it can give."""
  if net.output_stride is not None and net.output_stride not in allowed:
    raise ValueError(
        f"{type(net).__name__}: output_stride={net.output_stride} is not available here "
        f"(use {' or '.join(map(str, sorted(set(allowed))))}; only Bottleneck ResNets dilate).")


def _keep_last(_, value):
  """sow reducer: a module called twice keeps its latest statistics."""
  return value


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics that also records its input statistics.

  Same variable names as `flax.linen.BatchNorm` (params scale/bias,
  batch_stats mean/var). Differences, both for PyTorch parity: the running
  variance is updated with the unbiased batch variance, and statistics are
  computed in float32 whatever the compute dtype.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    reduce_axes = tuple(range(x.ndim - 1))
    need_batch_stats = (not use_running_average) or self.is_mutable_collection(BN_STATS)
    if need_batch_stats:
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=reduce_axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      self.sow(BN_STATS, "mean", mean, reduce_fn=_keep_last, init_fn=lambda: None)
      self.sow(BN_STATS, "var", var, reduce_fn=_keep_last, init_fn=lambda: None)
    if self.is_mutable_collection(BN_INSTANCE_MEANS):
      spatial_axes = tuple(range(1, x.ndim - 1))  # B x C out of B x H x W x C
      instance_mean = jnp.mean(x.astype(jnp.float32), axis=spatial_axes)
      self.sow(BN_INSTANCE_MEANS, "mean", instance_mean, reduce_fn=_keep_last,
               init_fn=lambda: None)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    elif not self.is_initializing():
      n = x.size // features
      unbiased_var = var * n / max(n - 1, 1)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var

    dtype = self.dtype or x.dtype
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(dtype)


def linear(features: int, fan_in: int, dtype: Any = jnp.float32,
           name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default initialisation."""
  return nn.Dense(features, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), dtype=dtype, name=name)


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
  return jnp.mean(x_BxHxWxC.astype(jnp.float32), axis=(1, 2))


def option_a_shortcut(x_BxHxWxC: jax.Array, planes: int) -> jax.Array:
  """Parameter-free shortcut: subsample by 2, zero-pad channels on both sides."""
  pad = planes // 4
  x = x_BxHxWxC[:, ::2, ::2, :]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, pad)))


class BasicBlock(nn.Module):
  """conv3x3-bn-relu-conv3x3-bn, + shortcut, relu (He et al. 2016).

  Where the shape changes, `shortcut="B"` projects with a 1x1 conv + BN (params
  `shortcut_0`, `shortcut_1`: DFKD zoo, torchvision) and `shortcut="A"`
  subsamples and zero-pads channels, without parameters (akamaster's CIFAR
  ResNets).
  """
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  shortcut: str = "B"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.shortcut not in ("A", "B"):
      raise ValueError(f"BasicBlock shortcut={self.shortcut!r}: use 'A' or 'B'.")
    out = conv3x3(self.planes, self.stride, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, not train))
    out = conv3x3(self.planes, dtype=self.dtype, name="conv2")(out)
    out = BatchNorm(dtype=self.dtype, name="bn2")(out, not train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      if self.shortcut == "A":
        x = option_a_shortcut(x, self.planes)
      else:
        x = conv1x1(self.planes, self.stride, dtype=self.dtype, name="shortcut_0")(x)
        x = BatchNorm(dtype=self.dtype, name="shortcut_1")(x, not train)
    return nn.relu(out + x)


def bn(dtype: Any = None, name: str | None = None) -> BatchNorm:
  return BatchNorm(dtype=dtype, name=name)


relu = nn.relu
leaky_relu = partial(nn.leaky_relu, negative_slope=0.2)
