"""Multi-host as it is used: `caedfkd distill --config.distributed=True` in two local processes.

JAX's CPU backend runs cross-process collectives over the loopback (gloo), so two
processes with four simulated devices each form one eight-device ("data",) mesh.
The reference is one process with eight devices on the same config.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.runtime import multihost
from caedfkd_jax.runtime.mesh import make_mesh
from xla_test_flags import FAST_COMPILE

NUM_CLASSES = 4
TIMEOUT_S = 600  # Per launch; generous for a loaded 2-core machine, and nothing can hang past it.

CONFIG = '''
from caedfkd_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.teacher = {teacher!r}
  config.embeddings = {table!r}
  config.student_arch = "resnet_tiny_a"
  config.cend.num_sources = 1            # group = 4 classes x 2 views = 8 images
  config.num_groups = 2                  # 16 images per round: 2 per device
  config.generator.noise_dim = 8
  config.generator.ngf = 4
  config.generator.steps = 2
  config.warmup_epochs = 1
  config.warmup_g_loops = 2
  config.g_loops = 0                     # the KD epoch only distils: see the KD comparison
  config.student.batch_groups = 2
  config.student.kd_steps = 4
  config.student.steps_per_call = 2      # two KD calls
  config.epochs = 2
  config.grid_images_per_class = 2
  return config
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  """A config file as users write them, naming a tiny random teacher and embedding table."""
  directory = tmp_path_factory.mktemp("multihost_inputs")
  spec = bundle_lib.ModelSpec("resnet_tiny_a", NUM_CLASSES, 32,
                              class_names=[f"c{k}" for k in range(NUM_CLASSES)])
  teacher = str(directory / "teacher")
  bundle_lib.save_bundle(teacher, spec, bundle_lib.init_variables(spec, 1))
  vectors = np.random.default_rng(0).normal(size=(NUM_CLASSES, 16)).astype(np.float32)
  table = str(directory / "table.npy")
  embeddings.EmbeddingTable(vectors, [f"c{k}" for k in range(NUM_CLASSES)],
                            {"encoder": "test"}).save(table)
  path = directory / "tiny.py"
  path.write_text(CONFIG.format(teacher=teacher, table=table))
  return str(path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(config_file: str, workdir, devices: int, processes: int, log_dir) -> list:
  """Starts `caedfkd distill` as `processes` processes of `devices` CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  command = [sys.executable, "-m", "caedfkd_jax.cli.main", "distill", "--config", config_file,
             "--workdir", str(workdir)]
  if processes > 1:
    command += ["--config.distributed=True", f"--config.num_processes={processes}",
                f"--config.coordinator_address=127.0.0.1:{_free_port()}"]
  running = []
  for i in range(processes):
    log = open(log_dir / f"{os.path.basename(workdir)}.{i}.log", "w")
    args = command + ([f"--config.process_id={i}"] if processes > 1 else [])
    running.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return running


def _wait(running: list) -> list[str]:
  """Waits for every process; kills all at the first failure or the timeout, so that a process
  left waiting for a dead peer in a collective never hangs the test. Returns their output."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p, _ in running) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p, _ in running):
        break
      time.sleep(0.5)
  finally:
    for process, log in running:
      if process.poll() is None:
        process.kill()
        process.wait()
      log.close()
  outputs = [open(log.name).read() for _, log in running]
  failed = [f"{' '.join(p.args[3:])}\nexited {p.returncode} (-9: killed here):\n{out[-2000:]}"
            for (p, _), out in zip(running, outputs) if p.returncode != 0]
  assert not failed, "\n\n".join(failed)
  return outputs


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _assert_rows_close(row, ref, rtol: float, atol: float, atol_of: dict | None = None) -> None:
  """`atol_of`: per-key absolute tolerances that replace `atol` (and rtol) for those keys."""
  assert row.keys() == ref.keys()
  for k in ref:
    if not k.startswith("time/"):
      exact = (atol_of or {}).get(k)
      np.testing.assert_allclose(row[k], ref[k], rtol=0 if exact else rtol,
                                 atol=exact or atol, err_msg=f"epoch {ref['epoch']} {k}")


def _assert_written_once(workdir, epochs: list[int], checkpoints: list[str],
                         samples: list[str]) -> None:
  """One writer: no duplicated rows, files, checkpoints or leftover temp directories."""
  assert sorted(os.listdir(workdir)) == ["checkpoints", "metrics.jsonl", "result.json", "samples",
                                         "student", "tensorboard"]
  assert [r["epoch"] for r in _rows(workdir)] == epochs
  assert sorted(os.listdir(os.path.join(workdir, train.CHECKPOINT_DIR))) == checkpoints
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == samples
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert sorted(os.listdir(os.path.join(workdir, "student"))) == [bundle_lib.MODEL_JSON,
                                                                   bundle_lib.VARIABLES_DIR]
  assert json.load(open(os.path.join(workdir, "result.json")))["epoch"] == epochs[-1]


@pytest.mark.slow
def test_two_processes_match_one_and_write_once(config_file, tmp_path):
  one, two, resumed = tmp_path / "one_x8", tmp_path / "two_x4", tmp_path / "two_x4_resumed"
  # The reference and the two-process run from scratch, side by side (compiling is most of it).
  running = _launch(config_file, one, devices=8, processes=1, log_dir=tmp_path)
  try:
    running += _launch(config_file, two, devices=4, processes=2, log_dir=tmp_path)
  finally:
    outputs = _wait(running)
  assert outputs[1].count("Student bundle:") == 1 and outputs[2].count("Student bundle:") == 1
  assert "epoch 1/2:" in outputs[1] and "epoch 1/2:" not in outputs[2]  # process 0 speaks
  _assert_written_once(two, [1, 2], ["10000", "20000"], ["epoch_0001.png"])

  ref = _rows(one)
  rows = _rows(two)
  # Warm-up (generator rounds, BN statistics and losses over the global batch): the same numbers
  # up to the order of the collective reductions. atol 1e-5: gen/adv (about -5e-3 here) is a KL
  # between two near-equal distributions, a difference of O(1) log-probabilities, so its rounding
  # is absolute at their scale (6e-6 apart on one Xeon, within 1e-6 on another).
  _assert_rows_close(rows[0], ref[0], rtol=1e-5, atol=1e-5)
  # The KD epoch is only loosely comparable from scratch: the banked images are uint8, and a
  # float difference of ~1e-7 in the generator flips about one pixel of 49k per round by one
  # grey level (measured: 2 pixels after warm-up; 1x1 vs 1x8 devices flip as many). Four SGD
  # steps on those make ~1e-3 of the KD losses, and may flip the student's argmax on an image:
  # kd/agreement counts 64 images (4 steps of 16), so it may differ by one image, 1/64. The
  # tight KD comparison follows.
  _assert_rows_close(rows[1], ref[1], rtol=1e-2, atol=1e-4, atol_of={"kd/agreement": 1 / 64})

  # KD from the same warm-up state: two processes resume the reference's checkpoint (a restore
  # over two processes) and must then match it to reduction-order rounding.
  shutil.copytree(one / train.CHECKPOINT_DIR / "10000", resumed / train.CHECKPOINT_DIR / "10000")
  outputs = _wait(_launch(config_file, resumed, devices=4, processes=2, log_dir=tmp_path))
  assert "Resumed from" in outputs[0] and "at epoch 1, unit 0" in outputs[0]
  assert [r["epoch"] for r in _rows(resumed)] == [2]
  assert sorted(os.listdir(resumed / train.CHECKPOINT_DIR)) == ["10000", "20000"]
  _assert_rows_close(_rows(resumed)[0], ref[1], rtol=1e-4, atol=1e-6)
  a = bundle_lib.load_bundle(str(one / "student")).variables
  b = bundle_lib.load_bundle(str(resumed / "student")).variables
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_helpers_are_plain_jax_in_one_process():
  """With one process the helpers reduce to device_put / device_get and no collective."""
  mesh = make_mesh()
  x = np.arange(16, dtype=np.float32)
  sharded = multihost.put(x, NamedSharding(mesh, P("data")))
  assert sharded.sharding.spec == P("data")
  np.testing.assert_array_equal(multihost.to_host({"x": sharded})["x"], x)
  key = multihost.put(jax.random.key(3), NamedSharding(mesh, P()))
  assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(3)).tolist()
  assert multihost.agree(True, False) == (True, False)
  assert multihost.is_primary()
