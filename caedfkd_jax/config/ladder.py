"""The paper's ablation ladder as named config overrides: NAYER, + CEND, + CNCL.

Each arm sets the same few fields, so two arms differ in exactly what the table
says; every other field keeps its config's value. Pick one with a config
argument (`cifar10_resnet56_resnet20.py:cpu,base`, `paper_cifar.py:cifar10,
resnet34,resnet18,cend`); `--config.X` overrides still apply after it.
"""

from typing import Any

import ml_collections

from caedfkd_jax.config import fields

# arm -> {"section.field": value}. docs/methods.md, "The ablation ladder",
# lists the same.
# Every arm runs NAYER's round loop as its code does (the student in train mode after an epoch's
# first round: student_train_mode_in_rounds), so that arms differ only in their rung.
NAYER_LOOP = {"student_train_mode_in_rounds": True}
ARMS: dict[str, dict[str, Any]] = {
    # NAYER as published: clean label embeddings through its per-view noisy layer, redrawn every
    # round; the KD batch drawn uniformly from the pool; no CNCL.
    "base": {"cend.mode": "clean", "generator.reinit_noisy_layer": True,
             "generator.noisy_chunks": "per_view", "student.sampler": "uniform",
             "student.cncl_weight": 0.0, **NAYER_LOOP},
    # + CEND: diffused embeddings (Eq. 3), still no CNCL, the same KD sampling as NAYER.
    "cend": {"cend.mode": "cend", "student.sampler": "uniform", "student.cncl_weight": 0.0,
             **NAYER_LOOP},
    # + CNCL: the full method (whole CNCL groups in every KD batch), in NAYER's loop.
    "cend_cncl": {"cend.mode": "cend", "student.sampler": "groups", "student.cncl_weight": 0.5,
                  **NAYER_LOOP},
    # Table I's image-level baselines on the base (NAYER + Mixup, NAYER + image-level
    # contrastive learning), where the paper reports both hurt; CNCL's weight and tau for the
    # contrastive one [INFERRED].
    "mixup": {"cend.mode": "clean", "generator.reinit_noisy_layer": True,
              "generator.noisy_chunks": "per_view", "student.sampler": "uniform",
              "student.cncl_weight": 0.0, "student.mixup_alpha": 1.0, **NAYER_LOOP},
    "image_contrastive": {"cend.mode": "clean", "generator.reinit_noisy_layer": True,
                          "generator.noisy_chunks": "per_view", "student.sampler": "uniform",
                          "student.cncl_weight": 0.0, "student.image_contrastive_weight": 0.5,
                          **NAYER_LOOP},
    # A separate reference, not a rung: plain N(0, I) generator input, no CNCL, uniform sampling.
    "gaussian": {"cend.mode": "gaussian", "student.sampler": "uniform", "student.cncl_weight": 0.0,
                 **NAYER_LOOP},
}


def apply_arm(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
  """Sets `arm`'s fields on `config` in place (as a get_config does) and returns it."""
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; the arms are {', '.join(ARMS)}.")
  return fields.set_fields(config, ARMS[arm])
