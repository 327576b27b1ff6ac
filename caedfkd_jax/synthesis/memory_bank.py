"""The synthetic memory bank: a fixed-size uint8 ring buffer on the device.

NAYER writes every synthetic image as a PNG and re-reads the whole folder each
round; here the images stay on the accelerator, quantised to uint8 exactly as
that PNG round-trip does, and are sampled inside the jitted KD step. When the
bank is full the oldest images are overwritten (NAYER's pool grows without
limit; a capacity of every image the schedule makes reproduces that).
"""

import jax
import jax.numpy as jnp
from flax import struct

SAMPLERS = ("groups", "uniform")  # How a KD batch is drawn: `sample_groups` or `sample`.


@struct.dataclass
class MemoryBank:
  images: jax.Array        # uint8, capacity x H x W x C
  labels: jax.Array        # int32, capacity: class k
  source_index: jax.Array  # int32: 0 anchor, n >= 1 diffused by CEND source n
  group: jax.Array         # int32: CNCL group id within its synthesis batch
  size: jax.Array          # int32 scalar: filled slots (they are slots 0..size-1)
  cursor: jax.Array        # int32 scalar: next slot to write

  @property
  def capacity(self) -> int:
    return self.images.shape[0]


def create_bank(capacity: int, image_shape: tuple[int, int, int]) -> MemoryBank:
  """An empty bank of `capacity` H x W x C images."""
  if capacity < 1:
    raise ValueError(f"Memory bank capacity must be at least 1, got {capacity}.")
  zeros = lambda: jnp.zeros((capacity,), jnp.int32)  # Distinct buffers: the state is donated.
  return MemoryBank(jnp.zeros((capacity, *image_shape), jnp.uint8), zeros(), zeros(), zeros(),
                    jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def quantize(images01: jax.Array) -> jax.Array:
  """[0, 1] floats -> uint8 as NAYER stores its PNGs.

  NAYER's save_image_batch does `(x.clamp(0, 1) * 255).astype('uint8')`, which truncates.
  """
  return jnp.floor(jnp.clip(images01.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def add(bank: MemoryBank, images01_BxHxWxC: jax.Array, labels: jax.Array,
        source_index: jax.Array, group: jax.Array) -> MemoryBank:
  """Writes a batch at the cursor, wrapping around and overwriting the oldest images.

  Jittable for a static batch size; one scatter per field, so a donated bank
  is updated in place.
  """
  b = images01_BxHxWxC.shape[0]
  if b > bank.capacity:
    raise ValueError(f"A batch of {b} images does not fit a memory bank of {bank.capacity}; "
                     "make the bank at least one synthesis batch large.")
  if images01_BxHxWxC.shape[1:] != bank.images.shape[1:]:
    raise ValueError(f"Images of shape {images01_BxHxWxC.shape[1:]} do not match the memory "
                     f"bank's {bank.images.shape[1:]}.")
  for name, meta in (("labels", labels), ("source_index", source_index), ("group", group)):
    if meta.shape != (b,):
      raise ValueError(f"{name} has shape {meta.shape}; expected ({b},), one per image.")
  slots = (bank.cursor + jnp.arange(b)) % bank.capacity
  write = lambda buffer, values: buffer.at[slots].set(values, unique_indices=True)
  return bank.replace(
      images=write(bank.images, quantize(images01_BxHxWxC)),
      labels=write(bank.labels, labels.astype(jnp.int32)),
      source_index=write(bank.source_index, source_index.astype(jnp.int32)),
      group=write(bank.group, group.astype(jnp.int32)),
      size=jnp.minimum(bank.size + b, bank.capacity),
      cursor=(bank.cursor + b) % bank.capacity)


def _gather(bank: MemoryBank, idx: jax.Array):
  return (bank.images[idx].astype(jnp.float32) / 255.0, bank.labels[idx],
          bank.source_index[idx], bank.group[idx])


def latest(bank: MemoryBank, n: int) -> tuple[jax.Array, jax.Array]:
  """The last `n` images written (oldest first) and their labels: a round's banked batch."""
  idx = (bank.cursor - n + jnp.arange(n)) % bank.capacity
  return bank.images[idx], bank.labels[idx]


def sample(bank: MemoryBank, rng: jax.Array, batch_size: int):
  """`batch_size` slots drawn uniformly (with replacement) from the filled ones.

  The "uniform" KD sampler (NAYER's pool sampling; see `methods.bank_kd.sample_kd_batch`).

  Returns (images01 float32 B x H x W x C, labels, source_index, group). An
  empty bank yields slot 0 (zeros).
  """
  idx = jax.random.randint(rng, (batch_size,), 0, jnp.maximum(bank.size, 1))
  return _gather(bank, idx)


def sample_groups(bank: MemoryBank, rng: jax.Array, num_groups: int, group_size: int):
  """`num_groups` whole CNCL groups, so every anchor in the batch comes with its positives.

  The bank must be filled in whole synthesis batches that are multiples of
  `group_size` (as `add` is used by the training loop), so group slot j holds
  rows [j * group_size, (j + 1) * group_size). Group slots are drawn uniformly
  among the filled ones, all distinct while enough are filled.

  Returns (images01, labels, source_index, group) with num_groups * group_size
  rows. `group` here is the group's slot in the bank, not the id stored with
  it: stored ids restart in every synthesis batch, and two groups from
  different batches must not look like one to a same-group CNCL.
  """
  if group_size < 1 or bank.capacity % group_size:
    raise ValueError(f"Memory bank capacity {bank.capacity} is not a multiple of the CNCL group "
                     f"size {group_size}; round the capacity up to a multiple of it.")
  if num_groups < 1:
    raise ValueError(f"num_groups must be at least 1, got {num_groups}.")
  num_slots = bank.capacity // group_size
  filled = jnp.maximum(bank.size // group_size, 1)
  # A random order of the filled slots first (unfilled ones score -1), cycled
  # if fewer are filled than requested.
  scores = jnp.where(jnp.arange(num_slots) < filled, jax.random.uniform(rng, (num_slots,)), -1.0)
  _, order = jax.lax.top_k(scores, min(num_groups, num_slots))
  slot = order[jnp.arange(num_groups) % jnp.minimum(filled, order.shape[0])]
  idx = (slot[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
  images, labels, source_index, _ = _gather(bank, idx)
  return images, labels, source_index, jnp.repeat(slot, group_size).astype(jnp.int32)
