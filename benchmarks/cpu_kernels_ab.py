r"""`config.cpu_kernels` choices timed against each other in one process, calls interleaved.

  python -m benchmarks.cpu_kernels_ab --config configs/cifar10_resnet56_resnet20.py --repeats 5

Both choices' step functions (`steps.make_step_fns`) are built from the same state; then
rounds and KD calls alternate between them (A, B, A, B, ...). On a shared or throttling
machine a figure from one process against a figure from another can drift by 20%, more
than the effect measured; interleaving puts both choices under the same conditions.
Prints the median seconds per generator round and per KD call, and the speed-up.
"""

import copy
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import jax_side
from caedfkd_jax.engine import steps, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, as for `caedfkd distill`.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds and KD calls per choice.")
_CHOICES = flags.DEFINE_list("choices", ["xla_default", "tuned"], "cpu_kernels choices to "
                             "compare; speeds are against the first.")


def build(config, choice: str, teacher, table):
  """(step functions, a filled state, teacher variables) for `config` with `choice`."""
  config = copy.deepcopy(config)
  config.cpu_kernels = choice
  setup, mesh, replicated, teacher_vars = jax_side.prepare(config, teacher, table)
  state = train.create_state(setup, teacher_vars)
  state = jax.device_put(jax_side._fill_bank(state, setup, config.seed), replicated)
  return steps.make_step_fns(setup, mesh), state, teacher_vars


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  teacher, table = jax_side.load_teacher(config)
  built = {}
  for choice in _CHOICES.value:
    fns, state, teacher_vars = build(config, choice, teacher, table)
    start = time.perf_counter()
    state = jax.block_until_ready(fns["round"](state, teacher_vars)[0])
    state = jax.block_until_ready(fns["kd"](state, teacher_vars)[0])
    print(f"{choice}: compile and first calls {time.perf_counter() - start:.1f} s", flush=True)
    built[choice] = [fns, state, teacher_vars]
  seconds = {(choice, phase): [] for choice in built for phase in ("round", "kd")}
  for _ in range(_REPEATS.value):
    for choice, entry in built.items():
      fns, state, teacher_vars = entry
      for phase in ("round", "kd"):
        start = time.perf_counter()
        state = jax.block_until_ready(fns[phase](state, teacher_vars)[0])
        seconds[(choice, phase)].append(time.perf_counter() - start)
      entry[1] = state
  first = _CHOICES.value[0]
  print(f"\n{config.generator.steps} generator steps a round, {config.student.steps_per_call} KD "
        f"steps a call; median of {_REPEATS.value}, interleaved")
  print(f"| cpu_kernels | generator round, s (min-max) | KD call, s (min-max) | round speed "
        f"vs {first} | KD speed vs {first} |")
  print("|---|---|---|---|---|")
  for choice in built:
    r, k = (statistics.median(seconds[(choice, p)]) for p in ("round", "kd"))
    r0, k0 = (statistics.median(seconds[(first, p)]) for p in ("round", "kd"))
    spread = lambda p: f"{min(seconds[(choice, p)]):.2f}-{max(seconds[(choice, p)]):.2f}"
    print(f"| {choice} | {r:.2f} ({spread('round')}) | {k:.2f} ({spread('kd')}) | "
          f"{r0 / r:.2f}x | {k0 / k:.2f}x |")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
