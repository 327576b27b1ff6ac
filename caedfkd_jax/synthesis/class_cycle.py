"""Which classes a synthesis group holds when it cannot hold all K: a shuffled cycle.

CEND puts every class in every group (K x (N + 1) rows), which stops fitting long before
ImageNet's 1,000 classes at 224 px. With `classes_per_group` C < K a group holds C classes
instead, read off the run's class sequence: cycle after cycle, each a fresh permutation of
the K classes, consumed C at a time, group after group, round after round. Every class
therefore appears exactly once in each K / C consecutive groups (even coverage, unlike
independent draws), and a group never holds a class twice when C divides K. NAYER's
ImageNet rounds read a shuffled label list the same way (one permutation per epoch there).
"""

import jax
import jax.numpy as jnp

CLASS_CYCLE = 2**31 - 2   # Folded into a run's rng for its class sequence.


def cycle_classes(rng: jax.Array, start: jax.Array | int, count: int,
                  num_classes: int) -> jax.Array:
  """Positions `start` .. `start + count - 1` of the class sequence of `rng` (int32, count).

  Cycle c is `jax.random.permutation(fold_in(rng, c), K)`, so any position is a pure
  function of the run's rng: a resumed run reads on where it stopped. Jittable (`start`
  may be traced; `count` and `num_classes` are static).
  """
  if count < 1 or num_classes < 1:
    raise ValueError(f"count={count} and num_classes={num_classes} must be positive.")
  first_cycle = jnp.asarray(start, jnp.int32) // num_classes
  num_cycles = count // num_classes + 2    # Enough to cover `count` positions from any offset.
  cycles = first_cycle + jnp.arange(num_cycles, dtype=jnp.int32)
  sequence = jax.vmap(lambda c: jax.random.permutation(jax.random.fold_in(rng, c),
                                                       num_classes))(cycles).reshape(-1)
  offset = jnp.asarray(start, jnp.int32) - first_cycle * num_classes
  return jax.lax.dynamic_slice(sequence, (offset,), (count,)).astype(jnp.int32)


def group_classes(rng: jax.Array, round_index: jax.Array | int, num_groups: int,
                  classes_per_group: int, num_classes: int) -> jax.Array:
  """The classes of round `round_index`'s `num_groups` groups: num_groups x C (int32).

  Group g of round r reads the C positions from (r * num_groups + g) * C on.
  """
  start = jnp.asarray(round_index, jnp.int32) * (num_groups * classes_per_group)
  return cycle_classes(rng, start, num_groups * classes_per_group,
                       num_classes).reshape(num_groups, classes_per_group)


def check_classes_per_group(classes_per_group: int, num_classes: int) -> None:
  """0 (all K) or a divisor of K, so that no group holds a class twice."""
  c, k = classes_per_group, num_classes
  if c == 0 or c == k:
    return
  if not 0 < c < k or k % c:
    divisors = [d for d in range(1, k) if k % d == 0]
    shown = ", ".join(map(str, divisors if len(divisors) <= 12 else divisors[-12:]))
    raise ValueError(f"config.classes_per_group={c} with the teacher's {k} classes: use 0 "
                     f"(every class in every group) or a divisor of {k} below it ({shown}), so "
                     "that each group holds distinct classes and K / C groups cover every "
                     "class once.")
