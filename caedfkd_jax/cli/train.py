"""`caedfkd train`: supervised training of any zoo network, for teachers and for the
data-accessible student of the transfer tables.

    caedfkd train --config train_cifar:resnet20 --workdir runs/teacher \
        --config.data=PATH/cifar10 --config.time_budget_minutes=30

The same conventions as `caedfkd distill` (whose launcher pieces it uses): an ml_collections
config file or installed config name, `--config.FIELD=VALUE` overrides, `--help` listing the
fields without importing JAX, and a rerun with the same workdir resuming the run.
"""

import sys


from caedfkd_jax.cli import distill as launcher
from caedfkd_jax.config import fields, train_defaults

PROG = "caedfkd train"
COMMAND = "train"
USAGE = f"usage: {PROG} --config CONFIG[:ARG] --workdir DIR --config.data=SPEC [--config.FIELD=VALUE ...]"
EXAMPLE = (f"  {PROG} --config train_cifar:resnet20 --workdir runs/teacher "
           "--config.data=PATH/cifar10")


def help_text(config=None, config_file: str | None = None) -> str:
  """Usage, flags, the recipes and every field with its comment from config/train_defaults.py."""
  reference = fields.flatten(train_defaults.get_config())
  values = reference if config is None else fields.flatten(config)
  docs, order, sections = launcher.field_docs(launcher._read(train_defaults.__file__))
  late = max(order.values(), default=0) + 1
  out = [USAGE, "",
         "Supervised training of a zoo network on labelled images: a teacher for `caedfkd distill`,",
         "or the data-accessible student. Rerunning with the same --workdir resumes the run; the",
         "epoch kept is chosen on a held-out part of the train split, never on the test split.", "",
         "example:", EXAMPLE, "",
         "flags:",
         "  --config CONFIG[:ARG]  a config file's path, or an installed config's name: "
         + ", ".join(launcher.installed_configs(COMMAND)) + ".",
         "                         train_cifar:ARCH[,RECIPE], RECIPE cosine, nayer_steps or cmi_steps.",
         "  --workdir DIR          checkpoints, metrics.jsonl, TensorBoard, result.json and the",
         "                         bundle (DIR/model); an existing one is resumed.",
         "  --config.FIELD=VALUE   override one config field (below); repeatable.",
         "  -h, --help             this help; with --config, that config's values.", "",
         "config fields, from " + (f"{config_file} (defaults: " if config_file else "(")
         + "caedfkd_jax/config/train_defaults.py):"]
  pending = sorted(sections.items())
  for name in sorted(values, key=lambda n: (order.get(n, late), n)):
    while pending and pending[0][0] <= order.get(name, late):
      out += ["", f"  # {pending.pop(0)[1]}"]
    out += launcher.field_lines(name, values, reference, docs.get(name, ""))
  return "\n".join(out)


def main(argv: list[str]) -> int:
  typed = list(argv)
  parsed = launcher.parse_command_line(argv, PROG, COMMAND)
  if isinstance(parsed, int):
    return parsed
  wants_help, config, workdir, config_file = parsed
  if config_file is None and not wants_help:
    print(f"{PROG}: error: --config is missing: give a config file or an installed config's name "
          f"({', '.join(launcher.installed_configs(COMMAND))}), e.g. {EXAMPLE.strip()}",
          file=sys.stderr)
    return 2
  if wants_help:
    print(help_text(config.value, config_file))
    return 0
  if workdir.value is None:
    print(f"{PROG}: error: --workdir is required, e.g. {EXAMPLE.strip()}", file=sys.stderr)
    return 2
  if "arch" not in config.value or "method" in config.value:
    print(f"{PROG}: error: --config {config_file} is not a `caedfkd train` config (it has no "
          "`arch` field); use train_cifar or a file whose get_config() starts from "
          "caedfkd_jax.config.train_defaults.get_config().", file=sys.stderr)
    return 2
  if not launcher.workdir_usable(PROG, workdir.value):
    return 2
  print(launcher.describe_config_file(launcher.given_config(typed[1:]) or config_file,
                                      config_file), flush=True)
  from caedfkd_jax.engine import train_supervised  # Late: flag errors should not wait for JAX.
  result, code = launcher.run_reporting_errors(
      PROG, lambda: train_supervised.train(config.value, workdir.value),
      train_supervised.NonFiniteLossError)
  if code is not None:
    return code
  print(summary(result, config.value))
  if result["stop_reason"] == "interrupted":
    print(f"{PROG}: interrupted at epoch {result['epochs_done']}, unit {result['unit']} "
          "(checkpointed); rerun the same command to resume.", file=sys.stderr)
    return 130
  return 0


def summary(result: dict, config) -> str:
  """What the run did, in a few lines: the chosen epoch's scores, per class, and what next."""
  lines = []
  per_class = result.get("per_class")
  if per_class:
    width = max(len(n) for n in per_class["top1"])
    lines.append(f"per-class top-1 ({per_class['split']} split):")
    lines += [f"  {name:<{width}}  {acc:6.2f}%" for name, acc in per_class["top1"].items()]
  scores = " ".join(f"{what} {result[k]:.2f}%" for what, k in (("held-out", "holdout_top1"),
                                                               ("test", "test_top1"))
                    if result.get(k) is not None)
  if "model" in result:
    chosen = result["selected"]
    lines.append(f"Model bundle: {result['model']} (epoch {chosen['epoch']}, chosen by "
                 f"{chosen['by']}; {scores}).")
  else:
    lines.append("No epoch finished, so no model bundle was written.")
  if result["stopped_early"] and result["stop_reason"] != "interrupted":
    fix = ("rerun the same command with a larger --config.time_budget_minutes"
           if result["stop_reason"] == "the time budget" else "rerun the same command")
    lines.append(f"Stopped by {result['stop_reason']} after {result['epochs_done']} of "
                 f"{result['epochs']} epochs ({result['minutes']:.1f} min); {fix} to continue.")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
