"""`caedfkd probe`: how good a model's frozen features are, on real labelled images.

Accuracy on the model's own test set says how well its head fits its classes; a probe
asks what its penultimate features are worth to a new classifier, also on classes the
model never saw. Three protocols, each fit on the train split and scored on the test split:

- linear: logistic regression on the frozen features (C chosen on held-out training data),
- knn: cosine 20-nearest-neighbour vote on the frozen features,
- finetune: all weights trained a few epochs with a fresh head.

Each at full data (`all`) or k labelled images per class, over several seeded draws.
The pure parts (draws, kNN, linear probe) are in fewshot.py, fine-tuning in finetune.py.
"""

import argparse
import functools
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.eval import evaluate, fewshot, finetune as finetune_lib
from caedfkd_jax.io import atomic_files, bundle as bundle_lib, class_names, data as data_lib

PROTOCOLS = ("linear", "knn", "finetune")
ALL = "all"


def parse_protocols(text: str) -> list[str]:
  """`linear,knn` -> ["linear", "knn"]; an unknown name is an argparse error (one line)."""
  names = [t.strip() for t in text.split(",") if t.strip()]
  bad = [t for t in names if t not in PROTOCOLS]
  if bad or not names:
    raise argparse.ArgumentTypeError(
        f"{(bad or [text])[0]!r} is not a protocol; give a comma-separated list of "
        f"{', '.join(PROTOCOLS)}")
  return list(dict.fromkeys(names))


def parse_shots(text: str) -> list[int | str]:
  """`all,10,1` -> ["all", 10, 1]: `all` or a positive number of images per class."""
  out = []
  for t in (t.strip() for t in text.split(",")):
    if t == ALL:
      out.append(ALL)
    elif t.isdigit() and int(t) > 0:
      out.append(int(t))
    else:
      raise argparse.ArgumentTypeError(
          f"{t!r} is not a shot count; give a comma-separated list of 'all' (the whole "
          "training split) and positive numbers of images per class, e.g. all,10,1")
  return list(dict.fromkeys(out))


def _positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
  return int(text)


def _seed(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"{text!r} is not a seed (0 or a positive integer)")
  return int(text)


@functools.partial(jax.jit, static_argnums=(0,))
def _features(model, variables, images_uint8, mean, std):
  x = (images_uint8.astype(jnp.float32) / 255.0 - mean) / std
  features = model.apply(variables, x, train=False)[1]["features"]
  return features.reshape(features.shape[0], -1).astype(jnp.float32)


def check_features(bundle: bundle_lib.Bundle) -> int:
  """The feature width, or a one-line error if the model has no `features` output."""
  spec = bundle.spec
  x = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: bundle.model.apply(v, x, train=False), bundle.variables, x)
  aux = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
  if not isinstance(aux, dict) or "features" not in aux:
    raise ValueError(f"the {spec.arch} model of this bundle returns no penultimate 'features' "
                     "(it must return (logits, {'features': ...}) like every zoo model), so "
                     "there is nothing to probe.")
  return int(np.prod(aux["features"].shape[1:]))


def extract_features(bundle: bundle_lib.Bundle, images_uint8: np.ndarray, batch_size: int = 500,
                     desc: str = "features", progress: bool = True) -> np.ndarray:
  """Frozen penultimate features (N x D, eval mode) of uint8 images; one compiled batch shape."""
  spec = bundle.spec
  mean, std = jnp.asarray(spec.mean, jnp.float32), jnp.asarray(spec.std, jnp.float32)
  variables = {"params": bundle.variables["params"],
               "batch_stats": bundle.variables["batch_stats"]}
  model = bundle.model
  return evaluate.map_batches(lambda b: _features(model, variables, b, mean, std), images_uint8,
                              batch_size, desc, progress)


def _check_splits(train: data_lib.Dataset, test: data_lib.Dataset) -> None:
  if train.class_names != test.class_names:
    raise ValueError(f"the train split has classes {train.class_names[:5]} ({train.num_classes}) "
                     f"but the test split {test.class_names[:5]} ({test.num_classes}); both "
                     "splits must have the same classes in the same order.")


def _draw_indices(train: data_lib.Dataset, shots: int | str, draws: int, seed: int
                  ) -> list[np.ndarray]:
  if shots == ALL:
    return [np.arange(len(train))]
  return [fewshot.draw_shots(train.labels, train.num_classes, shots, seed, d, train.class_names)
          for d in range(draws)]


def _digest(indices: np.ndarray) -> str:
  """Names a draw's training images compactly: equal digests, equal draws."""
  return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


def _summary(protocol: str, shots: int | str, per_draw: list[dict]) -> dict:
  top1 = np.array([d["top1"] for d in per_draw])
  summary = {"protocol": protocol, "shots": shots, "mean": float(top1.mean()),
             "std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
             "num_draws": len(top1)}
  if protocol == "linear":
    summary["C_per_draw"] = [d["C"] for d in per_draw]
  return {**summary, "draws": per_draw}


def _knn_draw(train_f, train_y, test_f, test_y, idx, num_classes: int, k: int) -> dict:
  pred = fewshot.knn_predict(train_f[idx], train_y[idx], test_f, num_classes, k)
  return {"top1": float(np.mean(pred == test_y) * 100), "k": min(k, len(idx))}


def _linear_draw(train_f, train_y, test_f, test_y, idx, split) -> dict:
  fit, held, how = split
  out = fewshot.linear_probe(train_f, train_y, test_f, test_y, idx, fit, held)
  return {**out, "c_selection": how}


def _finetune_draw(bundle, train: data_lib.Dataset, test: data_lib.Dataset, idx,
                   config: finetune_lib.FinetuneConfig, seed: int, draw: int, batch_size: int,
                   progress: bool) -> dict:
  model, variables, loss = finetune_lib.finetune(
      bundle, train.images[idx], train.labels[idx], train.num_classes, config, seed, draw,
      progress)
  logits = evaluate.predict(model, variables, test.images, bundle.spec.mean, bundle.spec.std,
                            batch_size, progress)
  return {"top1": float(np.mean(logits.argmax(-1) == test.labels) * 100),
          "final_train_loss": loss}


def probe(bundle: bundle_lib.Bundle, train: data_lib.Dataset, test: data_lib.Dataset,
          protocols: list[str], shots_list: list[int | str], draws: int = 3, seed: int = 0,
          knn_k: int = fewshot.KNN_K, finetune_config: finetune_lib.FinetuneConfig | None = None,
          batch_size: int = 500, progress: bool = True) -> list[dict]:
  """One summary per (protocol, shots): mean and std of top-1 (%) over draws, and each draw."""
  _check_splits(train, test)
  for split in (train, test):
    evaluate.check_image_size(bundle.spec, split)
  check_features(bundle)
  # Every draw is made (and a short class refused) before any slow work, and so is the linear
  # probe's held-out part of each draw (for 1 shot, images from the rest of the split).
  indices = {shots: _draw_indices(train, shots, draws, seed) for shots in shots_list}
  splits = {(shots, d): fewshot.held_out_split(train.labels, idx, seed, d)
            for shots in shots_list for d, idx in enumerate(indices[shots])} \
      if "linear" in protocols else {}
  if any(p != "finetune" for p in protocols):
    # Frozen features of the train images a draw or held-out part uses, and no others (a 1-shot
    # probe of 50,000 images extracts a few dozen), extracted once for all draws.
    used = np.unique(np.concatenate(
        [i for idxs in indices.values() for i in idxs]
        + [part for fit, held, _ in splits.values() for part in (fit, held)]).astype(np.int64))
    train_f = extract_features(bundle, train.images[used], batch_size, "features (train)",
                               progress)
    train_y = train.labels[used]
    test_f = extract_features(bundle, test.images, batch_size, "features (test)", progress)
    local = lambda a: np.searchsorted(used, a)   # train index -> row of train_f
  finetune_config = finetune_config or finetune_lib.FinetuneConfig()
  results = []
  for protocol in protocols:
    for shots in shots_list:
      per_draw = []
      for d, idx in enumerate(indices[shots]):
        if protocol == "knn":
          row = _knn_draw(train_f, train_y, test_f, test.labels, local(idx), train.num_classes,
                          knn_k)
        elif protocol == "linear":
          fit, held, how = splits[(shots, d)]
          row = _linear_draw(train_f, train_y, test_f, test.labels, local(idx),
                             (local(fit), local(held), how))
        else:
          row = _finetune_draw(bundle, train, test, idx, finetune_config, seed, d, batch_size,
                               progress)
        per_draw.append({"draw": d, "train_images": len(idx), "indices_sha256": _digest(idx),
                         **row})
      results.append(_summary(protocol, shots, per_draw))
  return results


def format_table(results: list[dict]) -> str:
  """protocol x shots: mean +- std of top-1 over draws, and the number of draws."""
  lines = [f"{'protocol':<9} {'shots':>5}  {'top-1 (%)':>15}  draws"]
  for r in results:
    cell = f"{r['mean']:6.2f} ± {r['std']:5.2f}"
    lines.append(f"{r['protocol']:<9} {r['shots']!s:>5}  {cell:>15}  {r['num_draws']:>5}")
  return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, help="model bundle directory")
  parser.add_argument("--data", required=True, help=data_lib.SPEC_HELP.capitalize())
  parser.add_argument("--train-split", default="train", help="fits the probe (default: train)")
  parser.add_argument("--test-split", default="test", help="scores it (default: test)")
  parser.add_argument("--protocol", type=parse_protocols, default=["linear", "knn"],
                      help=f"comma-separated, of {', '.join(PROTOCOLS)} (default: linear,knn)")
  parser.add_argument("--shots", type=parse_shots, default=[ALL, 10, 1],
                      help="comma-separated labelled images per class, or all (default: all,10,1)")
  parser.add_argument("--draws", type=_positive_int, default=3,
                      help="random draws per few-shot setting (all is one draw; default: 3)")
  parser.add_argument("--seed", type=_seed, default=0, help="seeds the draws (default: 0)")
  parser.add_argument("--knn-k", type=_positive_int, default=fewshot.KNN_K,
                      help=f"neighbours (capped at the training set's size; default: "
                           f"{fewshot.KNN_K})")
  parser.add_argument("--finetune-epochs", type=_positive_int,
                      default=finetune_lib.FinetuneConfig.epochs,
                      help="epochs of the finetune protocol over each draw (default: "
                           f"{finetune_lib.FinetuneConfig.epochs})")
  parser.add_argument("--finetune-lr", type=float,
                      default=finetune_lib.FinetuneConfig.learning_rate,
                      help="its peak learning rate, SGD with momentum and a cosine decay "
                           f"(default: {finetune_lib.FinetuneConfig.learning_rate})")
  parser.add_argument("--finetune-batch-size", type=_positive_int,
                      default=finetune_lib.FinetuneConfig.batch_size,
                      help="its batch size, capped at the draw's size (default: "
                           f"{finetune_lib.FinetuneConfig.batch_size})")
  parser.add_argument("--batch-size", type=_positive_int, default=500,
                      help="images per forward pass when extracting features")
  parser.add_argument("--out", help="write every number (per draw too) to this JSON file")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the --out file if it exists (refused otherwise)")


def run(args: argparse.Namespace) -> int:
  if args.out:
    atomic_files.refuse_existing(args.out, args.overwrite)
  bundle = bundle_lib.load_bundle(args.model)
  warning = bundle_lib.untrained_warning(bundle.spec)
  if warning:
    print(f"{args.model}: {warning}", file=sys.stderr)
  feature_dim = check_features(bundle)  # before the (slow) data: a bundle fault first
  train = data_lib.load_dataset(args.data, args.train_split, progress=True)
  test = data_lib.load_dataset(args.data, args.test_split, progress=True)
  if bundle.spec.class_names and ([class_names.name_key(n) for n in train.class_names]
                                  != [class_names.name_key(n) for n in bundle.spec.class_names]):
    # Not an error: every protocol fits its own head on the data's labels (train and test splits
    # are checked against each other), so the model's own class order plays no part.
    print(f"Note: the data's classes ({', '.join(train.class_names[:4])}, ...) are not the "
          "model's; the probes fit their own heads, so this only means probing on new classes.")
  ft = finetune_lib.FinetuneConfig(epochs=args.finetune_epochs, learning_rate=args.finetune_lr,
                                   batch_size=args.finetune_batch_size)
  results = probe(bundle, train, test, args.protocol, args.shots, args.draws, args.seed,
                  args.knn_k, ft, args.batch_size)
  print(f"{bundle.spec.arch} features ({feature_dim}-d) on {args.data}: fit on {args.train_split} "
        f"({len(train)} images), scored on {args.test_split} ({len(test)} images)")
  print(format_table(results))
  if args.out:
    report = {
        "command": sys.argv,
        "model": {"bundle": os.path.abspath(args.model), "arch": bundle.spec.arch,
                  "num_classes": bundle.spec.num_classes, "feature_dim": feature_dim},
        "data": {"spec": args.data,
                 "path": (None if args.data.startswith(data_lib.TFDS_PREFIX)
                          else os.path.abspath(args.data)),
                 "train_split": args.train_split, "test_split": args.test_split, "class_names": train.class_names,
                 "train_images": len(train), "test_images": len(test)},
        "seed": args.seed, "draws": args.draws,
        "settings": {
            "linear": {"C_grid": list(fewshot.C_GRID), "standardised": True,
                       "held_out_fraction": fewshot.HELD_OUT_FRACTION,
                       "one_shot_held_out_per_class": fewshot.REST_HELD_OUT_PER_CLASS,
                       "C_choice": "best held-out top-1, ties to the lower held-out log-loss; "
                                   "then refit on the whole draw"},
            "knn": {"k": args.knn_k, "similarity": "cosine", "vote_weight": "similarity"},
            "finetune": {**vars(ft), "optimizer": "SGD momentum, cosine LR, weight decay",
                         "augment": "random crop (zero padding) + horizontal flip",
                         "head": "fresh, sized for the data's classes"},
            "std": "sample standard deviation over draws (ddof=1); 0 for one draw"},
        "results": results,
    }
    atomic_files.write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.out}")
  return 0
