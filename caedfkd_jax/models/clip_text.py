"""CLIP's text encoder (transformers' `CLIPTextModel`): Stable Diffusion's and `caedfkd embed`'s.

Stable Diffusion conditions its UNet on the encoder's `last_hidden_state`
(every token, after the final LayerNorm; no pooling, no projection), so that is
all this module computes; `io/clip_embed.py` pools it at the EOS token and
projects it, as `CLIPTextModelWithProjection` does, for class embeddings. The layout follows transformers' PyTorch model, and
Flax module paths mirror its state-dict keys with numbered segments merged
(`encoder.layers.0.self_attn.q_proj` <-> `layers_0/self_attn/q_proj`), the
naming rule of `caedfkd_jax/io/convert.py`.

Weights come from a transformers state dict read as numpy arrays
(`safetensors.numpy.load_file(".../text_encoder/model.safetensors")`): neither
torch nor a network is needed. `tokenize` needs transformers (not torch) and
reads a local tokenizer folder only.
"""

import dataclasses
import json
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' CLIPTextConfig defaults for the two fields that a config.json may omit.
_DEFAULT_LAYER_NORM_EPS = 1e-5
_DEFAULT_HIDDEN_ACT = "quick_gelu"
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings")
# Files ignored by the converter: a non-persistent buffer that older transformers saved.
_IGNORED_KEYS = ("embeddings.position_ids",)
# transformers < 5 (every Stable Diffusion file on the Hub) nests the model under this prefix;
# transformers 5 saves without it. Both load.
_KEY_PREFIX = "text_model."
_MAX_LISTED = 5
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The architecture fields of a transformers `CLIPTextConfig`.

  No defaults for the sizes: a wrong guess would only show up as a shape error
  in the converter, so they must come from the model's own config.json.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  layer_norm_eps: float = _DEFAULT_LAYER_NORM_EPS
  hidden_act: str = _DEFAULT_HIDDEN_ACT

  def __post_init__(self):
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: "
                       f"{', '.join(SUPPORTED_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """From the dict of a `text_encoder/config.json`; other fields are ignored."""
    if "text_config" in config:
      raise ValueError("this is a full CLIPModel config; pass its 'text_config' entry "
                       "(or Stable Diffusion's text_encoder/config.json).")
    missing = [name for name in _SIZE_FIELDS if name not in config]
    if missing:
      raise ValueError(f"CLIP text config lacks {', '.join(missing)}; expected a transformers "
                       "CLIPTextModel config.json (Stable Diffusion's text_encoder/config.json).")
    return cls(**{name: int(config[name]) for name in _SIZE_FIELDS},
               layer_norm_eps=float(config.get("layer_norm_eps", _DEFAULT_LAYER_NORM_EPS)),
               hidden_act=str(config.get("hidden_act", _DEFAULT_HIDDEN_ACT)))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":  # OpenAI CLIP's approximation, x * sigmoid(1.702 x)
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":  # transformers' "gelu" is the exact erf form
    return jax.nn.gelu(x, approximate=False)
  raise ValueError(f"unsupported CLIP hidden_act {name!r}.")


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # float32 whatever the compute dtype, and two-pass variance like torch: CLIP's residual
  # stream has a few very large features, where E[x^2] - E[x]^2 loses precision.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


_weight_init = nn.initializers.normal(0.02)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_weight_init, name=name)


class _Attention(nn.Module):
  """Causal multi-head self-attention; logits and softmax in float32."""
  config: CLIPTextConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    split = lambda y: y.reshape(batch, length, c.num_attention_heads, c.head_dim)
    q = split(_dense(c.hidden_size, self.dtype, "q_proj")(x))
    k = split(_dense(c.hidden_size, self.dtype, "k_proj")(x))
    v = split(_dense(c.hidden_size, self.dtype, "v_proj")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * c.head_dim ** -0.5
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, c.hidden_size)
    return _dense(c.hidden_size, self.dtype, "out_proj")(out)


class _MLP(nn.Module):
  config: CLIPTextConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = _dense(c.intermediate_size, self.dtype, "fc1")(x)
    return _dense(c.hidden_size, self.dtype, "fc2")(_activation(c.hidden_act, x))


class _EncoderLayer(nn.Module):
  """Pre-LN block. The residual stream stays float32; only the branches run in `dtype`."""
  config: CLIPTextConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    h = _layer_norm(eps, "layer_norm1")(x).astype(self.dtype)
    x = x + _Attention(self.config, self.dtype, name="self_attn")(h).astype(jnp.float32)
    h = _layer_norm(eps, "layer_norm2")(x).astype(self.dtype)
    return x + _MLP(self.config, self.dtype, name="mlp")(h).astype(jnp.float32)


class CLIPTextEncoder(nn.Module):
  """input_ids [B, L] -> last_hidden_state [B, L, hidden_size], float32.

  Equals transformers' `CLIPTextModel(input_ids)[0]` without an attention mask,
  as Stable Diffusion v1.x calls it: padding tokens are ordinary tokens under the
  causal mask. Params are float32; `dtype` is the matmul dtype (bfloat16 on GPUs).
  """
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    length = input_ids.shape[-1]
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}.")
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}.")
    tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_weight_init,
                      name="token_embedding")(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_weight_init,
                         name="position_embedding")(jnp.arange(length))
    x = tokens + positions
    for i in range(c.num_hidden_layers):
      x = _EncoderLayer(c, self.dtype, name=f"layers_{i}")(x)
    return _layer_norm(c.layer_norm_eps, "final_layer_norm")(x)


# ---------------------------------------------------------------------------
# transformers state dict -> Flax params


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch_key: str  # without the optional "text_model." prefix
  flax_path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  transpose: bool = False  # Linear weight (out, in) -> Dense kernel (in, out)


def _layout(config: CLIPTextConfig) -> Iterator[_Entry]:
  """Every tensor of a CLIPTextModel state dict, with its place in our params."""
  c = config
  yield _Entry("embeddings.token_embedding.weight", ("token_embedding", "embedding"),
               (c.vocab_size, c.hidden_size))
  yield _Entry("embeddings.position_embedding.weight", ("position_embedding", "embedding"),
               (c.max_position_embeddings, c.hidden_size))

  def linear(torch_module, flax_module, fan_in, fan_out):
    yield _Entry(f"{torch_module}.weight", (*flax_module, "kernel"), (fan_out, fan_in), True)
    yield _Entry(f"{torch_module}.bias", (*flax_module, "bias"), (fan_out,))

  def layer_norm(torch_module, flax_module):
    yield _Entry(f"{torch_module}.weight", (*flax_module, "scale"), (c.hidden_size,))
    yield _Entry(f"{torch_module}.bias", (*flax_module, "bias"), (c.hidden_size,))

  for i in range(c.num_hidden_layers):
    torch_layer, flax_layer = f"encoder.layers.{i}", f"layers_{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      yield from linear(f"{torch_layer}.self_attn.{proj}", (flax_layer, "self_attn", proj),
                        c.hidden_size, c.hidden_size)
    yield from layer_norm(f"{torch_layer}.layer_norm1", (flax_layer, "layer_norm1"))
    yield from linear(f"{torch_layer}.mlp.fc1", (flax_layer, "mlp", "fc1"),
                      c.hidden_size, c.intermediate_size)
    yield from linear(f"{torch_layer}.mlp.fc2", (flax_layer, "mlp", "fc2"),
                      c.intermediate_size, c.hidden_size)
    yield from layer_norm(f"{torch_layer}.layer_norm2", (flax_layer, "layer_norm2"))
  yield from layer_norm("final_layer_norm", ("final_layer_norm",))


def _listed(keys: Sequence[str]) -> str:
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: CLIPTextConfig) -> dict[str, Any]:
  """A transformers CLIPTextModel state dict -> `CLIPTextEncoder` params (float32 numpy).

  Strict: every tensor must be present with its shape and every key must be
  used (only the `position_ids` buffer is ignored), so a file of another model
  or config fails here instead of producing a silently wrong encoder. Keys may
  carry transformers 4's `text_model.` prefix (Stable Diffusion's files) or not
  (transformers 5), but all the same way. Use as
  `CLIPTextEncoder(config).apply({"params": params}, input_ids)`.
  """
  prefix = _KEY_PREFIX if any(k.startswith(_KEY_PREFIX) for k in state_dict) else ""
  by_key = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
  entries = list(_layout(config))
  expected = {e.torch_key for e in entries}
  missing = [prefix + e.torch_key for e in entries if e.torch_key not in by_key]
  unexpected = sorted([key for key in state_dict if not key.startswith(prefix)]
                      + [prefix + key for key in by_key
                         if key not in expected and key not in _IGNORED_KEYS])
  wrong_shape = [f"{prefix + e.torch_key} {tuple(np.shape(by_key[e.torch_key]))} "
                 f"(expected {e.torch_shape})" for e in entries
                 if e.torch_key in by_key and tuple(np.shape(by_key[e.torch_key])) != e.torch_shape]
  if missing or unexpected or wrong_shape:
    problems = [f"{what} {len(keys)} key(s): {_listed(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong_shape))
                if keys]
    raise ValueError(
        f"state dict does not fit a CLIP text encoder with {config}: {'; '.join(problems)}. "
        "The file should be a transformers CLIPTextModel's (Stable Diffusion's "
        "text_encoder/model.safetensors), read with the config.json beside it.")

  params: dict[str, Any] = {}
  for e in entries:
    value = np.asarray(by_key[e.torch_key], dtype=np.float32)
    node = params
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(value.T) if e.transpose else value
  return params


# ---------------------------------------------------------------------------
# Tokenizer


def tokenize(tokenizer_dir: str, prompts: Sequence[str]) -> np.ndarray:
  """Prompts -> input_ids [len(prompts), model_max_length] int32, as Stable Diffusion pads them.

  Reads a local tokenizer folder (Stable Diffusion's `tokenizer/`) with
  transformers' CLIPTokenizer, never the network. Prompts are truncated to the
  tokenizer's `model_max_length` (77) with the end token kept, and padded with
  its pad token (`<|endoftext|>` in v1.x).
  """
  if isinstance(prompts, str):
    raise TypeError("tokenize expects a sequence of prompts, not one string.")
  folder = pathlib.Path(tokenizer_dir)
  has_bpe_files = all((folder / name).is_file() for name in _TOKENIZER_FILES)
  if not (has_bpe_files or (folder / "tokenizer.json").is_file()):
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    raise FileNotFoundError(
        f"no CLIP tokenizer in {str(folder)!r}: expected {' and '.join(_TOKENIZER_FILES)} "
        "(or tokenizer.json), as in Stable Diffusion's tokenizer/ folder; "
        + (f"it holds {found or 'nothing'}." if found is not None else "it is not a folder."))
  tokenizer_config = folder / "tokenizer_config.json"
  if tokenizer_config.is_file():
    tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    if tokenizer_class not in (None, "CLIPTokenizer", "CLIPTokenizerFast"):
      raise ValueError(f"{tokenizer_config} names tokenizer_class {tokenizer_class!r}; "
                       "expected CLIPTokenizer.")

  try:
    from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("Tokenizing the prompts needs transformers' CLIP tokenizer: "
                      'pip install "caedfkd-jax[text]".') from None
  tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
  max_length = tokenizer.model_max_length
  if max_length > 100_000:  # transformers' "no limit" placeholder
    raise ValueError(f"the tokenizer in {str(folder)!r} sets no model_max_length; its "
                     "tokenizer_config.json should (77 for Stable Diffusion).")
  if not prompts:
    return np.zeros((0, max_length), np.int32)
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)
