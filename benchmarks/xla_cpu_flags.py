r"""Which XLA:CPU settings make caedfkd-jax fastest on this CPU: one benchmark run per setting.

  python -m benchmarks.xla_cpu_flags --config configs/cifar10_resnet56_resnet20.py \
      --config.generator.steps=4 --config.student.kd_steps=20 --out_json runs/xla_cpu_flags.json

Every variant runs `benchmarks.dfkd_benchmark --sides=jax` in a fresh process with
XLA_FLAGS set (flags only take effect before JAX starts), with the config and
overrides given here, and per-step (`--fuse=false`) unless the variant says otherwise.
A variant that runs past --timeout_s (default 900) is reported as stopped.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

VARIANTS = {  # name -> (XLA_FLAGS, extra benchmark flags)
    "default": ("", []),
    "fast_math": ("--xla_cpu_enable_fast_math=true", []),
    "onednn": ("--xla_cpu_use_onednn=true", []),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", []),
    "fast_math_onednn": ("--xla_cpu_enable_fast_math=true --xla_cpu_use_onednn=true", []),
    "no_thunk_runtime": ("--xla_cpu_use_thunk_runtime=false", []),
    "vector_width_512": ("--xla_cpu_prefer_vector_width=512", []),
    "fused_scan": ("", ["--fuse=true"]),
    "fused_scan_no_thunk_runtime": ("--xla_cpu_use_thunk_runtime=false", ["--fuse=true"]),
}


def run_variant(name: str, argv: list[str], timeout_s: float) -> dict:
  xla_flags, extra = VARIANTS[name]
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    cmd = [sys.executable, "-m", "benchmarks.dfkd_benchmark", "--sides=jax", "--fuse=false",
           *argv, *extra, f"--out_json={out}"]
    # Own process group: a timeout must stop the benchmark's per-side child processes too.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
      stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      return {"variant": name, "xla_flags": xla_flags, "error": f"over {timeout_s:.0f} s, stopped"}
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if done.returncode or not os.path.exists(out):
      tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
      return {"variant": name, "xla_flags": xla_flags, "error": " / ".join(tail)}
    with open(out) as f:
      side = json.load(f)["sides"][0]
  if "error" in side:
    return {"variant": name, "xla_flags": xla_flags, "error": side["error"]}
  return {"variant": name, "xla_flags": xla_flags, "extra": extra,
          **{k: side[k] for k in ("generator_images_per_s", "student_images_per_s", "epoch_s",
                                  "compile_s", "mfu_student", "mfu_generator")}}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], allow_abbrev=False,
      epilog="Every other argument (--config, --config.X=..., --repeats, ...) goes to "
             "benchmarks.dfkd_benchmark.")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
  parser.add_argument("--timeout_s", type=float, default=900.0)
  parser.add_argument("--out_json")
  args, rest = parser.parse_known_args(argv)
  names = args.variants.split(",")
  unknown = set(names) - set(VARIANTS)
  if unknown:
    print(f"Unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
    return 2
  rows = []
  for name in names:
    rows.append(run_variant(name, rest, args.timeout_s))
    r = rows[-1]
    print(f"{name}: " + (r["error"] if "error" in r else
                         f"gen {r['generator_images_per_s']:.1f} img/s, student "
                         f"{r['student_images_per_s']:.1f} img/s, epoch {r['epoch_s']:.2f} s"),
          flush=True)
  base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
  print("\n| variant | XLA_FLAGS | generator img/s | student img/s | epoch s | vs default | compile s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['variant']} | `{r['xla_flags']}` | failed: {r['error'][:80]} | | | | |")
      continue
    speedup = f"{base['epoch_s'] / r['epoch_s']:.2f}x" if base else "-"
    print(f"| {r['variant']} | `{r['xla_flags'] or '-'}` {' '.join(r['extra'])} | "
          f"{r['generator_images_per_s']:.1f} | {r['student_images_per_s']:.1f} | "
          f"{r['epoch_s']:.2f} | {speedup} | {r['compile_s']:.1f} |")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
