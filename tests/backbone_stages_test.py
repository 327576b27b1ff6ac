"""Backbones for dense work: multi-scale "stages" and the dilated Bottleneck ResNet.

Shapes come from `jax.eval_shape` (no compile); real numbers from the tiny archs
and a tiny Bottleneck ResNet with resnet50's layout, checked against a PyTorch
restatement of torchvision's `replace_stride_with_dilation` forward (torchvision
itself, where it imports, on the real resnet50).
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caedfkd_jax import models
from caedfkd_jax.models import resnet

SHAPE_CASES = [(arch, 32) for arch in models.ARCHS] + [("vgg11", 64), ("resnet50", 64)]


def _shapes(model, size: int, batch: int = 2):
  """((logits, aux), variables) as ShapeDtypeStructs."""
  x = jnp.zeros((batch, size, size, 3))
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))


@pytest.mark.parametrize("arch,size", SHAPE_CASES, ids=[f"{a}-{s}px" for a, s in SHAPE_CASES])
def test_stages_sit_at_the_declared_strides(arch, size):
  strides = models.stage_strides(arch, size)
  (_, aux), _ = _shapes(models.create_model(arch, 10), size)

  assert len(aux["stages"]) == len(strides) >= 3
  for stage, stride in zip(aux["stages"], strides):
    chex.assert_shape(stage, (2, size // stride, size // stride, None))
  assert all(a < b for a, b in zip(strides, strides[1:]))
  assert aux["stages"][-1].shape[-1] == aux["features"].shape[-1]


def _random_variables(model, size: int, seed: int = 0) -> dict:
  """He-scaled kernels, random BN affine params and running stats (eval BN is no identity).

  Filled from `eval_shape` with NumPy: compiling `init`'s random numbers costs
  more than the forward.
  """
  _, shapes = _shapes(model, size, batch=1)
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      value = 0.5 + rng.rand(*leaf.shape)
    elif name == "kernel":
      value = rng.randn(*leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    else:  # biases, running means
      value = 0.2 * rng.randn(*leaf.shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize("arch", ["resnet_tiny_a", "resnet_tiny_b", "wrn_tiny", "vgg8"])
def test_the_last_stage_is_what_the_classifier_pools(arch):
  model = models.create_model(arch, 10)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, aux = _apply(model, _random_variables(model, 32), x)
  np.testing.assert_allclose(aux["features"], aux["stages"][-1].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_stride,strides", [(16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_dilated_resnet50_keeps_resolution_and_params(output_stride, strides):
  size = 64
  assert models.stage_strides("resnet50", size, output_stride) == strides
  (_, aux), variables = _shapes(models.create_model("resnet50", 10, output_stride=output_stride),
                                size)
  for stage, stride in zip(aux["stages"], strides):
    chex.assert_shape(stage, (2, size // stride, size // stride, None))
  _, plain = _shapes(models.create_model("resnet50", 10), size)
  # Same names and shapes: a converted teacher or student loads into the dilated net.
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, plain)


@pytest.mark.parametrize("arch,output_stride", [
    ("resnet18", 16), ("resnet_tiny_a", 8), ("wrn_tiny", 2), ("vgg8", 32), ("resnet50", 4)])
def test_output_strides_a_net_cannot_give_are_refused(arch, output_stride):
  with pytest.raises(ValueError, match="output_stride") as error:
    models.create_model(arch, 10, output_stride=output_stride)
  assert "\n" not in str(error.value)


def test_natural_output_strides_are_accepted():
  for arch in models.ARCHS:
    models.create_model(arch, 10, output_stride=models.stage_strides(arch, 32)[-1])
  model = models.create_model("vgg8", 10, output_stride=16)  # VGG's 16 needs 64 px inputs
  with pytest.raises(ValueError, match="use 8"):
    _shapes(model, 32)
  _shapes(model, 64)


# --- real numbers on a tiny Bottleneck ResNet in resnet50's layout -----------

STAGE_SIZES = (1, 1, 2, 2)  # two blocks where dilation changes between block 0 and 1


def _tiny_bottleneck(output_stride: int | None = None) -> resnet.ResNet:
  return resnet.ResNet(stage_sizes=STAGE_SIZES, block_cls=resnet.Bottleneck, width=4,
                       imagenet_stem=True, head="fc", num_classes=5,
                       output_stride=output_stride)


def _torchvision_forward(variables, x_NCHW: torch.Tensor,
                         replace_stride_with_dilation: tuple[bool, bool, bool]):
  """torchvision's ResNet forward with Bottlenecks, restated with torch.nn.functional.

  The dilation rule is torchvision's `_make_layer`: a dilated stage multiplies the
  dilation by its stride and runs at stride 1; its first block keeps the previous one.
  """
  params, stats = jax.tree.map(np.asarray, (variables["params"], variables["batch_stats"]))

  def node(tree, path):
    for name in path.split("/"):
      tree = tree[name]
    return tree

  def t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32))

  def conv(path, x, stride=1, padding=0, dilation=1):
    kernel_OIHW = t(node(params, path)["kernel"]).permute(3, 2, 0, 1)
    return F.conv2d(x, kernel_OIHW, stride=stride, padding=padding, dilation=dilation)

  def bn(path, x):
    p, s = node(params, path), node(stats, path)
    return F.batch_norm(x, t(s["mean"]), t(s["var"]), t(p["scale"]), t(p["bias"]),
                        training=False, eps=1e-5)

  x = F.relu(bn("bn1", conv("conv1", x_NCHW, stride=2, padding=3)))
  x = F.max_pool2d(x, 3, 2, 1)
  dilation, stages = 1, []
  for i, num_blocks in enumerate(STAGE_SIZES):
    stride, previous = (1 if i == 0 else 2), dilation
    if i > 0 and replace_stride_with_dilation[i - 1]:
      dilation, stride = dilation * stride, 1
    for j in range(num_blocks):
      name = f"layer{i + 1}_{j}"
      d, s = (previous, stride) if j == 0 else (dilation, 1)
      out = F.relu(bn(f"{name}/bn1", conv(f"{name}/conv1", x)))
      out = F.relu(bn(f"{name}/bn2", conv(f"{name}/conv2", out, s, padding=d, dilation=d)))
      out = bn(f"{name}/bn3", conv(f"{name}/conv3", out))
      if "downsample_0" in params[name]:
        x = bn(f"{name}/downsample_1", conv(f"{name}/downsample_0", x, s))
      x = F.relu(out + x)
    stages.append(x)
  features = x.mean(dim=(2, 3))
  logits = features @ t(params["fc"]["kernel"]) + t(params["fc"]["bias"])
  return logits, stages


def _inputs(size: int, seed: int = 1) -> tuple[torch.Tensor, jax.Array]:
  x_NCHW = np.random.RandomState(seed).randn(2, 3, size, size).astype(np.float32)
  return torch.from_numpy(x_NCHW), jnp.asarray(x_NCHW.transpose(0, 2, 3, 1))


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


DILATIONS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


@contextlib.contextmanager
def _one_torch_thread():
  """Tiny convs: a torch thread pool only spins on busy cores (70x slower here)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def test_dilated_bottleneck_resnet_matches_torchvision_rule_restated_in_torch():
  size = 64
  variables = _random_variables(_tiny_bottleneck(), size)
  x_torch, x_jax = _inputs(size)
  logits = {}
  for output_stride, replace in DILATIONS.items():
    logits[output_stride], aux = _apply(_tiny_bottleneck(output_stride), variables, x_jax)
    with torch.no_grad(), _one_torch_thread():
      ref_logits, ref_stages = _torchvision_forward(variables, x_torch, replace)
    assert _rel_err(logits[output_stride], ref_logits.numpy()) < 1e-4
    for stage, ref in zip(aux["stages"], ref_stages):
      assert _rel_err(stage, ref.numpy().transpose(0, 2, 3, 1)) < 1e-4

  # output_stride=32 is the default net: the very same program, so bit-identical outputs.
  def program(model):
    return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x_jax))
  assert program(_tiny_bottleneck(32)) == program(_tiny_bottleneck())
  # Dilation changes the computation, not just the shapes.
  assert _rel_err(logits[16], logits[32]) > 1e-3 and _rel_err(logits[8], logits[16]) > 1e-3


def _torchvision_or_skip_reason():
  try:
    import torchvision
    return torchvision, None
  except Exception as e:  # CPU torch beside a CUDA torchvision: RuntimeError, not ImportError
    return None, f"torchvision not importable ({type(e).__name__}); the torch restatement ran"


def test_dilated_resnet50_matches_torchvision_where_it_imports():
  torchvision, reason = _torchvision_or_skip_reason()
  if torchvision is None:
    pytest.skip(reason)
  from caedfkd_jax.io import convert
  torch.manual_seed(0)
  ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
  state_dict = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  variables = convert.state_dict_to_variables(state_dict, "resnet50", 1000, image_size=64)
  x_torch, x_jax = _inputs(64)
  with torch.no_grad():
    ref_logits = ref(x_torch).numpy()
  logits, _ = models.create_model("resnet50", 1000, output_stride=8).apply(
      variables, x_jax, train=False)
  assert _rel_err(logits, ref_logits) < 1e-4
