"""The side-by-side benchmark: the PyTorch side computes what the JAX side computes, the
quick mode runs end to end and prints the ratio table, FLOP counts and time-to-accuracy are right."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import flops, time_to_accuracy, torch_side
from caedfkd_jax import models
from caedfkd_jax.io import convert, torch_zoo
from caedfkd_jax.methods import bank_kd
from caedfkd_jax.models.layers import BN_STATS
from caedfkd_jax.synthesis import augment, generator as generator_lib, losses

def test_torch_crop_flip_matches_jax():
  rng = np.random.default_rng(0)
  images = rng.random((6, 8, 8, 3), np.float32)
  dy, dx = rng.integers(0, 9, 6), rng.integers(0, 9, 6)
  flip = rng.random(6) < 0.5
  ours = augment.crop_flip(jnp.asarray(images), jnp.asarray(dy), jnp.asarray(dx), jnp.asarray(flip))
  theirs = torch_side.crop_flip(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(dy),
                                torch.from_numpy(dx), torch.from_numpy(flip))
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1))


def test_torch_losses_match_jax():
  rng = np.random.default_rng(1)
  k, views, groups = 5, 3, 2
  labels = np.tile(np.arange(k), views * groups)
  source = np.tile(np.repeat(np.arange(views), k), groups)
  features = rng.normal(size=(labels.size, 16)).astype(np.float32)
  ours = losses.cncl_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(source), 0.1)
  theirs = torch_side.cncl(torch.from_numpy(features), torch.from_numpy(labels),
                           torch.from_numpy(source), 0.1)
  np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)

  t_logits, s_logits = rng.normal(size=(2, 12, k)).astype(np.float32) * 3
  np.testing.assert_allclose(
      float(400 * torch_side.kl_rows(torch.from_numpy(t_logits) / 20,
                                     torch.from_numpy(s_logits) / 20).mean()),
      float(losses.kl_divergence(jnp.asarray(t_logits), jnp.asarray(s_logits), 20.0)), rtol=1e-5)


def test_torch_bn_statistics_loss_matches_jax():
  """Hooks on the PyTorch teacher give the JAX BN loss, first plain, then blended with the EMA."""
  torch.manual_seed(0)
  teacher = torch_zoo.build("resnet_tiny_a", 4).eval()
  with torch.no_grad():
    for m in teacher.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.3)
        m.running_var.uniform_(0.5, 1.5)
  state_dict = {k: v.numpy() for k, v in teacher.state_dict().items()}
  variables = convert.state_dict_to_variables(state_dict, "resnet_tiny_a", 4, image_size=16)
  model = models.create_model("resnet_tiny_a", 4)
  bn = torch_side.BNStatistics(teacher, momentum=0.9)
  batches = np.random.default_rng(2).normal(size=(2, 8, 16, 16, 3)).astype(np.float32)
  ema = None
  for x in batches:
    bn.stats.clear()
    with torch.no_grad():
      teacher(torch.from_numpy(x.transpose(0, 3, 1, 2)))
      theirs = float(bn.loss())
    _, state = model.apply(variables, jnp.asarray(x), train=False, mutable=[BN_STATS])
    stats = state[BN_STATS]
    blended = stats if ema is None else losses.blend_bn_statistics(stats, ema, 0.9)
    ours = float(losses.bn_statistics_loss(blended, variables["batch_stats"]))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)
    bn.end_round()
    ema = stats if ema is None else jax.tree.map(lambda e, s: 0.9 * e + 0.1 * s, ema, stats)


def test_torch_generator_has_the_jax_generators_parameters():
  k, batch, dim = 10, 50, 384
  g = generator_lib.Generator(num_classes=k, img_size=32, noise_dim=100, ngf=16)
  params = generator_lib.init_generator(jax.random.key(0), g, batch, dim)
  ours = sum(x.size for x in jax.tree.leaves(params))
  theirs = torch_side.Generator(k, batch, dim, noise_dim=100, ngf=16)
  assert sum(p.numel() for p in theirs.parameters()) == ours
  assert theirs(torch.randn(batch, dim)).shape == (batch, 3, 32, 32)


def test_xla_counts_a_resnet20_forward_near_its_textbook_flops():
  """2 x 40.6M multiply-adds per 32x32 image (He et al.); XLA skips the padding taps (~8%)."""
  model = models.create_model("resnet20", 10)
  x = jnp.zeros((4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  counted = flops.lowered_flops(jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x))
  textbook = 2 * 40.55e6 * 4
  assert 0.88 * textbook < counted < 1.0 * textbook


def _write_run(directory, rows):
  os.makedirs(directory)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_time_to_accuracy_reads_runs_and_computes_speedups(tmp_path, capsys):
  _write_run(tmp_path / "plain", [
      {"epoch": 1, "time/train_minutes": 1.0},  # warm-up: no evaluation
      {"epoch": 2, "time/train_minutes": 2.0, "eval/top1": 15.0},
      {"epoch": 3, "time/train_minutes": 3.0, "eval/top1": 25.0},
      {"epoch": 4, "time/train_minutes": 4.0, "eval/top1": 31.0}])
  _write_run(tmp_path / "cend", [
      {"epoch": 2, "time/train_minutes": 2.0, "eval/top1": 22.0},
      {"epoch": 3, "time/train_minutes": 3.0, "eval/top1": 28.0}])
  rc = time_to_accuracy.main([str(tmp_path / "plain"), str(tmp_path / "cend"),
                              "--thresholds", "20,30", "--plot", str(tmp_path / "curves.png"),
                              "--out_json", str(tmp_path / "tta.json")])
  assert rc == 0
  rows = json.loads((tmp_path / "tta.json").read_text())["rows"]
  assert rows[0]["minutes"] == {"plain": 3.0, "cend": 2.0}
  assert rows[0]["speedup_vs_first"]["cend"] == pytest.approx(1.5)
  assert rows[1]["minutes"] == {"plain": 4.0, "cend": None}       # CEND never reached 30%
  assert rows[2]["threshold"] == "common best 28.00%"
  assert rows[2]["minutes"] == {"plain": 4.0, "cend": 3.0}
  assert "not reached" in capsys.readouterr().out
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_time_to_accuracy_names_a_run_without_evaluations(tmp_path, capsys):
  _write_run(tmp_path / "noeval", [{"epoch": 1, "time/train_minutes": 1.0}])
  assert time_to_accuracy.main([str(tmp_path / "noeval")]) == 2
  assert "--config.eval_data" in capsys.readouterr().err


def test_parity_judge_scores_a_batch_as_our_losses_do(tmp_path):
  """The NAYER-parity judge: its BN term is our summed BN loss, its CE and top-1 are by hand."""
  from benchmarks import synthesis_judge
  from caedfkd_jax.io import bundle as bundle_lib
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 4, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
  variables = bundle_lib.init_variables(spec, 0)
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
  teacher = synthesis_judge.torch_teacher(bundle_lib.Bundle(spec, variables))
  images = np.random.default_rng(3).random((8, 16, 16, 3)).astype(np.float32)
  labels = np.arange(8) % 4
  verdict = synthesis_judge.judge(teacher, images, labels, spec.mean, spec.std, low_confidence=0.3)
  model = models.create_model("resnet_tiny_a", 4)
  x = (jnp.asarray(images) - 0.5) / 0.25
  (logits, _), state = model.apply(variables, x, train=False, mutable=[BN_STATS])
  np.testing.assert_allclose(verdict["bn"], float(losses.bn_statistics_loss(
      state[BN_STATS], variables["batch_stats"], "sum")), rtol=1e-4)
  logits = np.asarray(logits, np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(verdict["ce"], -log_p[np.arange(8), labels].mean(), rtol=1e-4)
  p = np.exp(log_p)
  right = p.argmax(-1) == labels
  assert verdict["top1"] == pytest.approx(right.mean())
  assert verdict["confident_wrong"] == pytest.approx(np.mean(~right & (p.max(-1) >= 0.3)))


def test_ladder_study_summarizes_arms_against_base():
  from benchmarks import ladder_study
  rows = lambda finals: [[{"epoch": 1}, {"epoch": 2, "eval/top1": f - 10, "time/minutes": 1.0},
                          {"epoch": 3, "eval/top1": f, "time/minutes": 2.0}] for f in finals]
  summary = ladder_study.summarize({"base": rows([80.0, 84.0, 82.0]),
                                    "cend": rows([85.0, 86.0, 90.0])})
  assert summary["base"]["final_top1"]["mean"] == pytest.approx(82.0)
  assert summary["base"]["final_top1"]["std"] == pytest.approx(2.0)
  assert summary["cend"]["minus_reference"]["per_seed"] == [5.0, 2.0, 8.0]
  assert summary["cend"]["minus_reference"]["mean"] == pytest.approx(5.0)
  reached_80 = summary["cend"]["epochs_to"]["80"]      # seed 2 (90%) got past 80% at epoch 2
  assert (reached_80["reached"], reached_80["epochs"]["mean"]) == (3, pytest.approx(8 / 3))
  assert summary["base"]["epochs_to"]["90"]["reached"] == 0
  table = ladder_study.format_table(summary)
  assert "| cend | 87.00 ± 2.65" in table and "5.00 ± 3.00" in table
  against_cend = ladder_study.summarize({"base": rows([80.0, 84.0, 82.0]),
                                         "cend": rows([85.0, 86.0, 90.0])}, reference="cend")
  assert against_cend["base"]["minus_reference"]["per_seed"] == [-5.0, -2.0, -8.0]
  assert "minus_reference" not in against_cend["cend"]
  assert "minus cend" in ladder_study.format_table(against_cend, "cend")


def test_ladder_metric_is_averaged_over_an_epoch_window_per_seed():
  """A diagnostic such as gen/teacher_acc_on_best: per seed over epochs 2-3 only, then paired."""
  from benchmarks import ladder_study
  rows = lambda accs: [[{"epoch": 1, "gen/x": 0.0}, {"epoch": 2, "gen/x": a},
                        {"epoch": 3, "gen/x": a + 0.2}, {"epoch": 4}] for a in accs]
  summary = ladder_study.summarize_metric({"nayer": rows([0.1, 0.3, 0.2]),
                                           "ce1": rows([0.5, 0.4, 0.6])}, "gen/x", 2, 3, "nayer")
  assert summary["nayer"]["per_seed"] == pytest.approx([0.2, 0.4, 0.3])
  assert summary["ce1"]["minus_reference"]["per_seed"] == pytest.approx([0.4, 0.1, 0.4])
  assert "minus_reference" not in summary["nayer"]
  assert "| ce1 | 0.60 ± 0.10" in ladder_study.format_metric_table(summary, "x", "nayer")
  with pytest.raises(ValueError, match="epochs 5-6"):
    ladder_study.summarize_metric({"nayer": rows([0.1])}, "gen/x", 5, 6, "nayer")


def test_ladder_probes_summarize_seeds_and_differences(tmp_path):
  """Each seed's probe value is the mean of its draws; arms are compared seed by seed."""
  from benchmarks import ladder_study
  def report(full, shots10):
    return {"results": [{"protocol": "linear", "shots": "all", "mean": full},
                        {"protocol": "knn", "shots": 10, "mean": float(np.mean(shots10))}]}
  for arm, fulls in (("base", (40.0, 44.0, 42.0)), ("cend", (41.0, 47.0, 45.0))):
    for seed, full in enumerate(fulls):
      (tmp_path / f"{arm}_{seed}.json").write_text(json.dumps(report(full, [full - 10, full - 12])))
  reports = {arm: ladder_study.probe_reports(str(tmp_path), arm, 3) for arm in ("base", "cend")}
  summary = ladder_study.summarize_probes(reports)
  assert list(summary) == ["linear/all", "knn/10"]
  assert summary["linear/all"]["base"]["mean"] == pytest.approx(42.0)
  assert summary["knn/10"]["cend"]["per_seed"] == [30.0, 36.0, 34.0]
  assert summary["linear/all"]["cend"]["minus_reference"]["per_seed"] == [1.0, 3.0, 3.0]
  assert "minus_reference" not in summary["linear/all"]["base"]
  assert "| linear/all | cend | 44.33 ± 3.06" in ladder_study.format_probe_table(summary)


def test_ladder_switches_set_their_fields_on_top_of_their_arm():
  """A switch's config differs from its arm's in exactly the switch's fields."""
  from benchmarks import ladder_study
  def flat(config):
    top = {k: v for k, v in config.items() if not hasattr(v, "items")}
    return {**top, **{f"{k}.{f}": v for k, section in config.items() if hasattr(section, "items")
                      for f, v in section.items()}}
  assert {arm for arm, _ in ladder_study.SWITCHES.values()} == {"cend_cncl", "base"}
  for name, (base_arm, fields) in ladder_study.SWITCHES.items():
    arm = flat(ladder_study.arm_config(base_arm, "T", "E", 2, 3))
    switched = flat(ladder_study.arm_config(name, "T", "E", 2, 3))
    assert {k for k in arm if arm[k] != switched[k]} == set(fields), name
    assert all(switched[k] == v for k, v in fields.items())
  with pytest.raises(SystemExit):
    ladder_study.main(["--arms", "per_group", "--reference", "base"])


def test_conv_layers_and_network_breakdown_print_both_kernel_choices(capsys, monkeypatch):
  """The CPU-gap tables run end to end at toy sizes, with one column per cpu_kernels choice."""
  from benchmarks import conv_layers, network_breakdown
  monkeypatch.setattr(conv_layers, "LAYERS", ((8, 4, 4, "student"), (8, 4, 4, "generator")))
  assert conv_layers.main(["--batch", "2", "--repeats", "1"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8x8")]
  assert len(rows) == 2 and all(row.count(" / ") == 6 for row in rows)
  assert network_breakdown.main(["--archs", "resnet8", "--batch", "2", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "JAX tuned ms | JAX xla_default ms | PyTorch ms" in out
  assert len([line for line in out.splitlines() if line.startswith("| resnet8 |")]) == 3


def test_onednn_ab_times_every_option_set_and_their_gradients_agree(capsys):
  """Each of XLA's oneDNN option sets compiles, and gives tuned's gradient to float rounding."""
  from benchmarks import onednn_ab
  assert onednn_ab.main(["--archs", "resnet8", "--batch", "2", "--repeats", "1"]) == 0
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| resnet8 |")]
  assert [row[1] for row in rows] == list(onednn_ab.OPTION_SETS)
  assert all(float(row[4].rstrip(" |")) < 1e-4 for row in rows)


@pytest.mark.parametrize("cncl_weight", [0.0, 0.5])
def test_torch_side_samples_uniform_kd_batches_as_the_jax_side_does(cncl_weight):
  """sampler=uniform: KL rows from the whole bank, CNCL groups appended only with CNCL on."""
  from caedfkd_jax.config import defaults
  config = defaults.get_config()
  config.student_arch, config.cend.num_sources, config.num_groups = "resnet8", 1, 1
  config.generator.ngf, config.generator.noise_dim = 4, 8
  config.student.sampler, config.student.batch_groups = "uniform", 2
  config.student.cncl_weight, config.student.cncl_groups = cncl_weight, 1
  table = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
  run = torch_side.TorchDFKD(config, "resnet8", table, (0.5,) * 3, (0.25,) * 3, 32, "cpu")
  group = 4 * 2
  assert run.kd_images == (2 + bank_kd.cncl_subbatch_groups(config)) * group
  assert run.kd_images == (3 if cncl_weight else 2) * group
  assert np.isfinite(float(run.kd_step()))
