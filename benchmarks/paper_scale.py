r"""The paper-scale configs at start-up: seconds per unit and peak memory, random weights.

  python -m benchmarks.paper_scale --config paper_imagenet --num_groups 1 --out_json X.json
  python -m benchmarks.paper_scale --config paper_tiny_imagenet --out_json Y.json

A random-weight teacher of the config's arch (ResNet-50 at 224 px with 1,000 classes, or
ResNet-34 at 64 px with 200) and a random embedding table stand in for the real ones: speed
and memory do not depend on the weights. Each phase (warm-up round, round, KD call) is called
twice through the step functions a run uses (`steps.make_step_fns`), the first call
compiling; `--generator_steps` and `--kd_steps_per_call` shorten the units, and the figures
are per step, with the unit of the config's own step counts projected from them. Then the
launcher itself (`caedfkd distill`, the config's checks, start-up and checkpoint) runs the
config's first `--launcher_units` units in a child process: its wall time and peak RSS.
`--num_groups` shrinks the synthesis and KD batches where a 2-core, 24 GB machine cannot
hold the config's (ResNet-50's activations at 224 px are about 0.1 GB an image in float32).
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

IMAGE_SIZE = {"resnet50": 224}       # Else 64 (Tiny-ImageNet's zoo ResNets).
NUM_CLASSES = {"paper_imagenet": 1000, "paper_tiny_imagenet": 200}


def _load_config(name: str):
  """The installed config `name` at its defaults, as `caedfkd distill --config NAME` reads it."""
  import importlib.util
  from caedfkd_jax.cli import distill
  path = distill.resolve_config_path(name)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _random_inputs(config, num_classes: int, directory: str) -> tuple[str, str]:
  """A random teacher bundle and embedding table (384-d, MiniLM's width) under `directory`."""
  from caedfkd_jax.io import bundle as bundle_lib, embeddings
  arch = config.teacher_arch_expected
  names = [f"class{k}" for k in range(num_classes)]
  spec = bundle_lib.ModelSpec(arch, num_classes, IMAGE_SIZE.get(arch, 64), class_names=names)
  teacher = bundle_lib.save_bundle(os.path.join(directory, "teacher"), spec,
                                   bundle_lib.init_variables(spec, 0))
  vectors = np.random.default_rng(0).normal(size=(num_classes, 384)).astype(np.float32)
  table = embeddings.EmbeddingTable(vectors, names, {"encoder": "random"}).save(
      os.path.join(directory, "table.npy"))
  return teacher, table


def measure_units(config) -> dict:
  """Two calls of each phase; the second's seconds per step."""
  import jax
  from benchmarks import jax_side
  from caedfkd_jax.engine import steps, train
  from caedfkd_jax.io import bundle as bundle_lib, embeddings
  teacher = bundle_lib.load_bundle(config.teacher)
  setup, mesh, replicated, teacher_vars = jax_side.prepare(
      config, teacher, embeddings.load_table(config.embeddings))
  state = jax.device_put(train.create_state(setup, teacher_vars), replicated)
  fns = steps.make_step_fns(setup, mesh)
  figures = {}
  for phase, num_steps in (("warmup_round", config.generator.steps),
                           ("round", config.generator.steps),
                           ("kd", config.student.steps_per_call)):
    (state, _, _), first = jax_side._timed(fns[phase], state, teacher_vars)
    (state, _, _), second = jax_side._timed(fns[phase], state, teacher_vars)
    figures[phase] = {"first_call_s": first, "call_s": second, "steps": num_steps,
                      "step_s": second / num_steps}
  figures["synthesis_batch"], figures["kd_batch"] = setup.synthesis_batch, setup.kd_batch
  figures["peak_rss_gb"] = jax_side.peak_memory()["host_peak_rss_bytes"] / 1e9
  return figures


def launcher_run(config_arg: str, overrides: list[str], units: int, workdir: str) -> dict:
  """The config's first `units` units through `caedfkd distill`, in a child process."""
  command = [sys.executable, "-m", "caedfkd_jax", "distill", "--config", config_arg,
             "--workdir", workdir, *overrides, f"--config.max_units={units}"]
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  return {"command": " ".join(command), "exit_code": done.returncode, "wall_s": seconds,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
          "stderr_tail": done.stderr.strip().splitlines()[-3:]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, choices=sorted(NUM_CLASSES))
  parser.add_argument("--num_groups", type=int, default=0, help="0: the config's")
  parser.add_argument("--classes_per_group", type=int, default=0, help="0: the config's")
  parser.add_argument("--generator_steps", type=int, default=2)
  parser.add_argument("--kd_steps_per_call", type=int, default=2)
  parser.add_argument("--bank_capacity", type=int, default=2000,
                      help="the measured bank (the config's may not fit this machine)")
  parser.add_argument("--launcher_units", type=int, default=2)
  parser.add_argument("--out_json", default=None)
  args = parser.parse_args(argv)
  import jax
  from caedfkd_jax.engine import train
  from caedfkd_jax.runtime import platform

  config = _load_config(args.config)
  num_classes = NUM_CLASSES[args.config]
  views = config.cend.num_sources + 1
  full = {"generator_steps": config.generator.steps, "kd_steps_per_call":
          config.student.steps_per_call, "bank_capacity": config.bank_capacity,
          "synthesis_batch": config.num_groups * config.classes_per_group * views,
          "kd_batch": config.student.batch_groups * config.classes_per_group * views}
  with tempfile.TemporaryDirectory() as directory:
    teacher, table = _random_inputs(config, num_classes, directory)
    overrides = {"teacher": teacher, "embeddings": table, "generator.steps": args.generator_steps,
                 "student.steps_per_call": args.kd_steps_per_call,
                 "student.kd_steps": args.kd_steps_per_call, "bank_capacity": args.bank_capacity,
                 "warmup_epochs": 1, "warmup_g_loops": 1, "g_loops": 1, "epochs": 3,
                 "compilation_cache_dir": ""}
    if args.num_groups:
      overrides.update({"num_groups": args.num_groups, "student.batch_groups": args.num_groups})
    if args.classes_per_group:
      overrides["classes_per_group"] = args.classes_per_group
    for key, value in overrides.items():
      section, _, field = key.rpartition(".")
      (config[section] if section else config)[field] = value
    result = {"config": args.config, "num_classes": num_classes, "config_values": full,
              "measured_with": {k: v for k, v in overrides.items()
                                if k not in ("teacher", "embeddings")},
              "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
              "cpu_count": os.cpu_count()}
    image = IMAGE_SIZE.get(config.teacher_arch_expected, 64)
    bank_gb = full["bank_capacity"] * image * image * 3 / 1e9 if full["bank_capacity"] else None
    limit = platform.device_memory_bytes(jax.devices()[0])
    result["config_bank"] = {
        "capacity": full["bank_capacity"], "gb": bank_gb,
        "device_memory_gb": limit and limit / 1e9,
        "refused_here": bool(bank_gb and limit
                             and bank_gb * 1e9 > train.STATE_MEMORY_SHARE * limit)}
    result["units"] = measure_units(config)
    # The config's unit from the measured step: its step count, and its batch if the measured
    # one was smaller (linear in the batch: an estimate, stated as one).
    units = result["units"]
    for phase, steps_full, batch, measured in (
        ("round", full["generator_steps"], full["synthesis_batch"], units["synthesis_batch"]),
        ("kd", full["kd_steps_per_call"], full["kd_batch"], units["kd_batch"])):
      units[phase]["projected_unit_s_at_config_size"] = (
          units[phase]["step_s"] * steps_full * batch / measured)
    flat = [f"--config.{k}={v}" for k, v in overrides.items()]
    result["launcher"] = launcher_run(args.config, flat, args.launcher_units,
                                      os.path.join(directory, "run"))
  print(json.dumps(result, indent=1))
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(result, f, indent=1)
  assert math.isfinite(result["units"]["kd"]["step_s"])


if __name__ == "__main__":
  main()
