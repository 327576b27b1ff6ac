"""CLIP text encoder vs transformers' PyTorch CLIPTextModel, converter strictness, tokenizer.

The reference is a tiny random CLIPTextModel saved with `save_pretrained` and read
back the torch-free way our loader reads Stable Diffusion's text_encoder/.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.models import clip_text

torch = pytest.importorskip("torch", reason="the reference model is transformers' PyTorch CLIP")
transformers = pytest.importorskip("transformers", reason="the reference is transformers' CLIP")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB, BOS, EOS = 99, 97, 98
MAX_POSITIONS = 16


def _save_tiny_model(directory, hidden_act: str, seed: int = 0):
  """A seeded random CLIPTextModel saved to `directory`; returns the torch model."""
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, hidden_act=hidden_act,
      layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # biases start at 0 and LayerNorms at (1, 0): make every tensor count
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _load_saved(directory):
  """Read back the way Stable Diffusion's text_encoder/ is read: no torch."""
  config = clip_text.CLIPTextConfig.from_transformers(
      json.loads((directory / "config.json").read_text()))
  state_dict = safetensors_numpy.load_file(str(directory / "model.safetensors"))
  return config, state_dict


def _prompt_ids(length: int) -> np.ndarray:
  """Three prompts as a tokenizer lays them out: BOS, words, EOS, then EOS padding."""
  rng = np.random.default_rng(1)
  ids = np.full((3, length), EOS, np.int32)
  for row, words in enumerate((length - 2, 5, 1)):
    ids[row, 0] = BOS
    ids[row, 1:1 + words] = rng.integers(0, BOS, words)
  return ids


def _torch_hidden(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def saved(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(f"clip_{request.param}")
  model = _save_tiny_model(directory, request.param)
  config, state_dict = _load_saved(directory)
  return model, config, state_dict


@pytest.mark.parametrize("length", [MAX_POSITIONS, 9])
def test_matches_transformers(saved, length):
  model, config, state_dict = saved
  assert config.hidden_act == model.config.hidden_act
  params = clip_text.params_from_state_dict(state_dict, config)
  ids = _prompt_ids(length)
  ours = jax.jit(clip_text.CLIPTextEncoder(config).apply)({"params": params}, ids)
  assert ours.shape == (3, length, 32) and ours.dtype == jnp.float32
  diff = np.abs(np.asarray(ours) - _torch_hidden(model, ids)).max()
  assert diff < 1e-4, diff


def test_params_match_init_tree(saved):
  _, config, state_dict = saved
  params = clip_text.params_from_state_dict(state_dict, config)
  init = jax.eval_shape(clip_text.CLIPTextEncoder(config).init, jax.random.key(0),
                        jnp.zeros((1, 4), jnp.int32))["params"]
  assert (jax.tree.structure(jax.tree.map(np.shape, params))
          == jax.tree.structure(jax.tree.map(lambda x: x.shape, init)))
  jax.tree.map(lambda p, i: np.testing.assert_equal(p.shape, i.shape), params, init)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_transformers4_prefixed_keys(saved):
  """Stable Diffusion's files were saved by transformers 4: `text_model.` keys + position_ids."""
  _, config, state_dict = saved
  prefixed = {"text_model." + k: v for k, v in state_dict.items()}
  prefixed["text_model.embeddings.position_ids"] = np.arange(MAX_POSITIONS)[None]
  jax.tree.map(np.testing.assert_array_equal,
               clip_text.params_from_state_dict(prefixed, config),
               clip_text.params_from_state_dict(state_dict, config))
  mixed = dict(prefixed)
  mixed["final_layer_norm.bias"] = mixed.pop("text_model.final_layer_norm.bias")
  with pytest.raises(ValueError) as error:
    clip_text.params_from_state_dict(mixed, config)
  assert "missing 1 key(s): text_model.final_layer_norm.bias" in str(error.value)
  assert "unexpected 1 key(s): final_layer_norm.bias" in str(error.value)


def test_converter_names_bad_keys(saved):
  _, config, state_dict = saved
  key = "encoder.layers.1.self_attn.q_proj.weight"

  def error_of(sd):
    with pytest.raises(ValueError, match="transformers CLIPTextModel's") as error:
      clip_text.params_from_state_dict(sd, config)
    return str(error.value)

  missing = {k: v for k, v in state_dict.items() if k != key}
  assert f"missing 1 key(s): {key}" in error_of(missing)
  extra = dict(state_dict, **{"encoder.layers.2.mlp.fc1.weight": np.zeros((37, 32))})
  assert "unexpected 1 key(s): encoder.layers.2.mlp.fc1.weight" in error_of(extra)
  wrong = dict(state_dict, **{key: np.zeros((32, 16), np.float32)})
  assert f"wrong shape for 1 key(s): {key} (32, 16) (expected (32, 32))" in error_of(wrong)
  # A bigger config than the file: every layer-2 tensor is missing, listed first-few.
  bigger = dataclasses.replace(config, num_hidden_layers=3)
  with pytest.raises(ValueError, match=r"missing 16 key\(s\): encoder\.layers\.2\..*16 in all"):
    clip_text.params_from_state_dict(state_dict, bigger)


def test_config_from_transformers():
  fields = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 5,
            "model_type": "clip_text_model"}
  config = clip_text.CLIPTextConfig.from_transformers(fields)
  assert (config.layer_norm_eps, config.hidden_act) == (1e-5, "quick_gelu")
  with pytest.raises(ValueError, match="'gelu_new'"):
    clip_text.CLIPTextConfig.from_transformers({**fields, "hidden_act": "gelu_new"})
  with pytest.raises(ValueError, match="hidden_size"):
    clip_text.CLIPTextConfig.from_transformers({"vocab_size": 10})


def test_too_long_input_is_refused(saved):
  _, config, state_dict = saved
  params = clip_text.params_from_state_dict(state_dict, config)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    clip_text.CLIPTextEncoder(config).apply(
        {"params": params}, jnp.zeros((1, MAX_POSITIONS + 1), jnp.int32))


def test_bfloat16_smoke(saved):
  model, config, state_dict = saved
  params = clip_text.params_from_state_dict(state_dict, config)
  ids = _prompt_ids(MAX_POSITIONS)
  ours = jax.jit(clip_text.CLIPTextEncoder(config, dtype=jnp.bfloat16).apply)(
      {"params": params}, ids)
  assert ours.dtype == jnp.float32 and np.isfinite(np.asarray(ours)).all()
  # The output is LayerNorm-ed (unit scale), so an absolute bound is meaningful.
  assert np.abs(np.asarray(ours) - _torch_hidden(model, ids)).max() < 0.1


# ---------------------------------------------------------------------------
# Tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"),
          ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]


def _write_tokenizer(directory, model_max_length: int | None = 8):
  """A minimal CLIP BPE vocabulary in CLIP's file format."""
  tokens = (["<|startoftext|>", "<|endoftext|>"] + list(LETTERS) + [c + "</w>" for c in LETTERS]
            + [",", ",</w>"] + [a + b for a, b in MERGES])
  vocab = {token: i for i, token in enumerate(tokens)}
  directory.mkdir(exist_ok=True)
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  if model_max_length is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}))
  return vocab


def test_tokenize_matches_transformers(tmp_path):
  vocab = _write_tokenizer(tmp_path)
  prompts = ["a photo of a cat", "A  Photo, of a dog and a zebra", ""]
  ids = clip_text.tokenize(str(tmp_path), prompts)
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  first = [bos] + [vocab[t] for t in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")] + [eos]
  assert ids[0].tolist() == first + [eos]  # padded with <|endoftext|>
  assert ids[1, -1] == eos and ids[1, 1:4].tolist() == [
      vocab["a</w>"], vocab["photo</w>"], vocab[",</w>"]]  # truncated, EOS kept
  assert ids[2].tolist() == [bos] + [eos] * 7
  reference = transformers.CLIPTokenizer(
      vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
  expected = reference(prompts, padding="max_length", max_length=8, truncation=True)
  np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
  assert clip_text.tokenize(str(tmp_path), []).shape == (0, 8)


def test_tokenize_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"empty.*vocab\.json and merges\.txt"):
    clip_text.tokenize(str(tmp_path / "empty"), ["a cat"])
  (tmp_path / "only_vocab").mkdir()
  (tmp_path / "only_vocab" / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"only_vocab.*merges\.txt.*\['vocab\.json'\]"):
    clip_text.tokenize(str(tmp_path / "only_vocab"), ["a cat"])
  _write_tokenizer(tmp_path / "no_limit", model_max_length=None)
  with pytest.raises(ValueError, match="model_max_length"):
    clip_text.tokenize(str(tmp_path / "no_limit"), ["a cat"])
  with pytest.raises(TypeError):
    clip_text.tokenize(str(tmp_path / "no_limit"), "a cat")
