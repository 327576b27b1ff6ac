"""Our Flax UNet and VAE decoder against diffusers' PyTorch ones: tiny random models,
saved as diffusers saves them, converted the way the loader reads them (safetensors
as numpy, config.json as a dict, no torch), run on the same inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="the parity tests build diffusers models")
from safetensors.numpy import load_file  # noqa: E402

from caedfkd_jax.diffusion import unet as unet_lib  # noqa: E402
from caedfkd_jax.diffusion import vae as vae_lib  # noqa: E402

TOL = 1e-4
UNET_KW = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
               layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
               attention_head_dim=4, norm_num_groups=8)
VAE_KW = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
              norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny models: threads only contend (with each other and the CPU's other jobs)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _jit(fn):
  """jit without XLA's backend optimisations: these tests run each function once or twice,
  and compiling dominates."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _saved(model, directory, seed):
  """Perturb every weight (zero-initialised ones too), save as diffusers does, read back
  as our loader will: (state dict of numpy arrays, config dict)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=generator))
  model.eval().save_pretrained(directory, safe_serialization=True)
  state_dict = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
  return state_dict, json.loads((directory / "config.json").read_text())


def _compare(ours, theirs_nchw, name):
  theirs = theirs_nchw.detach().numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape
  diff = np.abs(ours - theirs).max()
  rel = diff / np.abs(theirs).max()
  print(f"{name}: max abs diff {diff:.2e}, relative to max |output| {rel:.2e}")
  assert diff < TOL, (name, diff, rel)
  return diff


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**UNET_KW)
  state_dict, config = _saved(model, tmp_path_factory.mktemp("unet"), seed=1)
  return model, state_dict, config


def _run_unet(model, state_dict, config, sample, timesteps, context, dtype=jnp.float32):
  cfg = unet_lib.UNetConfig.from_diffusers(config)
  params = unet_lib.params_from_state_dict(state_dict, cfg)
  apply = _jit(unet_lib.UNet(cfg, dtype=dtype).apply)
  return apply({"params": params}, sample, timesteps, context)


def _inputs(rng, batch, h, w, tokens=5):
  sample = rng.normal(size=(batch, h, w, 4)).astype(np.float32)
  context = rng.normal(size=(batch, tokens, 32)).astype(np.float32)
  return sample, context


def _torch_unet(model, sample, timesteps, context):
  with torch.no_grad():
    return model(_nchw(sample), timesteps, torch.from_numpy(context)).sample


def test_unet_matches_diffusers_scalar_timestep(tiny_unet):
  model, state_dict, config = tiny_unet
  sample, context = _inputs(np.random.default_rng(0), 2, 8, 8)
  ours = _run_unet(model, state_dict, config, sample, 981, context)
  _compare(ours, _torch_unet(model, sample, 981, context), "unet, scalar t")


def test_unet_matches_diffusers_per_example_timesteps_odd_size(tiny_unet):
  """A [B] timestep vector, and an odd latent size (the up path resizes to the skip's size)."""
  model, state_dict, config = tiny_unet
  sample, context = _inputs(np.random.default_rng(1), 3, 7, 9)
  t = np.array([1, 500, 999])
  ours = _run_unet(model, state_dict, config, sample, t.astype(np.int32), context)
  _compare(ours, _torch_unet(model, sample, torch.from_numpy(t), context), "unet, t vector, 7x9")


def test_unet_linear_projection_per_block_heads(tmp_path):
  """SD v2's variant: Linear proj_in/proj_out, a head count per block, 2 transformer layers."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**{
      **UNET_KW, "use_linear_projection": True, "attention_head_dim": (2, 4),
      "transformer_layers_per_block": 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2})
  state_dict, config = _saved(model, tmp_path, seed=2)
  assert state_dict["mid_block.attentions.0.proj_in.weight"].ndim == 2
  sample, context = _inputs(np.random.default_rng(2), 2, 8, 8)
  ours = _run_unet(model, state_dict, config, sample, 37.5, context)
  _compare(ours, _torch_unet(model, sample, 37.5, context), "unet, linear projection")


def test_unet_bfloat16_close_to_float32(tiny_unet):
  model, state_dict, config = tiny_unet
  sample, context = _inputs(np.random.default_rng(3), 2, 8, 8)
  ours = np.asarray(_run_unet(model, state_dict, config, sample, 500, context, jnp.bfloat16))
  reference = _torch_unet(model, sample, 500, context).numpy().transpose(0, 2, 3, 1)
  assert ours.dtype == np.float32 and np.isfinite(ours).all()
  rel = np.abs(ours - reference).max() / np.abs(reference).max()
  print(f"unet bfloat16: max abs diff relative to max |output| {rel:.2e}")
  assert rel < 0.1


def test_vae_decoder_matches_diffusers(tmp_path):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**VAE_KW)
  state_dict, config = _saved(model, tmp_path, seed=3)
  assert any(k.startswith("encoder.") for k in state_dict)  # skipped by the converter
  cfg = vae_lib.VAEDecoderConfig.from_diffusers(config)
  params = vae_lib.params_from_state_dict(state_dict, cfg)
  latents = np.random.default_rng(4).normal(size=(2, 6, 5, 4)).astype(np.float32)
  ours = _jit(vae_lib.VAEDecoder(cfg).apply)({"params": params}, latents)
  with torch.no_grad():
    theirs = model.decode(_nchw(latents)).sample
  assert ours.shape == (2, 12, 10, 3)
  _compare(ours, theirs, "vae decoder")


# Stable Diffusion v1.5's unet/config.json and vae/config.json (as on the Hub).
SD15_UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
             "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
             "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "layers_per_block": 2,
            "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.mark.parametrize("lib, config, cls, skipped, count", [
    (unet_lib, SD15_UNET, "UNet2DConditionModel", (), 859_520_964),
    (vae_lib, SD15_VAE, "AutoencoderKL", ("encoder.", "quant_conv."), 49_490_199)],
    ids=["unet", "vae"])
def test_full_size_sd15_layout_is_diffusers(lib, config, cls, skipped, count):
  """At SD v1.5's size (diffusers' model on the meta device, no weights): the same keys
  and shapes as ours."""
  from caedfkd_jax.diffusion import layers
  with torch.device("meta"):
    model = getattr(diffusers, cls)(**{k: v for k, v in config.items() if k[0] != "_"})
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(skipped)}
  config_class = unet_lib.UNetConfig if lib is unet_lib else vae_lib.VAEDecoderConfig
  cfg = config_class.from_diffusers(config)
  ours = {layers.torch_key(path): layers.torch_shape(leaf.shape)
          for path, leaf in layers.leaves(lib.param_shapes(cfg))}
  assert ours == theirs
  assert sum(int(np.prod(shape)) for shape in ours.values()) == count


# --- Converters and configs refuse what does not fit, naming it.

def _refusal(state_dict, config):
  with pytest.raises(ValueError) as error:
    unet_lib.params_from_state_dict(state_dict, unet_lib.UNetConfig.from_diffusers(config))
  message = str(error.value)
  assert "UNet2DConditionModel" in message
  return message


def test_unet_converter_names_missing_unexpected_and_misshapen_keys(tiny_unet):
  _, state_dict, config = tiny_unet
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  missing = {k: v for k, v in state_dict.items() if k != key}
  assert "missing (1)" in _refusal(missing, config) and key in _refusal(missing, config)
  unexpected = {**state_dict, "down_blocks.0.extra.weight": np.zeros(3, np.float32)}
  message = _refusal(unexpected, config)
  assert "unexpected (1)" in message and "down_blocks.0.extra.weight" in message
  misshapen = {**state_dict, key: state_dict[key][:, :7]}
  message = _refusal(misshapen, config)
  assert "wrong shape (1" in message and f"{key} (32, 7) vs (32, 32)" in message


def test_unet_converter_refuses_wrong_projection_layout(tiny_unet):
  """An SD v1 (conv projection) file under a use_linear_projection config: shapes differ."""
  _, state_dict, config = tiny_unet
  message = _refusal(state_dict, {**config, "use_linear_projection": True})
  assert "proj_in.weight (32, 32, 1, 1) vs (32, 32)" in message


def test_vae_converter_strict_and_names_old_attention_layout():
  cfg = vae_lib.VAEDecoderConfig.from_diffusers(VAE_KW)
  shapes = vae_lib.param_shapes(cfg)
  from caedfkd_jax.diffusion import layers
  flat = {layers.torch_key(p): np.zeros(layers.torch_shape(s.shape), np.float16)
          for p, s in layers.leaves(shapes)}
  ignored = {"encoder.conv_in.weight": np.zeros(1), "quant_conv.bias": np.zeros(8)}
  params = vae_lib.params_from_state_dict({**flat, **ignored}, cfg)
  assert params["decoder"]["conv_in"]["kernel"].dtype == np.float32
  old = {k.replace("to_q", "query"): v for k, v in flat.items()}
  with pytest.raises(ValueError, match=r"(?s)AutoencoderKL.*attentions\.0\.query\.weight.*"
                     r"before 0\.14"):
    vae_lib.params_from_state_dict(old, cfg)


def test_unet_config_quirks_and_refusals():
  sd_v1 = SD15_UNET
  cfg = unet_lib.UNetConfig.from_diffusers(sd_v1)
  assert cfg == unet_lib.UNetConfig()  # SD v1.x is the default
  assert cfg.num_attention_heads == (8, 8, 8, 8)  # attention_head_dim is the head count
  sd_v2 = {**sd_v1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
           "use_linear_projection": True}
  assert unet_lib.UNetConfig.from_diffusers(sd_v2).num_attention_heads == (5, 10, 20, 20)
  explicit = {**sd_v1, "num_attention_heads": 4}
  assert unet_lib.UNetConfig.from_diffusers(explicit).num_attention_heads == (4,) * 4
  bad = {**sd_v1, "class_embed_type": "timestep", "mid_block_type": "UNetMidBlock2D",
         "down_block_types": ["AttnDownBlock2D"] * 4, "flavour": 1}
  with pytest.raises(ValueError) as error:
    unet_lib.UNetConfig.from_diffusers(bad)
  for name in ("class_embed_type='timestep'", "mid_block_type='UNetMidBlock2D'",
               "AttnDownBlock2D", "unknown option flavour=1"):
    assert name in str(error.value)
  with pytest.raises(ValueError, match="AutoencoderKL"):
    unet_lib.UNetConfig.from_diffusers({"_class_name": "AutoencoderKL"})
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    vae_lib.VAEDecoderConfig.from_diffusers({**VAE_KW, "act_fn": "gelu"})
