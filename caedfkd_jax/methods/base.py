"""The seam between the engine and a DFKD method: what a method declares, and what it gets.

The engine (engine/) builds the parts every method shares (teacher, student, dtype, mesh,
the embedding table when a method asks for one) into a `Setup`; a method extends it with its
own static parts, describes each kind of unit of an epoch as a `Phase` of pure functions, and
plans its epochs. One `Method` value per file in methods/ says all of that, and which config
fields the method reads: a new method is one file (docs/architecture.md).
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

PyTree = Any

# Config fields every method reads: the student's optimiser.
STUDENT_OPTIMIZER = ("student.lr", "student.momentum", "student.weight_decay")


@struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  epoch: jax.Array          # int32: current epoch.
  unit: jax.Array           # int32: next unit (generator round, KD call, ...) inside the epoch.
  kd_step: jax.Array        # int32: student steps taken so far (drives the LR schedule).
  student: PyTree           # {"params", "batch_stats"}
  student_opt_state: PyTree
  method: PyTree            # The method's own state (e.g. methods.nayer.SynthesisState).
  rng: jax.Array            # Base key; every use folds in (epoch, unit, step).
  hparams: dict[str, jax.Array] = struct.field(default_factory=dict)  # Swept values (traced).


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """The static side of a run that every method shares; a method subclasses it for its own.

  The engine fills every field but the student's optimiser and schedule, which the method's
  `create_setup` sets (they follow its epoch plan) in the subclass it returns (`extend`).
  """
  config: Any                 # ml_collections.ConfigDict
  method: "Method"
  teacher: nn.Module
  student: nn.Module
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int            # K, the teacher's classes.
  image_size: int
  teacher_arch: str = ""      # For messages: "the resnet56 teacher".
  dtype: Any                  # Activation dtype (runtime.platform.compute_dtype).
  class_names: tuple[str, ...] | None = None
  table: Any = None           # io.embeddings.EmbeddingTable, for a method that asks for one.
  student_tx: optax.GradientTransformation | None = None
  student_lr: Callable[[jax.Array], jax.Array] | None = None   # The schedule, logged per epoch.

  @classmethod
  def extend(cls, base: "Setup", **fields) -> "Setup":
    """`base`'s shared fields plus a method's own: an instance of the subclass `cls`."""
    shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(Setup)}
    return cls(**{**shared, **fields})


@dataclasses.dataclass(frozen=True)
class PerClass:
  """A K-vector a unit reports (its `outputs[output]`; NaN where the unit saw no image of a
  class): averaged over the epoch's units, then logged per class as "<prefix>/class_k" and
  over the classes as `mean_key`, each over the values that are not NaN."""
  output: str
  mean_key: str
  prefix: str


# The share of each class's synthetic images the teacher is unsure about (Figure 2a).
LOW_CONFIDENCE = PerClass("low_conf", "gen/low_confidence_share", "low_confidence")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One kind of unit of a method: `start`, then `num_steps` steps, then `finish`. All pure.

  start(state) -> (carry, ctx): what the steps change, and what they read.
  step(carry, ctx, i, state, frozen) -> (carry, metrics): step `i` of the unit; `frozen` is
    the teacher's variables (or what the method's `frozen_vars` returns).
  finish(state, carry, ctx, frozen) -> (state, unit_metrics, outputs): the unit's result
    written into the state; scalars logged beside the per-step metrics; other per-unit
    arrays (the `per_class` shares, "images", ...).
  The engine advances `state.unit` after `finish`. The fields after `num_steps` tell the
  engine what to do with a unit without knowing the method.
  """
  start: Callable
  step: Callable
  finish: Callable
  num_steps: int
  label: str = "unit"           # Words for messages: "generator round 3", "KD call 0".
  trains_student: bool = False  # XLA:CPU: YNNPACK's elementwise fusions sped up student steps
                                # only (runtime/xla_cpu.py); generator steps ran slower with them.
  makes_images: bool = False    # The epoch's sample grid is saved when a unit of it does
                                # (`Method.latest_images`).
  shows: tuple[str, ...] = ()   # Metrics in the epoch line; the first two in the progress bar.
  per_class: tuple[PerClass, ...] = ()   # Per-class vectors it reports (`PerClass`).


def _no_fields(config) -> dict:
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A DFKD method: what it reads and pure functions the engine calls. One per file in methods/.

  `reads` names the config fields the method reads besides the engine's own
  (config/defaults.py ENGINE_FIELDS): "section.field", or a prefix ending in "." or "_"
  ("cend." is every CEND field). A field the method does not read is refused when set
  (config/checks.py), and is not compared on a resume.
  """
  name: str
  summary: str              # One line: what the method does (docs/methods.md table, `--help`).
  reads: tuple[str, ...]
  create_setup: Callable    # (Setup) -> its Setup subclass, student_tx and student_lr set
  init_state: Callable      # (setup, teacher_vars, rng) -> the method's state pytree
  phases: Callable          # (setup, mesh | None) -> {unit name: Phase}
  epoch_plan: Callable      # (config, epoch) -> tuple of unit names, in order
  latest_images: Callable | None = None   # (setup, method_state) -> (images01, labels): the
                                          # epoch grid, for methods whose phases make images
  epoch_scalars: Callable = lambda state: {}   # (method_state) -> {name: scalar} each epoch
  finite_parts: Callable = lambda state: {}    # (method_state) -> {"part": pytree}, checked
                                               # finite after every unit
  bundle_fields: Callable = _no_fields  # (config) -> what the student bundle records
  check_config: Callable | None = None  # (config, num_devices, num_classes) -> None; raises
                                        # ValueError naming a bad value of a field it reads
  own_config: Callable[[], ml_collections.ConfigDict] | None = None  # The method's own
                                        # sections with their defaults ({"cmi": {...}}).
  sweepable: tuple[str, ...] = ()       # Float fields one program can sweep (engine/runs.py):
                                        # read through `hparam`, so traced per run.
  embeddings: bool = False  # Reads config.embeddings: the engine loads the table, checks it
                            # against the teacher's classes, and passes it in `Setup.table`.
  quick: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Fields that size the
                            # method for minutes on a CPU (the demo: 100 images a step).
  requires: str = ""        # What a run needs besides a teacher, in words ("" : nothing); the
                            # offline demo runs only methods that need nothing more.
  renews: Callable[[Any, int], bool] = lambda config, epoch: False  # A new generator at `epoch`?
  renew: Callable | None = None  # (setup, state) -> state with it (jitted by the loop)
  frozen_vars: Callable | None = None  # (setup, teacher_vars) -> what every unit receives as
                                       # `frozen` (DiffDFKD: the teacher's and Stable
                                       # Diffusion's variables); None: teacher_vars.

  def units_per_epoch(self, config) -> list[int]:
    return [len(self.epoch_plan(config, e)) for e in range(config.epochs)]

  def reads_field(self, name: str) -> bool:
    """Whether `name` ("section.field" or a top-level field) is one the method reads."""
    return any(name == f or (f.endswith((".", "_")) and name.startswith(f)) for f in self.reads)


def hparam(setup: Setup, hparams: dict[str, jax.Array], name: str):
  """The value of config field `name` ("section.field") for this run: traced when swept."""
  if name in hparams:
    return hparams[name]
  section, field = name.split(".")
  return setup.config[section][field]


def student_schedule(s, total_steps: int) -> optax.Schedule:
  """Cosine from `s.lr` to `s.eta_min` over the run's student steps (`s`: config.student)."""
  return optax.cosine_decay_schedule(s.lr, max(total_steps, 1), alpha=s.eta_min / s.lr)


def student_optimizer(schedule: optax.Schedule, s) -> optax.GradientTransformation:
  """SGD with momentum and decoupled-as-in-PyTorch weight decay (`s`: config.student)."""
  return optax.chain(optax.add_decayed_weights(s.weight_decay),
                     optax.sgd(schedule, momentum=s.momentum))


def teacher_judgement(t_logits: jax.Array, labels_B: jax.Array, num_classes: int,
                      low_confidence: float) -> tuple[jax.Array, jax.Array]:
  """How the teacher sees a synthetic batch: per class, the share of its images the teacher is
  unsure about (max softmax < `low_confidence`; the paper's Figure 2a; NaN for a class the
  batch does not hold, so that averages skip it), and the teacher's accuracy on the labels
  the images were made for."""
  probs = jax.nn.softmax(t_logits.astype(jnp.float32))
  unsure = jnp.max(probs, axis=-1) < low_confidence
  onehot = jax.nn.one_hot(labels_B, num_classes)
  count_K = jnp.sum(onehot, 0)
  low_conf_K = jnp.where(count_K > 0, jnp.sum(onehot * unsure[:, None], 0)
                         / jnp.maximum(count_K, 1), jnp.nan)
  return low_conf_K, jnp.mean(jnp.argmax(probs, -1) == labels_B)


def fold(rng: jax.Array, *values) -> jax.Array:
  """`rng` with each of `values` folded in: every draw of a run is a function of its position."""
  for v in values:
    rng = jax.random.fold_in(rng, v)
  return rng


def check_positive(config, section: str, names, strict: bool = True) -> None:
  """Each `config.section.name` > 0 (`strict`) or >= 0: one line naming the first that is not."""
  values = config[section]
  for name in names:
    if not (values[name] > 0 if strict else values[name] >= 0):
      raise ValueError(f"config.{section}.{name}={values[name]!r} must be "
                       f"{'positive' if strict else '>= 0'}.")

