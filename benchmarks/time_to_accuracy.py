r"""Time-to-accuracy of two or more runs: CEND's efficiency claim, measured rather than assumed.

The paper reports CEND reaching its result 1.37x (R34->R18) and 1.71x (W402->W161)
faster than plain noise. Given run directories of `caedfkd distill` with periodic
evaluation (--config.eval_data), this reads each run's metrics.jsonl and reports,
per accuracy threshold, the training time (time/train_minutes: cumulative across
resumes, evaluation excluded) at the first evaluation at or above it, and each
run's speed-up over the first run named.

  python -m benchmarks.time_to_accuracy runs/r56_r20_gaussian runs/r56_r20_cend \
      --thresholds 20,30,35,40 --plot runs/cend_time_to_accuracy.png

Besides the fixed thresholds, "common best" is the highest accuracy every run
reached (the smallest of the runs' best accuracies).
"""

import argparse
import json
import os
import sys


def load_curve(run_dir: str) -> list[tuple[float, float]]:
  """[(train minutes, top-1 %)] of a run's evaluations, in order."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: pass a `caedfkd distill` --workdir.")
  curve = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if "eval/top1" in row:
        minutes = row.get("time/train_minutes", row.get("time/minutes"))
        curve.append((float(minutes), float(row["eval/top1"])))
  if not curve:
    raise ValueError(f"{path} has no eval/top1: run with --config.eval_data=PATH so the student "
                     "is evaluated every epoch.")
  return curve


def time_to(curve: list[tuple[float, float]], threshold: float) -> float | None:
  """Minutes at the first evaluation with top-1 >= threshold, or None if never reached."""
  return next((minutes for minutes, top1 in curve if top1 >= threshold), None)


def compare(runs: dict[str, list[tuple[float, float]]], thresholds: list[float]) -> list[dict]:
  """One row per threshold (plus "common best"): each run's minutes and speed-up over the first."""
  common_best = min(max(top1 for _, top1 in curve) for curve in runs.values())
  rows = []
  for label, threshold in [*((f"{t:g}%", t) for t in thresholds),
                           (f"common best {common_best:.2f}%", common_best)]:
    minutes = {name: time_to(curve, threshold) for name, curve in runs.items()}
    base = next(iter(minutes.values()))
    speedup = {name: (base / m if base is not None and m else None) for name, m in minutes.items()}
    rows.append({"threshold": label, "minutes": minutes, "speedup_vs_first": speedup})
  return rows


def format_table(rows: list[dict], names: list[str]) -> str:
  first = names[0]
  header = ["top-1 reached", *(f"{n} (min)" for n in names), *(f"{n} vs {first}" for n in names[1:])]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["threshold"]]
    cells += ["not reached" if row["minutes"][n] is None else f"{row['minutes'][n]:.2f}" for n in names]
    cells += ["-" if row["speedup_vs_first"][n] is None else f"{row['speedup_vs_first'][n]:.2f}x"
              for n in names[1:]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs: dict[str, list[tuple[float, float]]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in runs.items():
    ax.plot([m for m, _ in curve], [t for _, t in curve], "o-", label=name)
  ax.set_xlabel("training minutes (evaluation excluded)")
  ax.set_ylabel("student top-1 (%)")
  ax.set_title("Time to accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="run directories; the first is the baseline")
  parser.add_argument("--names", help="comma-separated labels (default: directory names)")
  parser.add_argument("--thresholds", default="20,30,40", help="top-1 %% thresholds")
  parser.add_argument("--plot", help="write accuracy-vs-time curves to this PNG")
  parser.add_argument("--out_json", help="write the rows as JSON")
  args = parser.parse_args(argv)
  names = args.names.split(",") if args.names else [os.path.basename(os.path.normpath(r))
                                                    for r in args.runs]
  if len(names) != len(args.runs):
    parser.error(f"{len(names)} names for {len(args.runs)} runs")
  try:
    runs = {name: load_curve(run) for name, run in zip(names, args.runs)}
  except (FileNotFoundError, ValueError) as e:
    print(f"time_to_accuracy: error: {e}", file=sys.stderr)
    return 2
  rows = compare(runs, [float(t) for t in args.thresholds.split(",")])
  print(format_table(rows, names))
  if args.plot:
    plot(runs, args.plot)
    print(f"plot: {args.plot}")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump({"runs": runs, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
