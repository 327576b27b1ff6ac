"""`caedfkd evaluate`: top-1 and per-class accuracy of a bundle on real images."""

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caedfkd_jax.io import atomic_files, bundle as bundle_lib, class_names, data as data_lib
from caedfkd_jax.runtime import xla_cpu


def _logits(model, variables, images_uint8, mean, std):
  x = (images_uint8.astype(jnp.float32) / 255.0 - mean) / std
  return model.apply(variables, x, train=False)[0]


@functools.cache
def _jitted_logits(platform: str) -> Callable:
  """`_logits` compiled with the tuned CPU kernels (xla_cpu.py); built on first use."""
  return xla_cpu.jit(_logits, choice="tuned", platform=platform, static_argnums=(0,))


def map_batches(fn: Callable[[np.ndarray], Any], images_uint8: np.ndarray, batch_size: int = 500,
                desc: str = "evaluate", progress: bool = True) -> np.ndarray:
  """`fn` over fixed-size batches, the last one zero-padded: one compiled shape for any N."""
  n = len(images_uint8)
  batch_size = min(batch_size, n)
  out = []
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
    batch = images_uint8[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
    out.append(np.asarray(fn(batch))[:batch_size - pad])
  return np.concatenate(out)


def predict(model, variables, images_uint8: np.ndarray, mean, std, batch_size: int = 500,
            progress: bool = True) -> np.ndarray:
  """Logits for uint8 N x H x W x C images, in eval mode; one compiled batch shape."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  logits = _jitted_logits(jax.default_backend())
  return map_batches(lambda batch: logits(model, variables, batch, mean, std), images_uint8,
                     batch_size, "evaluate", progress)


def check_fits(spec: bundle_lib.ModelSpec, dataset: data_lib.Dataset, what: str = "The model"
               ) -> None:
  """Refuses data a model cannot be scored on (another class count or image size): one line."""
  names = ", ".join(dataset.class_names[:5]) + (", ..." if dataset.num_classes > 5 else "")
  where = f" in {dataset.source}" if dataset.source else ""
  if dataset.num_classes != spec.num_classes:
    raise ValueError(f"{what} has {spec.num_classes} classes but the data has "
                     f"{dataset.num_classes} ({names}){where}; give the test set of "
                     "the dataset the model was trained on.")
  check_image_size(spec, dataset, what)


def check_image_size(spec: bundle_lib.ModelSpec, dataset: data_lib.Dataset,
                     what: str = "The model") -> None:
  """Refuses images of another size than the model's input: one line."""
  where = f" in {dataset.source}" if dataset.source else ""
  if dataset.image_shape != (spec.image_size, spec.image_size):
    raise ValueError(f"{what} expects {spec.image_size}x{spec.image_size} images; the data's "
                     f"are {dataset.images.shape[1]}x{dataset.images.shape[2]}{where}: "
                     "resize them to the model's input size.")


def evaluate_bundle(bundle: bundle_lib.Bundle, dataset, batch_size: int = 500,
                    progress: bool = True, allow_class_mismatch: bool = False) -> dict:
  spec = bundle.spec
  check_fits(spec, dataset)
  class_names.check_class_names(spec.class_names, dataset.class_names,
                                f"the data ({dataset.source or 'given'})",
                                "--allow-class-mismatch", allow_class_mismatch)
  logits = predict(bundle.model, bundle.variables, dataset.images, spec.mean, spec.std,
                   batch_size, progress)
  correct = np.argmax(logits, -1) == dataset.labels
  per_class = [float(correct[dataset.labels == k].mean() * 100) if np.any(dataset.labels == k)
               else float("nan") for k in range(spec.num_classes)]
  return {"top1": float(correct.mean() * 100), "correct": int(correct.sum()), "total": len(correct),
          "per_class": per_class, "logits": logits}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, help="model bundle directory")
  parser.add_argument("--data", required=True,
                      help="SPLIT/CLASS/*.jpg folder, CIFAR python batches directory, or tfds:NAME")
  parser.add_argument("--split", default="test",
                      help="the split to score: ROOT/SPLIT of an image folder, train or test of "
                           "CIFAR batches, a tfds split (default: test)")
  parser.add_argument("--batch-size", type=int, default=500,
                      help="images per forward pass (default: 500)")
  parser.add_argument("--logits", help="write logits and labels (dataset order) to this .npz")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the --logits file if it exists (refused otherwise)")
  parser.add_argument("--allow-class-mismatch", action="store_true",
                      help="score data whose class names are not the model's in label order "
                           "(refused by default: the accuracy would be silently wrong)")


def run(args: argparse.Namespace) -> int:
  if args.logits:
    if not args.logits.endswith(".npz"):
      raise ValueError(f"--logits {args.logits}: give a path ending in .npz (numpy adds the "
                       "suffix otherwise).")
    atomic_files.refuse_existing(args.logits, args.overwrite, "--logits")
  bundle = bundle_lib.load_bundle(args.model)
  warning = bundle_lib.untrained_warning(bundle.spec)
  if warning:
    print(f"{args.model}: {warning}", file=sys.stderr)
  dataset = data_lib.load_dataset(args.data, args.split, progress=True)
  result = evaluate_bundle(bundle, dataset, args.batch_size, allow_class_mismatch=args.allow_class_mismatch)
  print(f"{bundle.spec.arch} on {args.data} ({args.split}, {result['total']} images): "
        f"top-1 {result['top1']:.2f}% ({result['correct']}/{result['total']})")
  width = max(len(n) for n in dataset.class_names)
  for name, acc in zip(dataset.class_names, result["per_class"]):
    print(f"  {name:<{width}}  {acc:6.2f}%")
  if args.logits:
    with atomic_files.replacing(args.logits) as tmp, open(tmp, "wb") as f:
      np.savez(f, logits=result["logits"], labels=dataset.labels)
    print(f"logits written to {args.logits}")
  return 0
