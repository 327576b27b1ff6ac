"""CAE-DFKD on the CMI base: CEND's embeddings in place of CMI's z, CNCL on the student.

The paper's own ablation on CMI (Base (CMI), +CEND, +CEND+CNCL): the plug-ins of cae_dfkd.py
on the base of cmi.py. Every synthesis batch holds whole CEND groups, as on NAYER's base.
"""

from caedfkd_jax.methods import cae_dfkd, cmi

METHOD = cmi.make_method(
    "cae_dfkd_cmi", "CAE-DFKD on the CMI base: CEND's embeddings in place of CMI's z, plus "
    "CNCL on the student (the paper's CMI-based ablation).",
    inputs=cae_dfkd.cend_inputs, with_cncl=True, grouped=True,
    reads=cmi.READS + ("embeddings", "num_groups", "classes_per_group") + cae_dfkd.READS,
    sweepable=cmi.SWEEPABLE + cae_dfkd.SWEEPABLE, check=cae_dfkd.check_config,
    bundle_fields=cae_dfkd.bundle_fields, quick={"cmi.memory_size": 2048, "cmi.negatives": 256})
