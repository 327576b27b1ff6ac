"""CAE-DFKD (METHOD.md a.0-a.7): CEND feeds the generator, CNCL joins KD; on NAYER's base.

The two plug-ins and nothing else. `METHOD` puts them on the NAYER base
(methods/nayer.py), as the paper's main results; cae_dfkd_cmi.py puts them on the CMI
base, as the paper's own ablation. The CEND layer is synthesis/cend.py, CNCL
`synthesis.losses.cncl_loss`. `cend.mode` and `student.cncl_weight` switch either off for
the ablation arms ("clean" and 0 give the base's maths on the NAYER base).
"""

from collections.abc import Collection

from caedfkd_jax.methods import nayer
from caedfkd_jax.methods.base import hparam, Setup
from caedfkd_jax.synthesis import cend

# What the plug-ins read on top of a base: every CEND field, and CNCL's.
READS = ("cend.", "student.cncl_")
SWEEPABLE = ("cend.magnitude", "student.cncl_weight", "student.cncl_temperature")
CNCL_FORMS = ("infonce", "supcon")


def cend_inputs(setup: Setup, hparams: dict, rng, classes_GxC=None) -> cend.GeneratorBatch:
  """Eq. 3: each class's clean embedding (the CNCL anchor) and its N diffused copies; the
  groups' classes are `classes_GxC` (None: all K)."""
  c = setup.config.cend
  magnitude = (tuple(c.magnitudes) if c.magnitudes is not None   # One per source.
               else hparam(setup, hparams, "cend.magnitude"))
  return cend.build_generator_batch(rng, setup.table_KxD, setup.config.num_groups,
                                    c.num_sources, magnitude, mode=c.mode, sources=c.sources,
                                    scale_D=setup.noise_scale_D, classes_GxC=classes_GxC)


def check_config(config, num_devices: int, num_classes: int, swept: Collection[str]) -> None:
  """CEND's mode, sources, magnitudes and scale; CNCL's form and sub-batch."""
  c = config.cend
  if c.mode not in cend.MODES:
    raise ValueError(f"config.cend.mode={c.mode!r}: use one of {', '.join(cend.MODES)}.")
  if c.sources is not None:
    if len(c.sources) != c.num_sources:
      raise ValueError(f"config.cend.sources={tuple(c.sources)!r} names {len(c.sources)} sources "
                       f"but config.cend.num_sources={c.num_sources}; give one per source.")
    unknown = [s for s in c.sources if s not in cend.NOISE_SOURCES]
    if unknown:
      raise ValueError(f"config.cend.sources: unknown {unknown}; choose from "
                       f"{', '.join(cend.NOISE_SOURCES)}.")
  if c.magnitudes is not None:
    m = tuple(c.magnitudes)
    if len(m) != c.num_sources:
      raise ValueError(f"config.cend.magnitudes={m!r} has {len(m)} values but "
                       f"config.cend.num_sources={c.num_sources}; give one M_n per source, e.g. "
                       f"'({','.join(['0.1'] * max(c.num_sources, 1))})', or unset it to use "
                       "cend.magnitude for every source.")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in m):
      raise ValueError(f"config.cend.magnitudes={m!r}: every M_n must be a number >= 0.")
    if "cend.magnitude" in swept:
      raise ValueError(f"config.sweep sweeps cend.magnitude, but config.cend.magnitudes={m!r} "
                       "sets every source's magnitude, so the swept values would go unused; "
                       "unset cend.magnitudes to sweep cend.magnitude, or run each tuple of "
                       "magnitudes as its own job.")
  if c.magnitude_scale not in cend.MAGNITUDE_SCALES:
    raise ValueError(f"config.cend.magnitude_scale={c.magnitude_scale!r}: use absolute (M_n in "
                     "the table's units) or relative (M_n times each dimension's std across "
                     "classes).")
  s = config.student
  if s.cncl_form not in CNCL_FORMS:
    raise ValueError(f"config.student.cncl_form={s.cncl_form!r}: use infonce or supcon.")
  if s.cncl_groups is not None and not s.cncl_groups > 0:
    raise ValueError(f"config.student.cncl_groups={s.cncl_groups!r} must be positive "
                     "(or None: as many as student.batch_groups).")


def bundle_fields(config) -> dict:
  return {"cend_mode": config.cend.mode, "cncl_weight": config.student.cncl_weight}


METHOD = nayer.make_method(
    "cae_dfkd", "CAE-DFKD: NAYER's base fed by CEND (class embeddings diffused by N noise "
    "sources), plus the CNCL contrastive loss on the student.",
    inputs=cend_inputs, with_cncl=True, reads=nayer.READS + READS,
    sweepable=nayer.SWEEPABLE + SWEEPABLE, check=check_config, bundle_fields=bundle_fields)
