"""The Flax zoo against PyTorch references: same weights in, same logits out.

Each reference gets random weights *and* random BatchNorm affine parameters and
running statistics, so eval-mode parity is not the trivial identity-BN case.
Weights go through the project's converter (`convert.state_dict_to_variables`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caedfkd_jax import models
from caedfkd_jax.io import convert, torch_zoo
from caedfkd_jax.models import wrn

TINY = ("resnet_tiny_a", "resnet_tiny_b", "wrn_tiny")


def _randomized_reference(arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = torch_zoo.build(arch, num_classes)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c))
        m.bias.copy_(0.2 * torch.randn(c))
        m.running_mean.copy_(0.2 * torch.randn(c))
        m.running_var.copy_(0.5 + torch.rand(c))
  return model


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _head(model: torch.nn.Module) -> torch.nn.Linear:
  return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _inputs(batch: int, size: int, seed: int = 1) -> tuple[torch.Tensor, jax.Array]:
  x_NCHW = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
  return torch.from_numpy(x_NCHW), jnp.asarray(x_NCHW.transpose(0, 2, 3, 1))


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


PARITY_CASES = [(arch, 10, 32, 2) for arch in models.ARCHS if arch != "resnet50"] + [
    ("resnet50", 1000, 224, 1),  # torchvision's ImageNet layout
    ("vgg11", 100, 64, 2),  # 64x64: the pool after block 3 is used
    ("wrn40_2", 100, 32, 2),
]


@pytest.mark.parametrize("arch,num_classes,size,batch", PARITY_CASES,
                         ids=[f"{a}-{c}cls-{s}px" for a, c, s, _ in PARITY_CASES])
def test_eval_logits_and_features_match_torch(arch, num_classes, size, batch):
  ref_model = _randomized_reference(arch, num_classes).eval()
  captured = {}
  _head(ref_model).register_forward_pre_hook(
      lambda _, inputs: captured.update(features=inputs[0].detach().numpy()))
  x_torch, x_jax = _inputs(batch, size)
  with torch.no_grad():
    ref_logits = ref_model(x_torch).numpy()
    ref_logits_again, ref_features = ref_model(x_torch, return_features=True)
  # return_features=True gives the classifier's input (the benchmark's CNCL uses it).
  np.testing.assert_array_equal(ref_logits_again.numpy(), ref_logits)
  np.testing.assert_array_equal(ref_features.numpy(), captured["features"])

  variables = convert.state_dict_to_variables(
      _state_dict(ref_model), arch, num_classes, image_size=size)
  logits, aux = models.create_model(arch, num_classes).apply(variables, x_jax, train=False)

  assert logits.dtype == jnp.float32
  chex.assert_shape(logits, (batch, num_classes))
  assert _rel_err(logits, ref_logits) < 1e-4
  # "features" is exactly what the classifier sees (CNCL / DAFL losses use it).
  assert _rel_err(aux["features"], captured["features"]) < 1e-4


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_flax_names_give_torch_state_dict_in_order(arch):
  """Every Flax variable maps to the reference's key, in PyTorch's module order."""
  ref_keys = list(torch_zoo.build(arch, 10).state_dict())
  assert [e.torch_key for e in convert.torch_layout(arch, 10, 32)] == ref_keys


def _flax_param_count(arch: str, num_classes: int, size: int = 32) -> int:
  model = models.create_model(arch, num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


# Published counts: akamaster README / METHOD.md, kuangliu CIFAR ResNets, torchvision.
KNOWN_PARAM_COUNTS = {("resnet20", 10): 269_722, ("resnet56", 10): 853_018,
                      ("resnet18", 10): 11_173_962, ("resnet34", 10): 21_282_122,
                      ("resnet50", 1000): 25_557_032}


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_param_count_matches_torch(arch):
  num_classes = 1000 if arch == "resnet50" else 10
  ref = sum(p.numel() for p in torch_zoo.build(arch, num_classes).parameters())
  assert _flax_param_count(arch, num_classes) == ref
  if (arch, num_classes) in KNOWN_PARAM_COUNTS:
    assert ref == KNOWN_PARAM_COUNTS[arch, num_classes]


def test_layout_facts_from_the_spec():
  """Structural details METHOD.md (c) calls out, checked on the Flax trees."""
  def params(arch, num_classes=10):
    model = models.create_model(arch, num_classes)
    return jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]

  r18 = params("resnet18")
  assert "shortcut_0" not in r18["layer1_0"] and "shortcut_1" in r18["layer2_0"]
  assert r18["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
  r50 = params("resnet50")
  assert r50["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert r50["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 256)
  assert "downsample_0" not in r50["layer1_1"]
  assert r50["fc"]["kernel"].shape == (2048, 10)
  # WRN-x-1's first block is 16 -> 16: no convShortcut; WRN-x-2's is 16 -> 32.
  assert "convShortcut" not in params("wrn16_1")["block1"]["layer_0"]
  assert params("wrn40_2")["block1"]["layer_0"]["convShortcut"]["kernel"].shape == (
      1, 1, 16, 32)
  assert params("wrn40_2")["fc"]["kernel"].shape == (128, 10)
  vgg11 = params("vgg11")
  assert set(vgg11["block2_3"]) == {"kernel", "bias"} and "scale" in vgg11["block2_4"]
  assert "block1_3" not in vgg11 and "block1_3" not in params("vgg8")


def test_train_mode_matches_torch_including_running_stats():
  arch = "wrn16_2"  # pre-activation blocks, both shortcut kinds
  ref_model = _randomized_reference(arch, 10, seed=3)
  variables = convert.state_dict_to_variables(_state_dict(ref_model), arch, 10)
  x_torch, x_jax = _inputs(4, 32, seed=4)
  ref_model.train()
  with torch.no_grad():
    ref_logits = ref_model(x_torch).numpy()  # also updates the running stats

  (logits, _), updated = models.create_model(arch, 10).apply(
      variables, x_jax, train=True, mutable=["batch_stats"])

  assert _rel_err(logits, ref_logits) < 1e-4
  ref_updated = convert.state_dict_to_variables(_state_dict(ref_model), arch, 10)
  assert not np.allclose(ref_updated["batch_stats"]["bn1"]["var"],
                         variables["batch_stats"]["bn1"]["var"])  # they did move
  chex.assert_trees_all_close(updated["batch_stats"], ref_updated["batch_stats"],
                              rtol=1e-4, atol=1e-5)


def test_bn_stats_are_the_torch_bn_input_moments():
  arch = "resnet18"
  ref_model = _randomized_reference(arch, 10, seed=5).eval()
  moments = {}

  def record(name):
    def hook(_, inputs):
      x = inputs[0].detach().double()
      moments[name] = (x.mean((0, 2, 3)).numpy(), x.var((0, 2, 3), unbiased=False).numpy())
    return hook

  for name, m in ref_model.named_modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.register_forward_pre_hook(record(name))
  x_torch, x_jax = _inputs(2, 32, seed=6)
  with torch.no_grad():
    ref_model(x_torch)

  variables = convert.state_dict_to_variables(_state_dict(ref_model), arch, 10)
  _, state = models.create_model(arch, 10).apply(
      variables, x_jax, train=False, mutable=["bn_stats"])

  bn_layers = [e for e in convert.torch_layout(arch, 10) if e.torch_key.endswith("running_mean")]
  assert len(bn_layers) == len(moments) == 20
  for e in bn_layers:
    node = state["bn_stats"]
    for name in e.flax_path[:-1]:
      node = node[name]
    mean, var = moments[e.torch_key.rsplit(".", 1)[0]]
    np.testing.assert_allclose(node["mean"], mean, rtol=1e-4, atol=1e-5 * np.abs(mean).max())
    np.testing.assert_allclose(node["var"], var, rtol=1e-4, atol=1e-5 * var.max())


@pytest.mark.parametrize("arch", ["resnet_tiny_b", "wrn_tiny", "vgg8"])
def test_bfloat16_compute_stays_close_to_float32(arch):
  _, x = _inputs(2, 32, seed=7)
  variables = convert.state_dict_to_variables(
      _state_dict(_randomized_reference(arch, 10, seed=7)), arch, 10)
  f32_logits, _ = models.create_model(arch, 10).apply(variables, x, train=False)
  bf16_logits, aux = models.create_model(arch, 10, jnp.bfloat16).apply(
      variables, x, train=False)
  assert bf16_logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert 1e-6 < _rel_err(bf16_logits, f32_logits) < 5e-2  # really bf16, still close


def test_wrn_rejects_a_depth_that_is_not_6n_plus_4():
  model = wrn.WideResNet(depth=15, widen_factor=1)
  with pytest.raises(ValueError, match="6n\\+4"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
