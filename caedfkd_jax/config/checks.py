"""Config values checked before any work: one clear line for each bad one.

Without these, a zero or a negative value surfaces mid-run as a ZeroDivisionError,
a shape error at the first trace, or an empty memory bank.
"""

from caedfkd_jax.synthesis import cend, losses, memory_bank
from caedfkd_jax import methods
from caedfkd_jax.engine import runs
from caedfkd_jax.runtime import xla_cpu
from caedfkd_jax.synthesis import generator as generator_lib
from caedfkd_jax.methods import bank_kd


# Fields that must be >= 1 (ints) or > 0 (floats), and fields that must be >= 0.
_POSITIVE = ("num_groups", "epochs", "generator.steps", "generator.life_epochs", "generator.lr",
             "generator.noise_dim", "generator.ngf", "student.batch_groups", "student.kd_steps",
             "student.steps_per_call", "student.lr", "student.temperature",
             "student.cncl_temperature", "eval_every_epochs", "eval_batch_size", "max_checkpoints",
             "num_runs")
_NON_NEGATIVE = ("seed", "cend.num_sources", "warmup_epochs", "g_loops", "warmup_g_loops", "bank_capacity",
                 "cend.magnitude", "loss.ce", "loss.bn", "loss.adv", "student.eta_min",
                 "student.weight_decay", "student.cncl_weight", "time_budget_minutes",
                 "max_units", "stop_after_epochs", "checkpoint_every_minutes", "grid_images_per_class")
_FRACTIONS = ("generator.b1", "generator.b2", "student.momentum", "loss.bn_momentum",
              "low_confidence")   # in [0, 1]


def _field(config, name: str):
  for part in name.split("."):
    config = config[part]
  return config


def _check_cend(config) -> None:
  """CEND's sources, magnitudes and scale, and how the noisy layer chunks the CEND batch."""
  c, noisy_chunks = config.cend, config.generator.noisy_chunks
  if c.sources is not None:
    if len(c.sources) != c.num_sources:
      raise ValueError(f"config.cend.sources={tuple(c.sources)!r} names {len(c.sources)} sources "
                       f"but config.cend.num_sources={c.num_sources}; give one per source.")
    unknown = [s for s in c.sources if s not in cend.NOISE_SOURCES]
    if unknown:
      raise ValueError(f"config.cend.sources: unknown {unknown}; choose from "
                       f"{', '.join(cend.NOISE_SOURCES)}.")
  if c.magnitudes is not None:
    m = tuple(c.magnitudes)
    if len(m) != c.num_sources:
      raise ValueError(f"config.cend.magnitudes={m!r} has {len(m)} values but "
                       f"config.cend.num_sources={c.num_sources}; give one M_n per source, e.g. "
                       f"'({','.join(['0.1'] * max(c.num_sources, 1))})', or unset it to use "
                       "cend.magnitude for every source.")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in m):
      raise ValueError(f"config.cend.magnitudes={m!r}: every M_n must be a number >= 0.")
  if c.magnitude_scale not in cend.MAGNITUDE_SCALES:
    raise ValueError(f"config.cend.magnitude_scale={c.magnitude_scale!r}: use absolute (M_n in "
                     "the table's units) or relative (M_n times each dimension's std across "
                     "classes).")
  if noisy_chunks not in generator_lib.NOISY_CHUNKS:
    raise ValueError(f"config.generator.noisy_chunks={noisy_chunks!r}: use per_view (NAYER: one "
                     "noisy Linear per K rows) or per_group (one per CNCL group of K*(N+1) rows).")
  # Clean views of one group through one shared Linear are N+1 copies of one image per class:
  # per_view's images at 1/(N+1) of the diversity, for the same compute. Refused.
  # cend.magnitude=0 (or a zero in cend.magnitudes) makes such copies too, but is allowed: it is
  # the end point of a magnitude sweep.
  if noisy_chunks == "per_group" and c.mode == "clean":
    raise ValueError("config.generator.noisy_chunks='per_group' with config.cend.mode='clean' "
                     "would send each group's N+1 identical clean views through one Linear: "
                     "N+1 identical images per class and group. Use "
                     "--config.generator.noisy_chunks=per_view for clean embeddings (NAYER), or "
                     "cend.mode=cend.")


def validate_config(config, num_devices: int, group_size: int) -> None:
  """One clear line for every value that would otherwise fail mid-run or with a traceback."""
  method = methods.get(config.method)   # Names the known methods when the name is not one.
  reads = lambda name: not any(name == f or (f.endswith(("_", ".")) and name.startswith(f))
                               for f in method.ignores)
  for name in runs.parse_sweep(config.sweep):
    if not reads(name):
      raise ValueError(f"config.sweep varies {name}, which method {method.name} does not read: "
                       "every run would be the same. Sweep another field, or pick a method "
                       "that reads it (e.g. --config.method=cae_dfkd).")
  for name in _POSITIVE:
    if not _field(config, name) > 0:
      raise ValueError(f"config.{name}={_field(config, name)!r} must be positive.")
  for name in _NON_NEGATIVE:
    if not _field(config, name) >= 0:
      raise ValueError(f"config.{name}={_field(config, name)!r} must be >= 0.")
  for name in _FRACTIONS:
    if not 0 <= _field(config, name) <= 1:
      raise ValueError(f"config.{name}={_field(config, name)!r} must lie in [0, 1].")
  for level in config.accuracy_levels:
    if not 0 < level <= 1:
      raise ValueError(f"config.accuracy_levels={tuple(config.accuracy_levels)!r}: each is a "
                       "fraction of the teacher's top-1 in (0, 1], e.g. (0.5, 0.75, 0.9).")
  if config.cend.mode not in cend.MODES:
    raise ValueError(f"config.cend.mode={config.cend.mode!r}: use one of {', '.join(cend.MODES)}.")
  _check_cend(config)
  if config.loss.bn_reduce not in losses.BN_REDUCTIONS:
    raise ValueError(f"config.loss.bn_reduce={config.loss.bn_reduce!r}: use sum (NAYER) or "
                     "mean (averaged over the teacher's BN layers).")
  if config.student.cncl_form not in ("infonce", "supcon"):
    raise ValueError(f"config.student.cncl_form={config.student.cncl_form!r}: use infonce or supcon.")
  if config.get("cpu_kernels", "tuned") not in xla_cpu.CHOICES:
    raise ValueError(f"config.cpu_kernels={config.cpu_kernels!r}: use tuned (measured faster on "
                     "CPUs) or xla_default (XLA's own CPU kernels).")
  if config.student.sampler not in memory_bank.SAMPLERS:
    raise ValueError(f"config.student.sampler={config.student.sampler!r}: use groups (whole CNCL "
                     "groups) or uniform (NAYER's pool sampling).")
  if config.student.cncl_groups is not None and not config.student.cncl_groups > 0:
    raise ValueError(f"config.student.cncl_groups={config.student.cncl_groups!r} must be positive "
                     "(or None: as many as student.batch_groups).")
  if config.student.eta_min > config.student.lr:
    raise ValueError(f"config.student.eta_min={config.student.eta_min} exceeds "
                     f"config.student.lr={config.student.lr}: the cosine floor must not be above its start.")
  s = config.student
  # The NAYER-shaped sizes below are checked only for methods that read them; the others
  # check their own (`method.check_config`).
  if reads("g_loops") and config.warmup_epochs * config.warmup_g_loops + config.g_loops == 0:
    raise ValueError("No generator round runs before the first KD step (warmup_epochs * "
                     "warmup_g_loops + g_loops = 0), so the student would learn from an empty "
                     "memory bank; raise warmup_g_loops or g_loops.")
  if (reads("num_groups") and config.bank_capacity
      and config.bank_capacity < config.num_groups * group_size):
    raise ValueError(f"config.bank_capacity={config.bank_capacity} is smaller than one synthesis "
                     f"batch (num_groups*K*(N+1) = {config.num_groups * group_size} images); raise "
                     "it to at least that, or set 0 to keep every image the schedule makes.")
  if s.kd_steps % s.steps_per_call:
    raise ValueError(f"student.kd_steps={s.kd_steps} must be a multiple of "
                     f"student.steps_per_call={s.steps_per_call}")
  syn, kd = config.num_groups * group_size, s.batch_groups * group_size
  with_cncl = "student.cncl_" not in method.ignores
  cncl = with_cncl * bank_kd.cncl_subbatch_groups(config, runs.parse_sweep(config.sweep)) * group_size
  for name, size, field in (("synthesis batch (num_groups*K*(N+1))", syn, "num_groups"),
                            ("KD batch (student.batch_groups*K*(N+1))", kd, "student.batch_groups"),
                            ("CNCL sub-batch (student.cncl_groups*K*(N+1))", cncl, "student.cncl_groups")):
    if reads(field) and size % num_devices:
      raise ValueError(f"The {name} = {size} is not divisible by the {num_devices} devices; "
                       "change num_groups / student.batch_groups / student.cncl_groups.")
  if method.check_config is not None:
    method.check_config(config, num_devices)
  if config.epochs <= config.warmup_epochs:
    raise ValueError(f"epochs={config.epochs} leaves no KD epoch after "
                     f"warmup_epochs={config.warmup_epochs}")
