"""CPSC-DFKD's feature adapter (their WRNAdapter, METHOD.md b.5): student features -> teacher's width.

CPSC's SupCon term treats a student feature and a teacher feature of the same
image as two views, so they need one width. For WRN-16-1 / WRN-40-1 students
(64-d) the authors put a head on the student's penultimate feature:
"mlp" = Linear(d_in, d_in) -> ReLU -> Linear(d_in, d_out), or "linear" =
Linear(d_in, d_out), both with PyTorch's default init. Its input is the
student's L2-normalised feature (their models normalise when asked for
features); its output is not normalised again. The head feeds SupCon only,
never the logits.

Quirk of their code: the head never learns. Its only gradient comes from the
generator's loss, the generator's Adam does not hold it, and the student
optimiser's zero_grad clears that gradient before each student step, whose
loss does not touch features. Under PyTorch >= 2.0 (grads set to None) it stays
a fixed random projection; under 1.x (grads zeroed) SGD's weight decay alone
shrinks it towards zero over training. Whoever wires it here decides whether
it trains, and with what.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import linear

ADAPTER_HEADS = ("mlp", "linear")


class FeatureAdapter(nn.Module):
  """`apply({"params": p}, features_BxDin)` -> B x `features_out`."""
  features_out: int
  head: str = "mlp"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features_BxDin: jax.Array) -> jax.Array:
    d_in = features_BxDin.shape[-1]
    x = features_BxDin.astype(jnp.float32)
    if self.head == "mlp":
      x = nn.relu(linear(d_in, d_in, self.dtype, name="fc1")(x))
      return linear(self.features_out, d_in, self.dtype, name="fc2")(x).astype(jnp.float32)
    if self.head == "linear":
      return linear(self.features_out, d_in, self.dtype, name="fc")(x).astype(jnp.float32)
    raise ValueError(f"Unknown adapter head {self.head!r}; choose from {ADAPTER_HEADS}.")
