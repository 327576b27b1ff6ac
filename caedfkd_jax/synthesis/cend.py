"""CEND (Eq. 3): category embeddings diffused by N noise sources of distinct distributions.

    e^n_k = e^off_k + M_n * q_n,   q_n ~ NS_n,   n = 1..N

Every source is zero-mean and unit-variance, so M_n alone sets the strength:
in the table's units ("absolute"), or per dimension in units of the table's
spread across classes ("relative", `noise_scale`), so that one M means as much
for a MiniLM table as for a CLIP one. `build_generator_batch` lays one
synthesis batch out as CNCL groups, of all K classes or of C sampled ones
(`class_cycle`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

NOISE_SOURCES = ("gaussian", "uniform", "laplace", "rademacher", "exponential", "student_t")
MODES = ("cend", "clean", "gaussian")
MAGNITUDE_SCALES = ("absolute", "relative")


def sample_noise(rng: jax.Array, source: str, shape: Sequence[int]) -> jax.Array:
  """Zero-mean, unit-variance noise from one named source."""
  if source == "gaussian":
    return jax.random.normal(rng, shape)
  if source == "uniform":
    return jax.random.uniform(rng, shape, minval=-jnp.sqrt(3.0), maxval=jnp.sqrt(3.0))
  if source == "laplace":
    return jax.random.laplace(rng, shape) / jnp.sqrt(2.0)
  if source == "rademacher":
    return jax.random.rademacher(rng, shape, dtype=jnp.float32)
  if source == "exponential":
    return jax.random.exponential(rng, shape) - 1.0
  if source == "student_t":
    dof = 5.0
    return jax.random.t(rng, dof, shape) / jnp.sqrt(dof / (dof - 2.0))
  raise ValueError(f"Unknown noise source {source!r}; choose from {NOISE_SOURCES}.")


def _sources(num_sources: int, sources: Sequence[str] | None) -> tuple[str, ...]:
  if sources is None:
    if not 1 <= num_sources <= len(NOISE_SOURCES):
      raise ValueError(f"num_sources={num_sources}: CEND has {len(NOISE_SOURCES)} built-in sources "
                       f"{NOISE_SOURCES}; pass `sources` to choose others.")
    return NOISE_SOURCES[:num_sources]
  if len(sources) != num_sources:
    raise ValueError(f"{len(sources)} sources given for num_sources={num_sources}.")
  return tuple(sources)


def spread(table_KxD: jax.Array) -> jax.Array:
  """Per-dimension standard deviation of the table across its classes (D; ddof 0).

  The class signal each dimension carries: about 0.16 on average for NAYER's
  CLIP ViT-B/32 CIFAR-10 table, 0.23 for the shipped MiniLM one (whose three
  dead dimensions have 0).
  """
  return jnp.std(jnp.asarray(table_KxD, jnp.float32), axis=0)


def noise_scale(table_KxD: jax.Array, magnitude_scale: str) -> jax.Array | None:
  """What M_n multiplies with the noise: None ("absolute", table units) or `spread` ("relative")."""
  if magnitude_scale == "absolute":
    return None
  if magnitude_scale == "relative":
    return spread(table_KxD)
  raise ValueError(f"Unknown magnitude scale {magnitude_scale!r}; choose from {MAGNITUDE_SCALES}.")


def diffuse(rng: jax.Array, clean_KxD: jax.Array, num_sources: int = 4,
            magnitude: float | Sequence[float] = 0.1,
            sources: Sequence[str] | None = None,
            scale_D: jax.Array | None = None) -> jax.Array:
  """The N diffused copies of every class embedding: N x K x D.

  `magnitude`: one M for every source or N of them; `scale_D` (see `noise_scale`)
  multiplies the noise per dimension, None leaving it in table units.
  """
  names = _sources(num_sources, sources)
  magnitudes = jnp.asarray(magnitude, jnp.float32)
  if magnitudes.shape not in ((), (num_sources,)):
    raise ValueError(f"{magnitudes.size} magnitudes given for num_sources={num_sources}.")
  magnitudes = jnp.broadcast_to(magnitudes, (num_sources,))
  keys = jax.random.split(rng, num_sources)
  noise = jnp.stack([sample_noise(k, s, clean_KxD.shape) for k, s in zip(keys, names)])
  if scale_D is not None:
    noise = noise * jnp.asarray(scale_D, jnp.float32)
  return clean_KxD[None] + magnitudes[:, None, None] * noise


@struct.dataclass
class GeneratorBatch:
  embeddings_BxD: jax.Array
  labels_B: jax.Array        # class k
  source_index_B: jax.Array  # 0: clean anchor, n >= 1: diffused by source n
  group_B: jax.Array         # CNCL group within the batch


def build_generator_batch(rng: jax.Array, table_KxD: jax.Array, num_groups: int,
                          num_sources: int = 4, magnitude: float | Sequence[float] = 0.1,
                          mode: str = "cend", sources: Sequence[str] | None = None,
                          scale_D: jax.Array | None = None,
                          classes_GxC: jax.Array | None = None) -> GeneratorBatch:
  """One synthesis batch of `num_groups` CNCL groups, B = num_groups * C * (N + 1).

  Inside a group: the C anchors, then the C copies diffused by source 1, ..., then by
  source N. Every C consecutive rows therefore hold each of the group's classes once, and
  every C * (N + 1) rows are one group: the generator's noisy layer relies on either
  (`generator.noisy_chunk_rows`). The group's classes are row g of `classes_GxC`
  (`class_cycle.group_classes`), or None: all K in label order (C = K). `magnitude` and
  `scale_D` are `diffuse`'s. Modes: "cend" (Eq. 3), "clean" (NAYER: every row the clean
  embedding) and "gaussian" (rows are N(0, I): the plain-noise base without CEND).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown CEND mode {mode!r}; choose from {MODES}.")
  k, d = table_KxD.shape
  views = num_sources + 1
  table_KxD = jnp.asarray(table_KxD, jnp.float32)
  if classes_GxC is None:
    classes_GxC = jnp.broadcast_to(jnp.arange(k), (num_groups, k))
    tables_GxCxD = None                                  # One table for every group.
  else:
    if classes_GxC.shape[0] != num_groups:
      raise ValueError(f"classes_GxC has {classes_GxC.shape[0]} rows for {num_groups} groups.")
    tables_GxCxD = table_KxD[classes_GxC]
  c = classes_GxC.shape[1]
  if mode == "cend":
    keys = jax.random.split(rng, num_groups)
    diffuse_one = lambda r, t: diffuse(r, t, num_sources, magnitude, sources, scale_D)
    if tables_GxCxD is None:
      diffused = jax.vmap(lambda r: diffuse_one(r, table_KxD))(keys)
      anchors = jnp.broadcast_to(table_KxD, (num_groups, 1, k, d))
    else:
      diffused = jax.vmap(diffuse_one)(keys, tables_GxCxD)
      anchors = tables_GxCxD[:, None]
    emb = jnp.concatenate([anchors, diffused], axis=1)                   # G x V x C x D
  elif mode == "clean":
    clean = table_KxD[None, None] if tables_GxCxD is None else tables_GxCxD[:, None]
    emb = jnp.broadcast_to(clean, (num_groups, views, c, d))
  else:
    emb = jax.random.normal(rng, (num_groups, views, c, d))
  shape = (num_groups, views, c)
  labels = jnp.broadcast_to(classes_GxC[:, None, :], shape)
  source_index = jnp.broadcast_to(jnp.arange(views)[:, None], shape)
  group = jnp.broadcast_to(jnp.arange(num_groups)[:, None, None], shape)
  return GeneratorBatch(emb.reshape(-1, d), labels.reshape(-1).astype(jnp.int32),
                        source_index.reshape(-1).astype(jnp.int32), group.reshape(-1).astype(jnp.int32))
