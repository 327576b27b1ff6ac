"""The synthetic memory bank: a fixed-size uint8 ring buffer on the device.

NAYER writes every synthetic image as a PNG and re-reads the folder each round;
here the images stay on the accelerator, quantised to uint8 exactly as that
PNG round-trip does, and are sampled inside the jitted KD step.
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MemoryBank:
  images: jax.Array        # uint8, capacity x H x W x C
  labels: jax.Array        # int32, capacity
  source_index: jax.Array  # int32: 0 anchor, n >= 1 diffused by source n
  group: jax.Array         # int32: CNCL group id within its synthesis batch
  size: jax.Array          # int32: filled slots
  cursor: jax.Array        # int32: next slot to write

  @property
  def capacity(self) -> int:
    return self.images.shape[0]


def create_bank(capacity: int, image_shape: tuple[int, int, int]) -> MemoryBank:
  zeros = lambda: jnp.zeros((capacity,), jnp.int32)  # Distinct buffers: the state is donated.
  return MemoryBank(jnp.zeros((capacity, *image_shape), jnp.uint8), zeros(), zeros(), zeros(),
                    jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def quantize(images01: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip(images01, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def add(bank: MemoryBank, images01_BxHxWxC: jax.Array, labels: jax.Array,
        source_index: jax.Array, group: jax.Array) -> MemoryBank:
  """Writes a batch at the cursor, wrapping around and overwriting the oldest images."""
  b = images01_BxHxWxC.shape[0]
  if b > bank.capacity:
    raise ValueError(f"A batch of {b} images does not fit a memory bank of {bank.capacity}.")
  slots = (bank.cursor + jnp.arange(b)) % bank.capacity
  return bank.replace(
      images=bank.images.at[slots].set(quantize(images01_BxHxWxC)),
      labels=bank.labels.at[slots].set(labels.astype(jnp.int32)),
      source_index=bank.source_index.at[slots].set(source_index.astype(jnp.int32)),
      group=bank.group.at[slots].set(group.astype(jnp.int32)),
      size=jnp.minimum(bank.size + b, bank.capacity),
      cursor=(bank.cursor + b) % bank.capacity)


def _gather(bank: MemoryBank, idx: jax.Array):
  return (bank.images[idx].astype(jnp.float32) / 255.0, bank.labels[idx],
          bank.source_index[idx], bank.group[idx])


def sample(bank: MemoryBank, rng: jax.Array, batch_size: int):
  """Uniform over the filled slots: (images01 float32, labels, source_index, group)."""
  idx = jax.random.randint(rng, (batch_size,), 0, jnp.maximum(bank.size, 1))
  return _gather(bank, idx)


def sample_groups(bank: MemoryBank, rng: jax.Array, num_groups: int, group_size: int):
  """Whole CNCL groups, so every anchor in the batch comes with its positives.

  The bank is filled in whole synthesis batches (multiples of `group_size`), so
  group slot j occupies [j * group_size, (j + 1) * group_size).
  """
  if bank.capacity % group_size:
    raise ValueError(f"Memory bank capacity {bank.capacity} is not a multiple of the CNCL group "
                     f"size {group_size}.")
  filled_groups = jnp.maximum(bank.size // group_size, 1)
  slot = jax.random.randint(rng, (num_groups,), 0, filled_groups)
  idx = (slot[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
  return _gather(bank, idx)
