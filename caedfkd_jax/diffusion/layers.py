"""Building blocks of Stable Diffusion's UNet and VAE decoder, with diffusers' numbers.

Each module computes what its namesake in diffusers (PyTorch) computes, on NHWC
tensors, and names its parameters so that the Flax path spells the diffusers key:
`down_blocks_0/resnets_1/conv1/kernel` is `down_blocks.0.resnets.1.conv1.weight`
(a list index joins its list's name with "_"; see `torch_key`). That keeps the
converters a shape check and a transpose, with no table of names to maintain.

Compute dtype: every module takes `dtype` (float32, or bfloat16 on GPUs) and keeps
its parameters in float32. GroupNorm, LayerNorm and the attention softmax run in
float32 whatever the dtype, as diffusers' fp16 pipelines upcast them too.
"""

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.io.convert import listed

MAX_LISTED = 5  # keys named per kind of mismatch in a converter's error.


def group_norm(x: jax.Array, num_groups: int, epsilon: float, dtype: Any,
               name: str) -> jax.Array:
  """torch.nn.GroupNorm: statistics and normalisation in float32 (exact two-pass variance)."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, use_fast_variance=False,
                      dtype=dtype, name=name)(x.astype(jnp.float32))


def layer_norm(x: jax.Array, epsilon: float, dtype: Any, name: str) -> jax.Array:
  """torch.nn.LayerNorm over the last axis, in float32."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                      name=name)(x.astype(jnp.float32))


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
  """PyTorch's Conv2d(padding=kernel // 2); explicit padding ('SAME' differs at stride 2)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: [B] (int or float) -> [B, dim] float32 sinusoids."""
  half = dim // 2
  exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """F.interpolate(mode="nearest") to `size`: source index floor(i * in / out), as PyTorch."""
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if out == 2 * n:
      x = jnp.repeat(x, 2, axis=axis)
    elif out != n:
      scale = np.float32(n) / np.float32(out)
      index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int32), n - 1)
      x = jnp.take(x, index, axis=axis)
  return x


class TimestepEmbedding(nn.Module):
  """linear_1 -> silu -> linear_2, on the sinusoidal embedding."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    h = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t_emb.astype(self.dtype))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(h))


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, plus the (projected) time embedding; 1x1 conv shortcut
  when the channel count changes. `temb` is None in the VAE."""
  out_channels: int
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = nn.silu(group_norm(x, self.num_groups, self.epsilon, self.dtype, "norm1"))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(h, self.num_groups, self.epsilon, self.dtype, "norm2"))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x.astype(self.dtype) + h


class Downsample2D(nn.Module):
  """3x3 conv, stride 2, padding 1."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(x.shape[-1], 3, self.dtype, "conv", stride=2)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 (or to `size`, the skip's when odd sizes were halved), then 3x3 conv."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return conv(x.shape[-1], 3, self.dtype, "conv")(x)


def _attend(x_BxTxC: jax.Array, context_BxSxD: jax.Array, heads: int, head_dim: int,
            qkv_bias: bool, dtype: Any, implementation: str | None = None) -> jax.Array:
  """to_q/to_k/to_v, scaled dot-product attention per head (softmax in float32), to_out.0.

  Creates its Dense layers in the calling module, so the keys sit where diffusers' are."""
  inner = heads * head_dim

  def heads_of(inputs: jax.Array, name: str) -> jax.Array:  # [B, T, heads, head_dim]
    projected = nn.Dense(inner, use_bias=qkv_bias, dtype=dtype, name=name)(inputs)
    return projected.reshape(projected.shape[:2] + (heads, head_dim))

  out = jax.nn.dot_product_attention(heads_of(x_BxTxC, "to_q"), heads_of(context_BxSxD, "to_k"),
                                     heads_of(context_BxSxD, "to_v"), scale=head_dim ** -0.5,
                                     implementation=implementation)
  out = out.reshape(out.shape[:2] + (inner,))
  return nn.Dense(x_BxTxC.shape[-1], dtype=dtype, name="to_out_0")(out)


class Attention(nn.Module):
  """diffusers' `Attention` as the UNet's transformers use it: multi-head, q/k/v without
  bias, self-attention when `context` is None, else cross-attention to it.

  `attention`: `jax.nn.dot_product_attention`'s implementation. None (XLA) builds the
  T x T logits per head; "cudnn" is cuDNN's fused (flash) attention, GPUs and 16-bit only."""
  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x_BxTxC: jax.Array, context_BxSxD: jax.Array | None = None) -> jax.Array:
    context = x_BxTxC if context_BxSxD is None else context_BxSxD.astype(self.dtype)
    return _attend(x_BxTxC, context, self.heads, self.head_dim, False, self.dtype,
                   self.attention)


class VAEAttention(nn.Module):
  """The VAE mid block's attention: GroupNorm, one head over all pixels (q/k/v with bias),
  plus the input (diffusers' `Attention(residual_connection=True, norm_num_groups=...)`)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, h, w, c = x_BxHxWxC.shape
    y = group_norm(x_BxHxWxC, self.num_groups, self.epsilon, self.dtype, "group_norm")
    y = y.reshape(b, h * w, c)
    y = _attend(y, y, 1, c, True, self.dtype)
    return x_BxHxWxC.astype(self.dtype) + y.reshape(b, h, w, c)


class GEGLU(nn.Module):
  """proj to 2 * features, then value * gelu(gate) (exact erf gelu, as F.gelu)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, -1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 (GEGLU to 4x width) -> net.2 (Linear back); net.1 is dropout, absent here."""
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward; each
  added to its input."""
  heads: int
  head_dim: int
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  attention: str | None = None   # See `Attention`.

  @nn.compact
  def __call__(self, x_BxTxC: jax.Array, context_BxSxD: jax.Array) -> jax.Array:
    def norm(h: jax.Array, name: str) -> jax.Array:
      return layer_norm(h, self.norm_eps, self.dtype, name)

    attn1 = Attention(self.heads, self.head_dim, self.dtype, self.attention, name="attn1")
    attn2 = Attention(self.heads, self.head_dim, self.dtype, self.attention, name="attn2")
    x = x_BxTxC + attn1(norm(x_BxTxC, "norm1"))
    x = x + attn2(norm(x, "norm2"), context_BxSxD)
    return x + FeedForward(dtype=self.dtype, name="ff")(norm(x, "norm3"))


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, plus the input.

  proj_in/proj_out are 1x1 convs (SD v1) or Linear layers (`use_linear_projection`, SD v2);
  the two are the same map, only the stored weight shapes differ."""
  heads: int
  head_dim: int
  num_layers: int = 1
  num_groups: int = 32
  use_linear_projection: bool = False
  dtype: Any = jnp.float32
  attention: str | None = None   # See `Attention`.

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, context_BxSxD: jax.Array) -> jax.Array:
    b, h, w, c = x_BxHxWxC.shape
    inner = self.heads * self.head_dim

    def proj(features: int, name: str) -> nn.Module:
      if self.use_linear_projection:
        return nn.Dense(features, dtype=self.dtype, name=name)
      return conv(features, 1, self.dtype, name)

    y = group_norm(x_BxHxWxC, self.num_groups, 1e-6, self.dtype, "norm")
    y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(self.heads, self.head_dim, dtype=self.dtype,
                                attention=self.attention,
                                name=f"transformer_blocks_{i}")(y, context_BxSxD)
    y = proj(c, "proj_out")(y.reshape(b, h, w, inner))
    return x_BxHxWxC.astype(self.dtype) + y


# ---------------------------------------------------------------------------
# diffusers state dict -> Flax params.

# Module lists in diffusers' models; their index joins the name with "_" in our Flax paths.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
          "transformer_blocks", "to_out", "net")
_LIST_ITEM = re.compile(rf"({'|'.join(_LISTS)})_(\d+)")


def torch_key(flax_path: tuple[str, ...]) -> str:
  """("mid_block", "attentions_0", "to_out_0", "kernel") -> "mid_block.attentions.0.to_out.0.weight"
  (a "kernel" or "scale" is a "weight")."""
  *modules, leaf = flax_path
  items = [_LIST_ITEM.fullmatch(m) for m in modules]
  names = [f"{i[1]}.{i[2]}" if i else m for m, i in zip(modules, items)]
  return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Conv HWIO -> OIHW, Dense (in, out) -> (out, in); vectors unchanged."""
  if len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  return tuple(reversed(flax_shape))


def to_flax(array: np.ndarray) -> np.ndarray:
  """A PyTorch weight -> float32 in Flax layout (the inverse of `torch_shape`)."""
  array = np.asarray(array, dtype=np.float32)
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def params_from_torch(state_dict: Mapping[str, np.ndarray], param_shapes: Mapping[str, Any],
                      source: str, ignored_prefixes: tuple[str, ...] = (),
                      hint: str | None = None) -> dict[str, Any]:
  """Fills the Flax params tree `param_shapes` (from `jax.eval_shape(model.init, ...)`)
  from a diffusers state dict, strictly: every key the model needs, no key it does not
  (but those under `ignored_prefixes`), every shape right. Else one ValueError naming
  the first few keys of each kind and `source`, what the file should be."""
  flat = {path: tuple(leaf.shape) for path, leaf in leaves(param_shapes)}
  expected = {torch_key(path): (path, torch_shape(shape)) for path, shape in flat.items()}
  if len(expected) != len(flat):
    raise AssertionError("two Flax parameters map to the same PyTorch key")  # a naming bug here
  given = {k: v for k, v in state_dict.items() if not k.startswith(ignored_prefixes)}
  missing = [k for k in expected if k not in given]
  unexpected = sorted(k for k in given if k not in expected)
  differ = [f"{k} {tuple(np.shape(given[k]))} vs {expected[k][1]}" for k in expected
            if k in given and tuple(np.shape(given[k])) != expected[k][1]]
  not_float = [k for k in expected if k in given
               and not np.issubdtype(np.asarray(given[k]).dtype, np.floating)]
  if missing or unexpected or differ or not_float:
    parts = []
    if missing:
      parts.append(f"missing ({len(missing)}): {listed(missing, MAX_LISTED)}")
    if unexpected:
      parts.append(f"unexpected ({len(unexpected)}): {listed(unexpected, MAX_LISTED)}")
    if differ:
      parts.append(f"wrong shape ({len(differ)}; file vs model): {listed(differ, MAX_LISTED)}")
    if not_float:
      parts.append(f"not floating point ({len(not_float)}): {listed(not_float, MAX_LISTED)}")
    raise ValueError(f"the state dict does not fit the model; it should be {source}: "
                     + "; ".join(parts) + (f". {hint}" if hint else "."))
  params: dict[str, Any] = {}
  for key, (path, _) in expected.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = to_flax(given[key])
  return params


def leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  """(path, leaf) for each leaf of a nested dict, depth first."""
  for name, child in tree.items():
    if isinstance(child, Mapping):
      yield from leaves(child, path + (name,))
    else:
      yield path + (name,), child
