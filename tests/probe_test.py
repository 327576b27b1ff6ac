"""`caedfkd probe`: the few-shot draws, kNN and linear probes on features made to order, and the
command end to end on a tiny image folder with a random bundle."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from caedfkd_jax import models
from caedfkd_jax.cli import main
from caedfkd_jax.eval import fewshot, finetune, probe
from caedfkd_jax.io import bundle as bundle_lib

COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))


def _clusters(rng, n_per_class, num_classes=3, dim=8, spread=0.3):
  centres = np.eye(num_classes, dim) * 5
  labels = np.repeat(np.arange(num_classes), n_per_class)
  return centres[labels] + rng.normal(0, spread, (len(labels), dim)), labels


def _linear_top1(train_f, train_y, test_f, test_y, seed=0):
  idx = np.arange(len(train_y))
  fit, held, _ = fewshot.held_out_split(train_y, idx, seed)
  return fewshot.linear_probe(train_f, train_y, test_f, test_y, idx, fit, held)


def test_linear_probe_separates_separable_features_and_not_random_labels():
  rng = np.random.default_rng(0)
  train_f, train_y = _clusters(rng, 30)
  test_f, test_y = _clusters(rng, 20)
  out = _linear_top1(train_f, train_y, test_f, test_y)
  assert out["top1"] >= 98, out
  assert out["C"] in fewshot.C_GRID and len(out["held_out_top1_by_C"]) == len(fewshot.C_GRID)
  # Random features and labels: nothing to learn, about 1/4 right.
  f = rng.normal(size=(800, 16))
  y = rng.integers(0, 4, 800)
  chance = _linear_top1(f[:400], y[:400], f[400:], y[400:])["top1"]
  assert 15 <= chance <= 35, chance


def test_held_out_part_is_stratified_inside_the_draw_or_outside_it_at_one_shot():
  labels = np.repeat(np.arange(4), 50)
  draw = fewshot.draw_shots(labels, 4, 10, seed=0, draw=0)
  fit, held, how = fewshot.held_out_split(labels, draw, seed=0)
  assert set(fit) | set(held) == set(draw) and not set(fit) & set(held)
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [2, 2, 2, 2])
  assert how["held_out_images"] == 8 and "draw" in how["source"]
  one = fewshot.draw_shots(labels, 4, 1, seed=0, draw=0)
  fit, held, how = fewshot.held_out_split(labels, one, seed=0)
  np.testing.assert_array_equal(fit, one)
  assert not set(held) & set(one)
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [10] * 4)
  assert "rest of the training split" in how["source"]


def _knn_reference(train_f, train_y, test_f, num_classes, k):
  """One query at a time in float64: sort by (-similarity, index), take k, sum similarities."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  tr, te = unit(train_f.astype(np.float64)), unit(test_f.astype(np.float64))
  k = min(k, len(tr))
  votes = np.zeros((len(te), num_classes))
  for i, q in enumerate(te):
    sims = tr @ q
    order = sorted(range(len(tr)), key=lambda j: (-sims[j], j))[:k]
    for j in order:
      votes[i, train_y[j]] += sims[j]
  return votes


@pytest.mark.parametrize("k", [1, 4, 7, 20, 500])
def test_knn_equals_brute_force_including_ties(k):
  rng = np.random.default_rng(k)
  base = rng.normal(size=(40, 6)).astype(np.float32)
  # Exact duplicates with other labels: equal similarities, settled by the lower index.
  train_f = np.concatenate([base, base[:15]])
  train_y = np.concatenate([rng.integers(0, 5, 40), rng.integers(0, 5, 15)])
  test_f = np.concatenate([rng.normal(size=(17, 6)), base[:3]]).astype(np.float32)
  votes = fewshot.knn_votes(train_f, train_y, test_f, 5, k, chunk=6)
  ref = _knn_reference(train_f, train_y, test_f, 5, k)
  np.testing.assert_allclose(votes, ref, atol=1e-5)
  np.testing.assert_array_equal(fewshot.knn_predict(train_f, train_y, test_f, 5, k, chunk=6),
                                ref.argmax(1))


def test_knn_tie_at_the_kth_place_goes_to_the_lower_index():
  train_f = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)  # three equal neighbours
  votes = fewshot.knn_votes(train_f, np.array([2, 1, 0, 0]), np.array([[1, 0]], np.float32),
                            3, k=2)
  np.testing.assert_allclose(votes, [[0, 1, 1]])


def test_draws_are_balanced_deterministic_and_differ():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), 30))
  a = fewshot.draw_shots(labels, 5, 10, seed=0, draw=0)
  np.testing.assert_array_equal(np.bincount(labels[a], minlength=5), [10] * 5)
  assert len(set(a)) == 50
  np.testing.assert_array_equal(a, fewshot.draw_shots(labels, 5, 10, seed=0, draw=0))
  assert set(a) != set(fewshot.draw_shots(labels, 5, 10, seed=0, draw=1))
  assert set(a) != set(fewshot.draw_shots(labels, 5, 10, seed=1, draw=0))


def test_too_few_images_per_class_is_a_clear_error():
  labels = np.array([0] * 10 + [1] * 3)
  with pytest.raises(ValueError, match=r"class 'cat' has 3; use --shots 3 or fewer"):
    fewshot.draw_shots(labels, 2, 5, seed=0, draw=0, class_names=["dog", "cat"])


def test_shots_and_protocol_parsing():
  assert probe.parse_shots("all,10,1") == ["all", 10, 1]
  assert probe.parse_protocols("knn, linear,knn") == ["knn", "linear"]


def _folder(root, n_train=8, n_test=4, size=32):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    for k, colour in enumerate(COLOURS):
      d = root / split / f"c{k}"
      d.mkdir(parents=True)
      for i in range(n):
        img = np.clip(np.array(colour) + rng.normal(0, 30, (size, size, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(d / f"{i:04d}.png")
  return root


def _bundle(path, arch="resnet_tiny_a", num_classes=10, seed=0):
  spec = bundle_lib.ModelSpec(arch, num_classes, 32)
  bundle_lib.save_bundle(str(path), spec, bundle_lib.init_variables(spec, seed))
  return str(path)


def test_features_match_the_model_with_a_padded_last_batch():
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, 32)
  b = bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 2))
  images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  got = probe.extract_features(b, images, batch_size=3, progress=False)
  x = (images / 255.0 - np.array(spec.mean)) / np.array(spec.std)
  apply = jax.jit(lambda v, x: b.model.apply(v, x, train=False)[1]["features"])
  ref = apply(b.variables, x.astype(np.float32))
  np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,head", [("resnet_tiny_a", "linear"), ("wrn_tiny", "fc"),
                                       ("vgg8", "classifier"), ("resnet50", "fc")])
def test_the_head_is_found_whatever_its_name(arch, head):
  assert finetune.head_paths(arch, 10, 32) == {(head, "kernel"), (head, "bias")}


def test_fresh_head_replaces_the_classifier_only():
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, 32)
  b = bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 0))
  _, variables = finetune.with_fresh_head(b, 3, 1)
  old = traverse_util.flatten_dict(b.variables["params"])
  new = traverse_util.flatten_dict(variables["params"])
  assert set(old) == set(new)
  for path in old:
    if path[0] == "linear":
      assert new[path].shape[-1] == 3
    else:
      np.testing.assert_array_equal(new[path], old[path])


def _one_error_line(capsys, argv):
  try:
    code = main.main(argv)
  except SystemExit as e:  # argparse's errors (bad --protocol/--shots) exit
    code = e.code
  assert code == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1, err
  assert err[0].startswith("caedfkd probe: error:")
  return err[0]


def test_bad_spec_protocol_shots_and_size_are_one_line(tmp_path, capsys):
  model = _bundle(tmp_path / "m", "resnet_tiny_a")
  data = _folder(tmp_path / "data")
  line = _one_error_line(capsys, ["probe", "--model", model, "--data", str(tmp_path / "nope")])
  assert "does not exist" in line
  line = _one_error_line(capsys, ["probe", "--model", model, "--data", str(data),
                                  "--protocol", "linear,svm"])
  assert "'svm' is not a protocol" in line
  line = _one_error_line(capsys, ["probe", "--model", model, "--data", str(data), "--shots", "0"])
  assert "'0' is not a shot count" in line
  line = _one_error_line(capsys, ["probe", "--model", model, "--data", str(data), "--shots", "9"])
  assert "class 'c0' has 8" in line
  small = _folder(tmp_path / "small", 2, 2, size=16)
  line = _one_error_line(capsys, ["probe", "--model", model, "--data", str(small)])
  assert "expects 32x32 images" in line


class _NoFeatures(nn.Module):
  num_classes: int = 10
  dtype: object = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def test_bundle_without_features_is_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(models.ARCHS, "no_features", _NoFeatures)
  spec = bundle_lib.ModelSpec("no_features", 3, 32)
  variables = {"params": _NoFeatures(3).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"],
               "batch_stats": {}}
  bundle_lib.save_bundle(str(tmp_path / "m"), spec, variables)
  line = _one_error_line(capsys, ["probe", "--model", str(tmp_path / "m"),
                                  "--data", str(_folder(tmp_path / "data"))])
  assert "returns no penultimate 'features'" in line


def test_probe_command_end_to_end(tmp_path, capsys):
  """A 10-class random model probed on 3 other classes (transfer), all three protocols."""
  model = _bundle(tmp_path / "m")
  data = _folder(tmp_path / "data")
  out = tmp_path / "probe.json"
  argv = ["probe", "--model", model, "--data", str(data), "--protocol", "linear,knn,finetune",
          "--shots", "all,2", "--draws", "2", "--finetune-epochs", "1", "--out", str(out)]
  assert main.main(argv) == 0
  captured = capsys.readouterr()
  assert "features (train)" in captured.err  # the progress bar
  assert "linear" in captured.out and "finetune" in captured.out and "±" in captured.out
  report = json.loads(out.read_text())
  assert report["model"] == {"bundle": model, "arch": "resnet_tiny_a", "num_classes": 10,
                             "feature_dim": 16}
  assert report["data"]["spec"] == str(data)
  assert (report["data"]["train_split"], report["data"]["test_split"]) == ("train", "test")
  assert report["data"]["class_names"] == ["c0", "c1", "c2"]
  assert report["command"] and report["settings"]["knn"]["k"] == 20
  rows = {(r["protocol"], r["shots"]): r for r in report["results"]}
  assert set(rows) == {(p, s) for p in ("linear", "knn", "finetune") for s in ("all", 2)}
  for (protocol, shots), r in rows.items():
    assert r["num_draws"] == len(r["draws"]) == (1 if shots == "all" else 2)
    tops = [d["top1"] for d in r["draws"]]
    assert r["mean"] == pytest.approx(np.mean(tops))
    for d in r["draws"]:
      assert d["train_images"] == (24 if shots == "all" else 6) and 0 <= d["top1"] <= 100
  for d in rows[("linear", 2)]["draws"]:
    assert d["C"] in fewshot.C_GRID and d["c_selection"]["held_out_images"] == 3
  assert rows[("knn", 2)]["draws"][0]["k"] == 6
  # Colour clusters: even random conv features tell these three classes apart.
  assert rows[("knn", "all")]["mean"] >= 90 and rows[("linear", "all")]["mean"] >= 90
  assert rows[("linear", 2)]["draws"][0]["indices_sha256"] != rows[("linear", 2)]["draws"][1][
      "indices_sha256"]
