r"""Issue 27's study: the paper's Table V in miniature, on procedural NYUv2-layout data (CPU).

The protocol (backbones, seeds, settings, metrics, comparisons) is fixed in docs/results.md,
"Transfer at CPU scale"; this script only runs it and summarises. Each run is one
`caedfkd transfer` invocation in runs/transfer_cpu/PROTOCOL/BACKBONE/sS (resumable: a finished
seed is read back, an unfinished one resumes), so the study can be run a few backbones at a time:

  caedfkd dense-data --out runs/transfer_cpu/data --cifar ../shared/data/cifar10 \
      --train 200 --val 100 --size 64x64
  python -m benchmarks.transfer_study --backbones random,supervised,base,cend_cncl
  python -m benchmarks.transfer_study --summary   # every backbone whose seeds all finished

Writes study.json and study.md in runs/transfer_cpu.
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from caedfkd_jax.engine import runs as runs_lib
from caedfkd_jax.io import atomic_files

ROOT = "runs/transfer_cpu"
DATA = f"{ROOT}/data"
SUPERVISED = "runs/teachers/resnet20"   # caedfkd convert of akamaster's resnet20
STUDENTS = "runs/noisy_r56/{arm}/student/run_{seed:02d}"
SEEDS = 3
# backbone -> (bundle path, with {seed} for per-seed students; random init?)
BACKBONES: dict[str, tuple[str, bool]] = {
    "random": (SUPERVISED, True),
    "supervised": (SUPERVISED, False),
    **{arm: (STUDENTS.replace("{arm}", arm), False)
       for arm in ("base", "cend", "cend_cncl", "gaussian", "cend_pg", "cend_cncl_pg", "cmi",
                   "cmi_cend_cncl")},
}
# The protocol's settings (docs/results.md, the addendum fixed before the first transfer run).
PROTOCOLS: dict[str, list[str]] = {
    "frozen": ["--protocol", "frozen", "--epochs", "8", "--lr", "1e-3", "--lr-halve-every", "0",
               "--augment"],
    "finetune": ["--protocol", "finetune", "--head", "deeplabv3", "--head-features", "64",
                 "--aspp-rates", "2,4,6", "--epochs", "8", "--lr", "1e-3",
                 "--lr-halve-every", "0", "--augment"],
}
# (task, metric, label, digits in %?)
METRICS = (("segmentation", "miou", "mIoU %", True), ("segmentation", "pixel_acc", "pAcc %", True),
           ("depth", "abs_err", "depth abs err", False), ("depth", "rel_err", "depth rel err", False),
           ("normal", "mean_angle", "normal mean°", False),
           ("normal", "within_11.25", "normal <11.25° %", True))
# Paired comparisons: (minuend, subtrahend).
COMPARISONS = (("cend", "base"), ("cend_cncl", "base"), ("gaussian", "base"),
               ("cend_cncl", "cend"), ("cmi_cend_cncl", "cmi"), ("cend_pg", "cend"),
               ("cend_cncl_pg", "cend_cncl"), ("supervised", "random"),
               *((arm, "random") for arm in ("base", "cend", "cend_cncl", "gaussian", "cmi",
                                              "cmi_cend_cncl", "cend_pg", "cend_cncl_pg")))


def out_dir(protocol: str, backbone: str, seed: int) -> str:
  return os.path.join(ROOT, protocol, backbone, f"s{seed}")


def result_path(protocol: str, backbone: str, seed: int) -> str:
  return os.path.join(out_dir(protocol, backbone, seed), f"seed_{seed}", "result.json")


def command(protocol: str, backbone: str, seed: int) -> list[str]:
  path, random_init = BACKBONES[backbone]
  cmd = ["caedfkd", "transfer", "--model", path.format(seed=seed), "--data", DATA,
         "--out", out_dir(protocol, backbone, seed), "--seeds", str(seed), "--no-progress",
         *PROTOCOLS[protocol]]
  return cmd + (["--random-init"] if random_init else [])


def run_all(backbones: list[str], protocols: list[str], seeds: int) -> None:
  for backbone in backbones:
    for seed in range(seeds):
      for protocol in protocols:
        if os.path.exists(result_path(protocol, backbone, seed)):
          continue
        cmd = command(protocol, backbone, seed)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def read(protocol: str, backbone: str, seeds: int) -> list[dict[str, Any]] | None:
  """Every seed's result, or None while one is missing."""
  paths = [result_path(protocol, backbone, s) for s in range(seeds)]
  if not all(os.path.exists(p) for p in paths):
    return None
  out = []
  for p in paths:
    with open(p) as f:
      out.append(json.load(f))
  return out


def value(result: dict, task: str, metric: str, percent: bool) -> float:
  v = result[task][metric]
  return 100.0 * v if percent else v


def summarize(seeds: int) -> dict[str, Any]:
  summary: dict[str, Any] = {}
  for protocol in PROTOCOLS:
    done = {b: r for b in BACKBONES if (r := read(protocol, b, seeds)) is not None}
    per_backbone = {b: {label: {"per_seed": (vals := [value(x, t, m, p) for x in r]),
                                **runs_lib.interval95(vals)}
                        for t, m, label, p in METRICS} for b, r in done.items()}
    differences = {}
    for a, b in COMPARISONS:
      if a in done and b in done:
        differences[f"{a} - {b}"] = {
            label: {"per_seed": (d := np.subtract(per_backbone[a][label]["per_seed"],
                                                  per_backbone[b][label]["per_seed"]).tolist()),
                    **runs_lib.interval95(d)}
            for _, _, label, _ in METRICS}
    summary[protocol] = {"backbones": per_backbone, "differences": differences}
  return summary


def _cell(s: dict[str, Any]) -> str:
  if s.get("std") is None:
    return "n/a" if s.get("mean") is None else f"{s['mean']:.2f}"
  return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['ci95_low']:.2f}, {s['ci95_high']:.2f}]"


def format_markdown(summary: dict[str, Any]) -> str:
  labels = [label for _, _, label, _ in METRICS]
  lines = []
  for protocol, s in summary.items():
    if not s["backbones"]:
      continue
    lines += [f"**{protocol}**: mean ± std [95% CI] over seeds", "",
              "| backbone | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(_cell(v[label]) for label in labels) + " |"
              for b, v in s["backbones"].items()]
    if s["differences"]:
      lines += ["", f"**{protocol}**: paired per seed, mean ± std [95% CI] (* beyond the spread)",
                "", "| difference | " + " | ".join(labels) + " |",
                "|---" * (len(labels) + 1) + "|"]
      for name, d in s["differences"].items():
        cells = []
        for label in labels:
          x = d[label]
          beyond = x.get("ci95_low") is not None and (x["ci95_low"] > 0 or x["ci95_high"] < 0)
          cells.append(_cell(x) + (" *" if beyond else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbones", default="",
                      help=f"comma-separated, of {', '.join(BACKBONES)} (default: none: "
                           "summarise only)")
  parser.add_argument("--protocols", default=",".join(PROTOCOLS))
  parser.add_argument("--seeds", type=int, default=SEEDS)
  parser.add_argument("--summary", action="store_true", help="summarise without running")
  args = parser.parse_args(argv)
  backbones = [b for b in args.backbones.split(",") if b]
  unknown = [b for b in backbones if b not in BACKBONES]
  if unknown:
    parser.error(f"unknown backbones {unknown}; known: {', '.join(BACKBONES)}")
  if backbones and not args.summary:
    run_all(backbones, [p for p in args.protocols.split(",") if p], args.seeds)
  summary = summarize(args.seeds)
  text = format_markdown(summary)
  print(text)
  atomic_files.write_text(os.path.join(ROOT, "study.json"), json.dumps(summary, indent=2) + "\n")
  atomic_files.write_text(os.path.join(ROOT, "study.md"), text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
