"""CAE-DFKD on the NAYER base (METHOD.md a.0-a.7): CEND feeds the generator, CNCL joins KD.

The two plug-ins and nothing else; the base is methods/nayer.py, the CEND layer
cend.py and CNCL `losses.cncl_loss`. `cend.mode` and `student.cncl_weight` switch
either off for the paper's ablation arms ("clean" and 0 give NAYER's maths).
"""

from caedfkd_jax import cend
from caedfkd_jax.methods import nayer
from caedfkd_jax.steps import Setup, hparam


def cend_inputs(setup: Setup, hparams: dict, rng) -> cend.GeneratorBatch:
  """Eq. 3: each class's clean embedding (the CNCL anchor) and its N diffused copies."""
  c = setup.config.cend
  magnitude = (tuple(c.magnitudes) if c.magnitudes is not None   # One per source.
               else hparam(setup, hparams, "cend.magnitude"))
  return cend.build_generator_batch(rng, setup.table_KxD, setup.config.num_groups,
                                    c.num_sources, magnitude, mode=c.mode, sources=c.sources,
                                    scale_D=setup.noise_scale_D)


def bundle_fields(config) -> dict:
  return {"cend_mode": config.cend.mode, "cncl_weight": config.student.cncl_weight}


METHOD = nayer.make_method(
    "cae_dfkd", "CAE-DFKD: NAYER's base fed by CEND (class embeddings diffused by N noise "
    "sources), plus the CNCL contrastive loss on the student.",
    inputs=cend_inputs, with_cncl=True, bundle_fields=bundle_fields)
