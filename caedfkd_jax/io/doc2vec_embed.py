"""doc2vec class embeddings for `caedfkd embed --encoder doc2vec` (the paper's LM ablation).

Loads a gensim `Doc2Vec` model file of the user's and infers one vector per prompt. gensim
model files are Python pickles: loading one runs whatever code it holds, so load only files you
made yourself or trust.

Inference is repeatable across processes. gensim's `infer_vector` seeds its starting vector with
Python's `hash()` of the words, which is salted per process (unless PYTHONHASHSEED is set), and
draws window sizes and negative samples from `model.random`. `infer` here does the same updates
but seeds the starting vector from a sha256 of the words and resets `model.random` to a fixed
seed before each prompt, so one model file and one class list always give the same table.

Prompts are split into lower-cased word and number tokens (`\\w+`). gensim's `simple_preprocess`
would drop numbers and one-letter words, making every "a photo of {index}" prompt the same.
Words outside the model's vocabulary are skipped by the inference, so prompts whose known words
coincide (or have none) are refused: their rows would differ only by the random start.
"""

import hashlib
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

SEED = 0
DOC2VEC_EXTRA_HINT = "pip install 'caedfkd-jax[doc2vec]'"
_TOKEN = re.compile(r"\w+")


def _import_doc2vec():
  try:
    from gensim.models import doc2vec  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"--encoder doc2vec needs gensim ({e}); run {DOC2VEC_EXTRA_HINT}.") from e
  return doc2vec


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


def stable_hash(text: str) -> int:
  """A 32-bit hash of `text` that is the same in every process (unlike `hash`)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little")


def load_model(path: str):
  """`Doc2Vec.load(path)`, refusing anything else. The file is a pickle: trust it first."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"doc2vec model {path} does not exist; --model takes a file written "
                            "by gensim's Doc2Vec.save().")
  doc2vec = _import_doc2vec()
  try:
    model = doc2vec.Doc2Vec.load(path)
  except Exception as e:  # pylint: disable=broad-except  # unpickling fails in many ways
    reason = (str(e).splitlines() or [""])[0]
    raise ValueError(f"{path} is not a gensim Doc2Vec model file ({type(e).__name__}: "
                     f"{reason}); --model takes a file written by Doc2Vec.save().") from None
  if not isinstance(model, doc2vec.Doc2Vec):
    raise ValueError(f"{path} holds a gensim {type(model).__name__}, not a Doc2Vec model; "
                     "--model takes a file written by Doc2Vec.save().")
  return model


def infer(model, words: Sequence[str], epochs: int, seed: int = SEED,
          hashfxn: Callable[[str], int] = stable_hash) -> np.ndarray:
  """`model.infer_vector(words, epochs=epochs)`, repeatable (module docstring).

  With `hashfxn=hash` it equals gensim's own call after `model.random = RandomState(seed)`.
  """
  doc2vec = _import_doc2vec()
  words = list(words)
  model.random = np.random.RandomState(seed)
  size = model.dv.vector_size
  doctag_vectors = doc2vec.pseudorandom_weak_vector(
      size, seed_string=" ".join(words), hashfxn=hashfxn).reshape(1, size)
  doctags_lockf = np.ones(1, dtype=np.float32)
  work = np.zeros(model.layer1_size, dtype=np.float32)
  neu1 = None if model.sg else doc2vec.matutils.zeros_aligned(model.layer1_size, dtype=np.float32)
  alpha, min_alpha = model.alpha, model.min_alpha
  alpha_delta = (alpha - min_alpha) / max(epochs - 1, 1)
  common = dict(learn_words=False, learn_hidden=False, doctag_vectors=doctag_vectors,
                doctags_lockf=doctags_lockf)
  for _ in range(epochs):  # gensim 4's infer_vector loop
    if model.sg:
      doc2vec.train_document_dbow(model, words, [0], alpha, work, **common)
    elif model.dm_concat:
      doc2vec.train_document_dm_concat(model, words, [0], alpha, work, neu1, **common)
    else:
      doc2vec.train_document_dm(model, words, [0], alpha, work, neu1, **common)
    alpha -= alpha_delta
  return doctag_vectors[0].copy()


def _check_distinct(texts: Sequence[str], known: list[list[str]], path: str) -> None:
  empty = [t for t, words in zip(texts, known) if not words]
  if empty:
    raise ValueError(f"No word of the prompt {empty[0]!r} is in the vocabulary of {path}; its "
                     "row would be random. Train the model on text that has the class names.")
  seen: dict[tuple[str, ...], str] = {}
  for text, words in zip(texts, known):
    other = seen.setdefault(tuple(words), text)
    if other != text:
      raise ValueError(
          f"The prompts {other!r} and {text!r} have the same words in the vocabulary of {path} "
          f"({' '.join(words)}): the words that tell them apart are unknown to the model, so "
          "their rows would differ only by chance. Train the model on text that has them.")


def encode(texts: Sequence[str], model_path: str,
           epochs: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """(N x vector_size float32 doc2vec vectors of `texts`, how they were inferred).

  `epochs` defaults to the model's own training epochs.
  """
  if not texts:
    raise ValueError("encode() needs at least one text.")
  model = load_model(model_path)
  epochs = int(epochs or model.epochs)
  tokens = [tokenize(t) for t in texts]
  _check_distinct(texts, [[w for w in words if w in model.wv.key_to_index] for words in tokens],
                  model_path)
  vectors = np.stack([infer(model, words, epochs) for words in tokens]).astype(np.float32)
  info = {"inference_epochs": epochs, "inference_seed": SEED,
          "tokens": "lower-cased \\w+ words; words outside the model's vocabulary are skipped"}
  return vectors, info
