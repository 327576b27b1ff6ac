"""Stable Diffusion's VAE decoder (diffusers' `AutoencoderKL.decode`), NHWC.

Only the decoder half: DiffDFKD decodes latents to images and never encodes, so the
converter skips the file's `encoder.*` and `quant_conv.*` weights.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.diffusion import layers
from caedfkd_jax.diffusion.layers import conv, group_norm

UP_DECODER = "UpDecoderBlock2D"
_EPS = 1e-6  # diffusers' Decoder hard-codes its GroupNorm epsilon.
# The config.json fields we read, at AutoencoderKL's defaults (absent fields take these).
_READ = {"latent_channels": 4, "out_channels": 3, "block_out_channels": (64,),
         "layers_per_block": 1, "norm_num_groups": 32, "scaling_factor": 0.18215,
         "shift_factor": None, "mid_block_add_attention": True, "use_post_quant_conv": True,
         "act_fn": "silu", "up_block_types": (UP_DECODER,)}
# Encoder-side or pipeline-side fields: they do not change the decoder.
_IGNORED = ("in_channels", "down_block_types", "sample_size", "force_upcast",
            "use_quant_conv", "latents_mean", "latents_std")
_SOURCE = ("a diffusers AutoencoderKL state dict (vae/diffusion_pytorch_model.safetensors) "
           "saved with the config.json the VAEDecoderConfig was read from")
_OLD_ATTENTION = (".query.", ".key.", ".value.", ".proj_attn.")
_OLD_HINT = ("The file names the VAE attention query/key/value/proj_attn, the layout of "
             "diffusers before 0.14; only the current to_q/to_k/to_v/to_out.0 is supported: "
             "re-save it with a current diffusers (AutoencoderKL.from_pretrained(...)"
             ".save_pretrained(...)).")


@dataclasses.dataclass(frozen=True)
class VAEDecoderConfig:
  """What the decoder's shape depends on; defaults are Stable Diffusion v1.x's VAE.

  `scaling_factor` (and `shift_factor`, None for SD) are the caller's: decode
  `latents / scaling_factor + (shift_factor or 0)`."""
  latent_channels: int = 4
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  mid_block_add_attention: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):  # A tuple, also when built from a JSON list.
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEDecoderConfig":
    """From diffusers' `vae/config.json` (a dict); ValueError naming what is unsupported."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise ValueError(f"config _class_name={config['_class_name']!r}: expected diffusers' "
                       "AutoencoderKL config (Stable Diffusion's vae/config.json).")
    c = {**_READ, **config}
    problems = [f"unknown option {k}={v!r}" for k, v in sorted(config.items())
                if not k.startswith("_") and k not in _READ and k not in _IGNORED]
    if c["act_fn"] not in ("silu", "swish"):
      problems.append(f"act_fn={c['act_fn']!r} (supported: 'silu')")
    n = len(c["block_out_channels"])
    if tuple(c["up_block_types"]) != (UP_DECODER,) * n:
      problems.append(f"up_block_types={c['up_block_types']!r} (supported: {n} x {UP_DECODER!r}, "
                      "one per block_out_channels)")
    if problems:
      raise ValueError("VAE config not supported (this decoder implements Stable Diffusion's "
                       "AutoencoderKL): " + "; ".join(problems) + ".")
    return cls(latent_channels=c["latent_channels"], out_channels=c["out_channels"],
               block_out_channels=tuple(c["block_out_channels"]),
               layers_per_block=c["layers_per_block"], norm_num_groups=c["norm_num_groups"],
               scaling_factor=float(c["scaling_factor"]), shift_factor=c["shift_factor"],
               mid_block_add_attention=bool(c["mid_block_add_attention"]),
               use_post_quant_conv=bool(c["use_post_quant_conv"]))


class MidBlock(nn.Module):
  """UNetMidBlock2D as the VAE has it: resnet, single-head attention, resnet (no time)."""
  config: VAEDecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups, channels = self.config.norm_num_groups, x.shape[-1]
    x = layers.ResnetBlock2D(channels, groups, _EPS, self.dtype, name="resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = layers.VAEAttention(groups, _EPS, self.dtype, name="attentions_0")(x)
    return layers.ResnetBlock2D(channels, groups, _EPS, self.dtype, name="resnets_1")(x)


class UpBlock(nn.Module):
  """UpDecoderBlock2D: layers_per_block + 1 resnets, then (but in the last block) x2 upsampling."""
  out_channels: int
  add_upsample: bool
  config: VAEDecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.config.layers_per_block + 1):
      x = layers.ResnetBlock2D(self.out_channels, self.config.norm_num_groups, _EPS, self.dtype,
                               name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.dtype, name="upsamplers_0")(x)
    return x


class Decoder(nn.Module):
  """conv_in, mid block, up blocks (widest first), GroupNorm, SiLU, conv_out."""
  config: VAEDecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    x = conv(c.block_out_channels[-1], 3, self.dtype, "conv_in")(z)
    x = MidBlock(c, self.dtype, name="mid_block")(x)
    n = len(c.block_out_channels)
    for i, channels in enumerate(reversed(c.block_out_channels)):
      x = UpBlock(channels, i < n - 1, c, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(group_norm(x, c.norm_num_groups, _EPS, self.dtype, "conv_norm_out"))
    return conv(c.out_channels, 3, self.dtype, "conv_out")(x)


class VAEDecoder(nn.Module):
  """Latents -> images: post_quant_conv, then the decoder.

  latents [B, h, w, latent_channels] NHWC, already divided by `config.scaling_factor`
  (the caller's job, as in diffusers' pipelines: `vae.decode(latents / scaling_factor)`).
  Returns [B, 8h, 8w, 3] (for SD's 4 blocks) in float32, in the decoder's raw range,
  about [-1, 1]: map to pixels with (x + 1) / 2, clipped.
  """
  config: VAEDecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = conv(self.config.latent_channels, 1, self.dtype, "post_quant_conv")(z)
    return Decoder(self.config, self.dtype, name="decoder")(z).astype(jnp.float32)


def param_shapes(config: VAEDecoderConfig) -> dict[str, Any]:
  """The decoder's params tree as ShapeDtypeStructs (traced, nothing computed)."""
  latents = jax.ShapeDtypeStruct((1, 1, 1, config.latent_channels), jnp.float32)
  return jax.eval_shape(VAEDecoder(config).init, jax.random.key(0), latents)["params"]


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: VAEDecoderConfig
                           ) -> dict[str, Any]:
  """diffusers AutoencoderKL weights (numpy) -> the decoder's params (float32), for
  `VAEDecoder(config).apply({"params": params}, latents)`. `encoder.*` and `quant_conv.*`
  are skipped; anything else that does not fit raises ValueError naming the keys."""
  old = any(part in key for key in state_dict for part in _OLD_ATTENTION)
  return layers.params_from_torch(state_dict, param_shapes(config), _SOURCE,
                                  ignored_prefixes=("encoder.", "quant_conv."),
                                  hint=_OLD_HINT if old else None)
