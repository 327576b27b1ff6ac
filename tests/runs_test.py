"""Many runs in one program (runs.py): each run is the lone run of its config and seed."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from caedfkd_jax.cli import demo
from caedfkd_jax.engine import runs, steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import NUM_CLASSES, assert_same_round_and_kd, step_outputs, tiny_config


def _eval_folder(path) -> str:
  rng = np.random.default_rng(0)
  return demo.write_image_folder(str(path), rng.uniform(size=(2 * NUM_CLASSES, 32, 32, 3)),
                                 np.arange(2 * NUM_CLASSES) % NUM_CLASSES,
                                 [f"c{k}" for k in range(NUM_CLASSES)])


# --------------------------------------------------------------------------- #
# Planning a job
# --------------------------------------------------------------------------- #


def test_plan_puts_seeds_inside_sweep_points(teacher_dir, table_path):
  config = tiny_config(teacher_dir, table_path)
  config.seed, config.num_runs = 5, 2
  config.sweep = "student.cncl_weight=0,0.5; loss.bn=1,10"
  plan = runs.plan_runs(config)
  assert [(r.index, r.seed, r.point) for r in plan] == [
      (0, 5, 0), (1, 6, 0), (2, 5, 1), (3, 6, 1), (4, 5, 2), (5, 6, 2), (6, 5, 3), (7, 6, 3)]
  assert plan[3].values == (("student.cncl_weight", 0.0), ("loss.bn", 10.0))
  assert plan[3].name == "run_03" and plan[3].label == "student.cncl_weight=0, loss.bn=10"
  lone = runs.run_config(config, plan[3])
  assert (lone.seed, lone.num_runs, lone.sweep) == (6, 1, "")
  assert lone.student.cncl_weight == 0.0 and lone.loss.bn == 10.0
  assert config.student.cncl_weight == 0.5      # the job's config is left alone


@pytest.mark.parametrize("sweep, message", [
    ("student.lr=0.1,0.2", "cannot be swept in one program"),
    ("student.cncl_weight", "is not FIELD=V1,V2"),
    ("student.cncl_weight=0,x", "must be numbers"),
    ("loss.bn=1;loss.bn=2", "listed twice"),
])
def test_bad_sweeps_are_refused_with_the_fix(teacher_dir, table_path, sweep, message):
  config = tiny_config(teacher_dir, table_path)
  config.sweep = sweep
  with pytest.raises(ValueError, match=message):
    runs.plan_runs(config)


def test_a_bad_swept_value_is_refused_before_any_work(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  config.sweep = "loss.bn=10,-1"
  with pytest.raises(ValueError, match=r"config.loss.bn=-1.0 must be >= 0"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / train.CHECKPOINT_DIR)


# --------------------------------------------------------------------------- #
# Run by run, the same numbers as the lone runs
# --------------------------------------------------------------------------- #


def _setup(config, teacher, table):
  # Plain SGD for the generator: compared paths must agree on equal inputs, and Adam's first,
  # sign-like step would turn float rounding into 2 * lr (see train_test._same_start).
  return dataclasses.replace(train.create_setup(config, teacher, table),
                             generator_tx=optax.sgd(0.05))


def _job(teacher_dir, table_path):
  config = tiny_config(teacher_dir, table_path)
  config.sweep = "student.cncl_weight=0,0.5"   # 2 runs; seeds differ in the end-to-end tests
  return config, bundle_lib.load_bundle(teacher_dir), embeddings.load_table(table_path)


@pytest.fixture(scope="module")
def lone_runs(teacher_dir, table_path):
  """Per run: its lone state after a warm-up round, and what one round and one KD call from there
  compute (per-step calls; train_test checks that the fused scans compute the same)."""
  config, teacher, table = _job(teacher_dir, table_path)
  mesh = make_mesh(jax.devices("cpu")[:1])
  starts, outputs = [], []
  for run in runs.plan_runs(config):
    lone_setup = _setup(runs.run_config(config, run), teacher, table)
    lone_fns = steps.make_step_fns(lone_setup, mesh, fuse=False)
    state = train.create_state(lone_setup, teacher.variables)
    state, _, _ = lone_fns["warmup_round"](state, teacher.variables)
    starts.append(state.replace(hparams=runs.hparams(run)))
    outputs.append(step_outputs(lone_fns, state, teacher.variables))
  return starts, outputs


def _key_data(x):
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_the_stacked_first_state_is_the_lone_first_states(teacher_dir, table_path):
  config, teacher, table = _job(teacher_dir, table_path)
  config.num_runs = 2
  plan = runs.plan_runs(config)
  first = train.create_run_states(_setup(config, teacher, table), teacher.variables, plan)
  for r, run in enumerate(plan):
    lone = train.create_state(_setup(runs.run_config(config, run), teacher, table),
                              teacher.variables)
    assert runs.unstack(first, r).hparams == {"student.cncl_weight": run.values[0][1]}
    for x, y in zip(jax.tree.leaves(runs.unstack(first, r).replace(hparams={})),
                    jax.tree.leaves(lone)):
      np.testing.assert_array_equal(_key_data(x), _key_data(y))
  # Seeds differ: so do the first students.
  s0, s1 = (jax.tree.leaves(runs.unstack(first, r).student["params"]) for r in (0, 1))
  assert not all(np.array_equal(a, b) for a, b in zip(s0, s1))


@pytest.mark.parametrize("vectorize, fuse, devices", [(False, False, 1), (True, True, 8)],
                         ids=["unrolled-per-step (CPU default)",
                              "vmap-fused (accelerator default), batches over 8 devices"])
def test_each_run_computes_what_its_lone_run_computes(teacher_dir, table_path, lone_runs,
                                                      vectorize, fuse, devices):
  config, teacher, table = _job(teacher_dir, table_path)
  plan = runs.plan_runs(config)
  starts, lone_outputs = lone_runs
  mesh = make_mesh(jax.devices("cpu")[:devices])   # conftest simulates 8 CPU devices
  fns = steps.make_step_fns(_setup(config, teacher, table), mesh, fuse=fuse,
                            over_runs=functools.partial(runs.over_runs, num_runs=len(plan),
                                                        vectorize=vectorize),
                            vmapped_runs=vectorize)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  together = step_outputs(fns, jax.device_put(runs.stack(starts), replicated),
                           jax.device_put(teacher.variables, replicated))
  assert together["kd_metrics"]["kd/loss"].shape == (len(plan), config.student.steps_per_call)
  for r, lone in enumerate(lone_outputs):
    assert_same_round_and_kd(runs.unstack(together, r), lone, context=f"run {r}: ")
  # The swept value is used: CNCL off and on give different KD losses from the same state.
  assert not np.allclose(together["kd_metrics"]["kd/loss"][0], lone_outputs[1]["kd_metrics"]["kd/loss"])


# --------------------------------------------------------------------------- #
# A whole job: bundles, metrics, summary, resume
# --------------------------------------------------------------------------- #


def _students(workdir, names):
  return {n: bundle_lib.load_bundle(os.path.join(workdir, train.STUDENT_DIR, n)) for n in names}


@pytest.mark.slow
def test_two_seeds_write_their_runs_and_a_killed_job_resumes(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  config.num_runs = 2
  config.eval_data = _eval_folder(tmp_path / "eval")
  config.accuracy_levels = (0.0001, 1.0)
  config.epochs = 2                               # warm-up (2 rounds), then 1 round, 2 KD calls
  whole = str(tmp_path / "whole")
  result = train.train_and_evaluate(config, whole)

  names = ["run_00", "run_01"]
  students = _students(whole, names)
  for seed, name in enumerate(names):
    extra = students[name].spec.extra
    assert extra["run"]["seed"] == seed and extra["config"]["seed"] == seed
    assert extra["config"]["num_runs"] == 1      # the bundle records its lone run's config
    assert os.listdir(os.path.join(whole, "runs", name, "samples"))
  rows = [runs.read_rows(os.path.join(whole, "runs", n)) for n in names]
  assert [r["epoch"] for r in rows[0]] == [1, 2] and "eval/top1" in rows[0][1]
  assert rows[0][-1]["kd/loss"] != rows[1][-1]["kd/loss"]

  summary = json.load(open(os.path.join(whole, "summary.json")))
  assert summary == json.loads(json.dumps(result["summary"]))
  finals = np.array([r[-1]["eval/top1"] for r in rows])
  stats = summary["points"][0]["final_top1"]
  assert stats["n"] == 2
  np.testing.assert_allclose(stats["mean"], finals.mean())
  np.testing.assert_allclose(stats["std"], finals.std(ddof=1))
  half = 12.706204736174707 * finals.std(ddof=1) / np.sqrt(2)   # t(0.975, 1 dof)
  np.testing.assert_allclose([stats["ci95_low"], stats["ci95_high"]],
                             [finals.mean() - half, finals.mean() + half])
  low, high = summary["points"][0]["time_to_top1"]
  assert low["reached"] == 2 and low["epochs"]["mean"] == 2.0   # the first evaluated epoch
  assert high["top1"] == summary["accuracy_levels"]["top1"][1]

  # Stopped after 3 units (mid-epoch 2), then run again: the same students, bit for bit.
  config.max_units = 3
  config.checkpoint_every_minutes = 0.0
  cut = str(tmp_path / "cut")
  assert train.train_and_evaluate(config, cut)["stopped_early"]
  config.max_units = 0
  train.train_and_evaluate(config, cut)
  resumed = _students(cut, names)
  for name in names:
    for x, y in zip(jax.tree.leaves(students[name].variables), jax.tree.leaves(resumed[name].variables)):
      np.testing.assert_array_equal(x, y)
  assert [runs.read_rows(os.path.join(cut, "runs", n)) for n in names][1][-1]["kd/loss"] == rows[1][-1]["kd/loss"]


def _cmi_job(teacher_dir, table_path):
  """Two seeds of a tiny CMI: its own method state (head, its Adam, a feature memory) gets the
  run axis beside the student; 8 images a round."""
  config = tiny_config(teacher_dir, table_path, "cmi")
  config.num_runs = 2
  config.student.sampler = "uniform"
  config.cmi.update({"nz": 8, "synthesis_batch": 8, "memory_size": 16, "negatives": 8,
                     "head_dim": 8})
  return config


def _first_unit(fns, state, teacher_vars) -> dict:
  """Host copies of what a warm-up round (the first unit) computes from `state` (copied: donated)."""
  after, metrics, outputs = fns["warmup_round"](jax.tree.map(jnp.copy, state), teacher_vars)
  return jax.device_get({"gen_metrics": metrics, "images": outputs["images"],
                         "low_conf": outputs["low_conf"], "method": after.method,
                         "unit": after.unit})


def test_each_cmi_run_s_first_unit_is_its_lone_run_s(teacher_dir, table_path):
  """A method other than CAE-DFKD: run r of a two-seed CMI job computes, in its first unit, what
  the lone run of seed r computes (per-step calls, runs traced one after another: the CPU way)."""
  config = _cmi_job(teacher_dir, table_path)
  teacher, table = bundle_lib.load_bundle(teacher_dir), embeddings.load_table(table_path)
  plan = runs.plan_runs(config)
  assert [run.seed for run in plan] == [0, 1]
  mesh = make_mesh(jax.devices("cpu")[:1])
  setup = _setup(config, teacher, table)
  fns = steps.make_step_fns(setup, mesh, fuse=False,
                            over_runs=functools.partial(runs.over_runs, num_runs=len(plan),
                                                        vectorize=False))
  together = _first_unit(fns, train.create_run_states(setup, teacher.variables, plan),
                         teacher.variables)
  assert together["gen_metrics"]["gen/cr"].shape == (len(plan), config.generator.steps)
  lone = []
  for run in plan:
    lone_setup = _setup(runs.run_config(config, run), teacher, table)
    lone.append(_first_unit(steps.make_step_fns(lone_setup, mesh, fuse=False),
                            train.create_state(lone_setup, teacher.variables), teacher.variables))
  for r, alone in enumerate(lone):
    ours = runs.unstack(together, r)
    assert int(ours["unit"]) == int(alone["unit"]) == 1
    for name in alone["gen_metrics"]:
      np.testing.assert_allclose(ours["gen_metrics"][name], alone["gen_metrics"][name], rtol=1e-4,
                                 atol=1e-5, err_msg=f"run {r}: {name}")
    np.testing.assert_allclose(ours["low_conf"], alone["low_conf"], atol=1e-6)
    np.testing.assert_allclose(ours["images"], alone["images"], atol=1e-4, err_msg=f"run {r}")
    method, lone_method = ours["method"], alone["method"]
    np.testing.assert_allclose(method.bank.images.astype(int), lone_method.bank.images.astype(int),
                               atol=1)
    np.testing.assert_array_equal(method.bank.labels, lone_method.bank.labels)
    assert int(method.memory.size) == int(lone_method.memory.size) == config.cmi.synthesis_batch
    for part in ("head_params", "head_opt_state", "memory"):
      for x, y in zip(jax.tree.leaves(getattr(method, part)), jax.tree.leaves(getattr(lone_method, part))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=f"run {r}: {part}")
  # The seeds differ, and so do the runs: the comparison above is per run, not of one run twice.
  assert np.abs(lone[0]["images"] - lone[1]["images"]).max() > 1e-2


@pytest.mark.slow
def test_a_two_seed_cmi_job_writes_each_run_and_the_summary(teacher_dir, table_path, tmp_path):
  config = _cmi_job(teacher_dir, table_path)
  config.eval_data = _eval_folder(tmp_path / "eval")
  config.epochs = 2                               # warm-up (2 rounds), then 1 round, 2 KD calls
  config.num_devices = 1                          # the run axis is the point, not the mesh
  workdir = str(tmp_path / "job")
  result = train.train_and_evaluate(config, workdir)

  names = ["run_00", "run_01"]
  students = _students(workdir, names)
  for seed, name in enumerate(names):
    extra = students[name].spec.extra
    assert extra["method"] == "cmi" and extra["run"]["seed"] == seed
    assert extra["config"]["seed"] == seed and extra["config"]["num_runs"] == 1
    assert os.listdir(os.path.join(workdir, "runs", name, "samples"))
  rows = [runs.read_rows(os.path.join(workdir, "runs", n)) for n in names]
  for run_rows in rows:
    assert [r["epoch"] for r in run_rows] == [1, 2]
    assert "gen/cr" in run_rows[0] and "kd/kl" not in run_rows[0] and "kd/kl" in run_rows[1]
    assert run_rows[-1]["memory/size"] == 16 and "eval/top1" in run_rows[-1]
  assert rows[0][-1]["kd/loss"] != rows[1][-1]["kd/loss"]
  a, b = (jax.tree.leaves(students[n].variables["params"]) for n in names)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary == json.loads(json.dumps(result["summary"]))
  assert summary["runs"] == 2 and summary["num_runs"] == 2
  stats = summary["points"][0]["final_top1"]
  finals = np.array([r[-1]["eval/top1"] for r in rows])
  assert stats["n"] == 2
  np.testing.assert_allclose([stats["mean"], stats["std"]], [finals.mean(), finals.std(ddof=1)])


def test_interval_and_time_to_level_against_numpy():
  x = [71.2, 69.8, 73.1, 70.4]
  s = runs.interval95(x + [None])
  half = 3.182446305284263 * np.std(x, ddof=1) / 2    # t(0.975, 3 dof)
  assert s["n"] == 4
  np.testing.assert_allclose([s["mean"], s["std"], s["ci95_low"], s["ci95_high"]],
                             [np.mean(x), np.std(x, ddof=1), np.mean(x) - half, np.mean(x) + half])
  assert runs.interval95([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci95_low": None,
                                    "ci95_high": None}
  rows = [{"epoch": 1, "time/minutes": 0.5}, {"epoch": 2, "time/minutes": 1.0, "eval/top1": 40.0},
          {"epoch": 3, "time/minutes": 1.5, "eval/top1": 60.0}]
  assert runs.first_reaching(rows, 50.0) == {"epoch": 3, "minutes": 1.5}
  assert runs.first_reaching(rows, 61.0) is None
  plan = [runs.Run(0, 0, 0, ()), runs.Run(1, 1, 0, ())]
  points = runs.summarize(plan, [rows, rows[:2]], [50.0])
  assert points[0]["final_top1"]["mean"] == 50.0
  assert points[0]["time_to_top1"][0]["reached"] == 1
  assert "| (no sweep) | 2 | 50.00 ± 14.14" in runs.format_summary(points)


def test_a_diverging_run_is_named():
  plan = [runs.Run(0, 0, 0, (("loss.bn", 10.0),)), runs.Run(1, 0, 1, (("loss.bn", 1e38),))]
  losses = {"gen/loss": np.array([[1.0, 2.0], [3.0, np.inf]])}     # runs x steps
  with pytest.raises(train.NonFiniteLossError,
                     match=r"gen/loss became inf in run_01 \(seed 0; loss.bn=1e\+38\) at epoch 4, "
                           r"generator round 0 \(unit 0\), step 1"):
    train._check_finite(losses, 4, 0, "generator round 0", plan)
  parts = {"generator params": np.array([True, True]), "student params": np.array([True, False])}
  with pytest.raises(train.NonFiniteLossError, match=r"The student params became non-finite in run_01"):
    train._check_finite_parts(parts, 4, 3, "KD call 1", plan)
  train._check_finite_parts({"student params": np.bool_(True)}, 4, 3, "KD call 1")  # one run: fine
