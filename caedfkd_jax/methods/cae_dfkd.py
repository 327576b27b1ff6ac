"""CAE-DFKD (METHOD.md a.0-a.7): CEND feeds the generator, CNCL joins KD; on two bases.

The two plug-ins and nothing else. `METHOD` puts them on the NAYER base
(methods/nayer.py), as the paper's main results; `ON_CMI` on the CMI base
(methods/cmi.py: CEND's embeddings in place of CMI's z), as the paper's own
ablation (Base (CMI), +CEND, +CEND+CNCL). The CEND layer is cend.py, CNCL
`losses.cncl_loss`. `cend.mode` and `student.cncl_weight` switch either off for
the ablation arms ("clean" and 0 give the base's maths on the NAYER base).
"""

from caedfkd_jax.synthesis import cend
from caedfkd_jax.methods import cmi, nayer
from caedfkd_jax.engine.steps import Setup, hparam


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

ON_CMI = cmi.make_method(
    "cae_dfkd_cmi", "CAE-DFKD on the CMI base: CEND's embeddings in place of CMI's z, plus "
    "CNCL on the student (the paper's CMI-based ablation).",
    inputs=cend_inputs, with_cncl=True, grouped=True, bundle_fields=bundle_fields,
    ignores=cmi.NAYER_ONLY + ("cmi.nz", "cmi.synthesis_batch"))
