"""Stable Diffusion v1.x's conditional UNet (diffusers' `UNet2DConditionModel`), NHWC.

`UNetConfig.from_diffusers` reads `unet/config.json` and refuses, by name, any option
this small reimplementation does not have; `params_from_state_dict` fills the Flax
params from `unet/diffusion_pytorch_model.safetensors` (read as numpy, no torch).
SD v2's linear projections, per-block head counts and several transformer layers per
block are supported too; SDXL's added embeddings and the like are not.
"""

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.diffusion import layers
from caedfkd_jax.diffusion.layers import conv, group_norm

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"

# The config.json fields we read, at diffusers' defaults (absent fields take these).
_READ = {"in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
         "layers_per_block": 2,
         "down_block_types": (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN),
         "up_block_types": (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP),
         "attention_head_dim": 8, "num_attention_heads": None, "cross_attention_dim": 1280,
         "transformer_layers_per_block": 1, "norm_num_groups": 32, "norm_eps": 1e-5,
         "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False}
# Options we have only at the values listed (the first is diffusers' default).
_FIXED = {"center_input_sample": (False,), "mid_block_type": (MID,),
          "only_cross_attention": (False,), "downsample_padding": (1,),
          "mid_block_scale_factor": (1,), "act_fn": ("silu", "swish"),
          "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
          "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
          "class_embed_type": (None,), "addition_embed_type": (None,),
          "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
          "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
          "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",),
          "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
          "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,),
          "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
          "attention_type": ("default",), "class_embeddings_concat": (False,),
          "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,)}
# Fields that do not change the inference function: the training-time size and dropout,
# the fp16 upcast of attention (our softmax is always float32), the unused SDXL head count.
_IGNORED = ("sample_size", "dropout", "upcast_attention", "addition_embed_type_num_heads")
_SOURCE = ("a diffusers UNet2DConditionModel state dict (unet/diffusion_pytorch_model"
           ".safetensors) saved with the config.json the UNetConfig was read from")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """What the UNet's shape depends on. Defaults are Stable Diffusion v1.x's.

  `num_attention_heads` is the head count of each down block (the up blocks take them
  reversed, the mid block the last): what SD v1's config.json calls `attention_head_dim`.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
  up_block_types: tuple[str, ...] = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: int = 768
  transformer_layers_per_block: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  use_linear_projection: bool = False

  def __post_init__(self):  # Tuples, also when built from JSON lists: the config is hashed.
    for name in ("block_out_channels", "down_block_types", "up_block_types", "num_attention_heads"):
      object.__setattr__(self, name, tuple(getattr(self, name)))

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """From diffusers' `unet/config.json` (a dict). Raises ValueError naming every option
    or value this UNet does not implement."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise ValueError(f"config _class_name={config['_class_name']!r}: expected diffusers' "
                       "UNet2DConditionModel config (Stable Diffusion's unet/config.json).")
    c = {**_READ, **config}
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in _READ and k not in _FIXED and k not in _IGNORED)
    problems = [f"unknown option {k}={config[k]!r}" for k in unknown]
    for key, allowed in _FIXED.items():
      value = config.get(key, allowed[0])
      per_block = key == "only_cross_attention" and isinstance(value, (list, tuple))
      if not all(_is_one_of(v, allowed) for v in (value if per_block else [value])):
        problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, allowed))})")
    n = len(c["block_out_channels"])
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    if len(down) != n or len(up) != n:
      problems.append(f"{n} block_out_channels but {len(down)} down_block_types and "
                      f"{len(up)} up_block_types")
    bad_types = [t for t in down if t not in (CROSS_ATTN_DOWN, DOWN)]
    bad_types += [t for t in up if t not in (CROSS_ATTN_UP, UP)]
    if bad_types:
      problems.append(f"block types {bad_types} (supported: {CROSS_ATTN_DOWN}, {DOWN}, "
                      f"{CROSS_ATTN_UP}, {UP})")
    for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                "norm_num_groups"):
      if not isinstance(c[key], int) or isinstance(c[key], bool):
        problems.append(f"{key}={c[key]!r} (supported: one int for all blocks)")
    # diffusers' naming quirk: `attention_head_dim` holds the head count unless
    # `num_attention_heads` is given (UNet2DConditionModel takes `num_attention_heads or
    # attention_head_dim` as the heads and derives the head size as channels // heads).
    heads = c["num_attention_heads"] or c["attention_head_dim"]
    heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
    if len(heads) != n or not all(isinstance(h, int) and h > 0 for h in heads):
      problems.append(f"attention heads {heads!r}: need a positive int or one per block ({n})")
    if problems:
      raise ValueError("UNet config not supported (this UNet implements Stable Diffusion "
                       "v1.x/v2.x's UNet2DConditionModel): " + "; ".join(problems) + ".")
    return cls(in_channels=c["in_channels"], out_channels=c["out_channels"],
               block_out_channels=tuple(c["block_out_channels"]),
               layers_per_block=c["layers_per_block"], down_block_types=down,
               up_block_types=up, num_attention_heads=heads,
               cross_attention_dim=c["cross_attention_dim"],
               transformer_layers_per_block=c["transformer_layers_per_block"],
               norm_num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
               flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=c["freq_shift"],
               use_linear_projection=bool(c["use_linear_projection"]))


def _is_one_of(value: Any, allowed: tuple) -> bool:
  """`value in allowed`, but None and booleans only match themselves (False != 0 here)."""
  return any(value is a if a is None or isinstance(a, bool)
             else value == a and not isinstance(value, bool) for a in allowed)


class _Blocks(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  out_channels: int
  heads: int | None  # None: no transformers (DownBlock2D / UpBlock2D).
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str | None = None   # layers.Attention's implementation.

  def resnet(self, name: str) -> layers.ResnetBlock2D:
    c = self.config
    return layers.ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps,
                                self.dtype, name=name)

  def transformer(self, name: str) -> layers.Transformer2DModel:
    c = self.config
    return layers.Transformer2DModel(self.heads, self.out_channels // self.heads,
                                     c.transformer_layers_per_block, c.norm_num_groups,
                                     c.use_linear_projection, self.dtype, self.attention,
                                     name=name)


class DownBlock(_Blocks):
  """CrossAttnDownBlock2D (`heads` given) or DownBlock2D: resnet (+ transformer) per layer,
  then a stride-2 conv; returns the output and every intermediate for the skips."""
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, list[jax.Array]]:
    outputs = []
    for j in range(self.config.layers_per_block):
      x = self.resnet(f"resnets_{j}")(x, temb)
      if self.heads:
        x = self.transformer(f"attentions_{j}")(x, context)
      outputs.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.dtype, name="downsamplers_0")(x)
      outputs.append(x)
    return x, outputs


class MidBlock(_Blocks):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    x = self.resnet("resnets_0")(x, temb)
    x = self.transformer("attentions_0")(x, context)
    return self.resnet("resnets_1")(x, temb)


class UpBlock(_Blocks):
  """CrossAttnUpBlock2D or UpBlock2D: per layer, concatenate the next skip (last first),
  resnet (+ transformer); then upsample to `size` (the next skip's H, W)."""

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array, size: tuple[int, int] | None) -> jax.Array:
    for j, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = self.resnet(f"resnets_{j}")(x, temb)
      if self.heads:
        x = self.transformer(f"attentions_{j}")(x, context)
    if size is not None:
      x = layers.Upsample2D(self.dtype, name="upsamplers_0")(x, size)
    return x


class UNet(nn.Module):
  """The noise-prediction UNet: (noisy latents, timestep, text states) -> predicted noise.

  sample [B, h, w, C_in] (NHWC); timesteps a scalar or [B], int or float; encoder_hidden_states
  [B, L, cross_attention_dim]. Returns [B, h, w, C_out] in float32 whatever `dtype` computes in.
  Any h, w work (odd sizes upsample to the skip's size, as diffusers does). `attention`:
  None (XLA's, any platform) or "cudnn" (fused flash attention: GPUs, 16-bit `dtype`).
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
               encoder_hidden_states: jax.Array) -> jax.Array:
    c = self.config
    channels = c.block_out_channels
    n = len(channels)
    t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t_emb = layers.timestep_embedding(t, channels[0], c.flip_sin_to_cos, c.freq_shift)
    temb = layers.TimestepEmbedding(4 * channels[0], self.dtype, name="time_embedding")(t_emb)
    context = encoder_hidden_states.astype(self.dtype)

    x = conv(channels[0], 3, self.dtype, "conv_in")(sample.astype(self.dtype))
    skips = [x]
    for i, kind in enumerate(c.down_block_types):
      heads = c.num_attention_heads[i] if kind == CROSS_ATTN_DOWN else None
      x, outputs = DownBlock(channels[i], heads, c, self.dtype, self.attention,
                             add_downsample=i < n - 1, name=f"down_blocks_{i}")(x, temb, context)
      skips += outputs
    x = MidBlock(channels[-1], c.num_attention_heads[-1], c, self.dtype, self.attention,
                 name="mid_block")(x, temb, context)
    heads_up = c.num_attention_heads[::-1]
    for i, kind in enumerate(c.up_block_types):
      k = c.layers_per_block + 1
      skips, block_skips = skips[:-k], skips[-k:]
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = UpBlock(channels[::-1][i], heads_up[i] if kind == CROSS_ATTN_UP else None, c,
                  self.dtype, self.attention, name=f"up_blocks_{i}")(x, block_skips, temb,
                                                                    context, size)

    x = nn.silu(group_norm(x, c.norm_num_groups, c.norm_eps, self.dtype, "conv_norm_out"))
    return conv(c.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


@functools.lru_cache(maxsize=4)
def param_shapes(config: UNetConfig) -> dict[str, Any]:
  """The UNet's params tree as ShapeDtypeStructs (traced, nothing computed; cached, so
  do not modify it)."""
  size = 2 ** (len(config.block_out_channels) - 1)
  sample = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((), jnp.int32)
  return jax.eval_shape(UNet(config).init, jax.random.key(0), sample, t, context)["params"]


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig
                           ) -> dict[str, Any]:
  """diffusers UNet2DConditionModel weights (numpy, any float dtype) -> the UNet's params
  (float32), for `UNet(config).apply({"params": params}, ...)`. Strict: raises ValueError
  naming missing, unexpected and wrongly-shaped keys."""
  return layers.params_from_torch(state_dict, param_shapes(config), _SOURCE)
