r"""caedfkd-jax against PyTorch, side by side, on one config and one machine.

For a config (the same files and --config.FIELD overrides as `caedfkd distill`) it
measures, for each side: images/s of the generator step and of the student step,
the time of one post-warm-up DFKD epoch (g_loops rounds of generator.steps steps,
then student.kd_steps KD steps), compile time, peak memory and, for caedfkd-jax,
model-FLOPs utilisation. Each side runs in its own process, one after the other,
so thread pools and memory peaks do not mix. Prints a table and writes JSON.

  # CI-sized, on a CPU (seconds):
  python -m benchmarks.dfkd_benchmark --config configs/cifar10_resnet56_resnet20.py --quick
  # A paper pair on a GPU, with NAYER's own code from a checkout as the anchor:
  python -m benchmarks.dfkd_benchmark --config configs/paper_cifar.py:cifar10,resnet34,resnet18 \
      --nayer_path ~/src/NAYER --out_json runs/bench_r34_r18.json

Sides: `jax` (this library), `torch` (an equivalent PyTorch step written for this
benchmark: benchmarks/torch_side.py), `nayer` (NAYER's own synthesizer and KD loop,
imported from --nayer_path; benchmarks/nayer_side.py). Teachers are randomly
initialised unless --config.teacher names a bundle: speed does not depend on weights.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from caedfkd_jax.io import atomic_files

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, as for `caedfkd distill`.")
_SIDES = flags.DEFINE_list("sides", None, "Sides to run: jax, torch, nayer. Default: jax, torch, "
                           "and nayer when --nayer_path is given.")
_SIDE = flags.DEFINE_string("side", None, "Internal: run one side in this process and write "
                            "its JSON to --side_json.")
_SIDE_JSON = flags.DEFINE_string("side_json", None, "Internal: where --side writes its result.")
_QUICK = flags.DEFINE_bool("quick", False, "CI-sized: 1 group per batch, 2 generator steps, "
                           "4 KD steps per epoch, 2 repeats.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per phase after the first (median).")
_TEACHER_ARCH = flags.DEFINE_string("teacher_arch", None, "Teacher arch when --config.teacher is "
                                    "empty (default: config.teacher_arch_expected or resnet56).")
_FUSE = flags.DEFINE_enum("fuse", "auto", ["auto", "true", "false"], "caedfkd-jax: one lax.scan "
                          "per round/KD call (true), per-step calls (false), or by platform.")
_NAYER_PATH = flags.DEFINE_string("nayer_path", None, "A checkout of github.com/tmtuan1307/NAYER "
                                  "(never copied here); its own code is timed as a third side.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for MFU "
                                  "(default: datasheet bf16 for known GPUs/TPUs, else a measured "
                                  "matmul in the compute dtype).")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Write every figure here as JSON (rewritten "
                                "after each side, so a killed run keeps the sides it finished).")
_SIDE_TIMEOUT = flags.DEFINE_integer("side_timeout", 0, "Seconds each side may run before it is "
                                     "stopped and reported as timed out (0: no limit).")
_NAYER_REPEATS = flags.DEFINE_integer("nayer_repeats", None, "Timed epochs of NAYER's side after "
                                      "its first (default: --repeats); its epochs are the slowest.")

QUICK_OVERRIDES = {"num_groups": 1, "generator.steps": 2, "student.batch_groups": 1,
                   "student.kd_steps": 4, "student.steps_per_call": 2, "g_loops": 1,
                   "warmup_g_loops": 1, "warmup_epochs": 1, "epochs": 2}


def benchmark_config():
  config = _CONFIG.value
  if _QUICK.value:
    with config.unlocked():
      for dotted, value in QUICK_OVERRIDES.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
          node = node[p]
        node[leaf] = value
  return config


def load_teacher(config):
  """The teacher bundle named by the config, or a random one of --teacher_arch."""
  from benchmarks import jax_side
  return jax_side.load_teacher(config, _TEACHER_ARCH.value)


def run_side(side: str) -> dict[str, Any]:
  config = benchmark_config()
  teacher, table = load_teacher(config)
  spec = teacher.spec
  if side == "jax":
    from benchmarks import jax_side
    fuse = {"auto": None, "true": True, "false": False}[_FUSE.value]
    result = jax_side.measure(config, teacher, table, _REPEATS.value, fuse)
    result.update(peak_fields(result))
    return with_mfu(result)
  if side == "flops":
    from benchmarks import jax_side
    return {"name": "flops", "step_flops": jax_side.count_step_flops(config, teacher, table)}
  if side == "torch":
    from benchmarks import torch_side
    return torch_side.measure(config, spec.arch, table.vectors, spec.mean, spec.std,
                              spec.image_size, _REPEATS.value)
  if side == "nayer":
    from benchmarks import nayer_side
    if not _NAYER_PATH.value:
      raise app.UsageError("--sides=nayer needs --nayer_path=PATH of a NAYER checkout.")
    repeats = _REPEATS.value if _NAYER_REPEATS.value is None else _NAYER_REPEATS.value
    return nayer_side.measure(_NAYER_PATH.value, config, spec.arch, table.vectors, spec.image_size,
                              repeats)
  raise app.UsageError(f"Unknown side {side!r}: use jax, torch or nayer.")


def peak_fields(result: dict[str, Any]) -> dict[str, Any]:
  """The peak FLOP/s of this process's devices that MFU is measured against, with its source."""
  import jax
  import jax.numpy as jnp
  from benchmarks import flops as flops_lib
  if _PEAK_TFLOPS.value:
    peak, source = _PEAK_TFLOPS.value * 1e12, "--peak_tflops"
  elif (sheet := flops_lib.datasheet_peak(jax.local_devices()[0])) is not None:
    peak, source = sheet, "datasheet bf16"
  else:
    dtype = jnp.dtype(result["compute_dtype"])
    peak, source = flops_lib.measured_matmul_peak(dtype), f"measured {dtype.name} matmul"
  return {"peak_flops_per_s": peak * jax.local_device_count(), "peak_source": source}


def with_mfu(result: dict[str, Any]) -> dict[str, Any]:
  """The jax side's result plus FLOP/s and MFU of each step, where its FLOPs are counted."""
  out = dict(result)
  for step, rate in (("generator", "generator_steps_per_s"), ("student", "student_steps_per_s")):
    flops = (result.get("step_flops") or {}).get(f"{step}_step")
    out[f"{step}_flops_per_s"] = flops * result[rate] if flops else None
    out[f"mfu_{step}"] = (out[f"{step}_flops_per_s"] / result["peak_flops_per_s"]
                          if flops else None)
  return out


def _without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
  """argv less the named flags, in either --name=value or --name value form."""
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg in names:
      skip = True
    elif not arg.startswith(tuple(n + "=" for n in names)):
      kept.append(arg)
  return kept


def run_in_subprocess(side: str, env: dict[str, str] | None = None,
                      extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
  """Runs one side in a fresh interpreter with this process's flags; returns its JSON.

  A side that outlives --side_timeout is stopped with everything it started (NAYER's
  DataLoader workers too) and reported as timed out.
  """
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "side.json")
    argv = _without_flags(sys.argv[1:], ("--sides", "--out_json"))
    cmd = [sys.executable, "-m", "benchmarks.dfkd_benchmark", *argv, *extra_args, f"--side={side}",
           f"--side_json={path}"]
    process = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               env={**os.environ, **(env or {})}, start_new_session=True)
    try:
      returncode = process.wait(timeout=_SIDE_TIMEOUT.value or None)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return {"name": side, "error": f"timed out after --side_timeout={_SIDE_TIMEOUT.value} s"}
    if returncode:
      return {"name": side, "error": f"exited with status {returncode} (see its output above)"}
    with open(path) as f:
      return json.load(f)


# The PyTorch sides use JAX only to build a random teacher's spec: on the CPU, so that JAX takes
# none of the accelerator's memory from PyTorch and NAYER's DataLoader forks no CUDA process.
JAX_ON_CPU = {"JAX_PLATFORMS": "cpu"}
SIDE_ENV = {"torch": JAX_ON_CPU, "nayer": JAX_ON_CPU}


def count_flops_on_cpu(result: dict[str, Any]) -> dict[str, Any]:
  """The jax side's result with its steps' FLOPs counted on a CPU lowering, where its own
  backend counted none (GPUs), and MFU from them."""
  if "error" in result or all((result.get("step_flops") or {}).values()):
    return result
  counted = run_in_subprocess("flops", JAX_ON_CPU,
                              (f"--config.compute_dtype={result['compute_dtype']}",))
  if "error" in counted:
    return {**result, "flops_error": counted["error"]}
  return with_mfu({**result, "step_flops": counted["step_flops"],
                   "step_flops_source": "the same step lowered for the CPU (XLA:GPU counts none "
                                        "of cuDNN's convolutions)"})


def _fmt(value, unit: str = "") -> str:
  if value is None:
    return "-"
  if unit == "%":
    return f"{100 * value:.1f}%"
  if unit == "MiB":
    return f"{value / 2**20:,.0f} MiB"
  return f"{value:,.1f}{unit}" if value >= 10 else f"{value:.3g}{unit}"


ROWS = [  # (label, key, unit, higher is better)
    ("generator step, images/s", "generator_images_per_s", "", True),
    ("student step, images/s", "student_images_per_s", "", True),
    ("DFKD epoch, s", "epoch_s", "", False),
    ("compile / first-call overhead, s", "compile_s", "", False),
    ("peak device memory", ("memory", "device_peak_bytes"), "MiB", False),
    ("peak host RSS", ("memory", "host_peak_rss_bytes"), "MiB", False),
    ("MFU, student step", "mfu_student", "%", True),
    ("MFU, generator step", "mfu_generator", "%", True),
]


def _get(result: dict[str, Any], key):
  if isinstance(key, tuple):
    return (result.get(key[0]) or {}).get(key[1])
  return result.get(key)


def format_table(results: list[dict[str, Any]]) -> str:
  """Markdown table: one column per side, then caedfkd-jax's speed-up over each other side."""
  jax_result = next((r for r in results if r.get("name") == "caedfkd-jax"), None)
  others = [r for r in results if r is not jax_result]
  header = ["", *(r["name"] for r in results)]
  if jax_result:
    header += [f"jax vs {r['name']}" for r in others]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, key, unit, higher in ROWS:
    cells = [_fmt(_get(r, key), unit) for r in results]
    if jax_result:
      for r in others:
        a, b = _get(jax_result, key), _get(r, key)
        ratio = (a / b if higher else b / a) if a and b and unit not in ("%", "MiB") else None
        cells.append(f"{ratio:.2f}x" if ratio else "-")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  errors = [f"{r['name']}: {r['error']}" for r in results if "error" in r]
  devices = [f"{r['name']}: {r.get('device', '?')}" for r in results if "error" not in r]
  return "\n".join(lines + ["", "devices: " + "; ".join(devices)] + errors)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/cifar10_resnet56_resnet20.py")
  if _SIDE.value:
    result = run_side(_SIDE.value)
    with open(_SIDE_JSON.value, "w") as f:
      json.dump(result, f, indent=2, default=str)
    return
  sides = _SIDES.value or (["jax", "torch"] + (["nayer"] if _NAYER_PATH.value else []))
  config = benchmark_config()
  command = " ".join([os.path.basename(sys.executable), "-m", "benchmarks.dfkd_benchmark",
                      *sys.argv[1:]])
  results = []
  for side in sides:
    result = run_in_subprocess(side, SIDE_ENV.get(side))
    results.append(count_flops_on_cpu(result) if side == "jax" else result)
    table = format_table(results)
    if _OUT_JSON.value:
      os.makedirs(os.path.dirname(os.path.abspath(_OUT_JSON.value)), exist_ok=True)
      report = {"config": config.to_dict(), "quick": _QUICK.value, "sides": results,
                "command": command, "table": table, "complete": len(results) == len(sides)}
      atomic_files.write_text(_OUT_JSON.value, json.dumps(report, indent=2, default=str))
  print("\n" + table)
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
