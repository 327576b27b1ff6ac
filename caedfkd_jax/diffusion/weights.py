"""Stable Diffusion weights: a local diffusers folder in, a diffusion bundle out, no torch, no network.

`caedfkd convert-diffusion DIR --out BUNDLE` reads a diffusers-format Stable Diffusion
v1.x folder (what `StableDiffusionPipeline.save_pretrained` writes, or a hub snapshot
copied by hand):

  DIR/scheduler/scheduler_config.json
  DIR/tokenizer/{vocab.json, merges.txt, ...}
  DIR/text_encoder/{config.json, model.safetensors}
  DIR/unet/{config.json, diffusion_pytorch_model.safetensors}
  DIR/vae/{config.json, diffusion_pytorch_model.safetensors}

Only safetensors are read (a `.bin` is a pickle; we never unpickle here). Each network
is converted by its module's strict `params_from_state_dict` and written as one flat
safetensors file of Flax params ("a/b/kernel" keys), beside `diffusion.json` (the three
networks' configs, the scheduler config, where the weights came from and their
sha256) and a copy of the tokenizer files. The bundle is written beside its target
and renamed into place, so a killed conversion leaves no half bundle.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from caedfkd_jax.io import atomic_files

FORMAT = "caedfkd-diffusion/1"
MANIFEST = "diffusion.json"
# network -> (subfolder, weight file stem)
NETWORKS = {"text_encoder": ("text_encoder", "model"),
            "unet": ("unet", "diffusion_pytorch_model"),
            "vae": ("vae", "diffusion_pytorch_model")}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: a diffusers-format Stable Diffusion folder has it "
                            "(see `caedfkd convert-diffusion --help`).")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def weight_files(folder: str, stem: str, variant: str | None = None) -> list[str]:
  """The safetensors file(s) of one network: single, or the shards an index lists."""
  name = f"{stem}.{variant}" if variant else stem
  single = os.path.join(folder, f"{name}.safetensors")
  index = os.path.join(folder, f"{name}.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index)["weight_map"].values()))
    return [os.path.join(folder, s) for s in shards]
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
  pickles = [f for f in found if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
  hint = (f" It has PyTorch pickles ({', '.join(pickles)}), which this converter never loads: "
          "save them as safetensors first (diffusers `save_pretrained(..., "
          "safe_serialization=True)` on a machine with torch)." if pickles else "")
  other = sorted({f.split(".", 1)[1] for f in found if f.startswith(stem + ".") and
                  f.endswith(".safetensors") and f.count(".") > 1})
  if other:
    hint += f" Variants present: {', '.join(other)} (pass --variant)."
  raise FileNotFoundError(f"No {name}.safetensors in {folder} (found: {', '.join(found) or 'nothing'})."
                          + hint)


def read_state_dict(files: list[str]) -> dict[str, np.ndarray]:
  """All tensors of the files as float32 numpy (fp16/bf16 weights are widened)."""
  from safetensors.numpy import load_file
  state: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors = load_file(path)
    except Exception as e:   # A truncated or foreign file: name it.
      raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    for k, v in tensors.items():
      state[k] = v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  return state


def file_sha256(paths: list[str]) -> str:
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def _network_modules():
  from caedfkd_jax.diffusion import unet, vae
  from caedfkd_jax.models import clip_text
  return {"text_encoder": (clip_text.CLIPTextConfig.from_transformers, clip_text.params_from_state_dict),
          "unet": (unet.UNetConfig.from_diffusers, unet.params_from_state_dict),
          "vae": (vae.VAEDecoderConfig.from_diffusers, vae.params_from_state_dict)}


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for k, v in params.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      flat.update(flatten(v, key + "/"))
    else:
      flat[key] = np.ascontiguousarray(np.asarray(v, np.float32))
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def convert_diffusers(src: str, out: str, variant: str | None = None, log=print,
                      overwrite: bool = False) -> str:
  """Converts the diffusers folder `src` into a diffusion bundle at `out`; returns `out`.

  Anything at `out` is refused unless `overwrite`, and then only a diffusion bundle (or an
  empty folder) is replaced: the new bundle is written beside it and swapped in whole.
  """
  atomic_files.refuse_existing(out, overwrite)  # before anything is read
  if os.path.lexists(out):
    if not os.path.isdir(out):
      raise ValueError(f"--out {out} is a file, not a folder; choose another --out.")
    foreign = sorted(os.listdir(out))
    if foreign and MANIFEST not in foreign:
      raise ValueError(f"--out {out} is not a diffusion bundle (it holds {', '.join(foreign[:5])}),"
                       " and --overwrite replaces the whole folder; choose a new or empty --out.")
  src = os.path.abspath(src)
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src} is not a folder: pass a diffusers-format Stable Diffusion folder.")
  from safetensors.numpy import save_file
  tokenizer = os.path.join(src, "tokenizer")
  for required in ("vocab.json", "merges.txt"):
    if not os.path.isfile(os.path.join(tokenizer, required)):
      raise FileNotFoundError(f"{os.path.join(tokenizer, required)} is missing: the CLIP tokenizer "
                              "of the Stable Diffusion folder is needed to embed the prompts.")
  manifest: dict[str, Any] = {"format": FORMAT, "source": src, "variant": variant,
                              "scheduler": _read_json(os.path.join(src, "scheduler",
                                                                   "scheduler_config.json"))}
  tmp = atomic_files.temp_dir_beside(out)
  try:
    for network, (make_config, to_params) in _network_modules().items():
      folder, stem = NETWORKS[network]
      config_json = _read_json(os.path.join(src, folder, "config.json"))
      files = weight_files(os.path.join(src, folder), stem, variant)
      config = make_config(config_json)
      params = to_params(read_state_dict(files), config)
      flat = flatten(params)
      target = os.path.join(tmp, f"{network}.safetensors")
      save_file(flat, target)
      os.chmod(target, atomic_files.ordinary_mode())  # safetensors writes 0600; a bundle is shared.
      manifest[network] = {"config": config_json, "files": [os.path.relpath(f, src) for f in files],
                           "sha256": file_sha256(files)}
      log(f"{network}: {sum(v.size for v in flat.values()):,} parameters "
          f"from {', '.join(manifest[network]['files'])}")
    os.makedirs(os.path.join(tmp, "tokenizer"))
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer, name)):
        shutil.copy2(os.path.join(tokenizer, name), os.path.join(tmp, "tokenizer", name))
    atomic_files.write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    atomic_files.swap_in_dir(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out


@dataclasses.dataclass(frozen=True)
class DiffusionBundle:
  """A converted bundle: configs at hand, weights read when asked for (`params`)."""
  directory: str
  manifest: dict[str, Any]

  def config(self, network: str):
    make_config, _ = _network_modules()[network]
    return make_config(self.manifest[network]["config"])

  def params(self, network: str) -> dict[str, Any]:
    from safetensors.numpy import load_file
    return unflatten(load_file(os.path.join(self.directory, f"{network}.safetensors")))

  @property
  def tokenizer_dir(self) -> str:
    return os.path.join(self.directory, "tokenizer")

  @property
  def scheduler_config(self) -> dict[str, Any]:
    return self.manifest["scheduler"]


def load_bundle(directory: str) -> DiffusionBundle:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory} is not a diffusion bundle (no {MANIFEST}): make one from a local "
        "diffusers-format Stable Diffusion folder with `caedfkd convert-diffusion SD_DIR --out "
        f"{directory}`.")
  manifest = _read_json(path)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, this version reads {FORMAT!r}: "
                     "convert the Stable Diffusion folder again.")
  return DiffusionBundle(os.path.abspath(directory), manifest)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = (
      "Convert a local diffusers-format Stable Diffusion v1.x folder (safetensors) into a "
      "diffusion bundle for --config.method=diffdfkd. Reads local files only; never downloads, "
      "never unpickles.")
  parser.add_argument("src", help="diffusers folder with scheduler/, tokenizer/, text_encoder/, "
                      "unet/ and vae/")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="folder for the bundle (refused if it exists, unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the diffusion bundle already at --out (refused otherwise)")
  parser.add_argument("--variant", default=None,
                      help="weight variant, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors")


def run(args: argparse.Namespace) -> int:
  convert_diffusers(args.src, args.out, args.variant, overwrite=args.overwrite)
  print(f"Wrote {args.out}: use it with --config.method=diffdfkd --config.diffdfkd.weights={args.out}")
  return 0
