"""The dense heads (transfer/heads.py) against PyTorch restatements built from torch.nn (torchvision
does not import here), with the same weights copied across: eval forwards to 1e-5, a train-mode
forward and its BN running statistics, output shapes per task, and ASPP on a 1x1 map."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from caedfkd_jax.transfer import heads

ATOL = 1e-5
STAGES = ((8, 8, 16), (4, 4, 32), (2, 2, 32))   # HxWxC per stage, shallow to deep.
BATCH = 2
OUT_SIZE = (17, 13)                             # Not a multiple of any stage: a fair resize test.
TASK_OUTPUTS = {"segmentation": 13, "depth": 1, "normal": 3}


# PyTorch restatements (torchvision's deeplabv3.py, VainF's DeepLabHeadV3Plus, DINOv2's BNHead),
# with the attribute names of the Flax modules so that one converter serves all.


class TorchConvBNReLU(tnn.Module):

  def __init__(self, cin: int, cout: int, kernel: int = 1, rate: int = 1):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, padding=rate * (kernel // 2), dilation=rate,
                           bias=False)
    self.bn = tnn.BatchNorm2d(cout)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class TorchASPP(tnn.Module):

  def __init__(self, cin: int, rates, features: int, dropout: float):
    super().__init__()
    self.branch0 = TorchConvBNReLU(cin, features)
    self.rates = tuple(rates)
    for i, r in enumerate(self.rates):
      setattr(self, f"atrous{i}", TorchConvBNReLU(cin, features, 3, r))
    self.pool = TorchConvBNReLU(cin, features)
    self.project = TorchConvBNReLU(features * (2 + len(self.rates)), features)
    self.dropout = tnn.Dropout(dropout)

  def forward(self, x):
    outs = [self.branch0(x)] + [getattr(self, f"atrous{i}")(x) for i in range(len(self.rates))]
    pooled = self.pool(tnn.AdaptiveAvgPool2d(1)(x))
    outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return self.dropout(self.project(torch.cat(outs, 1)))


class TorchDeepLabV3(tnn.Module):

  def __init__(self, cin: int, num_outputs: int, rates, features: int, dropout: float):
    super().__init__()
    self.aspp = TorchASPP(cin, rates, features, dropout)
    self.conv = TorchConvBNReLU(features, features, 3)
    self.classifier = tnn.Conv2d(features, num_outputs, 1)

  def forward(self, stages, out_size):
    x = self.classifier(self.conv(self.aspp(stages[-1])))
    return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


class TorchDeepLabV3Plus(tnn.Module):

  def __init__(self, low_cin: int, cin: int, num_outputs: int, rates, features: int,
               low_features: int, dropout: float, low_level_index: int = 0):
    super().__init__()
    self.low_level_index = low_level_index
    self.aspp = TorchASPP(cin, rates, features, dropout)
    self.low_level = TorchConvBNReLU(low_cin, low_features)
    self.decoder0 = TorchConvBNReLU(low_features + features, features, 3)
    self.decoder1 = TorchConvBNReLU(features, features, 3)
    self.classifier = tnn.Conv2d(features, num_outputs, 1)

  def forward(self, stages, out_size):
    low = self.low_level(stages[self.low_level_index])
    x = F.interpolate(self.aspp(stages[-1]), size=low.shape[-2:], mode="bilinear",
                      align_corners=False)
    x = self.classifier(self.decoder1(self.decoder0(torch.cat([low, x], 1))))
    return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


class TorchLinearProbe(tnn.Module):

  def __init__(self, cin: int, num_outputs: int):
    super().__init__()
    self.bn = tnn.BatchNorm2d(cin)
    self.classifier = tnn.Conv2d(cin, num_outputs, 1)

  def forward(self, stages, out_size):
    finest = max((s.shape[-2:] for s in stages), key=lambda hw: hw[0] * hw[1])
    x = torch.cat([F.interpolate(s, size=finest, mode="bilinear", align_corners=False)
                   for s in stages], 1)
    x = self.classifier(self.bn(x))
    return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


# Weights across and data.


def to_torch_state(variables) -> dict[str, torch.Tensor]:
  """Flax params/batch_stats to a torch state dict: HWIO kernels to OIHW, scale to weight,
  mean/var to running_mean/running_var; module paths join with dots."""
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
  state = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
    for path, value in flat.items():
      value = np.asarray(value)
      if path[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1)
      state[".".join(path[:-1] + (names[path[-1]],))] = torch.from_numpy(value.copy())
  return state


def load_into(torch_module: tnn.Module, variables) -> tnn.Module:
  missing, unexpected = torch_module.load_state_dict(to_torch_state(variables), strict=False)
  assert not unexpected, unexpected
  assert all(k.endswith("num_batches_tracked") for k in missing), missing
  return torch_module


def random_variables(model, *args, seed: int = 1):
  """The model's variables drawn in numpy (no init program to compile): kernels from PyTorch's
  default U(+-1/sqrt(fan_in)), BN statistics, BN affine and biases random (variances positive),
  so that eval parity tests every one of them while activations stay O(1)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      bound = 1 / np.sqrt(np.prod(shape[:-1]))
      return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (0.2 * rng.standard_normal(shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, flax.core.unfreeze(shapes))


def make_stages(shapes=STAGES, batch: int = BATCH, seed: int = 0) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((batch, *s)).astype(np.float32) for s in shapes)


def to_nchw(stages) -> list[torch.Tensor]:
  return [torch.from_numpy(np.asarray(s).transpose(0, 3, 1, 2).copy()) for s in stages]


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def head_fn(model, train: bool = False, out_size=OUT_SIZE):
  """The head's forward jitted (one program a test); in train mode it also returns the updated
  batch_stats."""
  if not train:
    return jax.jit(lambda v, stages: model.apply(v, stages, out_size, train=False))
  return jax.jit(lambda v, stages, key: model.apply(
      v, stages, out_size, train=True, mutable=["batch_stats"], rngs={"dropout": key}))


# Resizing.


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((2, 2), (17, 13)), ((1, 1), (4, 3)),
                                     ((8, 8), (3, 5))])
def test_resize_bilinear_matches_interpolate_up_and_down(src, dst):
  x = make_stages(((*src, 3),))[0]
  ours = heads.resize_bilinear(x, dst)
  ref = F.interpolate(to_nchw([x])[0], size=dst, mode="bilinear", align_corners=False)
  np.testing.assert_allclose(ours, to_nhwc(ref), atol=1e-6)


def test_jax_default_antialias_differs_when_shrinking():
  """Why resize_bilinear passes antialias=False: jax's default smooths on the way down."""
  x = make_stages(((8, 8, 3),))[0]
  ref = to_nhwc(F.interpolate(to_nchw([x])[0], size=(3, 5), mode="bilinear",
                              align_corners=False))
  default = jax.image.resize(x, (BATCH, 3, 5, 3), "bilinear")
  assert np.abs(np.asarray(default) - ref).max() > 1e-2


# Eval-mode parity.


def test_deeplabv3_head_matches_torch_in_eval():
  stages = make_stages()
  model = heads.DeepLabV3Head(num_outputs=5, rates=(1, 2, 3), features=16)
  variables = random_variables(model, stages, OUT_SIZE)
  ours = head_fn(model)(variables, stages)
  torch_model = load_into(TorchDeepLabV3(32, 5, (1, 2, 3), 16, 0.5), variables).eval()
  ref = torch_model(to_nchw(stages), OUT_SIZE)
  assert ours.shape == (BATCH, *OUT_SIZE, 5)
  np.testing.assert_allclose(ours, to_nhwc(ref), atol=ATOL)


def test_deeplabv3plus_head_matches_torch_in_eval():
  """Low level from the middle stage (4x4), so the ASPP output (2x2) is upsampled 2x and the
  finest stage goes unused."""
  stages = make_stages()
  model = heads.DeepLabV3PlusHead(num_outputs=5, rates=(1, 2, 3), low_level_index=1,
                                  features=16, low_level_features=8)
  variables = random_variables(model, stages, OUT_SIZE)
  ours = head_fn(model)(variables, stages)
  torch_model = TorchDeepLabV3Plus(32, 32, 5, (1, 2, 3), 16, 8, 0.5, low_level_index=1)
  ref = load_into(torch_model, variables).eval()(to_nchw(stages), OUT_SIZE)
  assert ours.shape == (BATCH, *OUT_SIZE, 5)
  np.testing.assert_allclose(ours, to_nhwc(ref), atol=ATOL)


def test_linear_probe_matches_torch_in_eval():
  """Stages 0 and 2 (8x8 and 2x2): the 2x2 one upsampled 4x to the finest before BN."""
  stages = make_stages()
  model = heads.LinearProbeHead(num_outputs=5, stage_indices=(0, 2))
  variables = random_variables(model, stages, OUT_SIZE)
  ours = head_fn(model)(variables, stages)
  picked = [stages[0], stages[2]]
  torch_model = load_into(TorchLinearProbe(16 + 32, 5), variables).eval()
  ref = torch_model(to_nchw(picked), OUT_SIZE)
  assert ours.shape == (BATCH, *OUT_SIZE, 5)
  np.testing.assert_allclose(ours, to_nhwc(ref), atol=ATOL)


# Train mode.


def _changed(before, after) -> list[bool]:
  return jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))


def test_deeplabv3plus_train_forward_and_bn_statistics_match_torch():
  """Dropout off so the two agree: batch statistics in the forward, PyTorch's running update
  (momentum 0.1, unbiased variance) after it, in every BN."""
  stages = make_stages()
  model = heads.DeepLabV3PlusHead(num_outputs=3, rates=(1, 2, 3), features=16,
                                  low_level_features=8, dropout=0.0)
  variables = random_variables(model, stages, OUT_SIZE)
  ours, updated = head_fn(model, train=True)(variables, stages, jax.random.key(0))
  torch_model = load_into(TorchDeepLabV3Plus(16, 32, 3, (1, 2, 3), 16, 8, 0.0), variables)
  ref = torch_model.train()(to_nchw(stages), OUT_SIZE)
  np.testing.assert_allclose(ours, to_nhwc(ref), atol=ATOL)
  ref_state = torch_model.state_dict()
  for name, value in to_torch_state(updated).items():
    np.testing.assert_allclose(value.numpy(), ref_state[name].numpy(), atol=ATOL, err_msg=name)
  assert all(_changed(variables["batch_stats"], updated["batch_stats"]))


def test_aspp_dropout_acts_in_train_only():
  """ASPP's dropout (0.5, torchvision's) draws from the `dropout` rng in train mode; eval is
  deterministic and needs no rng."""
  stages = make_stages()
  model = heads.DeepLabV3PlusHead(num_outputs=4, rates=(1, 2, 3), features=16)
  variables = random_variables(model, stages, OUT_SIZE)
  train = head_fn(model, train=True)
  out_a, updated = train(variables, stages, jax.random.key(1))
  out_b, _ = train(variables, stages, jax.random.key(2))
  assert out_a.shape == (BATCH, *OUT_SIZE, 4) and np.isfinite(np.asarray(out_a)).all()
  assert not np.allclose(out_a, out_b)
  assert all(_changed(variables["batch_stats"], updated["batch_stats"]))
  with pytest.raises(flax.errors.InvalidRngError):   # Traced only: the error comes at tracing.
    jax.eval_shape(lambda: model.apply(variables, stages, OUT_SIZE, train=True,
                                       mutable=["batch_stats"]))


# Shapes per task.


@pytest.mark.parametrize("head", ["v3", "v3plus", "probe"])
def test_output_shape_per_task(head):
  stages = make_stages()
  for k in TASK_OUTPUTS.values():
    model = {"v3": heads.DeepLabV3Head(k, rates=heads.atrous_rates(8)),
             "v3plus": heads.DeepLabV3PlusHead(k, rates=heads.atrous_rates(16)),
             "probe": heads.LinearProbeHead(k)}[head]
    out, _ = jax.eval_shape(lambda m=model: m.init_with_output(
        jax.random.key(0), stages, (32, 24), train=False))
    assert out.shape == (BATCH, 32, 24, k) and out.dtype == jnp.float32


def test_atrous_rates_double_at_stride_8():
  assert heads.atrous_rates(16) == (6, 12, 18)
  assert heads.atrous_rates(8) == (12, 24, 36)
  with pytest.raises(ValueError, match="output_stride=32"):
    heads.atrous_rates(32)


# The pooled branch on a 1x1 map.


def test_aspp_on_a_1x1_map():
  """Eval: matches PyTorch (the atrous convs see only their centre tap). Train at batch 1:
  PyTorch's BN refuses one value per channel; ours gives each BN's bias after ReLU (the input
  minus its own mean is zero), so the ASPP output is ReLU(project's BN bias), and finite
  running statistics."""
  x = make_stages(((1, 1, 32),))[0]
  model = heads.ASPP(rates=(6, 12, 18), features=16, dropout=0.0)
  variables = random_variables(model, x)
  torch_model = load_into(TorchASPP(32, (6, 12, 18), 16, 0.0), variables)
  ours = model.apply(variables, x, train=False)
  np.testing.assert_allclose(ours, to_nhwc(torch_model.eval()(to_nchw([x])[0])), atol=ATOL)

  x1 = x[:1]
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    torch_model.train()(to_nchw([x1])[0])
  out, updated = model.apply(variables, x1, train=True, mutable=["batch_stats"])
  expected = np.maximum(variables["params"]["project"]["bn"]["bias"], 0)
  np.testing.assert_allclose(out[0, 0, 0], expected, atol=ATOL)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(updated))
