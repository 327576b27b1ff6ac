"""Config values checked before any work: one clear line for each bad one.

Without these, a zero or a negative value surfaces mid-run as a ZeroDivisionError, a shape
error at the first trace, or an empty memory bank. The engine's fields and the shared fields
the method reads are checked here; the method checks the rest (`Method.check_config`). A field
the method does not read is refused when it is set: a value that would be silently ignored.
"""

from collections.abc import Collection

from caedfkd_jax.config import defaults, fields
from caedfkd_jax.methods import registry
from caedfkd_jax.methods.base import Method
from caedfkd_jax.runtime import xla_cpu
from caedfkd_jax.synthesis import losses

# Fields that must be >= 1 (ints) or > 0 (floats), fields that must be >= 0, and fractions in
# [0, 1]; each is checked where the engine or the method reads it.
_POSITIVE = ("num_groups", "epochs", "generator.steps", "generator.life_epochs", "generator.lr",
             "generator.noise_dim", "generator.ngf", "student.batch_groups", "student.kd_steps",
             "student.steps_per_call", "student.lr", "student.temperature",
             "student.cncl_temperature", "eval_every_epochs", "eval_batch_size", "max_checkpoints",
             "num_runs")
_NON_NEGATIVE = ("seed", "cend.num_sources", "warmup_epochs", "g_loops", "warmup_g_loops",
                 "bank_capacity", "cend.magnitude", "loss.ce", "loss.bn", "loss.adv",
                 "student.eta_min", "student.weight_decay", "student.cncl_weight",
                 "time_budget_minutes", "max_units", "stop_after_epochs",
                 "checkpoint_every_minutes", "grid_images_per_class")
_FRACTIONS = ("generator.b1", "generator.b2", "student.momentum", "loss.bn_momentum",
              "low_confidence")


def reads(method: Method, name: str) -> bool:
  """Whether a run of `method` reads config field `name`."""
  return name in defaults.ENGINE_FIELDS or method.reads_field(name)


def check_unread_fields(config, method: Method) -> None:
  """Refuses a field the method does not read whose value is not its default (or that no
  default config has): it was set for nothing, so the run would silently ignore it."""
  reference = fields.flatten(defaults.get_config(method.name))
  for name, value in fields.flatten(config).items():
    if reads(method, name):
      continue
    if name not in reference:
      own = registry.own_section(name.split(".")[0]) if "." in name else None
      reference.update(fields.flatten(own, name.split(".")[0] + ".") if own else {})
    if name not in reference or value != reference[name]:
      what = "is not a config field" if name not in reference else (
          f"is set to {value!r}, but method {method.name} does not read it")
      raise ValueError(f"config.{name} {what}, so it would change nothing; unset it, or choose a "
                       "method that reads it (`caedfkd distill --config.method=NAME --help` lists "
                       "a method's fields).")


def check_sweep(config, method: Method) -> dict[str, tuple[float, ...]]:
  """The sweep's fields, each read by the method and sweepable by it."""
  for part in filter(None, (p.strip() for p in config.sweep.split(";"))):
    name = part.partition("=")[0].strip()
    if name and not reads(method, name):
      raise ValueError(f"config.sweep varies {name}, which method {method.name} does not read: "
                       "every run would be the same. Sweep another field, or pick a method "
                       "that reads it (e.g. --config.method=cae_dfkd).")
  return fields.parse_sweep(config.sweep, method.sweepable)


def validate_config(config, num_devices: int, num_classes: int,
                    swept: Collection[str] | None = None) -> None:
  """One clear line for every value that would otherwise fail mid-run or with a traceback.

  `num_classes`: the teacher's; `swept`: the fields a multi-run job sweeps (None: those of
  `config.sweep`; a lone run of the job has no sweep of its own).
  """
  method = registry.get(config.method)   # Names the known methods when the name is not one.
  sweep = check_sweep(config, method)
  check_unread_fields(config, method)
  for group, test, words in ((_POSITIVE, lambda v: v > 0, "must be positive"),
                             (_NON_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
                             (_FRACTIONS, lambda v: 0 <= v <= 1, "must lie in [0, 1]")):
    for name in group:
      if reads(method, name) and not test(fields.get_field(config, name)):
        raise ValueError(f"config.{name}={fields.get_field(config, name)!r} {words}.")
  for level in config.accuracy_levels:
    if not 0 < level <= 1:
      raise ValueError(f"config.accuracy_levels={tuple(config.accuracy_levels)!r}: each is a "
                       "fraction of the teacher's top-1 in (0, 1], e.g. (0.5, 0.75, 0.9).")
  if reads(method, "loss.bn_reduce") and config.loss.bn_reduce not in losses.BN_REDUCTIONS:
    raise ValueError(f"config.loss.bn_reduce={config.loss.bn_reduce!r}: use sum (NAYER) or "
                     "mean (averaged over the teacher's BN layers).")
  if config.get("cpu_kernels", "tuned") not in xla_cpu.CHOICES:
    raise ValueError(f"config.cpu_kernels={config.cpu_kernels!r}: use tuned (measured faster on "
                     "CPUs) or xla_default (XLA's own CPU kernels).")
  if method.check_config is not None:
    method.check_config(config, num_devices, num_classes, tuple(sweep if swept is None else swept))
