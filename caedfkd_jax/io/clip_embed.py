"""CLIP text embeddings for `caedfkd embed --encoder clip`: the EOS token's state, projected.

Computes transformers' `CLIPTextModelWithProjection(input_ids).text_embeds` (the same numbers as
`CLIPModel.get_text_features`) with the project's Flax `CLIPTextEncoder`
(`caedfkd_jax/models/clip_text.py`) from weights read as numpy with safetensors: torch plays
no part. transformers does: its config classes read config.json (filling omitted fields with its
defaults) and its CLIPTokenizer tokenises.

Pooling follows transformers' `CLIPTextModel.forward`: the final-LayerNorm state at the
end-of-text token. With a legacy config whose `eos_token_id` is 2 (OpenAI's CLIP checkpoints,
saved before transformers PR #24773) that token is found as the argmax of the input ids
(`<|endoftext|>` is the largest id in CLIP's vocabulary); otherwise it is the first position of
`eos_token_id` (padding may repeat it). Under the causal mask that state sees only the tokens up
to it, so the padding after it changes nothing and no attention mask is needed. The bias-free
`text_projection` then maps it into CLIP's joint image-text space.
"""

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.io import class_names
from caedfkd_jax.models import clip_text

WEIGHTS_FILE = "model.safetensors"
PROJECTION_KEY = "text_projection.weight"
TEXT_PREFIX = "text_model."
LEGACY_EOS_TOKEN_ID = 2
POOLING = "EOS token + text projection"
_MODEL_TYPES = ("clip", "clip_text_model")  # CLIPModel, CLIPTextModel(WithProjection)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B, L] ids -> [B] index of the end-of-text token, by transformers' rule (module docstring)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbedder(nn.Module):
  """input_ids [B, L] -> text_embeds [B, projection_dim] float32, as transformers'
  `CLIPTextModelWithProjection`. Params: {"text_model": CLIPTextEncoder's, "text_projection":
  {"kernel": [hidden, projection_dim]}}."""
  config: clip_text.CLIPTextConfig
  projection_dim: int
  eos_token_id: int

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    hidden_BxLxD = clip_text.CLIPTextEncoder(self.config, name="text_model")(input_ids)
    rows_B = jnp.arange(input_ids.shape[0])
    pooled_BxD = hidden_BxLxD[rows_B, eos_positions(input_ids, self.eos_token_id)]
    return nn.Dense(self.projection_dim, use_bias=False, name="text_projection")(pooled_BxD)


def read_config(model_dir: str) -> tuple[clip_text.CLIPTextConfig, int]:
  """A CLIP folder's config.json -> (text encoder config, eos_token_id)."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP folder {model_dir} has no config.json; --model takes a local "
                            "Hugging Face CLIPModel or CLIPTextModelWithProjection folder.")
  with open(path, encoding="utf-8") as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}).") from None
  model_type = raw.get("model_type") if isinstance(raw, dict) else None
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"{path} has model_type {model_type!r}, not a CLIP model's "
                     f"({' or '.join(map(repr, _MODEL_TYPES))}); --encoder clip needs a Hugging "
                     "Face CLIPModel or CLIPTextModelWithProjection folder.")
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"--encoder clip reads config.json and tokenises with transformers ({e}); "
                      "run pip install 'caedfkd-jax[text]'.") from e
  if model_type == "clip":
    text_config = transformers.CLIPConfig.from_dict(raw).text_config
  else:
    text_config = transformers.CLIPTextConfig.from_dict(raw)
  if text_config.eos_token_id is None:
    raise ValueError(f"{path} sets no eos_token_id for the text model; the pooled token cannot "
                     "be found.")
  return (clip_text.CLIPTextConfig.from_transformers(text_config.to_dict()),
          int(text_config.eos_token_id))


def weights_path(model_dir: str) -> str:
  path = os.path.join(model_dir, WEIGHTS_FILE)
  if not os.path.isfile(path):
    found = sorted(os.listdir(model_dir))
    raise FileNotFoundError(
        f"CLIP folder {model_dir} has no {WEIGHTS_FILE} (it holds {class_names.shown(found, 6) or 'nothing'}); pickled "
        "pytorch_model.bin files and sharded saves are not read: re-save the model in one file "
        "with save_pretrained(DIR, safe_serialization=True, max_shard_size='100GB').")
  return path


def read_params(model_dir: str, config: clip_text.CLIPTextConfig) -> dict[str, Any]:
  """`CLIPTextEmbedder` params from the folder's model.safetensors; only text tensors are read."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = weights_path(model_dir)
  with safe_open(path, framework="numpy") as f:
    keys = list(f.keys())
    if PROJECTION_KEY not in keys:
      raise ValueError(
          f"{path} has no {PROJECTION_KEY}: it is not a CLIPModel or CLIPTextModelWithProjection "
          "save (a plain CLIPTextModel, such as Stable Diffusion's text_encoder/, has no "
          "projection into CLIP's image-text space); give a folder that has one.")
    projection_PxD = np.asarray(f.get_tensor(PROJECTION_KEY), np.float32)
    state = {k: f.get_tensor(k) for k in keys if k.startswith(TEXT_PREFIX)}
  if projection_PxD.ndim != 2 or projection_PxD.shape[1] != config.hidden_size:
    raise ValueError(f"{path}: {PROJECTION_KEY} has shape {projection_PxD.shape}, expected "
                     f"(projection_dim, {config.hidden_size}).")
  try:
    text_params = clip_text.params_from_state_dict(state, config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return {"text_model": text_params,
          "text_projection": {"kernel": np.ascontiguousarray(projection_PxD.T)}}


def load(model_dir: str) -> tuple[CLIPTextEmbedder, dict[str, Any]]:
  """A local CLIP folder -> (module, params) for `module.apply({"params": params}, input_ids)`."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"CLIP folder {model_dir} does not exist; --model takes a local "
                            "Hugging Face CLIPModel or CLIPTextModelWithProjection folder "
                            "(config.json, model.safetensors, tokenizer files).")
  config, eos_token_id = read_config(model_dir)
  params = read_params(model_dir, config)
  projection_dim = params["text_projection"]["kernel"].shape[1]
  return CLIPTextEmbedder(config, projection_dim, eos_token_id), params


def encode(texts: Sequence[str], model_dir: str, batch_size: int = 64,
           progress: bool = False) -> np.ndarray:
  """CLIP text embeddings (N x projection_dim float32, not normalised) of `texts`.

  Prompts are tokenised as `clip_text.tokenize` does (padded to the tokenizer's
  model_max_length, truncated with the end token kept).
  """
  if not texts:
    raise ValueError("encode() needs at least one text.")
  if batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
  module, params = load(model_dir)
  ids_NxL = clip_text.tokenize(model_dir, list(texts))
  if module.eos_token_id != LEGACY_EOS_TOKEN_ID:
    lacking = np.flatnonzero(~(ids_NxL == module.eos_token_id).any(axis=1))
    if lacking.size:
      raise ValueError(
          f"The tokenizer in {model_dir} gives prompts without the config's eos_token_id "
          f"{module.eos_token_id} (e.g. {texts[lacking[0]]!r}): tokenizer and config.json "
          "disagree, so the pooled token cannot be found.")
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  batch = min(batch_size, len(texts))
  apply = jax.jit(module.apply)
  starts = range(0, len(texts), batch)
  rows = []
  # Exact float32 matmuls on every backend (no TF32): a table is made once, and should not
  # depend on the machine that made it.
  with jax.default_matmul_precision("highest"):
    for start in tqdm(starts, desc="embed", unit="batch", disable=not progress or len(starts) < 2):
      chunk = ids_NxL[start:start + batch]
      short = batch - len(chunk)  # pad the last batch with copies: one compiled shape
      padded = np.concatenate([chunk, np.repeat(chunk[:1], short, axis=0)]) if short else chunk
      rows.append(np.asarray(apply({"params": params}, padded))[:len(chunk)])
  return np.concatenate(rows).astype(np.float32)
