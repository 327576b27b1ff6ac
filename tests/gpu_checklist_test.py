"""benchmarks/gpu_checklist.sh in its CPU-sized --dry mode, end to end, so that the one command a
GPU session runs cannot rot; and the benchmark's safeguards for short GPU leases: a side that
overruns is stopped and reported, results are written side by side, FLOPs counted on the CPU
match the side's own count."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import dfkd_benchmark, gpu_report, random_bundle
from xla_test_flags import FAST_COMPILE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.student_arch=resnet_tiny_a", "--config.generator.ngf=8",
        "--config.generator.noise_dim=32", "--config.teacher_arch_expected="]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  return {**env, "XLA_FLAGS": FAST_COMPILE, **extra}


def _image_folder(root, classes=10, per_class=2):
  rng = np.random.default_rng(0)
  for k in range(classes):
    os.makedirs(root / "test" / f"class{k}")
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          root / "test" / f"class{k}" / f"{i}.png")
  return root


@pytest.mark.slow
def test_dry_checklist_runs_every_step_and_writes_the_report(tmp_path):
  teacher = tmp_path / "teacher"
  random_bundle.make_random_bundle("resnet8", 10, str(teacher))
  out = tmp_path / "out"
  # bench_r34 is bench_r56's command with paper_cifar.py (whose configs launch_test loads): left
  # out to keep the suite's time.
  env = _env(OUT_DIR=str(out), TEACHER=str(teacher), CIFAR10=str(_image_folder(tmp_path / "c10")),
             CONFIG_ARGS=" ".join(TINY), BENCH_ARGS="--teacher_arch=resnet8",
             STEPS="bench_r56,accuracy,diffusion,runs_cost")
  done = subprocess.run(["bash", "benchmarks/gpu_checklist.sh", "--dry"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  log = (out / "log.txt").read_text() if (out / "log.txt").exists() else done.stderr
  assert done.returncode == 0, log[-4000:]
  for step in ("bench_r56", "accuracy", "diffusion", "runs_cost"):
    assert f"END {step}: exit 0" in log, log[-4000:]
  assert "smoke" not in log  # --dry's steps are CI-sized already
  # At most 8 files, as the device tool brings back.
  assert sorted(os.listdir(out)) == [
      "accuracy_metrics.jsonl", "accuracy_samples.png", "bench_r56_r20.json",
      "diffusion_speed.json", "env.txt", "gpu_results.md", "log.txt", "runs_cost.json"]

  for name in ("bench_r56_r20.json",):
    bench = json.loads((out / name).read_text())
    assert bench["complete"]
    jax_side, torch_side = bench["sides"]
    assert jax_side["name"] == "caedfkd-jax" and torch_side["name"].startswith("PyTorch")
    for side in (jax_side, torch_side):
      assert side["generator_images_per_s"] > 0 and side["student_images_per_s"] > 0
      assert side["epoch_s"] > 0
    assert jax_side["epoch_plan"] == {"rounds": 1, "g_steps": 2, "kd_steps": 4}
    assert jax_side["step_flops"]["generator_step"] > jax_side["step_flops"]["student_step"] > 0
    assert 0 < jax_side["mfu_student"] < 1
  rows = [json.loads(line) for line in (out / "accuracy_metrics.jsonl").read_text().splitlines()]
  assert any("eval/top1" in row for row in rows)
  runs = json.loads((out / "runs_cost.json").read_text())["results"]
  assert [(r["runs"], r["vectorized"]) for r in runs] == [(1, None), (2, True)]

  report = (out / "gpu_results.md").read_text()
  assert report in done.stdout
  diffusion = json.loads((out / "diffusion_speed.json").read_text())
  assert diffusion["dry"] and diffusion["images_per_s"] > 0 and diffusion["gen_loss_finite"]
  for heading in ("### Speed, resnet56 -> resnet20", "### Accuracy",
                  "### DiffDFKD synthesis", "### Many runs in one program"):
    assert heading in report
  assert "jax vs PyTorch (equivalent step)" in report
  assert "failed or were skipped" not in report


def test_a_side_past_its_timeout_is_stopped_and_reported(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "benchmarks.dfkd_benchmark", "--config",
         "configs/cifar10_resnet56_resnet20.py", "--quick", "--sides=jax", "--side_timeout=1",
         f"--out_json={out}"]
  done = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  (side,) = json.loads(out.read_text())["sides"]
  assert side == {"name": "jax", "error": "timed out after --side_timeout=1 s"}
  assert "jax: timed out" in done.stdout


def test_flops_side_counts_what_the_jax_side_counts(tmp_path):
  """The count the benchmark falls back on where XLA gives none (GPUs) is the same number."""
  path = tmp_path / "flops.json"
  config = os.path.join("configs", "cifar10_resnet56_resnet20.py")
  common = ["--config", config, "--quick", "--teacher_arch=resnet8", *TINY]
  done = subprocess.run([sys.executable, "-m", "benchmarks.dfkd_benchmark", *common,
                         "--side=flops", f"--side_json={path}"], cwd=REPO_ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  counted = json.loads(path.read_text())["step_flops"]
  assert counted["generator_step"] > counted["student_step"] > 0

  result = {"step_flops": {"generator_step": None, "student_step": None},
            "generator_steps_per_s": 10.0, "student_steps_per_s": 20.0, "peak_flops_per_s": 1e15}
  filled = dfkd_benchmark.with_mfu({**result, "step_flops": counted})
  assert filled["mfu_student"] == pytest.approx(counted["student_step"] * 20.0 / 1e15)
  assert filled["generator_flops_per_s"] == pytest.approx(counted["generator_step"] * 10.0)
  empty = dfkd_benchmark.with_mfu(result)
  assert empty["mfu_student"] is None and empty["generator_flops_per_s"] is None


def test_report_names_failed_and_skipped_steps(tmp_path):
  (tmp_path / "log.txt").write_text(
      "[1s] START bench_r56 (timeout 360s): ...\n[300s] END bench_r56: exit 124\n"
      "[301s] START accuracy (timeout 210s): ...\n[400s] END accuracy: exit 0\n"
      "[541s] SKIP runs_cost: deadline reached\n")
  (tmp_path / "env.txt").write_text("NVIDIA H100 80GB HBM3\n")
  report = gpu_report.report(str(tmp_path))
  assert "NVIDIA H100 80GB HBM3" in report
  assert "`[300s] END bench_r56: exit 124`" in report
  assert "`[541s] SKIP runs_cost: deadline reached`" in report
  assert "END accuracy: exit 0" not in report
