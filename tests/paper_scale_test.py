"""The paper-scale configs (issue 31): their checks, the CIFAR-100 fix, the state-memory check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from caedfkd_jax.config import checks
from caedfkd_jax.configs import paper_cifar, paper_imagenet, paper_tiny_imagenet
from caedfkd_jax.engine import train
from caedfkd_jax.runtime import platform
from caedfkd_jax.synthesis import class_cycle, memory_bank


def test_the_paper_scale_configs_pass_the_config_checks():
  for config, k in ((paper_tiny_imagenet.get_config(), 200), (paper_imagenet.get_config(), 1000),
                    (paper_tiny_imagenet.get_config("base"), 200),
                    (paper_cifar.get_config("cifar100,resnet34,resnet18"), 100)):
    config.embeddings = "unused"
    checks.validate_config(config, 1, k)
  tiny = paper_tiny_imagenet.get_config()
  assert (tiny.classes_per_group * (tiny.cend.num_sources + 1) * tiny.num_groups,
          tiny.generator.flip) == (250, False)
  # A divisor is required: 200 classes in groups of 30 is refused.
  tiny.classes_per_group, tiny.embeddings = 30, "unused"
  with pytest.raises(ValueError, match="classes_per_group=30"):
    checks.validate_config(tiny, 1, 200)


def test_cifar100_kd_batches_draw_groups_of_several_rounds():
  """The CIFAR-100 config's KD batch is 5 groups of 20 classes (not one round's whole batch),
  and one round of 5 groups still covers the 100 classes once."""
  config = paper_cifar.get_config("cifar100,resnet34,resnet18")
  assert (config.classes_per_group, config.num_groups, config.student.batch_groups) == (20, 5, 5)
  groups = np.asarray(class_cycle.group_classes(jax.random.key(0), 3, 5, 20, 100))
  assert sorted(groups.reshape(-1)) == list(range(100))


@struct.dataclass
class _Method:
  bank: memory_bank.MemoryBank


@struct.dataclass
class _State:
  student: jax.Array
  method: _Method


def test_a_state_beyond_half_the_device_memory_is_refused_naming_the_bank(monkeypatch):
  bank = jax.eval_shape(lambda: memory_bank.create_bank(1000, (224, 224, 3)))   # 150.5 MB
  state = _State(jax.ShapeDtypeStruct((1000,), jnp.float32), _Method(bank))
  device = jax.local_devices()[0]
  monkeypatch.setattr(platform, "device_memory_bytes", lambda d: 400_000_000)
  train.check_state_fits(state, device)                          # 0.15 GB of 0.4: fits.
  monkeypatch.setattr(platform, "device_memory_bytes", lambda d: 200_000_000)
  with pytest.raises(ValueError, match=r"needs 0\.2 GB on every device, of which the memory "
                     r"bank holds 0\.2 GB \(1000 images of 224x224x3\), more than 50% of this "
                     r"cpu device's 0\.2 GB; lower --config.bank_capacity"):
    train.check_state_fits(state, device)
  monkeypatch.setattr(platform, "device_memory_bytes", lambda d: None)   # Unknown: no check.
  train.check_state_fits(state, device)
