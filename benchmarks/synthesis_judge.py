"""One verdict on a synthetic batch, the same whatever made it: the teacher in PyTorch.

`benchmarks/nayer_parity.py` scores NAYER's and caedfkd-jax's kept batches with it
(kept apart from that script so that importing it defines no command-line flags).
"""

import numpy as np


def torch_teacher(bundle):
  """The bundle's network as a PyTorch module in eval mode, weights loaded strictly."""
  import torch
  from caedfkd_jax.io import convert, torch_zoo
  spec = bundle.spec
  module = torch_zoo.build(spec.arch, spec.num_classes)
  state = convert.variables_to_state_dict(bundle.variables, spec.arch, spec.num_classes,
                                          image_size=spec.image_size)
  module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
  return module.eval().requires_grad_(False)


def judge(teacher, images01_BxHxWxC: np.ndarray, labels_B: np.ndarray, mean, std,
          low_confidence: float) -> dict[str, float]:
  """The teacher's verdict on one kept batch (unaugmented), the same for both sides."""
  import torch
  x = torch.as_tensor(np.ascontiguousarray(images01_BxHxWxC.transpose(0, 3, 1, 2)), dtype=torch.float32)
  x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
  bn_terms = []

  def hook(module, inputs, _):
    a = inputs[0]
    mean_c, var_c = a.mean((0, 2, 3)), a.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
    bn_terms.append(torch.norm(module.running_var - var_c) + torch.norm(module.running_mean - mean_c))

  handles = [m.register_forward_hook(hook) for m in teacher.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
  try:
    with torch.no_grad():
      logits = teacher(x)
  finally:
    for h in handles:
      h.remove()
  labels = torch.as_tensor(labels_B, dtype=torch.long)
  probs = logits.softmax(-1)
  confidence, predicted = probs.max(-1)
  wrong = predicted != labels
  return {"ce": float(torch.nn.functional.cross_entropy(logits, labels)),
          "top1": float((~wrong).float().mean()),
          "confidence": float(confidence.mean()),
          "confident_wrong": float((wrong & (confidence >= low_confidence)).float().mean()),
          "bn": float(sum(bn_terms)),
          "predicted": predicted.numpy(), "confidence_B": confidence.numpy()}
