"""The kill test: `caedfkd distill` SIGKILLed at several moments, one of them mid-checkpoint,
then rerun to the end, gives the uninterrupted run's student and metrics bit for bit (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from caedfkd_jax.cli import demo
from caedfkd_jax.config import defaults, fields
from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib
from tiny_run import NUM_CLASSES, tiny_config
from xla_test_flags import FAST_COMPILE

TIMEOUT_S = 240   # per invocation; a hung one is killed and fails the test

# Runs `caedfkd distill` and SIGKILLs itself at $KILL_AT:
#   save:STEP  inside Orbax's write of checkpoint STEP (its "progress" JSON item), so the
#              checkpoint's temporary directory is left half-written;
#   bundle     just before the student bundle is written (after the last checkpoint).
DRIVER = '''
import os, signal, sys
import orbax.checkpoint as ocp
from caedfkd_jax.io import bundle

kill_at = os.environ.get("KILL_AT", "")
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if kill_at.startswith("save:"):
  original = ocp.JsonCheckpointHandler._save_fn

  async def _save_fn(self, x, directory):
    item, step = directory.name.split(".")[0], directory.parent.name.split(".")[0]
    if item == "progress" and step == kill_at[5:]:
      die()
    return await original(self, x, directory)

  ocp.JsonCheckpointHandler._save_fn = _save_fn
elif kill_at == "bundle":
  bundle.save_bundle = die

from caedfkd_jax.cli import main
sys.exit(main.main(sys.argv[1:]))
'''


def _write_config(path, config):
  """A config file: the defaults updated with `config`'s differing fields."""
  default = fields.flatten(defaults.get_config().to_dict())
  changed = {k: v for k, v in fields.flatten(config.to_dict()).items() if default.get(k) != v}
  path.write_text("from caedfkd_jax.config import defaults\n\n\ndef get_config():\n"
                  "  config = defaults.get_config()\n"
                  f"  config.update_from_flattened_dict({changed!r})\n  return config\n")
  return str(path)


def _steps(workdir):
  """Steps of the complete checkpoints (Orbax renames a finished one to its step)."""
  directory = os.path.join(workdir, train.CHECKPOINT_DIR)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_killed_runs_rerun_to_the_uninterrupted_result(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)   # warm-up (2 rounds), 2 x (1 round, 2 KD calls)
  config.checkpoint_every_minutes = 0.0           # a checkpoint after every unit
  rng = np.random.default_rng(0)
  config.eval_data = demo.write_image_folder(
      str(tmp_path / "eval"), rng.uniform(size=(2 * NUM_CLASSES, 32, 32, 3)),
      np.arange(2 * NUM_CLASSES) % NUM_CLASSES, [f"c{k}" for k in range(NUM_CLASSES)])
  config_file = _write_config(tmp_path / "tiny.py", config)
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KILL_AT")}   # 1 device
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"), XLA_FLAGS=FAST_COMPILE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  logs = []

  def start(workdir, kill_at=""):
    args = [sys.executable, str(driver), "distill", "--config", config_file,
            "--workdir", str(workdir)]
    logs.append(tmp_path / f"log_{len(logs)}.txt")
    with open(logs[-1], "w") as log:   # a file, not a pipe: nothing can block on a full pipe
      return subprocess.Popen(args, env={**env, "KILL_AT": kill_at}, stdout=log, stderr=log)

  def finish(proc, expected_rc):
    try:
      proc.wait(timeout=TIMEOUT_S)
    finally:
      proc.kill()   # a no-op once it has exited
    assert proc.returncode == expected_rc, logs[-1].read_text()[-3000:]

  a, b = tmp_path / "a", tmp_path / "b"
  finish(start(a), 0)                                      # the reference, uninterrupted
  last = _steps(a)[-1]
  assert last == config.epochs * 10_000

  # 1. Killed by the test at a moment it does not choose: just after the checkpoint that
  #    follows epoch 1's generator round, i.e. during its KD calls or their checkpoints.
  proc = start(b)
  deadline = time.time() + TIMEOUT_S
  try:
    while not any(s >= 10_001 for s in _steps(b)):
      assert proc.poll() is None and time.time() < deadline, "no checkpoint of epoch 1 appeared"
      time.sleep(0.01)
  finally:
    proc.kill()   # SIGKILL
  finish(proc, -signal.SIGKILL)
  reached = _steps(b)[-1]
  assert reached < last

  # 2. Killed inside the write of an end-of-epoch checkpoint, after that epoch's metrics
  #    row was written: the row must go, and the half-written checkpoint be ignored.
  target = next(e * 10_000 for e in range(2, config.epochs + 1) if e * 10_000 > reached)
  finish(start(b, f"save:{target}"), -signal.SIGKILL)
  assert _steps(b)[-1] < target
  assert any(n.startswith(f"{target}.orbax-checkpoint-tmp")
             for n in os.listdir(b / train.CHECKPOINT_DIR)), "no half-written checkpoint left"
  assert [r["epoch"] for r in _rows(b)][-1] == target // 10_000

  # 3. Killed after the last checkpoint, before the student bundle is written.
  finish(start(b, "bundle"), -signal.SIGKILL)
  assert _steps(b)[-1] == last and not os.path.exists(b / train.STUDENT_DIR / "model.json")

  # 4. The last invocation runs to the end.
  finish(start(b), 0)
  assert all("Resumed from" in log.read_text() for log in logs[2:])

  leaves = lambda w: jax.tree.leaves(bundle_lib.load_bundle(str(w / train.STUDENT_DIR)).variables)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  rows_a, rows_b = _rows(a), _rows(b)
  epochs = list(range(1, config.epochs + 1))
  assert [r["epoch"] for r in rows_a] == epochs and [r["epoch"] for r in rows_b] == epochs
  assert "eval/top1" in rows_a[-1]
  untimed = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}
  for ra, rb in zip(rows_a, rows_b):
    assert untimed(rb) == untimed(ra), f"epoch {ra['epoch']}"
  names = [f"epoch_{e:04d}.png" for e in epochs]
  assert sorted(os.listdir(b / "samples")) == names
  for name in names:
    assert (b / "samples" / name).read_bytes() == (a / "samples" / name).read_bytes(), name
