"""`caedfkd transfer`: fine-tune a bundle's backbone on dense tasks, as the paper's Tables V-VI.

NYUv2 in MTAN's layout trains LibMTL's three tasks (segmentation, depth, normals) with one head
each; ADE20K-style image/mask folders train segmentation. Each seed runs in OUT/seed_S (resumable:
rerun the same command), and OUT/results.json gathers every metric of every seed.
"""

import argparse
import json
import os
import sys

import numpy as np

from caedfkd_jax.io import atomic_files
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.runtime import interrupts
from caedfkd_jax.transfer import data as data_lib
from caedfkd_jax.transfer import model as model_lib
from caedfkd_jax.transfer import train as train_lib

DEFAULTS = train_lib.TransferConfig()
# (task, metric, label, higher is better) in the table's columns.
COLUMNS = (("segmentation", "miou", "mIoU", True), ("segmentation", "pixel_acc", "pAcc", True),
           ("depth", "abs_err", "abs err", False), ("depth", "rel_err", "rel err", False),
           ("normal", "mean_angle", "mean°", False), ("normal", "median_angle", "median°", False),
           ("normal", "within_11.25", "<11.25°", True), ("normal", "within_22.5", "<22.5°", True),
           ("normal", "within_30", "<30°", True))


def parse_seeds(text: str) -> list[int]:
  """"0", "0,1,2" or "0-2"."""
  try:
    if "-" in text.strip("-"):
      lo, hi = text.split("-", 1)
      seeds = list(range(int(lo), int(hi) + 1))
    else:
      seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: give seeds as 0, 0,1,2 or 0-2") from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds >= 0, e.g. 0-2")
  return seeds


def parse_ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 6,12,18") \
        from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 6,12,18")
  return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True,
                      help="model bundle directory (its arch, weights and normalisation)")
  parser.add_argument("--data", required=True,
                      help=f"dense data: {data_lib.NYU_LAYOUT}; or {data_lib.SEG_LAYOUT}")
  parser.add_argument("--out", required=True,
                      help="folder for OUT/seed_S (checkpoints, result, PNG) and results.json")
  parser.add_argument("--protocol", choices=model_lib.PROTOCOLS, default=DEFAULTS.protocol,
                      help="finetune: every weight (the paper); frozen: the heads only, the "
                           "backbone in eval mode (a cheap probe) (default: finetune)")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated subset of the data's tasks (segmentation, depth, "
                           "normal), or all (default)")
  parser.add_argument("--head", choices=model_lib.HEADS,
                      help="head per task (default: deeplabv3plus for finetune, linear for frozen)")
  parser.add_argument("--head-features", type=int, default=DEFAULTS.head_features,
                      help="ASPP and decoder width (default: 256, DeepLab's)")
  parser.add_argument("--aspp-rates", type=parse_ints,
                      help="ASPP's three atrous rates (default: 6,12,18 at output stride 16, "
                           "12,24,36 at 8, the same reach in pixels at other strides)")
  parser.add_argument("--output-stride", type=int, choices=(8, 16, 32),
                      help="dilate a Bottleneck ResNet's last stages (resnet50: 8 as LibMTL)")
  parser.add_argument("--seeds", type=parse_seeds, default=[0],
                      help="heads' initialisation, batch order and augmentation (0, 0,1,2 or "
                           "0-2; default: 0)")
  parser.add_argument("--random-init", action="store_true",
                      help="fresh backbone weights from each seed (the random-initialisation "
                           "row); the bundle gives only the arch and normalisation")
  parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                      help="default: 200 (LibMTL)")
  parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                      help="default: 8 (LibMTL)")
  parser.add_argument("--lr", type=float, default=DEFAULTS.learning_rate,
                      help="Adam's learning rate (default: 1e-4, LibMTL)")
  parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                      help="L2 added to the gradient, as torch Adam's (default: 1e-5, LibMTL)")
  parser.add_argument("--lr-halve-every", type=int, default=DEFAULTS.lr_halve_every,
                      help="epochs between halvings of the learning rate, 0 for none "
                           "(default: 100, LibMTL's StepLR)")
  parser.add_argument("--augment", action="store_true",
                      help="random scale-crop (1.0/1.2/1.5) and flip on NYUv2, resize-crop and "
                           "flip on segmentation folders (off by default, as LibMTL's --aug)")
  parser.add_argument("--eval-batch-size", type=int, default=DEFAULTS.eval_batch_size,
                      help="images per forward pass when scoring (default: 8)")
  parser.add_argument("--train-split", default="train", help="trains (default: train)")
  parser.add_argument("--val-split", default="val",
                      help="scores (default: val, MTAN's name for NYUv2's test split)")
  parser.add_argument("--num-classes", type=int,
                      help="NYUv2-layout data: its class count (default: 13, or the lines of "
                           "ROOT/classes.txt where it exists)")
  parser.add_argument("--class-names", help="segmentation folders: the masks' class list file")
  parser.add_argument("--size", type=int,
                      help="segmentation folders of mixed sizes: shorter side resized, centre "
                           "crop SIZE x SIZE")
  parser.add_argument("--predictions", action="store_true",
                      help="also write the validation predictions to OUT/seed_S/predictions/"
                           "{segmentation,depth,normal}.npy (argmax ids, depth, unit normals)")
  parser.add_argument("--time-budget-minutes", type=float, default=0.0,
                      help="checkpoint and stop a seed after this many minutes (rerun to go on)")
  parser.add_argument("--checkpoint-every-minutes", type=float,
                      default=DEFAULTS.checkpoint_every_minutes,
                      help="while a seed trains (default: 5)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def nyu_classes(data: str, num_classes: int | None) -> tuple[int | None, list[str] | None]:
  """NYUv2-layout class count and names: --num-classes, else ROOT/classes.txt (the procedural
  maker writes it), else NYUv2's 13."""
  path = os.path.join(data, "classes.txt")
  names = None
  if os.path.isfile(path):
    with open(path) as f:
      names = [line.strip() for line in f if line.strip()]
  if num_classes is None:
    return (len(names) if names else None), names
  return num_classes, (names if names and len(names) == num_classes else None)


def load_splits(args) -> tuple[data_lib.DenseDataset, data_lib.DenseDataset]:
  path = os.path.abspath(os.path.expanduser(args.data))
  layout = None if args.data.startswith(data_lib.TFDS_PREFIX) else data_lib.find_dense_layout(path)
  num_classes, names = (nyu_classes(path, args.num_classes) if layout == "nyu"
                        else (args.num_classes, None))
  datasets = [data_lib.load_dense(args.data, split, num_classes=num_classes,
                                  class_names_file=args.class_names, size=args.size)
              for split in (args.train_split, args.val_split)]
  if names:
    for d in datasets:
      d.class_names = names
  train, val = datasets
  if train.image_shape != val.image_shape or train.tasks != val.tasks:
    raise ValueError(f"{args.train_split} is {train.image_shape} with {train.tasks}, "
                     f"{args.val_split} is {val.image_shape} with {val.tasks}: the splits must "
                     "match.")
  if args.tasks != "all":
    wanted = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in wanted if t not in train.tasks]
    if not wanted or unknown:
      raise ValueError(f"--tasks {args.tasks}: this data has {', '.join(train.tasks)}.")
    if "segmentation" not in wanted:
      raise ValueError(f"--tasks {args.tasks}: segmentation is always trained (every dense "
                       "dataset has labels); add it.")
    for d in datasets:
      for task in ("depth", "normal"):
        if task not in wanted:
          setattr(d, task, None)
  return train, val


def summarise(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
  """Per task and metric: mean and sample std over seeds."""
  out = {}
  for task, metric, _, _ in COLUMNS:
    values = [r[task][metric] for r in results if task in r]
    if values:
      out.setdefault(task, {})[metric] = {
          "mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
  return out


def format_table(results: list[dict]) -> str:
  """One row a seed, then the mean ± std; percentages for mIoU, pAcc and the shares."""
  cols = [c for c in COLUMNS if any(c[0] in r for r in results)]
  pct = lambda task, metric: metric in ("miou", "pixel_acc") or metric.startswith("within")
  cell = lambda task, metric, v: f"{100 * v:.2f}" if pct(task, metric) else f"{v:.4g}"
  header = ["seed"] + [label + (" %" if pct(t, m) else "") for t, m, label, _ in cols]
  rows = [[str(r["seed"])] + [cell(t, m, r[t][m]) for t, m, _, _ in cols] for r in results]
  if len(results) > 1:
    summary = summarise(results)
    rows.append(["mean ± std"] + [
        f"{cell(t, m, summary[t][m]['mean'])} ± {cell(t, m, summary[t][m]['std'])}"
        for t, m, _, _ in cols])
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header)] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
  bundle = bundle_lib.load_bundle(args.model)
  warning = bundle_lib.untrained_warning(bundle.spec)
  if warning and not args.random_init:
    print(f"{args.model}: {warning}", file=sys.stderr)
  config = train_lib.TransferConfig(
      protocol=args.protocol, head=args.head, head_features=args.head_features,
      aspp_rates=args.aspp_rates, output_stride=args.output_stride, epochs=args.epochs,
      batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
      lr_halve_every=args.lr_halve_every, augment=args.augment,
      eval_batch_size=args.eval_batch_size, random_backbone=args.random_init,
      time_budget_minutes=args.time_budget_minutes,
      checkpoint_every_minutes=args.checkpoint_every_minutes, predictions=args.predictions,
      progress=not args.no_progress)
  train_lib.check_config(config)
  train, val = load_splits(args)
  settings = {"model": os.path.abspath(args.model),
              "model_sha256": bundle_lib.weights_sha256(bundle.variables),
              "data": os.path.abspath(args.data), "train_split": args.train_split,
              "val_split": args.val_split, "tasks": list(train.tasks),
              "num_classes": train.num_classes, **config.computing()}
  print(f"transfer: {bundle.spec.arch} ({'random init' if args.random_init else args.model}) on "
        f"{args.data}: {', '.join(train.tasks)}; {len(train)} train / {len(val)} val images of "
        f"{train.image_shape[0]}x{train.image_shape[1]}, {train.num_classes} classes; "
        f"{config.protocol}, {config.head_name} heads; seeds {args.seeds}.")
  results, pending = [], []
  with interrupts.stop_on_signals("checkpointing the seed and stopping") as stop:
    for seed in args.seeds:
      trainer = train_lib.Trainer(bundle, train, config, seed)
      result = train_lib.fit_seed(trainer, train, val, os.path.join(args.out, f"seed_{seed}"),
                                  {**settings, "seed": seed}, stop)
      if result is None:
        pending.append(seed)
        break
      results.append(result)
  if results:
    print(format_table(results))
    report = {"command": sys.argv, "settings": settings, "class_names": train.class_names,
              "seeds": [r["seed"] for r in results], "summary": summarise(results),
              "results": results,
              "unfinished_seeds": [s for s in args.seeds if s not in {r["seed"] for r in results}]}
    os.makedirs(args.out, exist_ok=True)
    atomic_files.write_text(os.path.join(args.out, "results.json"),
                            json.dumps(report, indent=2) + "\n")
    print(f"results written to {os.path.join(args.out, 'results.json')}; prediction figures in "
          f"{os.path.join(args.out, 'seed_S', 'predictions.png')}")
  if pending:
    print(f"seed {pending[0]} is checkpointed, not finished: rerun the same command to resume.",
          file=sys.stderr)
    return 3
  return 0
