"""`caedfkd train` (engine/train_supervised.py, cli/train.py): the recipe's pieces against
PyTorch and float64, and tiny runs on data made here: they learn, the bundle is a teacher,
a resume is bit-for-bit, the budget adds up, changed configs and data are refused."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from caedfkd_jax import models
from caedfkd_jax.cli import distill, main, train as train_cli
from caedfkd_jax.config import train_defaults
from caedfkd_jax.engine import train_supervised as ts
from caedfkd_jax.eval import evaluate, supervised
from caedfkd_jax.io import bundle as bundle_lib, data as data_lib

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _colour_images(rng, n, colour, size=8):
  noise = rng.normal(0, 60, (n, size, size, 3))
  return np.clip(np.asarray(colour)[None, None, None] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
  """Three noisy colour classes of 8x8 PNGs: ROOT/{train,test}/<colour>/."""
  root = tmp_path_factory.mktemp("colours")
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("test", 12)):
    for name, colour in COLORS.items():
      os.makedirs(root / split / name)
      for i, image in enumerate(_colour_images(rng, n, colour)):
        Image.fromarray(image).save(root / split / name / f"{i}.png")
  return str(root)


def tiny_config(data, **changes):
  config = train_defaults.get_config()
  config.arch = "resnet_tiny_a"
  config.data = data
  config.epochs = 3
  config.batch_size = 16
  config.steps_per_call = 2          # 6 steps an epoch: 3 units.
  config.compilation_cache_dir = ""
  for k, v in changes.items():
    config[k] = v
  return config


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(colour_folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, ts.train(tiny_config(colour_folder), workdir, log=lambda s: None)


# --------------------------------------------------------------------------- #
# The recipe's pieces
# --------------------------------------------------------------------------- #


def test_holdout_is_stratified_disjoint_and_fixed_by_the_seed():
  labels = np.repeat(np.arange(4), [50, 20, 10, 3])
  held = ts.holdout_indices(labels, 4, 0.1, seed=0)
  assert [int(np.sum(labels[held] == k)) for k in range(4)] == [5, 2, 1, 1]
  assert np.array_equal(held, ts.holdout_indices(labels, 4, 0.1, seed=0))
  assert not np.array_equal(held, ts.holdout_indices(labels, 4, 0.1, seed=1))
  assert len(np.unique(held)) == len(held) and ts.holdout_indices(labels, 4, 0.0, 0).size == 0
  # A class of one image keeps it for training.
  assert ts.holdout_indices(np.array([0, 1, 1]), 2, 0.5, 0).tolist() in ([1], [2])


def test_channel_stats_are_the_float64_mean_and_std():
  images = np.random.default_rng(0).integers(0, 256, (9000, 4, 4, 3), dtype=np.uint8)
  mean, std = ts.channel_stats(images, chunk=1000)
  x = images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, x.mean(0), atol=1e-6)
  np.testing.assert_allclose(std, x.std(0), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("schedule", ["cosine", "steps"])
def test_learning_rate_matches_pytorch_schedulers(schedule):
  """steps: MultiStepLR stepped once an epoch; cosine: CosineAnnealingLR stepped every step."""
  torch = pytest.importorskip("torch")
  config = train_defaults.get_config()
  config.epochs, config.schedule, config.milestones, config.gamma = 6, schedule, (2, 4), 0.2
  steps_per_epoch = 5
  fn = ts.learning_rate_schedule(config, steps_per_epoch)
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
  if schedule == "steps":
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.gamma)
    want = []
    for _ in range(config.epochs):
      want += [opt.param_groups[0]["lr"]] * steps_per_epoch
      sched.step()
  else:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    want = []
    for _ in range(config.epochs * steps_per_epoch):
      want.append(opt.param_groups[0]["lr"])
      sched.step()
  got = [float(fn(s)) for s in range(config.epochs * steps_per_epoch)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_warm_up_rises_linearly_then_follows_the_schedule():
  config = train_defaults.get_config()
  config.epochs, config.warmup_epochs, config.schedule = 4, 1, "constant"
  fn = ts.learning_rate_schedule(config, 10)
  np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 10, 39)], [0.0, 0.05, 0.1, 0.1],
                             rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_is_torch_sgd_with_momentum_and_weight_decay(nesterov):
  torch = pytest.importorskip("torch")
  config = train_defaults.get_config()
  config.schedule, config.nesterov, config.weight_decay = "constant", nesterov, 0.01
  tx, _ = ts.make_optimizer(config, steps_per_epoch=1)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=5)
  grads = [rng.normal(size=5) for _ in range(4)]
  params = {"w": jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.SGD([w], lr=config.learning_rate, momentum=config.momentum,
                        weight_decay=config.weight_decay, nesterov=nesterov)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    w.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_zoo_network_has_a_train_step(arch):
  """The step traces for every architecture (shapes only: compiling all of them is for CI's
  budget too slow), its loss a float32 scalar and its variables unchanged in structure."""
  model = models.create_model(arch, 3)
  variables = jax.eval_shape(lambda: bundle_lib.init_variables(
      bundle_lib.ModelSpec(arch, 3, 16), 0))
  tx = optax.sgd(0.1, momentum=0.9)
  out = jax.eval_shape(
      lambda v, x, y: supervised.train_step(model, tx, v, tx.init(v["params"]), x, y,
                                            jax.random.key(0), jnp.zeros(3), jnp.ones(3), 2),
      variables, jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.uint8), jax.ShapeDtypeStruct((4,), jnp.int32))
  new_variables, _, loss = out
  assert loss.shape == () and loss.dtype == jnp.float32
  assert jax.tree.structure(new_variables) == jax.tree.structure(variables)


def test_augment_kinds_keep_the_shape_and_none_keeps_the_images():
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  for kind in supervised.AUGMENTS:
    assert supervised.augment_images(jax.random.key(1), images, kind).shape == images.shape
  assert supervised.augment_images(None, images, "none") is images
  flipped = supervised.augment_images(jax.random.key(1), images, "flip")
  assert all(np.array_equal(f, im) or np.array_equal(f, im[:, ::-1]) for f, im in
             zip(np.asarray(flipped), np.asarray(images)))


@pytest.mark.parametrize("field, value, says", [
    ("arch", "resnet999", "not a zoo network"),
    ("data", "", "config.data is empty"),
    ("epochs", 0, "give 1 or more"),
    ("batch_size", 12, "multiple of 8"),
    ("learning_rate", 0.0, "positive rate"),
    ("momentum", 1.0, "[0, 1)"),
    ("schedule", "linear", "cosine, steps, constant"),
    ("milestones", (150, 100), "increasing epochs"),
    ("augment", "mixup", "crop_flip"),
    ("holdout_fraction", 0.9, "[0, 0.5]"),
    ("mean", (0.5, 0.5, 0.5), "give both"),
    ("compute_dtype", "int8", "auto, float32"),
    ("warmup_epochs", 300, "fewer than epochs"),
])
def test_bad_values_are_refused_naming_the_field(field, value, says):
  config = train_defaults.get_config()
  config.data = "somewhere"
  config.schedule = "steps" if field == "milestones" else config.schedule
  config[field] = value
  with pytest.raises(ValueError, match="config" if field == "data" else f"config.{field}") as e:
    ts.check_config(config, num_devices=8)
  assert says in str(e.value)


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #


def test_a_run_learns_and_its_bundle_is_a_teacher(full_run, colour_folder):
  workdir, result = full_run
  assert result["epochs_done"] == 3 and not result["stopped_early"]
  assert result["stop_reason"] == "completed"
  assert result["test_top1"] > 80          # Three colours: chance is 33%.
  teacher = bundle_lib.load_bundle(result["model"])
  spec = teacher.spec
  assert spec.class_names == ["blue", "green", "red"] and spec.image_size == 8
  assert spec.extra["trained_by"] == "caedfkd train" and spec.extra["epochs_done"] == 3
  assert spec.extra["selected"]["by"] == "held-out top-1"
  assert spec.extra["holdout_images"] == 3 * 4 and spec.extra["train_images"] == 3 * 36
  # The recorded normalisation is the train images' (not the held-out ones').
  train = data_lib.load_dataset(colour_folder, "train")
  kept = np.setdiff1d(np.arange(len(train)), ts.holdout_indices(train.labels, 3, 0.1, 0))
  np.testing.assert_allclose(spec.mean, ts.channel_stats(train.images[kept])[0], atol=1e-6)
  # `evaluate` scores the bundle as the run did.
  scored = evaluate.evaluate_bundle(teacher, data_lib.load_dataset(colour_folder, "test"),
                                    progress=False)
  assert scored["top1"] == pytest.approx(result["test_top1"])
  assert set(result["per_class"]["top1"]) == set(COLORS)
  rows = _rows(workdir)
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  assert {"train/loss", "train/lr", "holdout/top1", "test/top1", "time/epoch_seconds"} <= set(rows[0])
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert os.path.isdir(os.path.join(workdir, "tensorboard"))
  # The kept epoch is the best held-out one (the first of equals).
  best = max(r["holdout/top1"] for r in rows)
  assert spec.extra["selected"]["epoch"] == next(r["epoch"] for r in rows
                                                 if r["holdout/top1"] == best)


def test_the_bundle_is_a_teacher_for_distill(full_run):
  """`distill` takes the bundle as it is: its config checks and its setup (classes, input size,
  normalisation) read it."""
  from tiny_run import tiny_config as distill_config
  from caedfkd_jax.config import checks
  from caedfkd_jax.engine import train as distill_engine
  _, result = full_run
  teacher = bundle_lib.load_bundle(result["model"])
  config = distill_config(result["model"], None, method="cmi")
  config.student.sampler = "uniform"       # CMI's pool sampling: no CNCL groups
  checks.validate_config(config, 1, teacher.spec.num_classes)
  setup = distill_engine.create_setup(config, teacher)
  assert setup.class_names == ("blue", "green", "red") and setup.image_size == 8
  assert setup.mean == tuple(teacher.spec.mean) and setup.teacher_arch == "resnet_tiny_a"


def test_one_step_is_the_same_on_one_device_and_on_eight():
  """Data-parallel: the batch split over 8 devices gives the one-device step (BatchNorm over the
  global batch), to float rounding."""
  from caedfkd_jax.runtime import mesh as mesh_lib
  config = tiny_config("unused")
  spec = bundle_lib.ModelSpec(config.arch, 3, 8)
  model = models.create_model(config.arch, 3)
  tx, _ = ts.make_optimizer(config, steps_per_epoch=4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (64,)).astype(np.int32)
  idx = rng.permutation(64)[:2 * 16].reshape(2, 16)
  outs = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = mesh_lib.make_mesh(devices)
    unit, _ = ts.make_step_fns(model, tx, config, (0.5,) * 3, (0.25,) * 3, mesh)
    variables = jax.tree.map(jnp.array, bundle_lib.init_variables(spec, 0))
    out = unit(variables, tx.init(variables["params"]), jnp.asarray(images), jnp.asarray(labels),
               jnp.asarray(idx), jnp.int32(0), jnp.int32(0))
    outs.append(jax.device_get(out))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_stopped_run_resumes_bit_for_bit(full_run, colour_folder, tmp_path):
  workdir = str(tmp_path / "resumed")
  first = ts.train(tiny_config(colour_folder, max_units=4), workdir, log=lambda s: None)
  assert first["stopped_early"] and first["stop_reason"] == "max_units"
  assert first["epochs_done"] == 1
  second = ts.train(tiny_config(colour_folder), workdir, log=lambda s: None)
  assert second["epochs_done"] == 3 and not second["stopped_early"]
  full_dir, full = full_run
  assert _leaves_equal(bundle_lib.load_bundle(second["model"]).variables,
                       bundle_lib.load_bundle(full["model"]).variables)
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time", "train/images"))}
                        for r in rows]
  assert strip(_rows(workdir)) == strip(_rows(full_dir))


def test_changed_settings_and_other_data_are_refused(full_run, colour_folder, tmp_path):
  workdir, _ = full_run
  with pytest.raises(ValueError, match=r"another config \(learning_rate: 0.1 -> 0.05\)"):
    ts.prepare(tiny_config(colour_folder, learning_rate=0.05), workdir, log=lambda s: None)
  other = tmp_path / "other"
  os.makedirs(other / "train")
  for name, colour in COLORS.items():
    os.makedirs(other / "train" / name)
    for i, image in enumerate(_colour_images(np.random.default_rng(5), 40, colour)):
      Image.fromarray(image).save(other / "train" / name / f"{i}.png")
  with pytest.raises(ValueError, match="trained on other images"):
    ts.prepare(tiny_config(str(other), test_split=""), workdir, log=lambda s: None)
  with pytest.raises(ValueError, match="holds a `caedfkd distill` run"):
    ts._check_resume("w", {"method": "nayer", "student_arch": "resnet8"}, {},
                     tiny_config(colour_folder), {"data_sha256": "x", "state_shapes": "y"})


def test_the_time_budget_adds_up_and_no_bundle_holds_an_unfinished_first_epoch(
    colour_folder, tmp_path):
  workdir = str(tmp_path / "budget")
  config = tiny_config(colour_folder, time_budget_minutes=1e-4)  # Spent after the first unit.
  first = ts.train(config, workdir, log=lambda s: None)
  assert first["stop_reason"] == "the time budget" and first["epochs_done"] == 0
  assert "model" not in first and not os.path.exists(os.path.join(workdir, ts.MODEL_DIR))
  again = ts.train(config, workdir, log=lambda s: None)   # Nothing left: no step is taken.
  # The second invocation starts from the first one's time, already past the budget.
  assert again["stop_reason"] == "the time budget" and again["minutes"] >= 1e-4
  summary = train_cli.summary(again, config)
  assert "No epoch finished" in summary and "larger --config.time_budget_minutes" in summary


def test_a_non_finite_loss_stops_the_run(colour_folder, tmp_path):
  with pytest.raises(ts.NonFiniteLossError, match="Lower --config.learning_rate"):
    ts.train(tiny_config(colour_folder, learning_rate=1e30, epochs=1, test_split=""),
             str(tmp_path / "nan"), log=lambda s: None)


def test_cifar_python_batches_train_and_a_split_folder_has_no_test(tmp_path):
  """The official CIFAR-10 batch layout as data; and a split folder given alone is told."""
  root = tmp_path / "cifar-10-batches-py"
  os.makedirs(root)
  rng = np.random.default_rng(1)
  names = ["red", "green", "blue"]
  def batch(n):
    labels = np.repeat(np.arange(3), n)
    images = np.concatenate([_colour_images(rng, n, COLORS[c], 32) for c in names])
    return {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": list(labels)}
  for f, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
    with open(root / f, "wb") as fh:
      pickle.dump(batch(n), fh, protocol=2)
  with open(root / "batches.meta", "wb") as fh:
    pickle.dump({b"label_names": names}, fh, protocol=2)
  result = ts.train(tiny_config(str(root), epochs=1), str(tmp_path / "w"), log=lambda s: None)
  spec = bundle_lib.load_bundle(result["model"]).spec
  assert spec.class_names == names and spec.image_size == 32 and result["test_top1"] is not None
  said = []
  folder = tmp_path / "only_train"
  for c in names:
    os.makedirs(folder / c)
    for i, image in enumerate(_colour_images(rng, 12, COLORS[c])):
      Image.fromarray(image).save(folder / c / f"{i}.png")
  splits = ts.load_splits(tiny_config(str(folder)), progress=False, log=said.append)
  assert splits.test is None and "one split folder" in said[0]


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def test_help_lists_fields_and_recipes(capsys):
  assert main.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert "holdout_fraction = 0.1" in out and "never the test split" in out
  assert "train_cifar" in out and "nayer_steps" in out
  assert main.main(["train", "--config", "train_cifar:resnet34,cmi_steps", "--help"]) == 0
  out = capsys.readouterr().out
  assert "batch_size = 256  (default: 128)" in out and "arch = 'resnet34'" in out


@pytest.mark.parametrize("argv, says", [
    (["--workdir", "w", "--config.data=x"], "--config is missing"),
    (["--config", "train_cifar"], "--workdir is required"),
    (["--config", "cifar10_resnet56_resnet20", "--workdir", "w"], "is a config of `caedfkd distill`"),
    (["--config", "train_cifar:resnet20,fast", "--workdir", "w"], "not one of cosine"),
    (["--config", "train_cifar", "--workdir", "w", "--config.lr=1"], "no field 'lr'"),
])
def test_command_line_mistakes_get_one_line(argv, says, capsys):
  assert main.main(["train", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and says in err[0], err


def test_distill_does_not_list_or_take_train_configs(capsys):
  assert "train_cifar" not in distill.installed_configs()
  assert set(distill.installed_configs("train")) == {"train_cifar", "train_imagenet_resnet50"}
  assert main.main(["distill", "--config", "train_cifar", "--workdir", "w"]) == 2
  assert "is a config of `caedfkd train`" in capsys.readouterr().err
