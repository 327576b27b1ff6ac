"""`caedfkd embed --encoder {sbert,clip,doc2vec}`: the paper's LM ablation encoders.

CLIP is checked against transformers' PyTorch `CLIPTextModelWithProjection` (and `CLIPModel`) on
tiny random models saved with `save_pretrained`; doc2vec on a tiny gensim model trained here.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caedfkd_jax.cli import main
from caedfkd_jax.io import embeddings

HAS_CLIP_REFERENCE = all(importlib.util.find_spec(m) is not None
                         for m in ("torch", "transformers", "safetensors"))
needs_clip_reference = pytest.mark.skipif(
    not HAS_CLIP_REFERENCE, reason="the reference is transformers' PyTorch CLIP: install the "
                                   "`text` extra (pip install 'caedfkd-jax[text]')")
needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="gensim is absent: install the `doc2vec` extra (pip install 'caedfkd-jax[doc2vec]')")

CLASSES = ["cat", "dog", "lawn_mower"]
MAX_POSITIONS = 16


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err
  assert err.startswith("caedfkd embed: error: ") and err.count("\n") == 1, err
  for needle in needles:
    assert needle in err, err
  return err


def _classes_file(tmp_path, classes=CLASSES):
  path = tmp_path / "classes.txt"
  path.write_text("\n".join(classes) + "\n")
  return str(path)


# --- --encoder / --model ---

def test_resolve_encoder(tmp_path):
  assert embeddings.resolve_encoder("sbert", None) == ("sbert", None)
  assert embeddings.resolve_encoder("clip", "m") == ("clip", "m")
  # An existing directory is the older spelling of --encoder sbert --model DIR.
  assert embeddings.resolve_encoder(str(tmp_path), None) == ("sbert", str(tmp_path))
  with pytest.raises(ValueError, match="do not pass --model"):
    embeddings.resolve_encoder(str(tmp_path), "other")
  with pytest.raises(ValueError, match="neither one of sbert, clip, doc2vec"):
    embeddings.resolve_encoder(str(tmp_path / "missing"), None)


@pytest.mark.parametrize("encoder,needle", [("clip", "--model DIR"), ("doc2vec", "--model FILE")])
def test_cli_needs_model(encoder, needle, tmp_path, capsys):
  out = tmp_path / "t.npy"
  assert main.main(["embed", "--classes", "cifar10", "--encoder", encoder, "--out", str(out)]) == 2
  _one_line_error(capsys, f"--encoder {encoder} needs {needle}")
  assert not out.exists()


# --- CLIP ---

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"),
          ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]


def _write_tokenizer(directory):
  """A minimal CLIP BPE vocabulary (with digits) in CLIP's file format; <|endoftext|> is id 1."""
  symbols = LETTERS + DIGITS
  tokens = (["<|startoftext|>", "<|endoftext|>"] + list(symbols) + [c + "</w>" for c in symbols]
            + [a + b for a, b in MERGES])
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"model_max_length": MAX_POSITIONS, "tokenizer_class": "CLIPTokenizer"}))
  return len(tokens)


def _save_clip(directory, kind: str, eos_token_id: int = 1, seed: int = 0):
  """A seeded random tiny CLIP of `kind` ("with_projection", "full", "text_only") + tokenizer."""
  import torch
  import transformers
  directory.mkdir()
  vocab_size = _write_tokenizer(directory)
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=MAX_POSITIONS, projection_dim=16,
              bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)
  torch.manual_seed(seed)
  if kind == "full":
    vision = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=4)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=16))
  elif kind == "with_projection":
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text))
  else:
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
  with torch.no_grad():  # biases start at 0 and LayerNorms at (1, 0): make every tensor count
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.eval().save_pretrained(str(directory), safe_serialization=True)
  return str(directory), model


def _reference(model, directory, prompts, padding=True):
  """transformers' text_embeds, tokenised by transformers (padded to the longest, masked)."""
  import torch
  import transformers
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
  batch = tokenizer(prompts, padding=padding, return_tensors="pt")
  with torch.no_grad():
    if isinstance(model, transformers.CLIPModel):
      out = model.get_text_features(**batch)
      return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    return model(**batch).text_embeds.numpy()


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
  if not HAS_CLIP_REFERENCE:
    pytest.skip("torch/transformers are absent: install the `text` extra")
  return _save_clip(tmp_path_factory.mktemp("clip") / "with_projection", "with_projection")


@needs_clip_reference
def test_clip_matches_transformers_with_projection(clip_model, tmp_path, capsys):
  directory, model = clip_model
  out = tmp_path / "pets.npy"
  assert main.main(["embed", "--classes", _classes_file(tmp_path), "--encoder", "clip",
                    "--model", directory, "--out", str(out)]) == 0
  assert "3 classes x 16 dims" in capsys.readouterr().out
  table = embeddings.load_table(str(out))
  assert table.classes == CLASSES and table.vectors.dtype == np.float32
  prompts = ["a photo of cat", "a photo of dog", "a photo of lawn mower"]
  np.testing.assert_allclose(table.vectors, _reference(model, directory, prompts), atol=1e-5)
  assert table.metadata == {
      "encoder": "clip", "model": os.path.abspath(directory),
      "encoder_sha256": embeddings.file_sha256(os.path.join(directory, "model.safetensors")),
      "pooling": "EOS token + text projection", "prompt": "a photo of {}", "prompt_by": "name",
      "normalized": False, "created_by": table.metadata["created_by"]}


@needs_clip_reference
def test_clip_pools_each_prompt_at_its_own_eos(clip_model):
  """Prompts of different lengths: the EOS sits at different places, padding follows it."""
  from caedfkd_jax.models import clip_text
  from caedfkd_jax.io import clip_embed
  directory, model = clip_model
  prompts = ["a cat", "a photo of lawn mower", "dog"]
  ids = clip_text.tokenize(directory, prompts)
  positions = np.asarray(clip_embed.eos_positions(ids, 1))
  assert positions.tolist() == [3, 13, 4] and ids.shape == (3, MAX_POSITIONS)
  ours = clip_embed.encode(prompts, directory, batch_size=2)  # a padded last batch too
  alone = np.concatenate([_reference(model, directory, [p], padding=False) for p in prompts])
  np.testing.assert_allclose(ours, alone, atol=1e-5)
  np.testing.assert_allclose(ours, _reference(model, directory, prompts), atol=1e-5)
  # The check has teeth: the state at the last position (padding) projects to other vectors.
  import torch
  with torch.no_grad():
    hidden = model.text_model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
    last = model.text_projection(hidden[:, -1]).numpy()
  assert np.abs(last[0] - ours[0]).max() > 1e-3


@needs_clip_reference
@pytest.mark.parametrize("kind,eos_token_id", [("full", 1), ("with_projection", 2)])
def test_clip_model_save_and_legacy_eos_rule(kind, eos_token_id, tmp_path):
  """A full CLIPModel folder; and eos_token_id == 2, pooled at the argmax of the ids."""
  from caedfkd_jax.io import clip_embed
  directory, model = _save_clip(tmp_path / kind, kind, eos_token_id=eos_token_id, seed=1)
  prompts = ["a photo of 7", "a cat"]
  np.testing.assert_allclose(clip_embed.encode(prompts, directory),
                             _reference(model, directory, prompts), atol=1e-5)


@needs_clip_reference
def test_clip_by_index_and_normalized(clip_model, tmp_path):
  directory, model = clip_model
  table = embeddings.embed_classes(CLASSES, directory, prompt_by="index", normalize=True,
                                   encoder="clip")
  expected = _reference(model, directory, ["a photo of 0", "a photo of 1", "a photo of 2"])
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(table.vectors, expected, atol=1e-5)
  assert table.metadata["prompt_by"] == "index" and table.metadata["normalized"] is True
  assert np.abs(table.vectors[0] - table.vectors[1]).max() > 1e-3


@needs_clip_reference
def test_clip_folder_errors(tmp_path, capsys):
  directory, _ = _save_clip(tmp_path / "text_only", "text_only")
  capsys.readouterr()  # transformers' saving progress bar
  argv = ["embed", "--classes", _classes_file(tmp_path), "--encoder", "clip", "--out",
          str(tmp_path / "t.npy")]
  assert main.main(argv + ["--model", directory]) == 2
  _one_line_error(capsys, "has no text_projection.weight", "CLIPTextModelWithProjection")
  assert main.main(argv + ["--model", str(tmp_path / "missing")]) == 2
  _one_line_error(capsys, "does not exist")
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
  assert main.main(argv + ["--model", str(tmp_path / "bert")]) == 2
  _one_line_error(capsys, "model_type 'bert'")
  assert not (tmp_path / "t.npy").exists()


# --- doc2vec ---

SENTENCES = ["a photo of a cat", "a photo of a dog", "the dog chased the cat",
             "a lawn mower on the lawn", "a photo of 0 and 1", "2 is a number", "1 2 3"]


def _train_doc2vec(path, sentences=SENTENCES, dm=1):
  from gensim.models.doc2vec import Doc2Vec, TaggedDocument
  docs = [TaggedDocument(s.split(), [i]) for i, s in enumerate(sentences)]
  Doc2Vec(docs, vector_size=8, min_count=1, epochs=5, workers=1, seed=0, dm=dm).save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def doc2vec_model(tmp_path_factory):
  if importlib.util.find_spec("gensim") is None:
    pytest.skip("gensim is absent: install the `doc2vec` extra")
  return _train_doc2vec(tmp_path_factory.mktemp("d2v") / "tiny.d2v")


@needs_gensim
@pytest.mark.parametrize("prompt_by", ["name", "index"])
def test_doc2vec_table(prompt_by, doc2vec_model, tmp_path, capsys):
  out = tmp_path / "t.npy"
  argv = ["embed", "--classes", _classes_file(tmp_path), "--encoder", "doc2vec", "--model",
          doc2vec_model, "--prompt-by", prompt_by, "--out", str(out)]
  assert main.main(argv) == 0
  assert "3 classes x 8 dims" in capsys.readouterr().out
  table = embeddings.load_table(str(out))
  assert table.vectors.shape == (3, 8) and table.classes == CLASSES
  gaps = np.abs(table.vectors[:, None] - table.vectors[None]).max(-1)
  assert gaps[~np.eye(3, dtype=bool)].min() > 1e-4  # every class its own row
  assert table.metadata["encoder"] == "doc2vec" and table.metadata["prompt_by"] == prompt_by
  assert table.metadata["model"] == os.path.abspath(doc2vec_model)
  assert table.metadata["encoder_sha256"] == embeddings.file_sha256(doc2vec_model)
  assert (table.metadata["inference_epochs"], table.metadata["inference_seed"]) == (5, 0)
  assert main.main(argv + ["--overwrite"]) == 0  # the same again
  np.testing.assert_array_equal(embeddings.load_table(str(out)).vectors, table.vectors)


@needs_gensim
@pytest.mark.parametrize("dm", [1, 0])
def test_doc2vec_infer_is_gensims_made_repeatable(dm, tmp_path):
  from gensim.models.doc2vec import Doc2Vec
  from caedfkd_jax.io import doc2vec_embed
  model = Doc2Vec.load(_train_doc2vec(tmp_path / "m.d2v", dm=dm))
  words = ["a", "photo", "of", "cat"]
  model.random = np.random.RandomState(0)
  gensims = model.infer_vector(words, epochs=7)
  np.testing.assert_array_equal(doc2vec_embed.infer(model, words, 7, hashfxn=hash), gensims)
  first = doc2vec_embed.infer(model, words, 7)
  np.testing.assert_array_equal(doc2vec_embed.infer(model, words, 7), first)
  assert np.abs(first - doc2vec_embed.infer(model, ["a", "photo", "of", "dog"], 7)).max() > 1e-4


@needs_gensim
def test_doc2vec_is_the_same_in_another_process(doc2vec_model):
  """gensim's own infer_vector seeds with the salted str hash: not repeatable across processes."""
  from caedfkd_jax.io import doc2vec_embed
  prompts = ["a photo of cat", "a photo of lawn mower"]
  code = (f"import sys\nfrom caedfkd_jax.io import doc2vec_embed\n"
          f"print(doc2vec_embed.encode({prompts!r}, sys.argv[1])[0].tobytes().hex())\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code, doc2vec_model], capture_output=True,
                       text=True, check=True, cwd=root, env={**os.environ, "PYTHONHASHSEED": "7"})
  ours = doc2vec_embed.encode(prompts, doc2vec_model)[0]
  assert out.stdout.strip() == ours.tobytes().hex()


@needs_gensim
def test_doc2vec_errors(doc2vec_model, tmp_path, capsys, monkeypatch):
  from gensim.models import Word2Vec
  argv = ["embed", "--classes", _classes_file(tmp_path), "--encoder", "doc2vec", "--out",
          str(tmp_path / "t.npy"), "--model"]
  junk = tmp_path / "junk.txt"
  junk.write_text("not a model\n")
  assert main.main(argv + [str(junk)]) == 2
  _one_line_error(capsys, "is not a gensim Doc2Vec model file")
  w2v = tmp_path / "w2v.model"
  Word2Vec([s.split() for s in SENTENCES], vector_size=8, min_count=1, workers=1).save(str(w2v))
  assert main.main(argv + [str(w2v)]) == 2
  _one_line_error(capsys, "holds a gensim Word2Vec, not a Doc2Vec model")
  assert main.main(argv + [str(tmp_path / "missing.d2v")]) == 2
  _one_line_error(capsys, "does not exist")
  # The digits are unknown to this model: "a photo of 0" and "a photo of 1" would be one prompt.
  no_digits = _train_doc2vec(tmp_path / "words.d2v", SENTENCES[:4])
  assert main.main(argv + [no_digits, "--prompt-by", "index"]) == 2
  _one_line_error(capsys, "'a photo of 0' and 'a photo of 1' have the same words")
  monkeypatch.setitem(sys.modules, "gensim", None)
  monkeypatch.setitem(sys.modules, "gensim.models", None)
  assert main.main(argv + [doc2vec_model]) == 2
  _one_line_error(capsys, "--encoder doc2vec needs gensim", "caedfkd-jax[doc2vec]")
  assert not (tmp_path / "t.npy").exists()
