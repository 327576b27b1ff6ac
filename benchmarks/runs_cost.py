r"""Cost per run of R runs in one program (`--config.num_runs=R`), against R = 1.

For each R it builds the stacked state of R seeds exactly as `caedfkd distill` does, fills every
run's memory bank, and times a generator round and a KD call of the real step functions (median of
--repeats after a first, compiling call). A table and JSON: seconds per call, seconds per call per
run, images/s over all runs, and the speed-up per run over R = 1.

  python -m benchmarks.runs_cost --config configs/cifar10_resnet56_resnet20.py --runs 1,2,4
  # On a GPU, where small CIFAR networks leave it idle:
  python -m benchmarks.runs_cost --config configs/cifar10_resnet56_resnet20.py:full --runs 1,2,4,8

The teacher is randomly initialised unless --config.teacher names a bundle: speed does not depend
on weights. --config, --quick, --repeats, --teacher_arch and --out_json are dfkd_benchmark's flags.
"""

import functools
import json
import statistics
import time
from typing import Any

import jax
from absl import app, flags

from benchmarks import dfkd_benchmark, jax_side
from caedfkd_jax.engine import runs as runs_lib, steps, train

_RUNS = flags.DEFINE_list("runs", ["1", "2", "4"], "Run counts R to measure.")
_VECTORIZE = flags.DEFINE_enum("vectorize", "auto", ["auto", "true", "false", "both"],
                               "jax.vmap over runs (true), runs one after another in the program "
                               "(false), the platform's default (auto), or both.")


def _timed(fn, state):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(state))
  return out[0], time.perf_counter() - start


def measure(config, teacher, table, num_runs: int, vectorize: bool, repeats: int) -> dict[str, Any]:
  """Seconds per generator round and per KD call of `num_runs` runs in one program."""
  config = config.copy_and_resolve_references()
  config.num_runs = num_runs
  setup, mesh, replicated, teacher_vars = jax_side.prepare(config, teacher, table)
  plan = runs_lib.plan_runs(config)
  states = [jax_side._fill_bank(  # pylint: disable=protected-access
      train.create_state(setup, teacher_vars, run.seed), setup, run.seed)
      for run in plan]
  state = jax.device_put(states[0] if num_runs == 1 else runs_lib.stack(states), replicated)
  over_runs = None if num_runs == 1 else functools.partial(
      runs_lib.over_runs, num_runs=num_runs, vectorize=vectorize)
  fns = steps.make_step_fns(setup, mesh, over_runs=over_runs,
                            vmapped_runs=vectorize and num_runs > 1)
  times: dict[str, list[float]] = {"round": [], "kd": []}
  first: dict[str, float] = {}
  for _ in range(repeats + 1):
    for phase in ("round", "kd"):
      state, seconds = _timed(lambda s, phase=phase: fns[phase](s, teacher_vars), state)
      if phase in first:
        times[phase].append(seconds)
      else:
        first[phase] = seconds
  round_s, kd_s = statistics.median(times["round"]), statistics.median(times["kd"])
  kd_batch = config.student.batch_groups * setup.group_size
  return {
      "runs": num_runs, "vectorized": vectorize if num_runs > 1 else None,
      "round_s": round_s, "kd_call_s": kd_s,
      "round_s_per_run": round_s / num_runs, "kd_call_s_per_run": kd_s / num_runs,
      "generator_images_per_s": num_runs * setup.synthesis_batch * config.generator.steps / round_s,
      "student_images_per_s": num_runs * kd_batch * config.student.steps_per_call / kd_s,
      "compile_s": max(first["round"] - round_s, 0) + max(first["kd"] - kd_s, 0),
      "repeats": times,
  }


def format_table(results: list[dict[str, Any]]) -> str:
  """Markdown: one row per (R, how), with the speed-up per run over R = 1."""
  base = next((x for x in results if x["runs"] == 1), None)
  lines = ["| R | how | round s | KD call s | round s/run | KD call s/run | gen img/s | "
           "student img/s | per-run speed-up (round, KD) | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for x in results:
    how = "-" if x["runs"] == 1 else ("vmap" if x["vectorized"] else "one after another")
    up = (f"{base['round_s'] / x['round_s_per_run']:.2f}x, {base['kd_call_s'] / x['kd_call_s_per_run']:.2f}x"
          if base else "")
    lines.append(f"| {x['runs']} | {how} | {x['round_s']:.2f} | {x['kd_call_s']:.2f} | "
                 f"{x['round_s_per_run']:.2f} | {x['kd_call_s_per_run']:.2f} | "
                 f"{x['generator_images_per_s']:.0f} | {x['student_images_per_s']:.0f} | {up} | "
                 f"{x['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  config = dfkd_benchmark.benchmark_config()   # its --config, --quick, --repeats, --teacher_arch
  teacher, table = dfkd_benchmark.load_teacher(config)
  platform = jax.devices()[0].platform
  modes = {"both": [False, True], "true": [True], "false": [False],
           "auto": [runs_lib.resolve_vectorize(config, platform)]}[_VECTORIZE.value]
  results = []
  for r in map(int, _RUNS.value):
    for vectorize in (modes if r > 1 else [None]):
      results.append(measure(config, teacher, table, r, bool(vectorize),
                             dfkd_benchmark._REPEATS.value))  # pylint: disable=protected-access
      print(json.dumps({k: v for k, v in results[-1].items() if k != "repeats"}), flush=True)
  device = jax.devices()[0]
  print(f"\n{device.platform}:{device.device_kind} x{len(jax.devices())}, "
        f"teacher {teacher.spec.arch}, student {config.student_arch}")
  markdown = format_table(results)
  print(markdown)
  if dfkd_benchmark._OUT_JSON.value:  # pylint: disable=protected-access
    with open(dfkd_benchmark._OUT_JSON.value, "w") as f:  # pylint: disable=protected-access
      json.dump({"device": f"{device.platform}:{device.device_kind}", "results": results,
                 "table": markdown}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
