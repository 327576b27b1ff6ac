"""`caedfkd distill`: the launcher. Parses the config file and overrides, then trains.

    caedfkd distill --config configs/cifar10_resnet56_resnet20.py --workdir runs/r56_r20 \
        --config.teacher=teachers/resnet56 --config.time_budget_minutes=20

Rerunning with the same workdir resumes from its last checkpoint.
"""

import sys

from absl import flags
from ml_collections import config_flags


def _parse(argv: list[str]):
  """Flags are defined per call: config_flags discovers --config.X overrides in `argv`."""
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", None, "Path of a config file (configs/*.py); override fields with "
      "--config.FIELD=VALUE.", flag_values=values, lock_config=True, sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and "
                                "the student bundle; an existing one is resumed.", flag_values=values)
  values(argv)
  return config, workdir


def main(argv: list[str]) -> int:
  try:
    config, workdir = _parse(argv)
  except flags.Error as e:
    print(f"caedfkd distill: error: {e}", file=sys.stderr)
    return 2
  if config.value is None or workdir.value is None:
    print("caedfkd distill: error: --config and --workdir are required, e.g.\n"
          "  caedfkd distill --config configs/cifar10_resnet56_resnet20.py --workdir runs/demo "
          "--config.teacher=PATH_TO_TEACHER_BUNDLE", file=sys.stderr)
    return 2
  from caedfkd_jax import train  # Imported late: flag errors should not wait for JAX.
  try:
    result = train.train_and_evaluate(config.value, workdir.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"caedfkd distill: error: {e}", file=sys.stderr)
    return 2
  except train.NonFiniteLossError as e:
    print(f"caedfkd distill: stopped: {e}", file=sys.stderr)
    return 3
  print(f"Student bundle: {result['student']}"
        + (" (stopped at the time budget; rerun to continue)" if result["stopped_early"] else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
