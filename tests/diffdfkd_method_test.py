"""DiffDFKD: converted Stable Diffusion weights, the guided denoising step, latent mixing, and a
tiny run through the launcher that resumes. Offline: the Stable Diffusion folder is a tiny random
one saved by PyTorch diffusers (tiny_diffusion.py)."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from caedfkd_jax.cli.main import main
from caedfkd_jax.config import checks
from caedfkd_jax.diffusion import latent_mix, scheduler, weights
from caedfkd_jax.models import clip_text
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.methods import bank_kd, diffdfkd
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import tiny_config

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import tiny_diffusion  # noqa: E402  (needs diffusers)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """(diffusers folder, converted bundle, the torch modules), converted by the command."""
  root = tmp_path_factory.mktemp("sd")
  modules = tiny_diffusion.write_sd_folder(root / "sd")
  assert main(["convert-diffusion", str(root / "sd"), "--out", str(root / "bundle")]) == 0
  return root / "sd", str(root / "bundle"), modules


def diffdfkd_config(teacher_dir, table_path, bundle_dir):
  """The tiny run as DiffDFKD: 2 denoising steps on 4 latents of 8x8 a round, data-parallel on 2
  devices; one warm-up round, then a round and 2 KD calls an epoch. Shared by every test."""
  config = tiny_config(teacher_dir, table_path, "diffdfkd")
  config.num_devices = 2
  config.student.sampler = "uniform"
  config.warmup_g_loops = 1
  config.epochs = 2
  config.diffdfkd.update({"weights": bundle_dir, "steps": 2, "batch": 4, "kd_batch": 8,
                          "latent_size": 8, "mix_every": 1})
  return config


def test_the_command_converts_and_refuses_what_it_cannot_read(sd, tmp_path, capsys):
  src, bundle_dir, _ = sd
  manifest = json.loads(open(os.path.join(bundle_dir, "diffusion.json")).read())
  assert manifest["unet"]["config"]["block_out_channels"] == [16, 32]
  assert len(manifest["vae"]["sha256"]) == 64 and manifest["scheduler"]["beta_schedule"] == "scaled_linear"
  assert sorted(os.listdir(os.path.join(bundle_dir, "tokenizer"))) == [
      "merges.txt", "tokenizer_config.json", "vocab.json"]
  assert main(["convert-diffusion", str(src), "--out", bundle_dir]) == 2
  assert "exists" in capsys.readouterr().err
  pickled = tmp_path / "pickled"
  shutil.copytree(src, pickled)
  os.remove(pickled / "unet" / "diffusion_pytorch_model.safetensors")
  (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  assert main(["convert-diffusion", str(pickled), "--out", str(tmp_path / "b")]) == 2
  err = capsys.readouterr().err
  assert "diffusion_pytorch_model.bin" in err and "never loads" in err
  assert not (tmp_path / "b").exists() and not any(p.name.startswith(".b") for p in tmp_path.iterdir())
  with pytest.raises(FileNotFoundError, match="convert-diffusion"):
    weights.load_bundle(str(tmp_path))


@pytest.fixture(scope="module")
def start(sd, teacher_dir, table_path):
  """(setup, frozen variables, first state) of the tiny DiffDFKD config."""
  teacher = bundle_lib.load_bundle(teacher_dir)
  setup = train.create_setup(diffdfkd_config(teacher_dir, table_path, sd[1]), teacher,
                             embeddings.load_table(table_path))
  teacher_vars = {k: teacher.variables[k] for k in ("params", "batch_stats")}
  frozen = diffdfkd.frozen_vars(setup, teacher_vars)
  return setup, frozen, jax.device_get(train.create_state(setup, teacher_vars))


def test_prompts_guidance_and_decoding_match_pytorch(sd, start):
  """Through the bundle: the prompts' text embeddings, the guided eps and the VAE's image are
  the PyTorch modules' (< 1e-4)."""
  src, _, modules = sd
  setup, frozen, _ = start
  assert setup.generator.prompts[1] == "a realistic photo of c1"
  ids = clip_text.tokenize(str(src / "tokenizer"), ("",) + setup.generator.prompts)
  with torch.no_grad():
    hidden = modules["text_encoder"](torch.from_numpy(ids).long())[0].numpy()
  np.testing.assert_allclose(frozen["uncond"], hidden[0], atol=1e-4)
  np.testing.assert_allclose(frozen["text"], hidden[1:], atol=1e-4)

  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  text = frozen["text"][np.array([1, 3])]
  eps = jax.jit(lambda unet, z, text, uncond: diffdfkd.guided_noise(
      setup.generator, unet, z, jnp.int32(501), text, uncond, 3.0))(
          frozen["unet"], latents, text, frozen["uncond"])
  with torch.no_grad():
    unet = lambda cond: modules["unet"](torch.from_numpy(latents).permute(0, 3, 1, 2), 501,
                                        torch.from_numpy(cond)).sample.permute(0, 2, 3, 1).numpy()
    expected = unet(np.broadcast_to(frozen["uncond"], text.shape).copy())
    expected = expected + 3.0 * (unet(text) - expected)
  np.testing.assert_allclose(eps, expected, atol=1e-4)

  scale = setup.generator.scaling_factor
  ours = jax.jit(setup.generator.vae.apply)({"params": frozen["vae"]}, latents / scale)
  with torch.no_grad():
    theirs = modules["vae"].decode(torch.from_numpy(latents / scale).permute(0, 3, 1, 2)).sample
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  images = jax.jit(lambda vae, z: diffdfkd.decode_for_teacher(setup.generator, vae, z, 32))(
      frozen["vae"], latents)
  assert images.shape == (2, 32, 32, 3) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_the_latent_gradient_is_finite_and_the_unet_cut_is_the_chain_rule(start):
  """dL/dz through the UNet is finite and non-zero; with the cut (eps held fixed) it is exactly
  dL/dx0 / sqrt(alpha_bar), and the two differ."""
  setup, frozen, state = start
  step = jnp.int32(0)
  labels = jnp.array([0, 1, 2, 3], jnp.int32)
  latents = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
  text = frozen["text"][labels]
  cut = setup.config.copy_and_resolve_references()
  cut.diffdfkd.grad_through_unet = False
  cut_setup = train.create_setup(cut, bundle_lib.load_bundle(setup.config.teacher),
                                 embeddings.load_table(setup.config.embeddings))
  _, alpha_bar, _, _ = setup.generator.schedule.at(step)

  @jax.jit
  def gradients(latents, frozen, student):
    args = (frozen, student, step, text, labels, jnp.float32(1.0), {})
    grad = lambda s: jax.grad(diffdfkd.teacher_guidance_loss, has_aux=True)(latents, s, *args)[0]
    eps = diffdfkd.guided_noise(setup.generator, frozen["unet"], latents,
                                setup.generator.schedule.timesteps[0], text, frozen["uncond"],
                                setup.config.diffdfkd.guidance_scale)
    x0 = scheduler.predict_x0(latents, eps, alpha_bar)
    g_x0, _ = jax.grad(diffdfkd.x0_loss, has_aux=True)(x0, setup, frozen, student, labels,
                                                        jnp.float32(1.0), {})
    return grad(setup), grad(cut_setup), g_x0

  g_full, g_cut, g_x0 = gradients(latents, frozen, state.student)
  assert np.all(np.isfinite(g_full)) and float(jnp.abs(g_full).max()) > 0
  np.testing.assert_allclose(g_cut, g_x0 / np.sqrt(alpha_bar), rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_full - g_cut).max()) > 1e-3 * float(jnp.abs(g_cut).max())


def test_detach_teacher_in_adv_holds_the_teachers_logits_in_l_adv_only(start):
  """`diffdfkd.detach_teacher_in_adv` (the code's `output.detach()` in L_adv): with L_adv on,
  the latent gradient dL/dx0 (dL/dz is it / sqrt(alpha_bar) or through the UNet, as tested
  above) differs from the paper's reading (the default) and is the gradient of a hand-built
  L_inv whose teacher logits in L_adv are constants (CE and BN as they were); at adv weight
  0 (swept, so both weights share one program) the two settings give identical gradients."""
  import dataclasses
  from caedfkd_jax.io.bundle import normalize
  from caedfkd_jax.synthesis import losses
  setup, frozen, state = start
  assert not setup.config.diffdfkd.detach_teacher_in_adv
  detached = setup.config.copy_and_resolve_references()
  detached.diffdfkd.detach_teacher_in_adv = True
  detached_setup = dataclasses.replace(setup, config=detached)
  weight = setup.config.loss
  labels = jnp.array([0, 1, 2, 3], jnp.int32)
  x0 = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))

  def teacher_and_student(x0, frozen, student):
    images01 = diffdfkd.decode_for_teacher(setup.generator, frozen["vae"], x0, 32)
    x = normalize(images01, setup.mean, setup.std)
    (t_logits, _), t_state = setup.teacher.apply(frozen["teacher"], x, train=False,
                                                 mutable=["bn_stats"])
    return t_logits, t_state["bn_stats"], setup.student.apply(student, x, train=False)[0]

  def hand_built(x0, frozen, student, t_constant, adv):
    t_logits, bn_stats, s_logits = teacher_and_student(x0, frozen, student)
    l_bn = losses.bn_statistics_loss(bn_stats, frozen["teacher"]["batch_stats"], weight.bn_reduce)
    return (weight.ce * losses.cross_entropy(t_logits, labels) + weight.bn * l_bn
            + adv * losses.adversarial_loss(t_constant, s_logits))

  @jax.jit
  def gradients(x0, frozen, student, adv):
    args = (frozen, student, labels, jnp.float32(1.0), {"loss.adv": adv})
    grad = lambda s: jax.grad(diffdfkd.x0_loss, has_aux=True)(x0, s, *args)
    g_paper, metrics = grad(setup)
    t_constant = teacher_and_student(x0, frozen, student)[0]
    g_hand = jax.grad(hand_built)(x0, frozen, student, t_constant, adv)
    return g_paper, grad(detached_setup)[0], g_hand, metrics["gen/adv"]

  # L_adv weighted 100: its share of the gradient is then well above float32 noise.
  g_paper, g_detached, g_hand, l_adv = gradients(x0, frozen, state.student, 100.0)
  assert float(l_adv) != 0   # Some rows agree, so L_adv has a gradient to cut.
  scale = float(jnp.abs(g_detached).max())
  np.testing.assert_allclose(g_detached, g_hand, rtol=1e-5, atol=1e-6 * scale)
  assert float(jnp.abs(g_paper - g_detached).max()) > 1e-2 * scale
  g_paper, g_detached, _, _ = gradients(x0, frozen, state.student, 0.0)
  np.testing.assert_array_equal(g_paper, g_detached)


def test_cutmix_box_permutation_and_schedule():
  # lam = 0.75: sides 8 * 0.5 = 4 around the centre (4, 4): rows and columns 2..5.
  assert [float(v) for v in latent_mix.cutmix_box(jnp.float32(0.75), 4.0, 4.0, 8, 8)] == [2, 6, 2, 6]
  # Clipped at the edge, rounded half to even as np.round: centre (0.5, 7.0) -> x 0..2, y 5..8.
  assert [float(v) for v in latent_mix.cutmix_box(jnp.float32(0.75), 0.5, 7.0, 8, 8)] == [5, 8, 0, 2]
  z = jax.random.normal(jax.random.key(0), (6, 8, 8, 4))
  key = jax.random.key(3)
  mixed = np.asarray(latent_mix.cutmix(key, z))
  np.testing.assert_array_equal(mixed, latent_mix.cutmix(key, z))      # Fixed seed, same mix.
  rng_lam, rng_x, rng_y, rng_perm = jax.random.split(key, 4)
  y0, y1, x0, x1 = (int(v) for v in latent_mix.cutmix_box(
      latent_mix.mixing_ratio(rng_lam), jax.random.uniform(rng_x, (), maxval=8.0),
      jax.random.uniform(rng_y, (), maxval=8.0), 8, 8))
  perm = np.asarray(jax.random.permutation(rng_perm, 6))
  expected = np.array(z)
  expected[:, y0:y1, x0:x1] = np.asarray(z)[perm][:, y0:y1, x0:x1]
  np.testing.assert_array_equal(mixed, expected)
  mixup = latent_mix.mixup(key, z)
  lam = latent_mix.mixing_ratio(jax.random.split(key)[0])
  perm = jax.random.permutation(jax.random.split(key)[1], 6)
  np.testing.assert_allclose(mixup, lam * z + (1 - lam) * z[perm], atol=1e-6)
  config = diffdfkd_config("t", "e", "w")
  config.diffdfkd.update({"steps": 10, "mix_every": 0})
  assert [i for i in range(10) if diffdfkd.mixes_after(config, i)] == [1, 3, 5, 7]


def test_round_labels_one_class_per_round_or_every_class_in_turn(start):
  """`diffdfkd.one_class_per_round`: True (the code's) labels a whole round with class
  rounds % K; False gives row i of round r the class (r * B + i) % K. A batch of 6 for the 4
  classes, so that False's rounds start at different classes and differ from True's."""
  import dataclasses
  setup, _, _ = start
  assert setup.config.diffdfkd.one_class_per_round and setup.num_classes == 4
  labels = {}
  for one_class in (True, False):
    config = setup.config.copy_and_resolve_references()
    config.diffdfkd.one_class_per_round = one_class
    flagged = dataclasses.replace(setup, config=config, synthesis_batch=6)
    labels[one_class] = [np.asarray(diffdfkd.round_labels(flagged, jnp.int32(r)))
                         for r in range(6)]
  for r in range(6):
    np.testing.assert_array_equal(labels[True][r], [r % 4] * 6)
  np.testing.assert_array_equal(np.stack(labels[False]), [[0, 1, 2, 3, 0, 1], [2, 3, 0, 1, 2, 3]] * 3)
  assert all(label.dtype == np.int32 for label in labels[True] + labels[False])


def warmup_round(setup, frozen, state, fuse: bool):
  """The warm-up round from `state` on 2 CPU devices: the fetched (bank, metrics, outputs)."""
  mesh = make_mesh(jax.devices("cpu")[:2])
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(jax.tree.map(jnp.copy, state), replicated)   # The units donate it.
  fn = steps.make_step_fns(setup, mesh, fuse=fuse)["warmup_round"]
  state, metrics, outputs = fn(state, jax.device_put(frozen, replicated))
  return jax.device_get((state.method.bank, metrics, outputs))


@pytest.fixture(scope="module")
def fused_warmup_round(start):
  """The first state's warm-up round as one lax.scan (the accelerators' path), shared."""
  return warmup_round(*start, fuse=True)


def test_synthesis_rounds_fill_the_bank_one_class_after_another(start, fused_warmup_round):
  """Two rounds, per-step calls (CPUs): the bank fills with one class a round; L_adv is off in
  the warm-up only; a fused lax.scan round (the accelerators' path) computes the same."""
  setup, frozen, _ = start
  mesh = make_mesh(jax.devices("cpu")[:2])
  replicated = NamedSharding(mesh, P())
  frozen = jax.device_put(frozen, replicated)
  fns = steps.make_step_fns(setup, mesh, fuse=False)
  state = jax.device_put(jax.tree.map(jnp.copy, start[2]), replicated)   # The units donate it.
  state, warm_metrics, warm_out = fns["warmup_round"](state, frozen)
  outputs = {False: jax.device_get((state.method.bank, warm_metrics, warm_out)),
             True: fused_warmup_round}
  state, metrics, _ = fns["round"](state, frozen)
  bank = jax.device_get(state.method.bank)
  assert int(bank.size) == 8 and int(state.method.rounds) == 2
  np.testing.assert_array_equal(bank.labels[:8], [0] * 4 + [1] * 4)
  _, warm_metrics, warm_out = outputs[False]
  assert warm_out["images"].shape == (4, 32, 32, 3)
  np.testing.assert_allclose(bank.images[:4] / 255.0, warm_out["images"], atol=1 / 255 + 1e-6)
  for m in (warm_metrics, metrics):
    assert m["gen/latent_grad_norm"].shape == (2,)
    assert np.all(np.asarray(m["gen/latent_grad_norm"]) > 0)
  weights = setup.config.loss
  base = lambda m: weights.ce * m["gen/ce"] + weights.bn * m["gen/bn"]
  np.testing.assert_allclose(warm_metrics["gen/loss"], base(warm_metrics), rtol=1e-5)
  np.testing.assert_allclose(metrics["gen/loss"], base(metrics) + weights.adv * metrics["gen/adv"],
                             rtol=1e-5)
  assert np.all(np.asarray(metrics["gen/adv"]) != 0)
  (bank_f, metrics_f, out_f), (bank_s, metrics_s, out_s) = outputs[True], outputs[False]
  for name in metrics_s:
    np.testing.assert_allclose(metrics_f[name], metrics_s[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(out_f["images"], out_s["images"], atol=1e-4)
  np.testing.assert_allclose(bank_f.images.astype(int), bank_s.images.astype(int), atol=1)


def test_bank_intermediate_x0_banks_each_snapshot_with_the_rounds_labels(start, fused_warmup_round):
  """`diffdfkd.bank_intermediate_x0` (the authors' loader reads the x0_hat images their
  generation saves): a round banks (snapshots + 1) x its images, its finals first, exactly the
  switch-off run's from the same state, then each snapshot, the decoded x0_hat its step's loss
  saw, with the round's labels. Snapshot steps: the code's, every steps // 5."""
  import dataclasses
  setup, frozen, state0 = start
  config = diffdfkd_config("t", "e", "w")
  config.diffdfkd.bank_intermediate_x0 = True
  for steps_, expected in ((10, [1, 3, 5, 7]), (50, [9, 19, 29, 39]), (70, [13, 27, 41, 55]),
                           (12, [1, 3, 5, 7, 9]), (2, [0])):
    config.diffdfkd.steps = steps_
    assert [i for i in range(steps_) if diffdfkd.snapshots_after(config, i)] == expected
    assert diffdfkd.num_snapshots(config) == len(expected)
  config.diffdfkd.steps = 12
  buffer = jnp.zeros((5, 1, 1, 1, 3))   # 12 steps: step 2k + 1 writes slot k.
  for i in range(12):
    buffer = diffdfkd.keep_snapshot(config, buffer, jnp.full((1, 1, 1, 3), i + 1.0), jnp.int32(i))
  np.testing.assert_array_equal(buffer[:, 0, 0, 0, 0], [2, 4, 6, 8, 10])
  config.diffdfkd.bank_intermediate_x0 = False
  assert diffdfkd.num_snapshots(config) == 0 and diffdfkd.images_per_round(config, 4) == 4

  switched = setup.config.copy_and_resolve_references()
  switched.diffdfkd.bank_intermediate_x0 = True
  on = dataclasses.replace(setup, config=switched)
  assert diffdfkd.images_per_round(switched, 4) == 8   # 2 steps: one snapshot, after step 0.
  method = diffdfkd.init_state(on, None, None)
  unwritten = method.bank.replace(labels=jnp.full_like(method.bank.labels, -1))   # Not class 0.
  state = state0.replace(method=method.replace(bank=unwritten))
  bank_on, _, out_on = warmup_round(on, frozen, state, fuse=True)
  bank_off, _, out_off = fused_warmup_round
  assert bank_on.images.shape[0] == 2 * bank_off.images.shape[0]
  assert int(bank_off.size) == 4 and int(bank_on.size) == 8
  np.testing.assert_array_equal(bank_on.images[:4], bank_off.images[:4])
  np.testing.assert_array_equal(out_on["images"], out_off["images"])
  labels = np.asarray(diffdfkd.round_labels(setup, state0.method.rounds))
  np.testing.assert_array_equal(bank_on.labels, np.concatenate([np.tile(labels, 2), [-1] * 8]))

  @jax.jit
  def first_x0_image(state, frozen):
    latents, ctx = diffdfkd.start_round(state, setup=setup, warmup=True)
    timestep, alpha_bar, _, _ = setup.generator.schedule.at(0)
    eps = diffdfkd.guided_noise(setup.generator, frozen["unet"], latents, timestep,
                                frozen["text"][ctx.labels], frozen["uncond"],
                                setup.config.diffdfkd.guidance_scale)
    return diffdfkd.decode_for_teacher(setup.generator, frozen["vae"],
                                       scheduler.predict_x0(latents, eps, alpha_bar), 32)

  np.testing.assert_allclose(bank_on.images[4:8] / 255.0, first_x0_image(state0, frozen),
                             atol=1 / 255 + 1e-6)
  state = state.replace(method=state.method.replace(bank=bank_on))
  images, _ = diffdfkd.latest_images(on, state.method)   # The grid: K rounds of 8 (or all).
  assert images.shape[0] == min(4 * 8, bank_on.images.shape[0])


@pytest.fixture(scope="module")
def full_run(sd, teacher_dir, table_path, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("diffdfkd_full")
  config = diffdfkd_config(teacher_dir, table_path, sd[1])
  return train.train_and_evaluate(config, str(workdir)), workdir


def test_a_tiny_run_trains_resumes_and_records_its_method(sd, teacher_dir, table_path, full_run,
                                                          tmp_path):
  """Through the launcher: it logs the guidance losses, the bundle records the method and its
  weights, and a run stopped after its first KD call resumes to the uninterrupted student."""
  result, workdir = full_run
  assert result["epoch"] == 2 and result["bank/size"] == 8 and np.isfinite(result["kd/kl"])
  assert sorted(os.listdir(workdir / "samples")) == ["epoch_0001.png", "epoch_0002.png"]
  spec = bundle_lib.load_bundle(result["student"]).spec
  assert spec.extra["method"] == "diffdfkd" and spec.extra["diffusion_weights"] == sd[1]
  config = diffdfkd_config(teacher_dir, table_path, sd[1])
  config.max_units = 3      # Warm-up round, round, first KD call.
  assert train.train_and_evaluate(config, str(tmp_path))["stopped_early"]
  config.max_units = 0
  resumed = train.train_and_evaluate(config, str(tmp_path))
  a = bundle_lib.load_bundle(result["student"]).variables
  b = bundle_lib.load_bundle(resumed["student"]).variables
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_the_paper_configs_pass_the_checks():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "diffdfkd_cifar.py")
  spec = importlib.util.spec_from_file_location("diffdfkd_cifar", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for pair in sorted(module.PAIRS):
    config = module.get_config(",".join(pair))
    checks.validate_config(config, 1, 10)
    kd_steps = bank_kd.total_kd_steps(config)
    rounds = sum(len(bank_kd.epoch_plan(config, e)) for e in range(config.epochs)) - kd_steps // 10
    assert rounds * config.diffdfkd.batch == 50_000 and kd_steps == 39_920 - (pair[0] == "cifar100") * 720
  with pytest.raises(ValueError, match="known pairs"):
    module.get_config("cifar10,resnet34,vgg8")
  # NAYER's group sizes are not DiffDFKD's: 8 devices take batches of 8 and 256, and setting
  # num_groups, which DiffDFKD does not read, is refused.
  config = module.get_config("cifar10,resnet34,resnet18")
  config.diffdfkd.batch = 8
  checks.validate_config(config, 8, 10)
  config.num_groups = 10
  with pytest.raises(ValueError, match="num_groups is set to 10, but method diffdfkd does not"):
    checks.validate_config(config, 8, 10)
  config.num_groups = 8
  config.bank_capacity = 4
  with pytest.raises(ValueError, match=r"smaller than one synthesis batch \(diffdfkd.batch = 8"):
    checks.validate_config(config, 8, 10)
  config.bank_capacity = 16   # Holds a round's 8 finals, not its 4 x 8 snapshots beside them.
  config.diffdfkd.bank_intermediate_x0 = True
  with pytest.raises(ValueError, match=r"batch \(diffdfkd.batch x 5 with .*bank_intermediate_x0 = 40 "):
    checks.validate_config(config, 8, 10)


def test_refusals_name_the_fix(teacher_dir, table_path):
  config = diffdfkd_config(teacher_dir, table_path, "")
  teacher, table = bundle_lib.load_bundle(teacher_dir), embeddings.load_table(table_path)
  with pytest.raises(ValueError, match="convert-diffusion SD_DIR"):
    train.create_setup(config, teacher, table)
  for field, value, message in (("latent_mix", "blend", "cutmix, mixup"),
                                ("prompt", "a photo", "no {class}"),
                                ("batch", 3, "divisible by the 2 devices"),
                                ("attention", "flash", "xla .* or cudnn"),
                                ("attention", "cudnn", "needs a GPU")):
    bad = diffdfkd_config(teacher_dir, table_path, "")
    bad.diffdfkd[field] = value
    with pytest.raises(ValueError, match=message):
      diffdfkd.check_config(bad, 2, 4, ())
