"""`caedfkd train` beside the same recipe in a plain PyTorch loop, on the same machine.

    python -m benchmarks.train_side_by_side --data ../shared/data/cifar10 --minutes 30 \
        --epochs 8 --out docs/train_side_by_side.json

Both sides get the same data and protocol, fixed here before any run:
- resnet20 (akamaster layout) on the CIFAR-10 train split less a stratified 10% held out
  (`train_supervised.holdout_indices`, seed 0), the same images in the same order every epoch
  (`io.data.epoch_order`), the same normalisation (the train images' channel mean and std);
- SGD 0.1, momentum 0.9, weight decay 5e-4 on every parameter, batch 128 (last partial batch
  dropped), cosine to 0 over `--epochs` epochs stepped every step, random 4-pixel zero-padded
  crop + horizontal flip;
- after every epoch the held-out part and the test split are scored (eval mode), outside the
  train time; the wall-clock budget (`--minutes`) counts everything after the data is decoded,
  compilation included.
What differs: the initialisation (Flax's and PyTorch's own) and the random draws of the
augmentation. The sides run one after the other in separate processes (`--side`), each with the
machine's cores. Prints one markdown table and writes every row to `--out`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from caedfkd_jax.config import train_defaults
from caedfkd_jax.engine import train_supervised as ts
from caedfkd_jax.io import data as data_lib


def recipe(args) -> "train_defaults.ml_collections.ConfigDict":
  config = train_defaults.get_config()
  config.recipe = "side_by_side"
  config.arch = args.arch
  config.data = args.data
  config.epochs = args.epochs
  config.batch_size = args.batch_size
  config.time_budget_minutes = args.minutes
  config.compilation_cache_dir = ""        # Compilation counts, as a first run's would.
  config.compute_dtype = args.compute_dtype
  return config


def jax_side(args) -> list[dict]:
  config = recipe(args)
  with tempfile.TemporaryDirectory() as workdir:
    ts.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  return [{"epoch": r["epoch"], "train_seconds": r["time/epoch_seconds"],
           "images_per_second": r["train/images_per_second"], "loss": r["train/loss"],
           "holdout_top1": r["holdout/top1"], "test_top1": r["test/top1"],
           "wall_minutes": r["time/minutes"]} for r in rows]


def torch_side(args) -> list[dict]:
  import torch
  import torch.nn.functional as F
  from caedfkd_jax.io import torch_zoo
  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  # "auto" as the JAX side: bf16 autocast on a GPU, float32 on a CPU.
  bf16 = args.compute_dtype == "bfloat16" or (args.compute_dtype == "auto" and device.type != "cpu")
  config = recipe(args)
  splits = ts.load_splits(config, progress=False)
  train = splits.train
  mean, std = ts.channel_stats(train.images)
  mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
  std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
  # The split on the device as uint8, as the JAX side holds it.
  images = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(train.labels.astype(np.int64)).to(device)
  model = torch_zoo.build(config.arch, train.num_classes).to(device)
  forward = torch.compile(model) if args.torch_compile else model
  steps_per_epoch = len(train) // config.batch_size
  total = config.epochs * steps_per_epoch
  opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                        weight_decay=config.weight_decay)
  # optax.cosine_decay_schedule, stepped every step.
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
  pad = config.padding

  def augment(batch_uint8):
    x = batch_uint8.float().div_(255)
    x = F.pad(x, (pad, pad, pad, pad))
    b, _, h, w = batch_uint8.shape
    # Per-sample crops as one gather (no Python loop over the batch, so a GPU is not starved).
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=device)
    rows = (dy + torch.arange(h, device=device).view(1, h, 1)).expand(b, h, w)
    cols = (dx + torch.arange(w, device=device).view(1, 1, w)).expand(b, h, w)
    flip = (torch.rand(b, device=device) < 0.5).view(b, 1, 1)
    cols = torch.where(flip, cols.flip(-1), cols)
    flat = (rows * (w + 2 * pad) + cols).view(b, 1, h * w).expand(b, 3, h * w)
    out = x.view(b, 3, -1).gather(2, flat).view(b, 3, h, w)
    return (out - mean_t) / std_t

  @torch.no_grad()
  def top1(dataset):
    model.eval()
    correct = 0
    for start in range(0, len(dataset), 500):
      x = torch.from_numpy(dataset.images[start:start + 500]).to(device).permute(0, 3, 1, 2)
      logits = model((x.float() / 255 - mean_t) / std_t)
      correct += int((logits.argmax(-1).cpu().numpy() == dataset.labels[start:start + 500]).sum())
    model.train()
    return correct / len(dataset) * 100

  rows, start, paused = [], time.time(), 0.0
  budget = args.minutes * 60
  for epoch in range(config.epochs):
    order = torch.from_numpy(
        data_lib.epoch_order(config.seed, epoch, len(train), config.batch_size))
    epoch_start, losses = time.time(), []
    model.train()
    stopped = False
    for step in range(steps_per_epoch):
      idx = order[step].to(device)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(augment(images[idx]))
      loss = F.cross_entropy(logits.float(), labels[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
      losses.append(loss.detach())
      if time.time() - start > budget:
        stopped = True
        break
    if stopped:
      print(f"torch: the time budget ended in epoch {epoch + 1}", flush=True)
      break
    losses = [float(v) for v in losses]    # One sync an epoch (a GPU queues the steps).
    seconds = time.time() - epoch_start
    eval_start = time.time()
    holdout, test = top1(splits.holdout), top1(splits.test)
    paused += time.time() - eval_start
    rows.append({"epoch": epoch + 1, "train_seconds": seconds,
                 "images_per_second": steps_per_epoch * config.batch_size / seconds,
                 "loss": float(np.mean(losses)), "holdout_top1": holdout, "test_top1": test,
                 "wall_minutes": (time.time() - start) / 60})
    print(f"torch epoch {epoch + 1}: {rows[-1]}", flush=True)
    if time.time() - start > budget:
      break
  return rows


def table(results: dict[str, list[dict]]) -> str:
  sides = list(results)
  epochs = max((len(rows) for rows in results.values()), default=0)
  head = "| epoch | " + " | ".join(f"{s}: test top-1 | {s}: held-out top-1 | {s}: train s"
                                     for s in sides) + " |"
  lines = [head, "|" + "---|" * (1 + 3 * len(sides))]
  for e in range(epochs):
    cells = []
    for s in sides:
      rows = results[s]
      if e < len(rows):
        r = rows[e]
        cells += [f"{r['test_top1']:.2f}", f"{r['holdout_top1']:.2f}", f"{r['train_seconds']:.0f}"]
      else:
        cells += ["(budget spent)", "", ""]
    lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="CIFAR-10 (or any) data spec with train/test")
  parser.add_argument("--arch", default="resnet20")
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget per side")
  parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores)")
  parser.add_argument("--compute-dtype", default="auto",
                      help="auto (bf16 on GPUs, f32 on CPUs), float32 or bfloat16; both sides")
  parser.add_argument("--torch-compile", action="store_true",
                      help="the PyTorch side runs torch.compile(model) (GPU checklist)")
  parser.add_argument("--side", choices=("both", "jax", "torch"), default="both")
  parser.add_argument("--out", help="write the rows of every side to this JSON file")
  args = parser.parse_args(argv)
  if args.side != "both":
    rows = jax_side(args) if args.side == "jax" else torch_side(args)
    print("ROWS " + json.dumps(rows), flush=True)
    return 0
  results = {}
  for side in ("jax", "torch"):   # Separate processes: neither warms the other's caches.
    cmd = [sys.executable, "-m", "benchmarks.train_side_by_side", "--side", side,
           *[a for a in (argv if argv is not None else sys.argv[1:])
             if a not in ("--side", "both")]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith("ROWS "))
    results["caedfkd-jax" if side == "jax" else "PyTorch"] = json.loads(line[5:])
  print(table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M"),
                 "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
