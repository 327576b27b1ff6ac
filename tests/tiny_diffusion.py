"""A tiny random Stable Diffusion folder in diffusers' layout, made offline by the tests.

Built with PyTorch diffusers and transformers (the test extra) and saved as
safetensors, so that `caedfkd convert-diffusion` reads it exactly as it would read
SD v1.5: scheduler/, tokenizer/, text_encoder/, unet/, vae/. Latents of 8x8 decode to
16x16 images. Every parameter is perturbed so no layer is trivially zero.
"""

import json
import pathlib

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_LENGTH = 16
CROSS_DIM = 32


def write_tokenizer(directory: pathlib.Path) -> int:
  """A character-level CLIP BPE vocabulary (no merges); returns its size."""
  tokens = (["<|startoftext|>", "<|endoftext|>"] + list(LETTERS) + [c + "</w>" for c in LETTERS])
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text("#version: 0.2\n")
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}))
  return len(tokens)


def _perturb(model, torch, scale: float = 0.1):
  with torch.no_grad():
    for param in model.parameters():
      param.add_(scale * torch.randn_like(param))
  return model.eval()


def write_sd_folder(root: pathlib.Path, seed: int = 0) -> dict:
  """Writes the folder; returns the torch modules {"text_encoder", "unet", "vae"} for parity."""
  import diffusers
  import torch
  import transformers
  from caedfkd_jax.diffusion import scheduler
  torch.manual_seed(seed)
  root = pathlib.Path(root)
  vocab = write_tokenizer(root / "tokenizer")
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
      pad_token_id=1))
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
      attention_head_dim=4, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  modules = {"text_encoder": _perturb(text, torch), "unet": _perturb(unet, torch, 0.05),
             "vae": _perturb(vae, torch, 0.05)}
  for name, module in modules.items():
    module.save_pretrained(root / name, safe_serialization=True)
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "PNDMScheduler", **scheduler.SD_V1, "skip_prk_steps": True}))
  return modules
