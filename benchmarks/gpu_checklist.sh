#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md ("GPU checklist") in one command, most important
# first, each step under a shared deadline so that the whole run fits one short GPU lease.
#
#   benchmarks/gpu_checklist.sh          # on the GPU machine, from the repository root
#   benchmarks/gpu_checklist.sh --dry    # the same steps at CPU size (CI runs this)
#
# Steps, in order of value (a step that fails is logged and the next one runs; STEPS picks some):
#   env        GPU, driver, versions; an import check (falls back to FALLBACK_WHEELS); always runs
#   smoke      a CI-sized caedfkd-jax step on the device; the checklist stops if it fails
#   bench_r56  dfkd_benchmark, three sides (caedfkd-jax, the PyTorch step, NAYER's own code), on
#              configs/cifar10_resnet56_resnet20.py:full (MFU and compile time are in it)
#   accuracy   a short fused bf16 `caedfkd distill` from the real resnet56 teacher: the :full
#              config's batches on a short schedule, top-1 per epoch
#   bench_r34  dfkd_benchmark on configs/paper_cifar.py:cifar10,resnet34,resnet18
#   diffusion  DiffDFKD synthesis images/s, full-size Stable Diffusion v1.x at 64x64 latents,
#              random weights, bf16 (benchmarks/diffusion_speed.py)
#   runs_cost  R = 1, 2, 4, 8 runs in one program against R = 1
# Every step fits 15 device-minutes only in two calls: see benchmarks/README.md, "GPU checklist".
# Then benchmarks/gpu_report.py writes gpu_results.md, ready for docs/results.md.
#
# Settings (environment variables):
#   OUT_DIR          where results go (default: $OUT on the lent machine, else runs/gpu_checklist)
#   NAYER_PATH       a NAYER checkout (github.com/tmtuan1307/NAYER); without one, 2 sides only
#   TEACHER          a converted resnet56 bundle, or TEACHER_TH: akamaster's resnet56 .th file
#   CIFAR10          CIFAR-10 data spec for step 3 (an image folder with a test split)
#   WHEELS           a folder of wheels installed first (offline machine): ml_collections,
#                    tensorboardX, and for NAYER's side kornia + kornia_rs
#   FALLBACK_WHEELS  wheels tried if the machine's own flax/optax/orbax/chex fail to import
#   STEPS            comma-separated steps to run (default: all, in the order above)
#   DEADLINE_S       seconds for the whole checklist (default 570); steps after it are skipped
#   SIDE_TIMEOUT     seconds each benchmark side may take (default 150)
#   CONFIG_ARGS, BENCH_ARGS  extra --config.* flags for every command, and extra flags for the
#                    benchmarks only (the CI test uses them to shrink the networks)
#   ACC_MINUTES      training budget of step 3 (default 2); ACC_EPOCHS and ACC_WARMUP its
#                    schedule (default 30 epochs, 2 of them warm-up: short enough to finish)
#   PYTHON           interpreter (default python3)
# An offline GPU machine needs wheels: ml_collections and tensorboardX (this library); kornia,
# kornia_rs, termcolor and xlsxwriter (NAYER). benchmarks/gpu_carry.sh gathers them here.
set -u -o pipefail

DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-runs/gpu_checklist}}
DEADLINE_S=${DEADLINE_S:-570}
SIDE_TIMEOUT=${SIDE_TIMEOUT:-150}
STEPS=${STEPS:-smoke,bench_r56,accuracy,bench_r34,diffusion,runs_cost}
((DRY)) && STEPS=${STEPS/smoke,/}  # --dry's steps are all CI-sized already
read -r -a CONFIG_EXTRA <<<"${CONFIG_ARGS:-}"
read -r -a BENCH_EXTRA <<<"${BENCH_ARGS:-}"
ACC_MINUTES=${ACC_MINUTES:-2}
ACC_EPOCHS=${ACC_EPOCHS:-30}
ACC_WARMUP=${ACC_WARMUP:-2}
START=$SECONDS
mkdir -p "$OUT_DIR"
(cd "$OUT_DIR" && rm -f env.txt log.txt bench_*.json accuracy_* runs_cost.json diffusion_speed.json gpu_results.md)
LOG="$OUT_DIR/log.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One compilation cache for the whole checklist: the first benchmark compiles cold (its compile_s
# is a cold figure); later processes (the accuracy run) reuse what matches.
export JAX_COMPILATION_CACHE_DIR="$WORK/xla_cache"

say() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, time left), logged.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE_S - (SECONDS - START)))
  if ((left < 20)); then
    say "SKIP $name: deadline reached"; return 1
  fi
  ((cap > left)) && cap=$left
  say "START $name (timeout ${cap}s): $*"
  timeout --kill-after=5 "$cap" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "END $name: exit $rc"
  return $rc
}

install_wheels() {  # install_wheels DIR: into $WORK/site, first on PYTHONPATH
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$1"/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$WORK/site:$PYTHONPATH"
}

import_check() {
  "$PY" -c "import jax, flax, optax, orbax.checkpoint, chex, ml_collections
from caedfkd_jax.engine import train, steps
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
}

# 0. Environment.
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" --version
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} >"$OUT_DIR/env.txt" 2>&1
[[ -n "${WHEELS:-}" ]] && install_wheels "$WHEELS"
if ! import_check >>"$OUT_DIR/env.txt" 2>&1; then
  say "import check failed with the machine's packages (see env.txt)"
  if [[ -n "${FALLBACK_WHEELS:-}" ]] && install_wheels "$FALLBACK_WHEELS" \
      && import_check >>"$OUT_DIR/env.txt" 2>&1; then
    say "import check passed with FALLBACK_WHEELS"
  else
    say "import check failed: stopping"; exit 1
  fi
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|chex|torch|torchvision|kornia|numpy) " \
  >>"$OUT_DIR/env.txt"

R56=configs/cifar10_resnet56_resnet20.py
R34=configs/paper_cifar.py:cifar10,resnet34,resnet18
SIDES=jax,torch
NAYER_FLAG=()
if [[ -n "${NAYER_PATH:-}" ]]; then
  SIDES=jax,torch,nayer
  NAYER_FLAG=(--nayer_path "$NAYER_PATH" --nayer_repeats 1)
fi
if ((DRY)); then
  SIZE=(--quick --repeats 1)
  RUNS=1,2
  VECTORIZE=true   # the accelerators' default, whose program the dry run checks
  # distill at the benchmarks' --quick size (dfkd_benchmark.QUICK_OVERRIDES)
  read -r -a DISTILL_SIZE <<<"$("$PY" -c 'from benchmarks.dfkd_benchmark import QUICK_OVERRIDES
print(" ".join(f"--config.{k}={v}" for k, v in QUICK_OVERRIDES.items()))')"
  R56_CONFIG=$R56
else
  SIZE=(--repeats 2)
  RUNS=1,2,4,8
  VECTORIZE=auto
  R56_CONFIG=$R56:full
  DISTILL_SIZE=(--config.epochs="$ACC_EPOCHS" --config.warmup_epochs="$ACC_WARMUP")
fi
bench() {  # bench CONFIG: the three-sided benchmark's command line, in BENCH (--config first:
  BENCH=("$PY" -m benchmarks.dfkd_benchmark --config "$1" "${SIZE[@]}"  # overrides follow it)
         --side_timeout "$SIDE_TIMEOUT" --sides "$SIDES" "${NAYER_FLAG[@]}" "${BENCH_EXTRA[@]}"
         "${CONFIG_EXTRA[@]}")
}

# The device runs a CI-sized caedfkd-jax step before anything long is started.
if wanted smoke && ! step smoke 120 "$PY" -m benchmarks.dfkd_benchmark --config "$R56" --quick \
    --repeats 1 --sides jax "${BENCH_EXTRA[@]}" "${CONFIG_EXTRA[@]}"; then
  say "caedfkd-jax's CI-sized step failed on this machine: stopping (see log.txt)"; exit 1
fi

bench "$R56_CONFIG"
wanted bench_r56 && step bench_r56 $((2 * SIDE_TIMEOUT + 60)) "${BENCH[@]}" \
  --out_json "$OUT_DIR/bench_r56_r20.json"

if wanted accuracy; then
  if [[ -z "${TEACHER:-}" && -n "${TEACHER_TH:-}" ]]; then
    TEACHER=$WORK/teacher_resnet56
    step convert 60 "$PY" -m caedfkd_jax.cli.main convert "$TEACHER_TH" --arch resnet56 \
      --num-classes 10 --preset akamaster --out "$TEACHER"
  fi
  if [[ -n "${TEACHER:-}" && -n "${CIFAR10:-}" ]]; then
    step accuracy "$(awk "BEGIN {print int($ACC_MINUTES * 60 + 90)}")" \
      "$PY" -m caedfkd_jax.cli.main distill --config "$R56_CONFIG" --workdir "$WORK/distill" \
      --config.teacher="$TEACHER" --config.eval_data="$CIFAR10" \
      --config.time_budget_minutes="$ACC_MINUTES" "${DISTILL_SIZE[@]}" "${CONFIG_EXTRA[@]}"
    cp "$WORK/distill/metrics.jsonl" "$OUT_DIR/accuracy_metrics.jsonl" 2>/dev/null
    last_grid=$(ls "$WORK"/distill/samples/epoch_*.png 2>/dev/null | tail -1)
    [[ -n "$last_grid" ]] && cp "$last_grid" "$OUT_DIR/accuracy_samples.png"
  else
    say "SKIP accuracy: set TEACHER (or TEACHER_TH) and CIFAR10"
  fi
fi

bench "$R34"
wanted bench_r34 && step bench_r34 $((2 * SIDE_TIMEOUT + 60)) "${BENCH[@]}" \
  --out_json "$OUT_DIR/bench_r34_r18.json"

DIFF_SIZE=()
((DRY)) && DIFF_SIZE=(--dry --repeats 1)
wanted diffusion && step diffusion 300 "$PY" -m benchmarks.diffusion_speed "${DIFF_SIZE[@]}" \
  --out_json "$OUT_DIR/diffusion_speed.json"

wanted runs_cost && step runs_cost 240 "$PY" -m benchmarks.runs_cost --config "$R56_CONFIG" \
  "${SIZE[@]}" --runs "$RUNS" --vectorize "$VECTORIZE" "${BENCH_EXTRA[@]}" "${CONFIG_EXTRA[@]}" \
  --out_json "$OUT_DIR/runs_cost.json"

"$PY" -m benchmarks.gpu_report "$OUT_DIR" "$WORK/distill" >"$OUT_DIR/gpu_results.md" 2>>"$LOG"
cat "$OUT_DIR/gpu_results.md"
say "done"
