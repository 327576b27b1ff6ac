r"""The ablation ladder on the digits demo pair, several seeds per arm, one fixed budget.

Protocol (fixed before any run; see docs/results.md): one teacher (the demo's ResNet-20
trained on 80% of scikit-learn's digits, seed 0) for every arm and seed; each arm of
`caedfkd_jax.config.ladder` (base, cend, cend_cncl, gaussian) trains `--seeds` students in one
program (`config.num_runs`, seeds 0..n-1, so seed s of one arm starts from the same
student and generator initialisation as seed s of another) on the demo's config for
exactly `--epochs` epochs, with no time budget: the result does not depend on how busy
the machine is. Metrics: final top-1 on the 360 held-out digits (primary), epochs to
80% and 90% (secondary), mean, sample standard deviation and 95% t interval over
seeds, and each arm's per-seed difference from `base`.

  python -m benchmarks.ladder_study --workdir runs/ladder_digits --seeds 5 --epochs 10

The CEND switches (`SWITCHES`: one field on top of the full method) run the same way, with the
per-seed differences taken from the full method:

  python -m benchmarks.ladder_study --workdir runs/switches_digits --seeds 5 --epochs 8 \
      --arms cend_cncl,per_group,relative,bn_mean --reference cend_cncl

The loss-weight mirror of the resnet56 pair's weight study (docs/results.md) is two more switches
on `base`:

  python -m benchmarks.ladder_study --workdir runs/loss_weights_digits --seeds 5 --epochs 8 \
      --arms base,nayer_weights,mean_r56 --reference base

Table I's image-level baselines (the `mixup` and `image_contrastive` arms) and NAYER's student
train mode in its rounds, against `base`:

  python -m benchmarks.ladder_study --workdir runs/table1_digits --seeds 5 --epochs 8 \
      --arms base,mixup,image_contrastive,base_eval_student --reference base

Every arm is an ordinary `caedfkd distill` run directory (resumable: rerun the same
command after a kill). Writes study.json and study.md in --workdir.
"""

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from caedfkd_jax.cli import demo
from caedfkd_jax.config import fields, ladder
from caedfkd_jax.engine import runs as runs_lib, train
from caedfkd_jax.io import atomic_files, bundle as bundle_lib

LEVELS = (80.0, 90.0)

# Issue 11's CEND switches, each one field on top of a ladder arm (the full method, the default),
# so a switch and its arm differ in exactly that field: name -> (arm, {"section.field": value}).
SWITCHES: dict[str, tuple[str, dict[str, Any]]] = {
    "per_group": ("cend_cncl", {"generator.noisy_chunks": "per_group"}),
    "relative": ("cend_cncl", {"cend.magnitude_scale": "relative"}),
    "bn_mean": ("cend_cncl", {"loss.bn_reduce": "mean"}),
    # The loss-weight mirror of resnet56 -> resnet20 on NAYER's base (docs/results.md): the
    # resnet56 pair's weights per layer (summed) and in total (averaged, 550 = 10 x 55 layers).
    "nayer_weights": ("base", {"loss.ce": 0.5, "loss.bn": 10.0}),
    "mean_r56": ("base", {"loss.ce": 0.5, "loss.bn": 550.0, "loss.bn_reduce": "mean"}),
    # NAYER's base with the student in eval mode in every round (the arms run NAYER's loop).
    "base_eval_student": ("base", {"student_train_mode_in_rounds": False}),
}


def prepare_teacher(workdir: str, teacher_epochs: int) -> tuple[str, str]:
  """(teacher bundle, held-out image folder), made once; seed 0 as `caedfkd demo`."""
  x_train, x_test, y_train, y_test = demo.load_digits(0)
  spec = demo.teacher_spec()
  teacher_dir = os.path.join(workdir, "teacher")
  if not bundle_lib.bundle_exists(teacher_dir):
    bundle_lib.save_bundle(teacher_dir, spec, demo.train_teacher(x_train, y_train, spec,
                                                                 teacher_epochs, 0))
  eval_dir = demo.write_image_folder(os.path.join(workdir, "heldout"), x_test, y_test,
                                     demo.DIGIT_NAMES)
  return teacher_dir, eval_dir


def arm_config(arm: str, teacher_dir: str, eval_dir: str, seeds: int, epochs: int):
  """The demo's config with a ladder arm, or a switch (its arm, then its fields), applied."""
  base_arm, switched = SWITCHES.get(arm, (arm, {}))
  config = fields.set_fields(
      ladder.apply_arm(demo.demo_config(teacher_dir, eval_dir, minutes=0.0), base_arm), switched)
  config.seed = 0
  config.num_runs = seeds
  config.epochs = epochs
  config.accuracy_levels = ()
  return config


def arm_rows(workdir: str, arm: str, seeds: int) -> list[list[dict[str, Any]]]:
  """Each seed's metrics rows (one per epoch) of an arm's run directory."""
  return [runs_lib.read_rows(os.path.join(workdir, arm, "runs", f"run_{i:02d}"))
          for i in range(seeds)]


def _paired_difference(values, reference_values) -> dict[str, Any]:
  """Seed s minus seed s of the reference, with mean, std and 95% interval over seeds."""
  diff = np.subtract(values, reference_values).tolist()
  return {"per_seed": diff, **runs_lib.interval95(diff)}


def _per_arm(values: dict[str, list[float]], reference: str) -> dict[str, dict[str, Any]]:
  """Per arm: its seeds' values with mean, std and 95% interval, and the per-seed difference
  from `reference`."""
  out = {}
  for arm, vals in values.items():
    out[arm] = {"per_seed": vals, **runs_lib.interval95(vals)}
    if arm != reference and reference in values:
      out[arm]["minus_reference"] = _paired_difference(vals, values[reference])
  return out


def _fmt_interval(s: dict[str, Any]) -> str:
  """"mean ± std [low, high]"; just the mean from one seed; n/a from none."""
  if s.get("std") is not None:
    return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['ci95_low']:.2f}, {s['ci95_high']:.2f}]"
  return "n/a" if s.get("mean") is None else f"{s['mean']:.2f}"


def _arm_cells(arm: str, s: dict[str, Any], per_seed_format: str) -> str:
  """One `_per_arm` entry as "| arm | mean ± std [CI] | per seed | minus reference |"."""
  diff = _fmt_interval(s["minus_reference"]) if "minus_reference" in s else "-"
  per_seed = ", ".join(format(v, per_seed_format) for v in s["per_seed"])
  return f"| {arm} | {_fmt_interval(s)} | {per_seed} | {diff} |"


def summarize(rows_by_arm: dict[str, list[list[dict[str, Any]]]],
              reference: str = "base") -> dict[str, Any]:
  """Per arm: final top-1 and epochs to each level over seeds; per-seed differences from
  `reference` (seed s against seed s: both start from the same initialisation)."""
  finals = {arm: [[r["eval/top1"] for r in rows if "eval/top1" in r][-1] for rows in seeds]
            for arm, seeds in rows_by_arm.items()}
  out = {}
  for arm, seeds in rows_by_arm.items():
    to_level = {}
    for level in LEVELS:
      hits = [runs_lib.first_reaching(rows, level) for rows in seeds]
      to_level[f"{level:g}"] = {"reached": sum(h is not None for h in hits), "of": len(hits),
                                "epochs": runs_lib.interval95([h["epoch"] for h in hits if h])}
    out[arm] = {"final_top1": runs_lib.interval95(finals[arm]), "per_seed": finals[arm],
                "epochs_to": to_level}
    if arm != reference and reference in finals:
      out[arm]["minus_reference"] = _paired_difference(finals[arm], finals[reference])
  return out


def format_table(summary: dict[str, Any], reference: str = "base") -> str:
  fmt = _fmt_interval
  lines = [f"| arm | final top-1 %: mean ± std [95% CI] | per seed | minus {reference}: mean ± std "
           "[95% CI] |" + "".join(f" epochs to {lv:g}% |" for lv in LEVELS),
           "|---|---|---|---|" + "---|" * len(LEVELS)]
  for arm, s in summary.items():
    per_seed = ", ".join(f"{v:.1f}" for v in s["per_seed"])
    diff = fmt(s["minus_reference"]) if "minus_reference" in s else "-"
    levels = "".join(f" {fmt(t['epochs'])} ({t['reached']}/{t['of']}) |"
                     for t in s["epochs_to"].values())
    lines.append(f"| {arm} | {fmt(s['final_top1'])} | {per_seed} | {diff} |{levels}")
  return "\n".join(lines)


def summarize_metric(rows_by_arm: dict[str, list[list[dict[str, Any]]]], key: str,
                     first_epoch: int, last_epoch: int,
                     reference: str = "base") -> dict[str, dict[str, Any]]:
  """Per arm: each seed's mean of `key` over its rows of epochs first..last (inclusive), then
  mean, std and 95% interval over seeds, and the per-seed difference from `reference`."""
  def seed_mean(rows):
    values = [r[key] for r in rows if key in r and first_epoch <= r["epoch"] <= last_epoch]
    if not values:
      raise ValueError(f"no {key!r} in epochs {first_epoch}-{last_epoch} of a run")
    return float(np.mean(values))
  return _per_arm({arm: [seed_mean(rows) for rows in seeds] for arm, seeds in rows_by_arm.items()},
                  reference)


def format_metric_table(summary: dict[str, dict[str, Any]], name: str,
                        reference: str = "base") -> str:
  lines = [f"| arm | {name}: mean ± std [95% CI] | per seed | minus {reference}: mean ± std "
           "[95% CI] |", "|---|---|---|---|"]
  lines += [_arm_cells(arm, s, ".3g") for arm, s in summary.items()]
  return "\n".join(lines)


def probe_reports(probe_dir: str, arm: str, seeds: int) -> list[dict[str, Any]]:
  """Each seed's `caedfkd probe --out` report of an arm: PROBE_DIR/ARM_S.json."""
  reports = []
  for seed in range(seeds):
    with open(os.path.join(probe_dir, f"{arm}_{seed}.json")) as f:
      reports.append(json.load(f))
  return reports


def summarize_probes(reports_by_arm: dict[str, list[dict[str, Any]]],
                     reference: str = "base") -> dict[str, dict[str, Any]]:
  """Per "protocol/shots" and arm: the seeds' probe top-1 (each the mean of its draws), with
  mean, std and 95% interval over seeds, and the per-seed difference from `reference`."""
  def top1(report, key):
    return next(r["mean"] for r in report["results"] if f"{r['protocol']}/{r['shots']}" == key)
  first = next(iter(reports_by_arm.values()))[0]
  keys = [f"{r['protocol']}/{r['shots']}" for r in first["results"]]
  return {key: _per_arm({arm: [top1(rep, key) for rep in reps]
                         for arm, reps in reports_by_arm.items()}, reference) for key in keys}


def format_probe_table(summary: dict[str, dict[str, Any]], reference: str = "base") -> str:
  lines = [f"| probe | arm | top-1 %: mean ± std [95% CI] | per seed | minus {reference}: "
           "mean ± std [95% CI] |", "|---|---|---|---|---|"]
  lines += [f"| {key} " + _arm_cells(arm, s, ".1f")
            for key, arms in summary.items() for arm, s in arms.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/ladder_digits")
  choices = [*ladder.ARMS, *SWITCHES]
  parser.add_argument("--arms", default=",".join(ladder.ARMS),
                      help=f"comma-separated arms or switches of {', '.join(choices)}")
  parser.add_argument("--reference", default="base",
                      help="the arm each per-seed difference is taken from (one of --arms)")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--teacher-epochs", type=int, default=30)
  args = parser.parse_args(argv)
  arms = args.arms.split(",")
  unknown = [a for a in arms if a not in choices]
  if unknown:
    parser.error(f"--arms: unknown {unknown}; choose from {', '.join(choices)}")
  if args.reference not in arms:
    parser.error(f"--reference {args.reference!r} is not among --arms {args.arms!r}; add it, or "
                 "name one of them")
  os.makedirs(args.workdir, exist_ok=True)
  teacher_dir, eval_dir = prepare_teacher(args.workdir, args.teacher_epochs)
  for arm in arms:
    print(f"== arm {arm}: {args.seeds} seeds, {args.epochs} epochs", flush=True)
    train.train_and_evaluate(arm_config(arm, teacher_dir, eval_dir, args.seeds, args.epochs),
                             os.path.join(args.workdir, arm))
  summary = summarize({arm: arm_rows(args.workdir, arm, args.seeds) for arm in arms},
                      args.reference)
  table = format_table(summary, args.reference)
  record = {"command": " ".join(["python -m benchmarks.ladder_study"] + sys.argv[1:]),
            "arms": arms, "reference": args.reference, "seeds": args.seeds, "epochs": args.epochs,
            "summary": summary}
  atomic_files.write_text(os.path.join(args.workdir, "study.json"), json.dumps(record, indent=2))
  atomic_files.write_text(os.path.join(args.workdir, "study.md"), table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
